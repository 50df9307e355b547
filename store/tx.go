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

	"github.com/coherentcache/coherent/lockguard"
)

// commit runs body in a transaction that, when l is not nil, first checks
// and advances l's fencing token, and that records the change in the outbox
// as it commits. It returns the outbox row's seq and a source position at
// or after the commit (the WAL insert position read right after COMMIT; 0
// if it could not be read), for the invalidation (DESIGN race 10). Round
// trips: BEGIN (with the skip of the row's capture), the fence, body's
// statements, and the outbox upsert pipelined with COMMIT and the read of
// the position.
func (s *Store) commit(ctx context.Context, ns, key string, l *lockguard.Lock, delay time.Duration, body func(ctx context.Context, tx pgx.Tx) (int64, error)) (seq int64, pos uint64, err error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("store: %w", translate(err))
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
		return 0, 0, fmt.Errorf("store: begin: %w", translate(err))
	}
	if l != nil {
		if err := s.fence(ctx, tx, l); err != nil {
			return 0, 0, err
		}
	}
	version, err := body(ctx, tx)
	if err != nil {
		return 0, 0, translate(err)
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
	// Read after COMMIT returned, in the same round trip: the position is
	// at or after the commit record, so a replica that has replayed it
	// holds the write. Its failure does not fail the committed write: the
	// position is then unknown (0).
	batch.Queue(sqlPosition).QueryRow(func(r pgx.Row) error {
		var p int64
		if err := r.Scan(&p); err != nil {
			s.log.Warn("store: reading the WAL position after a commit", "err", err)
			return nil
		}
		pos = uint64(p)
		return nil
	})
	if err := conn.SendBatch(ctx, &batch).Close(); err != nil {
		if unknownOutcome(err) {
			return 0, 0, fmt.Errorf("store: outbox and commit: %w: %w", ErrCommitUnknown, err)
		}
		return 0, 0, fmt.Errorf("store: outbox and commit: %w", translate(err))
	}
	if tag.String() != "COMMIT" {
		// COMMIT of a failed transaction answers ROLLBACK: body hid an
		// error of one of its statements.
		return 0, 0, fmt.Errorf("store: commit: %w", pgx.ErrTxCommitRollback)
	}
	s.traceCommit(ctx, ns, key, version)
	return seq, pos, nil
}

// sqlPosition reads the primary's current WAL insert position as a number
// of bytes: a source position in the sense of package cache.
const sqlPosition = `SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint`

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
