package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
)

// rdTrips is a go-redis hook that records the round trips of a client:
// each command sent alone and each pipeline, with the commands in it. The
// bus's probes and a connection's handshake are left out.
type rdTrips struct {
	mu    sync.Mutex
	trips []string
}

func (h *rdTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *rdTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.add([]redis.Cmder{cmd})
		return next(ctx, cmd)
	}
}

func (h *rdTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.add(cmds)
		return next(ctx, cmds)
	}
}

func (h *rdTrips) add(cmds []redis.Cmder) {
	var names []string
	for _, cmd := range cmds {
		name := redisLabel(cmd.Args())
		switch name {
		case "rd-probe", "rd-hello", "rd-client", "rd-ping":
			return
		}
		names = append(names, name)
	}
	h.mu.Lock()
	h.trips = append(h.trips, strings.Join(names, "+"))
	h.mu.Unlock()
}

func (h *rdTrips) take() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.trips
	h.trips = nil
	return t
}

// redisBus is what a test needs of a Redis bus of package invalidate.
type redisBus interface {
	cache.Bus
	Publisher
	Stats() invalidate.Stats
	Close() error
}

// redisNode is a node of the env on a real Redis: a bus on busClient (the
// env's prefix; pub/sub unless streams), a lock guard on lockClient, a
// Store and a cache.
type redisNode struct {
	s     *Store
	c     *cache.Cache[string, item]
	bus   redisBus
	locks *lockguard.Guard
}

func (e *env) redisNode(t *testing.T, busClient, lockClient redis.UniversalClient) *redisNode {
	t.Helper()
	bus, err := invalidate.NewPubSub(busClient, &invalidate.PubSubOptions{Channel: e.prefix + "invalidations"})
	if err != nil {
		t.Fatal(err)
	}
	return e.redisNodeOn(t, bus, lockClient)
}

func (e *env) streamsNode(t *testing.T, busClient, lockClient redis.UniversalClient) *redisNode {
	t.Helper()
	bus, err := invalidate.NewStreams(busClient, &invalidate.StreamsOptions{Stream: e.prefix + "stream"})
	if err != nil {
		t.Fatal(err)
	}
	return e.redisNodeOn(t, bus, lockClient)
}

func (e *env) redisNodeOn(t *testing.T, bus redisBus, lockClient redis.UniversalClient) *redisNode {
	t.Helper()
	n := &redisNode{bus: bus}
	var err error
	t.Cleanup(func() { n.bus.Close() })
	n.locks, err = lockguard.New(lockClient, &lockguard.Options{Prefix: e.prefix + "lock:", TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.locks.Close() })
	n.s = e.store(&Options{Locks: n.locks, Publisher: n.bus})
	n.c, err = cache.New("items", 1000, e.loader(n.s.pool), &cache.Options[string, item]{
		Bus:     n.bus,
		Version: func(it item) int64 { return it.Version },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.c.Close() }) // before the bus's Close
	waitFor(t, "the bus's first proof", func() bool { return n.bus.Stats().Proofs > 0 })
	return n
}

// writeBoth writes key through Table.Update and then Store.Write on a,
// calling before ahead of each (after b cached the row) and check after
// each, and checks that the lock is free and that b reads the new value
// (the invalidation went out).
func writeBoth(t *testing.T, e *env, a, b *redisNode, key string, before, check func(what string)) {
	t.Helper()
	ctx := context.Background()
	for i, what := range []string{"Table.Update", "Store.Write"} {
		if _, err := b.c.Get(ctx, key); err != nil && !errors.Is(err, cache.ErrNotFound) {
			t.Fatal(err)
		}
		before(what)
		value := fmt.Sprintf("%s-%d", what, i)
		var err error
		if what == "Table.Update" {
			_, err = NewTable(a.s, a.c, nil).Update(ctx, key, e.put(key, value))
		} else {
			err = a.s.Write(ctx, "items", key, func(ctx context.Context, tx pgx.Tx) error {
				_, err := e.put(key, value)(ctx, tx)
				return err
			})
		}
		if err != nil {
			t.Fatalf("%s = %v", what, err)
		}
		check(what)
		l, err := a.locks.TryAcquire(ctx, lockName("items", key))
		if err != nil {
			t.Fatalf("%s: the lock is not free after the write: %v", what, err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, what+"'s value on the other node", func() bool {
			it, err := b.c.Get(ctx, key)
			return err == nil && it.Value == value
		})
	}
}

// TestWriteReleasesWithItsPublication: when the bus (pub/sub or Streams)
// and the lock guard share a client on one Redis server, a lock-guarded
// write makes two round trips to Redis: the acquisition, and the
// publication with the release in one pipeline. (It made three, the
// release alone after the publication.)
// With the guard on a client of its own the release goes alone, as
// before. Either way the lock is free afterwards and the other node sees
// the write.
func TestWriteReleasesWithItsPublication(t *testing.T) {
	e := newEnv(t)
	rdb := testenv.Redis(t)
	trips := &rdTrips{}
	rdb.AddHook(trips)
	b := e.redisNode(t, testenv.Redis(t), testenv.Redis(t))

	t.Run("shared client", func(t *testing.T) {
		a := e.redisNode(t, rdb, rdb)
		writeBoth(t, e, a, b, "k1", func(string) { trips.take() }, func(what string) {
			got := trips.take()
			want := []string{"rd-acquire", "rd-publish+rd-release"}
			if !slices.Equal(got, want) {
				t.Errorf("%s: round trips to Redis = %q; want %q", what, got, want)
			}
		})
	})
	t.Run("streams", func(t *testing.T) {
		a := e.streamsNode(t, rdb, rdb)
		b := e.streamsNode(t, testenv.Redis(t), testenv.Redis(t))
		writeBoth(t, e, a, b, "k3", func(string) { trips.take() }, func(what string) {
			got := trips.take()
			want := []string{"rd-acquire", "rd-xadd+rd-release"}
			if !slices.Equal(got, want) {
				t.Errorf("%s: round trips to Redis = %q; want %q", what, got, want)
			}
		})
	})
	t.Run("own clients", func(t *testing.T) {
		a := e.redisNode(t, testenv.Redis(t), rdb)
		writeBoth(t, e, a, b, "k2", func(string) { trips.take() }, func(what string) {
			got := trips.take()
			want := []string{"rd-acquire", "rd-release"} // the lock's client; the publication goes through the bus's
			if !slices.Equal(got, want) {
				t.Errorf("%s: round trips of the lock's client = %q; want %q", what, got, want)
			}
		})
	})
}

// TestWriteReleasesAfterAScriptFlush: when Redis has lost its scripts
// (a restart, SCRIPT FLUSH), the pipeline's publication and release both
// answer NOSCRIPT; each is sent again, loading its script, and the write
// succeeds, published, with its lock free.
func TestWriteReleasesAfterAScriptFlush(t *testing.T) {
	e := newEnv(t)
	srv := testenv.StartRedisServer(t)
	rdb := srv.Client()
	a := e.redisNode(t, rdb, rdb)
	b := e.redisNode(t, srv.Client(), srv.Client())
	nop := func(string) {}
	writeBoth(t, e, a, b, "k", nop, nop) // the scripts are loaded now
	writeBoth(t, e, a, b, "k", func(string) {
		if err := rdb.ScriptFlush(context.Background()).Err(); err != nil {
			t.Fatal(err)
		}
	}, nop)
	if st := a.s.Stats(); st.PublishFailures != 0 {
		t.Errorf("PublishFailures = %d; want 0", st.PublishFailures)
	}
}

// TestWriteOnRedisCluster: on a Redis Cluster the lock and the channel live
// in different slots, so the bus does not take the release: it goes in a
// round trip of its own, and the write works as before.
func TestWriteOnRedisCluster(t *testing.T) {
	e := newEnv(t)
	rc := testenv.ClusterClient(t)
	testenv.DeleteClusterKeys(t, rc, e.prefix)
	trips := &rdTrips{}
	rc.AddHook(trips)
	a := e.redisNode(t, rc, rc)
	b := e.redisNode(t, testenv.ClusterClient(t), testenv.ClusterClient(t))
	nop := func(string) {}
	writeBoth(t, e, a, b, "k", nop, nop) // loads the scripts where they run
	writeBoth(t, e, a, b, "k", func(string) { trips.take() }, func(what string) {
		got := trips.take()
		want := []string{"rd-acquire", "rd-publish", "rd-release"}
		if !slices.Equal(got, want) {
			t.Errorf("%s: round trips to Redis = %q; want %q", what, got, want)
		}
	})
}
