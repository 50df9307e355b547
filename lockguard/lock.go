package lockguard

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/piggyback"
)

// Lock is one acquisition of a named lock. It is safe for concurrent use,
// but it belongs to the holder that acquired it: the holder ends it with
// [Lock.Release].
type Lock struct {
	g     *Guard
	name  string
	keys  lockKeys
	value string // random, unique to this acquisition; proves ownership to the scripts
	token int64  // fencing token
	lost  chan struct{}

	// opMu serializes the round trips that change the lease (Extend, the
	// watchdog's renewals, Release), so that deadline always follows the
	// PEXPIRE that Redis ran last.
	opMu sync.Mutex

	// stopWatch, watchDone and rearm are set once by newLock and only
	// read after; all are nil without a watchdog.
	stopWatch context.CancelFunc
	watchDone chan struct{}
	rearm     chan struct{} // an Extend tells the watchdog to renew TTL/3 after it

	mu         sync.Mutex // protects the fields below
	ttl        time.Duration
	deadline   time.Time   // local end of the lease, on the monotonic clock
	lease      *time.Timer // declares the lock lost at deadline
	cause      error       // why the lock was lost; nil while held and after a Release
	released   bool        // Release was called, or a bus took the release
	releasedOK bool        // the release script ran: the key is not ours any more
	lostClosed bool

	onLose       func(cause error) // WithLock's cancellation of its function's context; see lostNow
	ride         *piggyback.Rider  // set by ReleaseOnPublish
	rideErr      error             // the outcome of a release a bus sent
	rideReported bool              // Release has returned rideErr
}

func (g *Guard) newLock(name string, keys lockKeys, value string, token int64, begin time.Time) *Lock {
	l := &Lock{
		g:     g,
		name:  name,
		keys:  keys,
		value: value,
		token: token,
		lost:  make(chan struct{}),
		ttl:   g.ttl,
	}
	l.mu.Lock()
	l.deadline = leaseEnd(begin, l.ttl)
	l.lease = time.AfterFunc(time.Until(l.deadline), l.leaseRanOut)
	l.mu.Unlock()
	if g.watchdog {
		ctx, cancel := context.WithCancel(context.Background())
		l.stopWatch = cancel
		l.watchDone = make(chan struct{})
		l.rearm = make(chan struct{}, 1)
		go l.watch(ctx)
	}
	return l
}

// leaseEnd returns when a lease of ttl that was requested at begin ends,
// as far as the holder may assume. Redis counts the lease from when it runs
// the command, later than begin; the margin covers the rate difference
// between its clock and ours, and its millisecond expiry resolution.
func leaseEnd(begin time.Time, ttl time.Duration) time.Time {
	return begin.Add(ttl - min(ttl/100+2*time.Millisecond, ttl/2))
}

// Name returns the lock's name, as passed to [Guard.Acquire].
func (l *Lock) Name() string { return l.name }

// Token returns the fencing token of this acquisition. Tokens of a lock
// name strictly increase from one acquisition to the next, across
// processes and restarts of the client, as long as the fence counter in
// Redis survives (see the package documentation).
//
// Pass the token to the resource the lock protects, and have the resource
// reject a write whose token is not greater than the greatest it has
// accepted. A holder whose lease ran out while it stalled then cannot
// overwrite the work of the holder that came after it, whatever the state
// of Redis.
func (l *Lock) Token() int64 { return l.token }

// Lost returns a channel that is closed when the lock is no longer held:
// when Extend or a renewal by the watchdog finds that another owner holds
// the lock (or nobody does), when the lease ran out locally without a
// successful renewal, or when Release is called. The lease runs out
// locally slightly before it does in Redis, so a holder that watches Lost
// normally learns of an expiry before another owner can acquire the lock;
// a process pause or a jump of Redis's clock can still defeat that, which
// is why writes must be fenced ([Lock.Token]).
func (l *Lock) Lost() <-chan struct{} { return l.lost }

// Extend resets the lease to ttl from now, which also becomes the lease
// that the watchdog renews. ttl may be shorter than the current lease.
// Extend never takes back a lock that was lost: if the lock is no longer
// held by this acquisition it returns an error for which errors.Is(err,
// ErrNotHeld) is true and closes [Lock.Lost]. ttl must be at least a
// millisecond ([ErrInvalidTTL]). ctx bounds the round trip to Redis.
//
// If Redis fails, Extend returns its error and the lease is assumed to end
// at the earlier of its old end and ttl from now, since the command may or
// may not have run.
func (l *Lock) Extend(ctx context.Context, ttl time.Duration) error {
	if ttl < time.Millisecond {
		return fmt.Errorf("%w: %v is less than 1ms", ErrInvalidTTL, ttl)
	}
	err := l.extend(ctx, ttl)
	if err == nil {
		// The watchdog's next renewal was planned for the old lease,
		// which may have been longer: have it plan again.
		select {
		case l.rearm <- struct{}{}:
		default:
		}
	}
	return err
}

// extend runs extendScript with ttl, or with the current lease if ttl is 0.
func (l *Lock) extend(ctx context.Context, ttl time.Duration) error {
	l.opMu.Lock()
	defer l.opMu.Unlock()

	l.mu.Lock()
	if err := l.notHeldLocked(); err != nil {
		l.mu.Unlock()
		return err
	}
	if ttl == 0 {
		ttl = l.ttl
	}
	l.mu.Unlock()

	begin := time.Now()
	n, err := extendScript.Run(ctx, l.g.client, []string{l.keys.lock}, l.value, milliseconds(ttl)).Int64()

	l.mu.Lock()
	var lostNow bool
	switch {
	case err != nil:
		if end := leaseEnd(begin, ttl); end.Before(l.deadline) && l.notHeldLocked() == nil {
			l.setDeadlineLocked(end)
		}
		err = fmt.Errorf("lockguard: extend %s: %w", quoteName(l.name), err)
	case n == 0:
		lostNow = l.loseLocked(fmt.Errorf("%w: %s: extend found the lock gone or taken by another owner", ErrNotHeld, quoteName(l.name)))
		err = l.notHeldLocked()
	default:
		if err = l.notHeldLocked(); err == nil {
			// Not lost while the command was in flight: the new lease
			// counts. A lock declared lost stays lost even if this
			// PEXPIRE reached Redis in time; its holder has been told.
			l.ttl = ttl
			l.setDeadlineLocked(leaseEnd(begin, ttl))
		}
	}
	l.mu.Unlock()
	if lostNow {
		l.lostNow()
	}
	return err
}

// Release deletes the lock in Redis if this acquisition still holds it,
// after stopping the watchdog; no goroutine of the lock outlives Release.
// It closes [Lock.Lost]. If the lock is no longer held by this acquisition
// — the lease ran out and another owner may hold it now — Release leaves
// it alone and returns an error for which errors.Is(err, ErrNotHeld) is
// true; it does the same when called again after a Release that reached
// Redis.
//
// ctx bounds the round trip to Redis. If Redis fails, Release returns its
// error and may be called again; otherwise the lock expires when its lease
// runs out. A Release on an already cancelled ctx cannot reach Redis: from
// a deferred call, pass a context that outlives the caller's cancellation,
// such as context.WithoutCancel(ctx) with a timeout ([Guard.WithLock]
// does).
func (l *Lock) Release(ctx context.Context) error {
	// Stop renewals first and wait for the watchdog to exit, so that no
	// renewal can run after the delete (or race with it).
	if l.stopWatch != nil {
		l.stopWatch()
		<-l.watchDone
	}
	l.mu.Lock()
	r := l.ride
	l.mu.Unlock()
	if r != nil && !r.Take() {
		// A bus sends the release (ReleaseOnPublish): report its
		// outcome, once. After a failure the script below runs again.
		select {
		case <-r.Done():
		case <-ctx.Done():
			return fmt.Errorf("lockguard: release %s: %w", quoteName(l.name), ctx.Err())
		}
		l.mu.Lock()
		if !l.rideReported {
			l.rideReported = true
			err := l.rideErr
			l.mu.Unlock()
			return err
		}
		l.mu.Unlock()
	}
	l.opMu.Lock()
	defer l.opMu.Unlock()

	l.mu.Lock()
	if l.releasedOK {
		l.mu.Unlock()
		return fmt.Errorf("%w: %s: already released", ErrNotHeld, quoteName(l.name))
	}
	l.endLocked()
	l.mu.Unlock()

	// Run the script even if the lock was declared lost: the local lease
	// ends before Redis's, so the key may still be ours, and deleting it
	// frees the lock for the next owner sooner. The compare makes this
	// safe when it is not ours.
	return l.releaseResult(releaseScript.Run(ctx, l.g.client, []string{l.keys.lock, l.keys.waiters}, l.value).Int64())
}

// endLocked ends the lock here, under l.mu, as a release does before it
// reaches Redis: the lock counts as released, its lease timer stops and
// Lost is closed.
func (l *Lock) endLocked() {
	l.released = true
	l.lease.Stop()
	l.closeLostLocked()
}

// releaseResult records the release script's reply (n: keys deleted) or
// error, and returns what Release reports for it. After an error the
// release may be tried again; after a reply the key is not ours any more,
// and n == 0 says it was not ours before the script either.
func (l *Lock) releaseResult(n int64, err error) error {
	if err != nil {
		return fmt.Errorf("lockguard: release %s: %w", quoteName(l.name), err)
	}
	l.mu.Lock()
	l.releasedOK = true
	l.mu.Unlock()
	if n == 0 {
		return fmt.Errorf("%w: %s: at release the lock was gone or taken by another owner", ErrNotHeld, quoteName(l.name))
	}
	return nil
}

// ReleaseOnPublish returns a copy of ctx with which the next publication
// through a Redis bus of package invalidate (invalidate.PubSub or
// invalidate.Streams, directly or through a cache on it) also releases l,
// in the same round trip: the bus sends the release in the pipeline of its
// publication, right after it. Package store uses it after a write's
// commit, so that the write's invalidation and the lock's release cost one
// round trip instead of two.
//
// The bus takes the release only when it publishes through the Guard's
// own client (the same *redis.Client value, so one server); on a Redis
// Cluster, where the lock and the channel live in different slots, or on
// another bus, the release stays with the holder. Either way, call
// [Lock.Release] (or let [Guard.WithLock] call it) after the publication:
// if no bus took the release it releases as always; if one did, it waits,
// bounded by its ctx, for the outcome of that release and returns what it
// would have returned. Once a bus takes the release, the lock counts as
// released: [Lock.Lost] is closed, renewals stop and Extend fails.
//
// Call it only when the critical section is over except for the
// publication: the release may follow that publication at once.
func (l *Lock) ReleaseOnPublish(ctx context.Context) context.Context {
	l.mu.Lock()
	if l.ride == nil {
		l.ride = piggyback.New(l.g.client, l.queueRelease)
	}
	r := l.ride
	l.mu.Unlock()
	return piggyback.With(ctx, r)
}

// queueRelease is the Rider of ReleaseOnPublish: it ends the lock as
// Release does, without waiting for the watchdog's goroutine (Release
// waits for it; a renewal that runs after the delete finds the key gone
// or another owner's and changes nothing), and queues the release script
// in p. The bus calls it on its own goroutine.
func (l *Lock) queueRelease(ctx context.Context, p redis.Pipeliner) func() {
	if l.stopWatch != nil {
		l.stopWatch()
	}
	l.mu.Lock()
	l.endLocked()
	l.mu.Unlock()
	keys := []string{l.keys.lock, l.keys.waiters}
	cmd := releaseScript.EvalSha(ctx, p, keys, l.value)
	return func() {
		n, err := cmd.Int64()
		if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
			// Redis lost its scripts (a restart, SCRIPT FLUSH): one more
			// round trip, which loads it again.
			n, err = releaseScript.Run(ctx, l.g.client, keys, l.value).Int64()
		}
		err = l.releaseResult(n, err)
		l.mu.Lock()
		l.rideErr = err
		l.mu.Unlock()
	}
}

// watch renews the lease every TTL/3 until ctx is cancelled (by Release) or
// the lock is lost. A failed renewal is retried sooner; the lease timer,
// not this loop, declares the lock lost when the lease runs out, so that a
// renewal blocked on a dead connection cannot delay the news.
func (l *Lock) watch(ctx context.Context) {
	defer close(l.watchDone)
	t := time.NewTimer(l.leaseTTL() / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.lost:
			return
		case <-l.rearm:
			t.Reset(l.leaseTTL() / 3)
			continue
		case <-t.C:
		}
		l.mu.Lock()
		deadline := l.deadline
		l.mu.Unlock()
		// A renewal that completes after the lease ran out is useless.
		rctx, cancel := context.WithDeadline(ctx, deadline)
		err := l.extend(rctx, 0)
		cancel()
		switch {
		case err == nil:
			t.Reset(l.leaseTTL() / 3)
		case errors.Is(err, ErrNotHeld), ctx.Err() != nil:
			return
		default:
			l.g.log.Warn("lockguard: renewal failed; retrying", "lock", l.name, "error", err)
			t.Reset(max(l.leaseTTL()/10, time.Millisecond))
		}
	}
}

// leaseRanOut runs on the lease timer.
func (l *Lock) leaseRanOut() {
	l.mu.Lock()
	lostNow := false
	// A renewal may have moved the deadline after the timer fired.
	if !time.Now().Before(l.deadline) {
		lostNow = l.loseLocked(fmt.Errorf("%w: %s: the lease ran out without renewal", ErrNotHeld, quoteName(l.name)))
	}
	l.mu.Unlock()
	if lostNow {
		l.lostNow()
	}
}

// loseLocked declares the lock lost for cause, unless it is lost or
// released already, and reports whether it did.
func (l *Lock) loseLocked(cause error) bool {
	if l.cause != nil || l.released {
		return false
	}
	l.cause = cause
	l.lease.Stop()
	l.closeLostLocked()
	return true
}

// notHeldLocked returns nil while the lock is held, and otherwise an error
// for which errors.Is(err, ErrNotHeld) is true.
func (l *Lock) notHeldLocked() error {
	switch {
	case l.cause != nil:
		return l.cause
	case l.released:
		return fmt.Errorf("%w: %s: released", ErrNotHeld, quoteName(l.name))
	}
	return nil
}

func (l *Lock) closeLostLocked() {
	if !l.lostClosed {
		l.lostClosed = true
		close(l.lost)
	}
}

func (l *Lock) setDeadlineLocked(end time.Time) {
	l.deadline = end
	l.lease.Reset(time.Until(end))
}

// lostNow reports a loss that just happened: it cancels the context of
// WithLock's function (see onLose), then logs the loss. It runs without
// l.mu held, because the Logger's handler is user code.
func (l *Lock) lostNow() {
	l.mu.Lock()
	onLose, cause := l.onLose, l.cause
	l.mu.Unlock()
	if onLose != nil {
		onLose(cause)
	}
	l.g.log.Warn("lockguard: lock lost", "lock", l.name, "token", l.token, "cause", cause)
}

// setOnLose makes f be called with the cause when the lock is lost from
// now on (nil: nothing is called), and reports whether the lock is still
// held; if it was lost already, f is not called and the caller acts on
// the loss itself.
func (l *Lock) setOnLose(f func(cause error)) (held bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.onLose = f
	return l.cause == nil
}

// lossCause returns why the lock was lost, or nil if it was not lost
// before Release.
func (l *Lock) lossCause() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cause
}

func (l *Lock) leaseTTL() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ttl
}
