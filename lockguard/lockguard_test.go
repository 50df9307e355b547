package lockguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// offlineClient returns a client that is never dialled, for tests that
// must fail before any round trip.
func offlineClient(t *testing.T) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestNew(t *testing.T) {
	t.Parallel()
	client := offlineClient(t)
	var nilClient *redis.Client
	var nilCluster *redis.ClusterClient
	tests := []struct {
		name    string
		client  redis.UniversalClient
		opts    *Options
		wantErr bool
	}{
		{"nil options", client, nil, false},
		{"zero options", client, &Options{}, false},
		{"MinBackoff above the default MaxBackoff", client, &Options{MinBackoff: time.Second}, false},
		{"nil client", nil, nil, true},
		{"typed nil client", nilClient, nil, true},
		{"typed nil cluster client", nilCluster, nil, true},
		{"prefix with {", client, &Options{Prefix: "app{x:"}, true},
		{"prefix with }", client, &Options{Prefix: "app}:"}, true},
		{"negative TTL", client, &Options{TTL: -time.Second}, true},
		{"TTL below 1ms", client, &Options{TTL: 500 * time.Microsecond}, true},
		{"negative MinBackoff", client, &Options{MinBackoff: -time.Millisecond}, true},
		{"MaxBackoff below MinBackoff", client, &Options{MinBackoff: time.Second, MaxBackoff: time.Millisecond}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := New(tt.client, tt.opts)
			switch {
			case tt.wantErr && !errors.Is(err, ErrInvalidOptions):
				t.Fatalf("New() = %v, %v; want an ErrInvalidOptions error", g, err)
			case !tt.wantErr && err != nil:
				t.Fatalf("New() = %v; want nil", err)
			}
		})
	}

	t.Run("defaults and copy", func(t *testing.T) {
		opts := &Options{TTL: time.Minute}
		g, err := New(client, opts)
		if err != nil {
			t.Fatalf("New() = %v", err)
		}
		opts.TTL = time.Second
		if g.ttl != time.Minute || g.prefix != DefaultPrefix || g.minBackoff != DefaultMinBackoff || g.maxBackoff != DefaultMaxBackoff {
			t.Errorf("New() = ttl %v, prefix %q, backoff %v..%v; want %v, %q, %v..%v",
				g.ttl, g.prefix, g.minBackoff, g.maxBackoff, time.Minute, DefaultPrefix, DefaultMinBackoff, DefaultMaxBackoff)
		}
	})
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	client := offlineClient(t)
	for _, tt := range []struct{ min, max time.Duration }{
		{DefaultMinBackoff, DefaultMaxBackoff},
		{time.Millisecond, time.Millisecond},
		{time.Nanosecond, time.Nanosecond},
		{time.Hour, 2 * time.Hour},
		{time.Millisecond, 1<<63 - 1},
	} {
		g, err := New(client, &Options{MinBackoff: tt.min, MaxBackoff: tt.max})
		if err != nil {
			t.Fatalf("New() = %v", err)
		}
		for attempt := range 100 {
			// The cap grows from min to max; the draw is in its upper half.
			capped := tt.max
			if attempt < 62 && tt.min <= tt.max>>attempt {
				capped = tt.min << attempt
			}
			if d := g.backoff(attempt); d < capped/2 || d > capped || d < tt.min/2 {
				t.Fatalf("backoff(%d) with [%v, %v] = %v; want in [%v, %v]", attempt, tt.min, tt.max, d, capped/2, capped)
			}
		}
	}
}

// hashTag returns the part of key that Redis Cluster hashes: the text
// between the first '{' and the first '}' after it, if that is not empty,
// and the whole key otherwise.
func hashTag(key string) string {
	if s := strings.IndexByte(key, '{'); s >= 0 {
		if e := strings.IndexByte(key[s+1:], '}'); e > 0 {
			return key[s+1 : s+1+e]
		}
	}
	return key
}

func TestKeys(t *testing.T) {
	t.Parallel()
	g, err := New(offlineClient(t), &Options{Prefix: "p:"})
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	names := []string{
		"a", "orders/42", "}a", "{a}", "{", "}", "{}", "a}b", "a{b", "%", "%25", "%7B",
		"%7D", "a:fence", "a}:fence", "x y", "ünïcode", "\x00",
	}
	seen := make(map[string]string)
	for _, name := range names {
		k, err := g.keys(name)
		if err != nil {
			t.Fatalf("keys(%q) = %v", name, err)
		}
		lockKey := k.lock
		if !strings.HasPrefix(lockKey, "p:") {
			t.Errorf("keys(%q) = %q; want prefix %q", name, lockKey, "p:")
		}
		tag := hashTag(lockKey)
		if tag == lockKey || tag == "" {
			t.Errorf("keys(%q) = %q; want a non-empty hash tag", name, lockKey)
		}
		for _, other := range []string{k.fence, k.waiters} {
			if ot := hashTag(other); ot != tag {
				t.Errorf("keys(%q) = %q, %q; hash tags %q and %q differ", name, lockKey, other, tag, ot)
			}
		}
		for _, k := range []string{k.lock, k.fence, k.waiters} {
			if other, dup := seen[k]; dup {
				t.Errorf("keys(%q) and keys(%q) share key %q", name, other, k)
			}
			seen[k] = name
		}
	}
	if _, err := g.keys(""); !errors.Is(err, ErrInvalidName) {
		t.Errorf("keys(\"\") = %v; want ErrInvalidName", err)
	}
}

func TestInvalidName(t *testing.T) {
	t.Parallel()
	g, err := New(offlineClient(t), nil)
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	ctx := t.Context()
	calls := []struct {
		name string
		call func() error
	}{
		{"Acquire", func() error { _, err := g.Acquire(ctx, ""); return err }},
		{"TryAcquire", func() error { _, err := g.TryAcquire(ctx, ""); return err }},
		{"WithLock", func() error {
			return g.WithLock(ctx, "", func(context.Context, *Lock) error { return nil })
		}},
		{"AdvanceFence", func() error { return g.AdvanceFence(ctx, "", 1) }},
	}
	for _, c := range calls {
		if err := c.call(); !errors.Is(err, ErrInvalidName) {
			t.Errorf("%s(\"\") = %v; want ErrInvalidName", c.name, err)
		}
	}
}

func TestRedisErrorNamesTheLock(t *testing.T) {
	t.Parallel()
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialerRetries: 1})
	t.Cleanup(func() { _ = c.Close() })
	g, err := New(c, nil)
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, wait := range []bool{false, true} {
		var err error
		if wait {
			_, err = g.Acquire(ctx, "orders/42")
		} else {
			_, err = g.TryAcquire(ctx, "orders/42")
		}
		if err == nil || errors.Is(err, ErrNotAcquired) || !strings.Contains(err.Error(), `"orders/42"`) {
			t.Errorf("acquire (wait %v) without Redis = %v; want a Redis error naming the lock", wait, err)
		}
	}
	// The scripts themselves can fail too: a counter that is not an
	// integer cannot issue a token, which is a typed error that still
	// names the lock, and the lock must not be left taken.
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g = newGuard(t, rdb, prefix, nil)
	k, _ := g.keys("broken")
	if err := rdb.Set(ctx, k.fence, "not a number", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := g.TryAcquire(ctx, "broken"); !errors.Is(err, ErrFenceCorrupt) || !strings.Contains(err.Error(), `"broken"`) {
		t.Errorf("TryAcquire with a corrupt counter = %v; want ErrFenceCorrupt naming the lock", err)
	}
	if n := rdb.Exists(ctx, k.lock).Val(); n != 0 {
		t.Errorf("after a failed acquire the lock key exists")
	}
}

func TestTryAcquireRelease(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	a := newGuard(t, rdb, prefix, nil)
	b := newGuard(t, newClient(t, nil), prefix, nil)
	ctx := t.Context()

	la, err := a.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	if la.Name() != "res" || la.Token() < 1 {
		t.Errorf("lock = %q, token %d; want %q, token ≥ 1", la.Name(), la.Token(), "res")
	}
	if _, err := b.TryAcquire(ctx, "res"); !errors.Is(err, ErrNotAcquired) {
		t.Fatalf("TryAcquire() of a held lock = %v; want ErrNotAcquired", err)
	}
	if isClosed(la.Lost()) {
		t.Errorf("Lost() closed while held")
	}
	if err := la.Release(ctx); err != nil {
		t.Fatalf("Release() = %v; want nil", err)
	}
	if !isClosed(la.Lost()) {
		t.Errorf("Lost() open after Release")
	}
	if err := la.Release(ctx); !errors.Is(err, ErrNotHeld) {
		t.Errorf("second Release() = %v; want ErrNotHeld", err)
	}
	if err := la.Extend(ctx, time.Second); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Extend() after Release = %v; want ErrNotHeld", err)
	}
	lb, err := b.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() after Release = %v", err)
	}
	if lb.Token() <= la.Token() {
		t.Errorf("tokens %d then %d; want increasing", la.Token(), lb.Token())
	}
	// la's second Release must not have touched lb's lock.
	if err := la.Release(ctx); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Release() of an old lock = %v; want ErrNotHeld", err)
	}
	if err := lb.Release(ctx); err != nil {
		t.Errorf("Release() = %v; want nil", err)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := a.TryAcquire(cancelled, "res"); !errors.Is(err, context.Canceled) {
		t.Errorf("TryAcquire(cancelled ctx) = %v; want context.Canceled", err)
	}
}

// TestExpiry: a holder stalls past its TTL, another acquires, and the
// first one's Release leaves the second one's lock alone.
func TestExpiry(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	opts := &Options{TTL: 200 * time.Millisecond, MinBackoff: time.Millisecond, MaxBackoff: 20 * time.Millisecond}
	a := newGuard(t, rdb, prefix, opts)
	b := newGuard(t, newClient(t, nil), prefix, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	la, err := a.Acquire(ctx, "res")
	if err != nil {
		t.Fatalf("Acquire() = %v", err)
	}
	// The stall: a does nothing until its lease has run out, which it
	// learns from Lost.
	within(t, la.Lost(), 5*time.Second, "a's lease running out")
	if err := la.lossCause(); !errors.Is(err, ErrNotHeld) {
		t.Errorf("loss cause = %v; want ErrNotHeld", err)
	}
	lb, err := b.Acquire(ctx, "res")
	if err != nil {
		t.Fatalf("Acquire() after a's lease ran out = %v", err)
	}
	defer lb.Release(context.WithoutCancel(ctx))
	if err := la.Release(ctx); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Release() by the stalled holder = %v; want ErrNotHeld", err)
	}
	if err := la.Extend(ctx, time.Second); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Extend() by the stalled holder = %v; want ErrNotHeld", err)
	}
	if err := lb.Extend(ctx, time.Second); err != nil {
		t.Errorf("Extend() by the new holder = %v; want nil: the stalled holder touched its lock", err)
	}
	if la.Token() >= lb.Token() {
		t.Errorf("tokens: stalled %d, new %d; want stalled < new", la.Token(), lb.Token())
	}
}

func TestExtend(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, &Options{TTL: 2 * time.Second})
	ctx := t.Context()
	l, err := g.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	for _, ttl := range []time.Duration{0, -time.Second, 500 * time.Microsecond} {
		if err := l.Extend(ctx, ttl); !errors.Is(err, ErrInvalidTTL) {
			t.Errorf("Extend(%v) = %v; want ErrInvalidTTL", ttl, err)
		}
	}
	for _, tt := range []struct {
		ttl      time.Duration
		min, max time.Duration
	}{
		{time.Minute, 50 * time.Second, time.Minute},
		{time.Second, 1, time.Second},
	} {
		if err := l.Extend(ctx, tt.ttl); err != nil {
			t.Fatalf("Extend(%v) = %v", tt.ttl, err)
		}
		pttl := rdb.PTTL(ctx, l.keys.lock).Val()
		if pttl < tt.min || pttl > tt.max {
			t.Errorf("after Extend(%v), PTTL = %v; want in [%v, %v]", tt.ttl, pttl, tt.min, tt.max)
		}
	}
	// Someone removes the lock behind the holder's back (an expiry, an
	// operator): Extend reports it and does not create the key again.
	if err := rdb.Del(ctx, l.keys.lock).Err(); err != nil {
		t.Fatal(err)
	}
	if err := l.Extend(ctx, time.Minute); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Extend() of a deleted lock = %v; want ErrNotHeld", err)
	}
	if !isClosed(l.Lost()) {
		t.Errorf("Lost() open after Extend found the lock gone")
	}
	if n := rdb.Exists(ctx, l.keys.lock).Val(); n != 0 {
		t.Errorf("Extend() recreated a lost lock")
	}
	if err := l.Release(ctx); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Release() of a lost lock = %v; want ErrNotHeld", err)
	}
}

// renewals returns a channel that receives the error of every renewal
// (Extend or watchdog) that the client runs, dropping them when full.
func renewals(rdb redis.UniversalClient) <-chan error {
	ch := make(chan error, 1000)
	rdb.AddHook(&cmdHook{observe: func(cmd redis.Cmder) {
		if isScript(cmd, extendScript) {
			select {
			case ch <- cmd.Err():
			default:
			}
		}
	}})
	return ch
}

// waitRenewals waits for n successful renewals on ch.
func waitRenewals(t *testing.T, ch <-chan error, n int) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for n > 0 {
		select {
		case err := <-ch:
			if err == nil {
				n--
			}
		case <-timeout:
			t.Fatalf("%d renewals missing", n)
		}
	}
}

func TestWatchdogKeepsLockAlive(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	renewed := renewals(rdb)
	prefix := testPrefix(t, rdb)
	const ttl = 400 * time.Millisecond
	g := newGuard(t, rdb, prefix, &Options{TTL: ttl, Watchdog: true})
	other := newGuard(t, newClient(t, nil), prefix, nil)
	ctx := t.Context()

	l, err := g.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	// Six renewals at TTL/3 span two TTLs: without them the lock would
	// have expired by now.
	waitRenewals(t, renewed, 6)
	if isClosed(l.Lost()) {
		t.Fatalf("Lost() closed while the watchdog renews; cause %v", l.lossCause())
	}
	if _, err := other.TryAcquire(ctx, "res"); !errors.Is(err, ErrNotAcquired) {
		t.Errorf("TryAcquire() by another owner = %v; want ErrNotAcquired", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Errorf("Release() = %v; want nil", err)
	}
	if !isClosed(l.watchDone) {
		t.Errorf("watchdog running after Release")
	}
	// No renewal after Release: the key stays gone.
	if n := rdb.Exists(ctx, l.keys.lock).Val(); n != 0 {
		t.Errorf("lock key exists after Release")
	}
}

// TestWatchdogAfterExtend: an Extend to a shorter lease must make the
// watchdog renew on the new lease's schedule, not the old one's.
func TestWatchdogAfterExtend(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	renewed := renewals(rdb)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, &Options{TTL: 5 * time.Second, Watchdog: true})
	ctx := t.Context()
	l, err := g.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	if err := l.Extend(ctx, 300*time.Millisecond); err != nil {
		t.Fatalf("Extend() = %v", err)
	}
	// Without a new plan the next renewal would come after 5s/3, long
	// after the 300ms lease ran out.
	waitRenewals(t, renewed, 1+4) // the Extend, then 4 renewals of 300ms
	if isClosed(l.Lost()) {
		t.Fatalf("lock lost after Extend shortened the lease; cause %v", l.lossCause())
	}
	if err := l.Release(ctx); err != nil {
		t.Errorf("Release() = %v; want nil", err)
	}
}

// TestWatchdogLostLock: when a renewal finds the lock taken by another
// owner, the holder is told at once, through Lost and through WithLock's
// context.
func TestWatchdogLostLock(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	// Renewals every second; the lease timer would fire only after ~3s.
	g := newGuard(t, rdb, prefix, &Options{TTL: 3 * time.Second, Watchdog: true})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	var cause error
	var lost <-chan struct{}
	err := g.WithLock(ctx, "res", func(ctx context.Context, l *Lock) error {
		lost = l.Lost()
		// Another owner overwrites the lock, as after an expiry and a new
		// acquisition; the next renewal discovers it.
		if err := rdb.Set(ctx, l.keys.lock, "someone else", time.Minute).Err(); err != nil {
			return err
		}
		<-ctx.Done()
		cause = context.Cause(ctx)
		if !isClosed(l.Lost()) {
			t.Errorf("fn's context done but Lost() open")
		}
		return nil
	})
	if !errors.Is(cause, ErrNotHeld) || !strings.Contains(fmt.Sprint(cause), "taken by another owner") {
		t.Errorf("fn's context cause = %v; want ErrNotHeld from a renewal", cause)
	}
	if !errors.Is(err, ErrNotHeld) {
		t.Errorf("WithLock() after losing the lock = %v; want ErrNotHeld", err)
	}
	if !isClosed(lost) {
		t.Errorf("Lost() open after WithLock")
	}
	k, _ := g.keys("res")
	if v := rdb.Get(ctx, k.lock).Val(); v != "someone else" {
		t.Errorf("lock value = %q; want the other owner's value untouched", v)
	}
}

// TestWatchdogConnectionKilled kills the holder's connection. When the
// client can reconnect, the watchdog keeps the lock; when it cannot (a
// partition), the lock is lost and the holder is told.
func TestWatchdogConnectionKilled(t *testing.T) {
	t.Parallel()
	for _, partition := range []bool{false, true} {
		t.Run(fmt.Sprintf("partition=%v", partition), func(t *testing.T) {
			t.Parallel()
			var blocked atomic.Bool
			dialer := &net.Dialer{Timeout: 2 * time.Second}
			holder := newClient(t, func(o *redis.Options) {
				o.PoolSize = 1 // one connection: the one CLIENT ID names
				o.DialerRetries = 1
				o.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
					if blocked.Load() {
						return nil, errors.New("test: network partition")
					}
					return dialer.DialContext(ctx, network, addr)
				}
			})
			renewed := renewals(holder)
			admin := newClient(t, nil)
			prefix := testPrefix(t, admin)
			const ttl = 600 * time.Millisecond
			g := newGuard(t, holder, prefix, &Options{TTL: ttl, Watchdog: true})
			other := newGuard(t, admin, prefix, &Options{MinBackoff: time.Millisecond, MaxBackoff: 20 * time.Millisecond})
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()

			l, err := g.TryAcquire(ctx, "res")
			if err != nil {
				t.Fatalf("TryAcquire() = %v", err)
			}
			id, err := holder.ClientID(ctx).Result()
			if err != nil {
				t.Fatalf("CLIENT ID = %v", err)
			}
			blocked.Store(partition)
			if err := admin.ClientKillByFilter(ctx, "ID", strconv.FormatInt(id, 10)).Err(); err != nil {
				t.Fatalf("CLIENT KILL ID %d = %v", id, err)
			}

			if !partition {
				waitRenewals(t, renewed, 4) // on the new connection
				if isClosed(l.Lost()) {
					t.Fatalf("lock lost after a reconnect; cause %v", l.lossCause())
				}
				if newID := holder.ClientID(ctx).Val(); newID == id {
					t.Errorf("CLIENT ID = %d after CLIENT KILL; want a new connection", newID)
				}
				if _, err := other.TryAcquire(ctx, "res"); !errors.Is(err, ErrNotAcquired) {
					t.Errorf("TryAcquire() by another owner = %v; want ErrNotAcquired", err)
				}
				if err := l.Release(ctx); err != nil {
					t.Errorf("Release() = %v; want nil", err)
				}
				return
			}

			within(t, l.Lost(), 10*time.Second, "the holder learning of the loss")
			if cause := l.lossCause(); !errors.Is(cause, ErrNotHeld) {
				t.Errorf("loss cause = %v; want ErrNotHeld", cause)
			}
			lo, err := other.Acquire(ctx, "res")
			if err != nil {
				t.Fatalf("Acquire() by another owner after the partition = %v", err)
			}
			defer lo.Release(context.WithoutCancel(ctx))
			if lo.Token() <= l.Token() {
				t.Errorf("tokens: partitioned holder %d, new holder %d; want increasing", l.Token(), lo.Token())
			}
			// The partition heals; the old holder's Release must leave the
			// new holder's lock alone. The client may need a moment to
			// redial.
			blocked.Store(false)
			for {
				err = l.Release(ctx)
				if err == nil || errors.Is(err, ErrNotHeld) || ctx.Err() != nil {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if !errors.Is(err, ErrNotHeld) {
				t.Errorf("Release() after the partition = %v; want ErrNotHeld", err)
			}
			if err := lo.Extend(ctx, time.Second); err != nil {
				t.Errorf("Extend() by the new holder = %v; want nil", err)
			}
		})
	}
}

// TestAdvanceFence: when the counter is lost (FLUSHALL, a restart without
// persistence), tokens start again from 1; AdvanceFence moves them past
// what the resource has stored, and never moves them back.
func TestAdvanceFence(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	ctx := t.Context()
	token := func() int64 {
		t.Helper()
		l, err := g.TryAcquire(ctx, "res")
		if err != nil {
			t.Fatalf("TryAcquire() = %v", err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatalf("Release() = %v", err)
		}
		return l.Token()
	}
	for range 3 {
		token()
	}
	k, _ := g.keys("res")
	if err := rdb.Del(ctx, k.fence).Err(); err != nil {
		t.Fatal(err)
	}
	if got := token(); got != 1 {
		t.Fatalf("token after the counter was deleted = %d; want 1 (it restarts)", got)
	}
	if err := g.AdvanceFence(ctx, "res", 100); err != nil {
		t.Fatalf("AdvanceFence(100) = %v", err)
	}
	if got := token(); got != 101 {
		t.Errorf("token after AdvanceFence(100) = %d; want 101", got)
	}
	if err := g.AdvanceFence(ctx, "res", 5); err != nil {
		t.Fatalf("AdvanceFence(5) = %v", err)
	}
	if got := token(); got != 102 {
		t.Errorf("token after AdvanceFence(5) = %d; want 102 (never lowered)", got)
	}
}

// TestAcquireScriptRetry runs the acquire script twice with one value, as
// go-redis does when a reply is lost: the second run must report the lock
// as ours, with the same token, and not as taken.
func TestAcquireScriptRetry(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	ctx := t.Context()
	k, _ := g.keys("res")
	run := func(value string) []int64 {
		t.Helper()
		res, err := acquireScript.Run(ctx, rdb, []string{k.lock, k.fence, k.waiters}, value, "10000", "0").Int64Slice()
		if err != nil {
			t.Fatalf("acquire script = %v", err)
		}
		return res
	}
	first := run("v1")
	if again := run("v1"); !slices.Equal(first, again) || first[0] != 1 {
		t.Errorf("acquire script twice with one value = %v, %v; want equal grants", first, again)
	}
	if other := run("v2"); other[0] != 0 || other[1] <= 0 {
		t.Errorf("acquire script by another value = %v; want {0, pttl > 0}", other)
	}
}

func TestNoScriptFallback(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	ctx := t.Context()
	// SCRIPT FLUSH stands in for a Redis restart or failover: EVALSHA
	// answers NOSCRIPT and the script must be sent again with EVAL.
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	l, err := g.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() after SCRIPT FLUSH = %v", err)
	}
	if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatalf("Release() after SCRIPT FLUSH = %v", err)
	}
}

// TestAcquireContext: a waiter gives up when its ctx ends, with ctx's
// error, promptly.
func TestAcquireContext(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	holder := newGuard(t, rdb, prefix, &Options{TTL: time.Minute})
	l, err := holder.TryAcquire(t.Context(), "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	t.Cleanup(func() { _ = l.Release(context.Background()) })

	for _, tt := range []struct {
		name string
		want error
	}{
		{"deadline", context.DeadlineExceeded},
		{"cancel", context.Canceled},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			wc := newClient(t, nil)
			attempts := make(chan struct{}, 100)
			wc.AddHook(&cmdHook{observe: func(cmd redis.Cmder) {
				if isScript(cmd, acquireScript) {
					select {
					case attempts <- struct{}{}:
					default:
					}
				}
			}})
			// A large backoff: the waiter sits in its wait when ctx ends,
			// and must not finish that wait first.
			g := newGuard(t, wc, prefix, &Options{MinBackoff: time.Second, MaxBackoff: 10 * time.Second})
			var ctx context.Context
			var cancel context.CancelFunc
			endedAt := make(chan time.Time, 1)
			if tt.want == context.DeadlineExceeded {
				ctx, cancel = context.WithTimeout(t.Context(), 200*time.Millisecond)
				d, _ := ctx.Deadline()
				endedAt <- d
			} else {
				ctx, cancel = context.WithCancel(t.Context())
				go func() {
					select {
					case <-attempts: // the first attempt failed; the waiter now waits
					case <-ctx.Done():
					}
					endedAt <- time.Now()
					cancel()
				}()
			}
			defer cancel()
			_, err := g.Acquire(ctx, "res")
			ended := time.Since(<-endedAt)
			if !errors.Is(err, tt.want) || !errors.Is(err, ErrNotAcquired) {
				t.Errorf("Acquire() = %v; want %v and ErrNotAcquired", err, tt.want)
			}
			if ended > 500*time.Millisecond {
				t.Errorf("Acquire() returned %v after its ctx ended; want promptly", ended)
			}
		})
	}
}

// TestNoBusySpin counts the commands of waiters on a held lock: each
// waiter's rate must stay under the bound its backoff implies.
func TestNoBusySpin(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	prefix := testPrefix(t, admin)
	holder := newGuard(t, admin, prefix, &Options{TTL: time.Minute})
	l, err := holder.TryAcquire(t.Context(), "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	t.Cleanup(func() { _ = l.Release(context.Background()) })

	const waiters = 4
	const window = 1500 * time.Millisecond
	opts := &Options{} // default backoff
	var wg sync.WaitGroup
	counts := make([]int, waiters)
	for i := range waiters {
		wc := newClient(t, nil)
		hook := &cmdHook{}
		wc.AddHook(hook)
		g := newGuard(t, wc, prefix, opts)
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(t.Context(), window)
			defer cancel()
			if _, err := g.Acquire(ctx, "res"); !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Acquire() = %v; want DeadlineExceeded", err)
			}
			counts[i] = hook.count()
		})
	}
	wg.Wait()
	// Each wait lasts at least MinBackoff/2, so 2/MinBackoff per second
	// is a hard ceiling; twice that leaves room for EVALSHA fallbacks.
	bound := int(2 * 2 * window / DefaultMinBackoff)
	for i, n := range counts {
		t.Logf("waiter %d: %d commands in %v (%.1f/s)", i, n, window, float64(n)/window.Seconds())
		if n > bound {
			t.Errorf("waiter %d sent %d commands in %v; want ≤ %d", i, n, window, bound)
		}
	}
}

func TestWithLock(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	other := newGuard(t, newClient(t, nil), prefix, nil)
	ctx := t.Context()
	k, _ := g.keys("res")
	lockKey := k.lock

	t.Run("holds during fn and releases after", func(t *testing.T) {
		var token int64
		err := g.WithLock(ctx, "res", func(ctx context.Context, l *Lock) error {
			token = l.Token()
			if _, err := other.TryAcquire(ctx, "res"); !errors.Is(err, ErrNotAcquired) {
				t.Errorf("TryAcquire() during fn = %v; want ErrNotAcquired", err)
			}
			return nil
		})
		if err != nil || token == 0 {
			t.Fatalf("WithLock() = %v, token %d; want nil, a token", err, token)
		}
		if n := rdb.Exists(ctx, lockKey).Val(); n != 0 {
			t.Errorf("lock key exists after WithLock")
		}
	})

	t.Run("returns fn's error", func(t *testing.T) {
		boom := errors.New("boom")
		err := g.WithLock(ctx, "res", func(context.Context, *Lock) error { return boom })
		if !errors.Is(err, boom) || errors.Is(err, ErrNotHeld) {
			t.Errorf("WithLock() = %v; want boom alone", err)
		}
		if n := rdb.Exists(ctx, lockKey).Val(); n != 0 {
			t.Errorf("lock key exists after WithLock")
		}
	})

	t.Run("releases when fn panics", func(t *testing.T) {
		func() {
			defer func() {
				if r := recover(); r != "boom" {
					t.Errorf("recover() = %v; want the panic to propagate", r)
				}
			}()
			_ = g.WithLock(ctx, "res", func(context.Context, *Lock) error { panic("boom") })
		}()
		if n := rdb.Exists(ctx, lockKey).Val(); n != 0 {
			t.Errorf("lock key exists after a panic in fn")
		}
	})

	t.Run("releases when ctx is cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		err := g.WithLock(cctx, "res", func(ctx context.Context, _ *Lock) error {
			cancel()
			<-ctx.Done()
			return ctx.Err()
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("WithLock() = %v; want context.Canceled", err)
		}
		if n := rdb.Exists(ctx, lockKey).Val(); n != 0 {
			t.Errorf("lock key exists after WithLock on a cancelled ctx")
		}
	})

	t.Run("lease runs out during fn", func(t *testing.T) {
		short := newGuard(t, rdb, prefix, &Options{TTL: 100 * time.Millisecond})
		var cause error
		err := short.WithLock(ctx, "res", func(ctx context.Context, _ *Lock) error {
			<-ctx.Done()
			cause = context.Cause(ctx)
			return nil // fn ignores the loss; WithLock must not
		})
		if !errors.Is(cause, ErrNotHeld) {
			t.Errorf("fn's context cause = %v; want ErrNotHeld", cause)
		}
		if !errors.Is(err, ErrNotHeld) {
			t.Errorf("WithLock() = %v; want ErrNotHeld", err)
		}
	})
}
