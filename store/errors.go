package store

import (
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgconn"
)

var (
	// ErrFenced reports that a write was rejected because its lock's
	// fencing token was not greater than the newest one Postgres has seen
	// for that lock: the lock expired while its holder was stalled, and
	// another holder has written since (DESIGN race 6). The write rolled
	// back. The error is a [*FenceError].
	ErrFenced = errors.New("store: fencing token rejected")

	// ErrConflict reports a lost optimistic race: the row changed since it
	// was read (see [ExpectRows]), or Postgres aborted the transaction with
	// a serialization failure or a deadlock. The write rolled back and may
	// be retried; see [RetryConflicts].
	ErrConflict = errors.New("store: conflict")

	// ErrCommitUnknown reports a write whose outcome is unknown: the
	// connection failed, or ctx ended, after COMMIT was sent and before
	// its reply came. The write may have committed; if it did, its outbox
	// row announces it (after [Options.Grace]). Do not report it as
	// "nothing written", and retry only a write that is safe to apply
	// twice.
	ErrCommitUnknown = errors.New("store: commit outcome unknown")

	// ErrNoLocks is returned by lock-guarded writes of a Store built
	// without [Options.Locks].
	ErrNoLocks = errors.New("store: no lock guard configured")

	// ErrInvalidOptions is returned by [New] and [Migrate] for arguments
	// they cannot use.
	ErrInvalidOptions = errors.New("store: invalid options")
)

// ErrUnproven is returned by [Store.RelayOnce] when the Publisher's link is
// not proven (see [Publisher]): the relay claims nothing and leaves the
// rows to the relays of nodes whose link is.
var ErrUnproven = errors.New("store: the publisher's link is not proven")

// FenceError is the error of a write whose fencing token was rejected.
type FenceError struct {
	Lock   string // the lock's name
	Token  int64  // the writer's token
	Stored int64  // the newest token Postgres has seen for the lock
}

func (e *FenceError) Error() string {
	return fmt.Sprintf("store: fencing token %d of lock %q rejected: Postgres has seen %d", e.Token, e.Lock, e.Stored)
}

// Is reports whether target is ErrFenced.
func (e *FenceError) Is(target error) bool { return target == ErrFenced }

// translate maps Postgres errors callers may want to handle to this
// package's errors, keeping the original in the chain.
func translate(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "40001", "40P01": // serialization_failure, deadlock_detected
			return fmt.Errorf("%w: %w", ErrConflict, err)
		case "26000", "42P05": // invalid_sql_statement_name, duplicate_prepared_statement
			return fmt.Errorf("%w (%s)", err, poolerHint)
		}
	}
	return err
}

// poolerHint explains the errors of pgx's prepared statements behind a
// pooler in transaction mode: a statement prepared on one server
// connection is missing on the next one the pooler hands out, or already
// there under the same name. The package never deallocates a statement,
// so either error means that statements moved between connections.
const poolerHint = "prepared statements do not survive a pooler in transaction mode: " +
	"add default_query_exec_mode=exec to the database URL (see the store package's Pooled deployment)"
