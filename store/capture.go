package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coherentcache/coherent/internal/backoff"
)

// Capture installs triggers on opts.Table so that every INSERT, UPDATE,
// DELETE and TRUNCATE, from any client (psql, another service, a
// migration), records an outbox row for the key in opts.KeyColumn, which
// the relay then publishes to namespace (G4). A TRUNCATE flushes the
// namespace. [Table.Capture] calls it with the cache's namespace; call it
// directly for a table that this process writes but does not cache.
//
// The key is the column's text form, KeyColumn::text, printed with
// DateStyle ISO, IntervalStyle postgres and TimeZone UTC whatever the
// writing session has set: 42, a text as it is, 2024-01-02 03:04:05 for a
// timestamp, 2024-01-02 01:04:05+00 for a timestamptz, a uuid in lower
// case. It must match the cache's key encoding: the default codecs (the
// string itself, or base-10 integers) match text and integer columns. An
// empty key cannot be cached; the relay drops and counts it
// ([Stats].PoisonRows). The version column, if any
// ([TableOptions.VersionColumn]), must be of an integer type (smallint,
// integer or bigint).
//
// A write through this package records its own outbox row for its key,
// with its version; the trigger skips exactly that row. Every other row
// the write's function changes, in this table or another captured one, is
// captured like an outside write.
//
// The trigger functions run as their owner (the role that called Capture)
// with a fixed search_path, so roles that may write the table need no
// right on the library's schema. If the table changes under the capture
// so that its functions cannot read a row (the key column renamed or
// dropped, the version column retyped), the write still succeeds: it
// flushes the namespace and raises a WARNING, until Capture runs again.
//
// Capture is idempotent and cheap to run at every start: it replaces the
// table's functions only when they differ from what it would install, and
// creates the triggers only when they are missing. Creating a trigger
// needs a lock that conflicts with the table's writers; Capture asks for
// it with a short lock_timeout and retries until ctx ends, so that it never
// holds the writers up behind a long transaction. Running it again can
// change the namespace or the version column. Every name is passed as a
// bind parameter. The functions are named capture_
// and the table's oid, in the library's schema.
//
// Cost: each row written runs the trigger, which reads the key (and
// version) columns and upserts one outbox row (two for an UPDATE that
// changes the key); the relay later publishes and deletes it.
// BenchmarkCaptureTrigger measures it; BENCHMARKS.md has the figures.
func (s *Store) Capture(ctx context.Context, namespace string, opts *TableOptions) error {
	if opts == nil || opts.Table == "" || opts.KeyColumn == "" {
		return fmt.Errorf("%w: capture needs TableOptions.Table and KeyColumn", ErrInvalidOptions)
	}
	table, keyColumn, versionColumn := opts.Table, opts.KeyColumn, opts.VersionColumn
	if err := checkName(namespace, "-"); err != nil {
		return err
	}
	// Creating a trigger takes a lock that conflicts with the table's
	// writers; a request for it waits behind a long write transaction, and
	// every writer that comes later waits behind the request. So ask with a
	// short lock_timeout, and let writers pass between attempts.
	for attempt := 1; ; attempt++ {
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true)`, captureLockTimeout); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `SELECT `+s.ident+`.install_capture($1::text::regclass, $2, $3, $4)`,
				table, namespace, keyColumn, versionColumn)
			return err
		})
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "55P03" { // lock_not_available
			if err != nil {
				return fmt.Errorf("store: capture %s: %w", table, translate(err))
			}
			return nil
		}
		if attempt == 1 {
			s.log.Info("store: capture waits for the writers of the table", "table", table)
		}
		if !backoff.Sleep(ctx, captureBackoff.Wait(attempt-1)) {
			return fmt.Errorf("store: capture %s: %w (the table's lock was taken at every attempt: %w)", table, ctx.Err(), err)
		}
	}
}

// captureBackoff spaces Capture's attempts to take its locks.
var captureBackoff = backoff.Policy{Min: 10 * time.Millisecond, Max: time.Second}

// captureLockTimeout bounds each attempt of Capture to take the locks it
// needs, and so how long it can hold up the table's writers.
const captureLockTimeout = "100ms"
