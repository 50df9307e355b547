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
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
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
	cfg, err := parseFlags(os.Args[1:], os.Getenv, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case err != nil:
		os.Exit(2)
	}
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

// The services' URLs when neither the flags nor the environment give them.
const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultRedisURL    = "redis://127.0.0.1:6379/0"
)

// parseFlags parses the command line args. -database-url and -redis-url
// default to the environment variables DATABASE_URL and REDIS_URL, which
// getenv reads; they are read after parsing, so that the usage message
// never prints them, or a password in them. Errors and usage go to out.
func parseFlags(args []string, getenv func(string) string, out io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.IntVar(&cfg.nodes, "nodes", 3, "nodes, each with its own cache, bus, lock guard and connections")
	fs.IntVar(&cfg.keys, "keys", 10_000, "distinct keys")
	fs.Float64Var(&cfg.readRatio, "reads", 0.98, "share of operations that are reads")
	fs.IntVar(&cfg.readers, "workers", 8, "concurrent workers per node")
	fs.DurationVar(&cfg.duration, "duration", 10*time.Second, "how long to run")
	fs.BoolVar(&cfg.faults, "faults", false, "kill the nodes' bus connections (CLIENT KILL) every second or so")
	fs.DurationVar(&cfg.maxStaleness, "max-staleness", time.Second, "cache.Options.MaxStaleness, the bound stale reads are checked against")
	fs.StringVar(&cfg.dbURL, "database-url", "", "Postgres URL (default $DATABASE_URL, or "+defaultDatabaseURL+")")
	fs.StringVar(&cfg.redisURL, "redis-url", "", "Redis URL (default $REDIS_URL, or "+defaultRedisURL+")")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	cfg.dbURL = cmp.Or(cfg.dbURL, getenv("DATABASE_URL"), defaultDatabaseURL)
	cfg.redisURL = cmp.Or(cfg.redisURL, getenv("REDIS_URL"), defaultRedisURL)
	return cfg, nil
}
