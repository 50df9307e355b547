package invalidate

import "sync/atomic"

// Stats is a snapshot of a bus's counters. Counters only grow; take two
// snapshots and subtract to get rates.
type Stats struct {
	// MessagesSent counts messages published (one PUBLISH or XADD each).
	MessagesSent uint64
	// KeysSent counts keys in the messages published; a namespace flush
	// counts as none.
	KeysSent uint64
	// MessagesReceived counts messages received from other nodes. The
	// echo of this node's own messages is not counted.
	MessagesReceived uint64
	// KeysReceived counts keys in MessagesReceived.
	KeysReceived uint64
	// PublishErrors counts failed sends of a batch. Every Publish waiting
	// for that batch returned the error.
	PublishErrors uint64
	// Proofs counts proofs of the link: probes that came back (pub/sub)
	// or XREAD round trips (Streams).
	Proofs uint64
	// ProofTimeouts counts connections declared dead because a probe did
	// not come back within the bus's staleness bound, the smallest
	// MaxStaleness of its subscriptions (pub/sub).
	ProofTimeouts uint64
	// Reconnects counts attempts to recover from a failed, killed or
	// abandoned connection: resubscriptions (pub/sub), reads and position
	// checks retried (Streams).
	Reconnects uint64
	// LinksLost counts failures of the link that the bus detected while
	// it was proven (a killed or failed connection, a probe that did not
	// come back, a server-side unsubscribe, a failed read or position
	// check, a position the stream no longer held). Each made every
	// subscription report no proof, and told its Handler (LinkLost), until
	// the next proof.
	LinksLost uint64
	// FlushesFirstSubscription counts the flush of every local subscription
	// when the bus first subscribed (pub/sub) or added its first position
	// marker (Streams): a value a cache installed by a local write before
	// then may have been overwritten by a write whose invalidation was
	// published before the bus was listening (race 19). At most 1.
	FlushesFirstSubscription uint64
	// FlushesResubscribe counts flushes of every local subscription because
	// the bus subscribed again after its first subscription: whatever was
	// published in between is lost (pub/sub).
	FlushesResubscribe uint64
	// FlushesGap counts flushes because a message from another node did
	// not follow its predecessor from that node. Such a message makes
	// every subscription report no proof at once, and the flush is done
	// before the next proof; the gaps and malformed messages that come
	// before it share it (FlushesCoalesced).
	FlushesGap uint64
	// FlushesMalformed counts flushes because a message could not be
	// decoded (malformed, oversized or of an unknown format version); see
	// FlushesGap for when they are done.
	FlushesMalformed uint64
	// MessagesMalformed counts messages that could not be decoded. Many of
	// them mean that something other than coherent publishes on the
	// channel or writes to the stream.
	MessagesMalformed uint64
	// FlushesProofTimeout counts flushes because a proof arrived more than
	// the bus's staleness bound after the previous one without a
	// resubscription in between (pub/sub).
	FlushesProofTimeout uint64
	// FlushesTrimmed counts flushes because the stream no longer held the
	// reader's position: it was trimmed past it, deleted or lost in a
	// restart (Streams).
	FlushesTrimmed uint64
	// FlushesRequested counts namespace flushes published by other nodes
	// (an empty-keys Publish) and received. The subscriptions of the
	// namespace report no proof from then on, and are flushed before the
	// next proof, once for all the requests in between.
	FlushesRequested uint64
	// FlushesCoalesced counts flushes that a message called for (a
	// malformed message, a sequence gap, a requested namespace flush) and
	// that were not done on their own: a flush already due, or one done
	// for another cause (a resubscription, a lost stream position), came
	// after the message and covered it. Under a flood of such messages
	// nearly all of them are counted here.
	FlushesCoalesced uint64
	// HandlerPanics counts panics of a local Handler. The bus recovered and
	// flushed that handler.
	HandlerPanics uint64
}

// counters holds the live values behind Stats.
type counters struct {
	messagesSent, keysSent, messagesReceived, keysReceived atomic.Uint64
	publishErrors, proofs, proofTimeouts, reconnects       atomic.Uint64
	linksLost, messagesMalformed, flushesCoalesced         atomic.Uint64
	flushes                                                [numCauses]atomic.Uint64
	flushesRequested, handlerPanics                        atomic.Uint64
}

// cause is why every local subscription was flushed.
type cause int

const (
	causeResubscribe cause = iota
	causeGap
	causeMalformed
	causeProofTimeout
	causeTrimmed
	causeFirstSubscription
	numCauses

	noCause cause = -1 // no flush is due; see hub.dueAll
)

func (c cause) String() string {
	return [...]string{"resubscribe", "sequence gap", "malformed message", "proof timeout", "stream position lost", "first subscription"}[c]
}

func (c *counters) snapshot() Stats {
	return Stats{
		MessagesSent:             c.messagesSent.Load(),
		KeysSent:                 c.keysSent.Load(),
		MessagesReceived:         c.messagesReceived.Load(),
		KeysReceived:             c.keysReceived.Load(),
		PublishErrors:            c.publishErrors.Load(),
		Proofs:                   c.proofs.Load(),
		ProofTimeouts:            c.proofTimeouts.Load(),
		Reconnects:               c.reconnects.Load(),
		LinksLost:                c.linksLost.Load(),
		FlushesFirstSubscription: c.flushes[causeFirstSubscription].Load(),
		FlushesResubscribe:       c.flushes[causeResubscribe].Load(),
		FlushesGap:               c.flushes[causeGap].Load(),
		FlushesMalformed:         c.flushes[causeMalformed].Load(),
		MessagesMalformed:        c.messagesMalformed.Load(),
		FlushesCoalesced:         c.flushesCoalesced.Load(),
		FlushesProofTimeout:      c.flushes[causeProofTimeout].Load(),
		FlushesTrimmed:           c.flushes[causeTrimmed].Load(),
		FlushesRequested:         c.flushesRequested.Load(),
		HandlerPanics:            c.handlerPanics.Load(),
	}
}
