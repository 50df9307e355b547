// Command quickstart runs several cache nodes in one process against a
// shared versioned table, drives a read-heavy workload through them while
// some goroutines write, and checks every read against the table: no read
// may return a version older than the newest write that completed before the
// read began.
//
//	go run ./examples/quickstart -nodes 3 -duration 3s
//
// The nodes share an in-process bus; with the Redis transports of package
// invalidate the same code runs across processes.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
)

// item is a row of the table.
type item struct {
	Value   int64
	Version int64
}

// table stands in for Postgres: a versioned map with a small read latency.
type table struct {
	mu    sync.Mutex
	rows  map[int]item
	reads atomic.Int64
}

func (t *table) load(ctx context.Context, id int) (item, error) {
	t.reads.Add(1)
	time.Sleep(200 * time.Microsecond) // a database round trip
	t.mu.Lock()
	defer t.mu.Unlock()
	it, ok := t.rows[id]
	if !ok {
		return item{}, cache.ErrNotFound
	}
	return it, nil
}

func (t *table) add(id int, delta int64) item {
	t.mu.Lock()
	defer t.mu.Unlock()
	it := t.rows[id]
	it.Value += delta
	it.Version++
	t.rows[id] = it
	return it
}

func main() {
	nodes := flag.Int("nodes", 3, "cache nodes")
	keys := flag.Int("keys", 1000, "distinct keys")
	readers := flag.Int("readers", 8, "reading goroutines per node")
	writeEvery := flag.Duration("write-every", time.Millisecond, "pause between writes of the writer goroutine on each node")
	duration := flag.Duration("duration", 3*time.Second, "how long to run")
	flag.Parse()
	if *nodes < 1 || *keys < 1 || *readers < 1 || *duration <= 0 {
		log.Fatal("quickstart: -nodes, -keys, -readers and -duration must be positive")
	}

	db := &table{rows: make(map[int]item)}
	bus := invalidate.NewInProcess()
	caches := make([]*cache.Cache[int, item], *nodes)
	for i := range caches {
		c, err := cache.New("items", *keys, db.load, &cache.Options[int, item]{
			Bus:     bus,
			Version: func(it item) int64 { return it.Version },
		})
		if err != nil {
			log.Fatal(err)
		}
		defer c.Close()
		caches[i] = c
	}

	completed := make([]atomic.Int64, *keys) // newest version written per key
	var reads, writes, stale atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), *duration)
	defer cancel()
	var wg sync.WaitGroup
	for n, c := range caches {
		for r := range *readers {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(n), uint64(r)))
				zipf := rand.NewZipf(rng, 1.1, 1, uint64(*keys-1))
				for ctx.Err() == nil {
					id := int(zipf.Uint64())
					floor := completed[id].Load()
					it, err := c.Get(ctx, id)
					if err != nil && ctx.Err() != nil {
						return
					}
					reads.Add(1)
					if it.Version < floor {
						stale.Add(1)
					}
				}
			})
		}
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(n), 99))
			for ctx.Err() == nil {
				id := rng.IntN(*keys)
				var version int64
				err := c.Update(ctx, id, func(ctx context.Context) (cache.Change[item], error) {
					it := db.add(id, 1)
					version = it.Version
					return cache.Change[item]{Value: it, Version: it.Version}, nil
				})
				if err != nil && ctx.Err() == nil {
					log.Fatal(err)
				}
				// The write has returned: from now on every read of id
				// must see version or newer.
				for {
					old := completed[id].Load()
					if old >= version || completed[id].CompareAndSwap(old, version) {
						break
					}
				}
				writes.Add(1)
				time.Sleep(*writeEvery)
			}
		})
	}
	wg.Wait()

	var st cache.Stats
	for _, c := range caches {
		s := c.Stats()
		st.Hits += s.Hits
		st.Misses += s.Misses
		st.Loads += s.Loads
		st.Coalesced += s.Coalesced
		st.SkippedStores += s.SkippedStores
		st.InvalidationsReceived += s.InvalidationsReceived
	}
	fmt.Printf("nodes %d, keys %d, %v\n", *nodes, *keys, *duration)
	fmt.Printf("reads %d, writes %d\n", reads.Load(), writes.Load())
	fmt.Printf("hit ratio %.1f%%, loads %d (table reads %d), shared loads %d\n",
		100*float64(st.Hits)/float64(max(st.Hits+st.Misses, 1)), st.Loads, db.reads.Load(), st.Coalesced)
	fmt.Printf("invalidations received %d, stores skipped by the fill-race guard %d\n", st.InvalidationsReceived, st.SkippedStores)
	fmt.Printf("stale reads %d\n", stale.Load())
	if stale.Load() > 0 {
		os.Exit(1)
	}
}
