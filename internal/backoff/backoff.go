// Package backoff is the one retry schedule of the module: capped,
// jittered exponential waits, and a sleep that a context ends. The bus's
// reconnections, the relay's failures and its LISTEN connection, the lock
// guard's waits and the store's optimistic retries all use it.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy is a capped exponential backoff with jitter: the wait after
// failure n (from 0) is drawn uniformly from [b/2, b], where b is Min
// doubled n times and capped at Max. The lower bound b/2 ≥ Min/2 caps the
// rate of attempts at 2/Min, falling to 2/Max once b has reached Max; the
// jitter spreads the attempts of many clients that failed together.
type Policy struct {
	Min, Max time.Duration
}

// Wait returns the wait after failure n (from 0). n below 0 counts as 0.
// A Min or Max of 0 or less gives 0.
func (p Policy) Wait(n int) time.Duration {
	if p.Min <= 0 || p.Max <= 0 {
		return 0
	}
	b := min(p.Min, p.Max)
	for i := 0; i < n && b < p.Max; i++ {
		if b > p.Max/2 { // also keeps b*2 from overflowing
			b = p.Max
			break
		}
		b *= 2
	}
	return b/2 + rand.N(b/2+1)
}

// Sleep waits for d, and reports true, unless ctx ends first; then it
// reports false at once.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Retry calls fn until it returns nil or an error for which again reports
// false, or attempts calls have been made (at least one), sleeping p.Wait
// between calls. It returns fn's last error, or ctx.Err() if ctx ends
// while it sleeps.
func (p Policy) Retry(ctx context.Context, attempts int, again func(error) bool, fn func(ctx context.Context) error) error {
	var err error
	for n := 0; ; n++ {
		if err = fn(ctx); err == nil || !again(err) || n+1 >= attempts {
			return err
		}
		if !Sleep(ctx, p.Wait(n)) {
			return ctx.Err()
		}
	}
}
