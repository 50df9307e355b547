package invalidate

import (
	"cmp"
	"crypto/rand"
	"fmt"
	"log/slog"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
)

// Options are the settings that [PubSub] and [Streams] share, embedded in
// [PubSubOptions] and [StreamsOptions]. The zero value, and every zero
// field, means the default.
//
// The staleness bound is not among them: it is the caches'
// ([cache.Options.MaxStaleness]), and the bus learns it when they
// subscribe.
type Options struct {
	// NodeID names this bus in the messages it publishes, so that it can
	// ignore their echo and others can check their sequence. It must be
	// unique among the nodes sharing the channel or stream, and should
	// change when the process restarts. Default: 16 random bytes drawn by
	// the constructor.
	NodeID [16]byte

	// ProofInterval is how often the bus proves its link (see
	// [cache.Subscription.ProofAge]). PubSub publishes a probe on its own
	// proof channel every ProofInterval and dates its proof from when the
	// probe was sent, once it comes back on the subscription; Streams reads
	// with XREAD BLOCK ProofInterval, and a read that returns, with entries
	// or empty, proves that everything added before it was sent has been
	// delivered.
	//
	// The bus keeps the smallest [cache.Options.MaxStaleness] of its
	// subscriptions, or, without one, 1s or ten ProofIntervals if that is
	// longer. A probe that stays away longer than that, or a read that
	// takes longer, makes the bus give up on the connection and make a new
	// one; a PubSub proof that arrives that long after the previous one
	// flushes too. Subscribe rejects a MaxStaleness not longer than
	// ProofInterval. Default 100ms.
	ProofInterval time.Duration

	// BatchWindow is how long a message may wait for more publications
	// under a burst. Publications always share messages: those that arrive
	// while a message is being sent go out together in the next one (group
	// commit), so a publication waits at most for the message ahead of it.
	// With BatchWindow, a message under a burst (several Publish calls in
	// the previous one, or calls that arrived while it was being sent) also
	// waits until BatchWindow after its oldest call, or until it holds
	// BatchKeys keys. That makes fewer, larger messages when publishers do
	// not wait for each other, at the cost of latency. Default 0: no wait.
	BatchWindow time.Duration

	// BatchKeys is the most keys one message carries; larger batches are
	// split. A batch that reaches it is sent without waiting for the rest of
	// BatchWindow. 1 sends every key in its own message (no batching).
	// Default 512.
	BatchKeys int

	// MaxBackoff caps the wait between attempts to recover a failed
	// connection (a resubscription, a read retried), which grows
	// exponentially from 10ms with random jitter. Default 2s.
	MaxBackoff time.Duration

	// Logger receives reconnections, flushes and malformed messages.
	// Default nil: discard.
	Logger *slog.Logger

	// Clock tells the bus the time, by which it dates its proofs and times
	// its probes out, for tests. It is the bus's own: the bus reports the
	// age of its proofs, not their time, so the caches that subscribe need
	// not share it ([cache.Options.Clock] is theirs). Default nil: time.Now.
	Clock cache.Clock
}

// PubSubOptions configure a [PubSub]. A nil *PubSubOptions, and every zero
// field, means the default. NewPubSub copies the options.
type PubSubOptions struct {
	// Channel is the Redis channel that carries the invalidations of every
	// namespace. All nodes of a service must use the same channel, and
	// unrelated services different ones. Default "coherent:invalidations".
	Channel string

	Options
}

// StreamsOptions configure a [Streams]. A nil *StreamsOptions, and every
// zero field, means the default. NewStreams copies the options.
type StreamsOptions struct {
	// Stream is the key of the Redis stream that carries the invalidations
	// of every namespace. All nodes of a service must use the same stream.
	// Default "coherent:invalidations:stream".
	Stream string

	// MaxLen is the approximate number of entries the stream keeps: every
	// XADD of the bus trims it with MAXLEN ~ MaxLen, which removes whole
	// nodes of the stream only, so it may hold a node's worth more
	// (stream-node-max-entries, 100 by default). A node that falls further
	// behind, or is disconnected for longer than it takes to add MaxLen
	// entries, flushes when it resumes. So MaxLen should exceed the
	// messages published during the longest disconnection a node should
	// ride out without a flush: the peak rate of messages (a message
	// carries up to BatchKeys keys of one namespace) times that time; at
	// 1,000 messages a second and 100 seconds, the default. The stream
	// costs Redis about MaxLen times the mean message size (a few dozen
	// bytes plus the keys; at most MaxMessageSize). Give every node of a
	// service the same MaxLen: each XADD trims for all. Default 100000.
	MaxLen int64

	Options
}

// config is the validated, defaulted form of either options type.
type config struct {
	Options        // defaults filled in; Logger names the channel or stream and the node
	name    string // Channel or Stream
	maxLen  int64  // Streams only
}

func (o *PubSubOptions) config() (*config, error) {
	var opts PubSubOptions
	if o != nil {
		opts = *o
	}
	return newConfig(opts.Options, "channel", cmp.Or(opts.Channel, "coherent:invalidations"))
}

func (o *StreamsOptions) config() (*config, error) {
	var opts StreamsOptions
	if o != nil {
		opts = *o
	}
	if opts.MaxLen < 0 {
		return nil, fmt.Errorf("%w: MaxLen must not be negative, got %d", ErrInvalidOptions, opts.MaxLen)
	}
	c, err := newConfig(opts.Options, "stream", cmp.Or(opts.Stream, "coherent:invalidations:stream"))
	if err != nil {
		return nil, err
	}
	c.maxLen = cmp.Or(opts.MaxLen, 100_000)
	return c, nil
}

// newConfig validates the options common to both transports and fills in
// their defaults, for the channel or stream (what) name.
func newConfig(o Options, what, name string) (*config, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidOptions}, args...)...)
	}
	switch {
	case o.ProofInterval < 0:
		return nil, bad("ProofInterval must not be negative, got %v", o.ProofInterval)
	case o.BatchWindow < 0:
		return nil, bad("BatchWindow must not be negative, got %v", o.BatchWindow)
	case o.BatchKeys < 0:
		return nil, bad("BatchKeys must not be negative, got %d", o.BatchKeys)
	case o.MaxBackoff < 0:
		return nil, bad("MaxBackoff must not be negative, got %v", o.MaxBackoff)
	}
	o.ProofInterval = cmp.Or(o.ProofInterval, 100*time.Millisecond)
	o.BatchKeys = cmp.Or(o.BatchKeys, 512)
	o.MaxBackoff = cmp.Or(o.MaxBackoff, 2*time.Second)
	if o.NodeID == ([16]byte{}) {
		// A restarted process is a new origin: its sequence starts again at
		// 1, which receivers must not read as a gap or a replay.
		_, _ = rand.Read(o.NodeID[:]) // never fails (crypto/rand.Read docs)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	o.Logger = o.Logger.With(what, name, "node", nodeID(o.NodeID).String())
	return &config{Options: o, name: name}, nil
}

// node returns the bus's NodeID, the origin of its messages.
func (c *config) node() nodeID { return nodeID(c.NodeID) }

// checkClient rejects the clients that could route a subscription, or a
// Streams read, to a different server than the publications, or to a
// replica, whose reads lag behind (a Streams proof from a replica would not
// cover that lag).
func checkClient(client redis.UniversalClient) (cluster *redis.ClusterClient, err error) {
	switch c := client.(type) {
	case nil:
		return nil, fmt.Errorf("%w: nil client", ErrInvalidOptions)
	case *redis.Ring:
		return nil, fmt.Errorf("%w: *redis.Ring is not supported: its shards can disagree about the owner of a channel", ErrInvalidOptions)
	case *redis.ClusterClient:
		if c.Options().ReadOnly || c.Options().RouteByLatency || c.Options().RouteRandomly {
			return nil, fmt.Errorf("%w: a ClusterClient that reads from replicas is not supported", ErrInvalidOptions)
		}
		return c, nil
	}
	return nil, nil
}
