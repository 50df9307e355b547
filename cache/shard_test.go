package cache

import (
	"context"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
)

// checkShards fails t unless every shard's lock-free index holds exactly
// the nodes of its LRU, and its length is the LRU's. A hit reads only the
// index, so a node left in it after the LRU dropped it (an eviction, an
// invalidation, a replaced value) would be served again: a stale read.
func checkShards[K comparable, V any](t *testing.T, c *Cache[K, V]) {
	t.Helper()
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		idx := s.index.Load()
		linked := 0
		for b := range idx.buckets {
			for n := idx.buckets[b].Load(); n != nil; n = n.next.Load() {
				linked++
				if cur, ok := s.lru.Peek(n.key); !ok || cur != n {
					t.Errorf("shard %d: key %v is in the index but the LRU holds %p (present %v), not %p", i, n.key, cur, ok, n)
				}
				if idx.find(n.key, n.hash) != n {
					t.Errorf("shard %d: key %v is linked under the wrong bucket or twice", i, n.key)
				}
			}
		}
		if l := s.lru.Len(); linked != l || s.length.Load() != uint64(l) {
			t.Errorf("shard %d: index holds %d nodes, length says %d, the LRU %d", i, linked, s.length.Load(), l)
		}
		s.mu.Unlock()
	}
}

// TestIndexMatchesLRU runs every kind of change (fills, evictions,
// write-through, deletions, invalidations, flushes) against a small cache,
// with readers hitting it concurrently, and checks after every round that
// the index and the LRU hold the same nodes.
func TestIndexMatchesLRU(t *testing.T) {
	ctx := context.Background()
	src := newSource()
	for i := range 200 {
		src.write("k"+strconv.Itoa(i), "v")
	}
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 64, src.load, &Options[string, row]{Bus: bus, Version: rowVersion, Shards: 4})
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
// near the front of the LRU do not move their entry (see shard.touch); this
// checks that an entry read often still moves before it drifts to the back
// and is evicted.
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
