package invalidate

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/backoff"
	"github.com/coherentcache/coherent/internal/piggyback"
)

// transport is what a Redis bus does through Redis; the hub does the rest.
// PubSub and Streams implement it.
type transport interface {
	// send sends one round of messages, in order, and returns once Redis
	// has acknowledged them. It may send riders after them, in the same
	// pipeline (see package piggyback), boarding each, and must then finish
	// them before it returns; those it does not board stay with their
	// owners. It runs on the batcher goroutine only.
	send(ctx context.Context, msgs [][]byte, riders []*piggyback.Rider) error
	// run is the reader: it receives what the other nodes publish and
	// hands it to the hub (receive, reject), proves the link (prove) and
	// reports its losses (linkLost, retry) until ctx ends. It returns once
	// every goroutine it started has returned and it has released what it
	// holds.
	run(ctx context.Context)
}

// hub is the core of a Redis bus, whatever its transport: the local
// subscriptions and delivery to them, the check of each origin's
// sequence, the proof, the batching of publications, the counters, and the
// lifecycle of the goroutines. PubSub and Streams each own one, and the
// transport they implement feeds it what their reader receives.
type hub struct {
	cfg   *config
	log   *slog.Logger
	epoch time.Time // origin of the int64 times below
	stats counters
	t     transport

	stop      context.CancelFunc // ends the goroutines' context; set by start
	wg        sync.WaitGroup     // the batcher and the transport's run
	closeOnce sync.Once

	mu     sync.RWMutex
	subs   map[string][]*subscription // namespace → subscriptions; guarded by mu, copied on write
	closed atomic.Bool

	// bound is the staleness bound the bus keeps, in nanoseconds: the
	// smallest MaxStaleness of the subscriptions, or defaultBound without
	// one. It is set under mu whenever subs changes.
	bound atomic.Int64

	// proof is the time of the last proof in nanoseconds since epoch, or
	// noProof while the link is unproven: before the first proof, and from
	// the moment the reader detects that the link failed until the next
	// proof. Only the reader goroutine stores it, and close after the
	// reader has stopped.
	proof atomic.Int64

	// The fields below belong to the reader goroutine.
	lastProof         int64 // the last proof, kept across losses of the link; noProof before the first
	origins           originTable
	flushedSinceProof bool // a flushAll happened after the last proof
	malformedLog      limiter
	gapLog            limiter

	// Flushes that received messages called for, done at the next proof
	// (see distrust): dueAll is the cause of a flush of every subscription
	// (noCause if none is due), dueSubs the subscriptions whose namespace
	// a publisher asked to flush (each has flushDue set), and lastDue the
	// time the last of them were done (noProof before the first).
	dueAll  cause
	dueSubs []*subscription
	lastDue int64

	batch *batcher
	seq   uint64 // last sequence number sent; belongs to the batcher goroutine
	buf   []byte // encoding buffer; belongs to the batcher goroutine
}

const noProof = math.MinInt64

// newHub returns the core of a bus that sends and reads through t. It
// starts nothing; see start.
func newHub(cfg *config, t transport) *hub {
	h := &hub{cfg: cfg, log: cfg.Logger, t: t, subs: make(map[string][]*subscription)}
	h.epoch = h.clockNow()
	h.proof.Store(noProof)
	h.bound.Store(int64(h.defaultBound()))
	h.lastProof, h.lastDue, h.dueAll = noProof, noProof, noCause
	h.batch = newBatcher(cfg.BatchWindow, cfg.BatchKeys, h.sendBatches)
	return h
}

// start starts the batcher and the transport's reader, which run until
// close.
func (h *hub) start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	h.wg.Go(func() { h.batch.run(ctx) })
	h.wg.Go(func() { h.t.run(ctx) })
}

// close stops the goroutines and waits for them, then stops publication
// and delivery and ends the proof of every subscription still open (their
// caches outlive the bus) at once, not MaxStaleness after the last one.
// It is safe to call more than once.
func (h *hub) close() {
	h.closeOnce.Do(func() {
		h.stop()
		h.wg.Wait()
		h.mu.Lock()
		h.closed.Store(true)
		h.mu.Unlock()
		h.unprove()
	})
}

// retry records that the link failed, for the reason err, and waits the
// backoff before attempt (from 0) to recover it. It reports false if ctx
// ended first. It runs on the reader goroutine only.
func (h *hub) retry(ctx context.Context, attempt int, what string, err error) bool {
	h.stats.reconnects.Add(1)
	d := backoff.Policy{Min: 10 * time.Millisecond, Max: h.cfg.MaxBackoff}.Wait(attempt)
	h.log.Warn("invalidate: "+what+"; retrying", "err", err, "after", d)
	return backoff.Sleep(ctx, d)
}

func (h *hub) clockNow() time.Time {
	if h.cfg.Clock != nil {
		return h.cfg.Clock.Now()
	}
	return time.Now()
}

// now returns the current time in nanoseconds since h.epoch.
func (h *hub) now() int64 { return int64(h.clockNow().Sub(h.epoch)) }

// defaultBound is the staleness bound of a bus without a subscription (a
// process that only publishes, such as package store's relay): the
// caches' default MaxStaleness, or ten proof intervals if that is longer,
// so that a bus with a long ProofInterval does not time its own probes
// out.
func (h *hub) defaultBound() time.Duration {
	return max(time.Second, 10*h.cfg.ProofInterval)
}

// maxStaleness returns the staleness bound the bus keeps: how long a probe
// or read may take before the bus gives up on the link, and how long after
// a proof Proven holds.
func (h *hub) maxStaleness() time.Duration { return time.Duration(h.bound.Load()) }

// setBound recomputes bound from subs. The caller holds mu.
func (h *hub) setBound() {
	b := time.Duration(math.MaxInt64)
	for _, subs := range h.subs {
		for _, s := range subs {
			b = min(b, s.maxStaleness)
		}
	}
	if len(h.subs) == 0 {
		b = h.defaultBound()
	}
	h.bound.Store(int64(b))
}

// subscribe registers handler for namespace, with its cache's staleness
// bound: [cache.Bus.Subscribe].
func (h *hub) subscribe(namespace string, handler cache.Handler, maxStaleness time.Duration) (cache.Subscription, error) {
	if handler == nil {
		return nil, errNilHandler
	}
	if !validLen(len(namespace)) {
		return nil, fmt.Errorf("invalidate: namespace length %d not in [1, %d]", len(namespace), cache.MaxKeyLen)
	}
	if maxStaleness <= h.cfg.ProofInterval {
		// A proof takes a probe's or a read's round trip after it was
		// sent, and one is sent every ProofInterval: with a bound no
		// longer than that, the link would go unproven between proofs.
		return nil, fmt.Errorf("%w: MaxStaleness (%v) must be longer than the bus's ProofInterval (%v)", cache.ErrInvalidOptions, maxStaleness, h.cfg.ProofInterval)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed.Load() {
		return nil, ErrClosed
	}
	// since is read under the lock that every delivery snapshot takes, so a
	// message delivered before the registration was received before since,
	// and only proofs sent at or after since count for this subscription:
	// it is not proven before the bus has shown, once it existed, that the
	// link is live and in order (race 12).
	s := &subscription{hub: h, namespace: namespace, h: handler, maxStaleness: maxStaleness, since: h.now()}
	h.subs[namespace] = append(slices.Clone(h.subs[namespace]), s)
	h.setBound()
	return s, nil
}

func (h *hub) unsubscribe(s *subscription) {
	h.mu.Lock()
	defer h.mu.Unlock()
	subs := slices.DeleteFunc(slices.Clone(h.subs[s.namespace]), func(o *subscription) bool { return o == s })
	if len(subs) == 0 {
		delete(h.subs, s.namespace)
	} else {
		h.subs[s.namespace] = subs
	}
	h.setBound()
}

// peers returns the subscriptions of namespace.
func (h *hub) peers(namespace string) []*subscription {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.subs[namespace]
}

// publish delivers keys to the local subscriptions of namespace but from
// (nil for a publisher that is not a subscription), then sends them to the
// other nodes and waits for the batch holding them to be sent.
func (h *hub) publish(ctx context.Context, from *subscription, namespace string, keys []cache.Invalidation) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if (from != nil && from.closed.Load()) || h.closed.Load() {
		return ErrClosed
	}
	if !validLen(len(namespace)) {
		return fmt.Errorf("invalidate: namespace length %d not in [1, %d]", len(namespace), cache.MaxKeyLen)
	}
	for i, k := range keys {
		if !validLen(len(k.Key)) {
			return fmt.Errorf("invalidate: key %d: %w: length %d not in [1, %d]", i, cache.ErrInvalidKey, len(k.Key), cache.MaxKeyLen)
		}
	}
	// Echoes of our own messages are ignored, so a second cache of the
	// namespace in this process hears of the change here, before Publish
	// returns, like the publisher itself.
	for _, s := range h.peers(namespace) {
		if s != from {
			s.deliver(keys, len(keys) == 0)
		}
	}
	return h.batch.publish(ctx, namespace, keys, piggyback.From(ctx))
}

// sendBatches encodes batches into messages and has the transport send
// them, in order. It runs on the batcher goroutine only.
func (h *hub) sendBatches(ctx context.Context, batches []*nsBatch, riders []*piggyback.Rider) error {
	buf := h.buf[:0]
	var ends []int
	var nkeys int
	for _, b := range batches {
		if b.flush {
			h.seq++
			buf = appendMessage(buf, &message{namespace: b.namespace, origin: h.cfg.node(), seq: h.seq, flush: true})
			ends = append(ends, len(buf))
			continue
		}
		nkeys += len(b.keys)
		for keys := b.keys; len(keys) > 0; {
			h.seq++
			// Take keys while the message stays within BatchKeys and
			// MaxMessageSize. The header is sized for the largest count.
			size := headerSize(b.namespace, h.seq, h.cfg.BatchKeys)
			n := 0
			for n < len(keys) && n < h.cfg.BatchKeys && size+keySize(keys[n]) <= MaxMessageSize {
				size += keySize(keys[n])
				n++
			}
			buf = appendMessage(buf, &message{namespace: b.namespace, origin: h.cfg.node(), seq: h.seq, keys: keys[:n]})
			ends = append(ends, len(buf))
			keys = keys[n:]
		}
	}
	msgs := make([][]byte, len(ends))
	start := 0
	for i, end := range ends {
		msgs[i] = buf[start:end:end]
		start = end
	}
	err := h.t.send(ctx, msgs, riders)
	if cap(buf) <= 4*MaxMessageSize {
		h.buf = buf
	}
	if err != nil {
		h.stats.publishErrors.Add(1)
		return fmt.Errorf("invalidate: publish: %w", err)
	}
	h.stats.messagesSent.Add(uint64(len(msgs)))
	h.stats.keysSent.Add(uint64(nkeys))
	return nil
}

// receive decodes and delivers one message. It runs on the reader goroutine
// only.
func (h *hub) receive(payload string) {
	m, err := decode(payload)
	if err != nil {
		h.reject(err, len(payload))
		return
	}
	if m.origin == h.cfg.node() {
		return // our own echo: applied locally before it was published
	}
	h.stats.messagesReceived.Add(1)
	h.stats.keysReceived.Add(uint64(len(m.keys)))
	if h.origins.gap(m.origin, m.seq) {
		// A message of that origin went missing, and with it the name of
		// its namespace: flush everything, which covers this message too.
		if n, ok := h.gapLog.allow(h.now()); ok {
			h.log.Warn("invalidate: sequence gap; flushing before the next proof", "origin", m.origin, "seq", m.seq, "suppressed", n)
		}
		h.distrust(causeGap)
		return
	}
	if m.flush {
		h.requestFlush(m.namespace)
		return
	}
	for _, s := range h.peers(m.namespace) {
		s.deliver(m.keys, false)
	}
}

// reject handles a message of size bytes that cannot be read, for the
// reason err: whatever it said is lost, so everything is suspect. It runs
// on the reader goroutine only.
func (h *hub) reject(err error, size int) {
	h.stats.messagesMalformed.Add(1)
	if n, ok := h.malformedLog.allow(h.now()); ok {
		h.log.Warn("invalidate: unreadable message; flushing before the next proof", "err", err, "bytes", size, "suppressed", n)
	}
	h.distrust(causeMalformed)
}

// distrust answers a message that calls for a flush of every subscription,
// one this node cannot read or one that shows that an earlier message went
// missing, with a flush that is due rather than done: the link is unproven
// at once (no ProofAge reports a proof, then every Handler is told,
// LinkLost), and the flush is done at the next proof, before it is
// recorded (prove), for every such message received in between. So a
// flood of them costs reads through to the source while it lasts and one
// flush per proof, where a flush per message, each the work of every cache
// on the node, could keep the reader from reading its own probes.
//
// No flush that correctness needs is lost by the delay. Between the
// message and the flush a cache serves nothing it holds: it asks
// ProofAge before it serves, and LinkLost has revoked the proof it had
// cached. What it may store meanwhile (a load that began before the
// message and finds its guard token unchanged, since the message's
// invalidations were never applied; a value written through by this
// node) may be stale, but the flush drops it, and bumps every guard so
// that a load still running then stores nothing, before the proof that
// would let the cache serve again. Invalidations received in between are
// delivered as usual, and the flush covers them too. A flush for another
// cause in between (a resubscription, a lost stream position) covers the
// message as well, since it comes after it.
//
// It runs on the reader goroutine only.
func (h *hub) distrust(c cause) {
	if h.dueAll != noCause {
		// Due already, and the link unproven since: one flush covers both.
		h.stats.flushesCoalesced.Add(1)
		return
	}
	h.dueAll = c
	h.unprove()
}

// requestFlush answers a namespace flush published by another node as
// distrust does, for the subscriptions of that namespace only: each
// reports no proof, and is told (LinkLost), until its flush is done at the
// next proof. Anyone who may publish on the channel can send these as
// fast as junk. It runs on the reader goroutine only.
func (h *hub) requestFlush(namespace string) {
	h.stats.flushesRequested.Add(1)
	marked, due := false, false
	for _, s := range h.peers(namespace) {
		if h.dueAll != noCause || s.flushDue.Load() {
			due = true // flushed with the flush already due
			continue
		}
		// The flag first, then LinkLost, as in unprove: a cache that asks
		// ProofAge after its revocation gets no proof back.
		s.flushDue.Store(true)
		h.dueSubs = append(h.dueSubs, s)
		s.linkLost()
		marked = true
	}
	if due && !marked {
		h.stats.flushesCoalesced.Add(1)
	}
}

// settleDue does the flushes that are due, unless the last were done less
// than half a ProofInterval ago, and reports whether a proof may be
// recorded now: not while a flush of every subscription stays due. The
// limit bounds a flood to about two flushes per ProofInterval even where
// proofs come faster (a Streams reader proves with every read that
// catches up). It runs on the reader goroutine only.
func (h *hub) settleDue() bool {
	if h.dueAll == noCause && len(h.dueSubs) == 0 {
		return true
	}
	now := h.now()
	if h.lastDue != noProof && now-h.lastDue < int64(h.cfg.ProofInterval/2) {
		return h.dueAll == noCause
	}
	h.lastDue = now
	if c := h.dueAll; c != noCause {
		h.dueAll = noCause
		h.flushAll(c) // clears dueSubs
		return true
	}
	for _, s := range h.dueSubs {
		s.deliver(nil, true)
		s.flushDue.Store(false) // after the flush, which ProofAge waits for
	}
	clear(h.dueSubs)
	h.dueSubs = h.dueSubs[:0]
	return true
}

// all returns every local subscription.
func (h *hub) all() []*subscription {
	h.mu.RLock()
	defer h.mu.RUnlock()
	var all []*subscription
	for _, subs := range h.subs {
		all = append(all, subs...)
	}
	return all
}

// flushAll flushes every local subscription, which covers the flushes
// that are due. It runs on the reader goroutine only.
func (h *hub) flushAll(c cause) {
	h.stats.flushes[c].Add(1)
	h.flushedSinceProof = true
	if h.dueAll != noCause {
		h.dueAll = noCause
		h.stats.flushesCoalesced.Add(1)
	}
	if c == causeResubscribe || c == causeTrimmed || c == causeFirstSubscription {
		// Every origin may have lost messages: restart their sequences
		// here instead of flushing again at the next message of each.
		h.origins.reset()
	}
	switch c {
	case causeMalformed: // logged by receive, rate-limited
	case causeFirstSubscription: // every start: not worth a warning
		h.log.Debug("invalidate: flushing every namespace", "cause", c.String())
	default:
		h.log.Warn("invalidate: flushing every namespace", "cause", c.String())
	}
	for _, s := range h.all() {
		s.deliver(nil, true)
	}
	if len(h.dueSubs) > 0 {
		for _, s := range h.dueSubs {
			s.flushDue.Store(false) // flushed above, or closed
		}
		clear(h.dueSubs)
		h.dueSubs = h.dueSubs[:0]
		h.stats.flushesCoalesced.Add(1)
	}
}

// linkLost records that the reader detected a failure of the link: a
// connection error, a probe that did not come back, a server-side
// unsubscribe, a read or position check that failed, a position the
// stream no longer holds. Invalidations may be going past this node from
// now on, so the bus no longer vouches for what its subscriptions' caches
// hold: first no ProofAge reports a proof, until the next proof, then
// every Handler is told (LinkLost), so that its cache stops serving at
// once rather than when MaxStaleness has run out since the last proof. In
// that order: a cache that asked ProofAge after its revocation would
// otherwise be given the old proof back. linkLost does not flush: Streams
// resumes from its position, and PubSub flushes when it subscribes again.
// It runs on the reader goroutine only.
func (h *hub) linkLost() {
	if h.unprove() {
		h.stats.linksLost.Add(1)
	}
}

// unprove makes ProofAge report no proof, then tells every Handler
// (LinkLost), and reports whether the link was proven. If it was not,
// every Handler was told when it last became unproven, or has never been
// proven: a cache extends its proof only from a ProofAge that reports
// one, which takes a proof after this.
func (h *hub) unprove() bool {
	if h.proof.Swap(noProof) == noProof {
		return false
	}
	for _, s := range h.all() {
		s.linkLost()
	}
	return true
}

// prove records that everything published before sentAt (nanoseconds since
// epoch) has been delivered. The flushes that are due are done first (see
// distrust and settleDue), and while a flush of every subscription stays
// due the proof is not recorded. With lateFlush, a proof that comes more
// than the staleness bound after the previous one flushes first: the
// caches have been bypassing themselves, and the bus does not vouch for
// what they cached before the silence. prove runs on the reader goroutine
// only.
func (h *hub) prove(sentAt int64, lateFlush bool) {
	if !h.settleDue() {
		return
	}
	last := h.lastProof
	if lateFlush && last != noProof && sentAt-last > int64(h.maxStaleness()) && !h.flushedSinceProof {
		h.flushAll(causeProofTimeout)
	}
	if sentAt > last {
		last, h.lastProof = sentAt, sentAt
	}
	// After a loss of the link, proof is noProof: this proof restores it.
	h.proof.Store(last)
	h.flushedSinceProof = false
	h.stats.proofs.Add(1)
}

// proven reports whether the link was proven within the bus's staleness
// bound and has not been detected lost since: whether a cache on this bus
// with the smallest MaxStaleness of its subscriptions would serve cached
// values now.
func (h *hub) proven() bool {
	p := h.proof.Load()
	return p != noProof && !h.closed.Load() && h.now()-p < int64(h.maxStaleness())
}

// subscription is one local Handler's link to a hub.
type subscription struct {
	hub          *hub
	namespace    string
	h            cache.Handler
	maxStaleness time.Duration // its cache's; see hub.bound
	since        int64         // registration time, nanoseconds since hub.epoch

	mu        sync.RWMutex // held for reading while delivering to h, for writing by Close
	closed    atomic.Bool  // set under mu
	broken    atomic.Bool  // a Flush of h panicked and none succeeded since
	flushDue  atomic.Bool  // a requested flush waits for the next proof; see hub.requestFlush
	closeOnce sync.Once
}

var _ cache.Subscription = (*subscription)(nil)

// Publish implements [cache.Subscription].
func (s *subscription) Publish(ctx context.Context, keys []cache.Invalidation) error {
	return s.hub.publish(ctx, s, s.namespace, keys)
}

// ProofAge implements [cache.Subscription]: the time since the last proof
// was sent, by the bus's clock. It reports no proof until the bus has
// proven its link after this subscription was made, from the moment the
// bus detects a failure of its link until it proves it again, from a
// message that calls for a flush until that flush is done, after the bus
// or the subscription was closed, and while the Handler is broken (its
// Flush panicked).
func (s *subscription) ProofAge() (time.Duration, bool) {
	p := s.hub.proof.Load()
	if p == noProof || p < s.since || s.broken.Load() || s.flushDue.Load() || s.closed.Load() || s.hub.closed.Load() {
		return 0, false
	}
	return time.Duration(max(s.hub.now()-p, 0)), true
}

// Close implements [cache.Subscription]. After it returns, the Handler
// receives nothing more. It must not be called from the Handler.
func (s *subscription) Close() error {
	s.closeOnce.Do(func() {
		s.hub.unsubscribe(s)
		s.mu.Lock() // waits for deliveries in progress
		s.closed.Store(true)
		s.mu.Unlock()
	})
	return nil
}

// deliver hands keys, or a flush, to the Handler. Whatever goes wrong in
// the Handler ends in a flush, never in a skipped key (race 14).
func (s *subscription) deliver(keys []cache.Invalidation, flush bool) {
	if flush {
		s.call("flushing", s.flush) // flush recovers by itself
		return
	}
	s.call("applying an invalidation", func() { s.h.Invalidate(keys) })
}

// linkLost tells the Handler that the link failed; see hub.linkLost. A
// Handler that panics is flushed instead: its cache may then serve until
// MaxStaleness after the last proof, but nothing cached before the loss.
func (s *subscription) linkLost() { s.call("on a lost link", s.h.LinkLost) }

// call runs fn, a call of the Handler, unless the subscription is closed;
// Close waits for it. A panic in fn is counted and logged, and the Handler
// flushed.
func (s *subscription) call(during string, fn func()) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed.Load() {
		return
	}
	defer func() {
		if r := recover(); r != nil {
			s.hub.stats.handlerPanics.Add(1)
			s.hub.log.Error("invalidate: handler panicked "+during+"; flushing it", "namespace", s.namespace, "panic", r)
			s.flush()
		}
	}()
	fn()
}

// flush flushes the Handler. If Flush panics, the subscription reports no
// proof until a later Flush succeeds: its cache bypasses itself rather than
// serve entries the bus can no longer vouch for.
func (s *subscription) flush() {
	defer func() {
		if r := recover(); r != nil {
			s.hub.stats.handlerPanics.Add(1)
			s.broken.Store(true)
			s.hub.log.Error("invalidate: handler panicked flushing; it stays unproven", "namespace", s.namespace, "panic", r)
		}
	}()
	s.h.Flush()
	s.broken.Store(false)
}

// originTable remembers the last sequence number of each origin heard from.
// It belongs to the reader goroutine.
//
// It is bounded, and every operation is O(1): a client that may PUBLISH
// can make up a new origin for every message, and neither the table's
// memory nor the cost of a message may grow with the number it has made
// up. So that such a flood cannot push the real nodes out, the table has
// two parts, each an LRU: probation, for origins heard from once or whose
// last message did not follow the one before, and protected, for origins
// whose last message followed its predecessor. A new origin enters
// probation, evicting the origin of probation heard from least recently;
// its next message in sequence moves it to protected, whose least recent
// origin moves back to probation to make room. A made-up origin sent once
// never leaves probation, so real nodes, whose messages follow each other,
// stay in protected however many of those come by. (A client that sends
// two messages in sequence for each of more than maxProtected made-up
// origins can push a quiet real origin out; that costs what forgetting
// costs, below.)
//
// Forgetting is safe: the next message of a forgotten origin only sets a
// new baseline, so at worst a gap in that origin's sequence goes
// unnoticed. A subscriber never loses a message without losing its
// connection (Redis pub/sub on one TCP connection neither drops nor
// reorders otherwise), and that is flushed as a resubscription; a sequence
// gap can only come from a publication that failed or whose outcome its
// writer does not know, and that writer got the error from Publish, which
// the outbox repairs (race 3). The sequence check shortens that repair; it
// is not the only line of defence.
type originTable struct {
	probation, protected *simplelru.LRU[nodeID, uint64] // origin → last sequence number; nil until used
}

const (
	maxProtected = 4096
	maxProbation = 1024
	maxOrigins   = maxProtected + maxProbation
)

// gap records seq from origin and reports whether it does not follow the
// last one recorded (a skip, a replay or a reordering).
func (t *originTable) gap(origin nodeID, seq uint64) bool {
	if t.protected == nil {
		// NewLRU fails only for a size below 1.
		t.protected, _ = simplelru.NewLRU[nodeID, uint64](maxProtected, nil)
		t.probation, _ = simplelru.NewLRU[nodeID, uint64](maxProbation, nil)
	}
	if last, ok := t.protected.Peek(origin); ok {
		t.protected.Add(origin, seq) // to the front
		return seq != last+1
	}
	last, ok := t.probation.Peek(origin)
	if !ok || seq != last+1 {
		t.probation.Add(origin, seq) // evicts probation's least recent if full
		return ok
	}
	t.probation.Remove(origin)
	if t.protected.Len() >= maxProtected {
		if old, oldSeq, ok := t.protected.RemoveOldest(); ok {
			t.probation.Add(old, oldSeq)
		}
	}
	t.protected.Add(origin, seq)
	return false
}

// reset forgets every origin.
func (t *originTable) reset() {
	if t.protected != nil {
		t.protected.Purge()
		t.probation.Purge()
	}
}

// limiter allows one log line per second and counts the rest.
type limiter struct {
	last       int64
	suppressed int
}

func (l *limiter) allow(now int64) (suppressed int, ok bool) {
	if l.last != 0 && now-l.last < int64(time.Second) {
		l.suppressed++
		return 0, false
	}
	n := l.suppressed
	l.last, l.suppressed = now, 0
	return n, true
}
