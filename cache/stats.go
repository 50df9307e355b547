package cache

import (
	"runtime"
	"sync/atomic"
	"unsafe"
)

// Stats is a snapshot of a Cache's counters. Counters only grow; take two
// snapshots and subtract to get rates.
type Stats struct {
	// Hits counts lookups served from the cache, cached absences included.
	Hits uint64
	// Misses counts lookups that found no live entry and went to a load.
	Misses uint64
	// Bypassed counts lookups that read through to the loader because the
	// bus link was not proven within MaxStaleness (G2).
	Bypassed uint64
	// Loads counts calls of the loader (a LoadMany call counts once).
	Loads uint64
	// LoadErrors counts loads that failed with an error other than
	// ErrNotFound, panics included.
	LoadErrors uint64
	// Coalesced counts lookups that shared a load another caller started,
	// instead of starting their own (G5).
	Coalesced uint64
	// SkippedStores counts load results not cached because an
	// invalidation, flush or write overlapped the load (race 1), or the
	// link was unproven when it finished.
	SkippedStores uint64
	// InvalidationsSent counts keys published to other nodes (a flush
	// counts as one).
	InvalidationsSent uint64
	// InvalidationsReceived counts keys received from other nodes.
	InvalidationsReceived uint64
	// PublishErrors counts failed publications.
	PublishErrors uint64
	// Flushes counts times every entry was dropped: InvalidateAll, and
	// flushes asked for by the bus (gaps, malformed messages).
	Flushes uint64
	// ValuesSent counts values and tombstones this Cache broadcast
	// (see [Options.Codec]); they count in InvalidationsSent too.
	ValuesSent uint64
	// ValuesInstalled counts values and tombstones received from other
	// nodes and installed: each saved the load a plain invalidation would
	// have cost the next Get.
	ValuesInstalled uint64
	// ValuesRejected counts values and tombstones received that this node
	// could not tell were the newest it knows of: it kept a newer cached
	// value, or dropped the key as for a plain invalidation.
	ValuesRejected uint64
	// OversizeValues counts written values whose encoding was larger than
	// [Options.MaxBroadcastSize], published as plain invalidations.
	OversizeValues uint64
	// CodecErrors counts values that [Options.Codec] failed to encode
	// (published as plain invalidations) or to decode (received as plain
	// invalidations), panics included.
	CodecErrors uint64
	// Evictions counts entries removed to respect the capacity or
	// [Options.MaxWeight].
	Evictions uint64
	// WeightEvictions counts the Evictions made to respect MaxWeight: were
	// most evictions of this kind, MaxWeight rather than capacity is what
	// limits the entries held.
	WeightEvictions uint64
	// Oversized counts values not cached because they weigh more than a
	// shard's share of MaxWeight; they were returned to their callers, and
	// the next Get of such a key loads it again.
	Oversized uint64
	// Entries is the number of entries held now, expired ones included
	// until they are looked up or evicted.
	Entries int
	// Weight is the total weight of the entries held now, as
	// [Options.Weigher] reported it (0 without one); like Entries, it
	// includes expired entries until they are looked up or evicted. It
	// stays within MaxWeight.
	Weight uint64
	// GuardBytes is the memory held by the fill-race guard, which is fixed
	// at creation.
	GuardBytes int
}

// Stats returns a snapshot of the counters. It is safe to call at any time,
// including after Close.
func (c *Cache[K, V]) Stats() Stats {
	st := Stats{
		Bypassed:              c.stats.bypassed.Load(),
		Loads:                 c.stats.loads.Load(),
		LoadErrors:            c.stats.loadErrors.Load(),
		Coalesced:             c.stats.coalesced.Load(),
		SkippedStores:         c.stats.skipped.Load(),
		InvalidationsSent:     c.stats.sent.Load(),
		InvalidationsReceived: c.stats.received.Load(),
		PublishErrors:         c.stats.publishErrors.Load(),
		Flushes:               c.stats.flushes.Load(),
		ValuesSent:            c.bstats.valuesSent.Load(),
		ValuesInstalled:       c.bstats.valuesInstalled.Load(),
		ValuesRejected:        c.bstats.valuesRejected.Load(),
		OversizeValues:        c.bstats.oversizeValues.Load(),
		CodecErrors:           c.bstats.codecErrors.Load(),
		GuardBytes:            c.guard.bytes(),
	}
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		st.Hits += s.hits
		st.Misses += s.misses
		st.Evictions += s.evictions
		st.WeightEvictions += s.weightEvictions
		st.Oversized += s.oversized
		st.Entries += int(s.length.Load())
		st.Weight += s.weight
		s.mu.Unlock()
	}
	st.Hits += c.hits.sum()
	return st
}

// stripes is a counter that goroutines on different cores can add to
// without writing the same cache line. Each add goes to the stripe that the
// address of a variable on the adding goroutine's stack picks: goroutines
// running at the same time have stacks in different places, so they mostly
// add to different stripes, and a goroutine keeps its stripe while its
// stack stays where it is. It costs a multiplication, where the sync.Pool
// of stripe tokens used before cost a Get and a Put: 6–8 ns of a 60 ns hit
// with one goroutine, and no more with 64 goroutines switching between two
// cores (BENCHMARKS.md §2). otter's read buffers pick their stripes the
// same way.
//
// Two goroutines whose stacks hash to the same stripe move its line between
// their cores on every add while both run: with 8 stripes, about one
// parallel benchmark run in eight was three times slower. There are at
// least 32 stripes (4 KiB), so that two goroutines collide once in 32. A
// compare-and-swap that deals new stripes on a failure ends collisions
// within a few adds, but cost 3 ns a hit with one goroutine, and 20 % in
// parallel without collisions; it was not kept.
type stripes struct {
	s    []stripe
	mask uintptr
}

type stripe struct {
	n atomic.Uint64
	_ [120]byte
}

func newStripes() *stripes {
	n := 32
	for n < 4*runtime.GOMAXPROCS(0) {
		n <<= 1
	}
	return &stripes{s: make([]stripe, n), mask: uintptr(n - 1)}
}

func (st *stripes) add() {
	st.s[stackStripe()&st.mask].n.Add(1)
}

// stackStripe hashes the address of a variable on the calling goroutine's
// stack. The bits below the smallest stack (2 KiB) follow the depth of the
// call rather than the goroutine, so they are dropped; stacks are aligned
// to their size, so the bits that differ between neighbouring stacks are
// multiplied up into the high bits, which are kept.
func stackStripe() uintptr {
	var x byte
	return uintptr((uint64(uintptr(unsafe.Pointer(&x))>>11) * 0x9e3779b97f4a7c15) >> 40)
}

func (st *stripes) sum() uint64 {
	var t uint64
	for i := range st.s {
		t += st.s[i].n.Load()
	}
	return t
}
