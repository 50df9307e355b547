package store

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/lockguard"
)

func TestMigrateIsIdempotentAndSafeConcurrently(t *testing.T) {
	pool := newPool(t, "coh_test_migrate")
	schema := testenv.Name("coh_test_")
	t.Cleanup(func() {
		pool.Exec(context.Background(), `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`)
	})
	ctx := context.Background()
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			if err := Migrate(ctx, pool, schema); err != nil {
				t.Errorf("concurrent Migrate: %v", err)
			}
		})
	}
	wg.Wait()
	if err := Migrate(ctx, pool, schema); err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	var n int
	pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{schema}.Sanitize()+`.migrations`).Scan(&n)
	if want := len(mustMigrations(t, schema)); n != want {
		t.Errorf("recorded migrations = %d; want %d", n, want)
	}
}

// TestMigrationKeepsCapturedTables: a table captured before migration 0002
// (one generic trigger function that read the row as JSON) keeps its
// triggers through the migration, which takes no lock on it, and already
// records text-form keys; Capture then moves it to a function of its own.
func TestMigrationKeepsCapturedTables(t *testing.T) {
	pool := newPool(t, "coh_test_migrate")
	schema := testenv.Name("coh_test_")
	ident := pgx.Identifier{schema}.Sanitize()
	t.Cleanup(func() { pool.Exec(context.Background(), `DROP SCHEMA IF EXISTS `+ident+` CASCADE`) })
	ctx := context.Background()
	first := mustMigrations(t, schema)[0]
	for _, sql := range []string{
		`CREATE SCHEMA ` + ident,
		`CREATE TABLE ` + ident + `.migrations (version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`,
		first.sql,
		`INSERT INTO ` + ident + `.migrations (version, name) VALUES (1, '` + first.name + `')`,
		`CREATE TABLE ` + ident + `.events (at timestamp PRIMARY KEY, version bigint NOT NULL)`,
		`SELECT ` + ident + `.install_capture('` + schema + `.events', 'events', 'at', 'version')`,
		`INSERT INTO ` + ident + `.events VALUES ('2024-01-01 00:00:00', 1)`,
		`TRUNCATE ` + ident + `.events`, // an empty key, in the first form
	} {
		if _, err := pool.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	if err := Migrate(ctx, pool, schema); err != nil {
		t.Fatal(err)
	}
	var pendingFlush bool
	if err := pool.QueryRow(ctx, `SELECT flush FROM `+ident+`.outbox WHERE key = ''`).Scan(&pendingFlush); err != nil || !pendingFlush {
		t.Errorf("a pending TRUNCATE after the migration: flush = %v, %v; want true", pendingFlush, err)
	}
	rowTrigger := func() string {
		var fn string
		pool.QueryRow(ctx, `SELECT tgfoid::regproc::text FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal AND tgtype & 4 = 4`,
			schema+".events").Scan(&fn)
		return fn
	}
	captured := func(when string, version int64) {
		t.Helper()
		if _, err := pool.Exec(ctx, `DELETE FROM `+ident+`.outbox`); err != nil {
			t.Fatal(err)
		}
		if _, err := pool.Exec(ctx, `INSERT INTO `+ident+`.events VALUES ('2024-01-02 03:04:05', $1)`, version); err != nil {
			t.Fatal(err)
		}
		var key string
		var got int64
		if err := pool.QueryRow(ctx, `SELECT convert_from(key, 'UTF8'), version FROM `+ident+`.outbox`).Scan(&key, &got); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if key != "2024-01-02 03:04:05" || got != version {
			t.Errorf("captured %s: key %q version %d; want 2024-01-02 03:04:05 at %d", when, key, got, version)
		}
		if _, err := pool.Exec(ctx, `DELETE FROM `+ident+`.events`); err != nil {
			t.Fatal(err)
		}
	}
	if fn := rowTrigger(); !strings.HasSuffix(fn, ".capture_changes") {
		t.Errorf("row trigger after the migration calls %s; want the first form's, untouched", fn)
	}
	captured("after the migration", 7)
	s, err := New(pool, &Options{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Capture(ctx, "events", &TableOptions{Table: schema + ".events", KeyColumn: "at", VersionColumn: "version"}); err != nil {
		t.Fatal(err)
	}
	if fn := rowTrigger(); !strings.Contains(fn, ".capture_") || strings.HasSuffix(fn, ".capture_changes") {
		t.Errorf("row trigger after Capture calls %s; want the table's own capture function", fn)
	}
	captured("after Capture", 8)
}

func mustMigrations(t *testing.T, schema string) []migration {
	ms, err := migrations(schema)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

func TestBadOptions(t *testing.T) {
	pool := newPool(t, "coh_test_opts")
	for _, schema := range []string{"Coherent", "a-b", `x"; DROP TABLE y; --`, strings.Repeat("a", 49)} {
		if err := Migrate(context.Background(), pool, schema); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("Migrate(schema %q) = %v; want ErrInvalidOptions", schema, err)
		}
		if _, err := New(pool, &Options{Schema: schema}); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("New(schema %q) = %v; want ErrInvalidOptions", schema, err)
		}
	}
	if _, err := New(nil, nil); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("New(nil pool) = %v; want ErrInvalidOptions", err)
	}
	if _, err := New(pool, &Options{ListenConfig: &pgx.ConnConfig{}}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("New(ListenConfig not from ParseConfig) = %v; want ErrInvalidOptions", err)
	}
	// One that names a host passes New, and pgx panics on it: the relay
	// must get an error instead.
	if _, err := connectListener(context.Background(), &pgx.ConnConfig{Config: pgconn.Config{Host: "127.0.0.1"}}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("connecting with a ListenConfig not from ParseConfig = %v; want ErrInvalidOptions", err)
	}
	if _, err := New(pool, &Options{Grace: -1}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("New(negative Grace) = %v; want ErrInvalidOptions", err)
	}
}

// TestWriteThroughReachesEveryNode: the writer's node installs the new row
// (G1) and the other nodes drop theirs (G2).
func TestWriteThroughReachesEveryNode(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s1, s2 := e.store(nil), e.store(nil)
	a, b := e.node(s1), e.node(s2)
	if _, err := NewTable(s1, a, nil).Update(ctx, "k", e.put("k", "one")); err != nil {
		t.Fatal(err)
	}
	if it, err := b.Get(ctx, "k"); err != nil || it.Value != "one" {
		t.Fatalf("b.Get = %v, %v; want one", it, err)
	}
	ch, err := NewTable(s1, a, nil).Update(ctx, "k", e.put("k", "two"))
	if err != nil || ch.Value.Value != "two" || ch.Version != 2 {
		t.Fatalf("Update = %+v, %v; want value two at version 2", ch, err)
	}
	loads := a.Stats().Loads
	if it, _ := a.Get(ctx, "k"); it.Value != "two" || a.Stats().Loads != loads {
		t.Errorf("a.Get = %v; want two installed by the write (no load)", it)
	}
	if it, _ := b.Get(ctx, "k"); it.Value != "two" {
		t.Errorf("b.Get = %v; want two", it)
	}
	if n, _ := s1.Pending(ctx); n != 0 {
		t.Errorf("outbox rows after confirmed writes = %d; want 0", n)
	}
}

func TestDeleteThroughUpdate(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	a, b := e.node(s), e.node(s)
	NewTable(s, a, nil).Update(ctx, "k", e.put("k", "v"))
	b.Get(ctx, "k")
	_, err := NewTable(s, a, nil).Update(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		var v int64
		err := tx.QueryRow(ctx, `DELETE FROM `+e.table+` WHERE id = $1 RETURNING version + 1`, "k").Scan(&v)
		return cache.Change[item]{Version: v, Deleted: true}, err
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]*cache.Cache[string, item]{"a": a, "b": b} {
		if _, err := c.Get(ctx, "k"); !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("%s.Get after delete = %v; want ErrNotFound", name, err)
		}
	}
}

// TestNoLostUpdatesUnderTheLock: nodes read-modify-write one counter
// through the lock guard; every increment survives (G6).
func TestNoLostUpdatesUnderTheLock(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	const nodes, workers, adds = 3, 4, 25
	var wg sync.WaitGroup
	caches := make([]*cache.Cache[string, item], nodes)
	for n := range nodes {
		s := e.store(nil)
		c := e.node(s)
		caches[n] = c
		for range workers {
			wg.Go(func() {
				for range adds {
					if _, err := NewTable(s, c, nil).Update(ctx, "counter", e.add("counter", 1)); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	want := fmt.Sprint(nodes * workers * adds)
	if it, _ := e.read("counter"); it.Value != want {
		t.Fatalf("counter = %s; want %s", it.Value, want)
	}
	for n, c := range caches {
		if it, err := c.Get(ctx, "counter"); err != nil || it.Value != want {
			t.Errorf("node %d Get = %v, %v; want %s", n, it, err, want)
		}
	}
}

// TestNoLostUpdatesOptimistic: the same without the lock, with a version
// check and retries.
func TestNoLostUpdatesOptimistic(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	if _, err := NewTable(s, e.node(s), nil).UpdateOptimistic(ctx, "counter", e.put("counter", "0")); err != nil {
		t.Fatal(err)
	}
	casAdd := func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		var cur item
		if err := tx.QueryRow(ctx, `SELECT id, value, version FROM `+e.table+` WHERE id = 'counter'`).Scan(&cur.ID, &cur.Value, &cur.Version); err != nil {
			return cache.Change[item]{}, err
		}
		var n int
		fmt.Sscan(cur.Value, &n)
		next := item{ID: cur.ID, Value: fmt.Sprint(n + 1), Version: cur.Version + 1}
		tag, err := tx.Exec(ctx, `UPDATE `+e.table+` SET value = $1, version = $2 WHERE id = 'counter' AND version = $3`,
			next.Value, next.Version, cur.Version)
		if err == nil {
			err = ExpectRows(tag, 1)
		}
		return cache.Change[item]{Value: next, Version: next.Version}, err
	}
	const nodes, workers, adds = 3, 3, 15
	var conflicts atomic.Int64
	var wg sync.WaitGroup
	for range nodes {
		s := e.store(nil)
		c := e.node(s)
		for range workers {
			wg.Go(func() {
				for range adds {
					err := RetryConflicts(ctx, 1000, func(ctx context.Context) error {
						_, err := NewTable(s, c, nil).UpdateOptimistic(ctx, "counter", casAdd)
						if errors.Is(err, ErrConflict) {
							conflicts.Add(1)
						}
						return err
					})
					if err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	if it, _ := e.read("counter"); it.Value != fmt.Sprint(nodes*workers*adds) {
		t.Fatalf("counter = %s; want %d", it.Value, nodes*workers*adds)
	}
	t.Logf("%d conflicts retried", conflicts.Load())
}

// TestFencingRejectsAStalledHolder guards DESIGN race 6: holder A stalls
// past its lock's TTL, B acquires the lock and writes; A's commit is
// rejected with a *FenceError and the row keeps B's value. Without the
// fence (checked by making fence return nil) A's write overwrites B's.
func TestFencingRejectsAStalledHolder(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	shortLocks, err := lockguard.New(e.rdb, &lockguard.Options{Prefix: e.prefix, TTL: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { shortLocks.Close() })
	sA := e.store(&Options{Locks: shortLocks})
	sB := e.store(nil)
	a, b := e.node(sA), e.node(sB)
	name := lockName("items", "k")

	lockA, err := shortLocks.Acquire(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	// A stalls (a GC pause, say) until its lease has run out...
	waitFor(t, "A's lease to run out", func() bool { return expired(lockA) })
	// ...meanwhile B takes the lock and writes.
	if _, err := NewTable(sB, b, nil).Update(ctx, "k", e.put("k", "B")); err != nil {
		t.Fatal(err)
	}
	// A wakes up and commits under its stale lock.
	var ch cache.Change[item]
	committed, _, err := NewTable(sA, a, nil).txBody("k", "k", e.put("k", "A"), &ch)(ctx, lockA)
	var fe *FenceError
	if committed || !errors.As(err, &fe) || !errors.Is(err, ErrFenced) {
		t.Fatalf("stale holder's write: committed %v, err %v; want a *FenceError", committed, err)
	}
	if fe.Token >= fe.Stored {
		t.Errorf("FenceError %+v: want the stale token below the stored one", fe)
	}
	if it, _ := e.read("k"); it.Value != "B" {
		t.Errorf("row = %v; want B's value", it)
	}
	if it, _ := a.Get(ctx, "k"); it.Value != "B" {
		t.Errorf("A's cache after its rejected write = %v; want B's value", it)
	}
}

// expired reports whether l's lease has run out, as the lock itself sees it.
func expired(l *lockguard.Lock) bool {
	select {
	case <-l.Lost():
		return true
	default:
		return false
	}
}

// TestFenceHealsACounterThatWentBackwards: if Redis loses the fence counter
// (a restart without persistence), every token is below what Postgres
// stored; the store advances the counter so that writes resume.
func TestFenceHealsACounterThatWentBackwards(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	c := e.node(s)
	for range 3 {
		if _, err := NewTable(s, c, nil).Update(ctx, "k", e.put("k", "v")); err != nil {
			t.Fatal(err)
		}
	}
	keys, _ := e.rdb.Keys(ctx, e.prefix+"*").Result()
	e.rdb.Del(ctx, keys...) // the counter is gone
	_, err := NewTable(s, c, nil).Update(ctx, "k", e.put("k", "lost"))
	if !errors.Is(err, ErrFenced) {
		t.Fatalf("first write after the counter reset = %v; want ErrFenced", err)
	}
	if _, err := NewTable(s, c, nil).Update(ctx, "k", e.put("k", "healed")); err != nil {
		t.Fatalf("second write after the counter reset = %v; want success", err)
	}
	if it, _ := e.read("k"); it.Value != "healed" {
		t.Errorf("row = %v; want healed", it)
	}
}

// TestLockLostMidTransaction: a holder whose lease runs out while fn still
// runs has its context cancelled; nothing commits.
func TestLockLostMidTransaction(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	shortLocks, _ := lockguard.New(e.rdb, &lockguard.Options{Prefix: e.prefix, TTL: 100 * time.Millisecond})
	t.Cleanup(func() { shortLocks.Close() })
	s := e.store(&Options{Locks: shortLocks})
	c := e.node(s)
	_, err := NewTable(s, c, nil).Update(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		ch, err := e.put("k", "late")(ctx, tx)
		if err != nil {
			return ch, err
		}
		<-ctx.Done() // stall past the lease
		return ch, nil
	})
	if err == nil {
		t.Fatal("Update whose lock was lost mid-transaction succeeded")
	}
	if _, ok := e.read("k"); ok {
		t.Error("the write of a holder that lost its lock committed")
	}
}

// crashTracer is a CommitTracer that, when armed, stands for a process
// that dies right after a commit: it panics with errCrash.
type crashTracer struct{ armed atomic.Bool }

var errCrash = errors.New("crashed after commit")

func (c *crashTracer) TraceWriteStart(ctx context.Context, _ TraceWriteStartData) context.Context {
	return ctx
}
func (c *crashTracer) TraceWriteEnd(context.Context, TraceWriteEndData) {}
func (c *crashTracer) TraceCommit(context.Context, TraceCommitData) {
	if c.armed.Load() {
		panic(errCrash)
	}
}

// TestCrashBetweenCommitAndPublish guards DESIGN race 3: the writer commits
// and dies before publishing; the relay publishes from the outbox and every
// node converges. Without the outbox row (checked by removing the
// outbox_put call) the other node keeps the old value until TTL.
func TestCrashBetweenCommitAndPublish(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	crash := &crashTracer{}
	writer := e.store(&Options{Grace: time.Millisecond, Tracer: crash})
	other := e.store(&Options{Grace: time.Millisecond})
	a, b := e.node(writer), e.node(other)
	NewTable(writer, a, nil).Update(ctx, "k", e.put("k", "old"))
	if it, _ := b.Get(ctx, "k"); it.Value != "old" {
		t.Fatalf("b.Get = %v; want old", it)
	}

	// The writer dies right after its commit: the CommitTracer, the
	// documented place for that fault, panics, and nothing of the write
	// after it runs.
	crash.armed.Store(true)
	func() {
		defer func() {
			if r := recover(); r != errCrash {
				t.Fatalf("Update with a crash after commit: recovered %v; want the crash", r)
			}
		}()
		NewTable(writer, a, nil).Update(ctx, "k", e.put("k", "new"))
	}()
	crash.armed.Store(false)
	if it, _ := b.Get(ctx, "k"); it.Value != "old" {
		t.Fatalf("b.Get before the relay = %v; want old (nothing was published)", it)
	}
	waitFor(t, "the relay to publish", func() bool {
		n, err := other.RelayOnce(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n > 0
	})
	for name, c := range map[string]*cache.Cache[string, item]{"a": a, "b": b} {
		if it, _ := c.Get(ctx, "k"); it.Value != "new" {
			t.Errorf("%s.Get after the relay = %v; want new", name, it)
		}
	}
}

// TestPublishFailureAfterCommit (DESIGN fault 9): the bus refuses the
// invalidation after the commit. The write still succeeds, counted; the
// relay publishes once the bus is back.
func TestPublishFailureAfterCommit(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	bus := &failingBus{Bus: e.bus}
	s := e.store(&Options{Grace: time.Millisecond})
	newNode := func() *cache.Cache[string, item] {
		c, err := cache.New("items", 100, e.loader(s.pool), &cache.Options[string, item]{Bus: bus})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := newNode(), newNode()
	NewTable(s, a, nil).Update(ctx, "k", e.put("k", "old"))
	b.Get(ctx, "k")

	bus.setFail(errors.New("bus down"))
	e.pub.setFail(errors.New("bus down"))
	if _, err := NewTable(s, a, nil).Update(ctx, "k", e.put("k", "new")); err != nil {
		t.Fatalf("Update with the bus down = %v; want success (the outbox covers it)", err)
	}
	if st := s.Stats(); st.PublishFailures != 1 {
		t.Errorf("PublishFailures = %d; want 1", st.PublishFailures)
	}
	if it, _ := a.Get(ctx, "k"); it.Value != "new" {
		t.Errorf("writer's Get = %v; want new (G1 holds without the bus)", it)
	}
	time.Sleep(5 * time.Millisecond) // past Grace
	if _, err := s.RelayOnce(ctx); err == nil {
		t.Error("RelayOnce with the bus down succeeded")
	}
	if n, _ := s.Pending(ctx); n != 1 {
		t.Errorf("outbox rows while the bus is down = %d; want 1", n)
	}

	bus.setFail(nil)
	e.pub.setFail(nil)
	if n, err := s.RelayOnce(ctx); n != 1 || err != nil {
		t.Fatalf("RelayOnce after recovery = %d, %v; want 1 row", n, err)
	}
	if it, _ := b.Get(ctx, "k"); it.Value != "new" {
		t.Errorf("b.Get after the relay = %v; want new", it)
	}
}

// TestOutboxStaysBoundedWhileTheBusIsDown: many writes of few keys leave
// one outbox row per key.
func TestOutboxStaysBoundedWhileTheBusIsDown(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	e.pub.setFail(errors.New("bus down"))
	for i := range 50 {
		key := fmt.Sprint("k", i%5)
		if err := s.Write(ctx, "items", key, func(ctx context.Context, tx pgx.Tx) error {
			_, err := e.put(key, fmt.Sprint(i))(ctx, tx)
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
	if n, _ := s.Pending(ctx); n != 5 {
		t.Errorf("outbox rows after 50 writes of 5 keys = %d; want 5", n)
	}
}

// TestRelayPublishesCapturedWrites checks G4: writes that bypass the
// library reach the caches through the capture trigger and the relay.
func TestRelayPublishesCapturedWrites(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	s := e.store(&Options{RelayPoll: time.Hour}) // only the notification may wake the relay
	e.captureItems(t, s)
	relayDone := make(chan error)
	go func() { relayDone <- s.RunRelay(ctx) }()
	defer func() {
		cancel()
		if err := <-relayDone; !errors.Is(err, context.Canceled) {
			t.Errorf("RunRelay = %v; want context.Canceled", err)
		}
	}()
	c := e.node(s)
	outside := newPool(t, "coh_test_outside") // psql, another service...
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := outside.Exec(ctx, sql, args...); err != nil {
			t.Fatal(err)
		}
	}
	sees := func(id, want string) func() bool {
		return func() bool {
			it, err := c.Get(ctx, id)
			if want == "" {
				return errors.Is(err, cache.ErrNotFound)
			}
			return err == nil && it.Value == want
		}
	}

	if _, err := c.Get(ctx, "a"); !errors.Is(err, cache.ErrNotFound) {
		t.Fatalf("Get(a) = %v; want a cached ErrNotFound", err)
	}
	exec(`INSERT INTO ` + e.table + ` VALUES ('a', 'inserted', 1)`)
	waitFor(t, "the insert", sees("a", "inserted"))
	exec(`UPDATE ` + e.table + ` SET value = 'updated', version = 2 WHERE id = 'a'`)
	waitFor(t, "the update", sees("a", "updated"))
	exec(`UPDATE ` + e.table + ` SET id = 'b' WHERE id = 'a'`)
	waitFor(t, "the key change", func() bool { return sees("a", "")() && sees("b", "updated")() })
	exec(`DELETE FROM ` + e.table + ` WHERE id = 'b'`)
	waitFor(t, "the delete", sees("b", ""))
	exec(`INSERT INTO ` + e.table + ` VALUES ('c', 'x', 1), ('d', 'y', 1)`)
	c.Get(ctx, "c")
	c.Get(ctx, "d")
	exec(`TRUNCATE ` + e.table)
	waitFor(t, "the truncate", func() bool { return sees("c", "")() && sees("d", "")() })
	// The relay deletes what it published in the transaction that
	// published it, which commits just after the caches heard.
	waitFor(t, "the outbox to empty", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
}

// TestStoreWritesSkipCapture: writes through the store record their own,
// versioned, outbox rows; the capture trigger must not add unversioned ones
// (which would also blur the caches' version order).
func TestStoreWritesSkipCapture(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil) // no relay runs: nothing deletes rows behind the test's back
	if err := s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id"}); err != nil {
		t.Fatal(err)
	}
	c := e.node(s)
	if _, err := NewTable(s, c, nil).Update(ctx, "mine", e.put("mine", "v")); err != nil {
		t.Fatal(err)
	}
	if _, err := NewTable(s, c, nil).UpdateOptimistic(ctx, "mine", e.put("mine", "w")); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Pending(ctx); n != 0 {
		t.Errorf("outbox rows after store writes = %d; want 0", n)
	}
	if _, err := e.pool.Exec(ctx, `UPDATE `+e.table+` SET value = 'outside' WHERE id = 'mine'`); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Pending(ctx); n != 1 {
		t.Errorf("outbox rows after an outside write = %d; want 1 (the trigger works)", n)
	}
}

// TestConfirmationsWhileTheRelayRuns: with a relay running, writers hand
// their outbox confirmations to it; they are all done shortly, and none is
// lost when the relay stops.
func TestConfirmationsWhileTheRelayRuns(t *testing.T) {
	e := newEnv(t)
	s := e.store(&Options{Grace: time.Hour}) // the relay must not publish them itself
	c := e.node(s)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.RunRelay(ctx) }()
	waitFor(t, "the relay to start", func() bool { return s.relays.Load() == 1 })
	for i := range 50 {
		key := fmt.Sprint("k", i)
		if _, err := NewTable(s, c, nil).Update(context.Background(), key, e.put(key, "v")); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the confirmations", func() bool { n, err := s.Pending(context.Background()); return err == nil && n == 0 })
	for i := range 20 {
		key := fmt.Sprint("k", i)
		NewTable(s, c, nil).Update(context.Background(), key, e.put(key, "w"))
	}
	cancel()
	<-done
	if n, _ := s.Pending(context.Background()); n != 0 {
		t.Errorf("outbox rows after the relay stopped = %d; want 0 (queued confirmations are done on the way out)", n)
	}
}

func TestCaptureRejectsUnknownColumns(t *testing.T) {
	e := newEnv(t)
	s := e.store(nil)
	ctx := context.Background()
	if err := s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "nope"}); err == nil {
		t.Error("Capture of a missing key column succeeded")
	}
	if err := s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "nope"}); err == nil {
		t.Error("Capture of a missing version column succeeded")
	}
	if err := s.Capture(ctx, "items", &TableOptions{Table: e.schema + ".missing", KeyColumn: "id"}); err == nil {
		t.Error("Capture of a missing table succeeded")
	}
}

// TestHostileKeys: keys are bind parameters everywhere; whatever they hold
// is stored verbatim or rejected, never executed.
func TestHostileKeys(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	c := e.node(s)
	for _, key := range []string{`'; DROP TABLE items; --`, `"quoted" \ back`, "semi;colon", "ünïcödé", "{brace}"} {
		if _, err := NewTable(s, c, nil).Update(ctx, key, e.put(key, key)); err != nil {
			t.Errorf("Update(%q): %v", key, err)
			continue
		}
		if it, ok := e.read(key); !ok || it.Value != key {
			t.Errorf("row of %q = %v; want it stored verbatim", key, it)
		}
		if it, err := c.Get(ctx, key); err != nil || it.Value != key {
			t.Errorf("Get(%q) = %v, %v", key, it, err)
		}
	}
	// Postgres text cannot hold NUL: the write fails cleanly.
	if _, err := NewTable(s, c, nil).Update(ctx, "nul\x00key", e.put("nul\x00key", "x")); err == nil {
		t.Error("Update of a key with NUL succeeded")
	}
	// A megabyte key never reaches Postgres or Redis.
	huge := strings.Repeat("k", 1<<20)
	if _, err := NewTable(s, c, nil).Update(ctx, huge, e.put(huge, "x")); !errors.Is(err, cache.ErrInvalidKey) {
		t.Errorf("Update of a 1 MiB key = %v; want cache.ErrInvalidKey", err)
	}
	var tables int
	e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE schemaname = $1`, e.schema).Scan(&tables)
	if tables != 4 { // fences, outbox, migrations, items
		t.Errorf("tables in the schema = %d; want 4", tables)
	}
}

// TestDeadlockIsAConflict: Postgres aborting a transaction as a deadlock
// victim surfaces as ErrConflict, which RetryConflicts retries.
func TestDeadlockIsAConflict(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	c := e.node(s)
	e.pool.Exec(ctx, `INSERT INTO `+e.table+` VALUES ('x', '0', 1), ('y', '0', 1)`)
	var both sync.WaitGroup
	both.Add(2)
	lockBoth := func(first, second string) TxFunc[item] {
		return func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
			if _, err := tx.Exec(ctx, `UPDATE `+e.table+` SET value = value WHERE id = $1`, first); err != nil {
				return cache.Change[item]{}, err
			}
			both.Done()
			both.Wait() // each holds its first row now
			_, err := tx.Exec(ctx, `UPDATE `+e.table+` SET value = value WHERE id = $1`, second)
			return cache.Change[item]{}, err
		}
	}
	errs := make(chan error, 2)
	go func() { _, err := NewTable(s, c, nil).UpdateOptimistic(ctx, "x", lockBoth("x", "y")); errs <- err }()
	go func() { _, err := NewTable(s, c, nil).UpdateOptimistic(ctx, "y", lockBoth("y", "x")); errs <- err }()
	conflicts := 0
	for range 2 {
		if err := <-errs; errors.Is(err, ErrConflict) {
			conflicts++
		} else if err != nil {
			t.Errorf("unexpected error: %v", err)
		}
	}
	if conflicts != 1 {
		t.Errorf("deadlock victims reported as ErrConflict = %d; want 1", conflicts)
	}
}

// TestPostgresConnectionsKilled (DESIGN fault 9): the library's backends
// are terminated mid-run; errors surface, the pool recovers and the caches
// converge.
func TestPostgresConnectionsKilled(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(&Options{Grace: time.Millisecond})
	a, b := e.node(s), e.node(s)
	var wg sync.WaitGroup
	var failed, done atomic.Int64
	stop := make(chan struct{})
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				key := fmt.Sprint("k", (w+i)%3)
				if _, err := NewTable(s, a, nil).Update(ctx, key, e.put(key, fmt.Sprint(w, "-", i))); err != nil {
					failed.Add(1)
				} else {
					done.Add(1)
				}
				b.Get(ctx, key)
			}
		})
	}
	waitFor(t, "some writes", func() bool { return done.Load() > 20 })
	killer := newPool(t, "coh_test_killer")
	for range 3 {
		if _, err := killer.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1`, e.app); err != nil {
			t.Fatal(err)
		}
		before := done.Load()
		waitFor(t, "writes to resume", func() bool { return done.Load() > before+10 })
	}
	close(stop)
	wg.Wait()
	t.Logf("%d writes, %d failed while connections were killed", done.Load(), failed.Load())
	// Writes that failed mid-commit may have committed; the relay covers
	// them. Drain it, then every node must agree with Postgres (G3).
	waitFor(t, "the outbox to drain", func() bool {
		s.RelayOnce(ctx)
		n, err := s.Pending(ctx)
		return err == nil && n == 0
	})
	for _, key := range []string{"k0", "k1", "k2"} {
		want, _ := e.read(key)
		for name, c := range map[string]*cache.Cache[string, item]{"a": a, "b": b} {
			if it, err := c.Get(ctx, key); err != nil || it != want {
				t.Errorf("%s.Get(%s) = %v, %v; want %v", name, key, it, err, want)
			}
		}
	}
}

type recordingTracer struct {
	mu     sync.Mutex
	events []string
}

func (r *recordingTracer) add(s string) {
	r.mu.Lock()
	r.events = append(r.events, s)
	r.mu.Unlock()
}

func (r *recordingTracer) TraceWriteStart(ctx context.Context, d TraceWriteStartData) context.Context {
	r.add(fmt.Sprintf("start %s/%s locked=%v", d.Namespace, d.Key, d.Locked))
	return ctx
}

func (r *recordingTracer) TraceWriteEnd(ctx context.Context, d TraceWriteEndData) {
	r.add(fmt.Sprintf("end committed=%v published=%v err=%v", d.Committed, d.Published, d.Err != nil))
}

func (r *recordingTracer) TraceCommit(ctx context.Context, d TraceCommitData) {
	r.add(fmt.Sprintf("commit %s/%s@%d", d.Namespace, d.Key, d.Version))
}

func TestTracer(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	tr := &recordingTracer{}
	s := e.store(&Options{Tracer: tr})
	c := e.node(s)
	NewTable(s, c, nil).Update(ctx, "k", e.put("k", "v"))
	NewTable(s, c, nil).UpdateOptimistic(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		return cache.Change[item]{}, errors.New("refused")
	})
	want := []string{
		"start items/k locked=true",
		"commit items/k@1",
		"end committed=true published=true err=false",
		"start items/k locked=false",
		"end committed=false published=false err=true",
	}
	if strings.Join(tr.events, "\n") != strings.Join(want, "\n") {
		t.Errorf("traced:\n%s\nwant:\n%s", strings.Join(tr.events, "\n"), strings.Join(want, "\n"))
	}
}

// cancelOnCommit cancels the writer's context right after its commit.
type cancelOnCommit struct{ cancel context.CancelFunc }

func (c cancelOnCommit) TraceWriteStart(ctx context.Context, _ TraceWriteStartData) context.Context {
	return ctx
}
func (c cancelOnCommit) TraceWriteEnd(context.Context, TraceWriteEndData) {}
func (c cancelOnCommit) TraceCommit(context.Context, TraceCommitData)     { c.cancel() }

// TestPublishOutlivesTheCallersContext: a committed write is published
// even when the caller's context ends (or the lock is lost) right after the
// commit; otherwise other nodes would wait for the relay. (Found by the
// integration suite; without the detached context this test sees a publish
// failure and a stale read on node b.)
func TestPublishOutlivesTheCallersContext(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	s := e.store(&Options{Tracer: cancelOnCommit{cancel}})
	a, b := e.node(s), e.node(s)
	e.pool.Exec(context.Background(), `INSERT INTO `+e.table+` VALUES ('k', 'old', 1)`)
	if it, _ := b.Get(context.Background(), "k"); it.Value != "old" {
		t.Fatalf("b.Get = %v; want old", it)
	}
	if _, err := NewTable(s, a, nil).Update(ctx, "k", e.put("k", "new")); err != nil {
		t.Fatalf("Update = %v; want success (it committed)", err)
	}
	if st := s.Stats(); st.PublishFailures != 0 {
		t.Errorf("PublishFailures = %d; want 0", st.PublishFailures)
	}
	if it, _ := b.Get(context.Background(), "k"); it.Value != "new" {
		t.Errorf("b.Get = %v; want new, without waiting for the relay", it)
	}
}

// TestFailedFnIsAFailedWrite guards issue 11 item 7: a TxFunc whose error
// wraps cache.ErrNotFound (here: it looks up another row through the
// library's own Loader, which reports a missing row that way) rolled back
// its transaction, so the write failed. It must be reported as a failure,
// leave no false "not found" cached for the key and announce nothing;
// before the fix, Update took the error for a deletion and returned nil.
func TestFailedFnIsAFailedWrite(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	a, b := e.node(s), e.node(s)
	if _, err := NewTable(s, a, nil).Update(ctx, "k", e.put("k", "v1")); err != nil {
		t.Fatal(err)
	}
	if it, err := b.Get(ctx, "k"); err != nil || it.Value != "v1" {
		t.Fatalf("b.Get = %v, %v; want v1", it, err)
	}
	lookup := e.loader(s.pool)
	for name, write := range map[string]func(TxFunc[item]) (cache.Change[item], error){
		"Update": func(fn TxFunc[item]) (cache.Change[item], error) { return NewTable(s, a, nil).Update(ctx, "k", fn) },
		"UpdateOptimistic": func(fn TxFunc[item]) (cache.Change[item], error) {
			return NewTable(s, a, nil).UpdateOptimistic(ctx, "k", fn)
		},
	} {
		received := b.Stats().InvalidationsReceived
		ch, err := write(func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
			if _, err := e.put("k", "half-written")(ctx, tx); err != nil {
				return cache.Change[item]{}, err
			}
			// The row this write depends on does not exist.
			other, err := lookup(ctx, "missing")
			return cache.Change[item]{Value: other}, err
		})
		if !errors.Is(err, cache.ErrNotFound) {
			t.Errorf("%s with a failing fn = %+v, %v; want fn's error", name, ch, err)
		}
		if it, ok := e.read("k"); !ok || it.Value != "v1" {
			t.Fatalf("%s: row after a failed fn = %+v, %v; want v1 (rolled back)", name, it, ok)
		}
		for node, c := range map[string]*cache.Cache[string, item]{"a": a, "b": b} {
			if it, err := c.Get(ctx, "k"); err != nil || it.Value != "v1" {
				t.Errorf("%s: %s.Get after a failed write = %+v, %v; want v1", name, node, it, err)
			}
		}
		if got := b.Stats().InvalidationsReceived; got != received {
			t.Errorf("%s: a failed write announced %d invalidations; want none", name, got-received)
		}
		if n, _ := s.Pending(ctx); n != 0 {
			t.Errorf("%s: %d outbox rows after a failed write; want 0", name, n)
		}
	}
}

// TestCaptureInsideStoreTransactions guards issue 11 item 8: a store write
// records its own outbox row for its key, and the capture trigger must skip
// exactly that row, not every row of the transaction. Before the fix the
// store switched capture off for the whole transaction, so a write of
// items/a whose fn also changed items/b and orders/o1 announced only
// items/a, and the other nodes kept the old b and o1 until TTL.
func TestCaptureInsideStoreTransactions(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	orders := pgx.Identifier{e.schema, "orders"}.Sanitize()
	if _, err := e.pool.Exec(ctx, `CREATE TABLE `+orders+` (id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	s := e.store(&Options{RelayPoll: time.Hour}) // only the notification may wake the relay
	e.captureItems(t, s)
	if err := s.Capture(ctx, "orders", &TableOptions{Table: orders, KeyColumn: "id", VersionColumn: "version"}); err != nil {
		t.Fatal(err)
	}
	relayDone := make(chan error)
	go func() { relayDone <- s.RunRelay(ctx) }()
	defer func() { cancel(); <-relayDone }()

	writer, reader := e.node(s), e.node(e.store(nil))
	orderCache, err := cache.New("orders", 100,
		Loader[string](s.pool, `SELECT id, value, version FROM `+orders+` WHERE id = $1`, pgx.RowToStructByName[item]),
		&cache.Options[string, item]{Bus: e.bus, Version: func(it item) int64 { return it.Version }})
	if err != nil {
		t.Fatal(err)
	}
	defer orderCache.Close()
	for _, sql := range []string{
		`INSERT INTO ` + e.table + ` VALUES ('a', 'a1', 1), ('b', 'b1', 1)`,
		`INSERT INTO ` + orders + ` VALUES ('o1', 'o1', 1)`,
	} {
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the inserts to be relayed", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
	for _, id := range []string{"a", "b"} {
		if it, err := reader.Get(ctx, id); err != nil || it.Version != 1 {
			t.Fatalf("reader.Get(%s) = %+v, %v; want version 1", id, it, err)
		}
	}
	if it, err := orderCache.Get(ctx, "o1"); err != nil || it.Version != 1 {
		t.Fatalf("orders.Get(o1) = %+v, %v; want version 1", it, err)
	}

	_, err = NewTable(s, writer, nil).Update(ctx, "a", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		for _, sql := range []string{
			`UPDATE ` + e.table + ` SET value = 'b2', version = 2 WHERE id = 'b'`,
			`UPDATE ` + orders + ` SET value = 'o2', version = 2 WHERE id = 'o1'`,
		} {
			if _, err := tx.Exec(ctx, sql); err != nil {
				return cache.Change[item]{}, err
			}
		}
		return e.put("a", "a2")(ctx, tx)
	})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "items/b and orders/o1 to be invalidated", func() bool {
		b, errB := reader.Get(ctx, "b")
		o, errO := orderCache.Get(ctx, "o1")
		return errB == nil && b.Value == "b2" && errO == nil && o.Value == "o2"
	})
	if it, err := reader.Get(ctx, "a"); err != nil || it.Value != "a2" || it.Version != 2 {
		t.Errorf("reader.Get(a) = %+v, %v; want a2 at version 2", it, err)
	}
	waitFor(t, "the outbox to empty", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
}

// TestCaptureKeysAreTheColumnTextForm guards issue 11 item 9: the key a
// capture trigger records is the key column's text form (its ::text cast),
// which is what a cache keyed by that column uses, and it does not depend
// on the writing session's DateStyle or TimeZone. Before the fix the key
// was the column's JSON form (a timestamp came out as 2024-01-02T03:04:05).
func TestCaptureKeysAreTheColumnTextForm(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil) // no relay: the test reads the outbox
	cases := []struct {
		typ, value, want string
	}{
		{"bigint", "42", "42"},
		{"text", "it's; a key", "it's; a key"},
		{"timestamp", "2024-01-02 03:04:05.25", "2024-01-02 03:04:05.25"},
		{"timestamptz", "2024-01-02 03:04:05+02", "2024-01-02 01:04:05+00"},
		{"date", "2024-01-02", "2024-01-02"},
		{"boolean", "true", "true"},
		{"uuid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
		{"numeric(6,2)", "1.5", "1.50"},
		{"interval", "1 day 2 hours", "1 day 02:00:00"},
	}
	outside := newPool(t, "coh_test_outside")
	for i, tc := range cases {
		table := pgx.Identifier{e.schema, fmt.Sprintf("keys%d", i)}.Sanitize()
		ns := fmt.Sprintf("keys%d", i)
		if _, err := e.pool.Exec(ctx, `CREATE TABLE `+table+` (k `+tc.typ+` PRIMARY KEY)`); err != nil {
			t.Fatal(err)
		}
		if err := s.Capture(ctx, ns, &TableOptions{Table: table, KeyColumn: "k"}); err != nil {
			t.Fatal(err)
		}
		// An outside session with settings unlike the server's defaults.
		err := pgx.BeginFunc(ctx, outside, func(tx pgx.Tx) error {
			for _, set := range []string{
				`SET LOCAL DateStyle = 'SQL, DMY'`, `SET LOCAL TimeZone = 'America/New_York'`, `SET LOCAL IntervalStyle = 'sql_standard'`,
			} {
				if _, err := tx.Exec(ctx, set); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, `INSERT INTO `+table+` VALUES ($1::text::`+tc.typ+`)`, tc.value)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		var key []byte
		err = e.pool.QueryRow(ctx, `SELECT key FROM `+pgx.Identifier{e.schema, "outbox"}.Sanitize()+` WHERE namespace = $1`, []byte(ns)).Scan(&key)
		if err != nil {
			t.Fatalf("%s: outbox row: %v", tc.typ, err)
		}
		if string(key) != tc.want {
			t.Errorf("%s key %q captured as %q; want %q", tc.typ, tc.value, key, tc.want)
		}
	}
}

// TestCommitOfUnknownOutcome: when the connection fails after the store
// sent COMMIT and before the reply, nobody on this side can tell whether
// the write committed. The error must say so (ErrCommitUnknown), so that a
// caller does not report "nothing written" and retry a non-idempotent
// write; a failure the server reported is a plain rollback. (Found while
// fixing the webapp's 503 messages: a lost lock made every such write
// "nothing written".)
func TestCommitOfUnknownOutcome(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p, err := faultproxy.New("127.0.0.1:5432")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	cfg := poolConfig(t, e.app)
	host, port, _ := net.SplitHostPort(p.Addr())
	n, _ := strconv.Atoi(port)
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = host, uint16(n)
	cfg.ConnConfig.Fallbacks = nil
	locks, err := lockguard.New(e.rdb, &lockguard.Options{Prefix: e.prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer locks.Close()
	s, err := New(testenv.Pool(t, cfg), &Options{Schema: e.schema, Locks: locks, Publisher: e.pub})
	if err != nil {
		t.Fatal(err)
	}
	c := e.node(s)
	outbox := pgx.Identifier{e.schema, "outbox"}.Sanitize()
	// The outbox row of key "slow" holds the final round trip (outbox and
	// COMMIT) on the server; "bad" fails it there.
	for _, sql := range []string{
		`CREATE FUNCTION ` + pgx.Identifier{e.schema, "hold"}.Sanitize() + `() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.key = 'slow'::bytea THEN PERFORM pg_sleep(2); END IF;
			IF NEW.key = 'bad'::bytea THEN RAISE EXCEPTION 'refused'; END IF;
			RETURN NEW;
		END $$`,
		`CREATE TRIGGER hold BEFORE INSERT ON ` + outbox + ` FOR EACH ROW EXECUTE FUNCTION ` + pgx.Identifier{e.schema, "hold"}.Sanitize() + `()`,
	} {
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	_, err = NewTable(s, c, nil).Update(ctx, "bad", e.put("bad", "v"))
	if err == nil || errors.Is(err, ErrCommitUnknown) {
		t.Errorf("a write the server refused = %v; want an error that is not ErrCommitUnknown", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := NewTable(s, c, nil).Update(ctx, "slow", e.put("slow", "v"))
		done <- err
	}()
	waitFor(t, "the final round trip to be on the server", func() bool {
		var n int
		e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event = 'PgSleep'`, e.app).Scan(&n)
		return n > 0
	})
	p.KillAll()
	if err := <-done; !errors.Is(err, ErrCommitUnknown) {
		t.Errorf("a write whose connection failed after COMMIT was sent = %v; want ErrCommitUnknown", err)
	}
}
