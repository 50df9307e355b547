package lockguard

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/backoff"
)

// Defaults for the zero fields of [Options].
const (
	DefaultPrefix     = "coherent:lock:"
	DefaultTTL        = 10 * time.Second
	DefaultMinBackoff = 8 * time.Millisecond
	DefaultMaxBackoff = 256 * time.Millisecond
)

// MaxNameLen is the length in bytes of the longest lock name a [Guard]
// accepts; an empty name is refused too. The limit admits the longest name
// package store derives (a namespace and a key of up to 4096 bytes each,
// with a length prefix) and bounds what one name can cost Redis: escaping
// can triple a name (see Keys in the package documentation), so
// every key of a lock is at most len(Prefix) + 3*MaxNameLen + 10 bytes.
const MaxNameLen = 16 << 10

// Options configure a [Guard]. A nil *Options, and every zero field, means
// the default. [New] copies the Options; changing them afterwards has no
// effect.
type Options struct {
	// Prefix namespaces the Redis keys of every lock of the Guard, so that
	// application keys cannot collide with them. It must not contain '{'
	// or '}', which would change the Cluster hash slot of the keys.
	// Default [DefaultPrefix].
	Prefix string

	// TTL is the lease of each acquisition: how long Redis keeps a lock
	// whose holder neither releases nor extends it, for example because
	// the holder crashed. It must be at least a millisecond. Default
	// [DefaultTTL].
	TTL time.Duration

	// MinBackoff is the first wait of [Guard.Acquire] between two attempts
	// on a taken lock. The wait doubles after each failed attempt up to
	// MaxBackoff; each wait is drawn at random from its upper half, so
	// that waiters do not retry in step. A waiter never waits past the
	// holder's remaining lease, which each failed attempt reports. Default
	// [DefaultMinBackoff].
	MinBackoff time.Duration

	// MaxBackoff caps the wait between two attempts. It must not be less
	// than MinBackoff. Default [DefaultMaxBackoff].
	MaxBackoff time.Duration

	// Watchdog, if true, renews every lock of the Guard every TTL/3 until
	// it is released, so that a critical section may outlast TTL while its
	// holder is alive. If a renewal finds that the lock is gone, or
	// renewals fail until the lease would have run out, the lock is lost:
	// [Lock.Lost] is closed and the context that [Guard.WithLock] passes to
	// its function is cancelled. Default false: a lock is held for TTL
	// unless extended with [Lock.Extend].
	Watchdog bool

	// Logger receives lost locks and failed renewals. Default nil: discard.
	Logger *slog.Logger

	// DisableNotify turns release notifications off: the Guard's waiters
	// only poll. By default a waiting [Guard.Acquire] also listens for the
	// lock's release and then polls at once, through one pub/sub
	// connection per Guard, opened by the first wait and kept until
	// [Guard.Close]. Turn it off where pub/sub is unavailable, such as
	// behind a proxy without pub/sub or for an ACL user without channel
	// permissions. Notifications are always off on a [redis.Ring], which
	// may place a channel on another shard than its lock. Releases
	// publish a notification whenever someone waits, whatever this
	// setting. Default false.
	DisableNotify bool
}

// Guard hands out locks stored in one Redis deployment. Create one per
// configuration and share it; a second Guard with another TTL is cheap.
// From its first Acquire that has to wait until [Guard.Close], a Guard
// holds one pub/sub connection and one goroutine for release
// notifications (unless [Options.DisableNotify]). It is safe for
// concurrent use.
type Guard struct {
	closed     atomic.Bool
	client     redis.UniversalClient
	prefix     string
	ttl        time.Duration
	minBackoff time.Duration
	maxBackoff time.Duration
	watchdog   bool
	log        *slog.Logger
	notify     *notifier

	// PX arguments, computed once: the lease, and how long a waiter's
	// flag lives. The flag must outlive a waiter's longest wait between
	// two attempts, or a release could skip the PUBLISH while it waits.
	ttlMS, flagMS string
}

// New returns a Guard that keeps its locks in client, which may be a
// single-node, Sentinel (failover) or Cluster client. The Guard does not
// own client: the caller closes it, after [Guard.Close] and after the last
// lock is released. opts may be nil.
//
// New returns an error for which errors.Is(err, ErrInvalidOptions) is true
// for a nil client or options it cannot use.
func New(client redis.UniversalClient, opts *Options) (*Guard, error) {
	if isNilClient(client) {
		return nil, fmt.Errorf("%w: nil client", ErrInvalidOptions)
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if o.TTL == 0 {
		o.TTL = DefaultTTL
	}
	if o.MinBackoff == 0 {
		o.MinBackoff = DefaultMinBackoff
	}
	if o.MaxBackoff == 0 {
		o.MaxBackoff = max(DefaultMaxBackoff, o.MinBackoff)
	}
	switch {
	case strings.ContainsAny(o.Prefix, "{}"):
		return nil, fmt.Errorf("%w: Prefix %q contains '{' or '}'", ErrInvalidOptions, o.Prefix)
	case o.TTL < time.Millisecond:
		return nil, fmt.Errorf("%w: TTL %v is less than 1ms", ErrInvalidOptions, o.TTL)
	case o.MinBackoff < 0:
		return nil, fmt.Errorf("%w: MinBackoff %v is negative", ErrInvalidOptions, o.MinBackoff)
	case o.MaxBackoff < o.MinBackoff:
		return nil, fmt.Errorf("%w: MaxBackoff %v is less than MinBackoff %v", ErrInvalidOptions, o.MaxBackoff, o.MinBackoff)
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	g := &Guard{
		client:     client,
		prefix:     o.Prefix,
		ttl:        o.TTL,
		minBackoff: o.MinBackoff,
		maxBackoff: o.MaxBackoff,
		watchdog:   o.Watchdog,
		log:        log,
		ttlMS:      milliseconds(o.TTL),
		flagMS:     milliseconds(2*min(o.MaxBackoff, time.Hour) + time.Second),
	}
	if _, ring := client.(*redis.Ring); !o.DisableNotify && !ring {
		g.notify = newNotifier(client, log)
	}
	return g, nil
}

// Close stops the Guard's release notifications, waiting for their
// goroutine to exit, and makes later calls of Acquire, TryAcquire,
// WithLock and AdvanceFence return [ErrClosed]; a waiting Acquire returns
// it at its next attempt. Locks acquired before stay valid: Release,
// Extend and their watchdogs keep working. Close does not close the
// client. It is safe to call more than once, and always returns nil.
func (g *Guard) Close() error {
	g.closed.Store(true)
	if g.notify != nil {
		g.notify.close()
	}
	return nil
}

// isNilClient reports whether c is nil, or a nil pointer of one of the
// go-redis client types, which would panic on first use.
func isNilClient(c redis.UniversalClient) bool {
	switch c := c.(type) {
	case nil:
		return true
	case *redis.Client:
		return c == nil
	case *redis.ClusterClient:
		return c == nil
	case *redis.Ring:
		return c == nil
	}
	return false
}

// lockKeys are the Redis keys of one lock name.
type lockKeys struct {
	lock    string // holds the holder's random value, with the lease as expiry
	fence   string // the fencing counter; never expires
	waiters string // set, with an expiry, while someone waits for the lock
}

// keys returns the keys of name.
//
// All keys carry the whole (escaped) name as their Cluster hash tag, so
// they live in one slot and the scripts can touch them together. Braces in
// the name are escaped, together with '%', the escape character: a name
// starting with '}' would otherwise produce the empty tag "{}", which Redis
// ignores, hashing each key whole into a different slot. The escaping is
// injective, so distinct names never share a key. Lock keys end in '}' and
// the others in ":fence" or ":waiters", so no key of one name is a key of
// another.
func (g *Guard) keys(name string) (lockKeys, error) {
	if err := checkName(name); err != nil {
		return lockKeys{}, err
	}
	tag := name
	if strings.ContainsAny(name, "%{}") {
		tag = nameEscaper.Replace(name)
	}
	lock := g.prefix + "{" + tag + "}"
	return lockKeys{lock: lock, fence: lock + ":fence", waiters: lock + ":waiters"}, nil
}

var nameEscaper = strings.NewReplacer("%", "%25", "{", "%7B", "}", "%7D")

// checkName returns an error for which errors.Is(err, ErrInvalidName) is
// true if name is empty or longer than [MaxNameLen]. It runs before a name
// is escaped or sent, so that a huge name costs neither memory nor a round
// trip, and its error gives the length, not the name.
func checkName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty", ErrInvalidName)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: %d bytes, over MaxNameLen (%d)", ErrInvalidName, len(name), MaxNameLen)
	}
	return nil
}

// Acquire takes the lock name, waiting while another owner holds it. It
// retries with capped exponential backoff and jitter ([Options.MinBackoff],
// [Options.MaxBackoff]), and never waits past the holder's remaining
// lease. The returned lock is held for [Options.TTL] (renewed while held if
// [Options.Watchdog] is set) and must be released with [Lock.Release].
//
// ctx bounds the wait. When it ends, Acquire returns an error for which
// errors.Is reports both ctx's error (context.Canceled or
// context.DeadlineExceeded) and ErrNotAcquired. An error from Redis ends
// the wait at once; go-redis has already retried the command by then. The
// error names the lock. (If Redis ran an attempt whose reply was then
// lost, the lock stays taken, by nobody, until its lease runs out: that
// delays other owners but cannot give the lock to two of them.) So does a
// fence counter that cannot issue a token: Acquire returns an error for
// which errors.Is(err, ErrFenceExhausted) or errors.Is(err,
// ErrFenceCorrupt) is true, and leaves the lock free, since waiting would
// not repair the counter.
//
// name must be 1 to [MaxNameLen] bytes; otherwise Acquire returns an error
// for which errors.Is(err, ErrInvalidName) is true and sends nothing.
func (g *Guard) Acquire(ctx context.Context, name string) (*Lock, error) {
	return g.acquire(ctx, name, true)
}

// TryAcquire takes the lock name if it is free, and does not wait. When
// another owner holds the lock it returns an error for which errors.Is(err,
// ErrNotAcquired) is true. It fails on a name or a fence counter it cannot
// use as [Guard.Acquire] does. ctx bounds the round trip to Redis.
func (g *Guard) TryAcquire(ctx context.Context, name string) (*Lock, error) {
	return g.acquire(ctx, name, false)
}

func (g *Guard) acquire(ctx context.Context, name string, wait bool) (*Lock, error) {
	k, err := g.keys(name)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("lockguard: acquire %s: %w", quoteName(name), err)
	}
	// One random value per acquisition, reused by its attempts: a lost
	// reply to one attempt is then recognised by the next (see
	// acquireScript).
	value := crand.Text()
	flagMS := "0" // TryAcquire and poll-only waiters set no flag
	if wait && g.notify != nil {
		flagMS = g.flagMS
	}
	keys := []string{k.lock, k.fence, k.waiters}
	var timer *time.Timer
	var wake <-chan struct{}
	for attempt := 0; ; attempt++ {
		if g.closed.Load() {
			return nil, fmt.Errorf("%w: acquire %s", ErrClosed, quoteName(name))
		}
		// The lease is counted from before the request is sent: Redis
		// starts its own count later, so our deadline is never late.
		begin := time.Now()
		res, err := acquireScript.Run(ctx, g.client, keys, value, g.ttlMS, flagMS).Slice()
		if err != nil {
			if wait && attempt > 0 && ctx.Err() != nil {
				// ctx ended during a retry: report it like an end
				// during the wait.
				return nil, fmt.Errorf("lockguard: acquire %s: %w (%w)", quoteName(name), ctx.Err(), ErrNotAcquired)
			}
			return nil, fmt.Errorf("lockguard: acquire %s: %w", quoteName(name), err)
		}
		status, n, ok := acquireReply(res)
		if !ok {
			return nil, fmt.Errorf("lockguard: acquire %s: unexpected reply %v", quoteName(name), res)
		}
		switch status {
		case lockGranted:
			if timer != nil {
				timer.Stop()
			}
			return g.newLock(name, k, value, n, begin), nil
		case fenceCorrupt:
			return nil, fmt.Errorf("%w: acquire %s: key %s", ErrFenceCorrupt, quoteName(name), quoteName(k.fence))
		case fenceExhausted:
			// Waiting would not help: the lock is free, and no
			// attempt can fence it.
			return nil, fmt.Errorf("%w: acquire %s", ErrFenceExhausted, quoteName(name))
		}
		if !wait {
			return nil, fmt.Errorf("%w: %s", ErrNotAcquired, quoteName(name))
		}
		d := g.backoff(attempt)
		if pttl := time.Duration(n) * time.Millisecond; pttl > 0 && pttl < d {
			// The lease runs out before our next poll would come: try
			// right then. A holder that crashed costs waiters its
			// remaining lease and no more.
			d = pttl
		}
		if timer == nil {
			timer = time.NewTimer(d)
		} else {
			timer.Reset(d)
		}
		if wake == nil && g.notify != nil {
			// Subscribe after the first failed attempt. A release
			// between that attempt and the subscription publishes to
			// nobody; the subscription's confirmation then wakes us
			// to poll once more, which catches it.
			var unregister func()
			wake, unregister = g.notify.register(ctx, k.lock)
			defer unregister()
		}
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("lockguard: acquire %s: %w (%w)", quoteName(name), ctx.Err(), ErrNotAcquired)
		case <-timer.C:
		case <-wake:
			timer.Stop()
		}
	}
}

// acquireReply decodes a reply of acquireScript into its status and its
// number: the token, as a string of digits so that it stays exact, or the
// holder's remaining lease. ok is false for a reply of another shape.
func acquireReply(res []any) (status, n int64, ok bool) {
	if len(res) != 2 {
		return 0, 0, false
	}
	status, ok = res[0].(int64)
	if !ok {
		return 0, 0, false
	}
	switch v := res[1].(type) {
	case int64:
		n = v
	case string:
		var err error
		if n, err = strconv.ParseInt(v, 10, 64); err != nil {
			return 0, 0, false
		}
	default:
		return 0, 0, false
	}
	switch status {
	case lockTaken, fenceCorrupt, fenceExhausted:
		return status, n, true
	case lockGranted:
		_, isString := res[1].(string)
		return status, n, isString
	}
	return 0, 0, false
}

// backoff returns the wait after the given failed attempt (0-based): a
// random duration in [b/2, b], where b doubles from MinBackoff up to
// MaxBackoff. The lower bound b/2 ≥ MinBackoff/2 caps a waiter's request
// rate at 2/MinBackoff, falling to 2/MaxBackoff after about
// log2(MaxBackoff/MinBackoff) attempts.
func (g *Guard) backoff(attempt int) time.Duration {
	return backoff.Policy{Min: g.minBackoff, Max: g.maxBackoff}.Wait(attempt)
}

// WithLock acquires the lock name like [Guard.Acquire], runs fn while
// holding it, and releases it, also when fn panics. fn receives a context
// derived from ctx that is cancelled when the lock is lost (the watchdog
// found it gone or the lease ran out; see [Options.Watchdog]); its
// context.Cause is then an error for which errors.Is(err, ErrNotHeld) is
// true. fn should stop its work when the context is done.
//
// ctx bounds the wait for the lock and is the parent of fn's context. The
// release runs on a context that keeps ctx's values but not its
// cancellation, bounded by the lock's TTL, so that a cancelled request
// still frees the lock at once rather than when its lease runs out.
//
// WithLock returns the error from acquiring, or else the errors.Join of
// fn's error, the cause of the loss if the lock was lost before fn
// returned (so a nil fn error does not hide that the critical section ran
// partly unprotected), and the release's error.
func (g *Guard) WithLock(ctx context.Context, name string, fn func(ctx context.Context, l *Lock) error) (err error) {
	l, err := g.Acquire(ctx, name)
	if err != nil {
		return err
	}
	// The lock cancels fnCtx itself when it is lost (a lease that ran
	// out, a renewal that found the key gone), from the goroutine that
	// found out: no goroutine waits on Lost for it.
	fnCtx, cancel := context.WithCancelCause(ctx)
	if !l.setOnLose(cancel) {
		cancel(l.lossCause()) // lost already
	}
	defer func() {
		l.setOnLose(nil)
		lossErr := l.lossCause() // nil unless lost before fn returned
		cancel(nil)
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), l.leaseTTL())
		relErr := l.Release(rctx)
		rcancel()
		if lossErr != nil && errors.Is(relErr, ErrNotHeld) {
			relErr = nil // the loss is reported already
		}
		err = errors.Join(err, lossErr, relErr)
	}()
	return fn(fnCtx, l)
}

// AdvanceFence raises the fence counter of the lock name to at least
// atLeast, so that the next acquisition gets a token greater than atLeast.
// It never lowers the counter, and it is safe to call at any time.
//
// Use it to recover when the counter went backwards (it was deleted,
// FLUSHALL, a Redis restart without persistence, or a failover that lost
// the latest increments): the resource then rejects every new token as not
// greater than the one it stored, until the counter is advanced past that
// stored token. ctx bounds the round trip to Redis.
//
// The comparison is exact over all of int64, also above 2^53, where Lua's
// numbers are not. AdvanceFence returns an error for which errors.Is(err,
// ErrFenceExhausted) is true for atLeast math.MaxInt64, since no token can
// be greater, and one for which errors.Is(err, ErrFenceCorrupt) is true if
// the counter holds no integer; in both cases it changes nothing. It
// returns ErrInvalidName as [Guard.Acquire] does.
func (g *Guard) AdvanceFence(ctx context.Context, name string, atLeast int64) error {
	k, err := g.keys(name)
	if err != nil {
		return err
	}
	if atLeast == math.MaxInt64 {
		return fmt.Errorf("%w: advance fence of %s to MaxInt64", ErrFenceExhausted, quoteName(name))
	}
	if g.closed.Load() {
		return fmt.Errorf("%w: advance fence of %s", ErrClosed, quoteName(name))
	}
	status, err := advanceFenceScript.Run(ctx, g.client, []string{k.fence}, strconv.FormatInt(atLeast, 10)).Int64()
	if err != nil {
		return fmt.Errorf("lockguard: advance fence of %s: %w", quoteName(name), err)
	}
	if status == fenceCorrupt {
		return fmt.Errorf("%w: advance fence of %s: key %s", ErrFenceCorrupt, quoteName(name), quoteName(k.fence))
	}
	return nil
}

// milliseconds returns d in whole milliseconds, rounded up, as a PX
// argument: Redis keeps the key at least d.
func milliseconds(d time.Duration) string {
	return strconv.FormatInt(int64((d+time.Millisecond-1)/time.Millisecond), 10)
}

// quoteName returns name quoted for an error message: whole if that takes
// at most 66 characters, else a quoted prefix of it followed by its length.
// Every error about a lock names it, and a name may be up to MaxNameLen
// bytes, four times as many once quoted: a message must identify the lock,
// not copy it. The prefix is cut at a rune boundary, and shortened further
// while escapes make it too long.
func quoteName(name string) string {
	const limit = 64 + 2 // characters of the quoted form, quotes included
	if len(name) < limit {
		if q := strconv.Quote(name); len(q) <= limit {
			return q
		}
	}
	cut := min(len(name), limit-2)
	for {
		for cut > 0 && cut < len(name) && !utf8.RuneStart(name[cut]) {
			cut--
		}
		q := strconv.Quote(name[:cut])
		if len(q) <= limit {
			return q + "… (" + strconv.Itoa(len(name)) + " bytes)"
		}
		// An escape takes at most 4 characters per byte (\xff).
		cut -= (len(q) - limit + 3) / 4
	}
}
