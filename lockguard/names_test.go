package lockguard

import (
	"context"
	"errors"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
)

// maxErrLen bounds the length of any error message of the package: a
// message names a lock, but never spells out a long name in full.
const maxErrLen = 256

// entryPoints returns every method of g that takes a lock name, each
// called with name.
func entryPoints(ctx context.Context, g *Guard, name string) []struct {
	method string
	call   func() error
} {
	return []struct {
		method string
		call   func() error
	}{
		{"Acquire", func() error {
			l, err := g.Acquire(ctx, name)
			if err == nil {
				_ = l.Release(ctx)
			}
			return err
		}},
		{"TryAcquire", func() error {
			l, err := g.TryAcquire(ctx, name)
			if err == nil {
				_ = l.Release(ctx)
			}
			return err
		}},
		{"WithLock", func() error {
			return g.WithLock(ctx, name, func(context.Context, *Lock) error { return nil })
		}},
		{"AdvanceFence", func() error { return g.AdvanceFence(ctx, name, 1) }},
	}
}

// TestInvalidNameLimits guards against unbounded lock names: a 1 MiB name
// of '{' became three keys of 3 MiB each, sent to Redis, and every error
// naming the lock carried the whole megabyte. Every entry point must
// reject an empty name or one longer than MaxNameLen with ErrInvalidName
// and a short message, before a single command is sent.
func TestInvalidNameLimits(t *testing.T) {
	t.Parallel()
	var hook cmdHook
	rdb := newClient(t, nil)
	rdb.AddHook(&hook)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	ctx := t.Context()
	names := []string{
		"",
		strings.Repeat("{", MaxNameLen+1),
		strings.Repeat("n", MaxNameLen+1),
		strings.Repeat("{", 1<<20),
	}
	for _, name := range names {
		for _, ep := range entryPoints(ctx, g, name) {
			err := ep.call()
			if !errors.Is(err, ErrInvalidName) {
				t.Errorf("%s(name of %d bytes) = %.200v; want ErrInvalidName", ep.method, len(name), err)
				continue
			}
			if n := len(err.Error()); n > maxErrLen {
				t.Errorf("%s(name of %d bytes): message of %d bytes; want at most %d", ep.method, len(name), n, maxErrLen)
			}
		}
	}
	if n := hook.count(); n != 0 {
		t.Errorf("invalid names sent %d commands to Redis; want none", n)
	}
}

// TestInvalidNameAllocatesNothing guards against work done for a name
// that is rejected anyway: the check must come before the name is escaped
// into keys (a 1 MiB name of '{' cost over 12 MiB of allocation per call).
// It does not run in parallel, so that other tests' allocations do not
// count.
func TestInvalidNameAllocatesNothing(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialerRetries: 1})
	t.Cleanup(func() { _ = c.Close() })
	g, err := New(c, nil)
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	ctx := t.Context()
	name := strings.Repeat("{", 1<<20)
	const runs = 10
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		_, _ = g.TryAcquire(ctx, name)
		_ = g.AdvanceFence(ctx, name, 1)
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / (2 * runs); per > 4<<10 {
		t.Errorf("a call with a name of %d bytes allocated %d bytes; want under 4 KiB", len(name), per)
	}
}

// TestLongestNames guards the other side of the limit: the longest names
// the package admits work, including the longest the store derives from
// a namespace and a key of cache.MaxKeyLen bytes each, and the longest
// name made only of escaped bytes. Their keys stay within the documented
// bound, and errors naming them stay short.
func TestLongestNames(t *testing.T) {
	t.Parallel()
	// store.lockName is len(namespace) + ":" + namespace + ":" + key.
	storeLongest := strconv.Itoa(cache.MaxKeyLen) + ":" + strings.Repeat("n", cache.MaxKeyLen) + ":" + strings.Repeat("k", cache.MaxKeyLen)
	if len(storeLongest) > MaxNameLen {
		t.Fatalf("the store's longest lock name has %d bytes; MaxNameLen %d is too small", len(storeLongest), MaxNameLen)
	}
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	ctx := t.Context()
	for _, name := range []string{
		storeLongest,
		strings.Repeat("{", MaxNameLen),
		strings.Repeat("%", MaxNameLen),
		strings.Repeat("\xff", MaxNameLen),
	} {
		k, err := g.keys(name)
		if err != nil {
			t.Fatalf("keys(name of %d bytes) = %v", len(name), err)
		}
		for _, key := range []string{k.lock, k.fence, k.waiters} {
			if bound := len(prefix) + 3*MaxNameLen + len("{}:waiters"); len(key) > bound {
				t.Errorf("key of %d bytes for a name of %d; want at most %d", len(key), len(name), bound)
			}
		}
		l, err := g.TryAcquire(ctx, name)
		if err != nil {
			t.Fatalf("TryAcquire(name of %d bytes) = %v", len(name), err)
		}
		_, err = g.TryAcquire(ctx, name)
		if !errors.Is(err, ErrNotAcquired) {
			t.Errorf("second TryAcquire(name of %d bytes) = %.200v; want ErrNotAcquired", len(name), err)
		} else if n := len(err.Error()); n > maxErrLen {
			t.Errorf("second TryAcquire(name of %d bytes): message of %d bytes; want at most %d", len(name), n, maxErrLen)
		}
		if err := g.AdvanceFence(ctx, name, 10); err != nil {
			t.Errorf("AdvanceFence(name of %d bytes) = %v", len(name), err)
		}
		if err := l.Release(ctx); err != nil {
			t.Errorf("Release() = %v", err)
		}
		err = l.Release(ctx)
		if !errors.Is(err, ErrNotHeld) {
			t.Errorf("second Release() = %.200v; want ErrNotHeld", err)
		} else if n := len(err.Error()); n > maxErrLen {
			t.Errorf("second Release() of a name of %d bytes: message of %d bytes; want at most %d", len(name), n, maxErrLen)
		}
	}
}

// TestQuoteName pins the short form of names in messages: whole while
// the quoted form is short, else a quoted prefix cut on a rune boundary
// and followed by the length, so that no name, however long or full of
// escapes, makes a long message.
func TestQuoteName(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("a", 63) + "ü" + strings.Repeat("b", 100)
	for _, tt := range []struct{ name, want string }{
		{"orders/42", `"orders/42"`},
		{"a\x00b", `"a\x00b"`},
		{strings.Repeat("x", 64), strconv.Quote(strings.Repeat("x", 64))},
		{strings.Repeat("x", 65), strconv.Quote(strings.Repeat("x", 64)) + "… (65 bytes)"},
		{long, strconv.Quote(strings.Repeat("a", 63)) + "… (165 bytes)"},
		{strings.Repeat("\xff", 64), strconv.Quote(strings.Repeat("\xff", 16)) + "… (64 bytes)"},
		{strings.Repeat("\xff", 20), strconv.Quote(strings.Repeat("\xff", 16)) + "… (20 bytes)"},
	} {
		if got := quoteName(tt.name); got != tt.want {
			t.Errorf("quoteName(%.80q) = %s; want %s", tt.name, got, tt.want)
		}
	}
	for _, name := range []string{
		strings.Repeat("\x00", MaxNameLen),
		strings.Repeat("\u0085", MaxNameLen/2),
		strings.Repeat("😀", MaxNameLen/4),
		strings.Repeat("{", MaxNameLen),
	} {
		if got := quoteName(name); len(got) > 66+len("… (16384 bytes)") {
			t.Errorf("quoteName(%d bytes) = %s: %d bytes; want at most %d", len(name), got, len(got), 66+len("… (16384 bytes)"))
		}
	}
}
