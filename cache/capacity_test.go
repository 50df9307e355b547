package cache

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"
	"time"
)

// TestHugeCapacity: New with a capacity far beyond what memory could hold
// (math.MaxInt, the natural "unbounded") returns a working cache or an
// error, and never panics, hangs, or allocates in proportion to the
// capacity; flushing such a cache does not either. The shard index used to
// be allocated with a bucket per entry of capacity, at creation and on every
// flush: math.MaxInt panicked in makeslice with the default shards, and
// looped forever rounding the size up to a power of two with one shard.
func TestHugeCapacity(t *testing.T) {
	tests := []struct {
		capacity, shards int
		wantErr          bool
	}{
		{math.MaxInt, 0, false},
		{math.MaxInt, 1, false},
		{math.MaxInt, 3, false},
		{math.MaxInt - 1, 7, false},
		{1 << 40, 1024, false},
		{1 << 62, 1, false},
		{math.MaxInt, maxShards + 1, true},
		{math.MaxInt, math.MaxInt, true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("capacity=%d/shards=%d", tt.capacity, tt.shards), func(t *testing.T) {
			// New runs on a goroutine of its own so that a panic or a
			// hang is reported as this case's failure; the timeout only
			// catches a hang.
			type result struct {
				c   *Cache[string, string]
				err error
			}
			done := make(chan result, 1)
			go func() {
				defer func() {
					if r := recover(); r != nil {
						t.Errorf("New panicked: %v", r)
						done <- result{err: errors.New("panicked")}
					}
				}()
				c, err := New("huge", tt.capacity, func(ctx context.Context, k string) (string, error) { return "v:" + k, nil },
					&Options[string, string]{Shards: tt.shards})
				done <- result{c, err}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(time.Minute):
				t.Fatal("New did not return")
			}
			if t.Failed() {
				return
			}
			if tt.wantErr {
				if !errors.Is(r.err, ErrInvalidOptions) {
					t.Fatalf("New = %v; want an error for which errors.Is(err, ErrInvalidOptions)", r.err)
				}
				return
			}
			if r.err != nil {
				t.Fatalf("New: %v", r.err)
			}
			c := r.c
			defer c.Close()
			ctx := context.Background()
			for range 2 { // fill, flush, fill again
				for i := range 100 {
					k := fmt.Sprint(i)
					if v := mustGet(t, c, k); v != "v:"+k {
						t.Fatalf("Get(%q) = %q; want %q", k, v, "v:"+k)
					}
				}
				if st := c.Stats(); st.Entries != 100 || st.Loads != 100 {
					t.Fatalf("Stats = %+v; want 100 entries from 100 loads", st)
				}
				if b := indexBuckets(c); b > 4*100+len(c.shards)*minBuckets {
					t.Errorf("the index holds %d buckets for 100 entries; want it to follow the entries", b)
				}
				if err := c.InvalidateAll(ctx); err != nil {
					t.Fatal(err)
				}
				if b := indexBuckets(c); b > len(c.shards)*minBuckets {
					t.Errorf("after a flush the index holds %d buckets; want at most %d", b, len(c.shards)*minBuckets)
				}
				c.stats.loads.Store(0)
			}
		})
	}
}

// indexBuckets returns the number of buckets of every shard's index.
func indexBuckets[K comparable, V any](c *Cache[K, V]) int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		n += len(s.index.Load().buckets)
		s.mu.Unlock()
	}
	return n
}
