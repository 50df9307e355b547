package cache

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
	"weak"
)

// TestSampleLeavesTheCacheAlone guards the auditor's promise that sampling
// costs readers nothing: Sample must not move entries in the LRU order
// (which would change what is evicted), count hits or misses, or load.
func TestSampleLeavesTheCacheAlone(t *testing.T) {
	src := newSource()
	for i := range 8 {
		src.write("k"+strconv.Itoa(i), "v")
	}
	c := newTestCache(t, 8, src.load, &Options[string, row]{Shards: 1, Version: rowVersion})
	for i := range 8 {
		mustGet(t, c, "k"+strconv.Itoa(i))
	}
	before, stats, loads := c.shards[0].keys(), c.Stats(), src.loads.Load()
	n := 0
	for range 1000 {
		c.Sample(3, func(Sample[string, row]) { n++ })
	}
	if n != 3000 {
		t.Errorf("Sample(3, fn) 1000 times called fn %d times; want 3000", n)
	}
	if after := c.shards[0].keys(); !slices.Equal(after, before) {
		t.Errorf("LRU order after sampling = %v; want %v", after, before)
	}
	if got := c.Stats(); got != stats {
		t.Errorf("Stats after sampling = %+v; want %+v", got, stats)
	}
	if got := src.loads.Load(); got != loads {
		t.Errorf("loads after sampling = %d; want %d", got, loads)
	}
	// The oldest entry is still the one evicted.
	src.write("k-new", "v")
	mustGet(t, c, "k-new")
	if cached(c, "k0") {
		t.Errorf("k0, the least recently used entry, survived an eviction")
	}
}

// TestSampleReportsEntries guards what an audit compares: every live entry
// can be picked, with its value, version, found flag (cached absences
// included) and age; expired entries are not.
func TestSampleReportsEntries(t *testing.T) {
	clock := newFakeClock()
	src := newSource()
	for i := range 50 {
		src.write("k"+strconv.Itoa(i), "v"+strconv.Itoa(i))
	}
	c := newTestCache(t, 1000, src.load, &Options[string, row]{Version: rowVersion, Clock: clock, Jitter: 0.01, TTL: time.Hour, NegativeTTL: time.Hour})
	for i := range 50 {
		mustGet(t, c, "k"+strconv.Itoa(i))
	}
	for i := range 10 {
		if _, err := c.Get(context.Background(), "absent"+strconv.Itoa(i)); err == nil {
			t.Fatal("Get of an absent key returned no error")
		}
	}
	clock.Advance(3 * time.Second)
	seen := map[string]bool{}
	for range 200 {
		c.Sample(10, func(s Sample[string, row]) {
			seen[s.Key] = true
			r, ok := src.read(s.Key)
			if s.Found != ok || s.Value != r || s.Version != r.Version {
				t.Errorf("Sample: %q = {%v %v v%d}; want {%v %v v%d}", s.Key, s.Found, s.Value, s.Version, ok, r, r.Version)
			}
			if s.Age != 3*time.Second {
				t.Errorf("Sample: %q is %v old; want 3s", s.Key, s.Age)
			}
		})
	}
	if len(seen) != 60 {
		t.Errorf("2,000 picks saw %d distinct entries; want all 60", len(seen))
	}
	clock.Advance(2 * time.Hour)
	c.Sample(10, func(s Sample[string, row]) { t.Errorf("Sample returned %q, expired", s.Key) })
}

// TestHolds guards the auditor's re-check: an entry counts as still cached
// only while it is the very entry sampled, so that a value replaced in the
// meantime (even by a load of the same row) is never taken for a stale one.
func TestHolds(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	src := newSource()
	src.write("k", "v")
	for _, tc := range []struct {
		name   string
		change func(c *Cache[string, row])
		holds  bool
	}{
		{"unchanged", func(c *Cache[string, row]) { mustGet(t, c, "k") }, true},
		{"invalidated", func(c *Cache[string, row]) { c.Invalidate(ctx, "k") }, false},
		{"reloaded, same row", func(c *Cache[string, row]) { c.Invalidate(ctx, "k"); mustGet(t, c, "k") }, false},
		{"written", func(c *Cache[string, row]) { c.Set(ctx, "k", row{"w", 9}, 9) }, false},
		{"flushed", func(c *Cache[string, row]) { c.InvalidateAll(ctx) }, false},
		{"expired", func(*Cache[string, row]) { clock.Advance(2 * time.Hour) }, false},
		{"closed", func(c *Cache[string, row]) { c.Close() }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTestCache(t, 10, src.load, &Options[string, row]{Version: rowVersion, Clock: clock, TTL: time.Hour})
			mustGet(t, c, "k")
			var s Sample[string, row]
			c.Sample(1, func(x Sample[string, row]) { s = x })
			if !c.Holds(s) {
				t.Fatalf("Holds(a fresh sample) = false; want true")
			}
			tc.change(c)
			if got := c.Holds(s); got != tc.holds {
				t.Errorf("Holds after %s = %v; want %v", tc.name, got, tc.holds)
			}
		})
	}
	var zero Sample[string, row]
	c := newTestCache(t, 10, src.load, nil)
	if c.Holds(zero) {
		t.Errorf("Holds(Sample{}) = true; want false")
	}
	c.Sample(5, func(s Sample[string, row]) { t.Errorf("Sample of an empty cache returned %q", s.Key) })
}

// TestSampleDuringWrites runs Sample against fills, writes, invalidations,
// evictions and flushes (with -race: it reads the index without a lock).
// Every sampled entry must be one that was stored for its key.
func TestSampleDuringWrites(t *testing.T) {
	ctx := context.Background()
	load := func(_ context.Context, k string) (string, error) { return "v:" + k, nil }
	c := newTestCache(t, 64, load, &Options[string, string]{Shards: 2})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := fmt.Sprint(w*1000 + i%200)
				switch i % 50 {
				case 7:
					c.Invalidate(ctx, k)
				case 13:
					c.Set(ctx, k, "v:"+k, 0)
				case 49:
					if w == 0 {
						c.InvalidateAll(ctx)
					}
				default:
					mustGet(t, c, k)
				}
			}
		})
	}
	deadline := time.Now().Add(300 * time.Millisecond)
	picked := 0
	for time.Now().Before(deadline) {
		c.Sample(4, func(s Sample[string, string]) {
			picked++
			if s.Value != "v:"+s.Key || !s.Found {
				t.Errorf("Sample: %q = %q (found %v); want %q", s.Key, s.Value, s.Found, "v:"+s.Key)
			}
			c.Holds(s)
		})
	}
	close(stop)
	wg.Wait()
	if picked == 0 {
		t.Errorf("Sample picked nothing in 300ms of writes")
	}
}

// TestSampleKeepsNoFlushedEntries guards against a kept Sample (the
// auditor keeps them for a later Holds) holding a flushed shard in memory:
// a flush drops the shard's nodes without unlinking them from one another,
// so a strong reference to one node would keep every node of the flushed
// list reachable through the list links.
func TestSampleKeepsNoFlushedEntries(t *testing.T) {
	ctx := context.Background()
	src := newSource()
	c := newTestCache(t, 1000, src.load, &Options[string, row]{Shards: 1})
	for i := range 100 {
		k := fmt.Sprintf("k%d", i)
		src.write(k, "v")
		mustGet(t, c, k)
	}
	var s Sample[string, row]
	c.Sample(1, func(x Sample[string, row]) { s = x })
	var nodes []weak.Pointer[node[string, row]]
	sh := &c.shards[0]
	sh.mu.Lock()
	for n := sh.root.older; n != sh.root; n = n.older {
		nodes = append(nodes, weak.Make(n))
	}
	sh.mu.Unlock()
	if len(nodes) != 100 {
		t.Fatalf("the shard's list holds %d nodes; want 100", len(nodes))
	}
	if err := c.InvalidateAll(ctx); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	runtime.GC()
	alive := 0
	for _, w := range nodes {
		if w.Value() != nil {
			alive++
		}
	}
	if alive != 0 {
		t.Errorf("%d of the 100 flushed nodes are still in memory while a Sample of one is kept; want 0", alive)
	}
	if c.Holds(s) {
		t.Errorf("Holds(a sample of a flushed entry) = true; want false")
	}
	runtime.KeepAlive(s)
}
