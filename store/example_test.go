package store_test

import (
	"context"
	"fmt"
	"log"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
	"github.com/coherentcache/coherent/store"
)

// Item is a row of the table items (id text primary key, value text not
// null, version bigint not null).
type Item struct {
	ID      string `db:"id"`
	Value   string `db:"value"`
	Version int64  `db:"version"`
}

// A node wires a cache of the items table to the write path: loads read
// the table, writes go through the lock guard and the outbox, and writes
// from other clients are captured.
func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://postgres@127.0.0.1:5432/postgres")
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:6379"})
	defer rdb.Close()

	if err := store.Migrate(ctx, pool, ""); err != nil {
		log.Fatal(err)
	}
	locks, err := lockguard.New(rdb, nil)
	if err != nil {
		log.Fatal(err)
	}
	bus := invalidate.NewInProcess() // across processes: a Redis transport of package invalidate
	s, err := store.New(pool, &store.Options{Locks: locks, Publisher: bus})
	if err != nil {
		log.Fatal(err)
	}
	go s.RunRelay(ctx)

	itemsCache, err := cache.New("items", 100_000,
		store.Loader[string](pool, `SELECT id, value, version FROM items WHERE id = $1`, pgx.RowToStructByName[Item]),
		&cache.Options[string, Item]{Bus: bus, Version: func(it Item) int64 { return it.Version }})
	if err != nil {
		log.Fatal(err)
	}
	defer itemsCache.Close()
	items := store.NewTable(s, itemsCache, &store.TableOptions{Table: "items", KeyColumn: "id", VersionColumn: "version"})
	if err := items.Capture(ctx); err != nil { // writes from other clients invalidate too
		log.Fatal(err)
	}

	ch, err := items.Update(ctx, "a", func(ctx context.Context, tx pgx.Tx) (cache.Change[Item], error) {
		rows, _ := tx.Query(ctx, `
			INSERT INTO items AS t (id, value, version) VALUES ($1, $2, 1)
			ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, version = t.version + 1
			RETURNING id, value, version`, "a", "hello")
		it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Item])
		return cache.Change[Item]{Value: it, Version: it.Version}, err
	})
	fmt.Println(ch.Value, err)

	it, err := items.Get(ctx, "a") // served from memory: the write installed it
	fmt.Println(it, err)
}
