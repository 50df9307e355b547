package store

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/lockguard"
)

// pgCounter is a pgx tracer that counts the round trips of a connection:
// every statement pgx sends (BEGIN and COMMIT included) and every batch.
type pgCounter struct {
	mu  sync.Mutex
	sql []string
}

func (c *pgCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	c.mu.Lock()
	c.sql = append(c.sql, strings.Join(strings.Fields(data.SQL), " "))
	c.mu.Unlock()
	return ctx
}

func (c *pgCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (c *pgCounter) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	c.mu.Lock()
	c.sql = append(c.sql, "(batch)")
	c.mu.Unlock()
	return ctx
}

func (c *pgCounter) TraceBatchQuery(context.Context, *pgx.Conn, pgx.TraceBatchQueryData) {}
func (c *pgCounter) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData)     {}

// take returns the statements recorded so far and forgets them.
func (c *pgCounter) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sql
	c.sql = nil
	return s
}

// tracedStore returns a Store like env.store's whose pool, of at most
// maxConns connections, reports its round trips to the returned counter.
func (e *env) tracedStore(t *testing.T, maxConns int32, opts *Options) (*Store, *pgCounter) {
	t.Helper()
	pc := &pgCounter{}
	cfg := poolConfig(t, e.app)
	cfg.ConnConfig.Tracer = pc
	cfg.MaxConns = maxConns
	o := e.options(t, opts)
	s, err := New(testenv.Pool(t, cfg), &o)
	if err != nil {
		t.Fatal(err)
	}
	return s, pc
}

// TestFencedWriteRoundTrips: a lock-guarded write makes three round trips
// to Postgres, as many as an optimistic one: BEGIN with the skip of its
// capture and the fence, fn's statement, and the outbox upsert with
// COMMIT. With the fence as a statement of its own it made four.
func TestFencedWriteRoundTrips(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s, pc := e.tracedStore(t, 1, nil)
	tbl := NewTable(s, e.node(s), nil)
	for _, locked := range []bool{true, false} {
		pc.take()
		write := tbl.Update
		if !locked {
			write = tbl.UpdateOptimistic
		}
		if _, err := write(ctx, "k", e.put("k", "v")); err != nil {
			t.Fatal(err)
		}
		// The confirmation of the outbox row runs after the write
		// returned when no relay runs; leave it out.
		var sent []string
		for _, sql := range pc.take() {
			if !strings.Contains(sql, "unnest") {
				sent = append(sent, sql)
			}
		}
		if len(sent) != 3 || !strings.HasPrefix(sent[0], "BEGIN;") || sent[2] != "(batch)" {
			t.Errorf("locked %v: round trips to Postgres = %d %q; want 3: BEGIN (with the fence), fn, the batch with COMMIT", locked, len(sent), sent)
		}
		if hasFence := strings.Contains(sent[0], ".fence("); hasFence != locked {
			t.Errorf("locked %v: BEGIN %q; want the fence in it only when locked", locked, sent[0])
		}
	}
}

// TestFenceRejectionKeepsTheConnection: a rejected token is an error of
// the BEGIN's simple query; it still becomes a *FenceError with the stored
// token, the store heals the lock's counter, and the connection survives
// (pgx closes a connection whose BEGIN fails only on a fatal error): the
// pool of one connection makes none after it.
func TestFenceRejectionKeepsTheConnection(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s, _ := e.tracedStore(t, 1, nil)
	tbl := NewTable(s, e.node(s), nil)
	for range 3 {
		if _, err := tbl.Update(ctx, "k", e.put("k", "v")); err != nil {
			t.Fatal(err)
		}
	}
	conns := s.pool.Stat().NewConnsCount()
	keys, _ := e.rdb.Keys(ctx, e.prefix+"*").Result()
	e.rdb.Del(ctx, keys...) // the counter is gone: the next token is 1
	_, err := tbl.Update(ctx, "k", e.put("k", "lost"))
	var fe *FenceError
	if !errors.As(err, &fe) || !errors.Is(err, ErrFenced) {
		t.Fatalf("write after the counter reset = %v; want a *FenceError", err)
	}
	if fe.Token != 1 || fe.Stored != 3 || fe.Lock != lockName("items", "k") {
		t.Errorf("FenceError %+v; want token 1 of lock %q, stored 3", fe, lockName("items", "k"))
	}
	if _, err := tbl.Update(ctx, "k", e.put("k", "healed")); err != nil {
		t.Fatalf("write after the heal = %v; want success", err)
	}
	if n := s.pool.Stat().NewConnsCount(); n != conns {
		t.Errorf("connections made = %d after the rejection; want %d (the rejected one kept)", n, conns)
	}
	if it, _ := e.read("k"); it.Value != "healed" || it.Version != 4 {
		t.Errorf("row = %+v; want healed at version 4", it)
	}
}

// TestFenceLocksBeforeTheBody guards the order of the fence (see
// beginQuery): the fence locks the lock's row before fn runs, so a newer
// holder B whose lock was granted while the stalled holder A is still in
// its transaction waits at its BEGIN, and its fn reads what A committed.
// A fence checked at the commit instead would let B's fn run beside A's
// and read the row as it was before A: B's read-modify-write would lose
// A's update.
func TestFenceLocksBeforeTheBody(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	shortLocks, err := lockguard.New(e.rdb, &lockguard.Options{Prefix: e.prefix, TTL: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { shortLocks.Close() })
	s := e.store(&Options{Locks: shortLocks})
	c := e.node(s)
	tbl := NewTable(s, c, nil)
	if _, err := tbl.Update(ctx, "n", e.put("n", "0")); err != nil {
		t.Fatal(err)
	}
	name := lockName("items", "n")
	lockA, err := shortLocks.Acquire(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	inA, releaseA := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	letAGo := func() { releaseOnce.Do(func() { close(releaseA) }) }
	t.Cleanup(letAGo) // a failure below must not leave A's connection stuck
	doneA := make(chan error, 1)
	go func() {
		var ch cache.Change[item]
		_, _, err := tbl.txBody("n", "n", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
			close(inA)
			<-releaseA // A stalls inside its transaction, past its lease
			return e.add("n", 1)(ctx, tx)
		}, &ch)(ctx, lockA)
		doneA <- err
	}()
	<-inA
	waitFor(t, "A's lease to run out", func() bool { return expired(lockA) })
	lockB, err := shortLocks.Acquire(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	doneB := make(chan error, 1)
	go func() {
		var ch cache.Change[item]
		_, _, err := tbl.txBody("n", "n", e.add("n", 10), &ch)(ctx, lockB)
		doneB <- err
	}()
	// B's BEGIN waits for A's lock on the fence row.
	waitFor(t, "B's fence to wait for A's", func() bool {
		var n int
		err := e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%.fence%'`, e.schema).Scan(&n)
		return err == nil && n > 0
	})
	letAGo()
	if err := <-doneA; err != nil {
		t.Fatalf("A's write (fenced first) = %v; want success", err)
	}
	if err := <-doneB; err != nil {
		t.Fatalf("B's write = %v; want success", err)
	}
	if it, _ := e.read("n"); it.Value != "11" {
		t.Errorf("row = %+v; want 11: B's read-modify-write after A's", it)
	}
}

// TestFenceWithoutMigration: a lock-guarded write against a schema that
// predates the fence function (migration 0003 not run) fails, before fn
// runs, with an error that names the fix.
func TestFenceWithoutMigration(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	if _, err := e.pool.Exec(ctx, `DROP FUNCTION `+pgx.Identifier{e.schema}.Sanitize()+`.fence(bytea, bigint)`); err != nil {
		t.Fatal(err)
	}
	s := e.store(nil)
	ran := false
	_, err := NewTable(s, e.node(s), nil).Update(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		ran = true
		return e.put("k", "v")(ctx, tx)
	})
	if err == nil || !strings.Contains(err.Error(), "run store.Migrate") || ran {
		t.Errorf("Update without the fence function = %v (fn ran: %v); want an error naming Migrate, before fn", err, ran)
	}
}
