package invalidate

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// provenBus is what these tests need of a Redis bus.
type provenBus interface {
	cache.Bus
	Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error
	Proven() bool
	Stats() Stats
	Close() error
}

var (
	_ provenBus = (*PubSub)(nil)
	_ provenBus = (*Streams)(nil)
)

// busMaker makes a Redis bus of one kind on a channel or stream that
// name identifies.
type busMaker struct {
	name   string
	newBus func(t *testing.T, client redis.UniversalClient, name string) provenBus
}

var transports = []busMaker{
	{"PubSub", func(t *testing.T, client redis.UniversalClient, name string) provenBus {
		return newPubSub(t, client, testOptions(name))
	}},
	{"Streams", func(t *testing.T, client redis.UniversalClient, name string) provenBus {
		return newStreams(t, client, testStreamsOptions(name))
	}},
}

// privateRedis starts a redis-server of the test's own and returns its
// address and a client of it, closed at the end of the test.
func privateRedis(t *testing.T) (string, *redis.Client) {
	t.Helper()
	srv := testenv.StartRedisServer(t)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { _ = c.Close() })
	return srv.Addr(), c
}

// proxiedClient returns a client that reaches addr through a new fault
// proxy, and the proxy. The client gives up at once when the proxy
// refuses it, so that a failed publication does not hold a test up.
func proxiedClient(t *testing.T, addr string) (*redis.Client, *faultproxy.Proxy) {
	t.Helper()
	proxy, err := faultproxy.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	c := redis.NewClient(&redis.Options{Addr: proxy.Addr(), MaxRetries: -1, DialTimeout: time.Second})
	t.Cleanup(func() { _ = c.Close() })
	return c, proxy
}

// countingLoader is a stand-in for Postgres whose loads the test counts.
type countingLoader struct {
	rows  map[string]int64 // written before the cache exists; read-only after
	loads atomic.Int64
}

func (l *countingLoader) load(_ context.Context, key string) (int64, error) {
	l.loads.Add(1)
	v, ok := l.rows[key]
	if !ok {
		return 0, cache.ErrNotFound
	}
	return v, nil
}

// TestLinkLostEndsProofAtOnce guards against a node that keeps serving
// from memory after its bus has noticed that the link failed: the cache's
// proof ran MaxStaleness past the last probe or read, and until the bus
// reconnected (and, for PubSub, flushed) it served values that other
// nodes' invalidations, going past it meanwhile, may have made stale. The
// proxy refuses the reconnection, so the link stays down while the test
// looks: right after the bus notices (its reconnect counter moves, which
// it does after ending the proof), ProofAge must report no proof, Proven false,
// the Handler told, and a cache on the bus must read through although its
// MaxStaleness, a minute, has far from run out.
func TestLinkLostEndsProofAtOnce(t *testing.T) {
	t.Parallel()
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			addr, _ := privateRedis(t)
			client, proxy := proxiedClient(t, addr)
			const maxStaleness = time.Minute
			bus := tr.newBus(t, client, "coherent")
			src := &countingLoader{rows: map[string]int64{"k": 1}}
			c, err := cache.New("users", 10, src.load, &cache.Options[string, int64]{Bus: bus, MaxStaleness: maxStaleness})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rec := new(invalidatetest.Recorder)
			sub, err := bus.Subscribe("probe", rec, maxStaleness)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Close()
			invalidatetest.WaitProven(t, sub)
			rec.Reset() // the first subscription's flush
			ctx := context.Background()
			invalidatetest.WaitFor(t, "a hit", func() bool {
				_, _ = c.Get(ctx, "k")
				return c.Stats().Hits > 0
			})
			if !bus.Proven() {
				t.Fatalf("Proven() = false on a proven link")
			}

			before := bus.Stats().Reconnects
			proxy.Refuse(true) // the reconnection cannot complete
			proxy.KillAll()
			invalidatetest.WaitFor(t, "the bus to notice the failed link", func() bool { return bus.Stats().Reconnects > before })
			if age, ok := sub.ProofAge(); ok {
				t.Errorf("ProofAge() after the bus noticed the failure = %v, true; want no proof", age)
			}
			if bus.Proven() {
				t.Errorf("Proven() after the bus noticed the failure = true; want false")
			}
			if n := rec.LinksLost(); n != 1 {
				t.Errorf("Handler.LinkLost called %d times; want 1", n)
			}
			st, loads := c.Stats(), src.loads.Load()
			if _, err := c.Get(ctx, "k"); err != nil {
				t.Fatal(err)
			}
			if got := c.Stats(); got.Bypassed != st.Bypassed+1 || got.Hits != st.Hits || src.loads.Load() != loads+1 {
				t.Errorf("Get after the bus noticed the failure: hits %d→%d, bypassed %d→%d, loads +%d; want it to read through (bypassed +1, loads +1)",
					st.Hits, got.Hits, st.Bypassed, got.Bypassed, src.loads.Load()-loads)
			}
			if got := bus.Stats().LinksLost; got != 1 {
				t.Errorf("Stats().LinksLost = %d; want 1", got)
			}

			proxy.Refuse(false)
			invalidatetest.WaitFor(t, "a hit after the link is back", func() bool {
				h := c.Stats().Hits
				_, _ = c.Get(ctx, "k")
				return c.Stats().Hits > h
			})
			if tr.name == "Streams" && rec.Flushes() != 0 {
				// Resuming from its position, the bus keeps what the
				// caches hold.
				t.Errorf("Streams flushed %d times after a lost connection; want 0", rec.Flushes())
			}
		})
	}
}

// TestProven guards against a relay that claims outbox rows over a link
// it cannot prove (race 17): Proven, which package store's relay consults,
// must be false before the first proof, true once proven, false again once
// a silent link has gone the bus's staleness bound without a proof, true
// after it recovers, and false after Close; on a bus with a cache's
// subscription, and on one without (a relay-only process, whose bound is
// the default). That it turns false at once when the bus detects a loss
// is checked by TestLinkLostEndsProofAtOnce, with a MaxStaleness long
// enough for the check to tell.
func TestProven(t *testing.T) {
	t.Parallel()
	for _, tr := range transports {
		for _, subscribed := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/subscribed=%v", tr.name, subscribed), func(t *testing.T) {
				t.Parallel()
				testProven(t, tr, subscribed)
			})
		}
	}
	t.Run("InProcess", func(t *testing.T) {
		t.Parallel()
		bus := NewInProcess()
		if !bus.Proven() {
			t.Errorf("InProcess Proven() = false; want true: it cannot lose a message")
		}
		_ = bus.Close()
		if bus.Proven() {
			t.Errorf("InProcess Proven() after Close = true; want false")
		}
	})
}

func testProven(t *testing.T, tr busMaker, subscribed bool) {
	addr, _ := privateRedis(t)
	client, proxy := proxiedClient(t, addr)
	proxy.Pause()
	bus := tr.newBus(t, client, "coherent")
	if subscribed {
		sub, err := bus.Subscribe("ns", new(invalidatetest.Recorder), staleness)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Close()
	}
	if bus.Proven() {
		t.Errorf("Proven() before any proof = true; want false")
	}
	proxy.Resume()
	invalidatetest.WaitFor(t, "Proven", bus.Proven)

	proxy.Pause() // a half-open link: nothing tells the bus
	invalidatetest.WaitFor(t, "Proven to turn false on a silent link", func() bool { return !bus.Proven() })
	proxy.Resume()
	invalidatetest.WaitFor(t, "Proven again", bus.Proven)
	_ = bus.Close()
	if bus.Proven() {
		t.Errorf("Proven() after Close = true; want false")
	}
}

// TestWriteThroughBeforeFirstSubscription reproduces DESIGN race 19: node
// A starts while Redis is unreachable, writes k=v1 and installs it
// locally (its publication fails); node B writes k=v2 and publishes, which
// A, not yet subscribed, never hears; then A's bus subscribes and proves
// its link. Unless the bus flushes at its first subscription as at any
// other, A serves v1 until its TTL. B is a second bus of this process,
// connected throughout: a bus's first subscription is its own, whatever
// other buses of the process do.
func TestWriteThroughBeforeFirstSubscription(t *testing.T) {
	t.Parallel()
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			addr, direct := privateRedis(t)
			client, proxy := proxiedClient(t, addr)
			proxy.Refuse(true) // Redis is unreachable from A
			busA := tr.newBus(t, client, "coherent")
			busB := tr.newBus(t, direct, "coherent")
			src := &versioned{rows: map[string]int64{}}
			a, err := cache.New("users", 10, src.load, &cache.Options[string, int64]{
				Bus: busA, Version: func(v int64) int64 { return v }, MaxStaleness: 300 * time.Millisecond, TTL: time.Hour,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			ctx := context.Background()

			v1 := src.write("k")
			if err := a.Set(ctx, "k", v1, v1); err == nil {
				t.Fatalf("A's Set published through a proxy that refuses every connection")
			}
			probeB, _ := busB.Subscribe("probe", new(invalidatetest.Recorder), staleness)
			defer probeB.Close()
			invalidatetest.WaitProven(t, probeB)
			v2 := src.write("k")
			if err := busB.Publish(ctx, "users", []cache.Invalidation{{Key: "k", Version: v2}}); err != nil {
				t.Fatalf("B's Publish error = %v", err)
			}

			proxy.Refuse(false)
			invalidatetest.WaitFor(t, "A's cache to be proven", a.Proven)
			if got, err := a.Get(ctx, "k"); err != nil || got != v2 {
				t.Errorf("A's Get(k) once proven = %d, %v; want %d, written by B before A's bus subscribed", got, err, v2)
			}
			if st := busA.Stats(); st.FlushesFirstSubscription != 1 {
				t.Errorf("A's FlushesFirstSubscription = %d; want 1", st.FlushesFirstSubscription)
			}
		})
	}
}

// TestWriteThroughWhileReconnecting guards against the other way a cache
// can meet a bus that is not listening: it subscribes, and writes through,
// while the bus's link is down after having been up, and must not keep its
// own write over a newer one published meanwhile. The reconnection covers
// it, by a flush (PubSub) or by reading what B added meanwhile (Streams).
func TestWriteThroughWhileReconnecting(t *testing.T) {
	t.Parallel()
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			addr, direct := privateRedis(t)
			client, proxy := proxiedClient(t, addr)
			busA := tr.newBus(t, client, "coherent")
			busB := tr.newBus(t, direct, "coherent")
			probeA, _ := busA.Subscribe("probe", new(invalidatetest.Recorder), staleness)
			defer probeA.Close()
			probeB, _ := busB.Subscribe("probe", new(invalidatetest.Recorder), staleness)
			defer probeB.Close()
			invalidatetest.WaitProven(t, probeA, probeB)

			before := busA.Stats().Reconnects
			proxy.Refuse(true)
			proxy.KillAll()
			invalidatetest.WaitFor(t, "A's bus to notice the failed link", func() bool { return busA.Stats().Reconnects > before })

			src := &versioned{rows: map[string]int64{}}
			a, err := cache.New("users", 10, src.load, &cache.Options[string, int64]{
				Bus: busA, Version: func(v int64) int64 { return v }, MaxStaleness: 300 * time.Millisecond, TTL: time.Hour,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			ctx := context.Background()
			v1 := src.write("k")
			if err := a.Set(ctx, "k", v1, v1); err == nil {
				t.Fatalf("A's Set published through a proxy that refuses every connection")
			}
			v2 := src.write("k")
			if err := busB.Publish(ctx, "users", []cache.Invalidation{{Key: "k", Version: v2}}); err != nil {
				t.Fatalf("B's Publish error = %v", err)
			}
			proxy.Refuse(false)
			invalidatetest.WaitFor(t, "A's cache to be proven", a.Proven)
			if got, err := a.Get(ctx, "k"); err != nil || got != v2 {
				t.Errorf("A's Get(k) once proven = %d, %v; want %d, written by B while A's link was down", got, err, v2)
			}
		})
	}
}

// TestInProcessClose checks that closing an InProcess bus ends the proof
// of the caches still on it at once: it will deliver nothing more, and
// each cache would otherwise serve until MaxStaleness after it last asked.
func TestInProcessClose(t *testing.T) {
	t.Parallel()
	bus := NewInProcess()
	src := &countingLoader{rows: map[string]int64{"k": 1}}
	c, err := cache.New("users", 10, src.load, &cache.Options[string, int64]{Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rec := new(invalidatetest.Recorder)
	sub, err := bus.Subscribe("users", rec, staleness)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	_, _ = c.Get(ctx, "k")
	_, _ = c.Get(ctx, "k")
	if st := c.Stats(); st.Hits != 1 {
		t.Fatalf("Stats() = %+v; want 1 hit", st)
	}
	if err := bus.Close(); err != nil {
		t.Errorf("Close() error = %v", err)
	}
	if err := bus.Close(); err != nil {
		t.Errorf("second Close() error = %v; want nil", err)
	}
	if rec.LinksLost() != 1 {
		t.Errorf("Handler.LinkLost called %d times after Close; want 1", rec.LinksLost())
	}
	if age, ok := sub.ProofAge(); ok {
		t.Errorf("ProofAge() after Close = %v, true; want no proof", age)
	}
	if _, err := c.Get(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Bypassed != 1 {
		t.Errorf("Get after the bus closed: Stats() = %+v; want it to bypass the cache", st)
	}
	if err := bus.Publish(ctx, "users", []cache.Invalidation{{Key: "k"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Publish after Close error = %v; want ErrClosed", err)
	}
	if err := sub.Publish(ctx, []cache.Invalidation{{Key: "k"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Subscription.Publish after Close error = %v; want ErrClosed", err)
	}
	if _, err := bus.Subscribe("users", rec, staleness); !errors.Is(err, ErrClosed) {
		t.Errorf("Subscribe after Close error = %v; want ErrClosed", err)
	}
}
