package cache

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const mib = 1 << 20

// valueLen weighs a row by the length of its value.
func valueLen(_ string, r row) uint32 { return uint32(len(r.Value)) }

// TestWeightBoundsHeap loads 200 distinct values of 1 MiB into a cache
// whose capacity, 1,000 entries, would hold them all, but whose MaxWeight is
// 10 MiB: the values held must stay within the budget, by Stats and by the
// heap. Without a weight bound the cache keeps every value, and the heap
// grows by 200 MiB (issue 12: 150 PUTs of 1 MiB took the webapp from 31 MB
// to 302 MB).
func TestWeightBoundsHeap(t *testing.T) {
	load := func(_ context.Context, k int) ([]byte, error) {
		b := make([]byte, mib)
		b[0] = byte(k)
		return b, nil
	}
	c := newTestCache(t, 1000, load, &Options[int, []byte]{
		MaxWeight: 10 * mib,
		Weigher:   func(_ int, v []byte) uint32 { return uint32(len(v)) },
		Shards:    4, // shares of 2.5 MiB: two values each
	})
	heap := func() int64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return int64(m.HeapInuse)
	}
	base := heap()
	var peak int64
	over := false // report the first excess only, and go on to the heap
	for i := range 200 {
		if v := mustGet(t, c, i); len(v) != mib || v[0] != byte(i) {
			t.Fatalf("Get(%d) = %d bytes starting %d; want %d starting %d", i, len(v), v[0], mib, byte(i))
		}
		if st := c.Stats(); st.Weight > 10*mib && !over {
			over = true
			t.Errorf("after %d values: Stats().Weight = %d; want at most MaxWeight, %d", i+1, st.Weight, 10*mib)
		}
		if i%20 == 19 {
			peak = max(peak, heap())
		}
	}
	// The cache may hold 8 MiB of values here (two per shard); the rest
	// of the bound is slack for the runtime and the test.
	growth := peak - base
	t.Logf("HeapInuse grew by at most %.1f MiB", float64(growth)/mib)
	if growth > 32*mib {
		t.Errorf("HeapInuse grew by %d MiB while loading 200 values of 1 MiB; want at most 32 MiB with a MaxWeight of 10 MiB", growth/mib)
	}
	st := c.Stats()
	if st.Entries != 8 || st.Weight != 8*mib || st.WeightEvictions != 192 || st.Evictions != st.WeightEvictions {
		t.Errorf("Stats = %+v; want 8 entries of 1 MiB, 192 evictions, all for the weight", st)
	}
	checkShards(t, c)
}

// TestOversizedValueIsServedNotCached: a value heavier than its shard's
// share of MaxWeight is returned to its callers and counted, but not cached,
// and the entries of its shard stay: storing it would have evicted all of
// them and still exceeded the budget. A write of such a value drops the
// older value it replaces, so that the next Get loads the write (G1).
func TestOversizedValueIsServedNotCached(t *testing.T) {
	ctx := context.Background()
	src := newSource()
	c := newTestCache(t, 100, src.load, &Options[string, row]{
		Version:   rowVersion,
		Shards:    2,
		MaxWeight: 2000, // 1,000 per shard
		Weigher:   valueLen,
	})
	for i := range 20 {
		k := fmt.Sprint("small", i)
		src.write(k, strings.Repeat("s", 10))
		mustGet(t, c, k)
	}
	before := c.Stats()
	if before.Entries != 20 || before.Weight != 200 {
		t.Fatalf("Stats = %+v; want 20 entries weighing 200", before)
	}

	big := strings.Repeat("b", 1500)
	src.write("big", big)
	for range 2 {
		if r := mustGet(t, c, "big"); r.Value != big {
			t.Fatalf("Get(%q) = %d bytes; want the %d of the source", "big", len(r.Value), len(big))
		}
		if cached(c, "big") {
			t.Fatalf("a value of weight %d is cached in a shard of budget 1000", len(big))
		}
	}
	st := c.Stats()
	if st.Loads-before.Loads != 2 || st.Oversized != 2 || st.Entries != 20 || st.Weight != 200 || st.Evictions != 0 {
		t.Errorf("after two Gets of an oversized value: Stats = %+v; want 2 loads, 2 oversized, and the 20 entries of weight 200 kept", st)
	}

	r := src.write("small0", big)
	if err := c.Set(ctx, "small0", r, r.Version); err != nil {
		t.Fatal(err)
	}
	if cached(c, "small0") {
		t.Errorf("after an oversized write of %q, it is still cached", "small0")
	}
	if got := mustGet(t, c, "small0"); got != r {
		t.Errorf("Get(%q) = version %d; want the write's, %d", "small0", got.Version, r.Version)
	}
	if st := c.Stats(); st.Oversized != 4 || st.Entries != 19 || st.Weight != 190 {
		t.Errorf("Stats = %+v; want 4 oversized, 19 entries weighing 190", st)
	}
	checkShards(t, c)
}

// TestWeightFollowsChanges: the weight Stats reports is exactly that of the
// entries held through every kind of change: loads (one key and batches),
// writes that add or replace a value by a heavier or lighter one, a
// deletion (a cached absence weighs 0), an invalidation, an expiry and a
// flush.
func TestWeightFollowsChanges(t *testing.T) {
	ctx := context.Background()
	src := newSource()
	clock := newFakeClock()
	c := newTestCache(t, 100, src.load, &Options[string, row]{
		Version:   rowVersion,
		Shards:    1,
		MaxWeight: 1000,
		Weigher:   valueLen,
		Clock:     clock,
		TTL:       time.Minute,
		LoadMany: func(ctx context.Context, keys []string) (map[string]row, error) {
			m := make(map[string]row)
			for _, k := range keys {
				if r, ok := src.read(k); ok {
					m[k] = r
				}
			}
			return m, nil
		},
	})
	write := func(k string, n int) func() {
		return func() {
			err := c.Update(ctx, k, func(context.Context) (Change[row], error) {
				r := src.write(k, strings.Repeat("x", n))
				return Change[row]{Value: r, Version: r.Version}, nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	steps := []struct {
		name    string
		do      func()
		entries int
		weight  uint64
	}{
		{"write a of 100", write("a", 100), 1, 100},
		{"write b of 50", write("b", 50), 2, 150},
		{"replace a by 30", write("a", 30), 2, 80},
		{"replace a by 300", write("a", 300), 2, 350},
		{"delete a", func() {
			if err := c.Delete(ctx, "a", 10); err != nil {
				t.Fatal(err)
			}
		}, 2, 50},
		{"invalidate b", func() {
			if err := c.Invalidate(ctx, "b"); err != nil {
				t.Fatal(err)
			}
		}, 1, 0},
		{"load c of 70", func() { src.write("c", strings.Repeat("c", 70)); mustGet(t, c, "c") }, 2, 70},
		{"load d of 20 and e of 5 in a batch", func() {
			src.write("d", strings.Repeat("d", 20))
			src.write("e", strings.Repeat("e", 5))
			if _, err := c.GetMany(ctx, []string{"d", "e"}); err != nil {
				t.Fatal(err)
			}
		}, 4, 95},
		{"all expire; c is read again, now of 10", func() {
			src.write("c", strings.Repeat("c", 10))
			clock.Advance(2 * time.Minute)
			mustGet(t, c, "c")
		}, 4, 35},
		{"flush", func() {
			if err := c.InvalidateAll(ctx); err != nil {
				t.Fatal(err)
			}
		}, 0, 0},
	}
	for _, step := range steps {
		step.do()
		if st := c.Stats(); st.Entries != step.entries || st.Weight != step.weight {
			t.Errorf("after %s: Entries, Weight = %d, %d; want %d, %d", step.name, st.Entries, st.Weight, step.entries, step.weight)
		}
		checkShards(t, c)
	}
}

// TestWeigherFaultOnWrite: Set and Update run the Weigher on the caller's
// goroutine, after the write committed. When it panics, or calls
// runtime.Goexit, this node must still drop the value the write replaced
// (G1), and the other nodes must still hear of the write (G3): a panic is
// returned as a *PanicError, and a Goexit ends the caller's goroutine, but
// only after both.
func TestWeigherFaultOnWrite(t *testing.T) {
	for _, write := range []string{"Set", "Update"} {
		for _, goexit := range []bool{false, true} {
			name := write + "/panic"
			if goexit {
				name = write + "/Goexit"
			}
			t.Run(name, func(t *testing.T) { testWeigherFaultOnWrite(t, write, goexit) })
		}
	}
}

func testWeigherFaultOnWrite(t *testing.T, write string, goexit bool) {
	ctx := context.Background()
	src := newSource()
	bus := &fakeBus{proof: forever}
	var armed atomic.Bool
	c := newTestCache(t, 10, src.load, &Options[string, row]{
		Bus:       bus,
		Version:   rowVersion,
		MaxWeight: 100,
		Weigher: func(string, row) uint32 {
			if armed.CompareAndSwap(true, false) {
				if goexit {
					runtime.Goexit()
				}
				panic("Weigher bug")
			}
			return 1
		},
	})
	src.write("k", "old")
	mustGet(t, c, "k")
	r := src.write("k", "new")
	armed.Store(true)
	errc := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		var err error
		if write == "Set" {
			err = c.Set(ctx, "k", r, r.Version)
		} else {
			err = c.Update(ctx, "k", func(context.Context) (Change[row], error) {
				return Change[row]{Value: r, Version: r.Version}, nil
			})
		}
		errc <- err
	}()
	<-done
	select {
	case err := <-errc:
		var pe *PanicError
		if goexit {
			t.Errorf("%s returned %v; want its goroutine ended by the Weigher's runtime.Goexit", write, err)
		} else if !errors.As(err, &pe) || pe.Func != "Options.Weigher" || pe.Value != "Weigher bug" || len(pe.Stack) == 0 {
			t.Errorf("%s = %v; want a *PanicError from Options.Weigher with its value and a stack", write, err)
		}
	default:
		if !goexit {
			t.Errorf("%s did not return", write)
		}
	}
	if cached(c, "k") {
		t.Errorf("after the Weigher failed on a write of %q, it is still cached", "k")
	}
	bus.mu.Lock()
	published := bus.published
	bus.mu.Unlock()
	if want := [][]Invalidation{{{Key: "k", Version: r.Version}}}; !reflect.DeepEqual(published, want) {
		t.Errorf("published %v; want %v", published, want)
	}
	if got := mustGet(t, c, "k"); got != r {
		t.Errorf("Get(%q) = %v; want the write, %v", "k", got, r)
	}
}

// TestDefaultShardsFitMaxWeight: a MaxWeight below the default number of
// shards lowers it, so that every shard has a share of at least 1.
func TestDefaultShardsFitMaxWeight(t *testing.T) {
	c := newTestCache(t, 100_000, func(_ context.Context, k string) (string, error) { return k, nil },
		&Options[string, string]{MaxWeight: 3, Weigher: func(string, string) uint32 { return 1 }})
	if len(c.shards) > 3 {
		t.Fatalf("%d shards for a MaxWeight of 3; want at most 3", len(c.shards))
	}
	for _, k := range []string{"a", "b", "c", "d", "e"} {
		mustGet(t, c, k)
	}
	if st := c.Stats(); st.Entries == 0 || st.Weight > 3 || st.Oversized != 0 {
		t.Errorf("Stats = %+v; want entries of weight 1 cached, at most 3", st)
	}
}
