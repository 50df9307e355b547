package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
)

// newPool returns a pool whose connections carry application name app, so
// that a test can find and terminate them. It connects to the test's
// Postgres: DATABASE_URL, or what [useURL] chose.
func newPool(t testing.TB, app string) *pgxpool.Pool {
	t.Helper()
	return testenv.Pool(t, poolConfig(t, app))
}

// poolConfig is the configuration of newPool.
func poolConfig(t testing.TB, app string) *pgxpool.Config {
	t.Helper()
	return testenv.PoolConfigFor(t, testURL(t), app, "")
}

// testURLs maps test names, each followed by "/", to the Postgres URL
// their pools use instead of DATABASE_URL: a test and its subtests.
var testURLs sync.Map

// useURL makes t and its subtests connect to the Postgres of the URL u
// (a primary with a replica, or a pooler) wherever they would connect to
// DATABASE_URL: newEnv, newPool and the env's stores.
func useURL(t testing.TB, u string) { setFor(t, &testURLs, u) }

// testURL returns the Postgres URL of t: the one [useURL] set for t or a
// test it is a subtest of, else DATABASE_URL.
func testURL(t testing.TB) string {
	return urlFor(t, &testURLs, testenv.DatabaseURL())
}

// listenURLs maps test names, each followed by "/", to the Postgres URL
// of the ListenConfig their env's stores get: a test and its subtests.
var listenURLs sync.Map

// useListenURL gives the stores [env.store] makes for t and its subtests
// an Options.ListenConfig for the Postgres URL u, unless the test sets
// one itself.
func useListenURL(t testing.TB, u string) { setFor(t, &listenURLs, u) }

// setFor makes m hold u for t and its subtests until t ends (see urlFor).
func setFor(t testing.TB, m *sync.Map, u string) {
	key := t.Name() + "/"
	m.Store(key, u)
	t.Cleanup(func() { m.Delete(key) })
}

// urlFor returns the URL m holds for t or the nearest test it is a
// subtest of, else def.
func urlFor(t testing.TB, m *sync.Map, def string) string {
	u, longest := def, 0
	m.Range(func(k, v any) bool {
		if p := k.(string); len(p) > longest && strings.HasPrefix(t.Name()+"/", p) {
			u, longest = v.(string), len(p)
		}
		return true
	})
	return u
}

// item is a row of the test table.
type item struct {
	ID      string `db:"id"`
	Value   string `db:"value"`
	Version int64  `db:"version"`
}

// env is one test's private world: a schema holding the library's tables
// and the items table, a lock prefix, and an in-process bus.
type env struct {
	t      testing.TB
	schema string
	table  string // schema-qualified, quoted
	app    string // application_name of the library's connections
	pool   *pgxpool.Pool
	rdb    *redis.Client
	prefix string
	bus    *invalidate.InProcess
	pub    *testPublisher
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{t: t, schema: testenv.Name("coh_test_"), prefix: testenv.Name("coh_test_") + ":"}
	e.app = e.schema
	e.pool = newPool(t, e.schema+"_env")
	e.rdb = testenv.Redis(t)
	testenv.DeleteKeys(t, e.rdb, e.prefix)
	e.table = pgx.Identifier{e.schema, "items"}.Sanitize()
	e.bus = invalidate.NewInProcess()
	e.pub = &testPublisher{bus: e.bus}
	ctx := context.Background()
	if err := Migrate(ctx, e.pool, e.schema); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := e.pool.Exec(ctx, `DROP SCHEMA `+pgx.Identifier{e.schema}.Sanitize()+` CASCADE`); err != nil {
			t.Errorf("drop schema: %v", err)
		}
	})
	if _, err := e.pool.Exec(ctx, `CREATE TABLE `+e.table+` (id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return e
}

// store returns a Store over its own pool and Redis client, as a node
// would have.
func (e *env) store(opts *Options) *Store {
	e.t.Helper()
	o := e.options(e.t, opts)
	if u := urlFor(e.t, &listenURLs, ""); u != "" && o.ListenConfig == nil {
		cfg, err := pgx.ParseConfig(u)
		if err != nil {
			e.t.Fatal(err)
		}
		cfg.RuntimeParams["application_name"] = e.app + "_listen"
		o.ListenConfig = cfg
	}
	s, err := New(newPool(e.t, e.app), &o)
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// options returns opts with what every Store of e has unless opts says
// otherwise: e's schema, a lock guard on e's Redis and prefix (closed when
// t ends), and e's publisher.
func (e *env) options(t testing.TB, opts *Options) Options {
	t.Helper()
	var o Options
	if opts != nil {
		o = *opts
	}
	o.Schema = e.schema
	if o.Locks == nil {
		locks, err := lockguard.New(e.rdb, &lockguard.Options{Prefix: e.prefix, TTL: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { locks.Close() })
		o.Locks = locks
	}
	if o.Publisher == nil {
		o.Publisher = e.pub
	}
	return o
}

func (e *env) loader(pool *pgxpool.Pool) cache.LoaderFunc[string, item] {
	return Loader[string](pool, `SELECT id, value, version FROM `+e.table+` WHERE id = $1`, pgx.RowToStructByName[item])
}

// node returns a cache of the items table on the env's bus.
func (e *env) node(s *Store) *cache.Cache[string, item] {
	e.t.Helper()
	c, err := cache.New("items", 1000, e.loader(s.pool), &cache.Options[string, item]{
		Bus:     e.bus,
		Version: func(it item) int64 { return it.Version },
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

// captureItems installs capture on the items table through s, with its
// version column, as the "items" namespace.
func (e *env) captureItems(t testing.TB, s *Store) {
	t.Helper()
	if err := s.Capture(context.Background(), "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"}); err != nil {
		t.Fatal(err)
	}
}

// read returns the row of id as Postgres holds it.
func (e *env) read(id string) (item, bool) {
	e.t.Helper()
	rows, _ := e.pool.Query(context.Background(), `SELECT id, value, version FROM `+e.table+` WHERE id = $1`, id)
	it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[item])
	if errors.Is(err, pgx.ErrNoRows) {
		return item{}, false
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return it, true
}

// put is a TxFunc that sets id's value and bumps its version.
func (e *env) put(id, value string) TxFunc[item] {
	return func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		rows, _ := tx.Query(ctx, `
			INSERT INTO `+e.table+` AS t (id, value, version) VALUES ($1, $2, 1)
			ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, version = t.version + 1
			RETURNING id, value, version`, id, value)
		it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[item])
		return cache.Change[item]{Value: it, Version: it.Version}, err
	}
}

// add is a TxFunc that reads id's value as an integer, adds delta and
// writes it back: a read-modify-write that loses updates unless serialised.
func (e *env) add(id string, delta int) TxFunc[item] {
	return func(ctx context.Context, tx pgx.Tx) (cache.Change[item], error) {
		var cur item
		rows, _ := tx.Query(ctx, `SELECT id, value, version FROM `+e.table+` WHERE id = $1`, id)
		cur, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[item])
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return cache.Change[item]{}, err
		}
		var n int
		if cur.Value != "" {
			fmt.Sscan(cur.Value, &n)
		}
		return e.put(id, fmt.Sprint(n+delta))(ctx, tx)
	}
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testPublisher publishes on the in-process bus as a node without caches
// would: through a subscription of its own per namespace, so that every
// cache receives the publication.
type testPublisher struct {
	bus  *invalidate.InProcess
	mu   sync.Mutex
	subs map[string]cache.Subscription
	fail error // if set, Publish fails with it
}

func (p *testPublisher) Publish(ctx context.Context, ns string, keys []cache.Invalidation) error {
	p.mu.Lock()
	if p.fail != nil {
		err := p.fail
		p.mu.Unlock()
		return err
	}
	if p.subs == nil {
		p.subs = make(map[string]cache.Subscription)
	}
	sub, ok := p.subs[ns]
	if !ok {
		var err error
		if sub, err = p.bus.Subscribe(ns, nopHandler{}, time.Second); err != nil {
			p.mu.Unlock()
			return err
		}
		p.subs[ns] = sub
	}
	p.mu.Unlock()
	return sub.Publish(ctx, keys)
}

// Proven reports true: the in-process bus cannot lose a message, and a
// publisher set to fail stands for a link that breaks without the bus
// having noticed yet.
func (p *testPublisher) Proven() bool { return true }

func (p *testPublisher) setFail(err error) {
	p.mu.Lock()
	p.fail = err
	p.mu.Unlock()
}

type nopHandler struct{}

func (nopHandler) Invalidate([]cache.Invalidation) {}
func (nopHandler) Flush()                          {}
func (nopHandler) LinkLost()                       {}

// failingBus wraps a Bus whose publications fail while fail is set.
type failingBus struct {
	cache.Bus
	mu   sync.Mutex
	fail error
}

func (b *failingBus) Subscribe(ns string, h cache.Handler, maxStaleness time.Duration) (cache.Subscription, error) {
	sub, err := b.Bus.Subscribe(ns, h, maxStaleness)
	return failingSub{Subscription: sub, b: b}, err
}

func (b *failingBus) setFail(err error) {
	b.mu.Lock()
	b.fail = err
	b.mu.Unlock()
}

type failingSub struct {
	cache.Subscription
	b *failingBus
}

func (s failingSub) Publish(ctx context.Context, keys []cache.Invalidation) error {
	s.b.mu.Lock()
	err := s.b.fail
	s.b.mu.Unlock()
	if err != nil {
		return err
	}
	return s.Subscription.Publish(ctx, keys)
}
