package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coherentcache/coherent/internal/backoff"
)

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
