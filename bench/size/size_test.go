package main

import "testing"

// TestQuick runs a small configuration, so that the program cannot rot.
func TestQuick(t *testing.T) {
	res, err := run(config{sizes: []int{1000}, zipfKeys: 1000, capacities: []int{10, 100}, requests: 10_000})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	for _, m := range res.Memory {
		if m.Entries == 0 || m.Entries > m.Capacity {
			t.Errorf("%s: %d entries held of capacity %d", m.Impl, m.Entries, m.Capacity)
		}
	}
	if len(res.Hits) != 6 {
		t.Fatalf("%d hit ratios; want 6", len(res.Hits))
	}
	for _, h := range res.Hits {
		if h.HitRatio <= 0 || h.HitRatio >= 1 {
			t.Errorf("%s at capacity %d: hit ratio %v; want in (0, 1)", h.Impl, h.Capacity, h.HitRatio)
		}
	}
}
