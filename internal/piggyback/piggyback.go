// Package piggyback lets a Redis command ride in the pipeline of a bus's
// publication, so that the two cost one round trip. Package lockguard
// makes a lock's release a [Rider] ([lockguard.Lock.ReleaseOnPublish]),
// package store puts it in the context of the publication that follows a
// commit, and the Redis buses of package invalidate send it right after
// the publication, in the same pipeline, when both go through the same
// client to one server.
//
// A Rider is taken at most once: by a bus, which then queues it and reports
// its outcome, or by its owner (Take), who then sends the command itself.
// Whoever takes it first decides; a bus that cannot send it (another
// client, a Redis Cluster, no publication at all) leaves it to the owner,
// so the mechanism is an optimisation that never changes what is sent,
// only how many round trips it takes.
package piggyback

import (
	"context"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// A Rider is a command waiting for a pipeline to ride in.
type Rider struct {
	client redis.UniversalClient
	queue  func(ctx context.Context, p redis.Pipeliner) (finish func())
	taken  atomic.Bool
	done   chan struct{} // closed by the finish of a bus that took it
}

// New returns a Rider that must be sent through client. queue adds its
// commands to a pipeline and returns a function that reads their replies
// once the pipeline has been executed.
func New(client redis.UniversalClient, queue func(ctx context.Context, p redis.Pipeliner) (finish func())) *Rider {
	return &Rider{client: client, queue: queue, done: make(chan struct{})}
}

type key struct{}

// With returns a copy of ctx that carries r to the next publication made
// with it.
func With(ctx context.Context, r *Rider) context.Context {
	return context.WithValue(ctx, key{}, r)
}

// From returns the Rider ctx carries, or nil.
func From(ctx context.Context) *Rider {
	r, _ := ctx.Value(key{}).(*Rider)
	return r
}

// Take claims r, and reports whether it was still free: the caller, its
// owner, now sends the command itself. If Take reports false, a bus has
// taken r; Done is closed once the bus has its outcome.
func (r *Rider) Take() bool { return r.taken.CompareAndSwap(false, true) }

// Done is closed when the bus that took r has read the command's reply
// (or its failure).
func (r *Rider) Done() <-chan struct{} { return r.done }

// Board queues r's commands in p if r was still free and must go through
// client, and returns the function to call after p was executed; otherwise
// it returns nil and leaves r alone. A bus calls it only for a pipeline of
// client that it executes right after its publication. Only a
// *redis.Client (one server, or Sentinel's master) qualifies: a pipeline
// of a ClusterClient may go to several nodes at once, in no order, and a
// client of another type may not even be comparable.
func (r *Rider) Board(ctx context.Context, client redis.UniversalClient, p redis.Pipeliner) (finish func()) {
	mine, ok1 := r.client.(*redis.Client)
	theirs, ok2 := client.(*redis.Client)
	if !ok1 || !ok2 || mine != theirs || !r.taken.CompareAndSwap(false, true) {
		return nil
	}
	f := r.queue(ctx, p)
	return func() {
		f()
		close(r.done)
	}
}

// BoardAll boards each of riders that it can in p (see Board) and returns
// the function to call after p was executed, which finishes them all; or
// nil if it boarded none.
func BoardAll(ctx context.Context, riders []*Rider, client redis.UniversalClient, p redis.Pipeliner) (finish func()) {
	var boarded []func()
	for _, r := range riders {
		if f := r.Board(ctx, client, p); f != nil {
			boarded = append(boarded, f)
		}
	}
	if len(boarded) == 0 {
		return nil
	}
	return func() {
		for _, f := range boarded {
			f()
		}
	}
}
