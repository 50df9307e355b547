package cache

import (
	"sync"
	"sync/atomic"
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

// node is one cached key, linked both into its shard's index, which hits
// read without the lock, and into its shard's LRU list. Its key, hash
// bits, entry and stored time never change once it is linked; a new value
// of the key is a new node. read is set by hits and cleared under the
// shard's lock, next changes when the index is changed around the node,
// newer and older under the shard's lock only.
type node[K comparable, V any] struct {
	key K
	// hb is bits 16–47 of the key's hash: the bits that pick its bucket
	// (see table.bucket), kept so that the index can split a chain when it
	// grows, and unlink a node, without hashing keys again; and a cheap
	// first test in find before the keys are compared. 32 bits pick among
	// up to 2^32 buckets per shard.
	hb uint32
	// read is 1 if the node was hit since it went to the front of the
	// list, else 0 (see shard.evict).
	read atomic.Uint32
	next atomic.Pointer[node[K, V]] // the index's bucket chain
	e    entry[V]
	// newer and older are the node's neighbours in the shard's LRU list,
	// towards its front and its back; guarded by the shard's lock, and
	// never read by hits. Both are nil once the node has left the list
	// by eviction, removal or replacement (see shard.unlink); a node is
	// never linked again.
	newer, older *node[K, V]
	// stored is when the node was stored, in Cache.now's time base; only
	// Sample reads it, for an entry's age.
	stored int64
}

// shard is one segment of the cache: a lock-free hash index of its nodes,
// which hits read without taking the lock, and an LRU list threaded
// through the same nodes, which orders and evicts them.
//
// Why an index that hits read without the lock. A hit under a shard lock
// writes the lock's cache line, and a move to the front writes the entry,
// its neighbours and the list root; with more than one core those lines
// move between cores on nearly every hit, and parallel hits were no faster
// than serial ones. Here a hit reads the index, and writes at most its
// node's read flag, once until the node next reaches the back of the list
// (see evict).
//
// Why one structure. The list is intrusive, as golang-lru's is (a ring
// through a sentinel root: push to the front, move to the front, remove
// the oldest), but its links live in the index's nodes rather than in
// elements of their own, and the index doubles as the map from keys to
// list positions. So an entry costs one allocation and one bucket, with
// no second map or list element beside it.
//
// Every change to either is made under mu, to both at once (add, unlink,
// evict), so that the index holds exactly the list's nodes whenever mu is
// free; length is their number.
type shard[K comparable, V any] struct {
	mu sync.Mutex
	// root is the list's sentinel: root.older is the front, root.newer
	// the back, and a list of one node links it to root both ways. A
	// flush replaces it. Guarded by mu.
	root   *node[K, V]
	size   int    // the shard's capacity; immutable
	misses uint64 // guarded by mu
	// budget is the shard's share of Options.MaxWeight, or 0 for no weight
	// bound; immutable. weight is the sum of the weights of the shard's
	// entries, guarded by mu, kept by add and unlist, through which every
	// removal goes.
	budget, weight uint64
	// evictions counts the entries evicted for the capacity or the budget,
	// weightEvictions those for the budget, and oversized the entries not
	// stored because they weigh more than the budget. Guarded by mu.
	evictions, weightEvictions, oversized uint64
	// hits counts the hits that took mu anyway, after missing the index
	// (see lookup); the others are in Cache.hits. Guarded by mu.
	hits uint64
	// Keep the fields above, which only mu's holder writes, off the lines
	// the hit path reads: 80 bytes, padded to 128 (two lines, for the
	// adjacent-line prefetcher).
	_ [48]byte
	// index is replaced (by a flush, or to grow it) and changed only under
	// mu; read without it.
	index atomic.Pointer[table[K, V]]
	// length is the number of nodes: written under mu, read without it
	// (by Sample).
	length atomic.Uint64
	_      [112]byte
}

func (s *shard[K, V]) init(size int, budget uint64) {
	s.size = size
	s.budget = budget
	s.reset(size)
}

// reset empties the shard and gives it room for size entries, under mu (or
// before the shard is shared); size is s.size but when closing. A new list
// root and a small index are O(1) under the lock, in time and in memory,
// where unlinking every node would be O(entries). Hits in flight on the
// old index may still return its nodes, as they would have had they taken
// the lock first.
//
// The old nodes keep their list links, to one another and to the old
// root, so that one of them still referenced keeps the others reachable
// until it is dropped: only a hit in flight holds one, for the length of
// a lookup (a Sample refers to its node by a weak pointer, for this
// reason: TestSampleKeepsNoFlushedEntries). They are never
// written again but for read, which hits may still set and nothing reads
// any more: evict and Holds act only on nodes of the current list and
// index.
func (s *shard[K, V]) reset(size int) {
	s.index.Store(newTable[K, V](min(size, minBuckets)))
	s.root = new(node[K, V])
	s.root.newer, s.root.older = s.root, s.root
	s.weight = 0
	s.length.Store(0)
}

// lookup returns the live entry of key, of hash h, and whether it is a hit.
// A miss is counted, and so is a hit that took the lock (counted reports
// which hits it counted); an expired entry is removed and counts as a miss.
//
// A hit marks its node read, for evict, and writes nothing else: it does
// not move the node. It stores the mark only if it is not set yet, so
// that hits on a node whose mark is set write nothing at all, and parallel
// hits on different cores move no cache line between them. A hit that
// races with evict clearing the mark may be lost, and its node evicted
// one round early; nothing else depends on it.
func (s *shard[K, V]) lookup(key K, h uint64, now int64) (e entry[V], hit, counted bool) {
	if n := s.index.Load().find(key, h); n != nil && now < n.e.expires {
		if n.read.Load() == 0 {
			n.read.Store(1)
		}
		return n.e, true, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.index.Load().find(key, h); n != nil {
		if now < n.e.expires {
			n.read.Store(1)
			s.hits++
			return n.e, true, true // stored since find
		}
		s.drop(n)
	}
	s.misses++
	return entry[V]{}, false, false
}

// peek returns the live entry of key, of hash h, without touching recency,
// under mu.
func (s *shard[K, V]) peek(key K, h uint64, now int64) (entry[V], bool) {
	n := s.index.Load().find(key, h)
	if n == nil || now >= n.e.expires {
		return entry[V]{}, false
	}
	return n.e, true
}

// add stores e for key, of hash h, at the front of the list, under mu, at
// time now, and evicts (see evict) until the shard is within its capacity
// and its budget. An entry heavier than the whole budget is not stored (it
// would evict every other entry and still not fit), and the entry of key
// it would have replaced is removed all the same: it is older.
func (s *shard[K, V]) add(key K, h uint64, e entry[V], now int64) {
	if s.budget != 0 && uint64(e.weight()) > s.budget {
		s.oversized++
		s.remove(key, h)
		return
	}
	n := &node[K, V]{key: key, hb: uint32(h >> 16), e: e, stored: now}
	s.pushFront(n)
	s.weight += uint64(e.weight())
	l := s.length.Load() + 1
	idx := s.index.Load()
	// n replaces the node of key, if there is one: insert unlinks it from
	// the index, and it leaves the list with its weight.
	if old := idx.insert(n); old != nil {
		s.unlist(old)
		l--
	} else if l > uint64(s.size) {
		// The shard held size >= 1 nodes before n.
		s.evict(n)
		s.evictions++
		l--
	}
	// n weighs at most the budget and is never evicted, so the shard is
	// within it once the other nodes weigh no more than the rest (l only
	// makes sure).
	for s.budget != 0 && s.weight > s.budget && l > 1 {
		s.evict(n)
		s.evictions++
		s.weightEvictions++
		l--
	}
	s.length.Store(l)
	// Keep the index at most half full, up to a bucket per entry the
	// shard can hold: memory follows the entries, not the capacity, and
	// doubling keeps the cost of growing O(1) per add.
	if l > uint64(len(idx.buckets)/2) && len(idx.buckets) < s.size {
		s.index.Store(idx.grow())
	}
}

// evict removes a node other than keep from the shard, under mu, leaving
// length to the caller; the shard holds another node than keep. It is the
// second-chance (CLOCK) approximation of LRU: the node at the back of the
// list is evicted unless it was read since it went to the front; if it
// was, it goes to the front again with its mark cleared, and the next
// node at the back is considered. So an entry is evicted once it has gone
// the length of the list without a hit, and a hit never has to move its
// entry: evict does the moves, on the path that stores, which takes the
// lock anyway. On Zipf-distributed keys this keeps more hits than an
// exact LRU (BENCHMARKS.md §4), as an entry read once in a round survives
// the next.
//
// A call moves at most maxSecondChances nodes, and then evicts the node at
// the back whether read or not: the lock is held for a bounded time even
// when every node was read since it went to the front, and each such call
// still clears that many marks, so that the calls after it find unread
// nodes.
func (s *shard[K, V]) evict(keep *node[K, V]) {
	for chances := 0; ; {
		b := s.root.newer
		switch {
		case b == keep:
			// New, or stored since the caller began: not this
			// store's victim.
			s.toFront(b)
		case b.read.Load() != 0 && chances < maxSecondChances:
			b.read.Store(0)
			s.toFront(b)
			chances++
		default:
			s.unlink(b)
			return
		}
	}
}

// maxSecondChances bounds the nodes one eviction moves (see evict).
const maxSecondChances = 64

// remove drops key, of hash h, under mu.
func (s *shard[K, V]) remove(key K, h uint64) {
	if n := s.index.Load().find(key, h); n != nil {
		s.drop(n)
	}
}

// drop removes n, which must be in the shard, under mu.
func (s *shard[K, V]) drop(n *node[K, V]) {
	s.unlink(n)
	s.length.Store(s.length.Load() - 1)
}

// unlink removes n, which must be in the shard, from the index and the
// list, under mu, leaving length to the caller: every removal but a
// replacement (see add) comes here.
func (s *shard[K, V]) unlink(n *node[K, V]) {
	s.index.Load().remove(n)
	s.unlist(n)
}

// unlist takes n out of the list and its weight off the shard's, under mu.
// Its links are cleared, which keeps it from holding its neighbours in
// memory.
func (s *shard[K, V]) unlist(n *node[K, V]) {
	detach(n)
	n.newer, n.older = nil, nil
	s.weight -= uint64(n.e.weight())
}

// detach links n's neighbours in the list to each other, under mu; n's own
// links are left as they were.
func detach[K comparable, V any](n *node[K, V]) {
	n.newer.older = n.older
	n.older.newer = n.newer
}

// pushFront links n, new, at the front of the list, under mu.
func (s *shard[K, V]) pushFront(n *node[K, V]) {
	n.newer, n.older = s.root, s.root.older
	n.older.newer = n
	s.root.older = n
}

// toFront moves n, in the list, to its front, under mu.
func (s *shard[K, V]) toFront(n *node[K, V]) {
	if s.root.older == n {
		return
	}
	detach(n)
	s.pushFront(n)
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
//     replaced) is never written again but for its list links, which
//     readers do not read, and its read flag, which hits may still set
//     and nothing reads once the node has left, so that a reader standing
//     on it still reaches the rest of the chain as it was. With the first
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
// harmless: lookup then takes the lock and finds the entry in the current
// index, which under the lock holds exactly the shard's nodes.
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
			b, half := g.bucket(o.hb), 0
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

// bucket picks the chain of a node of hash bits hb (node.hb). The high
// bits of a hash pick the shard and the low bits the guard's slot; bits
// from 16 up are left for this.
func (t *table[K, V]) bucket(hb uint32) *atomic.Pointer[node[K, V]] {
	return &t.buckets[uint64(hb)&t.mask]
}

// find returns the node of key, of hash h, or nil.
func (t *table[K, V]) find(key K, h uint64) *node[K, V] {
	hb := uint32(h >> 16)
	for n := t.bucket(hb).Load(); n != nil; n = n.next.Load() {
		if n.hb == hb && n.key == key {
			return n
		}
	}
	return nil
}

// holds reports whether n is linked in t.
func (t *table[K, V]) holds(n *node[K, V]) bool {
	for o := t.bucket(n.hb).Load(); o != nil; o = o.next.Load() {
		if o == n {
			return true
		}
	}
	return false
}

// insert links n at the head of its chain, then unlinks and returns the
// node of the same key that n replaces, if any: a reader finds one or the
// other throughout.
func (t *table[K, V]) insert(n *node[K, V]) (replaced *node[K, V]) {
	b := t.bucket(n.hb)
	n.next.Store(b.Load())
	b.Store(n)
	prev := &n.next
	for o := prev.Load(); o != nil; o = o.next.Load() {
		if o.hb == n.hb && o.key == n.key {
			prev.Store(o.next.Load())
			return o
		}
		prev = &o.next
	}
	return nil
}

// remove unlinks n, if it is linked.
func (t *table[K, V]) remove(n *node[K, V]) {
	prev := t.bucket(n.hb)
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
