package invalidate

import (
	"context"
	cryptorand "crypto/rand"
	"crypto/subtle"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/piggyback"
)

// How go-redis's PubSub reconnects, reads and routes, which the code below
// is built on, is in docs/go-redis.md ("PubSub"), with where each fact was
// read.

// PubSub is a [cache.Bus] over Redis pub/sub: the lowest latency, one
// subscribed connection per PubSub shared by every namespace, and no replay
// (a subscriber that loses its connection flushes). See the package
// documentation for the guarantees and the faults it survives.
//
// Create one PubSub per process, pass it to every [cache.Cache], and close
// it after them. It is safe for concurrent use.
type PubSub struct {
	hub     *hub
	client  redis.UniversalClient
	cluster *redis.ClusterClient // non-nil: sharded pub/sub
	channel string
	probe   string // this bus's proof channel, in channel's slot

	kick  chan struct{} // capacity 1: prove now
	send1 chan string   // capacity 1: a probe payload for the prober

	linkMu  sync.Mutex    // guards the fields below
	ps      *redis.PubSub // the current subscription; nil between connections
	probing outstanding   // the probe waiting to come back, if any
	closed  bool          // set by hangUp: open makes no new subscription
}

// outstanding is a probe published and not yet received.
type outstanding struct {
	payload string        // probeLen random bytes
	ps      *redis.PubSub // the subscription it was sent for
	sentAt  int64         // nanoseconds since hub.epoch, taken before publishing
	ok      bool          // a probe is outstanding
}

// probeLen is the length of a probe's payload, random bytes from
// crypto/rand. The proof channel is no secret (PUBSUB CHANNELS lists it),
// and whoever may PUBLISH there can try payloads: were probes predictable
// (a counter, a clock), such a client could answer a probe the node sent
// nowhere, or that went where the invalidations do not, and so make a
// node whose link is dead serve past MaxStaleness. 128 random bits cannot
// be guessed while a probe is outstanding.
const probeLen = 16

var _ cache.Bus = (*PubSub)(nil)

// NewPubSub returns a bus that publishes on, and subscribes to, one Redis
// channel through client, and starts its goroutines. It does not wait for
// Redis: subscriptions stay unproven, and their caches bypass themselves,
// until the first subscription is confirmed and proven.
//
// client may be a *redis.Client (single server or Sentinel) or a
// *redis.ClusterClient, on which the bus uses sharded pub/sub (SSUBSCRIBE
// and SPUBLISH of the channel's slot). Authentication and TLS come from the
// client. NewPubSub returns an error for which errors.Is(err,
// ErrInvalidOptions) is true for a nil client, a *redis.Ring, a
// ClusterClient that reads from replicas, a cluster channel name with a '}'
// outside a hash tag, or unusable options.
func NewPubSub(client redis.UniversalClient, opts *PubSubOptions) (*PubSub, error) {
	cluster, err := checkClient(client)
	if err != nil {
		return nil, err
	}
	cfg, err := opts.config()
	if err != nil {
		return nil, err
	}
	probe, err := probeChannel(cfg.name, cfg.node(), cluster != nil)
	if err != nil {
		return nil, err
	}
	b := &PubSub{client: client, cluster: cluster, channel: cfg.name, probe: probe,
		kick: make(chan struct{}, 1), send1: make(chan string, 1)}
	b.hub = newHub(cfg, b)
	b.hub.start()
	return b, nil
}

// probeChannel names the channel on which the bus of node proves its link.
// On a cluster it must hash to channel's slot, because one SSUBSCRIBE
// carries both (and go-redis resubscribes them together): it shares
// channel's hash tag, or makes channel its hash tag.
func probeChannel(channel string, node nodeID, cluster bool) (string, error) {
	suffix := ":proof:" + node.String()
	if !cluster {
		return channel + suffix, nil
	}
	if i := strings.IndexByte(channel, '{'); i >= 0 {
		if j := strings.IndexByte(channel[i+1:], '}'); j > 0 {
			return channel + suffix, nil // a hash tag: it decides the slot
		}
	}
	if strings.IndexByte(channel, '}') >= 0 {
		return "", fmt.Errorf("%w: on Redis Cluster, Channel %q must not contain '}' outside a hash tag", ErrInvalidOptions, channel)
	}
	return "{" + channel + "}" + suffix, nil
}

// Subscribe registers h for the invalidations of namespace published by
// other nodes and by the other subscriptions of this PubSub, for a cache
// whose staleness bound is maxStaleness; the bus keeps the smallest bound
// of its subscriptions (see [PubSubOptions.ProofInterval]). The returned
// Subscription reports no proof until the bus has proven its link after
// this call. Subscribe returns ErrClosed after Close, and an error for
// which errors.Is(err, cache.ErrInvalidOptions) is true for a maxStaleness
// not longer than ProofInterval.
func (b *PubSub) Subscribe(namespace string, h cache.Handler, maxStaleness time.Duration) (cache.Subscription, error) {
	return b.hub.subscribe(namespace, h, maxStaleness)
}

// Publish announces that keys of namespace changed to every node, this one
// included: it delivers them to this bus's subscriptions of namespace
// before it sends them, then waits for them to be sent. An empty keys
// flushes the namespace everywhere. It is for publishers that are not a
// cache, such as the outbox relay of package store; a cache publishes
// through its [cache.Subscription]. ctx bounds the wait. Publish returns
// the error of sending, ctx.Err(), an error for which errors.Is(err,
// cache.ErrInvalidKey) is true for an empty or too long key, or ErrClosed.
//
// If ctx carries a lock's release (lockguard's Lock.ReleaseOnPublish) of a
// lock guard on this bus's own *redis.Client, the bus sends the release
// in the same pipeline as the publication, right after it; so does a
// cache's publication through its Subscription.
func (b *PubSub) Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error {
	return b.hub.publish(ctx, nil, namespace, keys)
}

// Stats returns a snapshot of the counters.
func (b *PubSub) Stats() Stats { return b.hub.stats.snapshot() }

// Proven reports whether the bus's link was proven within its staleness
// bound and has not been detected lost since: whether a cache on this bus
// with the smallest MaxStaleness of its subscriptions serves cached values
// now. Without a subscription the bound is 1s, or ten ProofIntervals if
// that is longer. Proven is false before the first proof, from the moment
// the bus notices a failed connection, a server-side unsubscribe or a
// probe that did not come back until the next proof, once the bound has
// passed since the last proof (a silent link), and after Close. A
// publisher that must not act on an unproven link, such as package store's
// outbox relay (DESIGN race 17), checks it; so can a health check. It is
// cheap: three atomic loads and a clock read.
func (b *PubSub) Proven() bool { return b.hub.proven() }

// Close stops every goroutine of the bus and waits for them, closes its
// subscribed connection (not the client) and fails pending and later
// publications with ErrClosed. A publication or probe in progress is
// waited for; the client's timeouts bound it. Subscriptions report no
// proof afterwards. Close is safe to call more than once and always
// returns nil.
func (b *PubSub) Close() error {
	b.hub.close()
	return nil
}

// The bus publishes through these scripts, never with a bare PUBLISH or
// SPUBLISH. A script that starts with #!lua and declares no flags may
// write (Redis 7), so only a master runs it; a replica refuses it, and the
// client retries at the master. A bare SPUBLISH would be accepted by a
// replica and delivered only to its own subscribers, ahead of what the
// master relays (docs/go-redis.md, "Redis"): a node whose client still
// routes the slot to a former master would prove its own link with probes
// that overtake everybody else's invalidations. Through the scripts every
// invalidation and every probe is ordered by the one master, which relays
// them, in that order, to subscriptions on its replicas too. KEYS[1] is
// the channel; on a cluster it must be declared for the script to run in
// its slot.
var (
	publishScript = redis.NewScript(`#!lua
for i = 1, #ARGV do redis.call('PUBLISH', KEYS[1], ARGV[i]) end
return #ARGV
`)
	spublishScript = redis.NewScript(`#!lua
for i = 1, #ARGV do redis.call('SPUBLISH', KEYS[1], ARGV[i]) end
return #ARGV
`)
)

// runScript publishes payloads on channel, in order, in one script call.
func (b *PubSub) runScript(ctx context.Context, channel string, payloads ...any) error {
	script := publishScript
	if b.cluster != nil {
		script = spublishScript
	}
	return script.Run(ctx, b.client, []string{channel}, payloads...).Err()
}

// scriptBytes bounds the payload of one script call, so that a huge round
// neither exceeds Redis's limits nor holds its event loop for long.
const scriptBytes = 4 * MaxMessageSize

// send implements transport: it publishes a round's messages, in order, in
// one script call, or a few in a row for a large round. On a single server
// (not a cluster), riders whose client is the bus's own go in the
// pipeline of the last call, after it: one round trip for both.
//
// Publication first, riders after: Redis runs a pipeline's commands in
// order, so a lock released this way is free only once the invalidation of
// the write it guarded has been published, as with two round trips in a
// row; the next holder's invalidations follow it on the channel. Should
// Redis answer NOSCRIPT to the publication (it lost its scripts), the
// riders have run before it, and the publication follows one round trip
// later: the release then precedes the invalidation, which costs nothing
// either. The writer returns only after both; an invalidation is
// idempotent and the caches order values by version (DESIGN race 7),
// whatever order two writers' messages arrive in; and the fence in
// Postgres, not the lock, decides which writer commits (race 6).
func (b *PubSub) send(ctx context.Context, msgs [][]byte, riders []*piggyback.Rider) error {
	payloads := make([]any, 0, len(msgs))
	size := 0
	for i, m := range msgs {
		payloads = append(payloads, m)
		size += len(m)
		if i == len(msgs)-1 || size+len(msgs[i+1]) > scriptBytes {
			var err error
			if i == len(msgs)-1 && len(riders) > 0 && b.cluster == nil {
				err = b.runScriptWith(ctx, b.channel, payloads, riders)
			} else {
				err = b.runScript(ctx, b.channel, payloads...)
			}
			if err != nil {
				return err
			}
			payloads, size = payloads[:0], 0
		}
	}
	return nil
}

// runScriptWith is runScript in a pipeline with the riders it can board
// after it.
func (b *PubSub) runScriptWith(ctx context.Context, channel string, payloads []any, riders []*piggyback.Rider) error {
	pipe := b.client.Pipeline()
	keys := []string{channel}
	pub := publishScript.EvalSha(ctx, pipe, keys, payloads...)
	finish := piggyback.BoardAll(ctx, riders, b.client, pipe)
	if finish == nil {
		pipe.Discard()
		return b.runScript(ctx, channel, payloads...)
	}
	_, _ = pipe.Exec(ctx) // each command carries its own error
	err := pub.Err()
	if err != nil && redis.HasErrorPrefix(err, "NOSCRIPT") {
		err = b.runScript(ctx, channel, payloads...)
	}
	finish()
	return err
}

// run implements transport: it runs the reader, the proof goroutine and
// the prober until ctx ends, then hangs up the subscription, which ends
// the reader's Receive (no context does), and waits for them.
func (b *PubSub) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { b.readLoop(ctx) })
	wg.Go(func() { b.proofLoop(ctx) })
	wg.Go(func() { b.probeLoop(ctx) })
	<-ctx.Done()
	b.hangUp()
	wg.Wait()
}

// hangUp closes the current subscription, and keeps open from making
// another.
func (b *PubSub) hangUp() {
	b.linkMu.Lock()
	b.closed = true
	ps := b.ps
	b.linkMu.Unlock()
	if ps != nil {
		_ = ps.Close()
	}
}

// readLoop is the reader goroutine: it subscribes, receives until the
// connection fails, and starts again after a backoff, until ctx ends.
func (b *PubSub) readLoop(ctx context.Context) {
	var (
		confirmed bool // the bus's first subscription has been confirmed
		attempt   int  // failed connections since the last confirmation
	)
	for {
		ps, err := b.open(ctx)
		if err == nil {
			err = b.receiveLoop(ctx, ps, &confirmed, &attempt)
		}
		if ctx.Err() == nil {
			// The link failed, or never came up: end the proof now.
			// Until this node subscribes again, whatever the others
			// publish goes past it.
			b.hub.linkLost()
		}
		if ps != nil {
			_ = ps.Close()
		}
		if ctx.Err() != nil {
			return
		}
		if b.cluster != nil {
			// The subscription is routed by the client's slot map, which
			// neither a sunsubscribe nor a MOVED reply to SSUBSCRIBE
			// refreshes: without this the bus would subscribe at the old
			// owner again and again. The reload is asynchronous; the
			// backoff below usually gives it time.
			b.cluster.ReloadState(ctx)
		}
		if !b.hub.retry(ctx, attempt, "subscription lost", err) {
			return
		}
		attempt++
	}
}

// open makes a new subscription to the channel and the probe channel, and
// publishes it for the proof goroutine.
func (b *PubSub) open(ctx context.Context) (*redis.PubSub, error) {
	var ps *redis.PubSub
	var err error
	if b.cluster != nil {
		ps = b.cluster.SSubscribe(ctx)
		err = ps.SSubscribe(ctx, b.channel, b.probe)
	} else {
		ps = b.client.Subscribe(ctx)
		err = ps.Subscribe(ctx, b.channel, b.probe)
	}
	if err != nil {
		_ = ps.Close()
		return nil, err
	}
	b.linkMu.Lock()
	if b.closed {
		b.linkMu.Unlock()
		_ = ps.Close()
		return nil, ErrClosed
	}
	b.ps = ps
	b.probing = outstanding{}
	b.linkMu.Unlock()
	return ps, nil
}

// receiveLoop reads ps until it fails and returns the error. It applies
// every message before reading the next, so a probe is processed after
// every message the server delivered before it.
func (b *PubSub) receiveLoop(ctx context.Context, ps *redis.PubSub, confirmed *bool, attempt *int) error {
	defer func() {
		b.linkMu.Lock()
		if b.ps == ps {
			b.ps, b.probing = nil, outstanding{}
		}
		b.linkMu.Unlock()
	}()
	for {
		msg, err := ps.Receive(ctx)
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *redis.Message:
			switch m.Channel {
			case b.channel:
				b.hub.receive(m.Payload)
			case b.probe:
				b.probed(ps, m.Payload)
			}
		case *redis.Subscription:
			if m.Channel != b.channel && m.Channel != b.probe {
				continue
			}
			switch m.Kind {
			case "subscribe", "ssubscribe":
				if m.Channel != b.channel {
					continue
				}
				// Whatever was published between the loss of the previous
				// connection and this confirmation is lost (race 4); at
				// the first confirmation, whatever was published before
				// it, which may overwrite a value a cache installed by a
				// local write before the bus was listening (race 19). The
				// flush comes after the SUBSCRIBE took effect: a load that
				// starts after it reads a source that already holds every
				// write whose invalidation was lost, and a write-through
				// that began before it is not installed (the cache's guard
				// sees the flush).
				if *confirmed {
					b.hub.flushAll(causeResubscribe)
				} else {
					b.hub.flushAll(causeFirstSubscription)
				}
				*confirmed = true
				*attempt = 0
				// A probe published before this subscription may never
				// come back; forget it and prove the new one at once.
				b.linkMu.Lock()
				b.probing = outstanding{}
				b.linkMu.Unlock()
				b.kickProof()
			default: // unsubscribe, sunsubscribe: we never ask for those
				return fmt.Errorf("%w (%s %s)", errUnsubscribed, m.Kind, m.Channel)
			}
		}
	}
}

// probed handles a message that ps received on the probe channel: if it is
// the outstanding probe, every invalidation published before the probe
// was sent has been applied.
//
// Nothing else proves the link: a message on the probe channel counts only
// if it is, byte for byte, the probe that is outstanding, and only on the
// subscription it was sent for. Anybody may publish on the channel, and
// see the probes that pass (SUBSCRIBE); a probe seen earlier is spent, as
// the first copy to arrive clears it, and one sent before a
// resubscription is forgotten with it (open, receiveLoop), so a replay
// proves nothing either.
func (b *PubSub) probed(ps *redis.PubSub, payload string) {
	b.linkMu.Lock()
	p := b.probing
	match := p.ok && p.ps == ps && len(payload) == probeLen &&
		subtle.ConstantTimeCompare([]byte(p.payload), []byte(payload)) == 1
	if match {
		b.probing = outstanding{}
	}
	b.linkMu.Unlock()
	if match {
		b.hub.prove(p.sentAt, true)
	}
}

func (b *PubSub) kickProof() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// proofLoop is the proof goroutine. Every ProofInterval, unless a probe is
// outstanding, it has the prober publish a new one: probeLen random bytes
// on this bus's probe channel, through the master that orders every
// invalidation (see publishScript). The master relays it to the
// subscription after every invalidation it handled before, so when it
// comes back, every invalidation published before it was sent has been
// delivered (race 5). A PING would only show that the subscribed server
// is alive, not that it is the one the invalidations go through.
//
// A probe that has not come back within the bus's staleness bound (the
// smallest MaxStaleness of its subscriptions) means the link is dead
// or goes to the wrong place, although TCP may not know it yet: proofLoop
// closes the subscription, and the reader subscribes again (maybe
// elsewhere) and flushes.
func (b *PubSub) proofLoop(ctx context.Context) {
	t := time.NewTicker(b.hub.cfg.ProofInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-b.kick:
		}
		now := b.hub.now()
		b.linkMu.Lock()
		ps, p := b.ps, b.probing
		if ps == nil {
			b.linkMu.Unlock()
			continue
		}
		if p.ok {
			if now-p.sentAt <= int64(b.hub.maxStaleness()) {
				b.linkMu.Unlock()
				continue
			}
			b.ps, b.probing = nil, outstanding{}
			b.linkMu.Unlock()
			b.hub.stats.proofTimeouts.Add(1)
			b.hub.log.Warn("invalidate: no proof within the staleness bound; reconnecting", "waited", time.Duration(now-p.sentAt))
			_ = ps.Close()
			continue
		}
		var nonce [probeLen]byte
		_, _ = cryptorand.Read(nonce[:]) // never fails (crypto/rand.Read docs)
		payload := string(nonce[:])
		b.probing = outstanding{payload: payload, ps: ps, sentAt: now, ok: true}
		b.linkMu.Unlock()
		select {
		case b.send1 <- payload:
		default: // the prober is stuck on the previous probe; this one times out
		}
	}
}

// probeLoop is the prober goroutine: it publishes the probes proofLoop
// hands it. It is separate so that a publication stuck on a stalled link
// (for up to the client's timeouts) does not hold up proofLoop's timeout.
func (b *PubSub) probeLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case payload := <-b.send1:
			if err := b.runScript(ctx, b.probe, payload); err != nil && ctx.Err() == nil {
				b.hub.log.Debug("invalidate: publishing a probe failed", "err", err)
			}
		}
	}
}
