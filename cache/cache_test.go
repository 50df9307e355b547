package cache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestNewRejectsBadArguments(t *testing.T) {
	load := func(ctx context.Context, k string) (string, error) { return k, nil }
	tests := []struct {
		name     string
		ns       string
		capacity int
		load     LoaderFunc[string, string]
		opts     *Options[string, string]
	}{
		{"empty namespace", "", 10, load, nil},
		{"long namespace", strings.Repeat("n", MaxKeyLen+1), 10, load, nil},
		{"zero capacity", "ns", 0, load, nil},
		{"negative capacity", "ns", -1, load, nil},
		{"nil loader", "ns", 10, nil, nil},
		{"negative TTL", "ns", 10, load, &Options[string, string]{TTL: -time.Second}},
		{"negative NegativeTTL", "ns", 10, load, &Options[string, string]{NegativeTTL: -1}},
		{"negative MaxStaleness", "ns", 10, load, &Options[string, string]{MaxStaleness: -1}},
		{"negative LoadTimeout", "ns", 10, load, &Options[string, string]{LoadTimeout: -1}},
		{"negative Jitter", "ns", 10, load, &Options[string, string]{Jitter: -0.1}},
		{"Jitter of one", "ns", 10, load, &Options[string, string]{Jitter: 1}},
		{"negative Shards", "ns", 10, load, &Options[string, string]{Shards: -2}},
		{"more Shards than capacity", "ns", 10, load, &Options[string, string]{Shards: 11}},
		{"MaxWeight without Weigher", "ns", 10, load, &Options[string, string]{MaxWeight: 100}},
		{"Weigher without MaxWeight", "ns", 10, load, &Options[string, string]{Weigher: func(string, string) uint32 { return 1 }}},
		{"more Shards than MaxWeight", "ns", 10, load, &Options[string, string]{Shards: 4, MaxWeight: 3, Weigher: func(string, string) uint32 { return 1 }}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := New(tt.ns, tt.capacity, tt.load, tt.opts)
			if !errors.Is(err, ErrInvalidOptions) {
				t.Fatalf("New = %v, %v; want an ErrInvalidOptions error", c, err)
			}
		})
	}
}

type pair struct{ a, b int }

func TestNewNeedsACodecForOtherKeyTypes(t *testing.T) {
	load := func(ctx context.Context, k pair) (int, error) { return k.a + k.b, nil }
	if _, err := New("pairs", 10, load, nil); !errors.Is(err, ErrInvalidOptions) {
		t.Fatalf("New without Keys for a struct key = %v; want ErrInvalidOptions", err)
	}
	c := newTestCache(t, 10, load, &Options[pair, int]{Keys: pairCodec{}})
	if got := mustGet(t, c, pair{1, 2}); got != 3 {
		t.Fatalf("Get(pair{1, 2}) = %d; want 3", got)
	}
}

type pairCodec struct{}

func (pairCodec) Encode(k pair) string { return fmt.Sprintf("%d/%d", k.a, k.b) }
func (pairCodec) Decode(s string) (k pair, err error) {
	_, err = fmt.Sscanf(s, "%d/%d", &k.a, &k.b)
	return k, err
}

func TestDefaultCodecs(t *testing.T) {
	type userID string
	type shardID uint16
	roundTrip(t, userID("u-1"))
	roundTrip(t, int64(-42))
	roundTrip(t, int8(-128))
	roundTrip(t, shardID(65535))
	roundTrip(t, uint64(1<<63))

	codec, _ := defaultCodec[int8]()
	if _, err := codec.Decode("300"); err == nil {
		t.Errorf("int8 Decode(%q) succeeded; want an overflow error", "300")
	}
	if _, err := codec.Decode("x"); err == nil {
		t.Errorf("int8 Decode(%q) succeeded; want an error", "x")
	}
}

func roundTrip[K comparable](t *testing.T, k K) {
	t.Helper()
	codec, err := defaultCodec[K]()
	if err != nil {
		t.Fatalf("defaultCodec[%T]: %v", k, err)
	}
	got, err := codec.Decode(codec.Encode(k))
	if err != nil || got != k {
		t.Errorf("Decode(Encode(%v)) = %v, %v; want %v", k, got, err, k)
	}
}

func TestGetLoadsOnceAndHits(t *testing.T) {
	src := newSource()
	src.write("a", "alpha")
	c := newTestCache(t, 10, src.load, nil)
	for range 3 {
		if got := mustGet(t, c, "a"); got.Value != "alpha" {
			t.Fatalf("Get(a) = %v; want alpha", got)
		}
	}
	if n := src.loads.Load(); n != 1 {
		t.Errorf("loads = %d; want 1", n)
	}
	st := c.Stats()
	if st.Hits != 2 || st.Misses != 1 || st.Loads != 1 || st.Entries != 1 {
		t.Errorf("Stats = %+v; want 2 hits, 1 miss, 1 load, 1 entry", st)
	}
}

func TestCapacityIsRespectedAcrossShards(t *testing.T) {
	for _, shards := range []int{1, 3, 8, 64} {
		t.Run(fmt.Sprint(shards), func(t *testing.T) {
			const capacity = 100
			c := newTestCache(t, capacity, func(ctx context.Context, k int) (int, error) { return k, nil },
				&Options[int, int]{Shards: shards})
			for k := range 10 * capacity {
				mustGet(t, c, k)
			}
			st := c.Stats()
			if st.Entries > capacity {
				t.Errorf("Entries = %d; want at most %d", st.Entries, capacity)
			}
			if st.Entries+int(st.Evictions) != 10*capacity {
				t.Errorf("Entries + Evictions = %d + %d; want %d", st.Entries, st.Evictions, 10*capacity)
			}
			sum := 0
			for i := range c.shards {
				sum += c.shards[i].size
			}
			if sum != capacity {
				t.Errorf("sum of shard sizes = %d; want %d", sum, capacity)
			}
		})
	}
}

func TestLRUKeepsRecentlyUsed(t *testing.T) {
	src := newSource()
	for _, k := range []string{"a", "b", "c"} {
		src.write(k, k)
	}
	c := newTestCache(t, 2, src.load, &Options[string, row]{Shards: 1})
	mustGet(t, c, "a")
	mustGet(t, c, "b")
	mustGet(t, c, "a") // a is now the most recent
	mustGet(t, c, "c") // evicts b
	before := src.loads.Load()
	mustGet(t, c, "a")
	if src.loads.Load() != before {
		t.Errorf("Get(a) loaded again; want a hit (b was least recently used)")
	}
	mustGet(t, c, "b")
	if src.loads.Load() != before+1 {
		t.Errorf("Get(b) was a hit; want a load after its eviction")
	}
}

func TestTTLExpiresWithJitter(t *testing.T) {
	clock := newFakeClock()
	src := newSource()
	const ttl, jitter = 100 * time.Second, 0.2
	c := newTestCache(t, 1000, src.load, &Options[string, row]{TTL: ttl, Jitter: jitter, Clock: clock})
	const n = 200
	for i := range n {
		k := fmt.Sprint(i)
		src.write(k, k)
		mustGet(t, c, k)
	}
	// No entry may expire before TTL*(1-jitter)...
	clock.Advance(time.Duration(float64(ttl)*(1-jitter)) - time.Nanosecond)
	for i := range n {
		mustGet(t, c, fmt.Sprint(i))
	}
	if got := src.loads.Load(); got != n {
		t.Fatalf("loads before TTL*(1-jitter) = %d; want %d", got, n)
	}
	// ...and jitter must spread the expiries: some (not all) expire half
	// way through the jitter window.
	clock.Advance(time.Duration(float64(ttl) * jitter / 2))
	for i := range n {
		mustGet(t, c, fmt.Sprint(i))
	}
	reloaded := src.loads.Load() - n
	if reloaded == 0 || reloaded == n {
		t.Errorf("%d of %d entries expired in the first half of the jitter window; want some but not all", reloaded, n)
	}
	// Past TTL nothing loaded before the advance may be served.
	src.write("0", "new")
	clock.Advance(ttl)
	if got := mustGet(t, c, "0"); got.Value != "new" {
		t.Errorf("Get(0) after TTL = %v; want the reloaded value", got)
	}
}

func TestNegativeCaching(t *testing.T) {
	clock := newFakeClock()
	src := newSource()
	c := newTestCache(t, 10, src.load, &Options[string, row]{NegativeTTL: 10 * time.Second, Clock: clock})
	for range 3 {
		if _, err := c.Get(context.Background(), "ghost"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get(ghost) error = %v; want ErrNotFound", err)
		}
	}
	if n := src.loads.Load(); n != 1 {
		t.Errorf("loads of a missing key = %d; want 1 (absence cached)", n)
	}
	src.write("ghost", "boo")
	clock.Advance(10 * time.Second)
	if got := mustGet(t, c, "ghost"); got.Value != "boo" {
		t.Errorf("Get(ghost) after NegativeTTL = %v; want boo", got)
	}
}

func TestDisableNegative(t *testing.T) {
	src := newSource()
	c := newTestCache(t, 10, src.load, &Options[string, row]{DisableNegative: true})
	for range 3 {
		if _, err := c.Get(context.Background(), "ghost"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get(ghost) error = %v; want ErrNotFound", err)
		}
	}
	if n := src.loads.Load(); n != 3 {
		t.Errorf("loads = %d; want 3 (negative caching disabled)", n)
	}
}

func TestLoadErrorsAreNotCached(t *testing.T) {
	calls := 0
	c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
		calls++
		if calls == 1 {
			return "", errBoom
		}
		return "ok", nil
	}, nil)
	if _, err := c.Get(context.Background(), "k"); !errors.Is(err, errBoom) {
		t.Fatalf("Get error = %v; want errBoom", err)
	}
	if got := mustGet(t, c, "k"); got != "ok" {
		t.Fatalf("Get after a failed load = %q; want ok", got)
	}
	if st := c.Stats(); st.LoadErrors != 1 || st.Loads != 2 {
		t.Errorf("Stats = %+v; want 1 load error of 2 loads", st)
	}
}

func TestInvalidKeys(t *testing.T) {
	src := newSource()
	c := newTestCache(t, 10, src.load, nil)
	ctx := context.Background()
	for _, k := range []string{"", strings.Repeat("k", MaxKeyLen+1)} {
		if _, err := c.Get(ctx, k); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Get(len %d) error = %v; want ErrInvalidKey", len(k), err)
		}
		if err := c.Set(ctx, k, row{}, 1); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Set(len %d) error = %v; want ErrInvalidKey", len(k), err)
		}
		if err := c.Invalidate(ctx, "ok", k); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("Invalidate(len %d) error = %v; want ErrInvalidKey", len(k), err)
		}
		if _, err := c.GetMany(ctx, []string{k}); !errors.Is(err, ErrInvalidKey) {
			t.Errorf("GetMany(len %d) error = %v; want ErrInvalidKey", len(k), err)
		}
	}
	if n := src.loads.Load(); n != 0 {
		t.Errorf("loads = %d; want 0 for invalid keys", n)
	}
	// Keys with SQL or shell metacharacters are just keys.
	odd := "'; DROP TABLE users; --\x00\n"
	src.write(odd, "odd")
	if got := mustGet(t, c, odd); got.Value != "odd" {
		t.Errorf("Get(odd key) = %v; want odd", got)
	}
}

func TestUseAfterClose(t *testing.T) {
	bus := &fakeBus{}
	c, err := New("test", 10, newSource().load, &Options[string, row]{Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if !bus.closed {
		t.Error("Close did not close the bus subscription")
	}
	ctx := context.Background()
	if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Get after Close = %v; want ErrClosed", err)
	}
	if _, err := c.GetMany(ctx, []string{"k"}); !errors.Is(err, ErrClosed) {
		t.Errorf("GetMany after Close = %v; want ErrClosed", err)
	}
	if err := c.Set(ctx, "k", row{}, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("Set after Close = %v; want ErrClosed", err)
	}
	if err := c.Delete(ctx, "k", 1); !errors.Is(err, ErrClosed) {
		t.Errorf("Delete after Close = %v; want ErrClosed", err)
	}
	if err := c.Invalidate(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Errorf("Invalidate after Close = %v; want ErrClosed", err)
	}
	if err := c.InvalidateAll(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("InvalidateAll after Close = %v; want ErrClosed", err)
	}
	_ = c.Stats() // must not panic
}
