package lockguard

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/piggyback"
)

// board does what a bus does with the rider ctx carries (see
// invalidate.PubSub's send): it boards it into a pipeline of client after
// a command of its own, executes the pipeline and finishes the rider. It
// reports whether the rider boarded, and how many commands the client
// processed in that one round trip.
func board(t *testing.T, ctx context.Context, client *redis.Client) (boarded bool) {
	t.Helper()
	r := piggyback.From(ctx)
	if r == nil {
		t.Fatal("ReleaseOnPublish's context carries no rider")
	}
	pipe := client.Pipeline()
	pipe.Ping(ctx) // stands for the publication
	finish := r.Board(ctx, client, pipe)
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatalf("pipeline: %v", err)
	}
	if finish == nil {
		return false
	}
	finish()
	return true
}

// TestReleaseOnPublish: a release a bus boarded into its pipeline frees the
// lock in that round trip, closes Lost, and Release then reports its
// outcome (nil) once, without another command, and ErrNotHeld after. A
// bus on another client does not board it, and Release releases as
// always. Without ReleaseOnPublish a release was always a round trip of
// its own.
func TestReleaseOnPublish(t *testing.T) {
	ctx := context.Background()
	c := newClient(t, nil)
	hook := &releaseHook{}
	c.AddHook(hook)
	prefix := testPrefix(t, c)
	// A script Redis does not have costs one more round trip (NOSCRIPT,
	// then EVAL); that is not what this test counts.
	if err := releaseScript.Load(ctx, c).Err(); err != nil {
		t.Fatal(err)
	}
	for _, watchdog := range []bool{false, true} {
		g := newGuard(t, c, prefix, &Options{TTL: time.Second, Watchdog: watchdog})
		l, err := g.Acquire(ctx, "a")
		if err != nil {
			t.Fatal(err)
		}
		pctx := l.ReleaseOnPublish(ctx)
		hook.reset()
		if !board(t, pctx, c) {
			t.Fatalf("watchdog %v: the rider did not board a pipeline of its Guard's client", watchdog)
		}
		if alone, piped := hook.counts(); alone != 0 || piped != 1 {
			t.Errorf("watchdog %v: releases sent alone, in a pipeline = %d, %d; want 0, 1", watchdog, alone, piped)
		}
		if !isClosed(l.Lost()) {
			t.Errorf("watchdog %v: Lost not closed after the release boarded", watchdog)
		}
		if n, _ := c.Exists(ctx, l.keys.lock).Result(); n != 0 {
			t.Errorf("watchdog %v: lock key still exists after the pipelined release", watchdog)
		}
		if err := l.Release(ctx); err != nil {
			t.Errorf("watchdog %v: Release after the pipelined release = %v; want nil", watchdog, err)
		}
		if alone, piped := hook.counts(); alone != 0 || piped != 1 {
			t.Errorf("watchdog %v: after Release, releases sent alone, in a pipeline = %d, %d; want 0, 1", watchdog, alone, piped)
		}
		if err := l.Release(ctx); !errors.Is(err, ErrNotHeld) {
			t.Errorf("watchdog %v: second Release = %v; want ErrNotHeld", watchdog, err)
		}
		if err := l.Extend(ctx, time.Second); !errors.Is(err, ErrNotHeld) {
			t.Errorf("watchdog %v: Extend after the pipelined release = %v; want ErrNotHeld", watchdog, err)
		}
	}

	// Another client: the rider stays with the holder.
	g := newGuard(t, c, prefix, nil)
	l, err := g.Acquire(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	other := newClient(t, nil)
	if board(t, l.ReleaseOnPublish(ctx), other) {
		t.Fatal("the rider boarded a pipeline of another client")
	}
	if isClosed(l.Lost()) {
		t.Error("Lost closed by a rider that did not board")
	}
	if err := l.Release(ctx); err != nil {
		t.Fatalf("Release = %v", err)
	}
	if n, _ := c.Exists(ctx, l.keys.lock).Result(); n != 0 {
		t.Error("lock key still exists after Release")
	}
}

// TestReleaseOnPublishOfALostLock: a pipelined release of a lock another
// owner holds now deletes nothing, and Release reports ErrNotHeld, as a
// Release of its own would.
func TestReleaseOnPublishOfALostLock(t *testing.T) {
	ctx := context.Background()
	c := newClient(t, nil)
	prefix := testPrefix(t, c)
	g := newGuard(t, c, prefix, &Options{TTL: 50 * time.Millisecond})
	l, err := g.Acquire(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	within(t, l.Lost(), time.Second, "the lease's end")
	l2, err := g.Acquire(ctx, "a") // waits until Redis, too, has expired the key
	if err != nil {
		t.Fatal(err)
	}
	if !board(t, l.ReleaseOnPublish(ctx), c) {
		t.Fatal("the rider did not board")
	}
	if err := l.Release(ctx); !errors.Is(err, ErrNotHeld) {
		t.Errorf("Release of the lost lock = %v; want ErrNotHeld", err)
	}
	if v, _ := c.Get(ctx, l2.keys.lock).Result(); v != l2.value {
		t.Errorf("lock key = %q; want the new owner's value", v)
	}
	if err := l2.Release(ctx); err != nil {
		t.Errorf("new owner's Release = %v", err)
	}
}

// releaseHook counts the release scripts a client sends, alone and in
// pipelines.
type releaseHook struct {
	mu           sync.Mutex
	alone, piped int
}

func (h *releaseHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *releaseHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if isScript(cmd, releaseScript) {
			h.mu.Lock()
			h.alone++
			h.mu.Unlock()
		}
		return next(ctx, cmd)
	}
}

func (h *releaseHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if isScript(cmd, releaseScript) {
				h.mu.Lock()
				h.piped++
				h.mu.Unlock()
			}
		}
		return next(ctx, cmds)
	}
}

func (h *releaseHook) counts() (alone, piped int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.alone, h.piped
}

func (h *releaseHook) reset() {
	h.mu.Lock()
	h.alone, h.piped = 0, 0
	h.mu.Unlock()
}

// TestWithLockStartsNoGoroutine: WithLock's function runs with no
// goroutine of WithLock's beside it (it used to start one per call to
// wait for Lost); a lock lost during fn still cancels fn's context (see
// TestWithLock), from the lease timer or the watchdog.
func TestWithLockStartsNoGoroutine(t *testing.T) {
	c := newClient(t, nil)
	g := newGuard(t, c, testPrefix(t, c), nil)
	err := g.WithLock(t.Context(), "a", func(context.Context, *Lock) error {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		if strings.Contains(stacks, "created by github.com/coherentcache/coherent/lockguard.(*Guard).WithLock") {
			t.Errorf("a goroutine of WithLock runs beside fn:\n%s", stacks)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
