package cache

import (
	"context"
	"fmt"
	"runtime/debug"
	"sync"
)

// one is the result of a shared load of one key. Its type differs from a
// batch's, map[K]V, so that a result delivered to the wrong kind of caller
// is detected rather than converted to a zero value; and unlike a bare V, it
// is never nil, even when V is an interface type and the value is nil.
type one[V any] struct{ v V }

// loaded returns the value of a shared load of one key, whose val is a one[V].
func (c *Cache[K, V]) loaded(val any) (V, error) {
	r, ok := val.(one[V])
	if !ok {
		// A flight key shared by loads of different kinds; see flightKey.
		return r.v, fmt.Errorf("cache: internal error: a load of one key returned %T, not %T", val, r)
	}
	return r.v, nil
}

// contain runs body, the work of a shared load, on a goroutine of its own,
// and returns its result.
//
// The flight function of a load runs on singleflight's goroutine, which
// handles neither way in which code can leave it abnormally: it re-panics a
// panic on a fresh goroutine, which crashes the process, and after
// runtime.Goexit it never sends a result, so that every waiter hangs (a
// LoadTimeout only cancels a context). protect turns a panic in a user
// callback into a *PanicError; contain turns any other panic into one too,
// and a Goexit into ErrGoexit. No deferred function can stop a Goexit: it
// ends the goroutine that called it after running its deferred calls, so
// the user's code must not run on singleflight's. Here it ends body's own
// goroutine, whose deferred call sends the error. Either way body stops
// where the fault struck, so nothing of the load is stored after it.
//
// at is set by protect to the name of the callback body is running, so
// that a Goexit can be attributed; only body's goroutine uses it.
func (c *Cache[K, V]) contain(body func(at *string) (any, error)) (any, error) {
	r := new(contained)
	r.done.Add(1)
	go c.runContained(r, body)
	r.done.Wait()
	return r.val, r.err
}

// contained is the state of one run of contain, in one allocation.
type contained struct {
	done sync.WaitGroup
	at   string
	val  any
	err  error
}

func (c *Cache[K, V]) runContained(r *contained, body func(at *string) (any, error)) {
	returned := false
	defer func() {
		if !returned {
			// recover returns nil during a Goexit, and stops a panic
			// (since Go 1.21, panic(nil) panics with a
			// *runtime.PanicNilError).
			if p := recover(); p != nil {
				r.err = c.panicked(r.at, p)
			} else {
				r.err = c.goexited(r.at)
			}
			c.stats.loadErrors.Add(1)
		}
		r.done.Done()
	}()
	r.val, r.err = body(&r.at)
	returned = true
}

// panicked returns the error of a panic with value p in what; call it from
// the deferred function that recovered p, so that the stack is the
// panicking goroutine's.
func (c *Cache[K, V]) panicked(what string, p any) error {
	err := &PanicError{Func: what, Value: p, Stack: debug.Stack()}
	c.log.Error("cache: panic in a shared load", "func", what, "panic", p)
	return err
}

// goexited returns the error of a runtime.Goexit in what ("" if not in a
// user callback).
func (c *Cache[K, V]) goexited(what string) error {
	c.log.Error("cache: runtime.Goexit in a shared load", "func", what)
	if what == "" {
		return ErrGoexit
	}
	return fmt.Errorf("%w (in %s)", ErrGoexit, what)
}

// traceStart reports the start of a load to the tracer, if any, and
// returns the context it gives for the load.
func (c *Cache[K, V]) traceStart(ctx context.Context, keys []string, bypass bool, at *string) (context.Context, error) {
	if c.cfg.Tracer == nil {
		return ctx, nil
	}
	err := c.protect(at, "LoadTracer.TraceLoadStart", func() error {
		ctx = c.traceLoadStart(ctx, keys, bypass)
		return nil
	})
	return ctx, err
}

// traceEnd reports the end of a load with err to the tracer, if any, and
// returns err, or the tracer's panic.
func (c *Cache[K, V]) traceEnd(ctx context.Context, err error, at *string) error {
	if c.cfg.Tracer == nil {
		return err
	}
	if perr := c.protect(at, "LoadTracer.TraceLoadEnd", func() error {
		c.traceLoadEnd(ctx, err)
		return nil
	}); perr != nil {
		return perr
	}
	return err
}
