package store

import "context"

// WriteTracer observes the writes of a Store, for example to record them
// as spans; set it as [Options.Tracer]. It may also implement
// [CommitTracer]. Its methods must be safe for concurrent use.
type WriteTracer interface {
	// TraceWriteStart is called when a write starts, before it takes its
	// lock. The context it returns is used for the rest of the write and
	// passed to TraceWriteEnd.
	TraceWriteStart(ctx context.Context, data TraceWriteStartData) context.Context
	// TraceWriteEnd is called when the write returns.
	TraceWriteEnd(ctx context.Context, data TraceWriteEndData)
}

// TraceWriteStartData describes a write that starts.
type TraceWriteStartData struct {
	Namespace string
	Key       string
	// Locked is false for an optimistic write.
	Locked bool
}

// TraceWriteEndData describes a finished write.
type TraceWriteEndData struct {
	// Committed reports that the transaction committed.
	Committed bool
	// Published reports that the invalidation was published by the writer
	// (otherwise the relay publishes it).
	Published bool
	// Err is the error the write returns.
	Err error
}

// CommitTracer observes the moment between a write's commit and the
// publication of its invalidation.
type CommitTracer interface {
	// TraceCommit is called right after the commit, before the writer's
	// cache is updated and the invalidation published. A process that
	// dies here leaves the change to the relay (DESIGN race 3), which makes
	// this the place to inject that crash in tests.
	TraceCommit(ctx context.Context, data TraceCommitData)
}

// TraceCommitData describes a committed write.
type TraceCommitData struct {
	Namespace string
	Key       string
	Version   int64
}

func (s *Store) traceWriteStart(ctx context.Context, ns, key string, locked bool) context.Context {
	if s.tracer == nil {
		return ctx
	}
	return s.tracer.TraceWriteStart(ctx, TraceWriteStartData{Namespace: ns, Key: key, Locked: locked})
}

func (s *Store) traceWriteEnd(ctx context.Context, committed, published bool, err error) {
	if s.tracer != nil {
		s.tracer.TraceWriteEnd(ctx, TraceWriteEndData{Committed: committed, Published: published, Err: err})
	}
}

func (s *Store) traceCommit(ctx context.Context, ns, key string, version int64) {
	if t, ok := s.tracer.(CommitTracer); ok {
		t.TraceCommit(ctx, TraceCommitData{Namespace: ns, Key: key, Version: version})
	}
}
