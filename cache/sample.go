package cache

import (
	"math/rand/v2"
	"time"
	"weak"
)

// Sample is a cached entry as [Cache.Sample] found it. It refers to that
// very entry, so that [Cache.Holds] can tell later whether it is still the
// one cached.
type Sample[K comparable, V any] struct {
	// Key is the entry's key.
	Key K
	// Value is the cached value; the zero value for a cached absence.
	Value V
	// Version is the entry's version ([Options.Version], or the version a
	// write reported), 0 if unknown.
	Version int64
	// Found is false for a cached absence: the source did not have the key
	// when it was loaded, or a write deleted it.
	Found bool
	// Age is how long the entry had been cached when Sample found it.
	Age time.Duration

	// n is weak so that a Sample kept for a later Holds (as the auditor
	// keeps them) does not keep its node in memory, nor through the
	// node's list links the rest of the shard's nodes after a flush,
	// which drops them all at once without unlinking them.
	n weak.Pointer[node[K, V]]
}

// Limits of a pick in one shard: pickTries draws of a bucket and a slot
// of its chain (see shard.pick), then a walk of at most sampleSpan
// buckets.
const (
	pickSlots  = 4
	pickTries  = 32
	sampleSpan = 64
)

// Sample calls fn, on the calling goroutine, with up to n live entries
// picked at random (the same entry may come twice). It is for audits and
// diagnostics: it reads the shards' lock-free indexes, so it takes no
// lock, moves no entry in the LRU order nor marks one read, counts no hit
// or miss and changes nothing [Cache.Get] reads; each pick costs an atomic
// load per shard and a few dozen more. Entries are picked about uniformly among those
// held, not by how often they are read. It finds nothing in an empty or closed Cache, and may
// find fewer than n entries in a nearly empty one.
//
// Sample reports what is held whether or not the Cache serves it now: see
// [Cache.Proven].
func (c *Cache[K, V]) Sample(n int, fn func(Sample[K, V])) {
	if c.closed.Load() {
		return
	}
	now := c.now()
	for range n {
		// A shard with a chance in proportion to its entries, so that
		// every entry has about the same chance, however they spread.
		var total uint64
		for i := range c.shards {
			total += c.shards[i].length.Load()
		}
		if total == 0 {
			return
		}
		r := rand.Uint64N(total)
		i := 0
		for ; i < len(c.shards)-1; i++ {
			l := c.shards[i].length.Load()
			if r < l {
				break
			}
			r -= l
		}
		for range 4 { // the shard may have emptied since
			if nd := c.shards[i].pick(now); nd != nil {
				fn(Sample[K, V]{
					Key:     nd.key,
					Value:   nd.e.value,
					Version: nd.e.version,
					Found:   !nd.e.missing(),
					Age:     time.Duration(max(now-nd.stored, 0)),
					n:       weak.Make(nd),
				})
				break
			}
			i = rand.IntN(len(c.shards))
		}
	}
}

// Holds reports whether the entry s refers to is still cached and live:
// since [Cache.Sample] found it, no write, invalidation, flush, eviction or
// expiry removed it, and no other value, or another load of the same
// value, replaced it. Holds takes the lock of the entry's shard for a
// lookup, which does not move the entry either.
func (c *Cache[K, V]) Holds(s Sample[K, V]) bool {
	n := s.n.Value()
	if n == nil || c.closed.Load() {
		return false // a zero Sample, or its node was collected: not held
	}
	sh := c.shard(c.hash(s.Key))
	sh.mu.Lock()
	ok := sh.index.Load().holds(n)
	sh.mu.Unlock()
	return ok && c.now() < n.e.expires
}

// MaxStaleness returns [Options.MaxStaleness] as in effect (the default
// if it was not set): how long the Cache may serve values after its last
// proof that the bus link is live and in order.
func (c *Cache[K, V]) MaxStaleness() time.Duration { return c.cfg.MaxStaleness }

// pick returns a live node of the shard chosen at random, without the
// lock, or nil if it found none. Each try draws a bucket and a slot of its
// chain, and takes the node in that slot if there is one: every node in
// the first pickSlots of its chain has the same chance, and chains are
// rarely longer, as the index is grown when half full. A shard with few
// entries may leave every try empty-handed: then a walk from a random
// bucket takes a node of the first chain it finds.
func (s *shard[K, V]) pick(now int64) *node[K, V] {
	t := s.index.Load()
	for range pickTries {
		slot := rand.IntN(pickSlots)
		i := 0
		// Every node a walk reaches was in the shard during the walk
		// (see table).
		for nd := t.buckets[rand.IntN(len(t.buckets))].Load(); nd != nil; nd = nd.next.Load() {
			if now < nd.e.expires {
				if i == slot {
					return nd
				}
				i++
			}
		}
	}
	b := rand.IntN(len(t.buckets))
	for range min(len(t.buckets), sampleSpan) {
		var chosen *node[K, V]
		live := 0
		for nd := t.buckets[b].Load(); nd != nil; nd = nd.next.Load() {
			if now < nd.e.expires {
				live++
				if rand.IntN(live) == 0 { // reservoir sampling
					chosen = nd
				}
			}
		}
		if chosen != nil {
			return chosen
		}
		b = (b + 1) & int(t.mask)
	}
	return nil
}
