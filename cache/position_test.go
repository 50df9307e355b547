package cache

import (
	"context"
	"sync"
	"testing"
)

// posLoader records the RequiredPosition of each load, and reports report
// (if not 0) as the position it read at, as a loader that read the primary
// would.
type posLoader struct {
	mu       sync.Mutex
	required map[string]uint64
	report   uint64
}

func (l *posLoader) load(ctx context.Context, key string) (string, error) {
	pos, ok := RequiredPosition(ctx)
	if !ok {
		panic("RequiredPosition outside a load's context")
	}
	l.mu.Lock()
	l.required[key] = pos
	report := l.report
	l.mu.Unlock()
	if report != 0 {
		ReportPosition(ctx, report)
	}
	return "v-" + key, nil
}

func (l *posLoader) last(key string) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.required[key]
}

// TestRequiredPosition guards DESIGN race 10 on the cache's side: a load
// is told the source position it must read at or after, so that a loader
// reading a replica never caches a row older than a change the cache has
// heard of: the position of every invalidation of the key that reached
// this node, of this node's own writes (G1 after an eviction), and, after a
// flush and in a new cache, PositionUnknown until a load reports where the
// authoritative source stood.
func TestRequiredPosition(t *testing.T) {
	ctx := context.Background()
	if _, ok := RequiredPosition(ctx); ok {
		t.Error("RequiredPosition outside a load reports ok")
	}
	setup := func(t *testing.T) (*Cache[string, string], *posLoader, *fakeBus) {
		l := &posLoader{required: map[string]uint64{}}
		bus := &fakeBus{proof: forever}
		return newTestCache(t, 1, l.load, &Options[string, string]{Bus: bus, Shards: 1}), l, bus
	}
	t.Run("new cache", func(t *testing.T) {
		// A new cache knows nothing of the changes made before it existed:
		// a node started a moment after another node's write must not
		// read a replica that has not replayed it, and keep its row.
		c, l, _ := setup(t)
		l.report = 50
		mustGet(t, c, "a")
		if got := l.last("a"); got != PositionUnknown {
			t.Errorf("a new cache's first load requires %d; want PositionUnknown", got)
		}
		mustGet(t, c, "b")
		if got := l.last("b"); got != 50 {
			t.Errorf("a load after one reported 50 requires %d; want 50", got)
		}
	})
	t.Run("invalidation", func(t *testing.T) {
		c, l, bus := setup(t)
		bus.handler().Invalidate([]Invalidation{{Key: "k", Position: 100}})
		mustGet(t, c, "k")
		if got := l.last("k"); got < 100 {
			t.Errorf("a load after an invalidation at 100 requires %d; want at least 100", got)
		}
	})
	t.Run("own write after eviction", func(t *testing.T) {
		c, l, _ := setup(t)
		if err := c.Update(ctx, "k", func(context.Context) (Change[string], error) {
			return Change[string]{Value: "w", Position: 200}, nil
		}); err != nil {
			t.Fatal(err)
		}
		mustGet(t, c, "other") // capacity 1: evicts k
		mustGet(t, c, "k")
		if got := l.last("k"); got < 200 {
			t.Errorf("a load after this node's write at 200 (evicted since) requires %d; want at least 200", got)
		}
	})
	t.Run("flush", func(t *testing.T) {
		c, l, bus := setup(t)
		bus.handler().Flush()
		l.report = 300 // the first load after the flush reads the primary
		mustGet(t, c, "a")
		if got := l.last("a"); got != PositionUnknown {
			t.Errorf("the first load after a flush requires %d; want PositionUnknown", got)
		}
		l.report = 0
		mustGet(t, c, "b")
		if got := l.last("b"); got < 300 || got == PositionUnknown {
			t.Errorf("a load after one reported 300 requires %d; want at least 300, known", got)
		}
	})
	t.Run("flush during a reporting load", func(t *testing.T) {
		l := &posLoader{required: map[string]uint64{}}
		bus := &fakeBus{proof: forever}
		c := newTestCache(t, 10, func(ctx context.Context, key string) (string, error) {
			if key == "a" {
				bus.handler().Flush() // changes at positions nobody told
				ReportPosition(ctx, 300)
			}
			return l.load(ctx, key)
		}, &Options[string, string]{Bus: bus})
		bus.handler().Flush()
		mustGet(t, c, "a")
		mustGet(t, c, "b")
		if got := l.last("b"); got != PositionUnknown {
			t.Errorf("a load after a report from a load that a flush overlapped requires %d; want PositionUnknown", got)
		}
	})
	t.Run("unproven link", func(t *testing.T) {
		l := &posLoader{required: map[string]uint64{}}
		bus := &fakeBus{} // never proven: every Get reads through
		c := newTestCache(t, 10, l.load, &Options[string, string]{Bus: bus})
		if _, err := c.Get(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		if got := l.last("k"); got != PositionUnknown {
			t.Errorf("a read-through on an unproven link requires %d; want PositionUnknown", got)
		}
	})
	t.Run("batch", func(t *testing.T) {
		l := &posLoader{required: map[string]uint64{}}
		bus := &fakeBus{proof: forever}
		var got uint64
		c := newTestCache(t, 10, l.load, &Options[string, string]{Bus: bus,
			LoadMany: func(ctx context.Context, keys []string) (map[string]string, error) {
				got, _ = RequiredPosition(ctx)
				return map[string]string{}, nil
			}})
		bus.handler().Invalidate([]Invalidation{{Key: "x", Position: 7}, {Key: "y", Position: 9}})
		if _, err := c.GetMany(ctx, []string{"x", "y"}); err != nil {
			t.Fatal(err)
		}
		if got < 9 {
			t.Errorf("a LoadMany of keys invalidated at 7 and 9 requires %d; want at least 9", got)
		}
	})
}
