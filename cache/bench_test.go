package cache

import (
	"context"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	lru "github.com/hashicorp/golang-lru/v2"
)

// The hit-path benchmarks run the same key set through this package and
// through raw golang-lru/v2 (its thread-safe lru.Cache) in the same run, so
// that the ratio between them is meaningful:
//
//	go test -run '^$' -bench 'Hit' -count 10 ./cache | benchstat -col /impl -

const benchKeys = 1024

func benchKeySet() []string {
	keys := make([]string, benchKeys)
	for i := range keys {
		keys[i] = "user:" + strconv.Itoa(i)
	}
	return keys
}

type getter interface{ get(string) int }

type coherentGetter struct{ c *Cache[string, int] }

func (g coherentGetter) get(k string) int {
	v, _ := g.c.Get(context.Background(), k)
	return v
}

type rawGetter struct{ c *lru.Cache[string, int] }

func (g rawGetter) get(k string) int {
	v, _ := g.c.Get(k)
	return v
}

func benchGetters(b *testing.B) map[string]getter {
	keys := benchKeySet()
	c, err := New("bench", 4*benchKeys, func(ctx context.Context, k string) (int, error) { return len(k), nil }, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	raw, _ := lru.New[string, int](4 * benchKeys)
	for i, k := range keys {
		c.Get(context.Background(), k)
		raw.Add(k, i)
	}
	return map[string]getter{"impl=coherent": coherentGetter{c}, "impl=golang-lru": rawGetter{raw}}
}

var sink atomic.Int64

func BenchmarkGetHit(b *testing.B) {
	keys := benchKeySet()
	for _, name := range []string{"impl=coherent", "impl=golang-lru"} {
		b.Run(name, func(b *testing.B) {
			g := benchGetters(b)[name]
			b.ReportAllocs()
			s := 0
			i := 0
			for b.Loop() {
				s += g.get(keys[i&(benchKeys-1)])
				i++
			}
			sink.Add(int64(s))
		})
	}
}

func BenchmarkGetHitParallel(b *testing.B) {
	keys := benchKeySet()
	for _, name := range []string{"impl=coherent", "impl=golang-lru"} {
		b.Run(name, func(b *testing.B) {
			g := benchGetters(b)[name]
			b.ReportAllocs()
			var seed atomic.Int64
			b.RunParallel(func(pb *testing.PB) {
				i := int(seed.Add(7919))
				s := 0
				for pb.Next() {
					s += g.get(keys[i&(benchKeys-1)])
					i++
				}
				sink.Add(int64(s))
			})
		})
	}
}

// BenchmarkGetMiss measures a miss that loads (from an in-memory loader)
// and stores: the fixed cost the cache adds to every load.
func BenchmarkGetMiss(b *testing.B) {
	c, err := New("bench", 1024, func(ctx context.Context, k int) (int, error) { return k, nil }, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.Get(ctx, i) // every key is new: always a miss
		i++
	}
}

// BenchmarkGetMissWeighted is BenchmarkGetMiss with a weight bound that
// binds before the capacity does: every store weighs its value and evicts
// for the budget. Compare it with BenchmarkGetMiss in the same run.
func BenchmarkGetMissWeighted(b *testing.B) {
	c, err := New("bench", 1024, func(ctx context.Context, k int) (int, error) { return k, nil },
		&Options[int, int]{MaxWeight: 512 * 64, Weigher: func(int, int) uint32 { return 64 }})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c.Get(ctx, i) // every key is new: always a miss, and an eviction once full
		i++
	}
}

// BenchmarkStampede starts 1,000 concurrent Gets of one cold key per
// iteration and reports the loads each burst cost (G5: 1).
func BenchmarkStampede(b *testing.B) {
	var loads atomic.Int64
	var gate atomic.Pointer[chan struct{}]
	c, err := New("bench", 1024, func(ctx context.Context, k int) (int, error) {
		loads.Add(1)
		<-*gate.Load()
		return k, nil
	}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	const readers = 1000
	bursts := 0
	for b.Loop() {
		key := bursts
		bursts++
		g := make(chan struct{})
		gate.Store(&g)
		var done sync.WaitGroup
		for range readers {
			done.Go(func() { c.Get(ctx, key) })
		}
		// Hold the load until every reader has missed, so that all of
		// them are concurrent with it.
		for c.Stats().Misses < uint64(bursts*readers) {
			runtime.Gosched()
		}
		close(g)
		done.Wait()
	}
	b.ReportMetric(float64(loads.Load())/float64(bursts), "loads/burst")
}
