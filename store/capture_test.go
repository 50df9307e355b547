package store

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coherentcache/coherent/internal/testenv"
)

// outboxRows returns the outbox as (key, flush) pairs of namespace ns.
func (e *env) outboxRows(t testing.TB, ns string) map[string]bool {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT convert_from(key, 'UTF8'), flush FROM `+pgx.Identifier{e.schema, "outbox"}.Sanitize()+` WHERE namespace = $1`, []byte(ns))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	var key string
	var flush bool
	if _, err := pgx.ForEachRow(rows, []any{&key, &flush}, func() error { got[key] = flush; return nil }); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestCaptureWritesOfARestrictedRole guards issue 12 item 7: another
// service's role may write the captured table without any right on the
// library's schema. Before the fix the trigger ran as that role and its
// writes failed with "permission denied for schema"; the capture functions
// now run as their owner, with a fixed search_path.
func TestCaptureWritesOfARestrictedRole(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	app := testenv.Name("coh_app_")
	role := testenv.Name("coh_role_")
	table := pgx.Identifier{app, "orders"}.Sanitize()
	for _, sql := range []string{
		`CREATE SCHEMA ` + pgx.Identifier{app}.Sanitize(),
		`CREATE TABLE ` + table + ` (id bigint PRIMARY KEY, version bigint NOT NULL)`,
		`CREATE ROLE ` + pgx.Identifier{role}.Sanitize() + ` NOLOGIN`,
		`GRANT USAGE ON SCHEMA ` + pgx.Identifier{app}.Sanitize() + ` TO ` + pgx.Identifier{role}.Sanitize(),
		`GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ` + table + ` TO ` + pgx.Identifier{role}.Sanitize(),
	} {
		if _, err := e.pool.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	t.Cleanup(func() {
		for _, sql := range []string{
			`DROP SCHEMA ` + pgx.Identifier{app}.Sanitize() + ` CASCADE`,
			`DROP ROLE ` + pgx.Identifier{role}.Sanitize(),
		} {
			if _, err := e.pool.Exec(context.Background(), sql); err != nil {
				t.Errorf("%s: %v", sql, err)
			}
		}
	})
	if err := s.Capture(ctx, "orders", &TableOptions{Table: table, KeyColumn: "id", VersionColumn: "version"}); err != nil {
		t.Fatal(err)
	}
	err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL ROLE `+pgx.Identifier{role}.Sanitize()); err != nil {
			return err
		}
		for _, sql := range []string{
			`INSERT INTO ` + table + ` VALUES (1, 1), (2, 1)`,
			`UPDATE ` + table + ` SET version = 2 WHERE id = 1`,
			`DELETE FROM ` + table + ` WHERE id = 2`,
			`TRUNCATE ` + table,
		} {
			if _, err := tx.Exec(ctx, sql); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("writes of a role with rights on the table only: %v", err)
	}
	if got := e.outboxRows(t, "orders"); len(got) != 3 || !got[""] {
		t.Errorf("outbox after the restricted role's writes = %v; want keys 1 and 2 and a flush", got)
	}
}

// TestCaptureDoesNotQueueBehindLongWrites guards issue 12 item 8: the
// trigger DDL needs a lock that conflicts with writers, and a lock request
// waits behind a long write transaction while every later writer waits
// behind it. Before the fix Capture at start-up froze writes to the table
// for as long as the long transaction ran. Now Capture leaves triggers
// that already match alone, and otherwise asks with a short lock_timeout
// and retries, so writers pass between its attempts.
func TestCaptureDoesNotQueueBehindLongWrites(t *testing.T) {
	for _, installed := range []bool{true, false} {
		name := "first install"
		if installed {
			name = "already installed"
		}
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			ctx := context.Background()
			s := e.store(nil)
			if _, err := e.pool.Exec(ctx, `INSERT INTO `+e.table+` VALUES ('long', 'v', 1), ('other', 'v', 1)`); err != nil {
				t.Fatal(err)
			}
			if installed {
				if err := s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"}); err != nil {
					t.Fatal(err)
				}
			}
			long, err := e.pool.Begin(ctx) // a long write transaction
			if err != nil {
				t.Fatal(err)
			}
			defer long.Rollback(ctx)
			if _, err := long.Exec(ctx, `UPDATE `+e.table+` SET value = 'long' WHERE id = 'long'`); err != nil {
				t.Fatal(err)
			}
			captured := make(chan error, 1)
			go func() {
				captured <- s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"})
			}()
			if installed {
				select {
				case err := <-captured:
					if err != nil {
						t.Fatalf("Capture of a table whose triggers match, beside a long write: %v", err)
					}
				case <-time.After(10 * time.Second):
					long.Rollback(ctx)
					<-captured
					t.Fatal("Capture of a table whose triggers match waited 10 s for a long write transaction")
				}
			} else {
				waitFor(t, "Capture to ask for the table's lock", func() bool {
					var n int
					e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND mode = 'ShareRowExclusiveLock'`, e.schema+".items").Scan(&n)
					return n > 0
				})
			}
			// Another writer, while the long transaction still runs.
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			if _, err := e.pool.Exec(wctx, `UPDATE `+e.table+` SET value = 'w' WHERE id = 'other'`); err != nil {
				t.Fatalf("a writer beside the long transaction and Capture: %v (it queued behind Capture's lock)", err)
			}
			if !installed {
				select {
				case err := <-captured:
					t.Fatalf("Capture returned %v while the long transaction held the table", err)
				default:
				}
				long.Rollback(ctx)
				if err := <-captured; err != nil {
					t.Fatalf("Capture after the long transaction ended: %v", err)
				}
			}
			e.outsideWrite(t, `UPDATE `+e.table+` SET value = 'x', version = 2 WHERE id = 'other'`)
			if got := e.outboxRows(t, "items"); len(got) == 0 {
				t.Error("no outbox row after an outside write: capture is not installed")
			}
		})
	}
}

// TestCaptureFailsClearlyOrFlushes guards issue 12 item 9, the silent ways
// to lose capture: a version column that is not an integer (accepted
// before, after which every outside write failed) is an error at install;
// a key column renamed or dropped after install (before: no outbox row
// and no error) turns each write into a flush of the namespace with a
// warning, and the writes succeed; an empty key, which no cache can hold,
// is dropped and counted by the relay rather than flushing the namespace
// (before, an empty key was the TRUNCATE marker).
func TestCaptureFailsClearlyOrFlushes(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	t.Run("text version column", func(t *testing.T) {
		tbl := pgx.Identifier{e.schema, "textver"}.Sanitize()
		e.outsideWrite(t, `CREATE TABLE `+tbl+` (id text PRIMARY KEY, version text)`)
		err := s.Capture(ctx, "textver", &TableOptions{Table: tbl, KeyColumn: "id", VersionColumn: "version"})
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || !strings.Contains(err.Error(), "integer") {
			t.Errorf("Capture with a text version column = %v; want an error naming the integer types", err)
		}
	})
	for _, change := range []string{"RENAME COLUMN id TO ident", "DROP COLUMN version", "ALTER COLUMN version TYPE text"} {
		t.Run(change, func(t *testing.T) {
			tbl := pgx.Identifier{e.schema, testenv.Name("t")}.Sanitize()
			ns := testenv.Name("ns")
			e.outsideWrite(t, `CREATE TABLE `+tbl+` (id text PRIMARY KEY, other text, version bigint)`)
			if err := s.Capture(ctx, ns, &TableOptions{Table: tbl, KeyColumn: "id", VersionColumn: "version"}); err != nil {
				t.Fatal(err)
			}
			e.outsideWrite(t, `INSERT INTO `+tbl+` VALUES ('k', 'x', 1)`)
			if err := relayAll(ctx, s); err != nil {
				t.Fatal(err)
			}
			e.outsideWrite(t, `ALTER TABLE `+tbl+` `+change)
			if _, err := e.pool.Exec(ctx, `UPDATE `+tbl+` SET other = 'y'`); err != nil {
				t.Fatalf("a write after %s: %v", change, err)
			}
			got := e.outboxRows(t, ns)
			if change == "ALTER COLUMN version TYPE text" {
				// The key is intact: the row is captured, without a version.
				if _, ok := got["k"]; !ok && !got[""] {
					t.Errorf("outbox after %s = %v; want k, or a flush", change, got)
				}
				return
			}
			if !got[""] {
				t.Errorf("outbox after %s = %v; want a flush of the namespace", change, got)
			}
		})
	}
	t.Run("empty key", func(t *testing.T) {
		tbl := pgx.Identifier{e.schema, "emptykey"}.Sanitize()
		e.outsideWrite(t, `CREATE TABLE `+tbl+` (id text PRIMARY KEY)`)
		if err := s.Capture(ctx, "emptykey", &TableOptions{Table: tbl, KeyColumn: "id"}); err != nil {
			t.Fatal(err)
		}
		e.outsideWrite(t, `INSERT INTO `+tbl+` VALUES ('')`)
		if got := e.outboxRows(t, "emptykey"); len(got) != 1 || got[""] {
			t.Fatalf("outbox after an empty key = %v; want one row that is not a flush", got)
		}
		before := s.Stats().PoisonRows
		if err := relayAll(ctx, s); err != nil {
			t.Fatal(err)
		}
		if got := s.Stats().PoisonRows - before; got != 1 {
			t.Errorf("PoisonRows after relaying an empty key = +%d; want +1", got)
		}
		e.outsideWrite(t, `TRUNCATE `+tbl)
		if got := e.outboxRows(t, "emptykey"); !got[""] {
			t.Errorf("outbox after TRUNCATE = %v; want a flush", got)
		}
	})
}
