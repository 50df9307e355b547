package cache

import (
	"sync"
	"sync/atomic"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// entry is what a shard stores for a key.
type entry[V any] struct {
	value   V
	version int64 // 0: unknown
	expires int64 // in Cache.now's time base
	// meta is the entry's weight (Options.Weigher's result; 0 for an
	// absence, or without a Weigher) in its low 32 bits, and absentBit
	// for a negative entry: the key does not exist in the source. It is
	// one word rather than a bool and a uint32 because every hit copies
	// its entry, and the compiler copies a struct of up to four fields in
	// registers but a larger one through memory.
	meta uint64
}

// absentBit marks a negative entry in entry.meta.
const absentBit = 1 << 32

// absence returns a negative entry at version.
func absence[V any](version int64) entry[V] {
	return entry[V]{version: version, meta: absentBit}
}

// missing reports whether e records that its key does not exist in the
// source.
func (e entry[V]) missing() bool { return e.meta&absentBit != 0 }

// weight returns e's share of its shard's budget.
func (e entry[V]) weight() uint32 { return uint32(e.meta) }

// setWeight sets e's weight.
func (e *entry[V]) setWeight(w uint32) { e.meta = e.meta&absentBit | uint64(w) }

// node is one cached key: immutable once stored, except for front. A new
// value of the key is a new node.
type node[K comparable, V any] struct {
	key  K
	hash uint64
	e    entry[V]
	next atomic.Pointer[node[K, V]] // the index's bucket chain
	// front is the shard's tick when the node last went to the front of
	// the LRU.
	front atomic.Uint64
	// stored is when the node was stored, in Cache.now's time base; only
	// Sample reads it, for an entry's age.
	stored int64
}

// shard is one segment of the cache: an LRU (golang-lru's simplelru) that
// orders and evicts the entries, and an index of the same nodes that hits
// read without taking the lock.
//
// Why two structures. A hit under a shard lock writes the lock's cache line,
// and a move to the front writes the entry, its neighbours and the list
// root; with more than one core those lines move between cores on nearly
// every hit, and parallel hits were no faster than serial ones. Here a hit
// reads the index and writes nothing shared, unless its entry has drifted
// back far enough that the eviction order needs it moved (see touch).
//
// Every change to either structure is made under mu, to both at once: the
// LRU's eviction callback unlinks the evicted node from the index, so the
// index holds exactly the LRU's nodes whenever mu is free.
type shard[K comparable, V any] struct {
	mu     sync.Mutex
	lru    *simplelru.LRU[K, *node[K, V]] // guarded by mu
	size   int                            // capacity of lru; immutable
	window uint64                         // immutable; see touch
	misses uint64                         // guarded by mu
	// budget is the shard's share of Options.MaxWeight, or 0 for no weight
	// bound; immutable. weight is the sum of the weights of lru's entries,
	// guarded by mu, kept by add and by lru's eviction callback, through
	// which every removal goes.
	budget, weight uint64
	// evictions counts the entries evicted for the capacity or the budget,
	// weightEvictions those for the budget, and oversized the entries not
	// stored because they weigh more than the budget. Guarded by mu.
	evictions, weightEvictions, oversized uint64
	// hits counts the hits that took mu anyway (to move their entry, or
	// after missing the index); the others are in Cache.hits. Guarded by
	// mu.
	hits uint64
	// Keep the fields above, which only mu's holder writes, off the lines
	// the hit path reads: 88 bytes, padded to 128 (two lines, for the
	// adjacent-line prefetcher).
	_ [40]byte
	// index is replaced (by a flush, or to grow it) and changed only under
	// mu; read without it.
	index atomic.Pointer[table[K, V]]
	// tick counts the nodes that went to the front; length is lru.Len().
	// Both are written under mu and read without it.
	tick   atomic.Uint64
	length atomic.Uint64
	_      [104]byte
}

func (s *shard[K, V]) init(size int, budget uint64) {
	s.size = size
	s.budget = budget
	s.window = uint64(max(size/3, 1))
	s.reset(size)
}

// reset empties the shard and gives it room for size entries, under mu (or
// before the shard is shared); size is s.size but when closing. A fresh LRU
// and a small index are O(1) under the lock, in time and in memory, where
// emptying them is O(entries). Hits in flight on the old index may still
// return its nodes, as they would have had they taken the lock first.
func (s *shard[K, V]) reset(size int) {
	s.index.Store(newTable[K, V](min(size, minBuckets)))
	// NewLRU fails only for size <= 0, which New rules out. The eviction
	// callback runs under mu, on the current index, for every node that
	// leaves the LRU but those that Add replaces: evicted for capacity,
	// removed, or evicted by add for the budget.
	s.lru, _ = simplelru.NewLRU(size, func(_ K, n *node[K, V]) {
		s.index.Load().remove(n)
		s.weight -= uint64(n.e.weight())
	})
	s.weight = 0
	s.length.Store(0)
}

// find returns the node of key, of hash h, without the lock, or nil.
func (s *shard[K, V]) find(key K, h uint64) *node[K, V] {
	return s.index.Load().find(key, h)
}

// lookup returns the live entry of key, of hash h, and whether it is a hit.
// A miss is counted, and so is a hit that took the lock (counted reports
// which hits it counted); an expired entry is removed and counts as a miss.
func (s *shard[K, V]) lookup(key K, h uint64, now int64) (e entry[V], hit, counted bool) {
	if n := s.find(key, h); n != nil && now < n.e.expires {
		return n.e, true, s.touch(n)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if n, ok := s.lru.Peek(key); ok {
		if now < n.e.expires {
			s.hits++
			return n.e, true, true // stored since find
		}
		s.remove(key)
	}
	s.misses++
	return entry[V]{}, false, false
}

// touch moves n to the front of the LRU if it may have drifted back beyond
// the front third of the shard's capacity: if window or more nodes went
// to the front since n did, and the shard holds more than window entries
// (n's position is below both). Nearer the front, a move changes no
// eviction until the entry has drifted that far anyway; so the eviction
// order is exact for the back two-thirds, from which entries are evicted,
// and a hot entry moves once per window of other moves rather than on
// every hit. A third trades a little hit ratio against an exact LRU for
// fewer moves; BENCHMARKS.md has the hit ratios of the windows tried.
//
// touch does not wait for the lock: if another goroutine holds it, the
// move is left to a later hit. It reports whether it took the lock and
// counted the hit.
func (s *shard[K, V]) touch(n *node[K, V]) bool {
	if s.tick.Load()-n.front.Load() < s.window || s.length.Load() <= s.window {
		return false
	}
	if !s.mu.TryLock() {
		return false
	}
	// n may have been replaced or removed since it was found; whatever
	// holds its key now is as recent as this hit.
	if cur, ok := s.lru.Get(n.key); ok {
		cur.front.Store(s.tick.Add(1))
	}
	s.hits++
	s.mu.Unlock()
	return true
}

// peek returns the live entry of key without touching recency, under mu.
func (s *shard[K, V]) peek(key K, now int64) (entry[V], bool) {
	n, ok := s.lru.Peek(key)
	if !ok || now >= n.e.expires {
		return entry[V]{}, false
	}
	return n.e, true
}

// add stores e for key, of hash h, at the front of the LRU, under mu, at
// time now, and evicts from the back until the shard is within its budget.
// An entry
// heavier than the whole budget is not stored (it would evict every other
// entry and still not fit), and the entry of key it would have replaced is
// removed all the same: it is older.
func (s *shard[K, V]) add(key K, h uint64, e entry[V], now int64) {
	if s.budget != 0 && uint64(e.weight()) > s.budget {
		s.oversized++
		s.remove(key)
		return
	}
	n := &node[K, V]{key: key, hash: h, e: e, stored: now}
	n.front.Store(s.tick.Add(1))
	idx := s.index.Load()
	if s.lru.Add(key, n) {
		s.evictions++
	}
	// Add replaced an older node of key in place, without the eviction
	// callback; insert unlinks it, and its weight goes with it.
	if old := idx.insert(n); old != nil {
		s.weight -= uint64(old.e.weight())
	}
	s.weight += uint64(e.weight())
	// n is at the front and weighs at most the budget, so the shard is
	// within it before the loop reaches n (Len only makes sure). The
	// callback unlinks each evicted node from the index and takes off its
	// weight.
	for s.budget != 0 && s.weight > s.budget && s.lru.Len() > 1 {
		s.lru.RemoveOldest()
		s.evictions++
		s.weightEvictions++
	}
	l := s.lru.Len()
	s.length.Store(uint64(l))
	// Keep the index at most half full, up to a bucket per entry the
	// shard can hold: memory follows the entries, not the capacity, and
	// doubling keeps the cost of growing O(1) per add.
	if l > len(idx.buckets)/2 && len(idx.buckets) < s.size {
		s.index.Store(idx.grow())
	}
}

// remove drops key, under mu.
func (s *shard[K, V]) remove(key K) {
	if s.lru.Remove(key) {
		s.length.Store(uint64(s.lru.Len()))
	}
}

// table is a hash table of nodes that one writer (the holder of the
// shard's lock) changes while any number of readers read it without
// locks. It starts with minBuckets buckets and grows by doubling as the
// shard fills (see shard.add), up to a bucket per entry the shard can hold.
//
// Readers follow atomic pointers only. The writer keeps three properties
// on which their correctness rests:
//
//   - Chains are in newest-first order, and every next pointer points from
//     a node to an older one, or is nil: insert links a new node to the
//     head, and unlinking and grow only ever point a node further down its
//     chain. So no walk visits a node twice: a reader always gets to the
//     end of a chain.
//   - A node's next is only ever set to a node that is in the shard at
//     that moment, and a node unlinked from the index (evicted, removed,
//     replaced) is never written again, so that a reader standing on it
//     still reaches the rest of the chain as it was. With the first
//     property, every node a reader reaches was in the shard at some
//     instant after the reader loaded the index: a hit returns a value
//     that was current during the lookup, never one dropped before it
//     began.
//   - A new node is linked completely (its next set) before it is
//     published, and a grown table is filled completely before it
//     replaces the old one.
//
// A reader may miss a node that is in the shard: one linked after it
// passed the chain's head, one whose chain grow split under it, or any
// node after the reader loaded an index that a flush or a growth then
// replaced (the old table's heads no longer change). Such a false miss is
// harmless: lookup then takes the lock and finds the entry in the LRU.
type table[K comparable, V any] struct {
	buckets []atomic.Pointer[node[K, V]]
	mask    uint64
}

// minBuckets is the size of a new or flushed shard's index.
const minBuckets = 8

// newTable returns a table of at least size buckets, a power of two;
// size is at most minBuckets.
func newTable[K comparable, V any](size int) *table[K, V] {
	n := 1
	for n < size {
		n <<= 1
	}
	return &table[K, V]{buckets: make([]atomic.Pointer[node[K, V]], n), mask: uint64(n - 1)}
}

// grow returns a table of twice as many buckets, holding t's nodes, under
// the shard's lock. Bucket i of t splits into buckets i and i+len(t.buckets)
// of the new table, by the next bit of the hash: each node of chain i is
// linked after the previous node of its new chain, which keeps the
// newest-first order and only ever points a node further down chain i.
// Readers of t meanwhile see chain i lose the nodes of the other half (a
// false miss), never a node outside the shard, and never a cycle. The new
// table is published only when complete, by the caller.
func (t *table[K, V]) grow() *table[K, V] {
	n := len(t.buckets)
	g := &table[K, V]{buckets: make([]atomic.Pointer[node[K, V]], 2*n), mask: uint64(2*n - 1)}
	for i := range t.buckets {
		var tails [2]*node[K, V] // the last node of chains i and i+n of g
		// o.next still leads down chain i when the loop follows it: it
		// is rewritten only when the next node of o's half is found.
		for o := t.buckets[i].Load(); o != nil; o = o.next.Load() {
			b, half := g.bucket(o.hash), 0
			if b != &g.buckets[i] {
				half = 1
			}
			if tails[half] == nil {
				b.Store(o)
			} else {
				tails[half].next.Store(o)
			}
			tails[half] = o
		}
		for _, tail := range tails {
			if tail != nil {
				tail.next.Store(nil)
			}
		}
	}
	return g
}

// bucket picks h's chain. The high bits of h pick the shard and the low
// bits the guard's slot; bits from 16 up are left for this.
func (t *table[K, V]) bucket(h uint64) *atomic.Pointer[node[K, V]] {
	return &t.buckets[(h>>16)&t.mask]
}

func (t *table[K, V]) find(key K, h uint64) *node[K, V] {
	for n := t.bucket(h).Load(); n != nil; n = n.next.Load() {
		if n.hash == h && n.key == key {
			return n
		}
	}
	return nil
}

// insert links n at the head of its chain, then unlinks and returns the
// node of the same key that n replaces, if any: a reader finds one or the
// other throughout.
func (t *table[K, V]) insert(n *node[K, V]) (replaced *node[K, V]) {
	b := t.bucket(n.hash)
	n.next.Store(b.Load())
	b.Store(n)
	prev := &n.next
	for o := prev.Load(); o != nil; o = o.next.Load() {
		if o.hash == n.hash && o.key == n.key {
			prev.Store(o.next.Load())
			return o
		}
		prev = &o.next
	}
	return nil
}

// remove unlinks n, if it is linked.
func (t *table[K, V]) remove(n *node[K, V]) {
	prev := t.bucket(n.hash)
	for o := prev.Load(); o != nil; o = o.next.Load() {
		if o == n {
			prev.Store(o.next.Load())
			return
		}
		prev = &o.next
	}
}

// keeps reports whether a cached entry old must be kept rather than be
// replaced by, or dropped for, a change at version. Only a known version
// at least as new as the change's known version is kept.
func keeps(old int64, version int64) bool {
	return version != 0 && old >= version
}
