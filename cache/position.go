package cache

import (
	"context"
	"math"
)

// PositionUnknown is the position RequiredPosition reports when the cache
// cannot name one: the bus link is unproven, or a flush (a gap on the bus,
// a namespace flush) or the cache's start stood for changes at positions
// nobody told. A loader
// that reads replicas must then read the authoritative source (the
// primary), and should tell the cache where that stood (ReportPosition).
const PositionUnknown = math.MaxUint64

// A source position orders the changes of the source of truth: a Postgres
// WAL position (LSN), say. To package cache and to the buses it is an
// opaque, monotonic uint64; 0 means unknown, or before everything. A
// change names the position at or after which it is visible
// ([Invalidation.Position], [Change.Position]), and a load that follows it
// must read a source that has reached that position (DESIGN race 10: a
// replica that has not replayed the change would return the old row, which
// the cache would keep).

// loadPosition is what a load's context carries about positions.
type loadPosition struct {
	guard    *guard
	required uint64
	unknown  uint64 // the guard's flush count when the load began
}

type loadPositionKey struct{}

func withLoadPosition(ctx context.Context, g *guard, tok token) context.Context {
	return context.WithValue(ctx, loadPositionKey{}, &loadPosition{guard: g, required: tok.pos, unknown: tok.unknown})
}

// RequiredPosition reports, inside a load (the context a Cache passes to
// its loader or LoadMany), the source position the load must read at or
// after: the highest position of the changes of its keys that reached this
// cache, or of its flushes, including this node's own writes (so that G1
// holds after an eviction); PositionUnknown when it cannot say. ok is false
// outside a load. A loader that always reads the authoritative source can
// ignore it.
func RequiredPosition(ctx context.Context) (pos uint64, ok bool) {
	lp, ok := ctx.Value(loadPositionKey{}).(*loadPosition)
	if !ok {
		return 0, false
	}
	return lp.required, true
}

// ReportPosition tells the cache, inside a load, that the load read the
// authoritative source at position pos or later: every change the cache
// was told of, or flushed for, before the load began is at or before pos.
// A loader that read a replica must not report its position. It clears the
// PositionUnknown that a flush left, so that later loads may read replicas
// again; outside a load it does nothing.
func ReportPosition(ctx context.Context, pos uint64) {
	if lp, ok := ctx.Value(loadPositionKey{}).(*loadPosition); ok {
		lp.guard.learn(lp.unknown, pos)
	}
}
