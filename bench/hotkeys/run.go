package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
	"github.com/coherentcache/coherent/store"
)

type config struct {
	services         benchenv.Services
	nodes            []int
	rate             int // writes/s, all nodes
	keys             int
	reads            int // per node per second
	duration, warmup time.Duration
}

// Result is what hotkeys reports.
type Result struct {
	DurationS float64 `json:"duration_s"`
	Rate      int     `json:"target_writes_per_s"`
	Keys      int     `json:"keys"`
	Reads     int     `json:"reads_per_s_per_node"`
	Rows      []Row   `json:"rows"`
}

// Row is one configuration's numbers.
type Row struct {
	Nodes     int     `json:"nodes"`
	Broadcast bool    `json:"broadcast"`
	Writes    int64   `json:"writes"`
	WritesPS  float64 `json:"writes_per_s"`
	Reads     int64   `json:"reads"`
	Loads     uint64  `json:"loads"`
	// LoadsPerWrite is Loads/Writes; LoadsPerWriteNode divides that by the
	// nodes other than the writer (1 for one node).
	LoadsPerWrite     float64 `json:"loads_per_write"`
	LoadsPerWriteNode float64 `json:"loads_per_write_per_node"`
	// Visible: from the start of a write until every node served its
	// version or a newer one.
	VisibleP50us float64 `json:"visible_p50_us"`
	VisibleP99us float64 `json:"visible_p99_us"`
	// AfterReturn: from the return of the write (0 if every node served
	// it by then).
	AfterReturnP50us float64 `json:"after_return_p50_us"`
	AfterReturnP99us float64 `json:"after_return_p99_us"`
	NotVisible       int64   `json:"not_visible"` // writes not served everywhere within 5 s
	WriteP50us       float64 `json:"write_p50_us"`
	// Bus: the payloads of the bus channel's messages, as published, and
	// as Redis delivers them to every node.
	BusBytesPerWrite   float64 `json:"bus_bytes_per_write"`
	BusMsgsPerWrite    float64 `json:"bus_msgs_per_write"`
	BusDeliveredBytesS float64 `json:"bus_delivered_bytes_per_s"`
	ValuesSent         uint64  `json:"values_sent"`
	ValuesInstalled    uint64  `json:"values_installed"`
	ValuesRejected     uint64  `json:"values_rejected"`
	LoadStart, LoadEnd string
}

type item struct {
	ID      int64  `db:"id" json:"id"`
	Value   string `db:"value" json:"value"`
	Version int64  `db:"version" json:"version"`
}

func run(ctx context.Context, cfg config, log io.Writer) (*Result, error) {
	if cfg.rate < 1 || cfg.keys < 1 || cfg.reads < 1 || cfg.duration <= 0 {
		return nil, errors.New("rate, keys, reads and duration must be positive")
	}
	admin, ropts, err := cfg.services.Redis(ctx)
	if err != nil {
		return nil, err
	}
	defer admin.Close()
	pool, err := pgxpool.New(ctx, cfg.services.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	defer pool.Close()
	schema := benchenv.Name("bench_hotkeys_")
	prefix := benchenv.Name("bench:hotkeys:") + ":"
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(cctx, `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`); err != nil {
			fmt.Fprintf(log, "hotkeys: drop schema %s: %v\n", schema, err)
		}
		if err := benchenv.DeleteKeys(cctx, admin, prefix); err != nil {
			fmt.Fprintf(log, "hotkeys: delete keys %s*: %v\n", prefix, err)
		}
	}()
	if err := store.Migrate(ctx, pool, schema); err != nil {
		return nil, fmt.Errorf("migrate: %w", err)
	}
	table := pgx.Identifier{schema, "items"}.Sanitize()
	if _, err := pool.Exec(ctx, `CREATE TABLE `+table+` (id bigint PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`); err != nil {
		return nil, err
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+table+` SELECT g, 'value of ' || g, 1 FROM generate_series(0, $1 - 1) g`, cfg.keys); err != nil {
		return nil, err
	}
	res := &Result{DurationS: cfg.duration.Seconds(), Rate: cfg.rate, Keys: cfg.keys, Reads: cfg.reads}
	for _, n := range cfg.nodes {
		for _, bcast := range []bool{false, true} {
			row, err := measure(ctx, cfg, ropts, schema, table, prefix, n, bcast)
			if err != nil {
				return nil, fmt.Errorf("%d nodes, broadcast %v: %w", n, bcast, err)
			}
			fmt.Fprintf(log, "hotkeys: %s\n", row.short())
			res.Rows = append(res.Rows, row)
		}
	}
	return res, nil
}

func (r Row) short() string {
	return fmt.Sprintf("%2d nodes broadcast %-5v: %.1f writes/s, %.3f loads/write/node, visible p50 %.0f µs p99 %.0f µs (after return %.0f / %.0f), %.0f bus bytes/write, load %s → %s",
		r.Nodes, r.Broadcast, r.WritesPS, r.LoadsPerWriteNode, r.VisibleP50us, r.VisibleP99us, r.AfterReturnP50us, r.AfterReturnP99us, r.BusBytesPerWrite, r.LoadStart, r.LoadEnd)
}

// node is one instance.
type node struct {
	pool  *pgxpool.Pool
	rdb   *redis.Client
	bus   *invalidate.PubSub
	locks *lockguard.Guard
	items *store.Table[int64, item]
}

func (n *node) close() {
	if n.items != nil {
		n.items.Cache().Close()
	}
	if n.locks != nil {
		n.locks.Close()
	}
	if n.bus != nil {
		n.bus.Close()
	}
	if n.rdb != nil {
		n.rdb.Close()
	}
	if n.pool != nil {
		n.pool.Close()
	}
}

func newNode(ctx context.Context, cfg config, ropts *redis.Options, schema, table, channel, prefix string, i int, bcast bool) (*node, error) {
	n := &node{}
	pcfg, err := pgxpool.ParseConfig(cfg.services.DatabaseURL)
	if err != nil {
		return n, err
	}
	pcfg.MaxConns = 4
	pcfg.ConnConfig.RuntimeParams["application_name"] = fmt.Sprintf("coherent-bench-hotkeys-%d", i)
	if n.pool, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		return n, err
	}
	o := *ropts
	o.ClientName = fmt.Sprintf("coherent-bench-hotkeys-%d", i)
	n.rdb = redis.NewClient(&o)
	if n.bus, err = invalidate.NewPubSub(n.rdb, &invalidate.PubSubOptions{Channel: channel}); err != nil {
		return n, err
	}
	if n.locks, err = lockguard.New(n.rdb, &lockguard.Options{Prefix: prefix + "lock:"}); err != nil {
		return n, err
	}
	s, err := store.New(n.pool, &store.Options{Schema: schema, Locks: n.locks, Publisher: n.bus})
	if err != nil {
		return n, err
	}
	opts := &cache.Options[int64, item]{Bus: n.bus, Version: func(it item) int64 { return it.Version }}
	if bcast {
		opts.Codec = cache.JSONCodec[item]{}
	}
	c, err := cache.New("items", 10_000,
		store.Loader[int64](n.pool, `SELECT id, value, version FROM `+table+` WHERE id = $1`, pgx.RowToStructByName[item]), opts)
	if err != nil {
		return n, err
	}
	n.items = store.NewTable(s, c, nil)
	return n, nil
}

// measure runs n nodes with broadcast bcast and returns their numbers.
func measure(ctx context.Context, cfg config, ropts *redis.Options, schema, table, prefix string, n int, bcast bool) (Row, error) {
	channel := benchenv.Name(prefix + "bus:")
	nodes := make([]*node, n)
	defer func() {
		for _, nd := range nodes {
			if nd != nil {
				nd.close()
			}
		}
	}()
	for i := range nodes {
		var err error
		nodes[i], err = newNode(ctx, cfg, ropts, schema, table, channel, prefix, i, bcast)
		if err != nil {
			return Row{}, err
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, nd := range nodes {
		for !nd.items.Cache().Proven() {
			if time.Now().After(deadline) {
				return Row{}, errors.New("buses not proven within 10s")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// A raw subscriber adds up the bus messages' payloads.
	sub := redis.NewClient(ropts)
	defer sub.Close()
	ps := sub.Subscribe(ctx, channel)
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		return Row{}, err
	}
	var busBytes, busMsgs atomic.Int64
	go func() {
		for {
			m, err := ps.Receive(context.Background())
			if err != nil {
				return
			}
			if msg, ok := m.(*redis.Message); ok {
				busBytes.Add(int64(len(msg.Payload)))
				busMsgs.Add(1)
			}
		}
	}()

	rctx, stopReads := context.WithCancel(ctx)
	var readers sync.WaitGroup
	var reads, readErrs atomic.Int64
	for _, nd := range nodes {
		readers.Go(func() {
			tick := time.NewTicker(time.Millisecond)
			defer tick.Stop()
			per := max(cfg.reads/1000, 1)
			every := max(1000/cfg.reads, 1)
			for i := 0; rctx.Err() == nil; i++ {
				<-tick.C
				if i%every != 0 {
					continue
				}
				for range per {
					if _, err := nd.items.Get(rctx, rand.Int64N(int64(cfg.keys))); err != nil && rctx.Err() == nil {
						readErrs.Add(1)
					}
					reads.Add(1)
				}
			}
		})
	}
	defer func() { stopReads(); readers.Wait() }()

	var (
		mu       sync.Mutex
		visible  []time.Duration
		writeLat []time.Duration
		after    []time.Duration
		measured atomic.Bool
		notVis   atomic.Int64
		failed   atomic.Int64
		firstErr atomic.Value
		inflight sync.WaitGroup
	)
	write := func() {
		key := rand.Int64N(int64(cfg.keys))
		nd := nodes[rand.IntN(n)]
		inflight.Go(func() {
			t0 := time.Now()
			ch, err := nd.items.Update(ctx, key, func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
				rows, _ := tx.Query(ctx, `UPDATE `+table+` SET value = 'written at ' || clock_timestamp(), version = version + 1 WHERE id = $1 RETURNING id, value, version`, key)
				it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[item])
				return cache.Change[item]{Value: it, Version: it.Version}, err
			})
			wrote := time.Since(t0)
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			// Probe every node until it serves this version or a newer one.
			pending := make([]*node, len(nodes))
			copy(pending, nodes)
			limit := t0.Add(5 * time.Second)
			for len(pending) > 0 && time.Now().Before(limit) {
				rest := pending[:0]
				for _, p := range pending {
					if it, err := p.items.Get(ctx, key); err != nil || it.Version < ch.Version {
						rest = append(rest, p)
					}
				}
				pending = rest
				if len(pending) > 0 {
					time.Sleep(100 * time.Microsecond)
				}
			}
			vis := time.Since(t0)
			if !measured.Load() {
				return
			}
			if len(pending) > 0 {
				notVis.Add(1)
				return
			}
			mu.Lock()
			visible = append(visible, vis)
			writeLat = append(writeLat, wrote)
			after = append(after, max(vis-wrote, 0))
			mu.Unlock()
		})
	}
	issue := func(d time.Duration) int64 {
		t0 := time.Now()
		issued := int64(0)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			el := time.Since(t0)
			if el >= d {
				break
			}
			for due := int64(el.Seconds() * float64(cfg.rate)); issued < due; issued++ {
				write()
			}
			<-tick.C
		}
		return issued
	}
	issue(cfg.warmup)
	inflight.Wait()

	stats := func() (s cache.Stats) {
		for _, nd := range nodes {
			c := nd.items.Cache().Stats()
			s.Loads += c.Loads
			s.ValuesSent += c.ValuesSent
			s.ValuesInstalled += c.ValuesInstalled
			s.ValuesRejected += c.ValuesRejected
		}
		return s
	}
	row := Row{Nodes: n, Broadcast: bcast, LoadStart: benchenv.LoadAvg()}
	s0, r0, bb0, bm0 := stats(), reads.Load(), busBytes.Load(), busMsgs.Load()
	measured.Store(true)
	t0 := time.Now()
	writes := issue(cfg.duration)
	inflight.Wait()
	elapsed := time.Since(t0)
	s1, r1, bb1, bm1 := stats(), reads.Load(), busBytes.Load(), busMsgs.Load()
	row.LoadEnd = benchenv.LoadAvg()
	if err := ctx.Err(); err != nil {
		return Row{}, err
	}
	if f := failed.Load(); f > 0 {
		return Row{}, fmt.Errorf("%d writes failed, first: %v", f, firstErr.Load())
	}
	if e := readErrs.Load(); e > 0 {
		return Row{}, fmt.Errorf("%d reads failed", e)
	}
	row.Writes = writes
	row.WritesPS = float64(writes) / elapsed.Seconds()
	row.Reads = r1 - r0
	row.Loads = s1.Loads - s0.Loads
	row.ValuesSent = s1.ValuesSent - s0.ValuesSent
	row.ValuesInstalled = s1.ValuesInstalled - s0.ValuesInstalled
	row.ValuesRejected = s1.ValuesRejected - s0.ValuesRejected
	if writes > 0 {
		row.LoadsPerWrite = float64(row.Loads) / float64(writes)
		row.LoadsPerWriteNode = row.LoadsPerWrite / float64(max(n-1, 1))
		row.BusBytesPerWrite = float64(bb1-bb0) / float64(writes)
		row.BusMsgsPerWrite = float64(bm1-bm0) / float64(writes)
	}
	row.BusDeliveredBytesS = float64(bb1-bb0) * float64(n) / elapsed.Seconds()
	row.NotVisible = notVis.Load()
	mu.Lock()
	vis, wl, ar := benchenv.Sorted(visible), benchenv.Sorted(writeLat), benchenv.Sorted(after)
	mu.Unlock()
	row.AfterReturnP50us = benchenv.Micros(benchenv.Percentile(ar, 0.50))
	row.AfterReturnP99us = benchenv.Micros(benchenv.Percentile(ar, 0.99))
	row.VisibleP50us = benchenv.Micros(benchenv.Percentile(vis, 0.50))
	row.VisibleP99us = benchenv.Micros(benchenv.Percentile(vis, 0.99))
	row.WriteP50us = benchenv.Micros(benchenv.Percentile(wl, 0.50))
	return row, nil
}

// print writes the results as a Markdown table.
func (r *Result) print(w io.Writer) {
	fmt.Fprintf(w, "%d hot keys, each node reading %d/s, %d library writes/s, %.1fs per row:\n\n", r.Keys, r.Reads, r.Rate, r.DurationS)
	fmt.Fprintf(w, "| nodes | broadcast | writes/s | loads/write | loads/write/node | visible everywhere p50 / p99 µs | after the write returned p50 / p99 µs | write p50 µs | not visible | bus bytes/write | bus msgs/write | delivered bytes/s | values installed / rejected | load (start → end) |\n")
	fmt.Fprintf(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, x := range r.Rows {
		onoff := "off"
		if x.Broadcast {
			onoff = "on"
		}
		fmt.Fprintf(w, "| %d | %s | %.1f | %.3f | %.3f | %.0f / %.0f | %.0f / %.0f | %.0f | %d | %.0f | %.2f | %.0f | %d / %d | %s → %s |\n",
			x.Nodes, onoff, x.WritesPS, x.LoadsPerWrite, x.LoadsPerWriteNode, x.VisibleP50us, x.VisibleP99us, x.AfterReturnP50us, x.AfterReturnP99us, x.WriteP50us,
			x.NotVisible, x.BusBytesPerWrite, x.BusMsgsPerWrite, x.BusDeliveredBytesS, x.ValuesInstalled, x.ValuesRejected, x.LoadStart, x.LoadEnd)
	}
}
