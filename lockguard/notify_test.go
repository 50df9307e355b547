package lockguard

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// slowPoll makes waiters poll about once a minute, so that a test in which
// a waiter gets the lock within seconds shows that a notification (not a
// poll) woke it.
var slowPoll = Options{MinBackoff: 30 * time.Second, MaxBackoff: time.Minute}

// acquireAsync starts g.Acquire(ctx, name) and returns a channel that
// delivers its result.
func acquireAsync(ctx context.Context, g *Guard, name string) <-chan error {
	ch := make(chan error, 1)
	go func() {
		l, err := g.Acquire(ctx, name)
		if err == nil {
			err = l.Release(context.WithoutCancel(ctx))
		}
		ch <- err
	}()
	return ch
}

// attemptCounter counts the acquire attempts a client runs.
func attemptCounter(rdb redis.UniversalClient) *atomic.Int32 {
	var n atomic.Int32
	rdb.AddHook(&cmdHook{observe: func(cmd redis.Cmder) {
		if isScript(cmd, acquireScript) {
			n.Add(1)
		}
	}})
	return &n
}

// eventually waits until cond holds, polling, or fails the test.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestClose(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	prefix := testPrefix(t, admin)
	holder := newGuard(t, admin, prefix, &Options{TTL: time.Minute})
	waiter := newGuard(t, newClient(t, nil), prefix, &Options{MinBackoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()

	l, err := waiter.TryAcquire(ctx, "mine")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	held, err := holder.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	defer held.Release(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() {
		_, err := waiter.Acquire(ctx, "res")
		done <- err
	}()
	k, _ := waiter.keys("res")
	eventually(t, "the waiter's SUBSCRIBE", func() bool {
		return admin.PubSubNumSub(ctx, k.lock).Val()[k.lock] == 1
	})
	for range 2 {
		if err := waiter.Close(); err != nil {
			t.Errorf("Close() = %v; want nil", err)
		}
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("waiting Acquire() after Close = %v; want ErrClosed", err)
	}
	if waiter.notify.ps != nil {
		t.Errorf("subscription open after Close")
	}
	calls := []struct {
		name string
		call func() error
	}{
		{"Acquire", func() error { _, err := waiter.Acquire(ctx, "x"); return err }},
		{"TryAcquire", func() error { _, err := waiter.TryAcquire(ctx, "x"); return err }},
		{"WithLock", func() error {
			return waiter.WithLock(ctx, "x", func(context.Context, *Lock) error { return nil })
		}},
		{"AdvanceFence", func() error { return waiter.AdvanceFence(ctx, "x", 1) }},
	}
	for _, c := range calls {
		if err := c.call(); !errors.Is(err, ErrClosed) {
			t.Errorf("%s() after Close = %v; want ErrClosed", c.name, err)
		}
	}
	// A lock taken before Close stays usable.
	if err := l.Extend(ctx, time.Minute); err != nil {
		t.Errorf("Extend() after Close = %v; want nil", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Errorf("Release() after Close = %v; want nil", err)
	}
}

// TestNotifyReleaseBeforeSubscribe pins the race of a release that comes
// after the waiter's first failed attempt but before it has subscribed:
// nobody hears that PUBLISH, and the waiter must not sleep through it.
func TestNotifyReleaseBeforeSubscribe(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	prefix := testPrefix(t, admin)
	holder := newGuard(t, admin, prefix, &Options{TTL: time.Minute})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	l, err := holder.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	wc := newClient(t, nil)
	var once sync.Once
	wc.AddHook(&cmdHook{observe: func(cmd redis.Cmder) {
		// Runs when the waiter's first attempt has returned, before
		// Acquire goes on to subscribe.
		if isScript(cmd, acquireScript) {
			once.Do(func() {
				if err := l.Release(ctx); err != nil {
					t.Errorf("Release() = %v", err)
				}
			})
		}
	}})
	waiter := newGuard(t, wc, prefix, &slowPoll)
	select {
	case err := <-acquireAsync(ctx, waiter, "res"):
		if err != nil {
			t.Fatalf("Acquire() by the waiter = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("waiter slept through a release that preceded its subscription")
	}
}

// TestNotifyGap kills the waiter's subscription connection and releases
// the lock at once: whether or not the PUBLISH reaches the waiter, the gap
// must make it poll.
func TestNotifyGap(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	prefix := testPrefix(t, admin)
	holder := newGuard(t, admin, prefix, &Options{TTL: time.Minute})
	name := "lockguard-test-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	wc := newClient(t, func(o *redis.Options) { o.ClientName = name })
	attempts := attemptCounter(wc)
	waiter := newGuard(t, wc, prefix, &slowPoll)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()

	l, err := holder.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	done := acquireAsync(ctx, waiter, "res")
	eventually(t, "two attempts", func() bool { return attempts.Load() >= 2 })
	list, err := admin.Do(ctx, "CLIENT", "LIST", "TYPE", "PUBSUB").Text()
	if err != nil {
		t.Fatalf("CLIENT LIST = %v", err)
	}
	killed := 0
	for line := range strings.Lines(list) {
		if !strings.Contains(line, " name="+name+" ") {
			continue
		}
		id, _, _ := strings.Cut(strings.TrimPrefix(line, "id="), " ")
		if err := admin.ClientKillByFilter(ctx, "ID", id).Err(); err != nil {
			t.Fatalf("CLIENT KILL ID %s = %v", id, err)
		}
		killed++
	}
	if killed != 1 {
		t.Fatalf("killed %d subscription connections; want 1", killed)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatalf("Release() = %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Acquire() by the waiter = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("waiter slept through a release during a subscription gap")
	}
}

func TestNotifyDisabled(t *testing.T) {
	t.Parallel()
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	t.Cleanup(func() { _ = ring.Close() })
	client := offlineClient(t)
	for _, tt := range []struct {
		name   string
		client redis.UniversalClient
		opts   *Options
	}{
		{"DisableNotify", client, &Options{DisableNotify: true}},
		{"Ring", ring, nil},
	} {
		g, err := New(tt.client, tt.opts)
		if err != nil {
			t.Fatalf("New() = %v", err)
		}
		if g.notify != nil {
			t.Errorf("%s: notifications on; want off", tt.name)
		}
	}
}
