package invalidate

import (
	"context"
	"strconv"
	"testing"

	"github.com/coherentcache/coherent/cache"
)

// BenchmarkCacheFlush measures what one flush costs a cache: the work a
// bus asks of every cache on the node when a flush is due. It flushes a
// cache that is empty, and one that holds 100,000 entries (refilled
// through GetMany, outside the timer, before each flush; its capacity is
// twice that, so that no shard evicts). The two should cost the same: a
// flush gives each shard a fresh LRU and a small index and leaves the old
// entries to the garbage collector. A refill takes far longer than a
// flush, so give an iteration count:
//
//	go test -run '^$' -bench CacheFlush -benchtime=100x -count=5 ./invalidate/
func BenchmarkCacheFlush(b *testing.B) {
	for _, n := range []int{0, 100_000} {
		b.Run("entries="+strconv.Itoa(n), func(b *testing.B) {
			bus := NewInProcess()
			defer bus.Close()
			load := func(_ context.Context, k int) (int, error) { return k, nil }
			loadMany := func(_ context.Context, keys []int) (map[int]int, error) {
				m := make(map[int]int, len(keys))
				for _, k := range keys {
					m[k] = k
				}
				return m, nil
			}
			c, err := cache.New("ns", 2*100_000, load, &cache.Options[int, int]{Bus: bus, LoadMany: loadMany})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			ctx := context.Background()
			batch := make([]int, 1000)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if n > 0 {
					b.StopTimer()
					for k := 0; k < n; k += len(batch) {
						for j := range batch {
							batch[j] = k + j
						}
						if _, err := c.GetMany(ctx, batch); err != nil {
							b.Fatal(err)
						}
					}
					if got := c.Stats().Entries; got != n {
						b.Fatalf("Stats().Entries = %d after the refill; want %d", got, n)
					}
					b.StartTimer()
				}
				if err := bus.Publish(ctx, "ns", nil); err != nil { // flush the namespace
					b.Fatal(err)
				}
			}
			b.StopTimer()
			if got := c.Stats().Entries; got != 0 {
				b.Fatalf("Stats().Entries = %d after a flush; want 0", got)
			}
		})
	}
}
