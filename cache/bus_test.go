package cache

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestNoServingBeforeFirstProof guards DESIGN race 12: until the bus has
// proven its link, a new cache reads through and stores nothing.
func TestNoServingBeforeFirstProof(t *testing.T) {
	clock := newFakeClock()
	bus := &fakeBus{clock: clock}
	src := newSource()
	src.write("k", "v1")
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock})

	for range 3 {
		mustGet(t, c, "k")
	}
	if st := c.Stats(); src.loads.Load() != 3 || st.Bypassed != 3 || st.Entries != 0 || st.Hits != 0 {
		t.Fatalf("before the first proof: %d loads, Stats = %+v; want 3 bypassed loads and nothing stored", src.loads.Load(), st)
	}

	bus.prove(clock.Now())
	mustGet(t, c, "k")
	mustGet(t, c, "k")
	if n := src.loads.Load(); n != 4 {
		t.Errorf("loads after the first proof = %d; want 4 (one more load, then a hit)", n)
	}
}

// TestBypassAfterMaxStaleness checks G2: with no proof for MaxStaleness the
// cache stops serving cached values, and serves them again after a proof.
// The bus's clock may be the cache's or one of its own that reads nothing
// like it (another epoch): the bus reports how old its proof is, not when
// it was made, so the bound holds either way.
func TestBypassAfterMaxStaleness(t *testing.T) {
	for _, own := range []bool{false, true} {
		t.Run(fmt.Sprintf("busClockOfItsOwn=%v", own), func(t *testing.T) {
			clock := newFakeClock()
			busClock := clock
			if own {
				busClock = &fakeClock{t: time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC)}
			}
			advance := func(d time.Duration) {
				clock.Advance(d)
				if own {
					busClock.Advance(d)
				}
			}
			bus := &fakeBus{clock: busClock}
			src := newSource()
			src.write("k", "v1")
			const maxStale = time.Second
			c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock, MaxStaleness: maxStale})
			bus.prove(busClock.Now())
			mustGet(t, c, "k") // cached

			// The link goes silent: a write elsewhere is never announced.
			src.write("k", "v2")
			advance(maxStale - time.Nanosecond)
			if r := mustGet(t, c, "k"); r.Value != "v1" {
				t.Fatalf("Get within MaxStaleness = %v; want the cached v1", r)
			}
			advance(time.Nanosecond)
			if r := mustGet(t, c, "k"); r.Value != "v2" {
				t.Fatalf("Get at MaxStaleness since the last proof = %v; want v2 read through", r)
			}
			if st := c.Stats(); st.Bypassed != 1 {
				t.Errorf("Bypassed = %d; want 1", st.Bypassed)
			}

			// The bus recovers; it flushes because it may have missed messages.
			bus.handler().Flush()
			bus.prove(busClock.Now())
			loads := src.loads.Load()
			mustGet(t, c, "k")
			if r := mustGet(t, c, "k"); r.Value != "v2" || src.loads.Load() != loads+1 {
				t.Errorf("after recovery Get = %v with %d more loads; want v2 from 1 load then a hit", r, src.loads.Load()-loads)
			}
		})
	}
}

// TestSubscribeGetsMaxStaleness checks that the staleness bound is set in
// one place: New hands the cache's MaxStaleness (or its default) to the
// bus, and fails with the bus's error if the bus cannot keep it.
func TestSubscribeGetsMaxStaleness(t *testing.T) {
	for _, tt := range []struct {
		set, want time.Duration
	}{
		{0, time.Second},
		{250 * time.Millisecond, 250 * time.Millisecond},
	} {
		bus := &fakeBus{}
		newTestCache(t, 10, newSource().load, &Options[string, row]{Bus: bus, MaxStaleness: tt.set})
		if bus.maxStaleness != tt.want {
			t.Errorf("MaxStaleness %v: Subscribe got %v; want %v", tt.set, bus.maxStaleness, tt.want)
		}
	}
	bus := &refusingBus{err: fmt.Errorf("%w: MaxStaleness too short for this bus", ErrInvalidOptions)}
	if _, err := New("test", 10, newSource().load, &Options[string, row]{Bus: bus, MaxStaleness: time.Millisecond}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("New on a bus that rejects its MaxStaleness: error = %v; want ErrInvalidOptions", err)
	}
}

// refusingBus is a Bus whose Subscribe fails with err.
type refusingBus struct{ err error }

func (b *refusingBus) Subscribe(string, Handler, time.Duration) (Subscription, error) {
	return nil, b.err
}

// TestProofAgeIsConservative pins the order in which the cache reads its
// clock and asks the bus for the age of its proof:
//
//	cache: now = T ...................................... provenUntil = T-age+MaxStaleness
//	bus:             age measured at T ... (time passes) ... returned
//
// Time that passes between the two must shorten the proof, not extend it:
// had the cache read its clock after the bus answered, it would serve
// until T+Δ-age+MaxStaleness, Δ past the proof's end.
func TestProofAgeIsConservative(t *testing.T) {
	clock := newFakeClock()
	bus := &gatedBus{fakeBus: &fakeBus{clock: clock}, entered: make(chan bool), release: make(chan struct{})}
	src := newSource()
	src.write("k", "v1")
	const maxStale = time.Second
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock, MaxStaleness: maxStale, TTL: time.Hour})
	bus.prove(clock.Now())
	mustGet(t, c, "k") // stored
	bus.prove(time.Time{})
	bus.handler().LinkLost()
	bus.prove(clock.Now()) // a new proof, at T

	bus.armed.Store(true)
	done := make(chan bool)
	go func() { done <- c.Proven() }() // reads T, then asks the bus
	if ok := <-bus.entered; !ok {
		t.Fatalf("the gated ProofAge read no proof")
	}
	clock.Advance(maxStale / 2) // while the bus answers
	close(bus.release)
	if !<-done {
		t.Fatalf("Proven() on a fresh proof = false")
	}
	clock.Advance(maxStale / 2) // T+MaxStaleness: the proof has run out
	src.write("k", "v2")
	if r := mustGet(t, c, "k"); r.Value != "v2" {
		t.Errorf("Get MaxStaleness after the proof = %v; want v2 read through", r)
	}
}

// TestLoadFinishingUnprovenIsNotStored: a load that started while the link
// was proven but finishes after the proof ran out must not store.
func TestLoadFinishingUnprovenIsNotStored(t *testing.T) {
	clock := newFakeClock()
	bus := &fakeBus{clock: clock}
	src := newGatedSource(1)
	src.write("k", "v1")
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock})
	bus.prove(clock.Now())
	done := make(chan struct{})
	go func() { mustGet(t, c, "k"); close(done) }()
	<-src.started
	clock.Advance(time.Hour)
	close(src.gate)
	<-done
	if st := c.Stats(); st.Entries != 0 || st.SkippedStores != 1 {
		t.Errorf("Stats = %+v; want nothing stored, 1 skipped store", st)
	}
}

// TestBypassedReadsShareYoungLoadsOnly: while the link is unproven, reads
// still share loads (so an outage does not multiply the load on the source)
// but only loads that started within the same half of MaxStaleness.
func TestBypassedReadsShareYoungLoadsOnly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := newFakeClock()
		src := newGatedSource(2)
		src.write("k", "v1")
		c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: &fakeBus{}, Clock: clock, MaxStaleness: time.Second})
		for range 5 {
			go mustGet(t, c, "k")
		}
		synctest.Wait()
		if n := src.loads.Load(); n != 1 {
			t.Fatalf("loads for 5 concurrent bypassed Gets = %d; want 1", n)
		}
		clock.Advance(time.Second / 2)
		go mustGet(t, c, "k")
		synctest.Wait()
		if n := src.loads.Load(); n != 2 {
			t.Fatalf("loads after half of MaxStaleness = %d; want 2 (a new load)", n)
		}
		close(src.gate)
		synctest.Wait()
	})
}

func TestHandlerInvalidate(t *testing.T) {
	src := newSource()
	src.write("k", "v1")
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Version: rowVersion})
	h := bus.handler()

	mustGet(t, c, "k") // v1 cached at version 1
	h.Invalidate([]Invalidation{{Key: "k", Version: 1}})
	if mustGet(t, c, "k"); src.loads.Load() != 1 {
		t.Fatalf("an invalidation of the cached version dropped the entry; want it kept")
	}
	src.write("k", "v2")
	h.Invalidate([]Invalidation{{Key: "k", Version: 2}})
	if r := mustGet(t, c, "k"); r.Value != "v2" {
		t.Fatalf("Get after an invalidation of a newer version = %v; want v2", r)
	}
	src.write("k", "v3")
	h.Invalidate([]Invalidation{{Key: "k"}}) // unknown version: always drops
	if r := mustGet(t, c, "k"); r.Value != "v3" {
		t.Fatalf("Get after an unversioned invalidation = %v; want v3", r)
	}
	if st := c.Stats(); st.InvalidationsReceived != 3 {
		t.Errorf("InvalidationsReceived = %d; want 3", st.InvalidationsReceived)
	}
}

// TestHandlerFailuresFlush guards DESIGN race 14: a key that cannot be
// decoded, or a codec that panics, ends in a flush, never in a skipped
// invalidation.
func TestHandlerFailuresFlush(t *testing.T) {
	t.Run("undecodable", func(t *testing.T) {
		bus := &fakeBus{proof: forever}
		c := newTestCache(t, 10, func(ctx context.Context, k int) (int, error) { return k, nil }, &Options[int, int]{Bus: bus})
		mustGet(t, c, 1)
		bus.handler().Invalidate([]Invalidation{{Key: "not-a-number"}})
		if st := c.Stats(); st.Flushes != 1 || st.Entries != 0 {
			t.Errorf("Stats = %+v; want 1 flush and no entries", st)
		}
	})
	t.Run("panicking codec", func(t *testing.T) {
		bus := &fakeBus{proof: forever}
		c := newTestCache(t, 10, func(ctx context.Context, k pair) (int, error) { return k.a, nil },
			&Options[pair, int]{Bus: bus, Keys: panickyCodec{}})
		mustGet(t, c, pair{1, 2})
		bus.handler().Invalidate([]Invalidation{{Key: "1/2"}})
		if st := c.Stats(); st.Flushes != 1 || st.Entries != 0 {
			t.Errorf("Stats = %+v; want 1 flush and no entries", st)
		}
	})
	// A codec that ends its goroutine (t.FailNow in a test codec): the
	// deferred flush must run although recover returns nil. Before, the
	// rest of the batch was skipped and nothing was flushed (race 14).
	t.Run("codec calling runtime.Goexit", func(t *testing.T) {
		bus := &fakeBus{proof: forever}
		c := newTestCache(t, 10, func(ctx context.Context, k pair) (int, error) { return k.a, nil },
			&Options[pair, int]{Bus: bus, Keys: exitingCodec{}})
		mustGet(t, c, pair{1, 2})
		done := make(chan struct{})
		go func() {
			defer close(done)
			bus.handler().Invalidate([]Invalidation{{Key: "1/2"}})
		}()
		<-done
		if st := c.Stats(); st.Flushes != 1 || st.Entries != 0 {
			t.Errorf("Stats = %+v; want 1 flush and no entries", st)
		}
	})
	// An InvalidationTracer that panics must not undo what was applied,
	// nor reach the bus: a Flush that panics leaves a subscription
	// unproven.
	t.Run("panicking tracer", func(t *testing.T) {
		bus := &fakeBus{proof: forever}
		c := newTestCache(t, 10, func(ctx context.Context, k int) (int, error) { return k, nil },
			&Options[int, int]{Bus: bus, Tracer: panickyTracer{}})
		mustGet(t, c, 1)
		mustGet(t, c, 2)
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("Invalidate with a panicking tracer panicked: %v", r)
				}
			}()
			bus.handler().Invalidate([]Invalidation{{Key: "1"}})
		}()
		if st := c.Stats(); st.Entries != 1 || st.InvalidationsReceived != 1 {
			t.Errorf("after Invalidate: Stats = %+v; want key 1 dropped, 2 kept, 1 received", st)
		}
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("Flush with a panicking tracer panicked: %v", r)
				}
			}()
			bus.handler().Flush()
		}()
		if st := c.Stats(); st.Entries != 0 {
			t.Errorf("after Flush: Stats = %+v; want no entries", st)
		}
	})
}

type exitingCodec struct{ pairCodec }

func (exitingCodec) Decode(string) (pair, error) { runtime.Goexit(); return pair{}, nil }

type panickyTracer struct{}

func (panickyTracer) TraceLoadStart(ctx context.Context, _ TraceLoadStartData) context.Context {
	return ctx
}
func (panickyTracer) TraceLoadEnd(context.Context, TraceLoadEndData) {}
func (panickyTracer) TraceInvalidation(TraceInvalidationData)        { panic("tracer bug") }

type panickyCodec struct{ pairCodec }

func (panickyCodec) Decode(string) (pair, error) { panic("codec bug") }

func TestWritesPublish(t *testing.T) {
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 10, newSource().load, &Options[string, row]{Bus: bus})
	ctx := context.Background()
	c.Set(ctx, "a", row{"A", 3}, 3)
	c.Delete(ctx, "b", 4)
	c.Invalidate(ctx, "c", "d")
	c.InvalidateAll(ctx)
	want := [][]Invalidation{
		{{Key: "a", Version: 3}},
		{{Key: "b", Version: 4}},
		{{Key: "c"}, {Key: "d"}},
		nil,
	}
	if len(bus.published) != len(want) {
		t.Fatalf("published %v; want %v", bus.published, want)
	}
	for i := range want {
		if len(bus.published[i]) != len(want[i]) {
			t.Fatalf("publication %d = %v; want %v", i, bus.published[i], want[i])
		}
		for j := range want[i] {
			if !reflect.DeepEqual(bus.published[i][j], want[i][j]) {
				t.Errorf("publication %d = %v; want %v", i, bus.published[i], want[i])
			}
		}
	}
	if st := c.Stats(); st.InvalidationsSent != 5 || st.Flushes != 1 {
		t.Errorf("Stats = %+v; want 5 sent, 1 flush", st)
	}
}

// TestPublishErrorKeepsTheLocalEffect: when the bus fails, the writer gets
// the error, and this node still honours G1.
func TestPublishErrorKeepsTheLocalEffect(t *testing.T) {
	bus := &fakeBus{proof: forever, publishErr: errBoom}
	src := newSource()
	src.write("k", "v1")
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus})
	ctx := context.Background()
	mustGet(t, c, "k")
	r := src.write("k", "v2")
	if err := c.Set(ctx, "k", r, r.Version); !errors.Is(err, errBoom) {
		t.Fatalf("Set = %v; want the publish error", err)
	}
	if got := mustGet(t, c, "k"); got != r {
		t.Errorf("Get after a Set whose publish failed = %v; want %v", got, r)
	}
	if err := c.Invalidate(ctx, "k"); !errors.Is(err, errBoom) {
		t.Fatalf("Invalidate = %v; want the publish error", err)
	}
	if st := c.Stats(); st.Entries != 0 || st.PublishErrors != 2 {
		t.Errorf("Stats = %+v; want the key dropped locally and 2 publish errors", st)
	}
}

// TestVersionRules guards DESIGN races 7 and 13.
func TestVersionRules(t *testing.T) {
	ctx := context.Background()
	type step struct {
		op      string // "set", "delete", "inv" (remote invalidation), "load"
		version int64
	}
	tests := []struct {
		name  string
		steps []step
		want  int64 // version Get returns afterwards; -1: not found
		loads int64 // loads Get costs afterwards
	}{
		{"newer set replaces", []step{{"set", 1}, {"set", 2}}, 2, 0},
		{"older set keeps the newer value (race 7)", []step{{"set", 2}, {"set", 1}}, 2, 0},
		{"older invalidation keeps the newer value (race 7)", []step{{"set", 2}, {"inv", 1}}, 2, 0},
		{"duplicate invalidation is idempotent", []step{{"set", 2}, {"inv", 2}, {"inv", 2}}, 2, 0},
		{"newer invalidation drops", []step{{"set", 2}, {"inv", 3}}, 3, 1},
		{"set after a newer invalidation is not installed (race 13)", []step{{"inv", 3}, {"set", 2}}, 3, 1},
		{"set older than the cached value keeps it", []step{{"load", 0}, {"inv", 3}, {"set", 2}}, 3, 0},
		{"set after a newer set that was evicted is not installed", []step{{"set", 3}, {"evict", 0}, {"set", 2}}, 3, 1},
		{"delete caches the absence", []step{{"set", 1}, {"delete", 2}}, -1, 0},
		{"older delete keeps the newer value", []step{{"set", 3}, {"delete", 2}}, 3, 0},
		{"set replaces an older delete", []step{{"delete", 2}, {"set", 3}}, 3, 0},
		{"load does not replace a newer set", []step{{"set", 5}, {"load", 0}}, 5, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The source holds the newest version among the steps, as
			// the database would after all those writes.
			src := newSource()
			newest := int64(0)
			for _, s := range tt.steps {
				newest = max(newest, s.version)
			}
			if tt.want >= 0 {
				src.rows["k"] = row{Value: "v" + strconv.FormatInt(newest, 10), Version: newest}
			}
			bus := &fakeBus{proof: forever}
			c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Version: rowVersion, Shards: 1})
			for _, s := range tt.steps {
				switch s.op {
				case "set":
					c.Set(ctx, "k", row{Value: "v" + strconv.FormatInt(s.version, 10), Version: s.version}, s.version)
				case "delete":
					c.Delete(ctx, "k", s.version)
				case "inv":
					bus.handler().Invalidate([]Invalidation{{Key: "k", Version: s.version}})
				case "load":
					c.Get(ctx, "k")
				case "evict":
					c.shards[0].mu.Lock()
					c.shards[0].remove("k", c.hash("k"))
					c.shards[0].mu.Unlock()
				}
			}
			before := src.loads.Load()
			got, err := c.Get(ctx, "k")
			switch {
			case tt.want < 0 && !errors.Is(err, ErrNotFound):
				t.Errorf("Get = %v, %v; want ErrNotFound", got, err)
			case tt.want >= 0 && (err != nil || got.Version != tt.want):
				t.Errorf("Get = %v, %v; want version %d", got, err, tt.want)
			}
			if n := src.loads.Load() - before; n != tt.loads {
				t.Errorf("Get cost %d loads; want %d", n, tt.loads)
			}
		})
	}
}

// TestUpdate guards DESIGN race 13 for writers without versions: Update
// installs what its write committed unless a change of the key reached the
// node while the write ran.
func TestUpdate(t *testing.T) {
	ctx := context.Background()
	setup := func(t *testing.T) (*Cache[string, row], *source, *fakeBus) {
		src := newSource()
		bus := &fakeBus{proof: forever}
		return newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus}), src, bus
	}
	t.Run("installs without a version", func(t *testing.T) {
		c, src, bus := setup(t)
		err := c.Update(ctx, "k", func(ctx context.Context) (Change[row], error) {
			return Change[row]{Value: src.write("k", "v1")}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if r := mustGet(t, c, "k"); r.Value != "v1" || src.loads.Load() != 0 {
			t.Errorf("Get after Update = %v with %d loads; want v1 installed", r, src.loads.Load())
		}
		if len(bus.published) != 1 || bus.published[0][0].Key != "k" {
			t.Errorf("published %v; want one invalidation of k", bus.published)
		}
	})
	t.Run("drops after an overlapping invalidation", func(t *testing.T) {
		c, src, bus := setup(t)
		err := c.Update(ctx, "k", func(ctx context.Context) (Change[row], error) {
			r := src.write("k", "mine")
			src.write("k", "theirs")                             // another writer commits after us...
			bus.handler().Invalidate([]Invalidation{{Key: "k"}}) // ...and its invalidation overtakes our install
			return Change[row]{Value: r}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if r := mustGet(t, c, "k"); r.Value != "theirs" {
			t.Errorf("Get after an overtaken Update = %v; want theirs (mine must not be installed)", r)
		}
	})
	t.Run("deletion", func(t *testing.T) {
		c, src, _ := setup(t)
		err := c.Update(ctx, "k", func(ctx context.Context) (Change[row], error) {
			src.remove("k")
			return Change[row]{Version: 7, Deleted: true}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Get(ctx, "k"); !errors.Is(err, ErrNotFound) || src.loads.Load() != 0 {
			t.Errorf("Get after a deleting Update = %v with %d loads; want a cached ErrNotFound", err, src.loads.Load())
		}
	})
	// Issue 11 item 7: a write that failed because it looked something up
	// and found nothing is a failed write, not a deletion. Before Change
	// had Deleted, an error wrapping ErrNotFound meant "deleted": Update
	// cached a false absence, published it and returned nil.
	t.Run("failed write wrapping ErrNotFound", func(t *testing.T) {
		c, src, bus := setup(t)
		src.write("k", "v1")
		mustGet(t, c, "k")
		lookupFailed := fmt.Errorf("look up the parent row: %w", ErrNotFound)
		err := c.Update(ctx, "k", func(ctx context.Context) (Change[row], error) { return Change[row]{}, lookupFailed })
		if !errors.Is(err, lookupFailed) {
			t.Fatalf("Update = %v; want the write's error", err)
		}
		if r, err := c.Get(ctx, "k"); err != nil || r.Value != "v1" {
			t.Errorf("Get after a failed write = %v, %v; want v1 (no cached absence)", r, err)
		}
		if len(bus.published) != 0 {
			t.Errorf("published %v after a failed write; want nothing", bus.published)
		}
	})
	t.Run("failed write", func(t *testing.T) {
		c, src, bus := setup(t)
		src.write("k", "v1")
		mustGet(t, c, "k")
		err := c.Update(ctx, "k", func(ctx context.Context) (Change[row], error) { return Change[row]{}, errBoom })
		if !errors.Is(err, errBoom) {
			t.Fatalf("Update = %v; want errBoom", err)
		}
		if st := c.Stats(); st.Entries != 0 || len(bus.published) != 0 {
			t.Errorf("after a failed write: %d entries, published %v; want the key dropped here and nothing published", st.Entries, bus.published)
		}
	})
}

func TestProven(t *testing.T) {
	clock := newFakeClock()
	bus := &fakeBus{clock: clock}
	c := newTestCache(t, 10, newSource().load, &Options[string, row]{Bus: bus, Clock: clock, MaxStaleness: time.Second})
	if c.Proven() {
		t.Error("Proven before the first proof = true")
	}
	bus.prove(clock.Now())
	if !c.Proven() {
		t.Error("Proven right after a proof = false")
	}
	clock.Advance(time.Second)
	if c.Proven() {
		t.Error("Proven MaxStaleness after the last proof = true")
	}
	bus.prove(clock.Now())
	c.Close()
	if c.Proven() {
		t.Error("Proven after Close = true")
	}
}

// recordingTracer records what a Cache reports.
type recordingTracer struct {
	mu            sync.Mutex
	loads, ends   []string
	invalidations []TraceInvalidationData
}

type traceKey struct{}

func (r *recordingTracer) TraceLoadStart(ctx context.Context, d TraceLoadStartData) context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.loads = append(r.loads, strings.Join(d.Keys, ","))
	return context.WithValue(ctx, traceKey{}, "span")
}

func (r *recordingTracer) TraceLoadEnd(ctx context.Context, d TraceLoadEndData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ends = append(r.ends, fmt.Sprint(ctx.Value(traceKey{}), " ", d.Err))
}

func (r *recordingTracer) TraceInvalidation(d TraceInvalidationData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.invalidations = append(r.invalidations, d)
}

func TestTracer(t *testing.T) {
	tr := &recordingTracer{}
	bus := &fakeBus{proof: forever}
	src := newSource()
	src.write("a", "A")
	c := newTestCache(t, 10, func(ctx context.Context, k string) (row, error) {
		if ctx.Value(traceKey{}) != "span" {
			t.Errorf("loader context lacks the tracer's value")
		}
		return src.load(ctx, k)
	}, &Options[string, row]{Bus: bus, Tracer: tr})
	ctx := context.Background()
	c.Get(ctx, "a")
	c.Get(ctx, "ghost")
	c.Invalidate(ctx, "a")
	bus.handler().Invalidate([]Invalidation{{Key: "b", Version: 3}})
	bus.handler().Flush()
	if got := strings.Join(tr.loads, " "); got != "a ghost" {
		t.Errorf("traced loads = %q; want %q", got, "a ghost")
	}
	if len(tr.ends) != 2 || tr.ends[0] != "span <nil>" || !strings.Contains(tr.ends[1], "not found") {
		t.Errorf("traced load ends = %q", tr.ends)
	}
	want := []TraceInvalidationData{
		{Namespace: "test", Keys: []Invalidation{{Key: "a"}}},
		{Namespace: "test", Keys: []Invalidation{{Key: "b", Version: 3}}, Remote: true},
		{Namespace: "test", Remote: true},
	}
	if fmt.Sprint(tr.invalidations) != fmt.Sprint(want) {
		t.Errorf("traced invalidations = %+v; want %+v", tr.invalidations, want)
	}
}

// TestUpdateWhoseWritePanics: a write function may panic (or call
// runtime.Goexit) after it committed; Update must drop the key here, as
// after an error, so that this node does not keep serving the value the
// write replaced.
func TestUpdateWhoseWritePanics(t *testing.T) {
	ctx := context.Background()
	for _, exit := range []bool{false, true} {
		src := newSource()
		c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: &fakeBus{proof: forever}})
		src.write("k", "old")
		mustGet(t, c, "k")
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer func() { recover() }()
			c.Update(ctx, "k", func(ctx context.Context) (Change[row], error) {
				src.write("k", "new") // committed...
				if exit {
					runtime.Goexit()
				}
				panic("write bug") // ...and then the function fails
			})
		}()
		<-done
		if r := mustGet(t, c, "k"); r.Value != "new" {
			t.Errorf("Get after a write that committed and then panicked (goexit %v) = %v; want new", exit, r)
		}
	}
}
