package store

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/backoff"
	"github.com/coherentcache/coherent/lockguard"
)

// Change is what a write function reports about the row it wrote; see
// [cache.Change]. A deletion is a Change with Deleted set, never an error.
type Change[V any] = cache.Change[V]

// TxFunc writes one row inside tx and reports what it wrote. It must not
// commit or roll back tx.
type TxFunc[V any] func(ctx context.Context, tx pgx.Tx) (Change[V], error)

// Update writes key of c's namespace through the lock guard and makes every
// node see the change. The sequence:
//
//  1. acquire the lockguard lock of (namespace, key);
//  2. begin; check and advance the lock's fencing token in Postgres (a
//     token not greater than the stored one rolls back with a [*FenceError]);
//  3. run fn; record the change in the outbox; commit;
//  4. install the committed row in c on this node (G1);
//  5. publish the invalidation through c's bus (G2); delete the outbox row;
//  6. release the lock.
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
// a few seconds. Update returns fn's error, a
// [*FenceError], an error for which errors.Is(err, ErrConflict) is true for
// a serialization failure or deadlock, one for which errors.Is(err,
// ErrCommitUnknown) is true when the write may or may not have committed,
// [ErrNoLocks], or the error of acquiring the lock or of Postgres. Only
// with ErrCommitUnknown may the write have happened. None of them leaves a committed write
// unannounced: only a commit creates an outbox row, and the relay publishes
// every row nobody confirmed.
func Update[K comparable, V any](ctx context.Context, s *Store, c *cache.Cache[K, V], key K, fn TxFunc[V]) (Change[V], error) {
	if s.locks == nil {
		return Change[V]{}, ErrNoLocks
	}
	skey, err := c.EncodeKey(key)
	if err != nil {
		return Change[V]{}, err
	}
	name := lockName(c.Namespace(), skey)
	ctx = s.traceWriteStart(ctx, c.Namespace(), skey, true)
	var ch Change[V]
	var committed, published bool
	err = s.locks.WithLock(ctx, name, func(ctx context.Context, l *lockguard.Lock) error {
		var err error
		ch, committed, published, err = writeThrough(ctx, s, c, key, skey, l, fn)
		return err
	})
	if committed {
		// Whatever happened to the lock afterwards, the fence let the
		// commit through: it is a write like any other.
		s.traceWriteEnd(ctx, true, published, nil)
		return ch, nil
	}
	s.healFence(ctx, err)
	s.traceWriteEnd(ctx, false, false, err)
	return Change[V]{}, err
}

// UpdateOptimistic is [Update] without the lock: fn must detect a
// concurrent change itself, typically with UPDATE ... WHERE version =
// $expected and [ExpectRows], and the write rolls back with an error for
// which errors.Is(err, ErrConflict) is true when it lost the race. Use
// [RetryConflicts] to retry a read-modify-write.
func UpdateOptimistic[K comparable, V any](ctx context.Context, s *Store, c *cache.Cache[K, V], key K, fn TxFunc[V]) (Change[V], error) {
	skey, err := c.EncodeKey(key)
	if err != nil {
		return Change[V]{}, err
	}
	ctx = s.traceWriteStart(ctx, c.Namespace(), skey, false)
	ch, committed, published, err := writeThrough(ctx, s, c, key, skey, nil, fn)
	if committed {
		s.traceWriteEnd(ctx, true, published, nil)
		return ch, nil
	}
	s.traceWriteEnd(ctx, false, false, err)
	return Change[V]{}, err
}

// writeThrough runs steps 2 to 5 of Update; l is nil for optimistic writes.
// It reports whether the transaction committed and whether the writer
// published its invalidation.
func writeThrough[K comparable, V any](ctx context.Context, s *Store, c *cache.Cache[K, V], key K, skey string, l *lockguard.Lock, fn TxFunc[V]) (ch Change[V], committed, published bool, err error) {
	ns := c.Namespace()
	var seq int64
	// cache.Update takes its guard token before the transaction starts, so
	// that the install of step 4 is skipped if an invalidation of key from
	// elsewhere overtakes it (race 13). It publishes on pctx: once the
	// transaction has committed, neither the caller giving up nor the lock
	// being lost may keep the other nodes waiting for the relay.
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.pubTTL)
	defer cancel()
	err = c.Update(pctx, key, func(context.Context) (Change[V], error) {
		var err error
		seq, err = s.commit(ctx, ns, skey, l, s.grace, func(ctx context.Context, tx pgx.Tx) (int64, error) {
			var err error
			ch, err = fn(ctx, tx)
			return ch.Version, err
		})
		if err != nil {
			// fn's error, or the commit's: the transaction rolled back
			// (or its outcome is unknown, which the outbox covers). Never
			// a deletion, whatever the error wraps.
			return Change[V]{}, err
		}
		committed = true
		return ch, nil
	})
	if !committed {
		return Change[V]{}, false, false, err
	}
	return ch, true, s.afterPublish(ctx, ns, skey, seq, err), nil
}

// afterPublish ends a committed write: it confirms the change's outbox row
// if the publication (whose error is err) succeeded, and otherwise makes
// the row due at once, so that the relay of a node whose link works
// publishes it within milliseconds, woken by the outbox's notification,
// rather than after Grace (the write returns nil, so G2 covers it). It
// reports whether the writer published.
func (s *Store) afterPublish(ctx context.Context, ns, key string, seq int64, err error) bool {
	if err == nil {
		s.confirm(ctx, ns, key, seq)
		return true
	}
	s.publishFailures.Add(1)
	if derr := s.makeDue(ctx, ns, key, seq); derr != nil {
		s.log.Warn("store: committed, but neither published nor handed to the relays; a relay publishes it after Grace",
			"namespace", ns, "err", err, "outbox_err", derr)
		return false
	}
	s.log.Warn("store: committed, but the invalidation was not published; handed to the relays",
		"namespace", ns, "err", err)
	return false
}

// Write runs fn in a lock-guarded, fenced transaction for key of namespace,
// records the change in the outbox, and after the commit publishes an
// invalidation through [Options.Publisher], which drops key on every node,
// this one included. It is the write path for code that holds no cache of
// the namespace; with one, [Update] also installs the new row locally.
//
// ctx bounds the wait for the lock and the transaction, and is cancelled
// for fn if the lock is lost; a committed write is published regardless. If
// the publication fails, or there is no Publisher, Write still succeeds,
// and the outbox row is due at once for the relays of other nodes.
func (s *Store) Write(ctx context.Context, namespace, key string, fn func(ctx context.Context, tx pgx.Tx) error) error {
	if s.locks == nil {
		return ErrNoLocks
	}
	if err := checkName(namespace, key); err != nil {
		return err
	}
	ctx = s.traceWriteStart(ctx, namespace, key, true)
	var seq int64
	var committed, published bool
	err := s.locks.WithLock(ctx, lockName(namespace, key), func(ctx context.Context, l *lockguard.Lock) error {
		var err error
		// Without a Publisher the row is due at once: another node's
		// relay publishes it.
		delay := s.grace
		if s.pub == nil {
			delay = 0
		}
		seq, err = s.commit(ctx, namespace, key, l, delay, func(ctx context.Context, tx pgx.Tx) (int64, error) {
			return 0, fn(ctx, tx)
		})
		if err != nil {
			return err
		}
		committed = true
		if s.pub == nil {
			return nil
		}
		// Committed: publish even if ctx ends now (see writeThrough).
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.pubTTL)
		defer cancel()
		published = s.afterPublish(ctx, namespace, key, seq, s.pub.Publish(pctx, namespace, []cache.Invalidation{{Key: key}}))
		return nil
	})
	if committed {
		s.traceWriteEnd(ctx, true, published, nil)
		return nil
	}
	s.healFence(ctx, err)
	s.traceWriteEnd(ctx, false, false, err)
	return err
}

func checkName(namespace, key string) error {
	if namespace == "" || len(namespace) > cache.MaxKeyLen || key == "" || len(key) > cache.MaxKeyLen {
		return fmt.Errorf("%w: namespace and key must be 1 to %d bytes", cache.ErrInvalidKey, cache.MaxKeyLen)
	}
	return nil
}

// commit runs body in a transaction that, when l is not nil, first checks
// and advances l's fencing token, and that records the change in the outbox
// as it commits. It returns the outbox row's seq. Round trips: BEGIN (with
// capture turned off), the fence, body's statements, and the outbox upsert
// pipelined with COMMIT.
func (s *Store) commit(ctx context.Context, ns, key string, l *lockguard.Lock, delay time.Duration, body func(ctx context.Context, tx pgx.Tx) (int64, error)) (seq int64, err error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return 0, fmt.Errorf("store: %w", translate(err))
	}
	defer func() {
		if conn.Conn().PgConn().TxStatus() != 'I' {
			// Not committed: roll back, even if ctx is done, so that the
			// connection goes back to the pool clean (the pool would
			// otherwise close it).
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			conn.Exec(rctx, "ROLLBACK")
			cancel()
		}
		conn.Release()
	}()
	// The store records its own outbox row for (ns, key), with the
	// version; the capture trigger of a captured table skips exactly that
	// row, and captures every other row the transaction changes (see the
	// migration 0002). The setting is the hex form of the row's key hash:
	// 64 characters of [0-9a-f], computed here, so it can stand in the
	// statement as a literal and BEGIN stays one round trip.
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{BeginQuery: "BEGIN; SET LOCAL coherent.skip = '" + outboxKeyHex(ns, key) + "'"})
	if err != nil {
		return 0, fmt.Errorf("store: begin: %w", translate(err))
	}
	if l != nil {
		if err := s.fence(ctx, tx, l); err != nil {
			return 0, err
		}
	}
	version, err := body(ctx, tx)
	if err != nil {
		return 0, translate(err)
	}
	// One round trip for the outbox row and the commit. tx is left
	// unfinished on purpose: the batch commits on the server, and
	// tx.Commit would send a second COMMIT.
	var batch pgx.Batch
	batch.Queue(s.sql.outboxPut, []byte(ns), []byte(key), version, delay.Seconds()).QueryRow(func(r pgx.Row) error {
		return r.Scan(&seq)
	})
	var tag pgconn.CommandTag
	batch.Queue("COMMIT").Exec(func(ct pgconn.CommandTag) error {
		tag = ct
		return nil
	})
	if err := conn.SendBatch(ctx, &batch).Close(); err != nil {
		if unknownOutcome(err) {
			return 0, fmt.Errorf("store: outbox and commit: %w: %w", ErrCommitUnknown, err)
		}
		return 0, fmt.Errorf("store: outbox and commit: %w", translate(err))
	}
	if tag.String() != "COMMIT" {
		// COMMIT of a failed transaction answers ROLLBACK: body hid an
		// error of one of its statements.
		return 0, fmt.Errorf("store: commit: %w", pgx.ErrTxCommitRollback)
	}
	s.traceCommit(ctx, ns, key, version)
	if s.afterCommit != nil {
		if err := s.afterCommit(); err != nil {
			return 0, err
		}
	}
	return seq, nil
}

// unknownOutcome reports whether err, from the round trip that carries
// COMMIT, leaves the transaction's outcome unknown: the server answered
// with an error (the transaction rolled back), or nothing was sent, or
// else the COMMIT may have run.
func unknownOutcome(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return false
	}
	return !pgconn.SafeToRetry(err)
}

// outboxKeyHex is the hex form of the outbox's key_hash of key in ns:
// sha256(int4send(length(ns)) || ns || key), as outbox_key computes it.
func outboxKeyHex(ns, key string) string {
	h := sha256.New()
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(ns)))
	h.Write(n[:])
	h.Write([]byte(ns))
	h.Write([]byte(key))
	return hex.EncodeToString(h.Sum(nil))
}

// fence checks and advances l's fencing token inside tx, in one round trip. The upsert locks the lock's fence row until
// the transaction ends, so fenced writers of one lock commit in token order:
//
//	A (token 7): fence ok ........ stalls; its lease runs out ....... commit
//	B (token 8):                              fence: waits for A's row lock
//
// either A commits first and B then advances 7 to 8, or B got the row first
// and A's 7 is rejected.
func (s *Store) fence(ctx context.Context, tx pgx.Tx, l *lockguard.Lock) error {
	var advanced bool
	var stored int64
	err := tx.QueryRow(ctx, s.sql.fence, []byte(l.Name()), l.Token()).Scan(&advanced, &stored)
	if err != nil {
		return fmt.Errorf("store: fence: %w", translate(err))
	}
	if !advanced {
		return &FenceError{Lock: l.Name(), Token: l.Token(), Stored: stored}
	}
	return nil
}

// healFence recovers from a lock counter that went backwards (Redis lost
// it): every token would be rejected until the counter passes the token
// Postgres stored. Advancing is harmless after an ordinary rejection too.
func (s *Store) healFence(ctx context.Context, err error) {
	var fe *FenceError
	if !errors.As(err, &fe) || s.locks == nil {
		return
	}
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.locks.AdvanceFence(actx, fe.Lock, fe.Stored); err != nil {
		s.log.Warn("store: advance fence", "lock", fe.Lock, "err", err)
	}
}

// confirm deletes the outbox row of a published change, unless a later
// change of the key replaced it (then its own writer, or the relay, takes
// care of it). While a relay runs on this Store, confirmations are batched
// off the write's path (see confirmLoop); otherwise the row is deleted
// here. A lost confirmation only means the relay publishes the change
// again, which is harmless.
func (s *Store) confirm(ctx context.Context, ns, key string, seq int64) {
	if s.relays.Load() > 0 {
		select {
		case s.confirms <- confirmation{ns: ns, key: key, seq: seq}:
			return
		default: // the confirmer is behind; do it here
		}
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := s.pool.Exec(cctx, s.sql.confirm, [][]byte{[]byte(ns)}, [][]byte{[]byte(key)}, []int64{seq}); err != nil {
		s.log.Warn("store: confirm outbox row", "namespace", ns, "err", err)
	}
}

// confirmation identifies the outbox row of a published change.
type confirmation struct {
	ns, key string
	seq     int64
}

// confirmLinger is how long confirmLoop waits for more confirmations after
// the first of a batch. It is far below any sensible Grace, so the relay
// rarely republishes a change that was confirmed.
const confirmLinger = 5 * time.Millisecond

// confirmLoop deletes confirmed outbox rows in batches, until ctx ends; then
// it confirms what is queued and returns. It runs inside RunRelay.
func (s *Store) confirmLoop(ctx context.Context) {
	var nss, keys [][]byte
	var seqs []int64
	flush := func() {
		if len(seqs) == 0 {
			return
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if _, err := s.pool.Exec(cctx, s.sql.confirm, nss, keys, seqs); err != nil {
			s.log.Warn("store: confirm outbox rows", "rows", len(seqs), "err", err)
		}
		cancel()
		nss, keys, seqs = nss[:0], keys[:0], seqs[:0]
	}
	add := func(c confirmation) {
		nss, keys, seqs = append(nss, []byte(c.ns)), append(keys, []byte(c.key)), append(seqs, c.seq)
	}
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case c := <-s.confirms:
					add(c)
				default:
					flush()
					return
				}
			}
		case c := <-s.confirms:
			add(c)
			if len(seqs) == 1 {
				linger.Reset(confirmLinger)
			}
			if len(seqs) >= 512 {
				linger.Stop()
				flush()
			}
		case <-linger.C:
			flush()
		}
	}
}

// ExpectRows returns an error for which errors.Is(err, ErrConflict) is true
// when tag reports other than n affected rows: the optimistic condition
// (WHERE version = $expected) matched nothing.
func ExpectRows(tag pgconn.CommandTag, n int64) error {
	if tag.RowsAffected() != n {
		return fmt.Errorf("%w: %s affected %d rows, want %d", ErrConflict, tag.String(), tag.RowsAffected(), n)
	}
	return nil
}

// RetryConflicts calls fn until it returns an error for which
// errors.Is(err, ErrConflict) is false, or attempts calls have been made,
// waiting a short, growing, jittered time between calls. It returns fn's
// last error, or ctx.Err() if ctx ends while waiting.
func RetryConflicts(ctx context.Context, attempts int, fn func(ctx context.Context) error) error {
	return conflictBackoff.Retry(ctx, attempts, func(err error) bool { return errors.Is(err, ErrConflict) }, fn)
}

// conflictBackoff spaces the attempts of RetryConflicts.
var conflictBackoff = backoff.Policy{Min: time.Millisecond, Max: 100 * time.Millisecond}
