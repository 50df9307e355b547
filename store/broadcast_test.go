package store

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
)

// bcastNode is a node of a broadcast test: its own pool, Redis client,
// pub/sub bus on the env's channel, lock guard, store, and an items cache
// with a JSON codec whose loads are counted and may be held.
type bcastNode struct {
	bus   *invalidate.PubSub
	s     *Store
	c     *cache.Cache[string, item]
	table *Table[string, item]
	loads atomic.Int64
	// hold, if set, is called by the loader after it read a row.
	hold atomic.Pointer[func(item)]
}

// newBcastPair returns two nodes of e, a having written "k" as "v1" and
// b having read it (version 1).
func newBcastPair(t *testing.T, e *env) (a, b *bcastNode) {
	t.Helper()
	ctx := context.Background()
	a, b = newBcastNode(t, e), newBcastNode(t, e)
	if _, err := a.table.Update(ctx, "k", e.put("k", "v1")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B to read v1", func() bool { it, err := b.c.Get(ctx, "k"); return err == nil && it.Version == 1 })
	return a, b
}

func newBcastNode(t *testing.T, e *env) *bcastNode {
	t.Helper()
	n := &bcastNode{}
	rdb := testenv.Redis(t)
	var err error
	n.bus, err = invalidate.NewPubSub(rdb, &invalidate.PubSubOptions{Channel: e.prefix + "invalidations"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.bus.Close() })
	locks, err := lockguard.New(rdb, &lockguard.Options{Prefix: e.prefix + "lock:", TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { locks.Close() })
	n.s = e.store(&Options{Locks: locks, Publisher: n.bus})
	load := e.loader(n.s.pool)
	n.c, err = cache.New("items", 1000, func(ctx context.Context, id string) (item, error) {
		n.loads.Add(1)
		it, err := load(ctx, id)
		if h := n.hold.Load(); h != nil && err == nil {
			(*h)(it)
		}
		return it, err
	}, &cache.Options[string, item]{
		Bus:     n.bus,
		Version: func(it item) int64 { return it.Version },
		Codec:   cache.JSONCodec[item]{},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.c.Close() })
	n.table = NewTable(n.s, n.c, nil)
	waitFor(t, "the bus's first proof", n.c.Proven)
	return n
}

// TestBroadcastServesWithoutLoads writes a key on node A that node B has
// cached, through Update and UpdateOptimistic: B serves each new value,
// and the deletion, from the broadcast, with no load.
func TestBroadcastServesWithoutLoads(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	a, b := newBcastPair(t, e)
	loads := b.loads.Load()
	const writes = 20
	for i := 2; i <= writes; i++ {
		update := a.table.Update
		if i%2 == 0 {
			update = a.table.UpdateOptimistic
		}
		ch, err := update(ctx, "k", e.put("k", "v"))
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "B to serve the new value", func() bool {
			it, err := b.c.Get(ctx, "k")
			return err == nil && it.Version == ch.Version
		})
	}
	if _, err := a.table.Update(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		var v int64
		err := tx.QueryRow(ctx, `DELETE FROM `+e.table+` WHERE id = 'k' RETURNING version + 1`).Scan(&v)
		return cache.Change[item]{Deleted: true, Version: v}, err
	}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B to serve the deletion", func() bool { _, err := b.c.Get(ctx, "k"); return errors.Is(err, cache.ErrNotFound) })
	if n := b.loads.Load() - loads; n != 0 {
		t.Errorf("B loaded %d times for %d broadcast writes; want 0", n, writes)
	}
	if st := b.c.Stats(); st.ValuesInstalled != writes {
		t.Errorf("B's ValuesInstalled = %d; want %d", st.ValuesInstalled, writes)
	}
	if st := a.c.Stats(); st.ValuesSent != writes+1 {
		t.Errorf("A's ValuesSent = %d; want %d", st.ValuesSent, writes+1)
	}
}

// TestBroadcastOutOfOrder delivers, after v3's broadcast, a late broadcast
// of v2 (as a publisher slower than the writer of v3 would): B keeps v3.
func TestBroadcastOutOfOrder(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	a, b := newBcastNode(t, e), newBcastNode(t, e)
	late := newBcastNode(t, e) // publishes the late message: a third origin
	var v2 item
	for i := range 3 {
		ch, err := a.table.Update(ctx, "k", e.put("k", "v"))
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			waitFor(t, "B to read v1", func() bool { it, err := b.c.Get(ctx, "k"); return err == nil && it.Version == 1 })
		}
		if ch.Version == 2 {
			v2 = ch.Value
		}
	}
	waitFor(t, "B to serve v3", func() bool { it, err := b.c.Get(ctx, "k"); return err == nil && it.Version == 3 })
	before := b.c.Stats()
	val, _ := json.Marshal(v2)
	if err := late.bus.Publish(ctx, "items", []cache.Invalidation{{Key: "k", Version: 2, Value: val}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the late value to reach B", func() bool {
		st := b.c.Stats()
		return st.ValuesInstalled+st.ValuesRejected > before.ValuesInstalled+before.ValuesRejected
	})
	if it, err := b.c.Get(ctx, "k"); err != nil || it.Version != 3 {
		t.Errorf("B's Get(k) after a late v2 = %+v, %v; want v3", it, err)
	}
	if st := b.c.Stats(); st.ValuesInstalled != before.ValuesInstalled {
		t.Errorf("B installed the late value")
	}
}

// TestBroadcastRacingALoad holds B's load of k after it read v1, lets A
// write v2, whose broadcast reaches B while the load is in flight, and
// then lets the load finish: B must not keep v1. (B was flushed when it
// subscribed and has no entry of k, so it cannot tell v2 is the newest and
// drops k rather than install it: a plain invalidation, which the load's
// guard token sees.)
func TestBroadcastRacingALoad(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	a, b := newBcastNode(t, e), newBcastNode(t, e)
	if _, err := a.table.Update(ctx, "k", e.put("k", "v1")); err != nil {
		t.Fatal(err)
	}
	read, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	hold := func(it item) {
		if it.Version == 1 {
			close(read)
			<-release
		}
	}
	b.hold.Store(&hold)
	got := make(chan item, 1)
	go func() {
		it, err := b.c.Get(ctx, "k")
		if err != nil {
			t.Error(err)
		}
		got <- it
	}()
	<-read
	b.hold.Store(nil)
	before := b.c.Stats()
	if _, err := a.table.Update(ctx, "k", e.put("k", "v2")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the broadcast of v2 to reach B", func() bool {
		st := b.c.Stats()
		return st.ValuesInstalled+st.ValuesRejected > before.ValuesInstalled+before.ValuesRejected
	})
	once.Do(func() { close(release) })
	if it := <-got; it.Version != 1 {
		t.Errorf("the held load returned %+v; want v1, what it read", it)
	}
	if it, err := b.c.Get(ctx, "k"); err != nil || it.Version != 2 {
		t.Errorf("B's Get(k) after the load = %+v, %v; want v2: the load stored the row the write replaced", it, err)
	}
}

// TestBroadcastOnlyAfterCommit checks that a write that rolls back
// publishes nothing: the value is published after the commit, by
// cache.Update, only when the transaction committed.
func TestBroadcastOnlyAfterCommit(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	a, b := newBcastPair(t, e)
	errAbort := errors.New("abort")
	_, err := a.table.Update(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		ch, err := e.put("k", "rolled back")(ctx, tx)
		if err != nil {
			return ch, err
		}
		return ch, errAbort
	})
	if !errors.Is(err, errAbort) {
		t.Fatalf("Update = %v; want errAbort", err)
	}
	// A later committed write, published after anything the failed one
	// could have published on the same bus, in order.
	if _, err := a.table.Update(ctx, "other", e.put("other", "x")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "B to hear of the later write", func() bool { return b.c.Stats().InvalidationsReceived >= 1 })
	if it, err := b.c.Get(ctx, "k"); err != nil || it.Version != 1 || it.Value != "v1" {
		t.Errorf("B's Get(k) = %+v, %v; want v1: a rolled back value was broadcast", it, err)
	}
	if st := a.c.Stats(); st.ValuesSent != 2 {
		t.Errorf("A's ValuesSent = %d; want 2 (the two committed writes)", st.ValuesSent)
	}
}
