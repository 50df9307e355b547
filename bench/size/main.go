// Command size measures the memory of the cache and its hit ratio, next to
// raw hashicorp/golang-lru/v2 and maypok86/otter/v2 in the same run:
//
//   - bytes per cached entry at 10^4, 10^5 and 10^6 entries of int64 keys and
//     16-byte values: the live heap (runtime.ReadMemStats after GC) with the
//     cache filled, less the heap before it was created, divided by the
//     entries it holds; and the bytes of the library's fill-race guard
//     (cache.Stats().GuardBytes), which is part of that and fixed at creation;
//
//   - the hit ratio against capacity (10^2 … 10^5) of one Zipf(1.1) sequence
//     of keys drawn from 10^5, each implementation filling itself on a miss.
//
//     go run ./bench/size
//     go run ./bench/size -quick
//
// It needs no services: the caches are node-local and filled by an
// in-memory loader.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/maypok86/otter/v2"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/cache"
)

// value is a small cached value: 16 bytes.
type value struct{ A, B int64 }

func load(_ context.Context, k int64) (value, error) { return value{A: k, B: -k}, nil }

type config struct {
	sizes      []int
	zipfKeys   int
	capacities []int
	requests   int
}

// Result is what size reports.
type Result struct {
	Memory []Memory `json:"memory"`
	Hits   []Hits   `json:"hit_ratio"`
	Load   string   `json:"load"`
}

// Memory is one implementation at one size.
type Memory struct {
	Impl          string  `json:"impl"`
	Capacity      int     `json:"capacity"`
	Entries       int     `json:"entries"`
	BytesPerEntry float64 `json:"bytes_per_entry"`
	GuardBytes    int     `json:"guard_bytes,omitempty"`
}

// Hits is one implementation's hit ratio at one capacity.
type Hits struct {
	Impl     string  `json:"impl"`
	Capacity int     `json:"capacity"`
	HitRatio float64 `json:"hit_ratio"`
}

func main() {
	quick := flag.Bool("quick", false, "sizes 10^4 and 10^5 and a shorter sequence (for CI)")
	jsonPath := flag.String("json", "", "write the results as JSON to this file")
	flag.Parse()
	cfg := config{
		sizes:      []int{1e4, 1e5, 1e6},
		zipfKeys:   1e5,
		capacities: []int{1e2, 1e3, 1e4, 1e5},
		requests:   2e6,
	}
	if *quick {
		cfg.sizes, cfg.requests = []int{1e4, 1e5}, 2e5
	}
	res, err := run(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "size: %v\n", err)
		os.Exit(1)
	}
	res.print(os.Stdout)
	if err := benchenv.WriteJSON(*jsonPath, res); err != nil {
		fmt.Fprintf(os.Stderr, "size: %v\n", err)
		os.Exit(1)
	}
}

func run(cfg config) (*Result, error) {
	res := &Result{Load: benchenv.LoadAvg()}
	for _, n := range cfg.sizes {
		for _, impl := range []string{"coherent", "golang-lru", "otter"} {
			m, err := memory(impl, n)
			if err != nil {
				return nil, err
			}
			res.Memory = append(res.Memory, m)
		}
	}
	for _, capacity := range cfg.capacities {
		for _, impl := range []string{"coherent", "golang-lru", "otter"} {
			h, err := hitRatio(impl, capacity, cfg.zipfKeys, cfg.requests)
			if err != nil {
				return nil, err
			}
			res.Hits = append(res.Hits, h)
		}
	}
	res.Load += " → " + benchenv.LoadAvg()
	return res, nil
}

// heap returns the live heap after two collections.
func heap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// memory fills a fresh cache of capacity n with n keys and returns the heap
// it holds per entry.
func memory(impl string, n int) (Memory, error) {
	ctx := context.Background()
	m := Memory{Impl: impl, Capacity: n}
	before := heap()
	var keep any
	switch impl {
	case "coherent":
		c, err := cache.New("size", n, load, nil)
		if err != nil {
			return m, err
		}
		for k := range int64(n) {
			if _, err := c.Get(ctx, k); err != nil {
				return m, err
			}
		}
		st := c.Stats()
		m.Entries, m.GuardBytes = st.Entries, st.GuardBytes
		keep = c
		defer c.Close()
	case "golang-lru":
		c, err := lru.New[int64, value](n)
		if err != nil {
			return m, err
		}
		for k := range int64(n) {
			v, _ := load(ctx, k)
			c.Add(k, v)
		}
		m.Entries = c.Len()
		keep = c
	case "otter":
		c, err := otter.New(&otter.Options[int64, value]{MaximumSize: n})
		if err != nil {
			return m, err
		}
		for k := range int64(n) {
			v, _ := load(ctx, k)
			c.Set(k, v)
		}
		c.CleanUp()
		m.Entries = c.EstimatedSize()
		keep = c
	}
	after := heap()
	runtime.KeepAlive(keep)
	if m.Entries > 0 {
		m.BytesPerEntry = (float64(after) - float64(before)) / float64(m.Entries)
	}
	return m, nil
}

// hitRatio replays requests keys of a Zipf(1.1) distribution over keys
// (the same sequence for every implementation) through a cache of capacity
// and returns the fraction of hits after the first tenth, which warms it.
func hitRatio(impl string, capacity, keys, requests int) (Hits, error) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	zipf := rand.NewZipf(rng, 1.1, 1, uint64(keys-1))
	warm := requests / 10
	var get func(k int64) bool // reports a hit
	switch impl {
	case "coherent":
		c, err := cache.New("hits", capacity, load, nil)
		if err != nil {
			return Hits{}, err
		}
		defer c.Close()
		get = func(k int64) bool {
			h := c.Stats().Hits
			c.Get(ctx, k)
			return c.Stats().Hits > h
		}
	case "golang-lru":
		c, _ := lru.New[int64, value](capacity)
		get = func(k int64) bool {
			if _, ok := c.Get(k); ok {
				return true
			}
			v, _ := load(ctx, k)
			c.Add(k, v)
			return false
		}
	case "otter":
		c := otter.Must(&otter.Options[int64, value]{MaximumSize: capacity})
		get = func(k int64) bool {
			if _, ok := c.GetIfPresent(k); ok {
				return true
			}
			v, _ := load(ctx, k)
			c.Set(k, v)
			return false
		}
	}
	hits := 0
	for i := range requests {
		if get(int64(zipf.Uint64())) && i >= warm {
			hits++
		}
	}
	return Hits{Impl: impl, Capacity: capacity, HitRatio: float64(hits) / float64(requests-warm)}, nil
}

func (r *Result) print(w io.Writer) {
	fmt.Fprintf(w, "| entries (capacity) | impl | entries held | bytes/entry | guard bytes | guard bytes/entry |\n|---:|---|---:|---:|---:|---:|\n")
	for _, m := range r.Memory {
		guard, per := "—", "—"
		if m.Impl == "coherent" {
			guard = fmt.Sprint(m.GuardBytes)
			per = fmt.Sprintf("%.1f", float64(m.GuardBytes)/float64(max(m.Entries, 1)))
		}
		fmt.Fprintf(w, "| %d | %s | %d | %.1f | %s | %s |\n", m.Capacity, m.Impl, m.Entries, m.BytesPerEntry, guard, per)
	}
	fmt.Fprintf(w, "\n| capacity (keys 10^5, Zipf 1.1) | coherent | golang-lru | otter |\n|---:|---:|---:|---:|\n")
	for i := 0; i+2 < len(r.Hits); i += 3 {
		fmt.Fprintf(w, "| %d | %.4f | %.4f | %.4f |\n", r.Hits[i].Capacity, r.Hits[i].HitRatio, r.Hits[i+1].HitRatio, r.Hits[i+2].HitRatio)
	}
	fmt.Fprintf(w, "\nload %s\n", r.Load)
}
