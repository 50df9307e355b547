package cache_test

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
)

// User is a row of the users table.
type User struct {
	ID      int64
	Name    string
	Version int64
}

// usersTable stands in for Postgres in these examples.
type usersTable struct {
	mu   sync.Mutex
	rows map[int64]User
}

func (t *usersTable) load(ctx context.Context, id int64) (User, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	u, ok := t.rows[id]
	if !ok {
		return User{}, fmt.Errorf("user %d: %w", id, cache.ErrNotFound)
	}
	return u, nil
}

func (t *usersTable) rename(id int64, name string) User {
	t.mu.Lock()
	defer t.mu.Unlock()
	u := t.rows[id]
	u.Name, u.Version = name, u.Version+1
	t.rows[id] = u
	return u
}

// Two nodes of a service cache the same table. A write on one node is
// visible on the other as soon as the write returns: the bus carries the
// invalidation.
func Example() {
	ctx := context.Background()
	db := &usersTable{rows: map[int64]User{42: {ID: 42, Name: "Ada", Version: 1}}}
	bus := invalidate.NewInProcess() // in production: a Redis transport

	opts := &cache.Options[int64, User]{Bus: bus, Version: func(u User) int64 { return u.Version }}
	nodeA, _ := cache.New("users", 10_000, db.load, opts)
	defer nodeA.Close()
	nodeB, _ := cache.New("users", 10_000, db.load, opts)
	defer nodeB.Close()

	u, _ := nodeB.Get(ctx, 42) // loads and caches on B
	fmt.Println("B reads:", u.Name)

	// Node A writes through its cache: the write commits, A installs the
	// new value, and B drops its copy.
	nodeA.Update(ctx, 42, func(ctx context.Context) (cache.Change[User], error) {
		u := db.rename(42, "Ada Lovelace")
		return cache.Change[User]{Value: u, Version: u.Version}, nil
	})

	u, _ = nodeB.Get(ctx, 42)
	fmt.Println("B reads:", u.Name)
	// Output:
	// B reads: Ada
	// B reads: Ada Lovelace
}

func ExampleNew() {
	load := func(ctx context.Context, id int64) (User, error) {
		// SELECT ... WHERE id = $1; map no rows to cache.ErrNotFound.
		return User{ID: id, Name: "someone"}, nil
	}
	users, err := cache.New("users", 10_000, load, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer users.Close()

	_, err = cache.New("users", 0, load, nil)
	fmt.Println(errors.Is(err, cache.ErrInvalidOptions), err)
	// Output:
	// true cache: invalid options: capacity must be positive, got 0
}

// Get loads a missing key once and then serves it from memory; an absence
// is cached too.
func ExampleCache_Get() {
	ctx := context.Background()
	db := &usersTable{rows: map[int64]User{1: {ID: 1, Name: "Grace"}}}
	users, _ := cache.New("users", 100, db.load, nil)
	defer users.Close()

	u, err := users.Get(ctx, 1)
	fmt.Println(u.Name, err)
	_, err = users.Get(ctx, 2)
	fmt.Println(errors.Is(err, cache.ErrNotFound))
	users.Get(ctx, 1)
	users.Get(ctx, 2)
	st := users.Stats()
	fmt.Println("loads:", st.Loads, "hits:", st.Hits)
	// Output:
	// Grace <nil>
	// true
	// loads: 2 hits: 2
}

// Update wraps the write of a repository: the writer's own node installs the
// committed value, every other node drops its copy.
func ExampleCache_Update() {
	ctx := context.Background()
	db := &usersTable{rows: map[int64]User{7: {ID: 7, Name: "Edsger", Version: 1}}}
	users, _ := cache.New("users", 100, db.load, nil)
	defer users.Close()

	err := users.Update(ctx, 7, func(ctx context.Context) (cache.Change[User], error) {
		u := db.rename(7, "Edsger W. Dijkstra") // UPDATE ... RETURNING *
		return cache.Change[User]{Value: u, Version: u.Version}, nil
	})
	u, _ := users.Get(ctx, 7)
	fmt.Println(u.Name, u.Version, err, "loads:", users.Stats().Loads)
	// Output:
	// Edsger W. Dijkstra 2 <nil> loads: 0
}

// GetMany loads what is missing in one batch when LoadMany is set.
func ExampleCache_GetMany() {
	ctx := context.Background()
	db := &usersTable{rows: map[int64]User{1: {ID: 1, Name: "Barbara"}, 2: {ID: 2, Name: "Tony"}}}
	users, _ := cache.New("users", 100, db.load, &cache.Options[int64, User]{
		LoadMany: func(ctx context.Context, ids []int64) (map[int64]User, error) {
			// SELECT ... WHERE id = ANY($1)
			found := make(map[int64]User)
			for _, id := range ids {
				if u, err := db.load(ctx, id); err == nil {
					found[id] = u
				}
			}
			return found, nil
		},
	})
	defer users.Close()

	got, _ := users.GetMany(ctx, []int64{1, 2, 3})
	fmt.Println(len(got), got[1].Name, got[2].Name, "loads:", users.Stats().Loads)
	// Output:
	// 2 Barbara Tony loads: 1
}
