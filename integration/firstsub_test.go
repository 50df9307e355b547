package integration

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/store"
)

// TestWriteBeforeFirstSubscription guards issue 11 item 6 (DESIGN race 19)
// with the library's real parts: node A starts while Redis is unreachable
// and writes k = v1 (optimistically: the write needs no lock), which its
// cache installs; the publication fails. Node B writes k = v2, which A,
// not subscribed, never hears. Then A's bus subscribes and proves its
// link. Before the fix both transports took the first subscription for a
// clean start, and A served v1 until TTL; the first subscription is a gap
// like any other.
func TestWriteBeforeFirstSubscription(t *testing.T) {
	type bus interface {
		cache.Bus
		store.Publisher
		Close() error
	}
	for _, tc := range []struct {
		name string
		bus  func(t *testing.T, rdb *redis.Client, name string) bus
	}{
		{"PubSub", func(t *testing.T, rdb *redis.Client, name string) bus {
			b, err := invalidate.NewPubSub(rdb, &invalidate.PubSubOptions{Channel: name})
			if err != nil {
				t.Fatal(err)
			}
			return b
		}},
		{"Streams", func(t *testing.T, rdb *redis.Client, name string) bus {
			b, err := invalidate.NewStreams(rdb, &invalidate.StreamsOptions{Stream: name})
			if err != nil {
				t.Fatal(err)
			}
			return b
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			db := testenv.Pool(t, testenv.PoolConfig(t, "coherent-integration", ""))
			schema := testenv.Schema(t, db)
			if err := store.Migrate(ctx, db, schema); err != nil {
				t.Fatal(err)
			}
			table := pgx.Identifier{schema, "items"}.Sanitize()
			if _, err := db.Exec(ctx, `CREATE TABLE `+table+` (id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`); err != nil {
				t.Fatal(err)
			}
			channel := testenv.Name("coherent-it:")
			direct := testenv.Redis(t)
			defer testenv.DeleteKeys(t, direct, channel)
			p, err := faultproxy.New(redisAddr(t))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			p.Refuse(true) // A starts while Redis is unreachable
			viaProxy := redis.NewClient(&redis.Options{Addr: p.Addr(), MaxRetries: -1})
			defer viaProxy.Close()

			type node struct {
				bus   bus
				store *store.Store
				items *cache.Cache[string, item]
			}
			newNode := func(rdb *redis.Client) node {
				b := tc.bus(t, rdb, channel)
				t.Cleanup(func() { b.Close() })
				s, err := store.New(db, &store.Options{Schema: schema, Publisher: b})
				if err != nil {
					t.Fatal(err)
				}
				load := store.Loader[string](db, `SELECT id, value, version FROM `+table+` WHERE id = $1`, pgx.RowToStructByName[item])
				c, err := cache.New("items", 100, load, &cache.Options[string, item]{Bus: b, Version: func(it item) int64 { return it.Version }})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				return node{b, s, c}
			}
			put := func(n node, value string) {
				t.Helper()
				_, err := store.NewTable(n.store, n.items, nil).UpdateOptimistic(ctx, "k", func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
					rows, _ := tx.Query(ctx, `
						INSERT INTO `+table+` AS t (id, value, version) VALUES ('k', $1, 1)
						ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, version = t.version + 1
						RETURNING id, value, version`, value)
					it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[item])
					return cache.Change[item]{Value: it, Version: it.Version}, err
				})
				if err != nil {
					t.Fatalf("put %s: %v", value, err)
				}
			}
			awaitProven := func(n node) {
				t.Helper()
				deadline := time.Now().Add(15 * time.Second)
				for !n.items.Proven() {
					if time.Now().After(deadline) {
						t.Fatal("the bus link was not proven within 15 s")
					}
					time.Sleep(10 * time.Millisecond)
				}
			}

			a := newNode(viaProxy)
			b := newNode(direct)
			awaitProven(b)
			put(a, "v1") // installed on A; its publication fails
			put(b, "v2") // A is not subscribed: it never hears of it
			if it, err := b.items.Get(ctx, "k"); err != nil || it.Value != "v2" {
				t.Fatalf("B reads %+v, %v; want v2", it, err)
			}
			p.Refuse(false)
			awaitProven(a)
			it, err := a.items.Get(ctx, "k")
			if err != nil || it.Value != "v2" {
				t.Errorf("A, proven after its first subscription, reads %+v, %v; want v2 (B's write, which A's bus never carried)", it, err)
			}
		})
	}
}
