package main

import (
	"io"
	"testing"
	"time"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/internal/testenv"
)

// TestQuick runs two nodes briefly with broadcast off and on, so that the
// program cannot rot: it checks that every write became visible on every
// node and that broadcast installed values, not how fast.
func TestQuick(t *testing.T) {
	testenv.Pool(t, testenv.PoolConfig(t, "coherent-bench-hotkeys-test", "")) // skip, or fail under CI, without Postgres
	testenv.Redis(t)
	cfg := config{
		services: benchenv.Services{DatabaseURL: testenv.DatabaseURL(), RedisURL: testenv.RedisURL()},
		nodes:    []int{2},
		rate:     40,
		keys:     5,
		reads:    200,
		duration: 300 * time.Millisecond,
		warmup:   100 * time.Millisecond,
	}
	res, err := run(t.Context(), cfg, io.Discard)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if len(res.Rows) != 2 {
		t.Fatalf("%d rows; want 2", len(res.Rows))
	}
	for _, r := range res.Rows {
		if r.Writes == 0 || r.NotVisible != 0 {
			t.Errorf("broadcast %v: %d writes, %d not visible everywhere; want some and none", r.Broadcast, r.Writes, r.NotVisible)
		}
		if r.Broadcast && r.ValuesInstalled == 0 {
			t.Errorf("broadcast on: no value installed")
		}
	}
}
