package cache

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a Clock the test moves by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.t
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	f.t = f.t.Add(d)
	f.mu.Unlock()
}

// fakeBus is a Bus whose proofs the test controls and whose publications it
// records. It holds one subscription. Its proofs are times of clock, its
// own: ProofAge measures them by it. A test that drives the cache's clock
// and the bus's together gives both the same fake clock.
type fakeBus struct {
	mu           sync.Mutex
	clock        Clock
	h            Handler
	maxStaleness time.Duration // as subscribed
	proof        time.Time     // zero: unproven; forever: proven at every instant
	published    [][]Invalidation
	publishErr   error
	closed       bool
}

func (b *fakeBus) Subscribe(namespace string, h Handler, maxStaleness time.Duration) (Subscription, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.h, b.maxStaleness = h, maxStaleness
	return b, nil
}

func (b *fakeBus) Publish(ctx context.Context, keys []Invalidation) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.publishErr != nil {
		return b.publishErr
	}
	b.published = append(b.published, append([]Invalidation(nil), keys...))
	return nil
}

func (b *fakeBus) ProofAge() (time.Duration, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.proof.IsZero():
		return 0, false
	case b.proof.Equal(forever):
		return 0, true
	}
	return max(b.clock.Now().Sub(b.proof), 0), true
}

func (b *fakeBus) Close() error {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	return nil
}

func (b *fakeBus) prove(t time.Time) {
	b.mu.Lock()
	b.proof = t
	b.mu.Unlock()
}

func (b *fakeBus) handler() Handler {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.h
}

// source is a versioned key-value store standing in for Postgres.
type source struct {
	mu    sync.Mutex
	rows  map[string]row
	loads atomic.Int64
}

type row struct {
	Value   string
	Version int64
}

func newSource() *source { return &source{rows: make(map[string]row)} }

// write stores value as the next version of key and returns it.
func (s *source) write(key, value string) row {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := row{Value: value, Version: s.rows[key].Version + 1}
	s.rows[key] = r
	return r
}

func (s *source) remove(key string) {
	s.mu.Lock()
	delete(s.rows, key)
	s.mu.Unlock()
}

func (s *source) read(key string) (row, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.rows[key]
	return r, ok
}

func (s *source) load(ctx context.Context, key string) (row, error) {
	s.loads.Add(1)
	r, ok := s.read(key)
	if !ok {
		return row{}, fmt.Errorf("row %q: %w", key, ErrNotFound)
	}
	return r, nil
}

func rowVersion(r row) int64 { return r.Version }

// newTestCache returns a cache closed at the end of the test.
func newTestCache[K comparable, V any](t testing.TB, capacity int, load LoaderFunc[K, V], opts *Options[K, V]) *Cache[K, V] {
	t.Helper()
	c, err := New("test", capacity, load, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// mustGet returns the value of key, reporting an error otherwise. It uses
// Errorf, not Fatalf, so that goroutines other than the test's may call it.
func mustGet[K comparable, V any](t testing.TB, c *Cache[K, V], key K) V {
	t.Helper()
	v, err := c.Get(context.Background(), key)
	if err != nil {
		t.Errorf("Get(%v): %v", key, err)
	}
	return v
}

// forever, as a fakeBus's proof, stands for a link that cannot lose a
// message: proven at every instant.
var forever = time.Unix(1<<40, 0)

var errBoom = errors.New("boom")
