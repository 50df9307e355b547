package store_test

import (
	"context"
	"log"
	"log/slog"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/store"
)

// An auditor measures how consistent a node's cache is with Postgres, and
// heals the stale entries it finds. Its reads go to the primary's pool,
// never to a replica and never through the cache.
func ExampleNewAuditor() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://postgres@127.0.0.1:5432/postgres")
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	load := store.Loader[string](pool, `SELECT id, value, version FROM items WHERE id = $1`, pgx.RowToStructByName[Item])
	version := func(it Item) int64 { return it.Version }
	itemsCache, err := cache.New("items", 100_000, load, &cache.Options[string, Item]{Version: version})
	if err != nil {
		log.Fatal(err)
	}
	defer itemsCache.Close()

	audit, err := store.NewAuditor(itemsCache, load, &store.AuditOptions[Item]{
		Rate:    10, // source reads per second
		Version: version,
		Logger:  slog.Default(), // each inconsistency, with its key, versions and age
	})
	if err != nil {
		log.Fatal(err)
	}
	go audit.Run(ctx)

	// Later, for a dashboard or an alert:
	st := audit.Stats()
	log.Printf("checked %d, inconsistent %d: %.4f consistent (%.1f nines)",
		st.Checked, st.Inconsistencies, st.Consistency(), st.Nines())
}
