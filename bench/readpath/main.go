// Command readpath measures examples/webapp-style HTTP reads of a hot key
// set four ways in one run, on one machine:
//
//   - coherent: through the library (cache.Cache over a Redis pub/sub bus,
//     filled by store.Loader);
//   - postgres: straight from Postgres, with the same loader;
//   - redis: cache-aside on Redis: GET, on a miss the same loader and SET;
//   - ceiling: the item made up at no cost, the same handler otherwise:
//     what HTTP over loopback allows, which bounds the others.
//
// Each variant is an in-process net/http server on loopback whose handler is
// the same code (webapp's GET /items/{id}) except for the data access. A
// closed-loop load generator in the same process keeps -concurrency
// keep-alive connections busy with GETs of keys drawn uniformly from the hot
// set, and reports requests/s, p50, p99 and p99.9 per variant. Rounds rotate
// the order of the variants, so that drift of the shared machine falls on all
// of them; the load average is recorded at the start and end of every
// measurement. With -wrk it measures each variant again with wrk, a separate
// process written in C, as a cross-check of the in-process generator, in the
// same rotated rounds, and reports the median round of each.
//
//	go run ./bench/readpath                      # 3 rounds of 5s per variant
//	go run ./bench/readpath -quick               # one short round (CI)
//	go run ./bench/readpath -json out.json -wrk
//
// It creates a schema and a Redis key prefix of its own and removes them.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
)

func main() {
	var cfg config
	fs := flag.CommandLine
	cfg.services.Register(fs)
	quick := fs.Bool("quick", false, "one short round with few keys and connections (for CI); overrides the sizes below")
	fs.IntVar(&cfg.keys, "keys", 1000, "size of the hot key set")
	fs.IntVar(&cfg.concurrency, "concurrency", 32, "connections of the load generator, each with one request in flight")
	fs.Float64Var(&cfg.rate, "rate", 0, "pace the load at this many requests/s over all connections, measuring latency at equal offered load (0: closed loop, as fast as each connection can go)")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "measured time per variant and round")
	fs.DurationVar(&cfg.warmup, "warmup", time.Second, "unmeasured load before each measurement")
	fs.IntVar(&cfg.rounds, "rounds", 3, "rounds; each measures every variant once, in a rotated order")
	fs.IntVar(&cfg.pgConns, "pg-conns", 8, "Postgres pool size (every variant)")
	fs.BoolVar(&cfg.wrk, "wrk", false, "also measure every variant with wrk (must be installed), after the in-process generator")
	fs.IntVar(&cfg.wrkThreads, "wrk-threads", 1, "wrk threads")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of one variant's first measurement (server and load generator) to this file")
	fs.StringVar(&cfg.profileVariant, "profile-variant", "coherent", "the variant -cpuprofile profiles")
	jsonPath := fs.String("json", "", "write the results as JSON to this file")
	fs.Parse(os.Args[1:])
	if *quick {
		cfg.keys, cfg.concurrency, cfg.rounds = 100, 8, 1
		cfg.duration, cfg.warmup = 500*time.Millisecond, 100*time.Millisecond
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, cfg, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "readpath: %v\n", err)
		os.Exit(1)
	}
	res.print(os.Stdout)
	if err := benchenv.WriteJSON(*jsonPath, res); err != nil {
		fmt.Fprintf(os.Stderr, "readpath: %v\n", err)
		os.Exit(1)
	}
}
