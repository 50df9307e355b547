package cache_test

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
)

// With a Codec, a write sends the committed value to the other nodes,
// which install it rather than load it again: a key that every node reads
// costs no load per write on the others.
func ExampleOptions_codec() {
	ctx := context.Background()
	db := &usersTable{rows: map[int64]User{42: {ID: 42, Name: "Ada", Version: 1}}}
	var loads atomic.Int64
	load := func(ctx context.Context, id int64) (User, error) {
		loads.Add(1)
		return db.load(ctx, id)
	}
	bus := invalidate.NewInProcess() // in production: a Redis transport

	opts := &cache.Options[int64, User]{
		Bus:     bus,
		Version: func(u User) int64 { return u.Version }, // receivers order values by it
		Codec:   cache.JSONCodec[User]{},                 // turns value broadcast on
	}
	nodeA, _ := cache.New("users", 10_000, load, opts)
	defer nodeA.Close()
	nodeB, _ := cache.New("users", 10_000, load, opts)
	defer nodeB.Close()

	nodeB.Get(ctx, 42) // the first read loads
	nodeA.Update(ctx, 42, func(ctx context.Context) (cache.Change[User], error) {
		u := db.rename(42, "Grace") // commits, and returns the row
		return cache.Change[User]{Value: u, Version: u.Version}, nil
	})
	u, _ := nodeB.Get(ctx, 42)
	fmt.Println("B reads:", u.Name)
	fmt.Println("loads:", loads.Load(), "installed on B:", nodeB.Stats().ValuesInstalled)
	// Output:
	// B reads: Grace
	// loads: 1 installed on B: 1
}
