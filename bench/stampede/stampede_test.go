package stampede

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/store"
)

const (
	nodes   = 3
	readers = 1000 // per node
	rows    = 100_000
)

type row struct {
	ID      int64 `db:"id"`
	Value   int64 `db:"value"`
	Version int64 `db:"version"`
}

// node is one instance: its own pool, bus and cache, and a count of the
// loads its loader ran.
type node struct {
	pool  *pgxpool.Pool
	items *cache.Cache[int64, row]
	load  cache.LoaderFunc[int64, row] // the counted loader
	loads atomic.Int64
	naive *lru.Cache[int64, row]
	table string // quoted
}

func setup(b *testing.B) []*node { return setupWith(b, nil) }

// setupWith is setup with codec as the caches' Options.Codec: nil for
// plain invalidations, a codec for value broadcast.
func setupWith(b *testing.B, codec cache.Codec[row]) []*node {
	b.Helper()
	admin := testenv.Pool(b, testenv.PoolConfig(b, "coherent-bench-stampede", ""))
	schema := testenv.Schema(b, admin)
	ctx := b.Context()
	table := pgx.Identifier{schema, "items"}.Sanitize()
	if _, err := admin.Exec(ctx, `CREATE TABLE `+table+` (id bigint PRIMARY KEY, value bigint NOT NULL, version bigint NOT NULL)`); err != nil {
		b.Fatal(err)
	}
	if _, err := admin.Exec(ctx, `INSERT INTO `+table+` SELECT g, g, 1 FROM generate_series(0, $1 - 1) g`, rows); err != nil {
		b.Fatal(err)
	}
	channel := testenv.Name("bench:stampede:")
	ns := make([]*node, nodes)
	for i := range ns {
		n := &node{pool: testenv.Pool(b, testenv.PoolConfig(b, "coherent-bench-stampede", ""))}
		load := store.Loader[int64](n.pool, `SELECT id, value, version FROM `+table+` WHERE id = $1`, pgx.RowToStructByName[row])
		n.load = func(ctx context.Context, k int64) (row, error) {
			n.loads.Add(1)
			return load(ctx, k)
		}
		bus, err := invalidate.NewPubSub(testenv.Redis(b), &invalidate.PubSubOptions{Channel: channel})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { bus.Close() })
		n.items, err = cache.New("items", rows, n.load, &cache.Options[int64, row]{
			Bus:     bus,
			Version: func(r row) int64 { return r.Version },
			Codec:   codec,
		})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { n.items.Close() })
		n.naive, _ = lru.New[int64, row](rows)
		n.table = table
		ns[i] = n
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, n := range ns {
		for !n.items.Proven() {
			if time.Now().After(deadline) {
				b.Fatal("bus link not proven within 10s")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return ns
}

// burst has readers goroutines per node wait at a gate, then read key
// through get at once, and returns the loads each node ran.
func burst(b *testing.B, ns []*node, key int64, get func(n *node, key int64) error) []int64 {
	before := make([]int64, len(ns))
	for i, n := range ns {
		before[i] = n.loads.Load()
	}
	gate := make(chan struct{})
	var ready, done sync.WaitGroup
	var failed atomic.Int64
	for _, n := range ns {
		for range readers {
			ready.Add(1)
			done.Go(func() {
				ready.Done()
				<-gate
				if err := get(n, key); err != nil {
					if failed.Add(1) == 1 {
						b.Errorf("Get(%d) = %v", key, err)
					}
				}
			})
		}
	}
	ready.Wait()
	close(gate)
	done.Wait()
	loads := make([]int64, len(ns))
	for i, n := range ns {
		loads[i] = n.loads.Load() - before[i]
	}
	return loads
}

// BenchmarkStampede runs one burst per iteration through the library, then
// one through the naive cache-aside, each on a key no node has read. It
// reports loads per node and per burst of each, the most loads one node
// ran in a burst, and the library's loads as a fraction of the naive ones.
// One op is one burst of each kind.
func BenchmarkStampede(b *testing.B) {
	ns := setup(b)
	coherentGet := func(n *node, key int64) error {
		_, err := n.items.Get(context.Background(), key)
		return err
	}
	naiveGet := func(n *node, key int64) error {
		if _, ok := n.naive.Get(key); ok {
			return nil
		}
		r, err := n.load(context.Background(), key)
		if err == nil {
			n.naive.Add(key, r)
		}
		return err
	}
	bypassed := func() (s uint64) {
		for _, n := range ns {
			s += n.items.Stats().Bypassed
		}
		return s
	}
	var total, naiveTotal, maxPerNode int64
	bursts := int64(0)
	key := int64(0)
	b.ReportAllocs()
	for b.Loop() {
		if key+2 > rows {
			b.Fatalf("more than %d bursts: no cold key left", rows/2)
		}
		by := bypassed()
		loads := burst(b, ns, key, coherentGet)
		unproven := bypassed() != by
		for i, l := range loads {
			total += l
			maxPerNode = max(maxPerNode, l)
			// A node that lost its proof mid-burst reads through, and
			// those reads are shared per time bucket, not per key: only
			// a proven node owes exactly one load.
			if l != 1 && !unproven {
				b.Errorf("burst of key %d: node %d ran %d loads; want 1 (G5)", key, i, l)
			}
		}
		for _, l := range burst(b, ns, key+1, naiveGet) {
			naiveTotal += l
		}
		bursts++
		key += 2
	}
	n := float64(bursts)
	b.ReportMetric(float64(total)/n/nodes, "loads/node")
	b.ReportMetric(float64(maxPerNode), "max-loads/node")
	b.ReportMetric(float64(total)/n, "loads/burst")
	b.ReportMetric(float64(naiveTotal)/n/nodes, "naive-loads/node")
	b.ReportMetric(float64(naiveTotal)/n, "naive-loads/burst")
	b.ReportMetric(float64(total)/float64(max(naiveTotal, 1)), "loads/naive")
}

// BenchmarkStampedeAfterWrite is the stampede a write to a hot key causes
// across the nodes: every node holds the key; node 0 writes it through its
// cache (cache.Update around the UPDATE, as a store.Table would), and once
// the write's message has had time to reach the others (20ms, far above
// the bus's delay on loopback), 1,000 readers per node read the key at
// once. With plain invalidations each other node loads the key once (G5);
// with value broadcast it installs the written row and loads nothing. It
// reports loads per write per node other than the writer, and reads that
// returned an older version than the write's. One op is one write and its
// burst.
func BenchmarkStampedeAfterWrite(b *testing.B) {
	for _, bc := range []struct {
		name  string
		codec cache.Codec[row]
	}{{"broadcast=off", nil}, {"broadcast=on", cache.JSONCodec[row]{}}} {
		b.Run(bc.name, func(b *testing.B) {
			ns := setupWith(b, bc.codec)
			ctx := context.Background()
			const key = 42
			for _, n := range ns {
				if _, err := n.items.Get(ctx, key); err != nil {
					b.Fatal(err)
				}
			}
			var written atomic.Int64
			var stale atomic.Int64
			get := func(n *node, key int64) error {
				r, err := n.items.Get(ctx, key)
				if err == nil && r.Version < written.Load() {
					stale.Add(1)
				}
				return err
			}
			var others, writes int64
			for b.Loop() {
				w := ns[0]
				err := w.items.Update(ctx, key, func(ctx context.Context) (cache.Change[row], error) {
					rows, _ := w.pool.Query(ctx, `UPDATE `+w.table+` SET value = value + 1, version = version + 1 WHERE id = $1 RETURNING id, value, version`, key)
					r, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[row])
					return cache.Change[row]{Value: r, Version: r.Version}, err
				})
				if err != nil {
					b.Fatal(err)
				}
				r, err := w.items.Get(ctx, key)
				if err != nil {
					b.Fatal(err)
				}
				written.Store(r.Version)
				time.Sleep(20 * time.Millisecond)
				loads := burst(b, ns, key, get)
				for _, l := range loads[1:] {
					others += l
				}
				writes++
			}
			b.ReportMetric(float64(others)/float64(writes)/float64(nodes-1), "loads/write/other-node")
			b.ReportMetric(float64(stale.Load()), "stale-reads")
		})
	}
}
