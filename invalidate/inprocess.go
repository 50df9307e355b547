package invalidate

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coherentcache/coherent/cache"
)

// InProcess is a [cache.Bus] inside one process. Every subscription is a
// node: a publication reaches every other subscription of its namespace
// before Publish returns, so the propagation delay is zero and the link is
// always proven. It cannot lose a message: delivery is a function call, a
// subscription receives everything published after Subscribe returned,
// and nothing can be published to it before. So, unlike the Redis buses,
// it never flushes on its own, and a write-through made before its first
// subscription cannot miss anything (race 19). Use it for tests and for a
// single process that runs several caches of one namespace; it carries
// nothing between processes.
//
// The zero value is ready to use. It is safe for concurrent use.
type InProcess struct {
	mu     sync.RWMutex
	subs   map[string]map[*inProcessSub]struct{} // namespace → subscriptions
	closed atomic.Bool                           // set under mu

	// Counters for Stats: one publication is one message, delivered to
	// every other subscription of its namespace.
	messages, keys, received, keysReceived atomic.Uint64
}

var _ cache.Bus = (*InProcess)(nil)

// NewInProcess returns an empty in-process bus.
func NewInProcess() *InProcess { return new(InProcess) }

// Subscribe registers h as a new node of namespace. The link is proven at
// every instant, so any positive maxStaleness can be kept. Subscribe
// returns ErrClosed after Close, and an error for which errors.Is(err,
// cache.ErrInvalidOptions) is true for a maxStaleness that is not
// positive.
func (b *InProcess) Subscribe(namespace string, h cache.Handler, maxStaleness time.Duration) (cache.Subscription, error) {
	if h == nil {
		return nil, errNilHandler
	}
	if maxStaleness <= 0 {
		return nil, fmt.Errorf("%w: MaxStaleness must be positive, got %v", cache.ErrInvalidOptions, maxStaleness)
	}
	s := &inProcessSub{bus: b, namespace: namespace, h: h}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed.Load() {
		return nil, ErrClosed
	}
	if b.subs == nil {
		b.subs = make(map[string]map[*inProcessSub]struct{})
	}
	if b.subs[namespace] == nil {
		b.subs[namespace] = make(map[*inProcessSub]struct{})
	}
	b.subs[namespace][s] = struct{}{}
	return s, nil
}

// Publish delivers keys of namespace to every subscription of namespace,
// on the calling goroutine; an empty keys flushes them. It is for
// publishers that are not a cache, such as the outbox relay of package
// store. It returns ctx.Err() if ctx is done before it starts, and
// ErrClosed after Close.
func (b *InProcess) Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if b.closed.Load() {
		return ErrClosed
	}
	b.fanOut(namespace, nil, keys)
	return nil
}

// fanOut delivers keys to the subscriptions of namespace but from, and
// counts them.
func (b *InProcess) fanOut(namespace string, from *inProcessSub, keys []cache.Invalidation) {
	b.messages.Add(1)
	b.keys.Add(uint64(len(keys)))
	for _, p := range b.peers(namespace, from) {
		b.received.Add(1)
		b.keysReceived.Add(uint64(len(keys)))
		p.deliver(keys)
	}
}

// Stats returns a snapshot of the counters. Only the message and key
// counts apply: delivery is a function call that cannot fail, be lost or
// need a proof.
func (b *InProcess) Stats() Stats {
	return Stats{
		MessagesSent: b.messages.Load(), KeysSent: b.keys.Load(),
		MessagesReceived: b.received.Load(), KeysReceived: b.keysReceived.Load(),
	}
}

// Proven reports whether the bus is open: an in-process link is proven at
// every instant until Close. See [PubSub.Proven].
func (b *InProcess) Proven() bool { return !b.closed.Load() }

// Close ends the bus: every subscription receives nothing more and reports
// no proof, and its Handler is told that the link is lost
// ([cache.Handler.LinkLost]), so that a cache still on the bus stops
// serving at once, not when the proof it holds runs out.
// Later calls of Subscribe and Publish return ErrClosed. Close waits for
// deliveries in progress, so it must not be called from a Handler. It is
// safe to call more than once and always returns nil.
func (b *InProcess) Close() error {
	b.mu.Lock()
	if b.closed.Load() {
		b.mu.Unlock()
		return nil
	}
	b.closed.Store(true)
	var all []*inProcessSub
	for _, subs := range b.subs {
		for s := range subs {
			all = append(all, s)
		}
	}
	b.mu.Unlock()
	for _, s := range all {
		s.linkLost()
	}
	return nil
}

// peers returns the subscriptions of namespace other than from.
func (b *InProcess) peers(namespace string, from *inProcessSub) []*inProcessSub {
	b.mu.RLock()
	defer b.mu.RUnlock()
	out := make([]*inProcessSub, 0, len(b.subs[namespace]))
	for s := range b.subs[namespace] {
		if s != from {
			out = append(out, s)
		}
	}
	return out
}

type inProcessSub struct {
	bus       *InProcess
	namespace string
	h         cache.Handler
	closeOnce sync.Once
	mu        sync.RWMutex // held for reading while delivering to h
	closed    bool         // guarded by mu
	gone      atomic.Bool  // closed, for ProofAge, which must not wait for mu
}

// Publish delivers keys to every other subscription of the namespace, on the
// calling goroutine. It returns ctx.Err() if ctx is done before it starts.
func (s *inProcessSub) Publish(ctx context.Context, keys []cache.Invalidation) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.RLock()
	closed := s.closed
	s.mu.RUnlock()
	if closed || s.bus.closed.Load() {
		return ErrClosed
	}
	s.bus.fanOut(s.namespace, s, keys)
	return nil
}

func (s *inProcessSub) deliver(keys []cache.Invalidation) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed || s.bus.closed.Load() {
		return
	}
	if len(keys) == 0 {
		s.h.Flush()
		return
	}
	s.h.Invalidate(keys)
}

// linkLost tells the Handler that the bus closed, once deliveries in
// progress have returned: later ones see the bus closed and deliver
// nothing.
func (s *inProcessSub) linkLost() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closed {
		s.h.LinkLost()
	}
}

// ProofAge reports a proof of age 0: delivery is synchronous, so the link
// is proven at every instant. A closed subscription, or one of a closed
// bus, reports no proof.
func (s *inProcessSub) ProofAge() (time.Duration, bool) {
	if s.gone.Load() || s.bus.closed.Load() {
		return 0, false
	}
	return 0, true
}

// Close removes the subscription. After it returns, its Handler receives
// nothing more.
func (s *inProcessSub) Close() error {
	s.closeOnce.Do(func() {
		s.bus.mu.Lock()
		delete(s.bus.subs[s.namespace], s)
		if len(s.bus.subs[s.namespace]) == 0 {
			delete(s.bus.subs, s.namespace)
		}
		s.bus.mu.Unlock()
		s.gone.Store(true)
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
	})
	return nil
}
