package cache

import (
	"context"
	"errors"
	"runtime"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// faults makes one user callback of a shared load fail, once: it waits for
// gate (so that every waiter can join the load first) and then panics or
// calls runtime.Goexit. The callbacks all run on the goroutine of the shared
// load, which belongs to no caller.
type faults struct {
	at     string // the callback that fails: a PanicError.Func name
	goexit bool   // call runtime.Goexit rather than panic
	gate   chan struct{}
	armed  atomic.Bool
}

func newFaults(at string, goexit bool) *faults {
	f := &faults{at: at, goexit: goexit, gate: make(chan struct{})}
	f.armed.Store(true)
	return f
}

// hit is called by each callback with the key it handles. Only key "b"
// fails, so that a batch of "a" and "b" fails after "a" went through the
// callback, and the separate load of "a" that GetMany makes without
// LoadMany succeeds.
func (f *faults) hit(at, key string) {
	if at != f.at || key != "b" || !f.armed.CompareAndSwap(true, false) {
		return
	}
	<-f.gate
	if f.goexit {
		runtime.Goexit()
	}
	panic(at + " bug")
}

// The tracer fails for the load whose last key is b: the load of b, or the
// batch of a and b.
type lastKey struct{}

func (f *faults) TraceLoadStart(ctx context.Context, d TraceLoadStartData) context.Context {
	key := d.Keys[len(d.Keys)-1]
	f.hit("LoadTracer.TraceLoadStart", key)
	return context.WithValue(ctx, lastKey{}, key)
}

func (f *faults) TraceLoadEnd(ctx context.Context, _ TraceLoadEndData) {
	f.hit("LoadTracer.TraceLoadEnd", ctx.Value(lastKey{}).(string))
}

// cached reports whether c holds an entry for key.
func cached[V any](c *Cache[string, V], key string) bool {
	h := c.hash(key)
	s := c.shard(h)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.index.Load().find(key, h) != nil
}

// waitErr receives one waiter's error. In a synctest bubble the timeout
// fires only once every goroutine of the bubble is blocked for good: it
// reports a hang, and does not bound how long the load may take.
func waitErr(t *testing.T, errs <-chan error) error {
	t.Helper()
	select {
	case err := <-errs:
		return err
	case <-time.After(time.Hour):
		t.Fatal("a waiter of the failed load never returned")
		return nil
	}
}

// TestCallbackFaultsReachEveryWaiter guards DESIGN race 8 for every user
// callback that runs on the goroutine of a shared load: the loader,
// LoadMany, Options.Version, Options.Weigher and the LoadTracer's
// TraceLoadStart and TraceLoadEnd. When one of them panics, every waiter gets a *PanicError
// naming it; when one of them calls runtime.Goexit (t.FailNow in a test
// loader does), every waiter gets ErrGoexit. Nothing of the failed load is
// cached, and the cache keeps working.
//
// Without the remedy, x/sync's singleflight re-panics a panic from outside
// the loader's recover on a fresh goroutine (go panic(e)), which crashes the
// process; and after a Goexit it never sends on the DoChan channels, so
// every waiter hangs, LoadTimeout notwithstanding.
func TestCallbackFaultsReachEveryWaiter(t *testing.T) {
	modes := []struct {
		name   string
		many   bool // GetMany of ["a", "b"]; otherwise Get of "b"
		loader string
	}{
		{"Get", false, "loader"},
		{"GetMany", true, "loader"},
		{"GetManyBatch", true, "LoadMany"},
	}
	for _, mode := range modes {
		for _, at := range []string{mode.loader, "Options.Version", "Options.Weigher", "LoadTracer.TraceLoadStart", "LoadTracer.TraceLoadEnd"} {
			for _, goexit := range []bool{false, true} {
				name := mode.name + "/" + at + "/panic"
				if goexit {
					name = mode.name + "/" + at + "/Goexit"
				}
				t.Run(name, func(t *testing.T) {
					testCallbackFault(t, mode.many, mode.loader == "LoadMany", at, goexit)
				})
			}
		}
	}
}

func testCallbackFault(t *testing.T, many, loadMany bool, at string, goexit bool) {
	synctest.Test(t, func(t *testing.T) {
		f := newFaults(at, goexit) // its gate must belong to the bubble
		opts := &Options[string, string]{
			Clock:  newFakeClock(),
			Tracer: f,
			Version: func(v string) int64 {
				f.hit("Options.Version", v)
				return 1
			},
			MaxWeight: 100,
			Weigher: func(k, _ string) uint32 {
				f.hit("Options.Weigher", k)
				return 1
			},
		}
		if loadMany {
			opts.LoadMany = func(ctx context.Context, keys []string) (map[string]string, error) {
				f.hit("LoadMany", "b")
				m := make(map[string]string)
				for _, k := range keys {
					m[k] = k
				}
				return m, nil
			}
		}
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
			f.hit("loader", k)
			return k, nil
		}, opts)
		ctx := context.Background()
		call := func() error {
			if many {
				_, err := c.GetMany(ctx, []string{"a", "b"})
				return err
			}
			_, err := c.Get(ctx, "b")
			return err
		}

		const waiters = 4
		errs := make(chan error, waiters)
		for range waiters {
			go func() { errs <- call() }()
		}
		synctest.Wait() // every waiter has joined the load, which waits at the gate
		close(f.gate)
		for range waiters {
			err := waitErr(t, errs)
			if f.goexit {
				if !errors.Is(err, ErrGoexit) {
					t.Errorf("waiter got %v; want an error for which errors.Is(err, ErrGoexit)", err)
				}
				continue
			}
			var pe *PanicError
			if !errors.As(err, &pe) || pe.Value != f.at+" bug" || pe.Func != f.at || len(pe.Stack) == 0 {
				t.Errorf("waiter got %v; want a *PanicError from %s with its value and a stack", err, f.at)
			}
		}
		// Nothing of the failed load is stored: not b, and not a when it
		// was loaded in the same batch. (Without LoadMany, a has a load of
		// its own, which succeeds.)
		if cached(c, "b") || (loadMany && cached(c, "a")) {
			t.Errorf("after the failed load: b cached %v, a cached %v; want nothing of the failed load stored", cached(c, "b"), cached(c, "a"))
		}
		if st := c.Stats(); st.LoadErrors != 1 {
			t.Errorf("LoadErrors = %d; want 1", st.LoadErrors)
		}

		// The cache keeps working: the callbacks fail only once.
		if err := call(); err != nil {
			t.Errorf("call after the failed load: %v; want success", err)
		}
		if v := mustGet(t, c, "b"); v != "b" {
			t.Errorf("Get(%q) = %q; want %q", "b", v, "b")
		}
	})
}

// trippingClock is a Clock that panics once tripped.
type trippingClock struct {
	*fakeClock
	tripped atomic.Bool
}

func (c *trippingClock) Now() time.Time {
	if c.tripped.CompareAndSwap(true, false) {
		panic("clock bug")
	}
	return c.fakeClock.Now()
}

// TestPanicOutsideCallbacksReachesEveryWaiter: a panic on the shared load's
// goroutine outside the user callbacks proper (here in a Clock, read when
// the result is stored; a Bus's ProofAge or a Logger's handler could do the
// same) is a *PanicError for every waiter too, not a crash.
func TestPanicOutsideCallbacksReachesEveryWaiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := &trippingClock{fakeClock: newFakeClock()}
		gate := make(chan struct{})
		var loads atomic.Int64
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
			if loads.Add(1) == 1 {
				<-gate
				clock.tripped.Store(true) // the next reading is the store's
			}
			return k, nil
		}, &Options[string, string]{Clock: clock})
		const waiters = 4
		errs := make(chan error, waiters)
		for range waiters {
			go func() { _, err := c.Get(context.Background(), "k"); errs <- err }()
		}
		synctest.Wait()
		close(gate)
		for range waiters {
			var pe *PanicError
			if err := waitErr(t, errs); !errors.As(err, &pe) || pe.Value != "clock bug" || pe.Func != "" {
				t.Errorf("waiter got %v; want a *PanicError from outside the callbacks", err)
			}
		}
		if cached(c, "k") {
			t.Error("the failed load stored k")
		}
		if v := mustGet(t, c, "k"); v != "k" {
			t.Errorf("Get(%q) after the failed load = %q; want %q", "k", v, "k")
		}
	})
}
