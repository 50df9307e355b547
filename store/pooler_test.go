package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
)

// TestThroughPooler runs the store's tests of the write path, optimistic
// writes, the relay, capture, Migrate, the loaders and Replica through
// pgbouncer in transaction mode (pool_mode = transaction, no prepared
// statement support), with each of pgx's exec modes that keep no prepared
// statement across round trips: exec, cache_describe and simple_protocol.
// It guards against statements that need a session: a prepared statement
// or a session-level SET reused by a later transaction, a lock or setting
// outside a transaction, a parameter whose type only a prepared
// statement's description would tell. (With the default, cache_statement,
// nearly every test fails: "prepared statement already exists"; and
// describe_exec loses its unnamed statement between its two round trips
// outside a transaction.) The relays LISTEN straight on the primary
// (ListenConfig), as a pooled deployment must configure them;
// TestRelayBehindAPoolerPolls covers a relay that does not.
//
// All of the test's SQL goes through the pooler, which routes every
// database to the primary, the schema set-up and the outside writes
// included.
func TestThroughPooler(t *testing.T) {
	pooler, primary := testenv.PoolerURL(t)
	for _, mode := range []string{"exec", "cache_describe", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			useURL(t, testenv.WithParam(t, pooler, "default_query_exec_mode", mode))
			useListenURL(t, primary)
			for _, tc := range poolerTests {
				t.Run(tc.name, tc.test)
			}
		})
	}
}

// poolerTests are the tests TestThroughPooler runs. Left out:
//
//   - TestListenBackoffResets and TestPostgresConnectionsKilled terminate
//     backends found by application_name; behind the pooler a server
//     connection carries the name of whichever client used it last, and
//     serves every test's pools, so they would kill connections of
//     others and miss their own. The pooler does not change what they
//     guard (the relay's reconnect backoff, a write's error when its
//     connection dies).
//   - TestCommitOfUnknownOutcome connects through a fault proxy in front
//     of DATABASE_URL's server, not the pooler's: its env and its store
//     would be on different servers.
//   - TestBadOptions checks arguments only.
var poolerTests = []struct {
	name string
	test func(*testing.T)
}{
	{"MigrateIsIdempotentAndSafeConcurrently", TestMigrateIsIdempotentAndSafeConcurrently},
	{"MigrationKeepsCapturedTables", TestMigrationKeepsCapturedTables},
	{"WriteThroughReachesEveryNode", TestWriteThroughReachesEveryNode},
	{"DeleteThroughUpdate", TestDeleteThroughUpdate},
	{"NoLostUpdatesUnderTheLock", TestNoLostUpdatesUnderTheLock},
	{"NoLostUpdatesOptimistic", TestNoLostUpdatesOptimistic},
	{"FencingRejectsAStalledHolder", TestFencingRejectsAStalledHolder},
	{"FenceHealsACounterThatWentBackwards", TestFenceHealsACounterThatWentBackwards},
	{"FencedWriteRoundTrips", TestFencedWriteRoundTrips},
	{"FenceRejectionKeepsTheConnection", TestFenceRejectionKeepsTheConnection},
	{"FenceLocksBeforeTheBody", TestFenceLocksBeforeTheBody},
	{"LockLostMidTransaction", TestLockLostMidTransaction},
	{"CrashBetweenCommitAndPublish", TestCrashBetweenCommitAndPublish},
	{"PublishFailureAfterCommit", TestPublishFailureAfterCommit},
	{"OutboxStaysBoundedWhileTheBusIsDown", TestOutboxStaysBoundedWhileTheBusIsDown},
	{"RelayPublishesCapturedWrites", TestRelayPublishesCapturedWrites},
	{"StoreWritesSkipCapture", TestStoreWritesSkipCapture},
	{"ConfirmationsWhileTheRelayRuns", TestConfirmationsWhileTheRelayRuns},
	{"CaptureRejectsUnknownColumns", TestCaptureRejectsUnknownColumns},
	{"HostileKeys", TestHostileKeys},
	{"DeadlockIsAConflict", TestDeadlockIsAConflict},
	{"Tracer", TestTracer},
	{"PublishOutlivesTheCallersContext", TestPublishOutlivesTheCallersContext},
	{"FailedFnIsAFailedWrite", TestFailedFnIsAFailedWrite},
	{"CaptureInsideStoreTransactions", TestCaptureInsideStoreTransactions},
	{"CaptureKeysAreTheColumnTextForm", TestCaptureKeysAreTheColumnTextForm},
	{"RelayWithASilentLinkHoldsNoRows", TestRelayWithASilentLinkHoldsNoRows},
	{"PoisonRowsDoNotWedgeTheRelay", TestPoisonRowsDoNotWedgeTheRelay},
	{"FailedPublishMakesTheRowDueAtOnce", TestFailedPublishMakesTheRowDueAtOnce},
	{"FailedRelayHandsRowsBack", TestFailedRelayHandsRowsBack},
	{"WritesCarryTheirPosition", TestWritesCarryTheirPosition},
	{"CaptureWritesOfARestrictedRole", TestCaptureWritesOfARestrictedRole},
	{"CaptureDoesNotQueueBehindLongWrites", TestCaptureDoesNotQueueBehindLongWrites},
	{"CaptureFailsClearlyOrFlushes", TestCaptureFailsClearlyOrFlushes},
	{"ReplicaLoaderRoutes", TestReplicaLoaderRoutes},
	{"Loaders", testLoaders},
}

// TestRelayBehindAPoolerPolls guards the relay behind a pooler in
// transaction mode without Options.ListenConfig: its LISTEN runs on a
// server connection that the pooler hands to other clients, so no
// notification reaches it, silently. The relay must notice (its probe
// does not arrive), say so once in a warning, report it in
// Stats.RelayListening, keep relaying by polling every RelayPoll, and
// probe again later without repeating the warning. Without the probe it
// reported nothing and relied on a LISTEN that never woke it.
func TestRelayBehindAPoolerPolls(t *testing.T) {
	pooler, _ := testenv.PoolerURL(t)
	useURL(t, testenv.WithParam(t, pooler, "default_query_exec_mode", "exec"))
	e := newEnv(t)
	ctx := context.Background()
	logs := &logRecorder{}
	s := e.store(&Options{RelayPoll: 200 * time.Millisecond, Logger: slog.New(logs)})
	s.probeWait, s.listenRecheck = 500*time.Millisecond, 50*time.Millisecond
	e.captureItems(t, s)
	reader := e.node(s)
	if _, err := reader.Get(ctx, "k"); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("Get(k) = %v; want a cached ErrNotFound", err)
	}
	runRelay(t, s)
	waitFor(t, "the relay's warning", func() bool { return logs.count(slog.LevelWarn, pollingLine) > 0 })
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'v', 1)`)
	waitFor(t, "the polling relay to publish the outside write", func() bool {
		it, err := reader.Get(ctx, "k")
		return err == nil && it.Value == "v"
	})
	waitFor(t, "the relay to probe again", func() bool { return s.probes.Load() >= 3 })
	if n := logs.count(slog.LevelWarn, pollingLine); n != 1 {
		t.Errorf("the warning was logged %d times after %d probes; want once", n, s.probes.Load())
	}
	if s.Stats().RelayListening {
		t.Error("Stats().RelayListening = true behind a pooler in transaction mode; want false")
	}
}

// pollingLine is the start of the relay's warning when its probe does
// not arrive.
const pollingLine = "store: notifications do not reach the relay's LISTEN"

// TestRelayBehindAPoolerListensWithListenConfig guards
// Options.ListenConfig: with the pool behind a pooler in transaction mode
// and a LISTEN connection straight to the primary, notifications wake the
// relay, so a captured outside write is relayed long before RelayPoll (a
// minute here). Without ListenConfig (the relay LISTENing through the
// pool) the write waits for the poll and the test times out.
func TestRelayBehindAPoolerListensWithListenConfig(t *testing.T) {
	pooler, primary := testenv.PoolerURL(t)
	useURL(t, testenv.WithParam(t, pooler, "default_query_exec_mode", "exec"))
	e := newEnv(t)
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(primary)
	if err != nil {
		t.Fatal(err)
	}
	logs := &logRecorder{}
	s := e.store(&Options{RelayPoll: time.Minute, ListenConfig: cfg, Logger: slog.New(logs)})
	e.captureItems(t, s)
	reader := e.node(s)
	if _, err := reader.Get(ctx, "k"); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("Get(k) = %v; want a cached ErrNotFound", err)
	}
	runRelay(t, s)
	waitFor(t, "Stats().RelayListening", func() bool { return s.Stats().RelayListening })
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'v', 1)`)
	waitFor(t, "the notified relay to publish the outside write", func() bool {
		it, err := reader.Get(ctx, "k")
		return err == nil && it.Value == "v"
	})
	if n := logs.count(slog.LevelWarn, ""); n != 0 {
		t.Errorf("%d warnings logged; want none: %q", n, logs.all())
	}
}

// TestRelayIgnoresOtherRelaysProbes: every relay's probe reaches every
// listener of the channel; a listener must not take another relay's probe
// for an outbox notification, or each relay's start and recheck would
// wake every other relay for a round that finds nothing. (Directly on
// DATABASE_URL, where notifications arrive.)
func TestRelayIgnoresOtherRelaysProbes(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	s := e.store(nil)
	wake := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.listen(ctx, wake)
	}()
	t.Cleanup(func() { cancel(); <-done })
	waitFor(t, "the listener's probe", func() bool { return s.Stats().RelayListening })
	select {
	case <-wake: // the wake-up after LISTEN
	default:
	}
	channel := e.schema + ".outbox"
	if _, err := e.pool.Exec(ctx, `SELECT pg_notify($1::text, $2::text)`, channel, probePrefix+"another relay's"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the other relay's probe to arrive", func() bool { return s.foreignProbes.Load() == 1 })
	if len(wake) != 0 {
		t.Error("another relay's probe woke the relay")
	}
	// The outbox's own notifications still wake it.
	if _, err := e.pool.Exec(ctx, `SELECT pg_notify($1::text, '')`, channel); err != nil {
		t.Fatal(err)
	}
	select {
	case <-wake:
	case <-time.After(10 * time.Second):
		t.Fatal("an outbox notification did not wake the relay")
	}
}

// TestMigrateThroughAPoolerConcurrently guards Migrate behind a pooler in
// transaction mode, run by several nodes at once: the advisory lock that
// serialises them must be held by the transaction that migrates (a
// session lock taken in a statement of its own would stay on a server
// connection the pooler hands to others). Without any lock, concurrent
// CREATE TABLE IF NOT EXISTS and the inserts into migrations collide.
func TestMigrateThroughAPoolerConcurrently(t *testing.T) {
	pooler, _ := testenv.PoolerURL(t)
	u := testenv.WithParam(t, pooler, "default_query_exec_mode", "exec")
	schema := testenv.Name("coh_test_")
	var pools []*pgxpool.Pool
	for i := range 4 {
		pools = append(pools, testenv.Pool(t, testenv.PoolConfigFor(t, u, fmt.Sprint("coh_test_migrate", i), "")))
	}
	t.Cleanup(func() {
		pools[0].Exec(context.Background(), `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`)
	})
	ctx := context.Background()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for _, pool := range pools {
		for range 2 {
			wg.Go(func() {
				<-start
				if err := Migrate(ctx, pool, schema); err != nil {
					t.Errorf("concurrent Migrate through the pooler: %v", err)
				}
			})
		}
	}
	close(start)
	wg.Wait()
	var n int
	if err := pools[0].QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{schema}.Sanitize()+`.migrations`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if want := len(mustMigrations(t, schema)); n != want {
		t.Errorf("recorded migrations = %d; want %d", n, want)
	}
}

// testLoaders runs Loader and LoaderMany, with text and bigint keys: in
// pgx's exec and simple-protocol modes the server infers the type of each
// parameter from the query (text encoded), so a key must compare
// correctly with the column without a cast.
func testLoaders(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('a', 'x', 1), ('b', 'y', 2)`)
	load := e.loader(e.pool)
	if it, err := load(ctx, "a"); err != nil || it.Value != "x" {
		t.Errorf("Loader(a) = %+v, %v; want x", it, err)
	}
	if _, err := load(ctx, "missing"); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("Loader(missing) = %v; want cache.ErrNotFound", err)
	}
	many := LoaderMany(e.pool, `SELECT id, value, version FROM `+e.table+` WHERE id = ANY($1)`,
		pgx.RowToStructByName[item], func(it item) string { return it.ID })
	if m, err := many(ctx, []string{"a", "b", "missing"}); err != nil || len(m) != 2 || m["b"].Value != "y" {
		t.Errorf("LoaderMany(a, b, missing) = %+v, %v; want a and b", m, err)
	}
	nums := pgx.Identifier{e.schema, "nums"}.Sanitize()
	e.outsideWrite(t, `CREATE TABLE `+nums+` (id bigint PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`)
	e.outsideWrite(t, `INSERT INTO `+nums+` VALUES (1, 'one', 1), (20, 'twenty', 1)`)
	type num struct {
		ID      int64  `db:"id"`
		Value   string `db:"value"`
		Version int64  `db:"version"`
	}
	if it, err := Loader[int64](e.pool, `SELECT id, value, version FROM `+nums+` WHERE id = $1`, pgx.RowToStructByName[num])(ctx, 20); err != nil || it.Value != "twenty" {
		t.Errorf("Loader(20) = %+v, %v; want twenty", it, err)
	}
	m, err := LoaderMany(e.pool, `SELECT id, value, version FROM `+nums+` WHERE id = ANY($1)`,
		pgx.RowToStructByName[num], func(n num) int64 { return n.ID })(ctx, []int64{1, 20, 300})
	if err != nil || len(m) != 2 || m[1].Value != "one" {
		t.Errorf("LoaderMany(1, 20, 300) = %+v, %v; want 1 and 20", m, err)
	}
}

// logRecorder is a slog.Handler that keeps the level and message of every
// record.
type logRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *logRecorder) WithGroup(string) slog.Handler            { return r }

func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, rec.Clone())
	return nil
}

// count returns how many records of level start with prefix.
func (r *logRecorder) count(level slog.Level, prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, rec := range r.records {
		if rec.Level == level && strings.HasPrefix(rec.Message, prefix) {
			n++
		}
	}
	return n
}

func (r *logRecorder) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ms []string
	for _, rec := range r.records {
		ms = append(ms, rec.Level.String()+" "+rec.Message)
	}
	return ms
}

// TestPreparedStatementErrorsNameTheFix: behind a pooler in transaction
// mode, pgx's default exec mode fails with "prepared statement ... already
// exists" or "... does not exist", which says nothing of the cause; the
// store's errors add what to configure, and keep the original in the
// chain. (A unit test: whether the default mode fails at once through
// the pooler depends on which server connections the pooler hands out.)
func TestPreparedStatementErrorsNameTheFix(t *testing.T) {
	for _, code := range []string{"26000", "42P05"} {
		pgErr := &pgconn.PgError{Code: code, Message: `prepared statement "stmtcache_1" does not exist`}
		err := translate(fmt.Errorf("query: %w", pgErr))
		if !strings.Contains(err.Error(), "default_query_exec_mode=exec") {
			t.Errorf("translate(SQLSTATE %s) = %v; want the fix named", code, err)
		}
		if got := (*pgconn.PgError)(nil); !errors.As(err, &got) || got != pgErr {
			t.Errorf("translate(SQLSTATE %s) lost the PgError: %v", code, err)
		}
	}
	if err := translate(&pgconn.PgError{Code: "23505"}); strings.Contains(err.Error(), "pooler") {
		t.Errorf("translate(unique_violation) = %v; want no pooler hint", err)
	}
}
