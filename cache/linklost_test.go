package cache

import (
	"math"
	"sync/atomic"
	"testing"
	"time"
)

// TestLinkLostBypassesAtOnce guards against a cache that keeps serving
// from memory after its bus has detected that the link failed: until
// MaxStaleness after the last proof, invalidations may be going past it.
// After Handler.LinkLost the very next Get must read through, however far
// in the future the cached proof ran; and since LinkLost is not a flush
// (a Streams bus resumes and delivers what it missed), the entries must
// be served again once the bus proves its link anew.
func TestLinkLostBypassesAtOnce(t *testing.T) {
	clock := newFakeClock()
	bus := &fakeBus{clock: clock}
	src := newSource()
	src.write("k", "v1")
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock, MaxStaleness: time.Hour})
	bus.prove(clock.Now())
	mustGet(t, c, "k") // loaded and stored
	mustGet(t, c, "k") // a hit: provenUntil is an hour away
	if st := c.Stats(); st.Hits != 1 || src.loads.Load() != 1 {
		t.Fatalf("before the loss: %d loads, Stats = %+v; want 1 load, 1 hit", src.loads.Load(), st)
	}

	// The bus notices that its link failed: it withdraws its proof, then
	// tells the handler, as cache.Subscription's contract says.
	bus.prove(time.Time{})
	bus.handler().LinkLost()
	src.write("k", "v2") // a write this node may never hear of
	if r := mustGet(t, c, "k"); r.Value != "v2" {
		t.Errorf("Get after LinkLost = %v; want v2 read through", r)
	}
	if st := c.Stats(); st.Bypassed != 1 || st.Hits != 1 || src.loads.Load() != 2 {
		t.Errorf("after LinkLost: %d loads, Stats = %+v; want 2 loads, 1 bypassed, still 1 hit", src.loads.Load(), st)
	}
	if c.Proven() {
		t.Errorf("Proven() after LinkLost = true; want false")
	}

	// The bus resumes and delivers what it missed; nothing was dropped.
	clock.Advance(time.Millisecond)
	bus.handler().Invalidate([]Invalidation{{Key: "k", Version: 2}})
	bus.prove(clock.Now())
	loads := src.loads.Load()
	mustGet(t, c, "k")
	if r := mustGet(t, c, "k"); r.Value != "v2" || src.loads.Load() != loads+1 {
		t.Errorf("after a new proof: Get = %v with %d more loads; want v2 from 1 load, then a hit", r, src.loads.Load()-loads)
	}
}

// TestLinkLostKeepsOtherEntries guards against LinkLost turning into a
// flush: a Streams bus that resumes from its position delivers what it
// missed, and the entries it does not name stay good; dropping them would
// throw away what Streams exists to keep.
func TestLinkLostKeepsOtherEntries(t *testing.T) {
	clock := newFakeClock()
	bus := &fakeBus{clock: clock}
	src := newSource()
	src.write("a", "a1")
	src.write("b", "b1")
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock, MaxStaleness: time.Hour})
	bus.prove(clock.Now())
	mustGet(t, c, "a")
	mustGet(t, c, "b")
	bus.prove(time.Time{})
	bus.handler().LinkLost()
	clock.Advance(time.Millisecond)
	bus.prove(clock.Now())
	loads := src.loads.Load()
	mustGet(t, c, "a")
	mustGet(t, c, "b")
	if n := src.loads.Load() - loads; n != 0 {
		t.Errorf("after LinkLost and a new proof: %d loads; want 0 (the entries stay)", n)
	}
	if st := c.Stats(); st.Entries != 2 || st.Flushes != 0 {
		t.Errorf("Stats = %+v; want 2 entries, no flush", st)
	}
}

// gatedBus is a fakeBus whose next ProofAge, once armed, measures the
// proof's age, tells the test on entered whether there is a proof, and
// returns only when the test closes release: a cache caught between
// asking the bus and acting on the answer.
type gatedBus struct {
	*fakeBus
	armed   atomic.Bool
	entered chan bool
	release chan struct{}
}

func (g *gatedBus) Subscribe(namespace string, h Handler, maxStaleness time.Duration) (Subscription, error) {
	if _, err := g.fakeBus.Subscribe(namespace, h, maxStaleness); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *gatedBus) ProofAge() (time.Duration, bool) {
	age, ok := g.fakeBus.ProofAge()
	if g.armed.CompareAndSwap(true, false) {
		g.entered <- ok
		<-g.release
	}
	return age, ok
}

// TestLinkLostBeatsAConcurrentProof pins the interleaving
//
//	Get:  provenUntil ran out; ProofAge() = a ..................... provenUntil = now-a+MaxStaleness?
//	bus:                            link fails; ProofAge() not ok; LinkLost
//
// and guards against the cache extending its proof, after the
// revocation, on the strength of a proof read before it: it would then
// serve for MaxStaleness from a link the bus knows is down.
func TestLinkLostBeatsAConcurrentProof(t *testing.T) {
	clock := newFakeClock()
	bus := &gatedBus{fakeBus: &fakeBus{clock: clock}, entered: make(chan bool), release: make(chan struct{})}
	src := newSource()
	src.write("k", "v1")
	const maxStale = time.Hour
	c := newTestCache(t, 10, src.load, &Options[string, row]{Bus: bus, Clock: clock, MaxStaleness: maxStale, TTL: 24 * time.Hour})
	bus.prove(clock.Now())
	mustGet(t, c, "k") // stored under a proof that runs an hour
	clock.Advance(maxStale)
	bus.prove(clock.Now()) // a fresh proof, not yet seen by the cache

	bus.armed.Store(true)
	done := make(chan bool)
	go func() { done <- c.Proven() }() // provenUntil ran out: asks the bus
	if ok := <-bus.entered; !ok {
		t.Fatalf("the gated ProofAge read no proof")
	}
	bus.prove(time.Time{})
	bus.handler().LinkLost()
	close(bus.release)
	if <-done {
		t.Errorf("Proven() that read the proof before LinkLost and returned after it = true; want false")
	}

	loads := src.loads.Load()
	mustGet(t, c, "k")
	if st := c.Stats(); st.Bypassed != 1 || src.loads.Load() != loads+1 {
		t.Errorf("Get after LinkLost: %d loads, Stats = %+v; want it to bypass the cache (1 load, 1 bypassed)", src.loads.Load()-loads, st)
	}
	if c.Proven() {
		t.Errorf("Proven() after LinkLost = true; want false until the bus proves its link again")
	}
}

// TestLinkLostAfterCloseKeepsClosed guards against a revocation that
// arrives after Close overwriting Close's math.MinInt64 with a value that
// proven would then try to extend.
func TestLinkLostAfterCloseKeepsClosed(t *testing.T) {
	bus := &fakeBus{}
	c := newTestCache(t, 10, newSource().load, &Options[string, row]{Bus: bus})
	h := bus.handler()
	_ = c.Close()
	h.LinkLost()
	if got := c.provenUntil.Load(); got != math.MinInt64 {
		t.Errorf("provenUntil after Close and LinkLost = %d; want math.MinInt64 (closed)", got)
	}
}
