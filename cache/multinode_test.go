package cache_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
)

// versioned is a row of the fake source. Versions grow per key across
// writes and deletes.
type versioned struct {
	Value   string
	Version int64
}

// db is a versioned key-value store standing in for Postgres. A delete
// leaves a tombstone so that versions keep growing.
type db struct {
	mu          sync.Mutex
	rows        map[string]versioned
	deleted     map[string]bool
	lastDeleted map[string]int64 // newest version at which the key was deleted
}

func newDB() *db {
	return &db{rows: map[string]versioned{}, deleted: map[string]bool{}, lastDeleted: map[string]int64{}}
}

func (d *db) write(key string) versioned {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := versioned{Version: d.rows[key].Version + 1}
	r.Value = fmt.Sprintf("%s@%d", key, r.Version)
	d.rows[key] = r
	d.deleted[key] = false
	return r
}

func (d *db) remove(key string) int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	v := d.rows[key].Version + 1
	d.rows[key] = versioned{Version: v}
	d.deleted[key] = true
	d.lastDeleted[key] = v
	return v
}

func (d *db) read(key string) (versioned, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	r, ok := d.rows[key]
	return r, ok && !d.deleted[key]
}

func (d *db) deletedSince(key string, version int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lastDeleted[key] >= version
}

// load reads the row and then, sometimes, dawdles before returning it, so
// that writes and invalidations land while loads hold old rows (race 1).
func (d *db) load(ctx context.Context, key string) (versioned, error) {
	r, ok := d.read(key)
	switch rand.IntN(8) {
	case 0:
		time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
	case 1, 2:
		runtime.Gosched()
	}
	if !ok {
		return versioned{}, fmt.Errorf("%s: %w", key, cache.ErrNotFound)
	}
	return r, nil
}

// TestRandomizedNodesStayConsistent runs several caches on one in-process
// bus (Δ = 0) against a versioned source while goroutines read, write
// through Set and Update, delete through Delete, write around the cache and
// Invalidate, and flush. Every read must return a version at least as new
// as the newest write to its key that completed before the read began (G1,
// G2), and at the end every node must agree with the source (G3).
func TestRandomizedNodesStayConsistent(t *testing.T) {
	t.Run("invalidations", func(t *testing.T) { randomizedNodes(t, nil) })
	// With value broadcast, Set, Update and Delete send their values and
	// tombstones, which the other nodes install when they can tell they
	// are the newest: G1–G3 hold all the same.
	t.Run("value broadcast", func(t *testing.T) { randomizedNodes(t, cache.JSONCodec[versioned]{}) })
}

func randomizedNodes(t *testing.T, codec cache.Codec[versioned]) {
	const (
		nodes   = 4
		workers = 3 // per node
		keys    = 24
		ops     = 3000 // per worker
	)
	if testing.Short() {
		t.Skip("randomized soak")
	}
	src := newDB()
	bus := invalidate.NewInProcess()
	caches := make([]*cache.Cache[string, versioned], nodes)
	for i := range caches {
		c, err := cache.New("rows", keys/2, src.load, &cache.Options[string, versioned]{
			Bus:     bus,
			Version: func(r versioned) int64 { return r.Version },
			Shards:  2,
			Codec:   codec,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		caches[i] = c
	}

	var completed [keys]atomic.Int64 // newest version completed per key
	raise := func(k int, v int64) {
		for {
			old := completed[k].Load()
			if v <= old || completed[k].CompareAndSwap(old, v) {
				return
			}
		}
	}
	var stale atomic.Int64
	ctx := context.Background()
	var wg sync.WaitGroup
	for n, c := range caches {
		for w := range workers {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(n), uint64(w)))
				for range ops {
					k := rng.IntN(keys)
					key := fmt.Sprint("k", k)
					switch p := rng.IntN(100); {
					case p < 70:
						floor := completed[k].Load()
						r, err := c.Get(ctx, key)
						switch {
						case errors.Is(err, cache.ErrNotFound):
							if floor > 0 && !src.deletedSince(key, floor) {
								stale.Add(1)
								t.Errorf("node %d: Get(%s) = not found; a write of version %d had completed", n, key, floor)
							}
						case err != nil:
							t.Errorf("node %d: Get(%s): %v", n, key, err)
						case r.Version < floor:
							stale.Add(1)
							t.Errorf("node %d: Get(%s) = version %d; version %d had completed before the read began", n, key, r.Version, floor)
						}
					case p < 78:
						r := src.write(key)
						if err := c.Set(ctx, key, r, r.Version); err != nil {
							t.Error(err)
						}
						raise(k, r.Version)
					case p < 85:
						var committed int64
						err := c.Update(ctx, key, func(ctx context.Context) (cache.Change[versioned], error) {
							r := src.write(key)
							committed = r.Version
							if rng.IntN(2) == 0 {
								return cache.Change[versioned]{Value: r}, nil // a writer that does not know versions
							}
							return cache.Change[versioned]{Value: r, Version: r.Version}, nil
						})
						if err != nil {
							t.Error(err)
						}
						raise(k, committed)
					case p < 90:
						v := src.remove(key)
						if err := c.Delete(ctx, key, v); err != nil {
							t.Error(err)
						}
						raise(k, v)
					case p < 99:
						r := src.write(key) // a write that bypasses the cache...
						if err := c.Invalidate(ctx, key); err != nil {
							t.Error(err) // ...announced by its writer
						}
						raise(k, r.Version)
					default:
						if err := c.InvalidateAll(ctx); err != nil {
							t.Error(err)
						}
					}
				}
			})
		}
	}
	wg.Wait()
	if n := stale.Load(); n > 0 {
		t.Fatalf("%d stale reads", n)
	}

	// G3: quiescent, every node returns exactly what the source holds.
	for n, c := range caches {
		for k := range keys {
			key := fmt.Sprint("k", k)
			want, exists := src.read(key)
			got, err := c.Get(ctx, key)
			switch {
			case !exists && !errors.Is(err, cache.ErrNotFound):
				t.Errorf("node %d: Get(%s) = %v, %v; want not found", n, key, got, err)
			case exists && (err != nil || got != want):
				t.Errorf("node %d: Get(%s) = %v, %v; want %v", n, key, got, err, want)
			}
		}
		st := c.Stats()
		t.Logf("node %d: %+v", n, st)
	}
}
