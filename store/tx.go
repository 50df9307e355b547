package store

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
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
// trips: BEGIN with the skip of the row's capture and the fence (see
// beginQuery), body's statements, and the outbox upsert pipelined with
// COMMIT and the read of the position.
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
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{BeginQuery: s.beginQuery(ns, key, l)})
	if err != nil {
		var pgErr *pgconn.PgError
		if l != nil && errors.As(err, &pgErr) && pgErr.Code == sqlstateFenced {
			// The fence raised: its DETAIL is the stored token. pgx keeps
			// the connection (a non-fatal error); the deferred ROLLBACK
			// ends the aborted transaction.
			stored, _ := strconv.ParseInt(pgErr.Detail, 10, 64)
			return 0, 0, &FenceError{Lock: l.Name(), Token: l.Token(), Stored: stored}
		}
		if l != nil && errors.As(err, &pgErr) && pgErr.Code == "42883" && strings.Contains(pgErr.Message, ".fence(") {
			// undefined_function: the schema predates migration 0003.
			return 0, 0, fmt.Errorf("store: begin: the schema %q lacks the fence function; run store.Migrate: %w", s.schema, err)
		}
		return 0, 0, fmt.Errorf("store: begin: %w", translate(err))
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

// sqlstateFenced is the SQLSTATE of the schema's fence function when it
// rejects a token (see the migration 0003).
const sqlstateFenced = "CF001"

// beginQuery returns the text of the BEGIN of a write of key of ns: one
// simple query of up to three statements, one round trip. BEGIN; then the
// skip of the row's capture (the store records its own outbox row for (ns,
// key), with the version; the capture trigger of a captured table skips
// exactly that row, and captures every other row the transaction changes:
// see the migration 0002); then, when l is not nil, the fence: the
// schema's fence function (migration 0003) checks and advances l's fencing
// token, and raises SQLSTATE CF001 if it is not greater than the stored
// one. Its upsert locks the lock's fence row until the transaction ends,
// before fn's first statement, so fenced writers of one lock commit in
// token order:
//
//	A (token 7): fence ok ........ stalls; its lease runs out ....... commit
//	B (token 8):                              fence: waits for A's row lock
//
// either A commits first and B then advances 7 to 8, or B got the row first
// and A's 7 is rejected.
//
// The query has no bind parameters, so that pgx sends it with the simple
// protocol in every QueryExecMode and a pooler in transaction mode sees it
// as the start of the transaction. (A pgx.Batch of BEGIN and bound
// statements would do too, but fn needs a pgx.Tx, which pgx makes only by
// sending a BEGIN of its own: another round trip.) SQL is otherwise always
// parameterised; here every value is written by this function from a
// closed alphabet, never taken from the caller as text: the skip and the
// lock's name hash are hex of sha256 digests (64 characters of [0-9a-f],
// quoted, and decoded with decode(…, 'hex') so that no backslash escape is
// involved whatever standard_conforming_strings says), the token is a
// decimal int64 ([-0-9]), and the schema is the identifier New validated
// and quoted.
func (s *Store) beginQuery(ns, key string, l *lockguard.Lock) string {
	skip := outboxKeyHex(ns, key)
	if l == nil {
		return "BEGIN; SET LOCAL coherent.skip = '" + skip + "'"
	}
	name := sha256.Sum256([]byte(l.Name()))
	return "BEGIN; SET LOCAL coherent.skip = '" + skip + "'; SELECT " + s.ident + ".fence(decode('" +
		hex.EncodeToString(name[:]) + "', 'hex'), " + strconv.FormatInt(l.Token(), 10) + ")"
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
