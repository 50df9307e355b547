package store

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/lockguard"
)

// Write runs fn in a lock-guarded, fenced transaction for key of namespace,
// records the change in the outbox, and after the commit publishes an
// invalidation through [Options.Publisher], which drops key on every node,
// this one included. It is the write path for code that holds no cache of
// the namespace; with one, [Table.Update] also installs the new row
// locally. key is the key's text form on the bus: what the caches' key
// codec makes of it (cache.Cache.EncodeKey).
//
// ctx bounds the wait for the lock and the transaction, and is cancelled
// for fn if the lock is lost; a committed write is published regardless. If
// the publication fails, or there is no Publisher, Write still succeeds,
// and the outbox row is due at once for the relays of other nodes. Write
// returns the errors [Table.Update] does.
func (s *Store) Write(ctx context.Context, namespace, key string, fn func(ctx context.Context, tx pgx.Tx) error) error {
	if err := checkName(namespace, key); err != nil {
		return err
	}
	return s.guarded(ctx, namespace, key, true, func(ctx context.Context, l *lockguard.Lock) (committed, published bool, err error) {
		// Without a Publisher the row is due at once: another node's
		// relay publishes it.
		delay := s.grace
		if s.pub == nil {
			delay = 0
		}
		seq, pos, err := s.commit(ctx, namespace, key, l, delay, func(ctx context.Context, tx pgx.Tx) (int64, error) {
			return 0, fn(ctx, tx)
		})
		if err != nil {
			return false, false, err
		}
		if s.pub == nil {
			return true, false, nil
		}
		pctx, cancel := s.afterCommit(ctx, l)
		defer cancel()
		return true, s.afterPublish(ctx, namespace, key, seq, s.pub.Publish(pctx, namespace, []cache.Invalidation{{Key: key, Position: pos}})), nil
	})
}

// guarded runs body, one write of key of ns, under the key's lock if
// locked, traced; body reports whether its transaction committed and
// whether the writer published. A write that committed succeeds, whatever
// happened to the lock afterwards: the fence already decided. A fence
// rejection heals the lock's counter (healFence).
func (s *Store) guarded(ctx context.Context, ns, key string, locked bool, body func(ctx context.Context, l *lockguard.Lock) (committed, published bool, err error)) error {
	if locked && s.locks == nil {
		return ErrNoLocks
	}
	ctx = s.traceWriteStart(ctx, ns, key, locked)
	var committed, published bool
	var err error
	if locked {
		err = s.locks.WithLock(ctx, lockName(ns, key), func(ctx context.Context, l *lockguard.Lock) error {
			var err error
			committed, published, err = body(ctx, l)
			return err
		})
	} else {
		committed, published, err = body(ctx, nil)
	}
	if committed {
		s.traceWriteEnd(ctx, true, published, nil)
		return nil
	}
	s.healFence(ctx, err)
	s.traceWriteEnd(ctx, false, false, err)
	return err
}

// afterCommit returns the context of a write's publication, which follows
// its commit. It keeps ctx's values but not its cancellation, and is
// bounded by PublishTimeout. For a write under l (nil: none) it also
// carries l's release, which the publication then sends in its own round
// trip where the bus can (lockguard's Lock.ReleaseOnPublish: a Redis bus
// of package invalidate on the lock guard's own client, one server); the
// release that follows the publication (Guard.WithLock) then only collects
// the outcome. Nothing else is published with it, and the publication
// comes after the commit, so the lock is held until the write's
// invalidation is out, as when the release follows it in a round trip of
// its own; see invalidate.PubSub's send for why the order would not
// matter either.
func (s *Store) afterCommit(ctx context.Context, l *lockguard.Lock) (context.Context, context.CancelFunc) {
	if l != nil {
		ctx = l.ReleaseOnPublish(ctx)
	}
	return context.WithTimeout(context.WithoutCancel(ctx), s.pubTTL)
}
