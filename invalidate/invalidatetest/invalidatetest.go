// Package invalidatetest is a conformance suite for implementations of
// [cache.Bus], and the helpers it is built from.
//
// A transport's test calls [Run] with a function that makes n connected
// nodes (one Bus each, as n processes would have), isolated from every
// other test:
//
//	func TestConformance(t *testing.T) {
//		invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
//			channel := uniqueChannel(t)
//			buses := make([]cache.Bus, n)
//			for i := range buses {
//				b, err := invalidate.NewPubSub(newClient(t), &invalidate.PubSubOptions{Channel: channel})
//				...
//				t.Cleanup(func() { b.Close() })
//				buses[i] = b
//			}
//			return buses
//		})
//	}
//
// The suite checks what [cache.Bus] promises: delivery to every other
// subscriber of a namespace and not to the publisher, versions, flushes,
// isolation of namespaces, order per publisher, proofs, Close, and the end
// result with real [cache.Cache] instances: no stale read once the reading
// node has proven its link after a write.
package invalidatetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coherentcache/coherent/cache"
)

// Timeout bounds every wait of the suite. It is generous: the suite asserts
// what eventually happens, never how fast.
const Timeout = 10 * time.Second

// MaxStaleness is the staleness bound with which the suite subscribes, the
// default of [cache.Options.MaxStaleness], with which its caches subscribe.
// The buses that [NewNodes] makes must accept it.
const MaxStaleness = time.Second

// WaitFor polls cond until it holds, and fails t if it does not within
// Timeout.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(Timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", Timeout, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Event is one call of a [Recorder]'s Handler methods.
type Event struct {
	Flush    bool
	LinkLost bool
	Keys     []cache.Invalidation // a copy; nil for a flush or a lost link
}

// Recorder is a [cache.Handler] that records what it is given. It is safe
// for concurrent use.
type Recorder struct {
	mu     sync.Mutex
	events []Event
}

// Invalidate implements [cache.Handler].
func (r *Recorder) Invalidate(keys []cache.Invalidation) {
	r.mu.Lock()
	r.events = append(r.events, Event{Keys: slices.Clone(keys)})
	r.mu.Unlock()
}

// Flush implements [cache.Handler].
func (r *Recorder) Flush() {
	r.mu.Lock()
	r.events = append(r.events, Event{Flush: true})
	r.mu.Unlock()
}

// LinkLost implements [cache.Handler].
func (r *Recorder) LinkLost() {
	r.mu.Lock()
	r.events = append(r.events, Event{LinkLost: true})
	r.mu.Unlock()
}

// Reset forgets what was recorded. A test that counts flushes calls it
// once the subscription is proven: a Redis bus flushes every subscription
// when it first subscribes (race 19), and what it delivered before its
// first proof is none of the test's business.
func (r *Recorder) Reset() {
	r.mu.Lock()
	r.events = nil
	r.mu.Unlock()
}

// Events returns a copy of what was recorded.
func (r *Recorder) Events() []Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

// Keys returns the keys of every Invalidate call, in order.
func (r *Recorder) Keys() []string {
	var keys []string
	for _, e := range r.Events() {
		for _, k := range e.Keys {
			keys = append(keys, k.Key)
		}
	}
	return keys
}

// Has reports whether key was invalidated.
func (r *Recorder) Has(key string) bool { return slices.Contains(r.Keys(), key) }

// Flushes counts Flush calls.
func (r *Recorder) Flushes() int {
	n := 0
	for _, e := range r.Events() {
		if e.Flush {
			n++
		}
	}
	return n
}

// LinksLost counts LinkLost calls.
func (r *Recorder) LinksLost() int {
	n := 0
	for _, e := range r.Events() {
		if e.LinkLost {
			n++
		}
	}
	return n
}

// WaitProven waits until every subscription reports a proof.
func WaitProven(t testing.TB, subs ...cache.Subscription) {
	t.Helper()
	for i, s := range subs {
		WaitFor(t, fmt.Sprintf("subscription %d to be proven", i), func() bool {
			_, ok := s.ProofAge()
			return ok
		})
	}
}

// Proven reports whether s reports a proof.
func Proven(s cache.Subscription) bool {
	_, ok := s.ProofAge()
	return ok
}

// ProofTime returns when s was last proven, by time.Now, or the zero Time
// if s reports no proof. The bus must measure the age of its proofs by a
// clock that runs at the rate of time.Now, as the buses' default clocks
// do. ProofTime reads time.Now before it asks s for the age, so the time
// it returns is no later than the proof: a write that returned before it
// returned before the proof.
func ProofTime(s cache.Subscription) time.Time {
	now := time.Now()
	age, ok := s.ProofAge()
	if !ok {
		return time.Time{}
	}
	return now.Add(-age)
}

// NewNodes makes n connected nodes isolated from other tests. The function
// owns their cleanup.
type NewNodes func(t *testing.T, n int) []cache.Bus

// Run runs the conformance suite, in parallel subtests of t.
func Run(t *testing.T, newNodes NewNodes) {
	tests := []struct {
		name string
		fn   func(t *testing.T, newNodes NewNodes)
	}{
		{"DeliversToOthersNotSelf", testDelivery},
		{"CarriesVersions", testVersions},
		{"EmptyKeysFlush", testFlush},
		{"NamespacesIsolated", testNamespaces},
		{"OrderPerPublisher", testOrder},
		{"LocalPeers", testLocalPeers},
		{"ProofAdvances", testProof},
		{"Close", testClose},
		{"CacheEndToEnd", testCacheEndToEnd},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.fn(t, newNodes)
		})
	}
}

// subscribe subscribes a new Recorder to namespace on bus.
func subscribe(t *testing.T, bus cache.Bus, namespace string) (cache.Subscription, *Recorder) {
	t.Helper()
	r := new(Recorder)
	s, err := bus.Subscribe(namespace, r, MaxStaleness)
	if err != nil {
		t.Fatalf("Subscribe(%q) error = %v", namespace, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, r
}

func publish(t *testing.T, s cache.Subscription, keys ...cache.Invalidation) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	if err := s.Publish(ctx, keys); err != nil {
		t.Fatalf("Publish(%v) error = %v", keys, err)
	}
}

func inv(keys ...string) []cache.Invalidation {
	out := make([]cache.Invalidation, len(keys))
	for i, k := range keys {
		out[i] = cache.Invalidation{Key: k}
	}
	return out
}

// A publication from a given node reaches the others in order, so to show
// that something did not arrive the tests publish a marker after it and
// wait for the marker instead of waiting for nothing.

func testDelivery(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 3)
	a, ra := subscribe(t, nodes[0], "ns")
	b, rb := subscribe(t, nodes[1], "ns")
	c, rc := subscribe(t, nodes[2], "ns")
	WaitProven(t, a, b, c)
	ra.Reset()
	rb.Reset()
	rc.Reset()

	publish(t, a, inv("k1", "k2")...)
	WaitFor(t, "k1 and k2 on node 1", func() bool { return rb.Has("k1") && rb.Has("k2") })
	WaitFor(t, "k1 and k2 on node 2", func() bool { return rc.Has("k1") && rc.Has("k2") })

	// Node 1 publishes after node 0's publication returned: if node 0
	// received its own echo, it would receive it before this marker.
	publish(t, b, inv("marker")...)
	WaitFor(t, "the marker on node 0", func() bool { return ra.Has("marker") })
	if got := ra.Keys(); !slices.Equal(got, []string{"marker"}) {
		t.Errorf("publisher received %q; want only [marker] (no echo of its own keys)", got)
	}
	if rb.Has("marker") {
		t.Errorf("node 1 received its own marker")
	}
	if n := ra.Flushes() + rb.Flushes() + rc.Flushes(); n != 0 {
		t.Errorf("%d flushes on a healthy link; want 0", n)
	}
}

func testVersions(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	a, _ := subscribe(t, nodes[0], "ns")
	b, rb := subscribe(t, nodes[1], "ns")
	WaitProven(t, a, b)
	// Versions and source positions (DESIGN race 10) travel with their
	// keys.
	want := []cache.Invalidation{{Key: "v0"}, {Key: "v7", Version: 7}, {Key: "neg", Version: -3}, {Key: "max", Version: 1<<63 - 1},
		{Key: "p", Version: 2, Position: 0x16B374D8}, {Key: "pmax", Position: 1<<64 - 1},
		// Value broadcasts: a value, an empty one, a tombstone.
		{Key: "val", Version: 9, Position: 5, Value: []byte(`{"name":"Ada"}`)}, {Key: "vempty", Version: 10, Value: []byte{}},
		{Key: "tomb", Version: 11, Deleted: true}}
	publish(t, a, want...)
	WaitFor(t, "the versioned keys", func() bool { return len(rb.Keys()) >= len(want) })
	var got []cache.Invalidation
	for _, e := range rb.Events() {
		got = append(got, e.Keys...)
	}
	slices.SortFunc(got, func(x, y cache.Invalidation) int { return strings.Compare(x.Key, y.Key) })
	slices.SortFunc(want, func(x, y cache.Invalidation) int { return strings.Compare(x.Key, y.Key) })
	if !slices.EqualFunc(got, want, sameInvalidation) {
		t.Errorf("received %v; want %v", got, want)
	}
}

// sameInvalidation reports whether a and b are equal, a nil Value being
// unlike an empty one.
func sameInvalidation(a, b cache.Invalidation) bool {
	return a.Key == b.Key && a.Version == b.Version && a.Position == b.Position && a.Deleted == b.Deleted &&
		(a.Value == nil) == (b.Value == nil) && bytes.Equal(a.Value, b.Value)
}

func testFlush(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	a, ra := subscribe(t, nodes[0], "ns")
	b, rb := subscribe(t, nodes[1], "ns")
	WaitProven(t, a, b)
	ra.Reset()
	rb.Reset()
	publish(t, a)
	WaitFor(t, "the flush on node 1", func() bool { return rb.Flushes() == 1 })
	if len(rb.Keys()) != 0 {
		t.Errorf("an empty-keys Publish delivered keys %q", rb.Keys())
	}
	publish(t, b, inv("marker")...)
	WaitFor(t, "the marker on node 0", func() bool { return ra.Has("marker") })
	if n := ra.Flushes(); n != 0 {
		t.Errorf("the publisher of a flush was flushed %d times; want 0", n)
	}
}

func testNamespaces(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	a1, _ := subscribe(t, nodes[0], "one")
	a2, _ := subscribe(t, nodes[0], "two")
	b1, rb1 := subscribe(t, nodes[1], "one")
	b2, rb2 := subscribe(t, nodes[1], "two")
	WaitProven(t, a1, a2, b1, b2)
	rb1.Reset()
	rb2.Reset()
	publish(t, a1, inv("k")...)
	publish(t, a1)                   // a flush of "one"
	publish(t, a2, inv("marker")...) // published after: arrives after on node 1
	WaitFor(t, "the marker in namespace two", func() bool { return rb2.Has("marker") })
	WaitFor(t, "k and the flush in namespace one", func() bool { return rb1.Has("k") && rb1.Flushes() == 1 })
	if got := rb2.Keys(); !slices.Equal(got, []string{"marker"}) || rb2.Flushes() != 0 {
		t.Errorf("namespace two received keys %q and %d flushes; want only [marker]", got, rb2.Flushes())
	}
	if rb1.Has("marker") {
		t.Errorf("namespace one received namespace two's marker")
	}
}

func testOrder(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	a, _ := subscribe(t, nodes[0], "ns")
	b, rb := subscribe(t, nodes[1], "ns")
	WaitProven(t, a, b)
	rb.Reset()
	const n = 200
	var want []string
	for i := range n {
		k := "k" + strconv.Itoa(i)
		want = append(want, k)
		publish(t, a, inv(k)...)
	}
	WaitFor(t, "every key", func() bool { return len(rb.Keys()) >= n })
	if got := rb.Keys(); !slices.Equal(got, want) {
		t.Errorf("received %d keys out of order: %q…", len(got), got[:min(len(got), 10)])
	}
	if f := rb.Flushes(); f != 0 {
		t.Errorf("%d flushes; want 0", f)
	}
}

// testLocalPeers checks two subscriptions of one namespace on one bus: two
// caches of a namespace in one process.
func testLocalPeers(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	a, _ := subscribe(t, nodes[0], "ns")
	a2, ra2 := subscribe(t, nodes[0], "ns")
	b, rb := subscribe(t, nodes[1], "ns")
	WaitProven(t, a, a2, b)
	publish(t, a, inv("k")...)
	// The local peer hears of it before Publish returns, as it cannot rely
	// on the publisher's echo.
	if !ra2.Has("k") {
		t.Errorf("the other local subscription did not receive k before Publish returned")
	}
	WaitFor(t, "k on node 1", func() bool { return rb.Has("k") })
	publish(t, b, inv("marker")...)
	WaitFor(t, "the marker on the local peer", func() bool { return ra2.Has("marker") })
	if got := ra2.Keys(); !slices.Equal(got, []string{"k", "marker"}) {
		t.Errorf("local peer received %q; want [k marker] (k once)", got)
	}
}

func testProof(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 1)
	s, _ := subscribe(t, nodes[0], "ns")
	WaitProven(t, s)
	start := time.Now()
	WaitFor(t, "a proof sent after the first one was seen", func() bool { return ProofTime(s).After(start) })
	// A subscription made later is proven on its own terms.
	s2, _ := subscribe(t, nodes[0], "ns")
	WaitProven(t, s2)
}

func testClose(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	a, _ := subscribe(t, nodes[0], "ns")
	b, rb := subscribe(t, nodes[1], "ns")
	b2, rb2 := subscribe(t, nodes[1], "ns")
	WaitProven(t, a, b, b2)
	rb.Reset()
	if err := b.Close(); err != nil {
		t.Fatalf("Close() error = %v", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close() error = %v; want nil", err)
	}
	if age, ok := b.ProofAge(); ok {
		t.Errorf("ProofAge() after Close = %v, true; want no proof", age)
	}
	publish(t, a, inv("after")...)
	WaitFor(t, "the key on the open subscription", func() bool { return rb2.Has("after") })
	if len(rb.Events()) != 0 {
		t.Errorf("closed subscription received %v", rb.Events())
	}
	err := b.Publish(context.Background(), inv("x"))
	if err == nil {
		t.Errorf("Publish on a closed subscription = nil; want an error")
	}
}

// source is a versioned key-value store behind a mutex, the test's
// stand-in for Postgres.
type source struct {
	mu   sync.Mutex
	rows map[string]int64 // key → version; the value is the version
}

func (s *source) load(_ context.Context, key string) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.rows[key]
	if !ok {
		return 0, cache.ErrNotFound
	}
	return v, nil
}

func (s *source) write(key string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows[key]++
	return s.rows[key]
}

// testCacheEndToEnd runs real caches on two nodes: writes on node 0,
// reads on node 1. A read on node 1 that starts after node 1 proved its
// link past the end of a write must see that write (G2), whatever the
// cache had cached.
func testCacheEndToEnd(t *testing.T, newNodes NewNodes) {
	nodes := newNodes(t, 2)
	src := &source{rows: map[string]int64{}}
	newCache := func(bus cache.Bus) *cache.Cache[string, int64] {
		c, err := cache.New("users", 100, src.load, &cache.Options[string, int64]{
			Bus: bus, Version: func(v int64) int64 { return v },
		})
		if err != nil {
			t.Fatalf("cache.New error = %v", err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	writer, reader := newCache(nodes[0]), newCache(nodes[1])
	// probe shares the reader's bus: its proof is the reader's.
	probe, _ := subscribe(t, nodes[1], "probe")
	ctx := context.Background()

	keys := []string{"a", "b", "c"}
	for _, k := range keys {
		src.write(k)
	}
	WaitProven(t, probe)
	WaitFor(t, "the reader to serve from cache", func() bool {
		before := reader.Stats().Hits
		_, _ = reader.Get(ctx, "a")
		return reader.Stats().Hits > before
	})

	type write struct {
		version int64
		done    time.Time // when Set returned
	}
	var mu sync.Mutex
	last := map[string][]write{}
	const rounds = 60
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range rounds {
			k := keys[i%len(keys)]
			v := src.write(k)
			if err := writer.Set(ctx, k, v, v); err != nil {
				t.Errorf("Set(%q, %d) error = %v", k, v, err)
				return
			}
			mu.Lock()
			last[k] = append(last[k], write{v, time.Now()})
			mu.Unlock()
			time.Sleep(time.Millisecond)
		}
	}()
	// Reads check the bound while the writes go on.
	stale := 0
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		for _, k := range keys {
			proof := ProofTime(probe)
			mu.Lock()
			var floor int64
			for _, w := range last[k] {
				if !w.done.After(proof) {
					floor = w.version
				}
			}
			mu.Unlock()
			got, err := reader.Get(ctx, k)
			if err != nil {
				t.Fatalf("Get(%q) error = %v", k, err)
			}
			if got < floor {
				stale++
				t.Errorf("Get(%q) = version %d; want ≥ %d, written before the reader's proof", k, got, floor)
			}
		}
	}
	// After the writes stop, every key converges (G3).
	for _, k := range keys {
		want, _ := src.load(ctx, k)
		WaitFor(t, fmt.Sprintf("Get(%q) to return version %d", k, want), func() bool {
			got, err := reader.Get(ctx, k)
			return err == nil && got == want
		})
	}
	if stale != 0 {
		t.Errorf("%d stale reads; want 0", stale)
	}
	if err := writer.Close(); err != nil {
		t.Errorf("cache Close() error = %v", err)
	}
	if _, err := writer.Get(ctx, "a"); !errors.Is(err, cache.ErrClosed) {
		t.Errorf("Get after Close error = %v; want ErrClosed", err)
	}
}
