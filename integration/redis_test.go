package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/testenv"
)

// startRedisServer starts a private redis-server, for the faults that must
// not disturb the shared one, which other packages' tests use at the same
// time: restarts, and CLIENT KILL TYPE pubsub.
func startRedisServer(t testing.TB) *testenv.RedisServer {
	t.Helper()
	return testenv.StartRedisServer(t)
}

// killPubSub runs CLIENT KILL TYPE pubsub: every subscribed connection of
// the server is closed. It returns how many.
func killPubSub(admin *redis.Client) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := admin.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Int()
	if err != nil {
		return 0, fmt.Errorf("CLIENT KILL TYPE pubsub: %w", err)
	}
	return n, nil
}
