package main

import (
	"io"
	"testing"
	"time"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/internal/testenv"
)

// TestQuick runs every variant briefly, so that the program cannot rot: it
// checks that each served requests without errors, not how fast.
func TestQuick(t *testing.T) {
	testenv.Pool(t, testenv.PoolConfig(t, "coherent-bench-readpath-test", "")) // skip, or fail under CI, without Postgres
	testenv.Redis(t)
	cfg := config{
		services:    benchenv.Services{DatabaseURL: testenv.DatabaseURL(), RedisURL: testenv.RedisURL()},
		keys:        20,
		concurrency: 4,
		duration:    200 * time.Millisecond,
		warmup:      50 * time.Millisecond,
		rounds:      1,
		pgConns:     4,
	}
	res, err := run(t.Context(), cfg, io.Discard)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if len(res.Variants) != len(variantNames) {
		t.Fatalf("%d variants measured; want %d", len(res.Variants), len(variantNames))
	}
	for _, v := range res.Variants {
		if v.Requests == 0 || v.Errors != 0 {
			t.Errorf("%s: %d requests, %d errors; want some and none", v.Name, v.Requests, v.Errors)
		}
	}
}
