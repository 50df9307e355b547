package invalidate

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coherentcache/coherent/cache"
)

// ErrClosed is returned when publishing through a closed subscription or
// bus, and when subscribing to a closed bus.
var ErrClosed = errors.New("invalidate: closed")

// InProcess is a [cache.Bus] inside one process. Every subscription is a
// node: a publication reaches every other subscription of its namespace
// before Publish returns, so the propagation delay is zero and the link is
// always proven. Use it for tests and for a single process that runs several
// caches of one namespace; it carries nothing between processes.
//
// The zero value is ready to use. It is safe for concurrent use.
type InProcess struct {
	mu   sync.RWMutex
	subs map[string]map[*inProcessSub]struct{} // namespace → subscriptions
}

var _ cache.Bus = (*InProcess)(nil)

// NewInProcess returns an empty in-process bus.
func NewInProcess() *InProcess { return new(InProcess) }

// Subscribe registers h as a new node of namespace.
func (b *InProcess) Subscribe(namespace string, h cache.Handler) (cache.Subscription, error) {
	if h == nil {
		return nil, errors.New("invalidate: nil handler")
	}
	s := &inProcessSub{bus: b, namespace: namespace, h: h}
	b.mu.Lock()
	defer b.mu.Unlock()
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
// store. It returns ctx.Err() if ctx is done before it starts.
func (b *InProcess) Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	for _, p := range b.peers(namespace, nil) {
		p.deliver(keys)
	}
	return nil
}

// Proven reports true: delivery is synchronous, so the link is proven at
// every instant.
func (b *InProcess) Proven() bool { return true }

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
	gone      atomic.Bool  // closed, for LastProof, which must not wait for mu
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
	if closed {
		return ErrClosed
	}
	for _, p := range s.bus.peers(s.namespace, s) {
		p.deliver(keys)
	}
	return nil
}

func (s *inProcessSub) deliver(keys []cache.Invalidation) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return
	}
	if len(keys) == 0 {
		s.h.Flush()
		return
	}
	s.h.Invalidate(keys)
}

// forever is the proof time of a link that cannot lose a message.
var forever = time.Unix(1<<40, 0)

// LastProof returns a time in the far future: delivery is synchronous, so
// the link is proven at every instant, whatever clock the cache reads. A
// closed subscription proves nothing and returns the zero Time.
func (s *inProcessSub) LastProof() time.Time {
	if s.gone.Load() {
		return time.Time{}
	}
	return forever
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
