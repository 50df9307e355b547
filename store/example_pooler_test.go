package store_test

import (
	"context"
	"log"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/store"
)

// Behind pgbouncer in transaction mode, the pool's statements must not
// depend on prepared statements (exec mode, in the URL), and the relay
// LISTENs on a connection of its own, straight to the primary.
func ExampleOptions_pooler() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://app@pgbouncer:6432/app?default_query_exec_mode=exec")
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	listen, err := pgx.ParseConfig("postgres://app@primary:5432/app")
	if err != nil {
		log.Fatal(err)
	}
	if err := store.Migrate(ctx, pool, ""); err != nil {
		log.Fatal(err)
	}
	bus := invalidate.NewInProcess() // across processes: a Redis transport of package invalidate
	s, err := store.New(pool, &store.Options{Publisher: bus, ListenConfig: listen})
	if err != nil {
		log.Fatal(err)
	}
	go s.RunRelay(ctx)
	// s.Stats().RelayListening turns true once notifications reach the relay.
}
