package store

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
)

// TestReplicaLoaderRoutes checks the replica loader's choices against one
// server standing for both (a server not in recovery is always current):
// a known position is served by the "replica"; an unknown one (in a new
// cache, after a flush) by the primary, which reports its position so that the next load
// may use the replica again; a replica that fails is read around. The
// race it guards (a replica behind the change) is TestReplicaLag's.
func TestReplicaLoaderRoutes(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'v', 1)`)
	query := `SELECT id, value, version FROM ` + e.table + ` WHERE id = $1`
	newCache := func(t *testing.T, r *Replica) (*cache.Cache[string, item], *fakeProofBus) {
		bus := &fakeProofBus{}
		c, err := cache.New("items", 10, ReplicaLoader[string](r, query, pgx.RowToStructByName[item]),
			&cache.Options[string, item]{Bus: bus})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, bus
	}

	r, err := NewReplica(e.pool, e.pool, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, bus := newCache(t, r)
	get := func(c *cache.Cache[string, item]) {
		t.Helper()
		if it, err := c.Get(ctx, "k"); err != nil || it.Value != "v" {
			t.Fatalf("Get = %+v, %v; want v", it, err)
		}
	}
	get(c)
	if st := r.Stats(); st.ReplicaReads != 0 || st.PrimaryReads != 1 {
		t.Errorf("a new cache's first load: %+v; want it read from the primary", st)
	}
	bus.h.Invalidate([]cache.Invalidation{{Key: "k"}})
	get(c)
	if st := r.Stats(); st.ReplicaReads != 1 || st.PrimaryReads != 1 {
		t.Errorf("a load at a known position: %+v; want one replica read", st)
	}
	bus.h.Flush() // positions unknown
	get(c)
	if st := r.Stats(); st.PrimaryReads != 2 {
		t.Errorf("the load after a flush: %+v; want it read from the primary", st)
	}
	bus.h.Invalidate([]cache.Invalidation{{Key: "k"}})
	get(c)
	if st := r.Stats(); st.ReplicaReads != 2 || st.PrimaryReads != 2 {
		t.Errorf("the load after the primary reported its position: %+v; want the replica again", st)
	}
	if _, err := c.Get(ctx, "missing"); !errors.Is(err, cache.ErrNotFound) {
		t.Errorf("Get of a missing row = %v; want cache.ErrNotFound", err)
	}

	down := testenv.Pool(t, poolConfig(t, "coh_test_replica_down"))
	down.Close() // a replica that fails every read
	rd, err := NewReplica(e.pool, down, nil)
	if err != nil {
		t.Fatal(err)
	}
	cd, busd := newCache(t, rd)
	get(cd) // the primary: a new cache
	busd.h.Invalidate([]cache.Invalidation{{Key: "k"}})
	get(cd)
	if st := rd.Stats(); st.ReplicaErrors != 1 || st.PrimaryReads != 2 {
		t.Errorf("with the replica down: %+v; want one replica error and both loads read from the primary", st)
	}
}

// fakeProofBus is a bus whose link is always proven and that carries
// nothing: the test drives its handler.
type fakeProofBus struct{ h cache.Handler }

func (b *fakeProofBus) Subscribe(_ string, h cache.Handler, _ time.Duration) (cache.Subscription, error) {
	b.h = h
	return b, nil
}
func (b *fakeProofBus) Publish(context.Context, []cache.Invalidation) error { return nil }
func (b *fakeProofBus) ProofAge() (time.Duration, bool)                     { return 0, true }
func (b *fakeProofBus) Close() error                                        { return nil }
