package main

import (
	"io"
	"testing"
	"time"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/internal/testenv"
)

// TestQuick runs two small configurations, so that the program cannot rot:
// it checks that every invalidation was applied, not how fast.
func TestQuick(t *testing.T) {
	testenv.Redis(t) // skip, or fail under CI, without Redis
	cfg := config{
		services:   benchenv.Services{RedisURL: testenv.RedisURL()},
		nodes:      []int{1, 2},
		rate:       200,
		sweepNodes: 2,
		sweepRates: []int{400},
		duration:   200 * time.Millisecond,
		warmup:     50 * time.Millisecond,
	}
	res, err := run(t.Context(), cfg, io.Discard)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	for _, r := range append(res.Nodes, res.Rates...) {
		if r.Writes == 0 {
			t.Errorf("%d nodes at %d writes/s: no writes", r.Nodes, r.TargetRate)
		}
		if r.Missing != 0 || r.Flushes != 0 {
			t.Errorf("%d nodes at %d writes/s: %d invalidations missing, %d flushes; want none", r.Nodes, r.TargetRate, r.Missing, r.Flushes)
		}
		if want := r.Writes * int64(r.Nodes-1); r.Nodes > 1 && r.Applied < want {
			t.Errorf("%d nodes: %d invalidations applied; want at least %d", r.Nodes, r.Applied, want)
		}
	}
}
