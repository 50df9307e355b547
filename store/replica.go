package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/backoff"
)

// Batcher sends a batch of queries on one connection: a *pgxpool.Pool, a
// *pgx.Conn or a pgx.Tx.
type Batcher interface {
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// ReplicaOptions configure a [Replica]. A nil *ReplicaOptions, and every
// zero field, means the default.
type ReplicaOptions struct {
	// MaxWait bounds how long a load waits for the replica to replay the
	// position it must reach before it reads the primary instead.
	// Default 50ms.
	MaxWait time.Duration

	// Logger receives the replica's errors. Default nil: discard.
	Logger *slog.Logger
}

// Replica reads rows for caches from a streaming replica when the replica
// has replayed every change the cache knows of for the key, and from the
// primary otherwise (DESIGN race 10). Build loaders on it with
// [ReplicaLoader]. It is safe for concurrent use.
//
// A load is told by its cache the source position it must read at or after
// (cache.RequiredPosition): the WAL position of the latest change of the
// key that reached the cache, this node's own writes included. In one
// round trip, the loader reads the replica's replay position and the row;
// if the replica has replayed that far, the row is current enough, and is
// served and cached. Otherwise it waits up to [ReplicaOptions.MaxWait] for
// the replica to catch up, polling its replay position, and then reads the
// primary. When the cache cannot name a position (while it is new, after a
// flush, or while its bus link is unproven: cache.PositionUnknown) the load
// reads the
// primary and tells the cache where the primary stood, so that later loads
// may read the replica again. A replica that fails is read around: the
// primary serves, and the error is counted. On first use a Replica checks
// that the replica is a standby of the primary (they share a system
// identifier); if it is not, it logs an error and every load reads the
// primary ([ReplicaStats].Unrelated).
type Replica struct {
	primary, replica Batcher
	maxWait          time.Duration
	log              *slog.Logger

	replicaReads, waits, primaryReads, replicaErrors atomic.Uint64

	// related is whether the replica was found to be a standby of the
	// primary (relatedYes), not to be one (relatedNo), or not yet checked.
	related atomic.Int32
}

const (
	relatedUnknown = iota
	relatedYes
	relatedNo
)

// ReplicaStats are a Replica's counters.
type ReplicaStats struct {
	// ReplicaReads counts loads the replica served.
	ReplicaReads uint64
	// Waits counts loads that found the replica behind and waited for it
	// (served by the replica or, after MaxWait, by the primary).
	Waits uint64
	// PrimaryReads counts loads the primary served: the replica was
	// behind after MaxWait, failed, or the position was unknown.
	PrimaryReads uint64
	// ReplicaErrors counts failed reads of the replica.
	ReplicaErrors uint64
	// Unrelated reports that the replica is not a standby of the primary
	// (their system identifiers differ): its replay positions say nothing
	// about the primary's, so every load reads the primary.
	Unrelated bool
}

// NewReplica returns a Replica that reads replica when it has replayed far
// enough and primary otherwise. Both are typically *pgxpool.Pool.
func NewReplica(primary, replica Batcher, opts *ReplicaOptions) (*Replica, error) {
	if primary == nil || replica == nil {
		return nil, fmt.Errorf("%w: a Replica needs a primary and a replica", ErrInvalidOptions)
	}
	var o ReplicaOptions
	if opts != nil {
		o = *opts
	}
	if o.MaxWait < 0 {
		return nil, fmt.Errorf("%w: negative MaxWait %v", ErrInvalidOptions, o.MaxWait)
	}
	r := &Replica{primary: primary, replica: replica, maxWait: o.MaxWait, log: o.Logger}
	if r.maxWait == 0 {
		r.maxWait = 50 * time.Millisecond
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	return r, nil
}

// Stats returns a snapshot of the counters.
func (r *Replica) Stats() ReplicaStats {
	return ReplicaStats{
		ReplicaReads:  r.replicaReads.Load(),
		Waits:         r.waits.Load(),
		PrimaryReads:  r.primaryReads.Load(),
		ReplicaErrors: r.replicaErrors.Load(),
		Unrelated:     r.related.Load() == relatedNo,
	}
}

// ReplicaLoader is [Loader] over a Replica: it runs query with the key as
// its only parameter ($1) on the replica when the replica has replayed the
// position the load must reach, and on the primary otherwise, and turns
// the single row into a V with scan. No row becomes an error for which
// errors.Is(err, cache.ErrNotFound) is true.
//
//	r, err := store.NewReplica(primaryPool, replicaPool, nil)
//	load := store.ReplicaLoader[int64](r, `SELECT id, name, version FROM users WHERE id = $1`, pgx.RowToStructByName[User])
func ReplicaLoader[K comparable, V any](r *Replica, query string, scan pgx.RowToFunc[V]) cache.LoaderFunc[K, V] {
	return func(ctx context.Context, key K) (V, error) {
		var v V
		found := false
		read := func(rows pgx.Rows) error {
			var err error
			v, err = pgx.CollectExactlyOneRow(rows, scan)
			if errors.Is(err, pgx.ErrNoRows) {
				found = false
				return nil
			}
			found = err == nil
			return err
		}
		if err := r.load(ctx, query, key, read); err != nil {
			var zero V
			return zero, err
		}
		if !found {
			return v, fmt.Errorf("%w: %v", cache.ErrNotFound, key)
		}
		return v, nil
	}
}

// ReplicaLoaderMany is [LoaderMany] over a Replica, for
// cache.Options.LoadMany: it runs query with the keys as its only
// parameter ($1, an array: WHERE id = ANY($1)) on the replica when the
// replica has replayed the position the batch must reach (the highest of
// its keys'), and on the primary otherwise, and files each row under
// keyOf(v). Keys without a row are absent from the result.
func ReplicaLoaderMany[K comparable, V any](r *Replica, query string, scan pgx.RowToFunc[V], keyOf func(V) K) func(ctx context.Context, keys []K) (map[K]V, error) {
	return func(ctx context.Context, keys []K) (map[K]V, error) {
		var m map[K]V
		read := func(rows pgx.Rows) error {
			vs, err := pgx.CollectRows(rows, scan)
			if err != nil {
				return err
			}
			m = make(map[K]V, len(vs))
			for _, v := range vs {
				m[keyOf(v)] = v
			}
			return nil
		}
		if err := r.load(ctx, query, keys, read); err != nil {
			return nil, err
		}
		return m, nil
	}
}

// sqlReplay reads a server's replay position; on a server that is not in
// recovery (a primary), its current position, so that reading it is
// always current enough.
const sqlReplay = `SELECT (coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn()) - '0/0'::pg_lsn)::bigint`

// load reads the row of key with query, passing its rows to read, from the
// replica if it has replayed the load's required position, else from the
// primary.
func (r *Replica) load(ctx context.Context, query string, key any, read func(pgx.Rows) error) error {
	required, ok := cache.RequiredPosition(ctx)
	if !ok {
		required = cache.PositionUnknown // outside a cache's load: be current
	}
	if required != cache.PositionUnknown && r.isStandby(ctx) {
		served, err := r.fromReplica(ctx, required, query, key, read)
		if served || ctx.Err() != nil {
			return err
		}
	}
	return r.fromPrimary(ctx, required == cache.PositionUnknown, query, key, read)
}

// sqlSystem reads a server's system identifier, which a physical standby
// shares with its primary (pg_control_system is open to every role).
const sqlSystem = `SELECT system_identifier::text FROM pg_control_system()`

// isStandby reports whether the replica is known to be a standby of the
// primary, finding out on first use: positions of two clusters are not
// comparable, and a replica of another cluster (a misconfigured URL)
// would look caught up to any position and serve its rows. A check that
// fails counts as a replica error and is made again by the next load.
func (r *Replica) isStandby(ctx context.Context) bool {
	switch r.related.Load() {
	case relatedYes:
		return true
	case relatedNo:
		return false
	}
	var p, s string
	if err := r.primary.SendBatch(ctx, batchOf(sqlSystem, &p)).Close(); err != nil {
		return false // the primary's error shows in the load that follows
	}
	if err := r.replica.SendBatch(ctx, batchOf(sqlSystem, &s)).Close(); err != nil {
		if ctx.Err() == nil {
			r.replicaErrors.Add(1)
			r.log.Warn("store: checking the replica; reading the primary", "err", err)
		}
		return false
	}
	if p != s {
		if r.related.Swap(relatedNo) != relatedNo {
			r.log.Error("store: the replica is not a standby of the primary (their system identifiers differ); every load reads the primary", "primary", p, "replica", s)
		}
		return false
	}
	r.related.Store(relatedYes)
	return true
}

// batchOf is a batch of one query of one row, scanned into dst.
func batchOf(query string, dst ...any) *pgx.Batch {
	var b pgx.Batch
	b.Queue(query).QueryRow(func(row pgx.Row) error { return row.Scan(dst...) })
	return &b
}

// fromReplica serves the load from the replica if it has replayed
// required, waiting up to maxWait; it reports whether it served it.
func (r *Replica) fromReplica(ctx context.Context, required uint64, query string, key any, read func(pgx.Rows) error) (served bool, err error) {
	deadline := time.Now().Add(r.maxWait)
	poll := backoff.Policy{Min: time.Millisecond, Max: 10 * time.Millisecond}
	for attempt := 0; ; attempt++ {
		var replay int64
		var b pgx.Batch
		b.Queue(sqlReplay).QueryRow(func(row pgx.Row) error { return row.Scan(&replay) })
		caughtUp := func() bool { return uint64(replay) >= required }
		b.Queue(query, key).Query(func(rows pgx.Rows) error {
			if !caughtUp() {
				rows.Close() // not current enough: not read
				return nil
			}
			return read(rows)
		})
		if err := r.replica.SendBatch(ctx, &b).Close(); err != nil {
			if ctx.Err() != nil {
				return false, ctx.Err()
			}
			r.replicaErrors.Add(1)
			r.log.Warn("store: reading the replica; reading the primary", "err", err)
			return false, nil
		}
		if caughtUp() {
			r.replicaReads.Add(1)
			return true, nil
		}
		if attempt == 0 {
			r.waits.Add(1)
		}
		if time.Now().After(deadline) || !backoff.Sleep(ctx, min(poll.Wait(attempt), time.Until(deadline))) {
			return false, ctx.Err()
		}
	}
}

// fromPrimary serves the load from the primary. With report, it also
// reads the primary's position in the same round trip and tells the cache
// (cache.ReportPosition): the load's position was unknown.
func (r *Replica) fromPrimary(ctx context.Context, report bool, query string, key any, read func(pgx.Rows) error) error {
	var b pgx.Batch
	var pos int64
	if report {
		// Read before the row: every change the cache was told of before
		// the load began is at or before it, and the row read after it is
		// at least as new.
		b.Queue(sqlPosition).QueryRow(func(row pgx.Row) error { return row.Scan(&pos) })
	}
	b.Queue(query, key).Query(read)
	if err := r.primary.SendBatch(ctx, &b).Close(); err != nil {
		return err
	}
	r.primaryReads.Add(1)
	if report {
		cache.ReportPosition(ctx, uint64(pos))
	}
	return nil
}
