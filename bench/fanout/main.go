// Command fanout measures the invalidation bus as the number of nodes grows:
// 1, 2, 4, 8 and 16 nodes in this process, each with its own Redis client
// and invalidate.PubSub bus and a cache.Cache of one namespace, under a
// fixed, open-loop write rate spread over the nodes. A write is cache.Set of
// a fresh key on one node (what Table.Update does after its commit), which
// every other node then applies. For each node count it reports writes/s,
// messages/s through Redis (the buses' Stats: PUBLISHes sent, and
// deliveries received), keys per message, applied invalidations/s, this
// process's CPU time per applied invalidation (getrusage) and the Redis
// server's, and the propagation delay from the start of Set on the writer to
// the invalidation applied on another node (p50, p99).
//
// A second sweep holds the node count and raises the write rate, to show
// that group commit keeps messages sub-linear in writes.
//
//	go run ./bench/fanout
//	go run ./bench/fanout -quick
//	go run ./bench/fanout -json fanout.json
//
// It uses a channel of its own and leaves nothing behind in Redis.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
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
	quick := fs.Bool("quick", false, "few nodes, a low rate and short measurements (for CI); overrides the settings below")
	nodes := fs.String("nodes", "1,2,4,8,16", "node counts of the first sweep")
	fs.IntVar(&cfg.rate, "rate", 2000, "writes per second (all nodes together) of the first sweep")
	sweepNodes := fs.Int("sweep-nodes", 4, "node count of the rate sweep (0: no rate sweep)")
	rates := fs.String("sweep-rates", "250,1000,4000,16000", "write rates of the rate sweep")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "measured time per configuration")
	fs.DurationVar(&cfg.warmup, "warmup", time.Second, "writes before the measurement")
	fs.DurationVar(&cfg.batchWindow, "batch-window", 0, "invalidate.PubSubOptions.BatchWindow of every bus")
	jsonPath := fs.String("json", "", "write the results as JSON to this file")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	fs.Parse(os.Args[1:])
	if *quick {
		*nodes, cfg.rate, *sweepNodes, *rates = "1,2,4", 500, 2, "250,1000"
		cfg.duration, cfg.warmup = 500*time.Millisecond, 200*time.Millisecond
	}
	var err error
	if cfg.nodes, err = benchenv.Ints(*nodes); err != nil {
		fmt.Fprintf(os.Stderr, "fanout: -nodes: %v\n", err)
		os.Exit(2)
	}
	if cfg.sweepRates, err = benchenv.Ints(*rates); err != nil {
		fmt.Fprintf(os.Stderr, "fanout: -sweep-rates: %v\n", err)
		os.Exit(2)
	}
	cfg.sweepNodes = *sweepNodes

	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "fanout: %v\n", err)
			os.Exit(1)
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, cfg, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fanout: %v\n", err)
		exit = 1
		return
	}
	res.print(os.Stdout)
	if err := benchenv.WriteJSON(*jsonPath, res); err != nil {
		fmt.Fprintf(os.Stderr, "fanout: %v\n", err)
		exit = 1
	}
}
