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
}

// Bus carries invalidations between the nodes of a service. A Cache
// subscribes to its namespace when it is created and publishes through the
// returned [Subscription].
//
// The package invalidate provides an in-process Bus and Redis transports.
type Bus interface {
	// Subscribe registers h for the invalidations of namespace published by
	// every other subscriber. Delivery to h starts before Subscribe returns
	// or later; until the returned Subscription reports a proof (see
	// [Subscription.LastProof]) the cache does not serve cached values.
	Subscribe(namespace string, h Handler) (Subscription, error)
}

// Subscription is one subscriber's link to a [Bus].
type Subscription interface {
	// Publish tells every other subscriber of the namespace that keys
	// changed. An empty keys means every key of the namespace: receivers
	// flush. Publish does not deliver to the calling subscriber's own
	// Handler: the publisher applies its changes locally before it publishes.
	// ctx bounds the publication.
	Publish(ctx context.Context, keys []Invalidation) error

	// LastProof reports the latest time T at which the link was proven live
	// and in order: every invalidation published anywhere before T has been
	// delivered to the Handler, or the Handler has been flushed since. The
	// zero Time means the link is not proven: it never was, or the
	// Subscription has detected since its last proof that the link failed.
	//
	// A Subscription that detects the loss of its link (a connection error,
	// a missed proof, a read it had to abandon) reports the zero Time from
	// then on and then calls [Handler.LinkLost], in that order, and reports
	// a time again only after a proof made after it regained the link. If
	// it may have missed invalidations that it cannot replay, it calls
	// [Handler.Flush] before LastProof advances again. A Subscription may
	// treat a message that calls for a flush (one it cannot read, one that
	// shows that another went missing, a request to flush the namespace)
	// the same way, reporting the zero
	// Time and calling LinkLost at once, and Flush before its next proof,
	// so that a flood of such messages costs one flush per proof. A link that cannot
	// lose a message (in-process delivery) may return a time in the far
	// future. LastProof must be cheap; a Cache calls it at most a few times
	// per proof interval. The Time must come from the same clock as the
	// Cache's [Options.Clock] (time.Now when that is nil).
	LastProof() time.Time

	// Close stops delivery to the Handler. It is safe to call more than once.
	Close() error
}

// Handler receives what a [Bus] delivers for one namespace. Its methods may
// be called from several goroutines at once and must not block for long.
// They must not retain keys after they return.
type Handler interface {
	// Invalidate drops keys, unless the cache already holds a version at
	// least as new as the one named.
	Invalidate(keys []Invalidation)
	// Flush drops every entry of the namespace. A bus calls it when it may
	// have missed an invalidation (a resubscription, an out-of-sequence or
	// malformed message) and when a publisher asked for it.
	Flush()
	// LinkLost tells the handler that the bus has detected that its link
	// failed, or that a flush is due before its next proof (see
	// [Subscription.LastProof]), and already reports the zero Time from
	// [Subscription.LastProof]. From the moment LinkLost returns until
	// LastProof advances again, the cache serves nothing cached: without
	// it, a cache would go on serving until [Options.MaxStaleness] after
	// the last proof, while invalidations may be going past it. LinkLost
	// drops nothing: a bus that resumes where it stopped (Redis Streams)
	// delivers what it missed and keeps the cache's entries; a bus that
	// cannot replay calls Flush before it proves its link again.
	LinkLost()
}
