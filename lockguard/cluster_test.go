package lockguard

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/testenv"
)

// lockEnv is a Redis deployment that the lock suite runs against.
type lockEnv struct {
	// client returns a new client, closed at the end of the test: one per
	// process that the test plays.
	client func(t *testing.T) redis.UniversalClient
	// prefix returns a key prefix of the test's own, whose keys are
	// deleted at the end of the test.
	prefix func(t *testing.T, c redis.UniversalClient) string
	// numSub counts the subscribers of channel on the whole deployment.
	numSub func(ctx context.Context, c redis.UniversalClient, channel string) (int64, error)
}

func singleEnv() lockEnv {
	return lockEnv{
		client: func(t *testing.T) redis.UniversalClient { return newClient(t, nil) },
		prefix: func(t *testing.T, c redis.UniversalClient) string { return testPrefix(t, c) },
		numSub: func(ctx context.Context, c redis.UniversalClient, channel string) (int64, error) {
			m, err := c.PubSubNumSub(ctx, channel).Result()
			return m[channel], err
		},
	}
}

// clusterEnv is the shared Redis Cluster of CI (REDIS_CLUSTER_ADDRS; see
// internal/testenv).
func clusterEnv() lockEnv {
	return lockEnv{
		client: func(t *testing.T) redis.UniversalClient { return testenv.RedisCluster(t).Client(nil) },
		prefix: func(t *testing.T, c redis.UniversalClient) string {
			// No braces: the lock name is the keys' hash tag (Options.Prefix).
			prefix := testenv.Name("lockguard-cluster-test:") + ":"
			testenv.DeleteClusterKeys(t, c.(*redis.ClusterClient), prefix)
			return prefix
		},
		// Classic pub/sub is cluster-wide: PUBLISH reaches every node,
		// and each node counts only its own subscribers.
		numSub: func(ctx context.Context, c redis.UniversalClient, channel string) (int64, error) {
			var n atomic.Int64
			err := c.(*redis.ClusterClient).ForEachShard(ctx, func(ctx context.Context, node *redis.Client) error {
				m, err := node.PubSubNumSub(ctx, channel).Result()
				n.Add(m[channel])
				return err
			})
			return n.Load(), err
		},
	}
}

// TestLockSuite runs the same behaviours of the lock against a single
// Redis and against the shared Redis Cluster of CI: mutual exclusion
// across clients, expiry and ErrNotHeld, fencing tokens, the watchdog and
// release notifications. The cluster's tests tolerate a failover of any
// shard while they run (package invalidate's tests fail shards over and
// back meanwhile): go-redis follows the MOVED replies, and leases are long
// enough to outlast the pause of a coordinated failover.
func TestLockSuite(t *testing.T) {
	t.Parallel()
	t.Run("Redis", func(t *testing.T) {
		t.Parallel()
		runLockSuite(t, singleEnv)
	})
	t.Run("Cluster", func(t *testing.T) {
		t.Parallel()
		testenv.RedisCluster(t) // skips, or fails under CI, without a cluster
		runLockSuite(t, clusterEnv)
	})
}

func runLockSuite(t *testing.T, env func() lockEnv) {
	for _, tt := range []struct {
		name string
		fn   func(t *testing.T, env lockEnv)
	}{
		{"MutualExclusion", suiteMutualExclusion},
		{"Expiry", suiteExpiry},
		{"FencingTokens", suiteFencingTokens},
		{"FenceCounterEdges", suiteFenceCounterEdges},
		{"Watchdog", suiteWatchdog},
		{"WatchdogLostLock", suiteWatchdogLostLock},
		{"NotifyWakesWaiter", suiteNotifyWakesWaiter},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.fn(t, env())
		})
	}
}

// suiteMutualExclusion has goroutines on several clients increment a
// counter by GET then SET under the lock: an overlap of two critical
// sections loses an increment.
func suiteMutualExclusion(t *testing.T, env lockEnv) {
	const clients, perClient, iterations = 4, 3, 40
	admin := env.client(t)
	prefix := env.prefix(t, admin)
	counter := prefix + "counter"
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()

	var inside, overlaps atomic.Int32
	increment := func(ctx context.Context, rdb redis.UniversalClient) error {
		if inside.Add(1) != 1 {
			overlaps.Add(1)
		}
		defer inside.Add(-1)
		n, err := rdb.Get(ctx, counter).Int()
		if err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
		runtime.Gosched() // widen the window between read and write
		return rdb.Set(ctx, counter, n+1, 0).Err()
	}
	var wg sync.WaitGroup
	for c := range clients {
		rdb := env.client(t)
		g := newGuard(t, rdb, prefix, &Options{MinBackoff: time.Millisecond, MaxBackoff: 16 * time.Millisecond})
		for w := range perClient {
			wg.Go(func() {
				for i := range iterations {
					var err error
					if (c+w+i)%2 == 0 {
						err = g.WithLock(ctx, "counter", func(ctx context.Context, _ *Lock) error {
							return increment(ctx, rdb)
						})
					} else {
						var l *Lock
						if l, err = g.Acquire(ctx, "counter"); err == nil {
							err = errors.Join(increment(ctx, rdb), l.Release(ctx))
						}
					}
					if err != nil {
						t.Errorf("increment under the lock = %v", err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	const want = clients * perClient * iterations
	if got, err := admin.Get(ctx, counter).Int(); err != nil || got != want {
		t.Errorf("counter = %d, %v; want %d", got, err, want)
	}
	if n := overlaps.Load(); n != 0 {
		t.Errorf("%d critical sections overlapped; want 0", n)
	}
}

// suiteExpiry: a holder stalls past its lease, another owner acquires,
// and the stalled holder can neither release nor extend the new lock.
func suiteExpiry(t *testing.T, env lockEnv) {
	rdb := env.client(t)
	prefix := env.prefix(t, rdb)
	opts := &Options{TTL: 300 * time.Millisecond, MinBackoff: time.Millisecond, MaxBackoff: 20 * time.Millisecond}
	a := newGuard(t, rdb, prefix, opts)
	b := newGuard(t, env.client(t), prefix, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()

	la, err := a.Acquire(ctx, "res")
	if err != nil {
		t.Fatalf("Acquire() = %v", err)
	}
	within(t, la.Lost(), 10*time.Second, "a's lease running out")
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
	if err := lb.Extend(ctx, 10*time.Second); err != nil {
		t.Errorf("Extend() by the new holder = %v; want nil: the stalled holder touched its lock", err)
	}
	if la.Token() >= lb.Token() {
		t.Errorf("tokens: stalled %d, new %d; want stalled < new", la.Token(), lb.Token())
	}
}

// suiteFencingTokens: tokens strictly increase across acquisitions, new
// clients and concurrent acquirers, and AdvanceFence moves them on.
func suiteFencingTokens(t *testing.T, env lockEnv) {
	admin := env.client(t)
	prefix := env.prefix(t, admin)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	opts := &Options{MinBackoff: time.Millisecond, MaxBackoff: 16 * time.Millisecond}

	var last int64
	take := func(g *Guard) {
		t.Helper()
		l, err := g.Acquire(ctx, "res")
		if err != nil {
			t.Fatalf("Acquire() = %v", err)
		}
		if l.Token() <= last {
			t.Errorf("token %d after %d; want increasing", l.Token(), last)
		}
		last = l.Token()
		if err := l.Release(ctx); err != nil {
			t.Fatalf("Release() = %v", err)
		}
	}
	for range 2 { // a "restart": a new client and Guard
		g := newGuard(t, env.client(t), prefix, opts)
		for range 5 {
			take(g)
		}
	}
	// Concurrent acquirers on several clients; the atomics are for the
	// race detector, which cannot see the order Redis imposes.
	var prev atomic.Int64
	prev.Store(last)
	var mu sync.Mutex
	var tokens []int64
	var wg sync.WaitGroup
	const clients, perClient, iterations = 4, 2, 15
	for range clients {
		g := newGuard(t, env.client(t), prefix, opts)
		for range perClient {
			wg.Go(func() {
				for range iterations {
					l, err := g.Acquire(ctx, "res")
					if err != nil {
						t.Errorf("Acquire() = %v", err)
						return
					}
					if p := prev.Swap(l.Token()); l.Token() <= p {
						t.Errorf("token %d inside the lock after %d; want increasing", l.Token(), p)
					}
					mu.Lock()
					tokens = append(tokens, l.Token())
					mu.Unlock()
					if err := l.Release(ctx); err != nil {
						t.Errorf("Release() = %v", err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	slices.Sort(tokens)
	if n := len(slices.Compact(tokens)); n != clients*perClient*iterations {
		t.Errorf("%d distinct tokens among %d acquisitions; want no duplicates", n, clients*perClient*iterations)
	}
	g := newGuard(t, admin, prefix, opts)
	top := prev.Load()
	if err := g.AdvanceFence(ctx, "res", top+100); err != nil {
		t.Fatalf("AdvanceFence(%d) = %v", top+100, err)
	}
	last = top + 100
	take(g)
	if last != top+101 {
		t.Errorf("token after AdvanceFence(%d) = %d; want %d", top+100, last, top+101)
	}
}

// suiteWatchdog: renewals keep a lock past its lease, and none follows
// the release.
func suiteWatchdog(t *testing.T, env lockEnv) {
	rdb := env.client(t)
	renewed := renewals(rdb)
	prefix := env.prefix(t, rdb)
	// Renewals every TTL/3. The lease is long enough to outlast the pause
	// of a failover of its shard by package invalidate's tests.
	const ttl = 1500 * time.Millisecond
	g := newGuard(t, rdb, prefix, &Options{TTL: ttl, Watchdog: true})
	other := newGuard(t, env.client(t), prefix, nil)
	ctx := t.Context()

	l, err := g.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	// Four renewals at TTL/3 span more than a TTL.
	waitRenewals(t, renewed, 4)
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
	if n := rdb.Exists(ctx, l.keys.lock).Val(); n != 0 {
		t.Errorf("lock key exists after Release")
	}
}

// suiteWatchdogLostLock: a renewal that finds the lock taken by another
// owner tells the holder at once, through Lost and WithLock's context.
func suiteWatchdogLostLock(t *testing.T, env lockEnv) {
	rdb := env.client(t)
	prefix := env.prefix(t, rdb)
	g := newGuard(t, rdb, prefix, &Options{TTL: 3 * time.Second, Watchdog: true})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	var cause error
	err := g.WithLock(ctx, "res", func(ctx context.Context, l *Lock) error {
		if err := rdb.Set(ctx, l.keys.lock, "someone else", time.Minute).Err(); err != nil {
			return err
		}
		<-ctx.Done()
		cause = context.Cause(ctx)
		return nil
	})
	if !errors.Is(cause, ErrNotHeld) {
		t.Errorf("fn's context cause = %v; want ErrNotHeld", cause)
	}
	if !errors.Is(err, ErrNotHeld) {
		t.Errorf("WithLock() after losing the lock = %v; want ErrNotHeld", err)
	}
	k, _ := g.keys("res")
	if v := rdb.Get(ctx, k.lock).Val(); v != "someone else" {
		t.Errorf("lock value = %q; want the other owner's value untouched", v)
	}
}

// suiteNotifyWakesWaiter: a waiter that would poll once a minute gets the
// lock within seconds of its release, so the release notification reached
// it; afterwards its Guard no longer listens on the lock's channel.
func suiteNotifyWakesWaiter(t *testing.T, env lockEnv) {
	admin := env.client(t)
	prefix := env.prefix(t, admin)
	holder := newGuard(t, admin, prefix, &Options{TTL: time.Minute})
	wc := env.client(t)
	attempts := attemptCounter(wc)
	waiter := newGuard(t, wc, prefix, &slowPoll)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	l, err := holder.TryAcquire(ctx, "res")
	if err != nil {
		t.Fatalf("TryAcquire() = %v", err)
	}
	done := acquireAsync(ctx, waiter, "res")
	// The first attempt fails; the subscription's confirmation triggers a
	// second, which fails too. Then the waiter sleeps for its slow poll.
	eventually(t, "two attempts", func() bool { return attempts.Load() >= 2 })
	if err := l.Release(ctx); err != nil {
		t.Fatalf("Release() = %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Acquire() by the waiter = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("waiter not woken by the release")
	}
	k, _ := waiter.keys("res")
	eventually(t, "UNSUBSCRIBE", func() bool {
		n, err := env.numSub(ctx, admin, k.lock)
		return err == nil && n == 0
	})
}

// TestClusterKeySlots checks on the cluster's own CLUSTER KEYSLOT that the
// keys of a lock, and its notification channel, share one slot, whatever
// braces and escapes its name holds, and that the scripts run on such
// names without CROSSSLOT errors.
func TestClusterKeySlots(t *testing.T) {
	t.Parallel()
	cluster := testenv.RedisCluster(t)
	rdb := cluster.Client(nil)
	prefix := clusterEnv().prefix(t, rdb)
	g := newGuard(t, rdb, prefix, &Options{TTL: 10 * time.Second})
	ctx := t.Context()
	names := []string{
		"a", "orders/42", "}a", "{a}", "{", "}", "{}", "a}b", "a{b", "{a}{b}", "a{}b",
		"%", "%25", "%7B", "%7D", "x y", "ünïcode", "\x00",
	}
	slots := map[int]bool{}
	for _, name := range names {
		k, err := g.keys(name)
		if err != nil {
			t.Fatalf("keys(%q) = %v", name, err)
		}
		slot := cluster.KeySlot(k.lock)
		slots[slot] = true
		for _, key := range []string{k.fence, k.waiters} {
			if s := cluster.KeySlot(key); s != slot {
				t.Errorf("name %q: CLUSTER KEYSLOT %q = %d, but the lock key %q is in slot %d", name, key, s, k.lock, slot)
			}
		}
		// The scripts touch all three keys at once: a CROSSSLOT error
		// would show here.
		l, err := g.TryAcquire(ctx, name)
		if err != nil {
			t.Errorf("TryAcquire(%q) = %v", name, err)
			continue
		}
		if err := l.Extend(ctx, 5*time.Second); err != nil {
			t.Errorf("Extend() of %q = %v", name, err)
		}
		if err := g.AdvanceFence(ctx, name, 10); err != nil {
			t.Errorf("AdvanceFence(%q) = %v", name, err)
		}
		if err := l.Release(ctx); err != nil {
			t.Errorf("Release() of %q = %v", name, err)
		}
	}
	// The name, not the prefix, decides the slot: locks spread over the
	// cluster.
	if len(slots) < len(names)/2 {
		t.Errorf("%d names in %d slots; want them spread, with the name as hash tag", len(names), len(slots))
	}
}

// TestClusterNotifyAcrossShards has one Guard wait for locks whose keys
// live on different masters: the Guard's one subscription, on one node,
// must hear the releases published on every other node (PUBLISH is
// cluster-wide).
func TestClusterNotifyAcrossShards(t *testing.T) {
	t.Parallel()
	cluster := testenv.RedisCluster(t)
	env := clusterEnv()
	admin := env.client(t)
	prefix := env.prefix(t, admin)
	holder := newGuard(t, admin, prefix, &Options{TTL: time.Minute})
	waiter := newGuard(t, env.client(t), prefix, &slowPoll)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	// One lock per shard: a tag of the shard without its braces is a name
	// whose keys hash like the tag.
	const shards = 3
	names := make([]string, shards)
	held := make([]*Lock, shards)
	done := make([]<-chan error, shards)
	for i := range names {
		names[i] = strings.Trim(cluster.ShardTag(i), "{}")
		var err error
		if held[i], err = holder.TryAcquire(ctx, names[i]); err != nil {
			t.Fatalf("TryAcquire(%q) = %v", names[i], err)
		}
	}
	masters := map[string]bool{}
	for _, name := range names {
		k, _ := holder.keys(name)
		m, _ := cluster.Shard(cluster.KeySlot(k.lock))
		masters[m.ID] = true
	}
	if len(masters) < 2 {
		t.Fatalf("the locks' keys are on %d master(s); want several", len(masters))
	}
	for i, name := range names {
		done[i] = acquireAsync(ctx, waiter, name)
	}
	// Every waiter is subscribed (the Guard subscribes before its second
	// attempt) once each channel has a subscriber somewhere.
	for _, name := range names {
		k, _ := waiter.keys(name)
		eventually(t, "a subscription to "+k.lock, func() bool {
			n, err := env.numSub(ctx, admin, k.lock)
			return err == nil && n == 1
		})
	}
	for i, l := range held {
		if err := l.Release(ctx); err != nil {
			t.Fatalf("Release() of %q = %v", names[i], err)
		}
		select {
		case err := <-done[i]:
			if err != nil {
				t.Fatalf("Acquire(%q) by the waiter = %v", names[i], err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("waiter for %q not woken by its release", names[i])
		}
	}
}
