package store

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
)

// benchKeys is the number of keys each path of a benchmark rotates over.
// The writers never overlap, so a small set keeps the writes uncontended
// while every iteration after the warm-up updates an existing row, lock
// counter and fence row: the steady state of a hot key set.
const benchKeys = 32

// benchNode is one node of the write path as examples/demo wires it: its
// own pool and Redis client, a real Redis pub/sub bus, a lock guard, a
// Store and a cache of the env's items table.
type benchNode struct {
	e     *env
	pool  *pgxpool.Pool
	rdb   *redis.Client
	bus   *invalidate.PubSub
	locks *lockguard.Guard
	s     *Store
	c     *cache.Cache[string, item]

	// The raw path: a lock key under the env's prefix (deleted with it)
	// and a channel of its own with one subscriber, as the bus's channel
	// has (the bus itself).
	rawLock    string
	rawChannel string
}

// benchTrace instruments a node's connections: pgx and go-redis tracers
// that time and name every round trip, and counters of the writes on its
// sockets. A nil *benchTrace leaves the node uninstrumented.
type benchTrace struct {
	rec      *rtRecorder
	pgWrites atomic.Int64 // socket writes to Postgres while rec is on
	rdWrites atomic.Int64 // socket writes to Redis while rec is on
}

// newBenchNode builds a node on e. The bus's channel and the lock prefix
// are the env's own; every Redis key the node creates is under e.prefix.
func newBenchNode(b *testing.B, e *env, tr *benchTrace) *benchNode {
	b.Helper()
	n := &benchNode{e: e, rawLock: e.prefix + "raw:", rawChannel: e.prefix + "raw-channel"}

	cfg := poolConfig(b, e.app)
	ropt, err := redis.ParseURL(testenv.RedisURL())
	if err != nil {
		b.Fatalf("REDIS_URL: %v", err)
	}
	if tr != nil {
		cfg.ConnConfig.Tracer = tr.rec
		d := &net.Dialer{KeepAlive: 5 * time.Minute}
		cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			return countConn{c, &tr.pgWrites, &tr.rec.on}, err
		}
		ropt.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			return countConn{c, &tr.rdWrites, &tr.rec.on}, err
		}
	}
	n.pool = testenv.Pool(b, cfg)
	n.rdb = redis.NewClient(ropt)
	b.Cleanup(func() { n.rdb.Close() })
	if tr != nil {
		n.rdb.AddHook(tr.rec)
	}
	ctx := context.Background()
	if err := n.rdb.Ping(ctx).Err(); err != nil {
		testenv.Unavailable(b, "Redis", err)
	}

	n.bus, err = invalidate.NewPubSub(n.rdb, &invalidate.PubSubOptions{Channel: e.prefix + "invalidations"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.bus.Close() })
	n.locks, err = lockguard.New(n.rdb, &lockguard.Options{Prefix: e.prefix + "lock:", TTL: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.locks.Close() })
	n.s, err = New(n.pool, &Options{Schema: e.schema, Locks: n.locks, Publisher: n.bus})
	if err != nil {
		b.Fatal(err)
	}
	n.c, err = cache.New("items", 1000, e.loader(n.pool), &cache.Options[string, item]{
		Bus:     n.bus,
		Version: func(it item) int64 { return it.Version },
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.c.Close() }) // runs before the bus's Close

	// The raw PUBLISH goes to a channel with one subscriber that drains
	// it, as the bus's channel has one: the bus's own connection.
	ps := n.rdb.Subscribe(ctx, n.rawChannel)
	if _, err := ps.Receive(ctx); err != nil { // the confirmation
		b.Fatal(err)
	}
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		for {
			if _, err := ps.Receive(context.Background()); err != nil {
				return
			}
		}
	}()
	b.Cleanup(func() { ps.Close(); <-drained })
	if err := rawRelease.Load(ctx, n.rdb).Err(); err != nil {
		b.Fatal(err)
	}
	// The bus subscribes and proves its link in the background; start
	// measuring once it has, so that no write races the subscription.
	waitFor(b, "the bus's first proof", func() bool { return n.bus.Stats().Proofs > 0 })
	return n
}

// seed inserts the rows keys(prefix) at version 1.
func (e *env) seed(b *testing.B, table, prefix string) {
	b.Helper()
	_, err := e.pool.Exec(context.Background(), `INSERT INTO `+table+` (id, value, version)
		SELECT $1 || g, '0', 1 FROM generate_series(0, $2 - 1) g`, prefix, benchKeys)
	if err != nil {
		b.Fatal(err)
	}
}

// benchKey is the i-th key of prefix's rotating set.
func benchKey(prefix string, i int) string { return prefix + strconv.Itoa(i%benchKeys) }

// putIf is a TxFunc for an optimistic write: it sets id's value if the row
// is still at version, and reports a conflict otherwise.
func (e *env) putIf(id, value string, version int64) TxFunc[item] {
	return func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		rows, _ := tx.Query(ctx, `
			UPDATE `+e.table+` SET value = $2, version = version + 1
			WHERE id = $1 AND version = $3
			RETURNING id, value, version`, id, value, version)
		it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[item])
		if errors.Is(err, pgx.ErrNoRows) {
			err = fmt.Errorf("%w: %s is no longer at version %d", ErrConflict, id, version)
		}
		return cache.Change[item]{Value: it, Version: it.Version}, err
	}
}

// rawRelease is the compare-and-delete of the raw recipe, the same as
// lockguard's raw baseline.
var rawRelease = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('DEL', KEYS[1])
end
return 0
`)

// rawParts are the durations of one raw write's parts.
type rawParts struct {
	lock, begin, insert, commit, publish, unlock time.Duration
}

func (p rawParts) tx() time.Duration { return p.begin + p.insert + p.commit }

func (p rawParts) total() time.Duration { return p.lock + p.tx() + p.publish + p.unlock }

// rawWrite does by hand what Update does for key, with nothing but the
// round trips a hand-written lock-guarded write needs: SET NX PX; the
// user function's transaction (BEGIN; INSERT ... ON CONFLICT ...
// RETURNING; COMMIT); one PUBLISH of a message like the bus's; and the
// compare-and-delete release by EVALSHA.
func (n *benchNode) rawWrite(ctx context.Context, key, value string, seq uint64, buf []byte) (rawParts, []byte, error) {
	var p rawParts
	lockKey := n.rawLock + key
	token := crand.Text()

	t0 := time.Now()
	ok, err := n.rdb.Do(ctx, "set", lockKey, token, "nx", "px", 5000).Text()
	if err != nil && !errors.Is(err, redis.Nil) {
		return p, buf, err
	}
	if ok != "OK" {
		return p, buf, fmt.Errorf("raw lock %s taken", lockKey)
	}
	t1 := time.Now()
	tx, err := n.pool.Begin(ctx)
	if err != nil {
		return p, buf, err
	}
	t2 := time.Now()
	ch, err := n.e.put(key, value)(ctx, tx)
	if err != nil {
		tx.Rollback(ctx)
		return p, buf, err
	}
	t3 := time.Now()
	if err := tx.Commit(ctx); err != nil {
		return p, buf, err
	}
	t4 := time.Now()
	buf = appendBusMessage(buf[:0], "items", seq, key, ch.Version)
	if err := n.rdb.Publish(ctx, n.rawChannel, buf).Err(); err != nil {
		return p, buf, err
	}
	t5 := time.Now()
	released, err := rawRelease.Run(ctx, n.rdb, []string{lockKey}, token).Int64()
	if err != nil {
		return p, buf, err
	}
	if released != 1 {
		return p, buf, fmt.Errorf("raw lock %s lost", lockKey)
	}
	t6 := time.Now()
	p = rawParts{lock: t1.Sub(t0), begin: t2.Sub(t1), insert: t3.Sub(t2), commit: t4.Sub(t3), publish: t5.Sub(t4), unlock: t6.Sub(t5)}
	return p, buf, nil
}

// benchOrigin is the origin of the raw path's messages.
var benchOrigin = [16]byte{'b', 'e', 'n', 'c', 'h'}

// appendBusMessage appends a version 1 bus message carrying one key, laid
// out as package invalidate documents it, so that the raw PUBLISH carries
// as many bytes as the bus's.
func appendBusMessage(dst []byte, ns string, seq uint64, key string, version int64) []byte {
	dst = append(dst, 0xC0, 1, 1)
	dst = binary.AppendUvarint(dst, uint64(len(ns)))
	dst = append(dst, ns...)
	dst = append(dst, benchOrigin[:]...)
	dst = binary.AppendUvarint(dst, seq)
	dst = binary.AppendUvarint(dst, 1)
	dst = binary.AppendUvarint(dst, uint64(len(key)))
	dst = append(dst, key...)
	return binary.AppendVarint(dst, version)
}

// percentile returns the p-th quantile of sorted.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

func µs(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// reportLatency sorts lat and reports its p50 and p99 in µs, under prefix.
func reportLatency(b *testing.B, prefix string, lat []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(lat)
	p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
	b.ReportMetric(µs(p50), prefix+"p50-µs")
	b.ReportMetric(µs(p99), prefix+"p99-µs")
	return p50, p99
}

// reportP50 sorts lat and reports its p50 in µs as unit.
func reportP50(b *testing.B, unit string, lat []time.Duration) time.Duration {
	slices.Sort(lat)
	p50 := percentile(lat, 0.50)
	b.ReportMetric(µs(p50), unit)
	return p50
}

// rawLatencies collects the parts of raw writes.
type rawLatencies struct {
	total, lock, begin, insert, commit, tx, publish, unlock []time.Duration
}

func (l *rawLatencies) add(p rawParts) {
	l.total = append(l.total, p.total())
	l.lock = append(l.lock, p.lock)
	l.begin = append(l.begin, p.begin)
	l.insert = append(l.insert, p.insert)
	l.commit = append(l.commit, p.commit)
	l.tx = append(l.tx, p.tx())
	l.publish = append(l.publish, p.publish)
	l.unlock = append(l.unlock, p.unlock)
}

// reportParts reports the p50 of each part, and returns their sum.
func (l *rawLatencies) reportParts(b *testing.B) time.Duration {
	var sum time.Duration
	sum += reportP50(b, "raw-lock-p50-µs", l.lock)
	reportP50(b, "raw-begin-p50-µs", l.begin)
	reportP50(b, "raw-insert-p50-µs", l.insert)
	reportP50(b, "raw-commit-p50-µs", l.commit)
	sum += reportP50(b, "raw-tx-p50-µs", l.tx)
	sum += reportP50(b, "raw-publish-p50-µs", l.publish)
	sum += reportP50(b, "raw-unlock-p50-µs", l.unlock)
	return sum
}

// countConn counts the writes on a socket while on is set: each is one
// message (or pipeline) sent, so one round trip for a client that waits
// for every reply, as pgx and go-redis do outside pipelines.
type countConn struct {
	net.Conn
	n  *atomic.Int64
	on *atomic.Bool
}

func (c countConn) Write(p []byte) (int, error) {
	if c.on.Load() {
		c.n.Add(1)
	}
	return c.Conn.Write(p)
}

// rtRecorder names and times the round trips of a node while on is set: it
// is a pgx QueryTracer (every Exec, Query and QueryRow, begin and commit
// included) and a go-redis hook (every command, scripts included).
type rtRecorder struct {
	on atomic.Bool
	op atomic.Int64 // the iteration under way

	mu     sync.Mutex
	events []rtEvent
}

type rtEvent struct {
	op         int64
	system     string // "pg" or "redis"
	label      string
	start, end time.Time
}

type rtStartKey struct{}

func (r *rtRecorder) record(system, label string, start time.Time) {
	if !r.on.Load() {
		return
	}
	ev := rtEvent{op: r.op.Load(), system: system, label: label, start: start, end: time.Now()}
	r.mu.Lock()
	r.events = append(r.events, ev)
	r.mu.Unlock()
}

func (r *rtRecorder) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	return context.WithValue(ctx, rtStartKey{}, rtStart{time.Now(), pgLabel(data.SQL)})
}

func (r *rtRecorder) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	if s, ok := ctx.Value(rtStartKey{}).(rtStart); ok {
		r.record("pg", s.label, s.t)
	}
}

type rtStart struct {
	t     time.Time
	label string
}

// pgLabel names a statement of the write path; the names are short,
// since they become metric units.
func pgLabel(sql string) string {
	s := strings.Join(strings.Fields(sql), " ")
	switch {
	case s == "begin" || s == "commit" || s == "rollback":
		return "pg-" + s
	case strings.HasPrefix(s, "BEGIN;") && strings.Contains(s, ".fence("):
		return "pg-begin+fence"
	case strings.HasPrefix(s, "BEGIN;"):
		return "pg-begin+skip"
	case strings.HasPrefix(s, "PREPARE"):
		return "pg-prepare"
	case strings.Contains(s, "WITH f AS"):
		return "pg-fence"
	case strings.Contains(s, "set_config") && !strings.Contains(s, "DELETE"):
		return "pg-set_config"
	case strings.Contains(s, "outbox_put"):
		return "pg-outbox_put"
	case strings.Contains(s, "unnest"):
		return "pg-confirm-async"
	case strings.HasPrefix(s, "DELETE FROM") && strings.Contains(s, "outbox"):
		return "pg-confirm"
	case strings.HasPrefix(s, "INSERT INTO") || strings.HasPrefix(s, "UPDATE"):
		return "pg-fn"
	}
	return "pg-other"
}

// rtNames describe the labels in the logged sequence of a write.
var rtNames = map[string]string{
	"pg-begin":           "BEGIN",
	"pg-begin+fence":     "BEGIN; SET LOCAL skip; SELECT fence(…) (one simple query)",
	"pg-begin+skip":      "BEGIN; SET LOCAL skip (one simple query)",
	"pg-fence":           "fence + set_config (one SELECT)",
	"pg-set_config":      "set_config (SELECT)",
	"pg-fn":              "the user function's statement",
	"pg-outbox_put":      "outbox_put (SELECT)",
	"pg-commit":          "COMMIT (WAL flush)",
	"pg-confirm":         "confirm: DELETE the outbox row (autocommit, WAL flush)",
	"pg-batch":           "pipeline: outbox upsert + COMMIT (WAL flush)",
	"pg-confirm-async":   "confirm, batched, off the path (no WAL flush wait)",
	"rd-acquire":         "EVALSHA acquire (EXISTS, INCR, SET NX PX)",
	"rd-release":         "EVALSHA release (GET, DEL)",
	"rd-publish":         "EVALSHA publish (the bus's PUBLISH)",
	"rd-publish+release": "pipeline: EVALSHA publish + EVALSHA release",
	"rd-set":             "SET NX PX",
	"rd-rawpublish":      "PUBLISH",
	"rd-rawrelease":      "EVALSHA compare-and-delete",
}

func (r *rtRecorder) DialHook(next redis.DialHook) redis.DialHook { return next }

func (r *rtRecorder) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmd)
		r.record("redis", redisLabel(cmd.Args()), start)
		return err
	}
}

func (r *rtRecorder) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmds)
		label := "rd-pipeline"
		if len(cmds) == 2 && redisLabel(cmds[0].Args()) == "rd-publish" && redisLabel(cmds[1].Args()) == "rd-release" {
			label = "rd-publish+release"
		}
		r.record("redis", label, start)
		return err
	}
}

// redisLabel names a command by what it does for the write path; scripts
// are told apart by their number of keys and their first key.
func redisLabel(args []any) string {
	name := strings.ToLower(fmt.Sprint(args[0]))
	switch name {
	case "set":
		return "rd-set"
	case "publish":
		return "rd-rawpublish"
	case "evalsha", "eval":
	default:
		return "rd-" + name
	}
	if len(args) < 4 {
		return "rd-" + name
	}
	key := fmt.Sprint(args[3])
	switch fmt.Sprint(args[2]) {
	case "3":
		return "rd-acquire"
	case "2":
		return "rd-release"
	case "1":
		switch {
		case strings.Contains(key, ":proof:"):
			return "rd-probe"
		case strings.Contains(key, "raw:"):
			return "rd-rawrelease"
		default:
			return "rd-publish"
		}
	}
	return "rd-" + name
}

// background reports whether ev is not part of a write: the bus's probes.
func (ev rtEvent) background() bool { return ev.label == "rd-probe" }

func (r *rtRecorder) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	return context.WithValue(ctx, rtStartKey{}, rtStart{time.Now(), "pg-batch"})
}

func (r *rtRecorder) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}

func (r *rtRecorder) TraceBatchEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchEndData) {
	if s, ok := ctx.Value(rtStartKey{}).(rtStart); ok {
		r.record("pg", s.label, s.t)
	}
}

// offPath reports whether label is a round trip that no write waits for.
func offPath(label string) bool { return strings.HasSuffix(label, "-async") }
