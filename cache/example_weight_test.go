package cache_test

import (
	"context"
	"fmt"
	"math"

	"github.com/coherentcache/coherent/cache"
)

// A weight bound keeps a few large values from taking the memory that the
// capacity meant for many small ones. Here 10,000 entries are allowed, but
// only 1 MiB of values: the fourth file of 300 KiB evicts the least
// recently used one, and a file larger than the budget is returned but
// never cached.
func ExampleOptions_maxWeight() {
	ctx := context.Background()
	sizes := map[string]int{"a": 300 << 10, "b": 300 << 10, "c": 300 << 10, "d": 300 << 10, "huge": 2 << 20}
	load := func(ctx context.Context, name string) ([]byte, error) {
		return make([]byte, sizes[name]), nil
	}
	files, err := cache.New("files", 10_000, load, &cache.Options[string, []byte]{
		MaxWeight: 1 << 20,
		Weigher: func(name string, b []byte) uint32 {
			return uint32(min(uint64(len(name)+len(b)), math.MaxUint32))
		},
		Shards: 1, // one share of 1 MiB, rather than several smaller ones
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer files.Close()

	for _, name := range []string{"a", "b", "c", "d", "huge"} {
		b, _ := files.Get(ctx, name)
		fmt.Printf("%s: %d KiB\n", name, len(b)>>10)
	}
	st := files.Stats()
	fmt.Printf("%d entries of %d KiB; %d evicted for weight, %d oversized\n", st.Entries, st.Weight>>10, st.WeightEvictions, st.Oversized)
	// Output:
	// a: 300 KiB
	// b: 300 KiB
	// c: 300 KiB
	// d: 300 KiB
	// huge: 2048 KiB
	// 3 entries of 900 KiB; 1 evicted for weight, 1 oversized
}
