package lockguard

import (
	"context"
	"errors"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// suiteFenceCounterEdges guards the fence counter at the ends of its range
// and against garbage in its key, on every deployment. Lua numbers are
// doubles: INCR's reply above 2^53 came back rounded (2^53+1 as 2^53, so a
// token was issued twice), MaxInt64 came back as MinInt64, and at MaxInt64
// or on a non-integer every acquisition failed with a raw Redis error.
func suiteFenceCounterEdges(t *testing.T, env lockEnv) {
	rdb := env.client(t)
	prefix := env.prefix(t, rdb)
	g := newGuard(t, rdb, prefix, &Options{TTL: 10 * time.Second})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	const p53 = int64(1) << 53
	n := 0
	newName := func(t *testing.T) (string, lockKeys) {
		n++
		name := "fence-" + strconv.Itoa(n)
		k, err := g.keys(name)
		if err != nil {
			t.Fatalf("keys(%q) = %v", name, err)
		}
		return name, k
	}
	take := func(t *testing.T, name string) (int64, error) {
		t.Helper()
		l, err := g.TryAcquire(ctx, name)
		if err != nil {
			return 0, err
		}
		if err := l.Release(ctx); err != nil {
			t.Fatalf("Release() = %v", err)
		}
		return l.Token(), nil
	}
	counter := func(t *testing.T, k lockKeys) string {
		t.Helper()
		v, err := rdb.Get(ctx, k.fence).Result()
		if errors.Is(err, redis.Nil) {
			return "(none)"
		}
		if err != nil {
			return "(" + err.Error() + ")"
		}
		return v
	}
	set := func(t *testing.T, k lockKeys, v string) {
		t.Helper()
		if err := rdb.Set(ctx, k.fence, v, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	// cleanFail checks that err is a short, typed error that leaks no raw
	// Redis reply, and that the failed acquisition left the lock free.
	cleanFail := func(t *testing.T, what string, err, want error, k lockKeys) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Errorf("%s = %v; want %v", what, err, want)
			return
		}
		if msg := err.Error(); len(msg) > maxErrLen || strings.Contains(msg, "ERR ") || strings.Contains(msg, "script") {
			t.Errorf("%s = %q; want a short message without a raw Redis error", what, msg)
		}
		if n, _ := rdb.Exists(ctx, k.lock).Result(); n != 0 {
			t.Errorf("%s left the lock key behind", what)
		}
	}

	t.Run("ExactTokens", func(t *testing.T) {
		for _, start := range []int64{p53 - 1, p53, p53 + 1, p53 + 2, p53 + 3, math.MaxInt64 - 2, math.MinInt64} {
			name, k := newName(t)
			set(t, k, strconv.FormatInt(start, 10))
			for i := int64(1); i <= 2; i++ {
				got, err := take(t, name)
				if err != nil {
					t.Fatalf("TryAcquire() with counter at %d = %v", start+i-1, err)
				}
				if got != start+i {
					t.Errorf("token with counter at %d = %d; want %d", start+i-1, got, start+i)
				}
			}
		}
	})

	t.Run("Exhausted", func(t *testing.T) {
		name, k := newName(t)
		set(t, k, strconv.FormatInt(math.MaxInt64-1, 10))
		if got, err := take(t, name); err != nil || got != math.MaxInt64 {
			t.Fatalf("TryAcquire() with counter at MaxInt64-1 = %d, %v; want token MaxInt64", got, err)
		}
		_, err := g.TryAcquire(ctx, name)
		cleanFail(t, "TryAcquire() with counter at MaxInt64", err, ErrFenceExhausted, k)
		// A waiting Acquire must fail at once, not wait for a lock that
		// is free but cannot be fenced.
		actx, acancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = g.Acquire(actx, name)
		acancel()
		cleanFail(t, "Acquire() with counter at MaxInt64", err, ErrFenceExhausted, k)
		called := false
		err = g.WithLock(ctx, name, func(context.Context, *Lock) error { called = true; return nil })
		cleanFail(t, "WithLock() with counter at MaxInt64", err, ErrFenceExhausted, k)
		if called {
			t.Errorf("WithLock() with counter at MaxInt64 ran its function")
		}
		if got := counter(t, k); got != "9223372036854775807" {
			t.Errorf("counter after failed acquisitions = %s; want it unchanged at MaxInt64", got)
		}
		// No token can be greater than MaxInt64: AdvanceFence says so
		// and changes nothing.
		name2, k2 := newName(t)
		set(t, k2, "5")
		err = g.AdvanceFence(ctx, name2, math.MaxInt64)
		cleanFail(t, "AdvanceFence(MaxInt64)", err, ErrFenceExhausted, k2)
		if got := counter(t, k2); got != "5" {
			t.Errorf("counter after AdvanceFence(MaxInt64) = %s; want 5", got)
		}
	})

	t.Run("Corrupt", func(t *testing.T) {
		for _, v := range []string{
			"abc", "", "1.5", " 1", "1 ", "+1", "012", "-0", "-", "1e3", "0x10",
			"9223372036854775808", "-9223372036854775809", "99999999999999999999",
		} {
			name, k := newName(t)
			set(t, k, v)
			_, err := g.TryAcquire(ctx, name)
			cleanFail(t, "TryAcquire() with counter "+strconv.Quote(v), err, ErrFenceCorrupt, k)
			err = g.AdvanceFence(ctx, name, 10)
			cleanFail(t, "AdvanceFence() with counter "+strconv.Quote(v), err, ErrFenceCorrupt, k)
			if got := counter(t, k); got != v {
				t.Errorf("counter %q after failed calls = %q; want it left for an operator", v, got)
			}
		}
		// A counter of the wrong type.
		name, k := newName(t)
		if err := rdb.RPush(ctx, k.fence, "x").Err(); err != nil {
			t.Fatal(err)
		}
		_, err := g.TryAcquire(ctx, name)
		cleanFail(t, "TryAcquire() with a list as counter", err, ErrFenceCorrupt, k)
		err = g.AdvanceFence(ctx, name, 10)
		cleanFail(t, "AdvanceFence() with a list as counter", err, ErrFenceCorrupt, k)
	})

	t.Run("AdvanceFenceExact", func(t *testing.T) {
		for _, tt := range []struct {
			counter string // "" for none
			atLeast int64
			want    string
		}{
			{"9007199254740992", p53 + 1, "9007199254740993"}, // both 2^53 as doubles
			{"9007199254740993", p53, "9007199254740993"},
			{"9007199254740993", p53 + 2, "9007199254740994"},
			{"9223372036854775308", math.MaxInt64 - 1, "9223372036854775806"}, // both 2^63 as doubles
			{"9223372036854775806", math.MaxInt64 - 2, "9223372036854775806"},
			{"99", 100, "100"},
			{"100", 99, "100"},
			{"", 5, "5"},
			{"", -3, "(none)"},
			{"5", -1, "5"},
			{"-10", -3, "-3"},
			{"-3", -10, "-3"},
			{"-100", -99, "-99"},
			{"-9223372036854775808", math.MinInt64 + 1, "-9223372036854775807"},
		} {
			name, k := newName(t)
			if tt.counter != "" {
				set(t, k, tt.counter)
			}
			if err := g.AdvanceFence(ctx, name, tt.atLeast); err != nil {
				t.Errorf("AdvanceFence(%d) with counter %q = %v", tt.atLeast, tt.counter, err)
				continue
			}
			if got := counter(t, k); got != tt.want {
				t.Errorf("AdvanceFence(%d) with counter %q: counter %s; want %s", tt.atLeast, tt.counter, got, tt.want)
			}
		}
		name, _ := newName(t)
		if err := g.AdvanceFence(ctx, name, p53+1); err != nil {
			t.Fatalf("AdvanceFence(2^53+1) = %v", err)
		}
		if got, err := take(t, name); err != nil || got != p53+2 {
			t.Errorf("token after AdvanceFence(2^53+1) = %d, %v; want %d", got, err, p53+2)
		}
	})
}

// replyInt reads element i of a script's reply, an integer or a string of
// digits.
func replyInt(t *testing.T, res []any, i int) int64 {
	t.Helper()
	if i >= len(res) {
		t.Fatalf("reply %v has no element %d", res, i)
	}
	switch v := res[i].(type) {
	case int64:
		return v
	case string:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("reply %v: element %d: %v", res, i, err)
		}
		return n
	}
	t.Fatalf("reply %v: element %d is a %T", res, i, res[i])
	return 0
}

// TestAcquireScriptRetryEdges guards the retry branch of the acquire
// script (a lost reply, the same value sent again) at the fence's edges:
// above 2^53 the retry must report the very token the first run issued,
// and when the counter was corrupted in between, it must report that and
// free the lock rather than leave it taken by nobody for a whole lease.
func TestAcquireScriptRetryEdges(t *testing.T) {
	t.Parallel()
	rdb := newClient(t, nil)
	prefix := testPrefix(t, rdb)
	g := newGuard(t, rdb, prefix, nil)
	ctx := t.Context()
	k, _ := g.keys("res")
	keys := []string{k.lock, k.fence, k.waiters}
	run := func() ([]any, error) {
		return acquireScript.Run(ctx, rdb, keys, "v1", "10000", "0").Slice()
	}
	const p53 = int64(1) << 53
	if err := rdb.Set(ctx, k.fence, strconv.FormatInt(p53+2, 10), 0).Err(); err != nil {
		t.Fatal(err)
	}
	first, err := run()
	if err != nil {
		t.Fatalf("acquire script = %v", err)
	}
	again, err := run()
	if err != nil {
		t.Fatalf("acquire script again = %v", err)
	}
	if replyInt(t, first, 0) != 1 || replyInt(t, again, 0) != 1 {
		t.Fatalf("acquire script twice = %v, %v; want two grants", first, again)
	}
	if a, b := replyInt(t, first, 1), replyInt(t, again, 1); a != p53+3 || b != p53+3 {
		t.Errorf("tokens of the first run and the retry = %d, %d; want %d twice", a, b, p53+3)
	}
	if err := rdb.Set(ctx, k.fence, "garbage", 0).Err(); err != nil {
		t.Fatal(err)
	}
	res, err := run()
	if err == nil && len(res) > 0 && replyInt(t, res, 0) == 1 {
		t.Errorf("retry with a corrupt counter = %v; want no grant", res)
	}
	if n, _ := rdb.Exists(ctx, k.lock).Result(); n != 0 {
		t.Errorf("retry with a corrupt counter (reply %v, %v) left the lock taken", res, err)
	}
}
