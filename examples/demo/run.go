package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	svc "github.com/coherentcache/coherent/examples/services"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
	"github.com/coherentcache/coherent/store"
)

const schema = "coherent_demo"

// row is a row of coherent_demo.items.
type row struct {
	ID      int64 `db:"id"`
	Value   int64 `db:"value"`
	Version int64 `db:"version"`
}

// node is one instance of a service: its own connections, bus, locks,
// store and cache.
type node struct {
	id    int
	pool  *pgxpool.Pool
	rdb   *redis.Client
	bus   *invalidate.PubSub
	locks *lockguard.Guard
	store *store.Store
	items *store.Table[int64, row]
}

func (n *node) close() {
	if n.items != nil {
		n.items.Cache().Close()
	}
	if n.bus != nil {
		n.bus.Close()
	}
	if n.locks != nil {
		n.locks.Close()
	}
	n.rdb.Close()
	n.pool.Close()
}

// setup recreates the demo's schema, with the library's tables and the
// items table, every key at version 1.
func setup(ctx context.Context, dbURL string, keys int) error {
	pcfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		return svc.ErrDatabaseURL // pgx's error may quote parts of a password
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`); err != nil {
		return err
	}
	if err := store.Migrate(ctx, pool, schema); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE `+schema+`.items (id bigint PRIMARY KEY, value bigint NOT NULL, version bigint NOT NULL)`); err != nil {
		return err
	}
	_, err = pool.Exec(ctx, `INSERT INTO `+schema+`.items SELECT g, 0, 1 FROM generate_series(0, $1 - 1) g`, keys)
	return err
}

// history remembers, per key, when each recent version was committed and
// when its write returned: what staleness and propagation are measured
// against.
type history struct {
	keys []keyHistory
}

type keyHistory struct {
	mu   sync.Mutex
	ring [64]event // indexed by version % 64
}

type event struct {
	version            int64
	committed, written int64 // nanoseconds since the start; 0 if unknown
}

func (h *history) at(k int64) *keyHistory { return &h.keys[k] }

func (kh *keyHistory) slot(version int64) *event {
	e := &kh.ring[version%int64(len(kh.ring))]
	if e.version != version {
		*e = event{version: version}
	}
	return e
}

func (h *history) committed(k, version, t int64) {
	kh := h.at(k)
	kh.mu.Lock()
	kh.slot(version).committed = t
	kh.mu.Unlock()
}

func (h *history) written(k, version, t int64) {
	kh := h.at(k)
	kh.mu.Lock()
	kh.slot(version).written = t
	kh.mu.Unlock()
}

func (h *history) commitTime(k, version int64) int64 {
	kh := h.at(k)
	kh.mu.Lock()
	defer kh.mu.Unlock()
	if e := &kh.ring[version%int64(len(kh.ring))]; e.version == version {
		return e.committed
	}
	return 0
}

// staleness returns how long before start the value at version stopped
// being the newest: the return time of the write of version+1, if that
// write had returned before start, and 0 otherwise. A value overwritten
// more than the ring's length ago counts from the oldest write remembered.
func (h *history) staleness(k, version, start int64) time.Duration {
	kh := h.at(k)
	kh.mu.Lock()
	defer kh.mu.Unlock()
	oldest := int64(0)
	for v := version + 1; v < version+1+int64(len(kh.ring)); v++ {
		e := &kh.ring[v%int64(len(kh.ring))]
		if e.version != v || e.written == 0 {
			continue
		}
		if e.written < start && (oldest == 0 || e.written < oldest) {
			oldest = e.written
		}
		break
	}
	if oldest == 0 {
		return 0
	}
	return time.Duration(start - oldest)
}

// tracer records commits (store) and applied invalidations (cache) of a
// node.
type tracer struct {
	h       *history
	start   time.Time
	mu      sync.Mutex
	latency []time.Duration // commit elsewhere → applied here
}

func (t *tracer) now() int64 { return int64(time.Since(t.start)) }

func (t *tracer) TraceWriteStart(ctx context.Context, _ store.TraceWriteStartData) context.Context {
	return ctx
}
func (t *tracer) TraceWriteEnd(context.Context, store.TraceWriteEndData) {}

func (t *tracer) TraceCommit(_ context.Context, d store.TraceCommitData) {
	if k, err := strconv.ParseInt(d.Key, 10, 64); err == nil {
		t.h.committed(k, d.Version, t.now())
	}
}

func (t *tracer) TraceLoadStart(ctx context.Context, _ cache.TraceLoadStartData) context.Context {
	return ctx
}
func (t *tracer) TraceLoadEnd(context.Context, cache.TraceLoadEndData) {}

func (t *tracer) TraceInvalidation(d cache.TraceInvalidationData) {
	if !d.Remote {
		return
	}
	now := t.now()
	for _, inv := range d.Keys {
		k, err := strconv.ParseInt(inv.Key, 10, 64)
		if err != nil || inv.Version == 0 {
			continue
		}
		if c := t.h.commitTime(k, inv.Version); c > 0 {
			t.mu.Lock()
			t.latency = append(t.latency, time.Duration(now-c))
			t.mu.Unlock()
		}
	}
}

// result is what the demo reports.
type result struct {
	cfg              config
	elapsed          time.Duration
	reads, writes    int64
	writeErrors      int64
	cache            cache.Stats
	bus              invalidate.Stats
	latency          []time.Duration
	staleWithin      int64
	staleBeyondBound int64
	maxStaleness     time.Duration
	kills            int64
}

func run(ctx context.Context, cfg config, log *slog.Logger) (*result, error) {
	if err := setup(ctx, cfg.dbURL, cfg.keys); err != nil {
		return nil, fmt.Errorf("set up the schema %s: %w", schema, err)
	}
	start := time.Now()
	hist := &history{keys: make([]keyHistory, cfg.keys)}
	// Names of this run's own: several demos may share a Redis.
	suffix := strconv.FormatUint(rand.Uint64(), 36)

	nodes := make([]*node, cfg.nodes)
	tracers := make([]*tracer, cfg.nodes)
	defer func() {
		for _, n := range nodes {
			if n != nil {
				n.close()
			}
		}
	}()
	for i := range nodes {
		n, err := newNode(ctx, i, cfg, suffix, log)
		if n != nil {
			nodes[i] = n
		}
		if err != nil {
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
		tracers[i] = &tracer{h: hist, start: start}
		if err := n.attach(cfg, tracers[i], log); err != nil {
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
	}

	r := &result{cfg: cfg}
	var reads, writes, writeErrors, staleWithin, staleBeyond, kills atomic.Int64
	var maxStale atomic.Int64
	wctx, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	var wg sync.WaitGroup
	for _, n := range nodes {
		for w := range cfg.readers {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(n.id), uint64(w)))
				zipf := rand.NewZipf(rng, 1.1, 1, uint64(cfg.keys-1))
				for wctx.Err() == nil {
					k := int64(zipf.Uint64())
					if rng.Float64() < cfg.readRatio {
						t0 := int64(time.Since(start))
						it, err := n.items.Get(wctx, k)
						if err != nil {
							if wctx.Err() == nil {
								log.Warn("read failed", "node", n.id, "err", err)
							}
							continue
						}
						reads.Add(1)
						if age := hist.staleness(k, it.Version, t0); age > 0 {
							staleWithin.Add(1)
							if age > cfg.maxStaleness {
								staleBeyond.Add(1)
							}
							for {
								old := maxStale.Load()
								if int64(age) <= old || maxStale.CompareAndSwap(old, int64(age)) {
									break
								}
							}
						}
						continue
					}
					// A write that started finishes even if the run ends
					// meanwhile.
					ch, err := n.items.Update(ctx, k, add(k, 1))
					if err != nil {
						if wctx.Err() == nil {
							writeErrors.Add(1)
							log.Warn("write failed", "node", n.id, "err", err)
						}
						continue
					}
					hist.written(k, ch.Version, int64(time.Since(start)))
					writes.Add(1)
				}
			})
		}
	}
	if cfg.faults {
		wg.Go(func() { killBusConnections(wctx, cfg.redisURL, suffix, &kills, log) })
	}
	wg.Go(func() {
		progress(wctx, start, nodes, &reads, &writes, &staleBeyond, &kills)
	})
	wg.Wait()
	r.elapsed = time.Since(start)

	r.reads, r.writes, r.writeErrors = reads.Load(), writes.Load(), writeErrors.Load()
	r.staleWithin, r.staleBeyondBound = staleWithin.Load(), staleBeyond.Load()
	r.maxStaleness = time.Duration(maxStale.Load())
	r.kills = kills.Load()
	for i, n := range nodes {
		r.cache = addCacheStats(r.cache, n.items.Cache().Stats())
		r.bus = addBusStats(r.bus, n.bus.Stats())
		r.latency = append(r.latency, tracers[i].latency...)
	}
	return r, nil
}

func newNode(ctx context.Context, id int, cfg config, suffix string, log *slog.Logger) (*node, error) {
	pcfg, err := pgxpool.ParseConfig(cfg.dbURL)
	if err != nil {
		return nil, svc.ErrDatabaseURL // pgx's error may quote parts of a password
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = fmt.Sprintf("coherent-demo-%d", id)
	pcfg.MaxConns = int32(cfg.readers + 4)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, err
	}
	ropts, err := redis.ParseURL(cfg.redisURL)
	if err != nil {
		pool.Close()
		return nil, svc.ErrRedisURL // go-redis's error quotes the URL
	}
	ropts.ClientName = fmt.Sprintf("coherent-demo-%s-%d", suffix, id) // found by killBusConnections
	ropts.PoolSize = cfg.readers + 4
	n := &node{id: id, pool: pool, rdb: redis.NewClient(ropts)}
	if n.bus, err = invalidate.NewPubSub(n.rdb, &invalidate.PubSubOptions{
		Channel: "coherent:demo:" + suffix, Options: invalidate.Options{Logger: log},
	}); err != nil {
		return n, err
	}
	if n.locks, err = lockguard.New(n.rdb, &lockguard.Options{Prefix: "coherent:demo:" + suffix + ":lock:", Logger: log}); err != nil {
		return n, err
	}
	return n, nil
}

// attach builds the node's store and cache, reporting to tr.
func (n *node) attach(cfg config, tr *tracer, log *slog.Logger) error {
	var err error
	n.store, err = store.New(n.pool, &store.Options{Schema: schema, Locks: n.locks, Publisher: n.bus, Tracer: tr, Logger: log})
	if err != nil {
		return err
	}
	c, err := cache.New("items", cfg.keys,
		store.Loader[int64](n.pool, `SELECT id, value, version FROM `+schema+`.items WHERE id = $1`, pgx.RowToStructByName[row]),
		&cache.Options[int64, row]{
			Bus:          n.bus,
			MaxStaleness: cfg.maxStaleness,
			Version:      func(r row) int64 { return r.Version },
			Tracer:       tr,
			Logger:       log,
		})
	if err != nil {
		return err
	}
	n.items = store.NewTable(n.store, c, nil)
	return nil
}

// add is a read-modify-write of key k.
func add(k, delta int64) store.TxFunc[row] {
	return func(ctx context.Context, tx pgx.Tx) (cache.Change[row], error) {
		var r row
		err := tx.QueryRow(ctx, `UPDATE `+schema+`.items SET value = value + $2, version = version + 1
			WHERE id = $1 RETURNING id, value, version`, k, delta).Scan(&r.ID, &r.Value, &r.Version)
		return cache.Change[row]{Value: r, Version: r.Version}, err
	}
}

// killBusConnections kills the demo nodes' pub/sub connections about once
// a second, as a network blip or a Redis client-output-buffer-limit would.
func killBusConnections(ctx context.Context, redisURL, suffix string, kills *atomic.Int64, log *slog.Logger) {
	opts, err := redis.ParseURL(redisURL)
	if err != nil {
		return
	}
	admin := redis.NewClient(opts)
	defer admin.Close()
	for {
		t := time.NewTimer(500*time.Millisecond + rand.N(time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		list, err := admin.ClientList(ctx).Result()
		if err != nil {
			log.Warn("CLIENT LIST", "err", err)
			continue
		}
		for _, line := range strings.Split(list, "\n") {
			f := fields(line)
			if !strings.HasPrefix(f["name"], "coherent-demo-"+suffix) || (f["sub"] == "0" && f["ssub"] == "0") {
				continue
			}
			if err := admin.Do(ctx, "CLIENT", "KILL", "ID", f["id"]).Err(); err == nil {
				kills.Add(1)
			}
		}
	}
}

// fields parses one line of CLIENT LIST.
func fields(line string) map[string]string {
	m := make(map[string]string)
	for _, kv := range strings.Fields(line) {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

func progress(ctx context.Context, start time.Time, nodes []*node, reads, writes, stale, kills *atomic.Int64) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var lastReads, lastWrites int64
	var last cache.Stats
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var st cache.Stats
		var bus invalidate.Stats
		for _, n := range nodes {
			st = addCacheStats(st, n.items.Cache().Stats())
			bus = addBusStats(bus, n.bus.Stats())
		}
		r, w := reads.Load(), writes.Load()
		hits, misses := st.Hits-last.Hits, st.Misses-last.Misses
		fmt.Printf("%4.0fs  reads %7d/s  hit %5.1f%%  writes %5d/s  bypassed %6d  flushes %3d  conn kills %3d  stale beyond bound %d\n",
			time.Since(start).Seconds(), r-lastReads, 100*float64(hits)/float64(max(hits+misses, 1)), w-lastWrites,
			st.Bypassed, st.Flushes, kills.Load(), stale.Load())
		lastReads, lastWrites, last = r, w, st
	}
}

func addCacheStats(a, b cache.Stats) cache.Stats {
	a.Hits += b.Hits
	a.Misses += b.Misses
	a.Bypassed += b.Bypassed
	a.Loads += b.Loads
	a.LoadErrors += b.LoadErrors
	a.Coalesced += b.Coalesced
	a.SkippedStores += b.SkippedStores
	a.InvalidationsSent += b.InvalidationsSent
	a.InvalidationsReceived += b.InvalidationsReceived
	a.Flushes += b.Flushes
	a.Evictions += b.Evictions
	a.Entries += b.Entries
	return a
}

func addBusStats(a, b invalidate.Stats) invalidate.Stats {
	a.MessagesSent += b.MessagesSent
	a.MessagesReceived += b.MessagesReceived
	a.Proofs += b.Proofs
	a.Reconnects += b.Reconnects
	a.FlushesResubscribe += b.FlushesResubscribe
	a.FlushesGap += b.FlushesGap
	a.FlushesProofTimeout += b.FlushesProofTimeout
	return a
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func (r *result) print(w io.Writer) {
	c := r.cache
	lookups := c.Hits + c.Misses + c.Bypassed
	fmt.Fprintf(w, "\n%d nodes, %d keys, %.0f%% reads, %v", r.cfg.nodes, r.cfg.keys, 100*r.cfg.readRatio, r.elapsed.Round(time.Millisecond))
	if r.cfg.faults {
		fmt.Fprintf(w, ", %d bus connections killed", r.kills)
	}
	fmt.Fprintf(w, "\n\n")
	fmt.Fprintf(w, "reads                %d (%.0f/s)\n", r.reads, float64(r.reads)/r.elapsed.Seconds())
	fmt.Fprintf(w, "hit ratio            %.2f%%\n", 100*float64(c.Hits)/float64(max(lookups, 1)))
	fmt.Fprintf(w, "loads                %d (Postgres reads)\n", c.Loads)
	fmt.Fprintf(w, "loads saved          %d (hits and shared loads)\n", c.Hits+c.Coalesced)
	fmt.Fprintf(w, "writes               %d (%d failed)\n", r.writes, r.writeErrors)
	fmt.Fprintf(w, "bus                  %d messages sent, %d proofs, %d reconnects, %d flushes (resubscribe %d, gap %d, proof timeout %d)\n",
		r.bus.MessagesSent, r.bus.Proofs, r.bus.Reconnects, c.Flushes, r.bus.FlushesResubscribe, r.bus.FlushesGap, r.bus.FlushesProofTimeout)
	fmt.Fprintf(w, "reads bypassed       %d (link unproven: read through to Postgres)\n", c.Bypassed)
	fmt.Fprintf(w, "propagation          p50 %v  p99 %v  (commit on one node → applied on another, %d samples)\n",
		percentile(r.latency, 0.5).Round(time.Microsecond), percentile(r.latency, 0.99).Round(time.Microsecond), len(r.latency))
	fmt.Fprintf(w, "stale reads          %d within the bus delay; oldest value served was overwritten %v before its read began\n",
		r.staleWithin, r.maxStaleness.Round(time.Microsecond))
	fmt.Fprintf(w, "stale beyond bound   %d (bound: MaxStaleness %v)\n", r.staleBeyondBound, r.cfg.maxStaleness)
	if r.staleBeyondBound > 0 {
		fmt.Fprintln(w, "FAIL: reads older than the bound were served")
	}
}
