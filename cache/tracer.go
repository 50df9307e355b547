package cache

import "context"

// LoadTracer observes the loads of a Cache, for example to record them as
// spans of a tracing system; set it as [Options.Tracer]. Its methods run on
// the goroutine of the shared load and must be safe for concurrent use. A
// LoadTracer may also implement [InvalidationTracer].
type LoadTracer interface {
	// TraceLoadStart is called before the loader (or LoadMany) runs. The
	// context it returns is passed to the loader and to TraceLoadEnd.
	TraceLoadStart(ctx context.Context, data TraceLoadStartData) context.Context
	// TraceLoadEnd is called when the load has finished.
	TraceLoadEnd(ctx context.Context, data TraceLoadEndData)
}

// TraceLoadStartData describes a load that is about to run.
type TraceLoadStartData struct {
	Namespace string
	// Keys holds the encoded key, or the keys of a LoadMany.
	Keys []string
	// Bypass reports a read-through while the bus link is unproven: the
	// result will not be stored.
	Bypass bool
}

// TraceLoadEndData describes a finished load.
type TraceLoadEndData struct {
	// Err is the loader's error: nil, one for which errors.Is(err,
	// ErrNotFound) is true, a [*PanicError], or the loader's own.
	Err error
}

// InvalidationTracer observes the invalidations and flushes a Cache
// applies. Its method runs on the goroutine that applies them, must be safe
// for concurrent use and must not block.
type InvalidationTracer interface {
	TraceInvalidation(data TraceInvalidationData)
}

// TraceInvalidationData describes applied invalidations.
type TraceInvalidationData struct {
	Namespace string
	// Keys are the invalidated keys; nil for a flush.
	Keys []Invalidation
	// Remote reports invalidations that came from the bus, as opposed to
	// this node's own writes.
	Remote bool
}

func (c *Cache[K, V]) traceLoadStart(ctx context.Context, keys []string, bypass bool) context.Context {
	if c.cfg.Tracer == nil {
		return ctx
	}
	return c.cfg.Tracer.TraceLoadStart(ctx, TraceLoadStartData{Namespace: c.cfg.namespace, Keys: keys, Bypass: bypass})
}

func (c *Cache[K, V]) traceLoadEnd(ctx context.Context, err error) {
	if c.cfg.Tracer != nil {
		c.cfg.Tracer.TraceLoadEnd(ctx, TraceLoadEndData{Err: err})
	}
}

func (c *Cache[K, V]) traceInvalidation(keys []Invalidation, remote bool) {
	if t, ok := c.cfg.Tracer.(InvalidationTracer); ok {
		t.TraceInvalidation(TraceInvalidationData{Namespace: c.cfg.namespace, Keys: keys, Remote: remote})
	}
}
