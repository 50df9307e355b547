// Package testenv connects tests to the real Postgres and Redis named by
// DATABASE_URL and REDIS_URL (defaults: the local services). When one is
// unreachable, tests skip, unless the environment variable CI is set: then
// they fail, so that a broken CI machine cannot pass by skipping.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

// DatabaseURL returns DATABASE_URL, or the local default.
func DatabaseURL() string {
	if u := os.Getenv("DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

// RedisURL returns REDIS_URL, or the local default.
func RedisURL() string {
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

// Unavailable skips t, or fails it under CI.
func Unavailable(t testing.TB, what string, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("%s unavailable under CI: %v", what, err)
	}
	t.Skipf("%s unavailable: %v", what, err)
}

// Name returns prefix followed by 12 random hex digits: a schema, key
// prefix or channel of the test's own.
func Name(prefix string) string {
	b := make([]byte, 6)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// PoolConfig is a pool configuration for DATABASE_URL whose connections
// carry application_name app (so that a test can find and terminate them)
// and, if searchPath is not empty, that search_path.
func PoolConfig(t testing.TB, app, searchPath string) *pgxpool.Config {
	t.Helper()
	return PoolConfigFor(t, DatabaseURL(), app, searchPath)
}

// PoolConfigFor is [PoolConfig] for the Postgres URL dsn.
func PoolConfigFor(t testing.TB, dsn, app, searchPath string) *pgxpool.Config {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("Postgres URL: %v", err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	if searchPath != "" {
		cfg.ConnConfig.RuntimeParams["search_path"] = searchPath
	}
	cfg.MaxConns = 8
	return cfg
}

// Pool opens a pool with cfg, closed at the end of the test.
func Pool(t testing.TB, cfg *pgxpool.Config) *pgxpool.Pool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err == nil {
		err = pool.Ping(ctx)
	}
	if err != nil {
		if pool != nil {
			pool.Close()
		}
		Unavailable(t, "Postgres", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// Schema creates a schema of the test's own and drops it, with everything
// in it, at the end of the test.
func Schema(t testing.TB, pool *pgxpool.Pool) string {
	t.Helper()
	name := Name("coh_test_")
	if _, err := pool.Exec(context.Background(), `CREATE SCHEMA `+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("create schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, `DROP SCHEMA `+pgx.Identifier{name}.Sanitize()+` CASCADE`); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

// RedisOptions returns the options of REDIS_URL. It skips t, or fails it
// under CI, when that Redis does not answer; the check runs once per test
// binary, so that without Redis every test stops at once.
func RedisOptions(t testing.TB) *redis.Options {
	t.Helper()
	opt, err := redis.ParseURL(RedisURL())
	if err != nil {
		t.Fatalf("REDIS_URL %q: %v", RedisURL(), err)
	}
	if err := redisReachable(); err != nil {
		Unavailable(t, "Redis at "+opt.Addr, err)
	}
	return opt
}

var redisReachable = sync.OnceValue(func() error {
	opt, err := redis.ParseURL(RedisURL())
	if err != nil {
		return err
	}
	opt.MaxRetries = -1
	opt.DialerRetries = 1
	c := redis.NewClient(opt)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return c.Ping(ctx).Err()
})

// Redis returns a client for REDIS_URL, closed at the end of the test.
func Redis(t testing.TB) *redis.Client {
	t.Helper()
	c := redis.NewClient(RedisOptions(t))
	t.Cleanup(func() { c.Close() })
	return c
}

// DeleteKeys removes the Redis keys matching prefix* at the end of the test.
func DeleteKeys(t testing.TB, c *redis.Client, prefix string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			c.Del(ctx, iter.Val())
		}
	})
}
