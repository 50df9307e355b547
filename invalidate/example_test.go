package invalidate_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
)

func loadUser(ctx context.Context, id int64) (string, error) {
	return fmt.Sprintf("user %d", id), nil // read Postgres here
}

// A PubSub per process, shared by every cache of the process. This example
// needs a Redis server, so it is compiled but not run.
func ExampleNewPubSub() {
	rdb := redis.NewClient(&redis.Options{Addr: "localhost:6379"})
	defer rdb.Close()
	bus, err := invalidate.NewPubSub(rdb, &invalidate.PubSubOptions{
		Channel: "myservice:invalidations",
		Options: invalidate.Options{Logger: slog.Default()},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer bus.Close() // after the caches: defers run last-in first-out

	users, err := cache.New("users", 10_000, loadUser, &cache.Options[int64, string]{Bus: bus})
	if err != nil {
		log.Fatal(err)
	}
	defer users.Close()

	ctx := context.Background()
	// After a write of user 42 at version 7 has committed:
	if err := users.Set(ctx, 42, "Ada", 7); err != nil {
		log.Printf("publish failed; the outbox will repeat it: %v", err)
	}
	st := bus.Stats()
	log.Printf("sent %d messages, %d flushes after resubscribing", st.MessagesSent, st.FlushesResubscribe)
}

// A Streams bus: nodes that lose their connection resume from their
// position instead of flushing. This example needs a Redis server, so it is
// compiled but not run.
func ExampleNewStreams() {
	rdb := redis.NewClient(&redis.Options{Addr: "localhost:6379"})
	defer rdb.Close()
	bus, err := invalidate.NewStreams(rdb, &invalidate.StreamsOptions{
		Stream: "myservice:invalidations",
		MaxLen: 1_000_000,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer bus.Close()

	// The bus learns the staleness bound from the caches that subscribe.
	users, err := cache.New("users", 10_000, loadUser, &cache.Options[int64, string]{
		Bus: bus, MaxStaleness: 2 * time.Second,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer users.Close()
}

// Two caches of one namespace in one process: a write through one reaches
// the other before Set returns.
func ExampleInProcess() {
	bus := invalidate.NewInProcess()
	version := int64(1)
	load := func(ctx context.Context, id int64) (int64, error) { return version, nil }
	opts := &cache.Options[int64, int64]{Bus: bus, Version: func(v int64) int64 { return v }}
	a, _ := cache.New("users", 100, load, opts)
	defer a.Close()
	b, _ := cache.New("users", 100, load, opts)
	defer b.Close()

	ctx := context.Background()
	v, _ := b.Get(ctx, 42)
	fmt.Println("b reads version", v)

	version = 2 // a write commits
	_ = a.Set(ctx, 42, version, version)
	v, _ = b.Get(ctx, 42)
	fmt.Println("b reads version", v)
	// Output:
	// b reads version 1
	// b reads version 2
}
