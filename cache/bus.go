package cache

import (
	"context"
	"time"
)

// Invalidation names one key of a namespace that changed in the source of
// truth.
//
// Version is the version of the row that the write produced, or 0 when the
// writer does not know it. A cache that holds the key at Version or newer
// keeps its entry; otherwise it drops it. An Invalidation with Version 0
// always drops the key.
type Invalidation struct {
	Key     string
	Version int64
	// Position is the source position at or after which the change is
	// visible, or 0 if unknown; a load of Key that follows must read a
	// source that has reached it (see RequiredPosition).
	Position uint64
	// Value, if not nil, is the value the write committed at Version,
	// encoded by the publishing cache's [Options.Codec]: a value
	// broadcast. A receiver with a Codec may install it instead of
	// dropping Key, if it can tell it is the newest it knows of; one
	// without a Codec treats it as a plain invalidation. It is at most
	// [MaxValueLen] bytes. Nil: a plain invalidation.
	Value []byte
	// Deleted reports that the write deleted Key at Version: a tombstone,
	// which a receiver with a Codec may install as a cached absence. Value
	// is ignored when Deleted is set.
	Deleted bool
}

// MaxValueLen is the largest encoded value, in bytes, that a value
// broadcast carries (see [Options.MaxBroadcastSize]); buses reject
// messages with larger values.
const MaxValueLen = 64 << 10

// Bus carries invalidations between the nodes of a service. A Cache
// subscribes to its namespace when it is created and publishes through the
// returned [Subscription].
//
// The package invalidate provides an in-process Bus and Redis transports.
type Bus interface {
	// Subscribe registers h for the invalidations of namespace published by
	// every other subscriber. Delivery to h starts before Subscribe returns
	// or later; until the returned Subscription reports a proof (see
	// [Subscription.ProofAge]) the cache does not serve cached values.
	//
	// maxStaleness is the subscriber's staleness bound, its
	// [Options.MaxStaleness]: how long after its last proof it serves
	// cached values. A bus that acts on the bound (gives up on a proof that
	// has not come back within it, say) keeps the smallest of its
	// subscriptions'. Subscribe returns an error for which errors.Is(err,
	// ErrInvalidOptions) is true when the bus cannot keep maxStaleness: it
	// is not positive, or not longer than the interval between the bus's
	// proofs.
	Subscribe(namespace string, h Handler, maxStaleness time.Duration) (Subscription, error)
}

// Subscription is one subscriber's link to a [Bus].
type Subscription interface {
	// Publish tells every other subscriber of the namespace that keys
	// changed. An empty keys means every key of the namespace: receivers
	// flush. Publish does not deliver to the calling subscriber's own
	// Handler: the publisher applies its changes locally before it publishes.
	// ctx bounds the publication.
	Publish(ctx context.Context, keys []Invalidation) error

	// ProofAge reports how long ago the link was last proven live and in
	// order, measured by the bus's own clock at the moment of the call: at
	// that time minus age, every invalidation published anywhere before it
	// had been delivered to the Handler, or the Handler has been flushed
	// since. ok is false when the link is not proven: it never was since
	// the Subscription was made, the Subscription has detected since its
	// last proof that the link failed, or it is closed. age is never
	// negative; a link that cannot lose a message (in-process delivery)
	// reports 0.
	//
	// The age is a duration, not a time, so that the bus and the cache need
	// not share a clock: a Cache reads its own clock first, then asks, and
	// serves until that reading minus age plus [Options.MaxStaleness],
	// which is no later than the proof plus MaxStaleness.
	//
	// A Subscription that detects the loss of its link (a connection error,
	// a missed proof, a read it had to abandon) reports ok false from then
	// on and then calls [Handler.LinkLost], in that order, and reports a
	// proof again only after one made after it regained the link. If it may
	// have missed invalidations that it cannot replay, it calls
	// [Handler.Flush] before it reports a proof again. A Subscription may
	// treat a message that calls for a flush (one it cannot read, one that
	// shows that another went missing, a request to flush the namespace)
	// the same way, reporting ok false and calling LinkLost at once, and
	// Flush before its next proof, so that a flood of such messages costs
	// one flush per proof. ProofAge must be cheap; a Cache calls it at
	// most a few times per proof interval.
	ProofAge() (age time.Duration, ok bool)

	// Close stops delivery to the Handler. It is safe to call more than once.
	Close() error
}

// Handler receives what a [Bus] delivers for one namespace. Its methods may
// be called from several goroutines at once and must not block for long.
// They must not retain keys after they return.
type Handler interface {
	// Invalidate drops keys, unless the cache already holds a version at
	// least as new as the one named. A key that carries a value or a
	// tombstone ([Invalidation.Value], [Invalidation.Deleted]) is installed
	// instead when the cache has a Codec and can tell it is the newest
	// version it knows of (see [Options.Codec]).
	Invalidate(keys []Invalidation)
	// Flush drops every entry of the namespace. A bus calls it when it may
	// have missed an invalidation (a resubscription, an out-of-sequence or
	// malformed message) and when a publisher asked for it.
	Flush()
	// LinkLost tells the handler that the bus has detected that its link
	// failed, or that a flush is due before its next proof (see
	// [Subscription.ProofAge]), and already reports no proof from
	// [Subscription.ProofAge]. From the moment LinkLost returns until
	// ProofAge reports a proof again, the cache serves nothing cached:
	// without it, a cache would go on serving until [Options.MaxStaleness]
	// after the last proof, while invalidations may be going past it.
	// LinkLost drops nothing: a bus that resumes where it stopped (Redis
	// Streams) delivers what it missed and keeps the cache's entries; a bus
	// that cannot replay calls Flush before it proves its link again.
	LinkLost()
}
