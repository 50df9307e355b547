// Command hotkeys measures value broadcast (cache.Options.Codec) on a set
// of hot keys that every node reads: 1, 4, 8 and 16 nodes in this process,
// each with its own Postgres pool, Redis client, invalidate.PubSub bus,
// lock guard, store.Store and cache of one table, under a fixed, open-loop
// rate of library writes (store.Table.Update of a random hot key on a
// random node) while every node reads the hot keys. Each node count runs
// twice, with broadcast off (plain invalidations) and on (a JSON codec).
//
// For each run it reports the Postgres loads per write (every node's
// cache.Stats.Loads, and that divided by the nodes other than the writer),
// the time from the start of a write until every node serves its version
// (p50, p99; a prober reads the key on every node after each write, as its
// readers would), and the bytes of the bus's messages (a raw subscriber of
// the bus channel adds up their payloads; Redis delivers each to every
// node).
//
//	go run ./bench/hotkeys
//	go run ./bench/hotkeys -quick
//	go run ./bench/hotkeys -json hotkeys.json
//
// It uses a schema, a channel and a key prefix of its own and drops them at
// the end.
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
	exit := 0
	defer func() { os.Exit(exit) }()
	var cfg config
	fs := flag.CommandLine
	cfg.services.Register(fs)
	quick := fs.Bool("quick", false, "few nodes and short measurements (for CI); overrides the settings below")
	nodes := fs.String("nodes", "1,4,8,16", "node counts")
	fs.IntVar(&cfg.rate, "rate", 50, "library writes per second, all nodes together")
	fs.IntVar(&cfg.keys, "keys", 20, "hot keys, each read on every node")
	fs.IntVar(&cfg.reads, "reads", 500, "reads per second per node")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "measured time per configuration")
	fs.DurationVar(&cfg.warmup, "warmup", time.Second, "reads and writes before the measurement")
	jsonPath := fs.String("json", "", "write the results as JSON to this file")
	fs.Parse(os.Args[1:])
	if *quick {
		*nodes = "1,4"
		cfg.duration, cfg.warmup = time.Second, 300*time.Millisecond
	}
	var err error
	if cfg.nodes, err = benchenv.Ints(*nodes); err != nil {
		fmt.Fprintf(os.Stderr, "hotkeys: -nodes: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, cfg, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hotkeys: %v\n", err)
		exit = 1
		return
	}
	res.print(os.Stdout)
	if err := benchenv.WriteJSON(*jsonPath, res); err != nil {
		fmt.Fprintf(os.Stderr, "hotkeys: %v\n", err)
		exit = 1
	}
}
