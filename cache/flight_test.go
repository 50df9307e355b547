package cache

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
)

// gatedSource is a source whose first n loads block, after reading the row,
// until the test opens the gate: a load that read an old row and has not yet
// returned it.
type gatedSource struct {
	*source
	gated   atomic.Int64 // loads still to block
	started chan struct{}
	gate    chan struct{}
}

func newGatedSource(n int64) *gatedSource {
	g := &gatedSource{source: newSource(), started: make(chan struct{}, 100), gate: make(chan struct{})}
	g.gated.Store(n)
	return g
}

func (g *gatedSource) load(ctx context.Context, key string) (row, error) {
	r, err := g.source.load(ctx, key)
	if g.gated.Add(-1) >= 0 {
		g.started <- struct{}{}
		<-g.gate
	}
	return r, err
}

// TestFillRace guards DESIGN race 1: a load reads the old row, a write
// commits and its invalidation arrives, then the load finishes. Without the
// generation guard the load stores the old row and every later Get serves
// it until TTL. (Checked by making guard.current return true: the second
// Get then returns "v1" and this test fails.)
func TestFillRace(t *testing.T) {
	src := newGatedSource(1)
	src.write("k", "v1")
	c := newTestCache(t, 10, src.load, nil)
	ctx := context.Background()

	got := make(chan row)
	go func() { got <- mustGet(t, c, "k") }()
	<-src.started // the load has read v1

	src.write("k", "v2")
	if err := c.Invalidate(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	close(src.gate)

	// The overlapping Get may return v1: it began before the write.
	if r := <-got; r.Value != "v1" {
		t.Fatalf("overlapping Get = %v; want v1", r)
	}
	if r := mustGet(t, c, "k"); r.Value != "v2" {
		t.Fatalf("Get after the invalidation = %v; want v2 (the old row must not have been stored)", r)
	}
	if st := c.Stats(); st.SkippedStores != 1 {
		t.Errorf("SkippedStores = %d; want 1", st.SkippedStores)
	}
}

// TestFillRaceSurvivesEviction guards DESIGN race 11: if the guard lived in
// the LRU entry, evicting the key while its load is in flight would erase
// the invalidation and reopen race 1.
func TestFillRaceSurvivesEviction(t *testing.T) {
	src := newGatedSource(1)
	src.write("k", "v1")
	src.write("other", "x")
	c := newTestCache(t, 1, src.load, nil)
	ctx := context.Background()

	done := make(chan struct{})
	go func() { mustGet(t, c, "k"); close(done) }()
	<-src.started
	src.write("k", "v2")
	c.Invalidate(ctx, "k")
	mustGet(t, c, "other") // fills the only slot, so nothing about k remains in the LRU
	close(src.gate)
	<-done
	if r := mustGet(t, c, "k"); r.Value != "v2" {
		t.Fatalf("Get after invalidation and eviction = %v; want v2", r)
	}
}

// TestFlushDuringLoad guards race 1 for a flush: a load that overlaps a
// flush (a bus gap) must not store.
func TestFlushDuringLoad(t *testing.T) {
	src := newGatedSource(1)
	src.write("k", "v1")
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus})

	done := make(chan struct{})
	go func() { mustGet(t, c, "k"); close(done) }()
	<-src.started
	src.write("k", "v2")
	bus.handler().Flush()
	close(src.gate)
	<-done
	if r := mustGet(t, c, "k"); r.Value != "v2" {
		t.Fatalf("Get after a flush during the load = %v; want v2", r)
	}
}

// TestNoJoiningStaleFlight guards DESIGN race 2: a Get that starts after an
// invalidation must not join a load that began before it. Without the
// remedy (the flight key carrying the guard token; checked by building it
// from the key alone) the second Get joins the blocked load and returns v1.
func TestNoJoiningStaleFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newGatedSource(1)
		src.write("k", "v1")
		c := newTestCache(t, 10, src.load, &Options[string, row]{Clock: newFakeClock()})
		ctx := context.Background()

		first := make(chan row)
		go func() { first <- mustGet(t, c, "k") }()
		<-src.started

		src.write("k", "v2")
		c.Invalidate(ctx, "k")

		second := make(chan row)
		go func() { second <- mustGet(t, c, "k") }()
		synctest.Wait() // the second Get has finished or is parked on the first load
		close(src.gate)
		if r := <-second; r.Value != "v2" {
			t.Fatalf("Get started after the invalidation = %v; want v2", r)
		}
		<-first
		if n := src.loads.Load(); n != 2 {
			t.Errorf("loads = %d; want 2", n)
		}
	})
}

// TestStampedeCostsOneLoad checks G5: concurrent misses of one key share a
// single load.
func TestStampedeCostsOneLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newGatedSource(1)
		src.write("k", "v1")
		c := newTestCache(t, 10, src.load, &Options[string, row]{Clock: newFakeClock()})
		const n = 100
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				if r := mustGet(t, c, "k"); r.Value != "v1" {
					t.Errorf("Get = %v; want v1", r)
				}
			})
		}
		synctest.Wait() // every Get is waiting on the one load
		close(src.gate)
		wg.Wait()
		if got := src.loads.Load(); got != 1 {
			t.Errorf("loads = %d; want 1", got)
		}
		if st := c.Stats(); st.Coalesced != n-1 || st.Misses != n {
			t.Errorf("Stats = %+v; want %d misses, %d coalesced", st, n, n-1)
		}
	})
}

// TestCallerCancellationDoesNotFailTheSharedLoad guards DESIGN race 8: the
// caller whose Get started the load gives up; the others still get the
// value, and the loader's context was never cancelled.
func TestCallerCancellationDoesNotFailTheSharedLoad(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		gate := make(chan struct{})
		var loaderErr atomic.Value
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
			<-gate
			if err := ctx.Err(); err != nil {
				loaderErr.Store(err)
			}
			return "v", nil
		}, &Options[string, string]{Clock: newFakeClock()})

		ctx1, cancel1 := context.WithCancel(context.Background())
		res1 := make(chan error)
		go func() { _, err := c.Get(ctx1, "k"); res1 <- err }()
		synctest.Wait() // the first Get leads the load
		res2 := make(chan string)
		go func() { res2 <- mustGet(t, c, "k") }()
		synctest.Wait() // the second Get has joined

		cancel1()
		if err := <-res1; !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled Get = %v; want context.Canceled", err)
		}
		close(gate)
		if v := <-res2; v != "v" {
			t.Fatalf("other Get = %q; want v", v)
		}
		if err := loaderErr.Load(); err != nil {
			t.Fatalf("loader saw ctx.Err() = %v; want the shared load uncancelled", err)
		}
		if got := mustGet(t, c, "k"); got != "v" || c.Stats().Loads != 1 {
			t.Errorf("Get after = %q with %d loads; want a cached v from 1 load", got, c.Stats().Loads)
		}
	})
}

// TestLoaderContextKeepsValues: the shared load's context carries the
// leader's values (trace ids, say) but not its cancellation.
func TestLoaderContextKeepsValues(t *testing.T) {
	type ctxKey struct{}
	c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
		v, _ := ctx.Value(ctxKey{}).(string)
		return v, nil
	}, nil)
	ctx := context.WithValue(context.Background(), ctxKey{}, "trace-7")
	if v, _ := c.Get(ctx, "k"); v != "trace-7" {
		t.Errorf("loader saw value %q; want trace-7", v)
	}
}

// TestLoadTimeout: a load that never finishes by itself is cut off by
// LoadTimeout, for every waiter.
func TestLoadTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
			<-ctx.Done()
			return "", ctx.Err()
		}, &Options[string, string]{Clock: newFakeClock(), LoadTimeout: 5e9})
		if _, err := c.Get(context.Background(), "k"); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Get = %v; want context.DeadlineExceeded", err)
		}
	})
}

// TestLoaderPanicReachesEveryWaiter guards DESIGN race 8: a panicking loader
// is an error for every waiter, not a crash or a hang, and the cache keeps
// working. (x/sync's DoChan re-panics on a fresh goroutine, which would
// crash the test binary without the recover in protect.)
func TestLoaderPanicReachesEveryWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		gate := make(chan struct{})
		var calls atomic.Int64
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
			if calls.Add(1) == 1 {
				<-gate
				panic("loader bug")
			}
			return "fine", nil
		}, &Options[string, string]{Clock: newFakeClock()})

		const n = 10
		errs := make(chan error, n)
		for range n {
			go func() { _, err := c.Get(context.Background(), "k"); errs <- err }()
		}
		synctest.Wait()
		close(gate)
		for range n {
			err := <-errs
			var pe *PanicError
			if !errors.As(err, &pe) || pe.Value != "loader bug" || len(pe.Stack) == 0 {
				t.Fatalf("Get = %v; want a *PanicError with the panic value and a stack", err)
			}
		}
		if got := mustGet(t, c, "k"); got != "fine" {
			t.Fatalf("Get after the panic = %q; want fine", got)
		}
		if st := c.Stats(); st.LoadErrors != 1 {
			t.Errorf("LoadErrors = %d; want 1", st.LoadErrors)
		}
	})
}

func TestPanicErrorUnwraps(t *testing.T) {
	c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
		panic(errBoom)
	}, nil)
	if _, err := c.Get(context.Background(), "k"); !errors.Is(err, errBoom) {
		t.Fatalf("Get = %v; want it to wrap the panicked error", err)
	}
}
