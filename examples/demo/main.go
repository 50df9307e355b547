// Command demo runs several coherent nodes in one process against a real
// Postgres and Redis, each with its own connections, drives a read-heavy
// Zipf workload through them while they write, and checks every read:
//
//	go run ./examples/demo                 # 3 nodes, 10 s
//	go run ./examples/demo -faults         # also kill the nodes' bus connections now and then
//	go run ./examples/demo -nodes 5 -keys 100000 -reads 0.99 -duration 30s
//
// It prints a progress line every second and ends with a report: reads, hit
// ratio, loads and loads saved, writes, propagation latency (commit on one
// node to invalidation applied on another), the oldest value served
// relative to the newest committed, and the stale reads beyond the bound
// (MaxStaleness), which must be 0: the exit code is 1 otherwise.
//
// Services come from -database-url and -redis-url (or DATABASE_URL and
// REDIS_URL, or the local defaults). The demo works in a schema of its own,
// coherent_demo, which it drops and recreates.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"time"
)

type config struct {
	nodes        int
	keys         int
	readRatio    float64
	readers      int
	duration     time.Duration
	faults       bool
	maxStaleness time.Duration
	dbURL        string
	redisURL     string
}

func main() {
	var cfg config
	flag.IntVar(&cfg.nodes, "nodes", 3, "nodes, each with its own cache, bus, lock guard and connections")
	flag.IntVar(&cfg.keys, "keys", 10_000, "distinct keys")
	flag.Float64Var(&cfg.readRatio, "reads", 0.98, "share of operations that are reads")
	flag.IntVar(&cfg.readers, "workers", 8, "concurrent workers per node")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "how long to run")
	flag.BoolVar(&cfg.faults, "faults", false, "kill the nodes' bus connections (CLIENT KILL) every second or so")
	flag.DurationVar(&cfg.maxStaleness, "max-staleness", time.Second, "cache.Options.MaxStaleness, the bound stale reads are checked against")
	flag.StringVar(&cfg.dbURL, "database-url", env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"), "Postgres URL")
	flag.StringVar(&cfg.redisURL, "redis-url", env("REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis URL")
	flag.Parse()
	if cfg.nodes < 1 || cfg.keys < 1 || cfg.readers < 1 || cfg.duration <= 0 || cfg.readRatio < 0 || cfg.readRatio > 1 {
		fmt.Fprintln(os.Stderr, "demo: -nodes, -keys, -workers and -duration must be positive and -reads in [0, 1]")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	services, err := connect(ctx, cfg.dbURL, cfg.redisURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	defer services.close()
	cfg.dbURL, cfg.redisURL = services.dbURL, services.redisURL

	r, err := run(ctx, cfg, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	r.print(os.Stdout)
	if r.staleBeyondBound > 0 {
		os.Exit(1)
	}
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
