package lockguard_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/coherentcache/coherent/lockguard"
	"github.com/redis/go-redis/v9"
)

// These examples need a Redis server, so they are compiled but not run.

func ExampleGuard_WithLock() {
	rdb := redis.NewClient(&redis.Options{Addr: "localhost:6379"})
	defer rdb.Close()
	g, err := lockguard.New(rdb, &lockguard.Options{TTL: 5 * time.Second, Watchdog: true})
	if err != nil {
		log.Fatal(err)
	}

	// ctx bounds the wait for the lock. fn's context is cancelled if the
	// lock is lost; the lock is released when fn returns.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err = g.WithLock(ctx, "report:daily", func(ctx context.Context, l *lockguard.Lock) error {
		return buildReport(ctx, l.Token())
	})
	switch {
	case errors.Is(err, lockguard.ErrNotAcquired):
		fmt.Println("another node is building the report")
	case errors.Is(err, lockguard.ErrNotHeld):
		fmt.Println("lost the lock while building the report:", err)
	case err != nil:
		log.Fatal(err)
	}
}

func buildReport(ctx context.Context, token int64) error { return nil }

// ExampleLock_Token passes the fencing token to the write it protects. The
// row records the greatest token that has written it, and the UPDATE only
// applies with a greater one: a holder whose lease ran out during a pause,
// and whose lock another node has taken since, cannot overwrite that
// node's work, even if the lock service failed to keep them apart.
func ExampleLock_Token() {
	var db *sql.DB // opened elsewhere
	rdb := redis.NewClient(&redis.Options{Addr: "localhost:6379"})
	defer rdb.Close()
	g, err := lockguard.New(rdb, nil)
	if err != nil {
		log.Fatal(err)
	}

	ctx := context.Background()
	l, err := g.Acquire(ctx, "account:42")
	if err != nil {
		log.Fatal(err)
	}
	defer func() {
		// Release on a context the caller's cancellation cannot end, so
		// the lock is freed now rather than when its lease runs out.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		if err := l.Release(rctx); err != nil && !errors.Is(err, lockguard.ErrNotHeld) {
			log.Print(err)
		}
	}()

	balance := 100 // computed from a read made under the lock
	res, err := db.ExecContext(ctx,
		`UPDATE accounts SET balance = $1, fence = $2
		  WHERE id = $3 AND fence < $2`,
		balance, l.Token(), 42)
	if err != nil {
		log.Fatal(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		// A greater (or equal) token has written the row: this holder's
		// lock expired and another node has held it since.
		fmt.Println("stale fencing token", l.Token())
	}
}
