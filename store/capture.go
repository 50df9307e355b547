package store

import (
	"context"
	"fmt"
)

// CaptureOption configures [Store.Capture].
type CaptureOption func(*captureConfig)

type captureConfig struct{ versionColumn string }

// WithVersionColumn names the table's version column. Captured invalidations
// then carry the row's version, so that caches keep a newer value they
// already hold and keep installing write-throughs (see cache.Cache.Set).
// Deletes still carry no version.
func WithVersionColumn(column string) CaptureOption {
	return func(c *captureConfig) { c.versionColumn = column }
}

// Capture installs triggers on table so that every INSERT, UPDATE, DELETE
// and TRUNCATE, from any client (psql, another service, a migration),
// records an outbox row for the key in keyColumn, which the relay then
// publishes to namespace (G4). A TRUNCATE flushes the namespace.
//
// The key is the column's text form, keyColumn::text, printed with
// DateStyle ISO, IntervalStyle postgres and TimeZone UTC whatever the
// writing session has set: 42, a text as it is, 2024-01-02 03:04:05 for a
// timestamp, 2024-01-02 01:04:05+00 for a timestamptz, a uuid in lower
// case. It must match the cache's key encoding: the default codecs (the
// string itself, or base-10 integers) match text and integer columns.
//
// A write through this package records its own outbox row for its key,
// with its version; the trigger skips exactly that row. Every other row
// the write's function changes, in this table or another captured one, is
// captured like an outside write.
//
// Capture is idempotent: running it again replaces the triggers, so it can
// change the namespace or the version column. table may be schema-qualified
// and is resolved like any table name in SQL; every argument is passed as a
// bind parameter. Each captured table gets a trigger function of its own,
// generated with its key and version columns (named capture_ and the
// table's oid, in the library's schema).
//
// Cost: each row written runs the trigger, which reads the key (and
// version) columns and upserts one outbox row (two for an UPDATE that
// changes the key); the relay later publishes and deletes it.
// BenchmarkCaptureTrigger measures it; BENCHMARKS.md has the figures.
func (s *Store) Capture(ctx context.Context, table, keyColumn, namespace string, opts ...CaptureOption) error {
	var cfg captureConfig
	for _, o := range opts {
		o(&cfg)
	}
	if table == "" || keyColumn == "" {
		return fmt.Errorf("%w: table and key column must be named", ErrInvalidOptions)
	}
	if err := checkName(namespace, "-"); err != nil {
		return err
	}
	_, err := s.pool.Exec(ctx, `SELECT `+s.ident+`.install_capture($1::text::regclass, $2, $3, $4)`,
		table, namespace, keyColumn, cfg.versionColumn)
	if err != nil {
		return fmt.Errorf("store: capture %s: %w", table, err)
	}
	return nil
}
