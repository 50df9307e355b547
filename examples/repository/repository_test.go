package repository

import (
	"context"
	"errors"
	"testing"

	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
	"github.com/coherentcache/coherent/store"
)

// Two instances of a service share a database; each decorates the
// repository with its own cache.
func TestCachedRepository(t *testing.T) {
	ctx := context.Background()
	admin := testenv.Pool(t, testenv.PoolConfig(t, "coh_test_repository", ""))
	schema := testenv.Schema(t, admin)
	pool := testenv.Pool(t, testenv.PoolConfig(t, "coh_test_repository", schema))
	if err := store.Migrate(ctx, pool, schema); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, version bigint NOT NULL);
		INSERT INTO users VALUES (1, 'Ada', 'ada@example.com', 1)`); err != nil {
		t.Fatal(err)
	}
	rdb := testenv.Redis(t)
	prefix := testenv.Name("coh_test_") + ":"
	testenv.DeleteKeys(t, rdb, prefix)
	locks, err := lockguard.New(rdb, &lockguard.Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer locks.Close()
	s, err := store.New(pool, &store.Options{Schema: schema, Locks: locks})
	if err != nil {
		t.Fatal(err)
	}
	bus := invalidate.NewInProcess()
	a, err := NewCached(pool, s, bus)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := NewCached(pool, s, bus)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	plain := Postgres{Pool: pool}

	for name, r := range map[string]UserRepository{"a": a, "b": b, "plain": plain} {
		if u, err := r.Get(ctx, 1); err != nil || u.Name != "Ada" {
			t.Fatalf("%s.Get(1) = %v, %v; want Ada", name, u, err)
		}
	}
	if u, err := a.Rename(ctx, 1, "Ada Lovelace"); err != nil || u.Version != 2 {
		t.Fatalf("Rename = %v, %v; want version 2", u, err)
	}
	for name, r := range map[string]UserRepository{"a": a, "b": b, "plain": plain} {
		if u, err := r.Get(ctx, 1); err != nil || u.Name != "Ada Lovelace" {
			t.Errorf("%s.Get(1) after Rename = %v, %v; want Ada Lovelace", name, u, err)
		}
	}
	if _, err := b.Rename(ctx, 99, "nobody"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Rename(99) = %v; want ErrNotFound", err)
	}
	if err := b.Delete(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]UserRepository{"a": a, "b": b, "plain": plain} {
		if _, err := r.Get(ctx, 1); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s.Get(1) after Delete = %v; want ErrNotFound", name, err)
		}
	}
	if st := a.Users.Cache().Stats(); st.Hits == 0 {
		t.Errorf("cache a never hit: %+v", st)
	}
}
