package cache

import (
	"context"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
)

// checkShards fails t unless every shard's LRU list is well formed and
// its lock-free index holds exactly the list's nodes, each under its
// key's bucket, and its length is their number. A hit reads only the
// index, so a node left in it after leaving the list (an eviction, an
// invalidation, a replaced value) would be served again: a stale read;
// and a node in the list but not in the index would be evicted in its
// turn while no lookup could find it. It also checks that each shard's
// weight is the sum of its entries' weights, and within its budget: a
// removal that missed the weight would let a shard's count drift up until
// it evicted everything, or down until it bounded nothing.
func checkShards[K comparable, V any](t *testing.T, c *Cache[K, V]) {
	t.Helper()
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		idx := s.index.Load()
		inList := make(map[*node[K, V]]bool)
		var weight uint64
		newer := s.root
		for n := s.root.older; n != s.root; n = n.older {
			if n == nil || n.newer != newer || inList[n] || len(inList) > s.size {
				t.Errorf("shard %d: list broken after %d nodes", i, len(inList))
				break
			}
			inList[n] = true
			weight += uint64(n.e.weight())
			h := c.hash(n.key)
			if n.hb != uint32(h>>16) || idx.find(n.key, h) != n {
				t.Errorf("shard %d: key %v is in the list but not in the index, or under the wrong bucket", i, n.key)
			}
			newer = n
		}
		if s.root.newer != newer {
			t.Errorf("shard %d: the list's back is %p; want %p, the last node from the front", i, s.root.newer, newer)
		}
		linked := 0
		for b := range idx.buckets {
			for n := idx.buckets[b].Load(); n != nil; n = n.next.Load() {
				linked++
				if !inList[n] {
					t.Errorf("shard %d: key %v is in the index but not in the list", i, n.key)
				}
			}
		}
		if l := len(inList); linked != l || s.length.Load() != uint64(l) || l > s.size {
			t.Errorf("shard %d: index holds %d nodes, length says %d, the list %d, capacity %d", i, linked, s.length.Load(), l, s.size)
		}
		if weight != s.weight {
			t.Errorf("shard %d: weight = %d; its entries weigh %d", i, s.weight, weight)
		}
		if s.budget != 0 && s.weight > s.budget {
			t.Errorf("shard %d: weight = %d; want at most its budget, %d", i, s.weight, s.budget)
		}
		// The index grows with the entries: at most half full until it
		// has a bucket per entry the shard can hold, and never larger.
		nb := len(idx.buckets)
		switch l := len(inList); {
		case nb&(nb-1) != 0 || idx.mask != uint64(nb-1):
			t.Errorf("shard %d: index of %d buckets, mask %#x; want a power of two", i, nb, idx.mask)
		case l > nb/2 && nb < s.size:
			t.Errorf("shard %d: index of %d buckets holds %d entries; want it grown", i, nb, l)
		case nb > minBuckets && nb/2 >= s.size:
			t.Errorf("shard %d: index of %d buckets for a shard of %d entries; want at most a bucket per entry, rounded up", i, nb, s.size)
		}
		s.mu.Unlock()
	}
}

// keys returns the keys of s from the back of its list to the front: in
// the order they would be evicted. It takes mu.
func (s *shard[K, V]) keys() []K {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ks []K
	for n := s.root.newer; n != s.root; n = n.newer {
		ks = append(ks, n.key)
	}
	return ks
}

// TestIndexMatchesLRU runs every kind of change (fills, evictions,
// write-through, deletions, invalidations, flushes) against a small cache,
// with readers hitting it concurrently, and checks after every round that
// the index and the LRU list hold the same nodes, and that each shard's weight
// is its entries' and within its budget. With a weight bound, evictions for
// the budget, values too heavy to cache, and replacements by heavier or
// lighter values join the changes.
func TestIndexMatchesLRU(t *testing.T) {
	t.Run("count", func(t *testing.T) { testIndexMatchesLRU(t, nil) })
	t.Run("weight", func(t *testing.T) {
		// A shard holds 16 entries by count, which weigh 32 when all
		// are first versions, but its budget of 100 holds only 3 of
		// weight 30: both bounds bind. Every 8th version is too heavy
		// to be cached.
		st := testIndexMatchesLRU(t, func(_ string, r row) uint32 {
			switch {
			case r.Version%8 == 0:
				return 150
			case r.Version%3 == 0:
				return 30
			}
			return 2
		})
		if st.WeightEvictions == 0 || st.Evictions == st.WeightEvictions || st.Oversized == 0 {
			t.Errorf("Stats = %+v; want evictions for weight and for capacity, and oversized values", st)
		}
	})
}

func testIndexMatchesLRU(t *testing.T, weigher func(string, row) uint32) Stats {
	ctx := context.Background()
	src := newSource()
	for i := range 200 {
		src.write("k"+strconv.Itoa(i), "v")
	}
	bus := &fakeBus{proof: forever}
	opts := &Options[string, row]{Bus: bus, Version: rowVersion, Shards: 4}
	if weigher != nil {
		opts.MaxWeight, opts.Weigher = 400, weigher
	}
	c := newTestCache(t, 64, src.load, opts)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for r := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 1))
			for {
				select {
				case <-stop:
					return
				default:
				}
				c.Get(ctx, "k"+strconv.Itoa(rng.IntN(200)))
			}
		})
	}
	rng := rand.New(rand.NewPCG(7, 7))
	for round := range 200 {
		for range 50 {
			k := "k" + strconv.Itoa(rng.IntN(200))
			switch op := rng.IntN(10); {
			case op < 5:
				c.Get(ctx, k)
			case op < 7:
				r := src.write(k, "w"+strconv.Itoa(round))
				c.Set(ctx, k, r, r.Version)
			case op < 8:
				c.Delete(ctx, k, 0)
			default:
				bus.handler().Invalidate([]Invalidation{{Key: k}})
			}
		}
		if round%50 == 49 {
			bus.handler().Flush()
		}
		checkShards(t, c)
		if t.Failed() {
			break
		}
	}
	close(stop)
	wg.Wait()
	checkShards(t, c)
	return c.Stats()
}

// TestIndexGrowsUnderHits fills a shard from empty, over and over (a
// flush shrinks its index back to minBuckets buckets), with local writes and
// invalidations of remote ones, while readers hit it: the index doubles
// nine times per round under the readers' feet. Every Get that starts after
// a write of its key returned must see that write or a newer one (neither a
// growth nor a removal after one may leave a replaced or dropped node where
// a reader finds it), no Get may hang (a cycle in a chain), and after every
// round the index must hold exactly the list's nodes (a growth must not lose
// or duplicate one).
func TestIndexGrowsUnderHits(t *testing.T) {
	ctx := context.Background()
	const keys = 2048
	src := newSource()
	var completed [keys]atomic.Int64 // the version of the last write of each key that returned
	for i := range keys {
		completed[i].Store(src.write(strconv.Itoa(i), "v").Version)
	}
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 2*keys, src.load, &Options[string, row]{Bus: bus, Version: rowVersion, Shards: 1})
	var done atomic.Bool
	var wg sync.WaitGroup
	defer func() { // before the cache is closed, also after a Fatal
		done.Store(true)
		wg.Wait()
	}()
	for r := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 3))
			for !done.Load() {
				i := rng.IntN(keys)
				want := completed[i].Load()
				got, err := c.Get(ctx, strconv.Itoa(i))
				if err != nil || got.Version < want {
					t.Errorf("Get(%d) = %v, %v after the write of version %d returned", i, got, err, want)
					return
				}
			}
		})
	}
	for round := range 20 {
		for i := range keys {
			k := strconv.Itoa(i)
			if i%3 == 0 {
				// A write elsewhere: the invalidation drops the key, and
				// the next Get must load the new row.
				r := src.write(k, "x"+strconv.Itoa(round))
				bus.handler().Invalidate([]Invalidation{{Key: k, Version: r.Version}})
				completed[i].Store(r.Version)
				continue
			}
			var version int64
			// Update installs its write (nothing overlaps it), where Set
			// would drop the key after a flush.
			err := c.Update(ctx, k, func(context.Context) (Change[row], error) {
				r := src.write(k, "w"+strconv.Itoa(round))
				version = r.Version
				return Change[row]{Value: r, Version: r.Version}, nil
			})
			if err != nil {
				t.Fatal(err)
			}
			completed[i].Store(version)
		}
		checkShards(t, c)
		if st, n := c.Stats(), len(c.shards[0].index.Load().buckets); n != 2*keys {
			t.Fatalf("%d entries in an index of %d buckets; want %d buckets", st.Entries, n, 2*keys)
		}
		// The readers refill the shard at once, so that what the flush
		// left is checked by TestHugeCapacity, not here.
		bus.handler().Flush()
		if t.Failed() {
			break
		}
	}
	done.Store(true)
	wg.Wait()
	checkShards(t, c)
}

// TestHitsSeeCompletedWrites has readers hit one key while a writer
// replaces its value with ever newer versions and drops each with an
// invalidation from the bus: every Get that starts after a write returned
// must see that write or a newer one (G1, for Gets on other goroutines of
// the same node). It guards the index's handling of replaced nodes: the
// node a write replaces is unlinked, so that dropping the new one does not
// expose the old; and a node is complete before it is linked.
//
// A Get that overlaps a write may see the value before it, even after
// another Get saw the new value by loading it from the source: until the
// write returns, the node has not learnt of it.
func TestHitsSeeCompletedWrites(t *testing.T) {
	ctx := context.Background()
	src := newSource()
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 64, src.load, &Options[string, row]{Bus: bus, Version: rowVersion, Shards: 1})
	r := src.write("k", "v")
	c.Set(ctx, "k", r, r.Version)
	var completed atomic.Int64 // the version of the last write that returned
	completed.Store(r.Version)
	var done atomic.Bool
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			for !done.Load() {
				want := completed.Load()
				r, err := c.Get(ctx, "k")
				if err != nil {
					t.Errorf("Get: %v", err)
					return
				}
				if r.Version < want {
					t.Errorf("read version %d after the write of %d returned", r.Version, want)
					return
				}
			}
		})
	}
	for i := range 5000 {
		r := src.write("k", "v"+strconv.Itoa(i))
		c.Set(ctx, "k", r, r.Version)
		completed.Store(r.Version)
		if i%2 == 1 {
			// Another node announces the next version before this
			// one writes it.
			bus.handler().Invalidate([]Invalidation{{Key: "k", Version: r.Version + 1}})
		}
	}
	done.Store(true)
	wg.Wait()
}

// TestHotEntrySurvivesScan reads one key between inserts of ever new keys,
// many times the capacity: the hot key must stay cached throughout. Hits
// do not move their entry (see shard.evict); this checks that an entry
// read often goes to the front again when it reaches the back, rather than
// being evicted.
func TestHotEntrySurvivesScan(t *testing.T) {
	var loads sync.Map
	load := func(_ context.Context, k string) (string, error) {
		n, _ := loads.LoadOrStore(k, new(atomic.Int64))
		n.(*atomic.Int64).Add(1)
		return k, nil
	}
	c := newTestCache(t, 100, load, &Options[string, string]{Shards: 1})
	for i := range 5000 {
		mustGet(t, c, "hot")
		for j := range 10 {
			mustGet(t, c, "cold-"+strconv.Itoa(i*10+j))
		}
	}
	n, _ := loads.Load("hot")
	if got := n.(*atomic.Int64).Load(); got != 1 {
		t.Errorf("the hot key was loaded %d times; want 1 (it was evicted while in use)", got)
	}
	if st := c.Stats(); st.Entries != 100 {
		t.Errorf("Entries = %d; want 100", st.Entries)
	}
}

// TestEvictGivesSecondChance pins the eviction order (see shard.evict): the
// entry at the back goes unless it was read since it went to the front; a
// read entry goes to the front instead, with its mark cleared, so that it
// survives one more round, and no more, without another hit. The entry a
// store adds is never its own victim, even in a shard of one entry whose
// other entry was read.
func TestEvictGivesSecondChance(t *testing.T) {
	load := func(_ context.Context, k string) (string, error) { return k, nil }
	get := func(c *Cache[string, string], keys ...string) {
		for _, k := range keys {
			mustGet(t, c, k)
		}
	}
	tests := []struct {
		name     string
		capacity int
		gets     []string
		want     []string // keys held, from the back of the list to the front
	}{
		{"unread entries go in the order stored", 3, []string{"a", "b", "c", "d", "e"}, []string{"c", "d", "e"}},
		{"a read entry skips a round", 3, []string{"a", "b", "c", "a", "d"}, []string{"c", "d", "a"}},
		{"then goes a round later unless read again", 3, []string{"a", "b", "c", "a", "d", "e", "f", "g"}, []string{"e", "f", "g"}},
		{"read again, it skips another", 3, []string{"a", "b", "c", "a", "d", "e", "f", "a", "g"}, []string{"f", "g", "a"}},
		{"every entry read: the oldest goes", 3, []string{"a", "b", "c", "a", "b", "c", "d"}, []string{"b", "c", "d"}},
		{"a store never evicts its own entry", 1, []string{"a", "a", "b"}, []string{"b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newTestCache(t, tt.capacity, load, &Options[string, string]{Shards: 1})
			get(c, tt.gets...)
			if got := c.shards[0].keys(); !slices.Equal(got, tt.want) {
				t.Errorf("after Get of %v, the shard holds %v; want %v", tt.gets, got, tt.want)
			}
			checkShards(t, c)
		})
	}
}

// TestEvictBoundsSecondChances fills a shard with entries that were all
// read, and stores one more: the eviction moves maxSecondChances entries
// to the front, clearing their marks, and then evicts the next one although
// it was read, so that one store holds the lock for a bounded time.
func TestEvictBoundsSecondChances(t *testing.T) {
	const size = 2 * maxSecondChances
	load := func(_ context.Context, k string) (string, error) { return k, nil }
	c := newTestCache(t, size, load, &Options[string, string]{Shards: 1})
	key := func(i int) string { return "k" + strconv.Itoa(i) }
	for range 2 { // stored, then read
		for i := range size {
			mustGet(t, c, key(i))
		}
	}
	mustGet(t, c, "new")
	var want []string
	for i := maxSecondChances + 1; i < size; i++ {
		want = append(want, key(i))
	}
	want = append(want, "new")
	for i := range maxSecondChances {
		want = append(want, key(i))
	}
	if got := c.shards[0].keys(); !slices.Equal(got, want) {
		t.Fatalf("after a store into a full shard of read entries, it holds %v; want %v (%s evicted)", got, want, key(maxSecondChances))
	}
	for i := range size {
		n := c.shards[0].index.Load().find(key(i), c.hash(key(i)))
		switch {
		case i == maxSecondChances:
		case n == nil:
			t.Errorf("%s is not held", key(i))
		case (n.read.Load() == 0) != (i < maxSecondChances):
			t.Errorf("%s is marked read: %d; want 1 for an entry the store left at the back, 0 for one it moved", key(i), n.read.Load())
		}
	}
	checkShards(t, c)
}
