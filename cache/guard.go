package cache

import (
	"encoding/binary"
	"math"
	"strings"
	"sync/atomic"
	"unsafe"
)

// guard is the fill-race guard (DESIGN races 1, 2, 11 and 13).
//
// A load takes a token (the flush epoch and its key's slot generation)
// before it reads the source, and stores its result only if the token is
// still current when it holds the shard lock. Every invalidation and every
// local write bumps the slot's generation before it takes the shard lock to
// drop or replace the entry; every flush bumps the epoch before it purges.
// So for the interleaving
//
//	load:  token=g0 ... reads old row ........................ store?
//	write:              commit; invalidation: gen=g1, drop key
//
// the store sees g1 != g0 and skips: the old row is never cached.
//
// The table lives outside the LRU and never forgets: evicting an entry
// cannot erase the fact that its key was invalidated (race 11). Keys share
// slots by hash; a collision only makes a load skip its store, or splits a
// flight in two.
//
// The table also remembers source positions (race 10): each slot the
// highest position named by an invalidation or a local write of its keys,
// and the table a floor for every key, unknown at first and after each
// flush until a load that read the authoritative source reports where it
// stood (see
// RequiredPosition and ReportPosition).
type guard struct {
	epoch atomic.Uint64
	slots []slot
	mask  uint64

	// unknown counts the flushes that made the floor unknown; known is the
	// count up to which a load has reported the floor since. The floor is
	// known while they are equal.
	unknown, known atomic.Uint64
	floor          atomic.Uint64 // positions every load must reach
}

type slot struct {
	// gen counts invalidations and local writes of the keys hashing here.
	gen atomic.Uint64
	// high is the highest version seen in an invalidation or a local write
	// of a key hashing here, or unknownVersion once a change without a
	// version was seen. A write-through of a lower version must not be
	// installed without other evidence: a newer write may already have
	// been invalidated (race 13).
	high atomic.Int64
	// pos is the highest source position named by an invalidation or a
	// local write of a key hashing here: a load must read a source that has
	// reached it.
	pos atomic.Uint64
}

// unknownVersion is the high mark of a slot after a change whose version
// is unknown: it may be newer than any version.
const unknownVersion = math.MaxInt64

// token is what a load remembers of the guard before it reads the source:
// the flush epoch and the slot's generation, which decide whether it may
// store its result, and the source position it must read at or after
// (PositionUnknown: the authoritative source), with the flush count that
// position was known for.
type token struct{ epoch, gen, pos, unknown uint64 }

func newGuard(size int) *guard {
	n := 1
	for n < size {
		n <<= 1
	}
	g := &guard{slots: make([]slot, n), mask: uint64(n - 1)}
	// A new cache heard of none of the changes made before it existed,
	// at positions nobody told it: as after a flush, the floor is unknown
	// until a load reports it.
	g.unknown.Store(1)
	return g
}

func (g *guard) slot(h uint64) *slot { return &g.slots[h&g.mask] }

// token returns the token of a load of the key hashed to h. The loads of
// the fields follow the order in which bump and flush store them, so that
// a token that sees a change's generation or epoch sees its position too:
//
//	bump:  pos = max(pos, p) ... gen++
//	token:                          gen ... pos  (sees p if it saw gen+1)
func (g *guard) token(h uint64) token {
	s := g.slot(h)
	tok := token{epoch: g.epoch.Load(), gen: s.gen.Load()}
	tok.unknown = g.unknown.Load()
	if g.known.Load() != tok.unknown {
		tok.pos = PositionUnknown
		return tok
	}
	tok.pos = max(s.pos.Load(), g.floor.Load())
	return tok
}

// current reports whether nothing that could make a load's result stale has
// happened since tok was taken. Call it with the key's shard lock held.
func (g *guard) current(h uint64, tok token) bool {
	return g.epoch.Load() == tok.epoch && g.slot(h).gen.Load() == tok.gen
}

// bump records a change of the key hashed to h, at version (0: unknown)
// and source position pos (0: unknown). Call it before a load that could
// have read the old row can check the token: before, or while holding, the
// shard lock under which the entry is dropped or replaced.
func (g *guard) bump(h uint64, version int64, pos uint64) {
	s := g.slot(h)
	raise(&s.pos, pos) // before gen: see token
	s.gen.Add(1)
	if version == 0 {
		version = unknownVersion
	}
	for {
		old := s.high.Load()
		if version <= old || s.high.CompareAndSwap(old, version) {
			return
		}
	}
}

// high returns the highest version recorded for the slot of h.
func (g *guard) high(h uint64) int64 { return g.slot(h).high.Load() }

// flush records that every key may have changed, at positions nobody
// told: the floor is unknown until a load reports it.
func (g *guard) flush() {
	g.unknown.Add(1) // before the epoch: see token
	g.epoch.Add(1)
}

// learn records that a load whose token's flush count was unknown read
// the authoritative source at pos: every change the flushes up to then
// stood for is at or before pos. A flush since the token keeps the floor
// unknown.
func (g *guard) learn(unknown, pos uint64) {
	if pos == PositionUnknown {
		return
	}
	raise(&g.floor, pos) // before known: see token
	for {
		k := g.known.Load()
		if k >= unknown || g.known.CompareAndSwap(k, unknown) {
			return
		}
	}
}

// raise sets *a to x if x is greater.
func raise(a *atomic.Uint64, x uint64) {
	for {
		old := a.Load()
		if x <= old || a.CompareAndSwap(old, x) {
			return
		}
	}
}

// everFlushed reports whether a flush happened: since then, the high marks
// say nothing about the versions of keys that changed.
func (g *guard) everFlushed() bool { return g.epoch.Load() != 0 }

// bytes reports the memory held by the table.
func (g *guard) bytes() int { return len(g.slots) * int(unsafe.Sizeof(slot{})) }

// Flight kinds, the first byte of a flight key. Each kind of load has its
// own, because loads of different kinds return results of different types
// (one[V], map[K]V) and different things (stored or not): a caller must
// never join a load of another kind, whatever its keys.
const (
	flightLoad        = 'l' // one key, result stored
	flightBypass      = 'b' // one key, link unproven: result not stored
	flightBatch       = 'm' // several keys through Options.LoadMany
	flightBatchBypass = 'n' // several keys through LoadMany, link unproven
)

// flightKey builds the singleflight key of a load of one key. It carries
// the guard token, so a Get that starts after an invalidation computes a
// different key and cannot join a load that began before it (race 2). A
// bypass flight also carries a time bucket so that it is joined only while
// its result is young.
//
// The key is kind, then 24 bytes of fixed length (epoch, generation,
// bucket), then skey: within a kind, two keys are equal only if all their
// parts are.
func flightKey(kind byte, tok token, bucket int64, skey string) string {
	var b strings.Builder
	b.Grow(25 + len(skey))
	b.WriteByte(kind)
	var n [24]byte
	binary.LittleEndian.PutUint64(n[0:], tok.epoch)
	binary.LittleEndian.PutUint64(n[8:], tok.gen)
	binary.LittleEndian.PutUint64(n[16:], uint64(bucket))
	b.Write(n[:])
	b.WriteString(skey)
	return b.String()
}

// batchFlightKey builds the singleflight key of a LoadMany of skeys, whose
// guard tokens are toks, taken after the flush epoch epoch was read. It
// lists every key with its generation, so a GetMany that starts after an
// invalidation of any of them starts a new load (race 2).
//
// The key is kind, the epoch and the bucket (8 bytes each), then for each
// key its generation and its length (8 bytes each) and the key: within a
// kind, two keys are equal only if all their parts are, keys included.
func batchFlightKey(kind byte, epoch uint64, bucket int64, toks []token, skeys []string) string {
	size := 17
	for _, k := range skeys {
		size += 16 + len(k)
	}
	var b strings.Builder
	b.Grow(size)
	b.WriteByte(kind)
	var n [16]byte
	binary.LittleEndian.PutUint64(n[0:], epoch)
	binary.LittleEndian.PutUint64(n[8:], uint64(bucket))
	b.Write(n[:])
	for i, k := range skeys {
		binary.LittleEndian.PutUint64(n[0:], toks[i].gen)
		binary.LittleEndian.PutUint64(n[8:], uint64(len(k)))
		b.Write(n[:])
		b.WriteString(k)
	}
	return b.String()
}
