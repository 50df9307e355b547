package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/testenv"
)

// testApp is the webapp's app wired by newApp, as run wires it, against the
// Postgres and Redis of DATABASE_URL and REDIS_URL, in a schema and under a
// Redis key prefix of the test's own. Its handler is served in-process.
type testApp struct {
	*app
	h      http.Handler
	db     *pgxpool.Pool // the test's own connections, for checks behind the app's back
	schema string
	logs   *syncBuffer // what the app logged
}

// newTestApp starts a testApp. With redisAddr set, the app's Redis client
// dials that address (a fault proxy) instead of REDIS_URL's. It waits until
// the app's bus link is proven, so that reads are served as in production.
func newTestApp(t testing.TB, redisAddr string) *testApp {
	t.Helper()
	return newTestAppWith(t, redisAddr, nil)
}

// newTestAppWith is newTestApp with the configuration changed by edit, if
// not nil.
func newTestAppWith(t testing.TB, redisAddr string, edit func(*config)) *testApp {
	t.Helper()
	admin := testenv.Pool(t, testenv.PoolConfig(t, "coherent-webapp-test", ""))
	schema := testenv.Schema(t, admin)
	pool := testenv.Pool(t, testenv.PoolConfig(t, "coherent-webapp-test", schema))
	ropts := testenv.RedisOptions(t)
	if redisAddr != "" {
		ropts.Addr = redisAddr
	}
	rdb := redis.NewClient(ropts)
	t.Cleanup(func() { rdb.Close() })
	prefix := testenv.Name("coherent-webapp-test:") + ":"
	testenv.DeleteKeys(t, testenv.Redis(t), prefix)

	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	cfg := config{node: "test", schema: schema, redisPrefix: prefix, lockTTL: 2 * time.Second, maxStaleness: time.Second}
	if edit != nil {
		edit(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := newApp(ctx, cfg, pool, nil, rdb, log)
	if err != nil {
		t.Fatalf("newApp: %v", err)
	}
	t.Cleanup(a.close)
	for !a.items.Cache().Proven() {
		if ctx.Err() != nil {
			t.Fatalf("the bus link was not proven within 30s; log:\n%s", logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return &testApp{app: a, h: a.routes(), db: pool, schema: schema, logs: logs}
}

// do serves one request for target (a path, escaped as on the wire) and
// returns the status and the body.
func (ta *testApp) do(t testing.TB, method, target string, body []byte) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	rec := httptest.NewRecorder()
	ta.h.ServeHTTP(rec, httptest.NewRequest(method, target, rd))
	return rec.Code, rec.Body.String()
}

// row reads the item id from Postgres, behind the app's back.
func (ta *testApp) row(t testing.TB, id string) (it Item, found bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, _ := ta.db.Query(ctx, `SELECT id, value, version FROM items WHERE id = $1`, id)
	it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Item])
	switch {
	case err == nil:
		return it, true
	case errors.Is(err, pgx.ErrNoRows):
		return Item{}, false
	default:
		t.Fatalf("reading item %q: %v", id, err)
		return Item{}, false
	}
}

// exec runs SQL behind the app's back.
func (ta *testApp) exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := ta.db.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent use: a log's output.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
