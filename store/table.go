package store

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/lockguard"
)

// Table is a table of Postgres read through a cache: the Store that writes
// it, the Cache that holds its rows on this node, and the names capture
// needs. Its writes change a row and make every node see the change; its
// reads are the cache's. The cache's namespace names the table on the bus
// and in the outbox, and its key codec gives the keys' text form.
//
//	users := store.NewTable(s, usersCache, &store.TableOptions{Table: "users", KeyColumn: "id", VersionColumn: "version"})
//	err := users.Capture(ctx)
//	u, err := users.Get(ctx, 42)
//	ch, err := users.Update(ctx, 42, func(ctx context.Context, tx pgx.Tx) (cache.Change[User], error) { ... })
//
// A Table is safe for concurrent use. Create one per table and cache, at
// start-up, and share it.
type Table[K comparable, V any] struct {
	store *Store
	cache *cache.Cache[K, V]
	opts  TableOptions
}

// TableOptions name a table's columns for [Table.Capture] and
// [Store.Capture]. A nil *TableOptions is fine for a Table that is never
// captured.
type TableOptions struct {
	// Table is the table's name, schema-qualified if need be, resolved
	// like any table name in SQL. Required by Capture.
	Table string

	// KeyColumn is the column whose text form is the cache's key (see
	// [Store.Capture]). Required by Capture.
	KeyColumn string

	// VersionColumn is the table's version column, if it has one: an
	// integer that grows with every write of a row (see
	// cache.Options.Version). Captured changes then carry the row's
	// version, so that caches keep a newer value they already hold. Default
	// "": captured changes carry no version.
	VersionColumn string
}

// TxFunc writes one row inside tx and reports what it committed: the row
// and its version, or its deletion (Change.Deleted). It must not commit or
// roll back tx. Any error it returns is a failed write: the transaction
// rolls back, whatever the error wraps.
type TxFunc[V any] func(ctx context.Context, tx pgx.Tx) (cache.Change[V], error)

// NewTable returns the handle of a table written through s and cached in
// c. opts may be nil; it is copied.
func NewTable[K comparable, V any](s *Store, c *cache.Cache[K, V], opts *TableOptions) *Table[K, V] {
	t := &Table[K, V]{store: s, cache: c}
	if opts != nil {
		t.opts = *opts
	}
	return t
}

// Cache returns the table's cache on this node.
func (t *Table[K, V]) Cache() *cache.Cache[K, V] { return t.cache }

// Get returns the row of key, from memory when the cache holds it; see
// [cache.Cache.Get].
func (t *Table[K, V]) Get(ctx context.Context, key K) (V, error) {
	if err := t.check(); err != nil {
		var zero V
		return zero, err
	}
	return t.cache.Get(ctx, key)
}

// Capture installs change capture on the table, for the cache's namespace:
// writes that bypass the library are invalidated too (G4). See
// [Store.Capture].
func (t *Table[K, V]) Capture(ctx context.Context) error {
	if err := t.check(); err != nil {
		return err
	}
	return t.store.Capture(ctx, t.cache.Namespace(), &t.opts)
}

// Update writes the row of key through the lock guard and makes every node
// see the change. The sequence:
//
//  1. acquire the lockguard lock of (namespace, key);
//  2. begin; check and advance the lock's fencing token in Postgres (a
//     token not greater than the stored one rolls back with a [*FenceError]);
//  3. run fn; record the change in the outbox; commit;
//  4. install the committed row in the cache on this node (G1);
//  5. publish the invalidation (with cache.Options.Codec, the committed
//     value) through the cache's bus (G2), only now that the commit
//     returned; delete the outbox row;
//  6. release the lock (in the round trip of step 5's publication when the
//     cache's bus is a Redis bus of package invalidate on the lock
//     guard's client to one Redis server; see the package documentation).
//
// Writers of one key are serialised across nodes, and one whose lock
// expired while it stalled cannot commit (G6). If the bus does not take the
// invalidation within [Options.PublishTimeout] after the commit, Update
// still succeeds: it makes the outbox row due at once, and the relay of a
// node whose link works publishes it, woken by the outbox's notification
// (race 3; if the writer crashes instead, after [Options.Grace]). Losing
// the lock after the commit does not fail Update either: the fence already
// decided.
//
// ctx bounds the wait for the lock and the transaction; it is cancelled for
// fn if the lock is lost. A committed write is published regardless, within
// [Options.PublishTimeout]. Update returns what fn reported, or fn's
// error, a [*FenceError], an error for which errors.Is(err, ErrConflict) is
// true for a serialization failure or deadlock, one for which errors.Is(err,
// ErrCommitUnknown) is true when the write may or may not have committed,
// [ErrNoLocks], or the error of acquiring the lock or of Postgres. Only
// with ErrCommitUnknown may the write have happened; and no committed
// write is left unannounced: only a commit creates an outbox row, and the
// relay publishes every row nobody confirmed.
func (t *Table[K, V]) Update(ctx context.Context, key K, fn TxFunc[V]) (cache.Change[V], error) {
	return t.write(ctx, key, true, fn)
}

// UpdateOptimistic is [Table.Update] without the lock: fn must detect a
// concurrent change itself, typically with UPDATE ... WHERE version =
// $expected and [ExpectRows], and the write rolls back with an error for
// which errors.Is(err, ErrConflict) is true when it lost the race. Use
// [RetryConflicts] to retry a read-modify-write.
func (t *Table[K, V]) UpdateOptimistic(ctx context.Context, key K, fn TxFunc[V]) (cache.Change[V], error) {
	return t.write(ctx, key, false, fn)
}

// write runs steps 1 to 6 of Update; without locked, steps 2 to 5 with no
// fence.
func (t *Table[K, V]) write(ctx context.Context, key K, locked bool, fn TxFunc[V]) (cache.Change[V], error) {
	if err := t.check(); err != nil {
		return cache.Change[V]{}, err
	}
	if fn == nil {
		return cache.Change[V]{}, fmt.Errorf("%w: nil write function", ErrInvalidOptions)
	}
	skey, err := t.cache.EncodeKey(key)
	if err != nil {
		return cache.Change[V]{}, err
	}
	var ch cache.Change[V]
	if err := t.store.guarded(ctx, t.cache.Namespace(), skey, locked, t.txBody(key, skey, fn, &ch)); err != nil {
		return cache.Change[V]{}, err
	}
	return ch, nil
}

// txBody returns the body of a write of key (skey on the bus) for guarded:
// steps 2 to 5 of Update, under l (nil: no fence), reporting fn's change
// in *ch.
func (t *Table[K, V]) txBody(key K, skey string, fn TxFunc[V], ch *cache.Change[V]) func(ctx context.Context, l *lockguard.Lock) (committed, published bool, err error) {
	s, ns := t.store, t.cache.Namespace()
	return func(ctx context.Context, l *lockguard.Lock) (committed, published bool, err error) {
		var seq int64
		var pos uint64
		// cache.Update takes its guard token before the transaction
		// starts, so that the install of step 4 is skipped if an
		// invalidation of key from elsewhere overtakes it (race 13). It
		// publishes on the context of afterCommit: once the transaction
		// has committed, neither the caller giving up nor the lock being
		// lost may keep the other nodes waiting for the relay.
		// The publication, which cache.Update makes only after the
		// commit, may carry the release (see afterCommit).
		pctx, cancel := s.afterCommit(ctx, l)
		defer cancel()
		perr := t.cache.Update(pctx, key, func(context.Context) (cache.Change[V], error) {
			var err error
			seq, pos, err = s.commit(ctx, ns, skey, l, s.grace, func(ctx context.Context, tx pgx.Tx) (int64, error) {
				var err error
				*ch, err = fn(ctx, tx)
				return ch.Version, err
			})
			if err != nil {
				// fn's error, or the commit's: the transaction rolled
				// back (or its outcome is unknown, which the outbox
				// covers). Never a deletion, whatever the error wraps.
				return cache.Change[V]{}, err
			}
			committed = true
			ch.Position = pos
			return *ch, nil
		})
		if !committed {
			return false, false, perr
		}
		return true, s.afterPublish(ctx, ns, skey, seq, perr), nil
	}
}

func (t *Table[K, V]) check() error {
	if t == nil || t.store == nil || t.cache == nil {
		return fmt.Errorf("%w: a Table needs a Store and a Cache (use NewTable)", ErrInvalidOptions)
	}
	return nil
}
