package store

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
)

// BenchmarkReplicaReadPath is the read path of a node whose loads read
// the primary, a streaming replica, or a replica whose replay is paused,
// while another node writes hot keys at a steady rate (one write every
// 2ms through its Table). Each iteration is a Get of a Zipf-distributed
// key on the reading node, from 8×GOMAXPROCS goroutines. It reports the hit ratio, the share of loads
// the replica served and of loads the primary served, the p50 and p99 of
// a miss (the load's own duration), and stale reads: reads that returned a
// version older than a write that had returned before the read began
// (the in-process bus delivers before a write returns, so the bound is 0).
//
//	set -a; . <(integration/pgreplica/pg.sh start); set +a
//	go test -run '^$' -bench ReplicaReadPath -count 6 ./store
func BenchmarkReplicaReadPath(b *testing.B) {
	for _, mode := range []string{"primary", "replica", "replica-paused"} {
		b.Run(mode, func(b *testing.B) { benchReplicaReadPath(b, mode) })
	}
}

func benchReplicaReadPath(b *testing.B, mode string) {
	e := newReplicaEnv(b)
	ctx := context.Background()
	const keys = 2000
	if _, err := e.pool.Exec(ctx, `INSERT INTO `+e.table+` SELECT 'k' || i, 'v', 1 FROM generate_series(0, $1 - 1) i`, keys); err != nil {
		b.Fatal(err)
	}
	sA, sB := e.store(nil), e.store(nil)
	a := NewTable(sA, e.node(sA), nil)
	r, err := NewReplica(sB.pool, e.replica, nil)
	if err != nil {
		b.Fatal(err)
	}
	query := `SELECT id, value, version FROM ` + e.table + ` WHERE id = $1`
	load := Loader[string](sB.pool, query, pgx.RowToStructByName[item])
	if mode != "primary" {
		load = ReplicaLoader[string](r, query, pgx.RowToStructByName[item])
	}
	var mu sync.Mutex
	var missTimes []time.Duration
	timed := func(ctx context.Context, k string) (item, error) {
		t0 := time.Now()
		it, err := load(ctx, k)
		d := time.Since(t0)
		mu.Lock()
		missTimes = append(missTimes, d)
		mu.Unlock()
		return it, err
	}
	c, err := cache.New("items", keys/2, timed, &cache.Options[string, item]{
		Bus:     e.bus,
		Version: func(it item) int64 { return it.Version },
	})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	names := make([]string, keys)
	for i := range names {
		names[i] = fmt.Sprint("k", i)
	}
	for _, k := range names[:keys/2] { // warm the cache
		if _, err := c.Get(ctx, k); err != nil {
			b.Fatal(err)
		}
	}
	// The warm-up's first load read the primary (the cache starts with
	// positions unknown) and set the floor the next loads require.
	zipf := func(rng *rand.Rand) *rand.Zipf { return rand.NewZipf(rng, 1.1, 1, keys-1) }
	testenv.WaitReplayed(b, e.primaryURL, e.replicaURL)
	if mode == "replica-paused" {
		testenv.PauseReplay(b, e.replicaURL)
	}

	// acked[k] is the version of the newest write of k that has returned.
	acked := make([]atomic.Int64, keys)
	for i := range acked {
		acked[i].Store(1)
	}
	wctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		z := zipf(rand.New(rand.NewPCG(1, 2)))
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for n := 0; ; n++ {
			select {
			case <-wctx.Done():
				return
			case <-tick.C:
			}
			k := int(z.Uint64())
			ch, err := a.Update(wctx, fmt.Sprint("k", k), e.put(fmt.Sprint("k", k), fmt.Sprint(n)))
			if err != nil {
				if wctx.Err() == nil {
					b.Error(err)
				}
				return
			}
			acked[k].Store(ch.Version)
		}
	})
	mu.Lock()
	missTimes = missTimes[:0]
	mu.Unlock()
	before, rBefore := c.Stats(), r.Stats()
	var stale atomic.Int64
	var seed atomic.Uint64
	b.SetParallelism(8) // as a server's requests: one waiting load does not stop the others
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		z := zipf(rand.New(rand.NewPCG(3, seed.Add(1))))
		for pb.Next() {
			k := int(z.Uint64())
			want := acked[k].Load()
			it, err := c.Get(ctx, names[k])
			if err != nil {
				b.Error(err)
				return
			}
			if it.Version < want {
				stale.Add(1)
			}
		}
	})
	b.StopTimer()
	stop()
	wg.Wait()
	st, rs := c.Stats(), r.Stats()
	hits, misses := st.Hits-before.Hits, st.Misses-before.Misses
	loads := float64(len(missTimes))
	b.ReportMetric(100*float64(hits)/float64(max(hits+misses, 1)), "hit-%")
	if mode != "primary" && loads > 0 {
		b.ReportMetric(100*float64(rs.ReplicaReads-rBefore.ReplicaReads)/loads, "replica-%")
		b.ReportMetric(100*float64(rs.PrimaryReads-rBefore.PrimaryReads)/loads, "fallback-%")
	}
	if len(missTimes) > 0 {
		slices.Sort(missTimes)
		b.ReportMetric(float64(missTimes[len(missTimes)/2].Microseconds()), "miss-p50-µs")
		b.ReportMetric(float64(missTimes[len(missTimes)*99/100].Microseconds()), "miss-p99-µs")
	}
	b.ReportMetric(float64(stale.Load()), "stale-reads")
}
