package cache

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
)

func TestGetManyThroughTheLoader(t *testing.T) {
	src := newSource()
	src.write("a", "A")
	src.write("b", "B")
	c := newTestCache(t, 10, src.load, nil)
	mustGet(t, c, "a")

	got, err := c.GetMany(context.Background(), []string{"a", "b", "ghost", "b"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got["a"].Value != "A" || got["b"].Value != "B" {
		t.Fatalf("GetMany = %v; want a and b only", got)
	}
	if n := src.loads.Load(); n != 3 {
		t.Errorf("loads = %d; want 3 (a once before, then b and ghost once each)", n)
	}
	// Everything, the absence included, is cached now.
	if _, err := c.GetMany(context.Background(), []string{"a", "b", "ghost"}); err != nil || src.loads.Load() != 3 {
		t.Errorf("second GetMany: err %v, loads %d; want all hits", err, src.loads.Load())
	}
}

func TestGetManyThroughLoadMany(t *testing.T) {
	src := newSource()
	src.write("a", "A")
	src.write("b", "B")
	src.write("c", "C")
	var batches [][]string
	c := newTestCache(t, 10, src.load, &Options[string, row]{
		LoadMany: func(ctx context.Context, keys []string) (map[string]row, error) {
			batches = append(batches, slices.Clone(keys))
			m := make(map[string]row)
			for _, k := range keys {
				if r, ok := src.read(k); ok {
					m[k] = r
				}
			}
			m["unasked"] = row{Value: "x"} // must not leak into results
			return m, nil
		},
	})
	mustGet(t, c, "a")
	got, err := c.GetMany(context.Background(), []string{"a", "b", "c", "ghost"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(slices.Sorted(maps.Keys(got)), []string{"a", "b", "c"}) {
		t.Fatalf("GetMany keys = %v; want [a b c]", slices.Sorted(maps.Keys(got)))
	}
	if len(batches) != 1 || !slices.Equal(batches[0], []string{"b", "c", "ghost"}) {
		t.Fatalf("LoadMany calls = %v; want one call for [b c ghost]", batches)
	}
	if _, err := c.Get(context.Background(), "ghost"); !errors.Is(err, ErrNotFound) || src.loads.Load() != 1 {
		t.Errorf("Get(ghost) = %v with %d loads; want a cached ErrNotFound", err, src.loads.Load())
	}
}

func TestGetManyErrors(t *testing.T) {
	c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
		if k == "bad" {
			return "", errBoom
		}
		return k, nil
	}, nil)
	if m, err := c.GetMany(context.Background(), []string{"ok", "bad"}); !errors.Is(err, errBoom) || m != nil {
		t.Errorf("GetMany = %v, %v; want nil and an error wrapping errBoom", m, err)
	}
	cb := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) { return k, nil }, &Options[string, string]{
		LoadMany: func(ctx context.Context, keys []string) (map[string]string, error) { panic("batch bug") },
	})
	var pe *PanicError
	if _, err := cb.GetMany(context.Background(), []string{"x"}); !errors.As(err, &pe) {
		t.Errorf("GetMany with a panicking LoadMany = %v; want a *PanicError", err)
	}
}

// TestGetManySharesIdenticalBatches checks G5 for LoadMany: concurrent
// GetMany calls missing the same keys share one batch load, and (race 2) a
// GetMany that starts after an invalidation of one of those keys does not.
func TestGetManySharesIdenticalBatches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		gate := make(chan struct{})
		var calls atomic.Int64
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) { return k, nil }, &Options[string, string]{
			Clock: newFakeClock(),
			LoadMany: func(ctx context.Context, keys []string) (map[string]string, error) {
				n := calls.Add(1)
				if n == 1 {
					<-gate
				}
				m := make(map[string]string)
				for _, k := range keys {
					m[k] = k + "@" + string(rune('0'+n))
				}
				return m, nil
			},
		})
		keys := []string{"a", "b"}
		results := make(chan map[string]string, 3)
		for range 2 {
			go func() {
				m, err := c.GetMany(context.Background(), keys)
				if err != nil {
					t.Error(err)
				}
				results <- m
			}()
		}
		synctest.Wait()
		if n := calls.Load(); n != 1 {
			t.Fatalf("LoadMany calls for two identical concurrent GetMany = %d; want 1", n)
		}
		c.Invalidate(context.Background(), "b")
		go func() {
			m, _ := c.GetMany(context.Background(), keys)
			results <- m
		}()
		synctest.Wait()
		close(gate)
		if m := <-results; m["b"] != "b@2" {
			t.Fatalf("GetMany started after the invalidation = %v; want b from the second batch", m)
		}
		<-results
		<-results
		if st := c.Stats(); st.Coalesced != 2 {
			t.Errorf("Coalesced = %d; want 2 (both keys of the joined GetMany)", st.Coalesced)
		}
	})
}
