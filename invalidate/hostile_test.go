package invalidate

import (
	"context"
	cryptorand "crypto/rand"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// The tests in this file play a client that may PUBLISH on coherent's
// channels (or write its stream) but is not the application: DESIGN.md,
// "Trust". It may cost the nodes load; it must not make one serve a value
// past the staleness bound, nor exhaust its memory.

// probeBlocker is a go-redis hook that counts, and while fail is set
// fails, the bus's publications of its probes (the publishing script run
// on a proof channel), and lets everything else through: a node whose
// subscription works but whose own probes cannot come back.
type probeBlocker struct {
	prefix   string // the proof channels' prefix: the channel, ":proof:"
	fail     atomic.Bool
	attempts atomic.Int64 // probe publications tried
	failed   atomic.Int64 // probe publications failed by the hook
}

func (h *probeBlocker) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *probeBlocker) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (h *probeBlocker) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		if n := cmd.Name(); (n == "evalsha" || n == "eval") && len(args) > 3 && strings.HasPrefix(fmt.Sprint(args[3]), h.prefix) {
			h.attempts.Add(1)
			if h.fail.Load() {
				h.failed.Add(1)
				err := errors.New("test: probe publication blocked")
				cmd.SetErr(err)
				return err
			}
		}
		return next(ctx, cmd)
	}
}

// TestPubSubForgedProofs guards against forged proofs (DESIGN race 5,
// issue 12 item 1): a client that may PUBLISH finds a node's proof channel
// (PUBSUB CHANNELS lists it), and publishes what it guesses the node's
// outstanding probe to be, the next values of a counter, and replays every
// probe it saw come by. The node's own probes cannot come back (the hook
// fails their publication), so any proof it records is forged, and would
// let its caches serve past MaxStaleness while invalidations go past it.
// Probes of 16 random bytes checked exactly cannot be guessed, and a probe
// is accepted once, on the connection it was sent for.
func TestPubSubForgedProofs(t *testing.T) {
	t.Parallel()
	addr, admin := privateRedis(t)
	const channel = "coherent:invalidations"
	blocker := &probeBlocker{prefix: channel + ":proof:"}
	client := redis.NewClient(&redis.Options{Addr: addr})
	client.AddHook(blocker)
	t.Cleanup(func() { _ = client.Close() })
	bus := newPubSub(t, client, testOptions(channel))
	rec := new(invalidatetest.Recorder)
	sub, err := bus.Subscribe("ns", rec, staleness)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	invalidatetest.WaitProven(t, sub)

	ctx := context.Background()
	var probe string
	invalidatetest.WaitFor(t, "the proof channel in PUBSUB CHANNELS", func() bool {
		chans, err := admin.PubSubChannels(ctx, channel+":proof:*").Result()
		if err != nil {
			t.Fatalf("PUBSUB CHANNELS: %v", err)
		}
		if len(chans) == 1 {
			probe = chans[0]
		}
		return probe != ""
	})

	// The attacker listens to the proof channel and keeps the node's
	// probes that it sees (not its own forgeries, once they start).
	spy := admin.Subscribe(ctx, probe)
	defer spy.Close()
	if _, err := spy.Receive(ctx); err != nil { // the subscription's confirmation
		t.Fatal(err)
	}
	var (
		seenMu sync.Mutex
		seen   []string
	)
	spyDone := make(chan struct{})
	go func() {
		defer close(spyDone)
		for {
			msg, err := spy.Receive(ctx)
			if err != nil {
				return
			}
			if m, ok := msg.(*redis.Message); ok && !blocker.fail.Load() {
				seenMu.Lock()
				seen = append(seen, m.Payload)
				seenMu.Unlock()
			}
		}
	}()
	defer func() { _ = spy.Close(); <-spyDone }()
	invalidatetest.WaitFor(t, "the attacker to see a few probes", func() bool {
		seenMu.Lock()
		defer seenMu.Unlock()
		return len(seen) >= 5
	})

	// From now on no probe of the node's own reaches Redis. One already
	// published may still come back: the baseline is taken after the
	// first probe that timed out, which every later proof would follow.
	timeouts := bus.Stats().ProofTimeouts
	blocker.fail.Store(true)
	invalidatetest.WaitFor(t, "a probe to time out", func() bool { return bus.Stats().ProofTimeouts > timeouts })
	proofs := bus.Stats().Proofs
	failedBefore := blocker.failed.Load()

	forge := func() {
		// Counters near the number of probes tried so far, in the bases a
		// counter might be written in, and every probe seen.
		n := blocker.attempts.Load()
		var guesses []any
		for i := max(n-8, 1); i <= n+32; i++ {
			guesses = append(guesses, strconv.FormatInt(i, 36), strconv.FormatInt(i, 10))
		}
		seenMu.Lock()
		for _, p := range seen {
			guesses = append(guesses, p)
		}
		seenMu.Unlock()
		pipe := admin.Pipeline()
		for _, g := range guesses {
			pipe.Publish(ctx, probe, g)
		}
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatalf("forging probes: %v", err)
		}
	}
	// Forge until the node has tried (and failed) a good number of probes,
	// across a few reconnections (each probe times out after MaxStaleness),
	// so that every probe it had outstanding was exposed to the guesses.
	for blocker.failed.Load() < failedBefore+6 || bus.Stats().ProofTimeouts < timeouts+3 {
		forge()
		if bus.Proven() || invalidatetest.Proven(sub) {
			t.Fatalf("the node is proven while none of its probes can come back: forged proof (Stats %+v)", bus.Stats())
		}
	}
	if st := bus.Stats(); st.Proofs != proofs {
		t.Errorf("Stats().Proofs went from %d to %d while no probe could come back; want no forged proof", proofs, st.Proofs)
	}

	// The guard is not a dead link: once the node's probes get through, it
	// proves its link again.
	blocker.fail.Store(false)
	invalidatetest.WaitProven(t, sub)
}

// randomOrigin returns a fresh origin, as a flood of forged messages
// would carry: 16 bytes never seen before.
func randomOrigin(t testing.TB) nodeID {
	var id nodeID
	if _, err := cryptorand.Read(id[:]); err != nil {
		t.Fatal(err)
	}
	return id
}

// TestOriginFloodKeepsEstablishedOrigins guards against a flood of
// messages from fresh origins (a client that may PUBLISH makes up a new
// origin per message) evicting the origins of real nodes from the table
// that checks each origin's sequence: an evicted origin's next message
// only sets a new baseline, so a gap in its sequence (a publication that
// failed on its way to Redis) went unnoticed. An origin whose messages
// have followed each other is kept however many new origins come by.
func TestOriginFloodKeepsEstablishedOrigins(t *testing.T) {
	t.Parallel()
	var tab originTable
	real := randomOrigin(t)
	for seq := uint64(1); seq <= 3; seq++ {
		if tab.gap(real, seq) {
			t.Fatalf("gap(real, %d) = true on an unbroken sequence", seq)
		}
	}
	for range 4 * maxOrigins {
		if tab.gap(randomOrigin(t), 1) {
			t.Fatalf("a new origin's first message reported as a gap")
		}
	}
	if !tab.gap(real, 5) { // 4 is missing
		t.Errorf("gap(real, 5) after 3 = false after a flood of %d new origins; want true (the established origin was forgotten)", 4*maxOrigins)
	}
	if tab.gap(real, 6) {
		t.Errorf("gap(real, 6) after 5 = true; want false")
	}
}

// BenchmarkOriginTable measures the sequence check of a message from a
// known origin and from a new one in a full table, as a flood of forged
// origins makes it: both should cost about the same, whatever the
// table's size. new/known is their ratio in this run.
func BenchmarkOriginTable(b *testing.B) {
	ids := make([]nodeID, 1<<16)
	for i := range ids {
		ids[i] = randomOrigin(b)
	}
	var known float64
	b.Run("known", func(b *testing.B) {
		b.ReportAllocs()
		var tab originTable
		for i := range maxProtected {
			tab.gap(ids[i], 1)
			tab.gap(ids[i], 2)
		}
		seq := uint64(2)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if i%maxProtected == 0 {
				seq++
			}
			tab.gap(ids[i%maxProtected], seq)
		}
		known = float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	})
	b.Run("new", func(b *testing.B) {
		b.ReportAllocs()
		var tab originTable
		for i := range maxProtected {
			tab.gap(ids[i], 1)
			tab.gap(ids[i], 2)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			// Cycling through more ids than the table holds makes each
			// one new when it comes round again.
			tab.gap(ids[maxProtected+i%(len(ids)-maxProtected)], 1)
		}
		if fresh := float64(b.Elapsed().Nanoseconds()) / float64(b.N); known > 0 {
			b.ReportMetric(fresh/known, "new/known")
		}
	})
}

// junk returns n payloads that no decoder accepts: random bytes of random
// lengths, none starting with the magic byte.
func junk(n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		var l [1]byte
		_, _ = cryptorand.Read(l[:])
		p := make([]byte, 1+int(l[0])%64)
		_, _ = cryptorand.Read(p)
		if p[0] == magic {
			p[0] = 0
		}
		out[i] = p
	}
	return out
}

// floodTarget is what the flood tests need of a transport: a way to put
// payloads on the bus behind the application's back.
type floodTarget struct {
	name   string
	newBus func(t *testing.T, client *redis.Client) provenBus
	inject func(ctx context.Context, p redis.Pipeliner, payload []byte)
}

var floodTargets = []floodTarget{
	{"PubSub", func(t *testing.T, client *redis.Client) provenBus {
		return newPubSub(t, client, testOptions("coherent:invalidations"))
	}, func(ctx context.Context, p redis.Pipeliner, payload []byte) {
		p.Publish(ctx, "coherent:invalidations", payload)
	}},
	{"Streams", func(t *testing.T, client *redis.Client) provenBus {
		return newStreams(t, client, testStreamsOptions("coherent:invalidations:stream"))
	}, func(ctx context.Context, p redis.Pipeliner, payload []byte) {
		p.XAdd(ctx, &redis.XAddArgs{Stream: "coherent:invalidations:stream", Values: []any{fieldMessage, payload}})
	}},
}

// TestMalformedFloodCostsOneFlushPerProof guards against a flood of junk
// (issue 12 item 2): 20,000 malformed messages, each of which used to
// flush every cache on the node, a full flush per message, until the
// reader fell behind its own probes, reconnected and came back with a
// cold cache. Every message that cannot be read must still lead to a
// flush before the node proves its link again (race 4), but one flush
// covers all the messages before it: the node stops serving from memory
// at the first, and flushes once at the next proof, at most once per
// ProofInterval. So the flood costs reads through to the source while it
// lasts and one flush per ProofInterval; the reader keeps up (no proof
// timeout, no reconnection), and the node is proven again afterwards.
func TestMalformedFloodCostsOneFlushPerProof(t *testing.T) {
	// floodStaleness is the bound of the test's caches and subscriptions:
	// long enough that a loaded CI machine running the race detector
	// answers a probe within it while the flood is read, and far shorter
	// than the flood took the reader when each message flushed every cache.
	const floodStaleness = 2 * time.Second
	t.Parallel()
	for _, tr := range floodTargets {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			addr, admin := privateRedis(t)
			newBusClient := func() *redis.Client {
				c := redis.NewClient(&redis.Options{Addr: addr})
				t.Cleanup(func() { _ = c.Close() })
				return c
			}
			bus := tr.newBus(t, newBusClient())
			other := tr.newBus(t, newBusClient())
			// A cache of some size on the flooded node, so that flushes
			// cost what they cost in production.
			src := &countingLoader{rows: map[string]int64{}}
			for i := range 10_000 {
				src.rows[strconv.Itoa(i)] = int64(i)
			}
			c, err := cache.New("users", 20_000, src.load, &cache.Options[string, int64]{Bus: bus, MaxStaleness: floodStaleness})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rec := new(invalidatetest.Recorder)
			sub, err := bus.Subscribe("probe", rec, floodStaleness)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Close()
			osub, err := other.Subscribe("probe", new(invalidatetest.Recorder), floodStaleness)
			if err != nil {
				t.Fatal(err)
			}
			defer osub.Close()
			invalidatetest.WaitProven(t, sub, osub)
			ctx := context.Background()
			for k := range src.rows {
				if _, err := c.Get(ctx, k); err != nil {
					t.Fatal(err)
				}
			}
			before := bus.Stats()

			const n = 20_000
			start := time.Now()
			payloads := junk(n)
			for i := 0; i < n; i += 1000 {
				pipe := admin.Pipeline()
				for _, p := range payloads[i:min(i+1000, n)] {
					tr.inject(ctx, pipe, p)
				}
				if _, err := pipe.Exec(ctx); err != nil {
					t.Fatal(err)
				}
			}
			// A real invalidation after the flood: once it has arrived, the
			// node has read every junk message.
			if err := other.Publish(ctx, "probe", []cache.Invalidation{{Key: "after"}}); err != nil {
				t.Fatal(err)
			}
			// (Unless the reader fell so far behind that Redis cut it off,
			// and the invalidation went past it: that fails below.)
			invalidatetest.WaitFor(t, "the invalidation after the flood, or a reconnection", func() bool {
				return rec.Has("after") || bus.Stats().Reconnects > before.Reconnects
			})
			invalidatetest.WaitProven(t, sub)
			elapsed := time.Since(start)

			st := bus.Stats()
			flushes := st.FlushesMalformed - before.FlushesMalformed
			proofs := st.Proofs - before.Proofs
			// At most one flush per proof, two per ProofInterval (10ms in
			// testOptions), with one of each to spare.
			limit := min(proofs+1, 2*uint64(elapsed/(10*time.Millisecond))+2)
			t.Logf("%d junk messages in %v: %d flushes, %d proofs; stats %+v", n, elapsed, flushes, proofs, st)
			if flushes == 0 || flushes > limit {
				t.Errorf("%d junk messages cost %d flushes; want 1 to %d (one per proof, two per ProofInterval)", n, flushes, limit)
			}
			// Every junk message was counted, and led to a flush done or
			// shared: none is due once the node is proven again.
			if got := st.MessagesMalformed - before.MessagesMalformed; got != n {
				t.Errorf("MessagesMalformed grew by %d; want %d", got, n)
			}
			if got := flushes + st.FlushesCoalesced - before.FlushesCoalesced; got != n {
				t.Errorf("FlushesMalformed + FlushesCoalesced grew by %d; want %d, one per junk message", got, n)
			}
			if st.ProofTimeouts != before.ProofTimeouts || st.Reconnects != before.Reconnects || st.FlushesResubscribe != before.FlushesResubscribe {
				t.Errorf("the reader fell behind the flood: proof timeouts %d→%d, reconnections %d→%d, resubscription flushes %d→%d; want none",
					before.ProofTimeouts, st.ProofTimeouts, before.Reconnects, st.Reconnects, before.FlushesResubscribe, st.FlushesResubscribe)
			}
			if !bus.Proven() {
				t.Errorf("Proven() = false after the flood; want true")
			}
		})
	}
}

// TestDeferredFlushLeavesNothingStale guards the remedy of the flood
// tests: the flush that a message calls for (one the node cannot read, one
// after a gap in its origin's sequence, a publisher's request to flush
// the namespace) is deferred to the next proof, and must still drop
// everything that message may have invalidated. Here the message carries
// the real change of two keys: k1, cached before it, and k2, whose load
// read the old row before the write and stores it after the message
// arrived, where only a flush (or a read through) stands between it and a
// stale hit. The cache's MaxStaleness is a minute, so no timeout hides a
// mistake: from the moment the node has read the message, no Get may
// return the old version of either key, neither while the cache reads
// through nor after the next proof.
func TestDeferredFlushLeavesNothingStale(t *testing.T) {
	t.Parallel()
	origin := randomOrigin(t)
	kinds := []struct {
		name string
		// first, if not nil, is published before the test begins; the
		// message is published after the write.
		first, message []byte
	}{
		{"unreadable", nil, append(appendMessage(nil, &message{namespace: "users", origin: origin, seq: 1,
			keys: []cache.Invalidation{{Key: "k1", Version: 2}, {Key: "k2", Version: 2}}}), 0)}, // a trailing byte
		{"sequence gap", appendMessage(nil, &message{namespace: "other", origin: origin, seq: 1, keys: []cache.Invalidation{{Key: "x"}}}),
			appendMessage(nil, &message{namespace: "other", origin: origin, seq: 3, keys: []cache.Invalidation{{Key: "y"}}})}, // 2 went missing
		{"requested flush", nil, appendMessage(nil, &message{namespace: "users", origin: origin, seq: 1, flush: true})},
	}
	for _, tr := range floodTargets {
		for _, kind := range kinds {
			t.Run(tr.name+"/"+kind.name, func(t *testing.T) {
				t.Parallel()
				testDeferredFlush(t, tr, kind.first, kind.message)
			})
		}
	}
}

func testDeferredFlush(t *testing.T, tr floodTarget, first, msg []byte) {
	addr, admin := privateRedis(t)
	newBusClient := func() *redis.Client {
		c := redis.NewClient(&redis.Options{Addr: addr})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	bus, other := tr.newBus(t, newBusClient()), tr.newBus(t, newBusClient())
	src := &versioned{rows: map[string]int64{"k1": 1, "k2": 1}}
	var block atomic.Bool
	started, gate := make(chan struct{}, 1), make(chan struct{})
	load := func(ctx context.Context, key string) (int64, error) {
		v, err := src.load(ctx, key)
		if key == "k2" && block.CompareAndSwap(true, false) {
			started <- struct{}{}
			<-gate
		}
		return v, err
	}
	c, err := cache.New("users", 100, load, &cache.Options[string, int64]{
		Bus: bus, Version: func(v int64) int64 { return v }, MaxStaleness: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rec := new(invalidatetest.Recorder)
	sub, _ := bus.Subscribe("probe", rec, staleness)
	defer sub.Close()
	osub, _ := other.Subscribe("probe", new(invalidatetest.Recorder), staleness)
	defer osub.Close()
	invalidatetest.WaitProven(t, sub, osub)
	ctx := context.Background()
	inject := func(payload []byte) {
		t.Helper()
		pipe := admin.Pipeline()
		tr.inject(ctx, pipe, payload)
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// mark publishes an invalidation from the other node and waits for it:
	// the node has then read every message published before.
	mark := func(key string) {
		t.Helper()
		if err := other.Publish(ctx, "probe", []cache.Invalidation{{Key: key}}); err != nil {
			t.Fatal(err)
		}
		invalidatetest.WaitFor(t, "the node to read "+key, func() bool { return rec.Has(key) })
	}
	if first != nil {
		inject(first)
		mark("first")
	}
	hit := func(k string) bool {
		h := c.Stats().Hits
		_, _ = c.Get(ctx, k)
		return c.Stats().Hits > h
	}
	invalidatetest.WaitFor(t, "k1 served from memory", func() bool { return hit("k1") })

	block.Store(true)
	loaded := make(chan int64, 1)
	go func() {
		v, _ := c.Get(ctx, "k2")
		loaded <- v
	}()
	<-started // the load of k2 has read version 1
	src.write("k1")
	src.write("k2")
	inject(msg)
	mark("after")
	close(gate)
	if v := <-loaded; v != 1 {
		t.Fatalf("the load that read before the write returned version %d; want 1", v)
	}

	check := func(when string) {
		t.Helper()
		for _, k := range []string{"k1", "k2"} {
			if v, err := c.Get(ctx, k); err != nil || v != 2 {
				t.Fatalf("%s: Get(%q) = %d, %v; want version 2 (the message said version 1 is gone)", when, k, v, err)
			}
		}
	}
	check("right after the message")
	invalidatetest.WaitFor(t, "the node to serve from memory again", func() bool {
		check("until the next proof")
		return hit("k1") && hit("k2")
	})
	check("after the next proof")
}

// TestRequestedFlushFloodCostsOneFlushPerProof is
// TestMalformedFloodCostsOneFlushPerProof for well-formed requests to
// flush a namespace (what an empty-keys Publish sends), which anyone who
// may publish can forge as fast as junk, from made-up origins. Each must
// still lead to a flush of the namespace's caches before their next proof
// (an entry cached before it is not served after it), but the requests
// in between share one, and the other namespaces keep their proof.
func TestRequestedFlushFloodCostsOneFlushPerProof(t *testing.T) {
	t.Parallel()
	for _, tr := range floodTargets {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			addr, admin := privateRedis(t)
			newBusClient := func() *redis.Client {
				c := redis.NewClient(&redis.Options{Addr: addr})
				t.Cleanup(func() { _ = c.Close() })
				return c
			}
			bus, other := tr.newBus(t, newBusClient()), tr.newBus(t, newBusClient())
			src := &versioned{rows: map[string]int64{"k": 1}}
			c, err := cache.New("users", 100, src.load, &cache.Options[string, int64]{Bus: bus, MaxStaleness: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			orders := new(invalidatetest.Recorder) // another namespace on the node
			sub, _ := bus.Subscribe("orders", orders, staleness)
			defer sub.Close()
			osub, _ := other.Subscribe("orders", new(invalidatetest.Recorder), staleness)
			defer osub.Close()
			invalidatetest.WaitProven(t, sub, osub)
			orders.Reset()
			ctx := context.Background()
			hit := func() bool {
				h := c.Stats().Hits
				_, _ = c.Get(ctx, "k")
				return c.Stats().Hits > h
			}
			invalidatetest.WaitFor(t, "k served from memory", hit)
			src.write("k") // version 2, announced only by the flushes below
			before, cacheBefore := bus.Stats(), c.Stats()

			const n = 5000
			start := time.Now()
			for i := 0; i < n; i += 1000 {
				pipe := admin.Pipeline()
				for range min(1000, n-i) {
					tr.inject(ctx, pipe, appendMessage(nil, &message{namespace: "users", origin: randomOrigin(t), seq: 1, flush: true}))
				}
				if _, err := pipe.Exec(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if err := other.Publish(ctx, "orders", []cache.Invalidation{{Key: "after"}}); err != nil {
				t.Fatal(err)
			}
			invalidatetest.WaitFor(t, "the invalidation after the flood, or a reconnection", func() bool {
				return orders.Has("after") || bus.Stats().Reconnects > before.Reconnects
			})
			check := func(when string) {
				t.Helper()
				if v, err := c.Get(ctx, "k"); err != nil || v != 2 {
					t.Fatalf("%s: Get(k) = %d, %v; want version 2 (the flush requests came after it)", when, v, err)
				}
			}
			check("right after the requests")
			invalidatetest.WaitFor(t, "k served from memory again", func() bool {
				check("until the next proof")
				return hit()
			})
			elapsed := time.Since(start)

			st, cst := bus.Stats(), c.Stats()
			flushes := cst.Flushes - cacheBefore.Flushes
			limit := min(st.Proofs-before.Proofs+1, 2*uint64(elapsed/(10*time.Millisecond))+2)
			t.Logf("%d flush requests in %v: %d flushes; stats %+v", n, elapsed, flushes, st)
			if flushes == 0 || flushes > limit {
				t.Errorf("%d flush requests cost the cache %d flushes; want 1 to %d (one per proof, two per ProofInterval)", n, flushes, limit)
			}
			if got := st.FlushesRequested - before.FlushesRequested; got != n {
				t.Errorf("FlushesRequested grew by %d; want %d", got, n)
			}
			if got := flushes + st.FlushesCoalesced - before.FlushesCoalesced; got != n {
				t.Errorf("cache flushes + FlushesCoalesced grew by %d; want %d, one per request", got, n)
			}
			if f, l := orders.Flushes(), orders.LinksLost(); f != 0 || l != 0 {
				t.Errorf("the other namespace was flushed %d times and lost its link %d times; want neither", f, l)
			}
			if st.ProofTimeouts != before.ProofTimeouts || st.Reconnects != before.Reconnects || st.LinksLost != before.LinksLost {
				t.Errorf("the flood broke the link: before %+v, after %+v", before, st)
			}
		})
	}
}

// TestStreamsHugeEntriesBoundedAllocation guards against a stream entry
// that is far larger than any message (issue 12 item 4): the reader's
// XREAD returned whole entries, so six entries of 50 MiB each, added by
// a client that may write to the stream, made the node allocate hundreds
// of megabytes before it looked at a size. Whatever the stream holds, one
// read may keep at most one entry of at most MaxMessageSize bytes per
// field on this node; a larger field is passed over, unread, and counted
// as a malformed message (which flushes), and the reader carries on.
//
// It is not parallel: it measures the allocation of the whole process.
func TestStreamsHugeEntriesBoundedAllocation(t *testing.T) {
	srv := testenv.StartRedisServer(t)
	// The entries are made by Redis, so that this process allocates
	// nothing for them, one per script call, each of which holds Redis up
	// for a while: no client-side timeout, and no retry that would add
	// more.
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr(), ReadTimeout: -1, MaxRetries: -1})
	t.Cleanup(func() { _ = admin.Close() })
	const stream = "coherent:invalidations:stream"
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { _ = client.Close() })
	reader := newStreams(t, client, testStreamsOptions(stream))
	rec := new(invalidatetest.Recorder)
	// A long MaxStaleness: room for Redis to send the entries.
	sub, _ := reader.Subscribe("ns", rec, 10*time.Second)
	defer sub.Close()
	invalidatetest.WaitProven(t, sub)
	ctx := context.Background()

	// 50 MiB values of the message field, and a 50 MiB field name.
	const huge, values = 50 << 20, 5
	addValue := redis.NewScript(`return redis.call('XADD', KEYS[1], '*', 'm', string.rep('x', ARGV[1]))`)
	addName := redis.NewScript(`return redis.call('XADD', KEYS[1], '*', string.rep('m', ARGV[1]), 'x')`)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range values {
		if err := addValue.Run(ctx, admin, []string{stream}, huge).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := addName.Run(ctx, admin, []string{stream}, huge).Err(); err != nil {
		t.Fatal(err)
	}
	m := appendMessage(nil, &message{namespace: "ns", origin: randomOrigin(t), seq: 1, keys: []cache.Invalidation{{Key: "after"}}})
	if err := admin.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{fieldMessage, m}}).Err(); err != nil {
		t.Fatal(err)
	}
	invalidatetest.WaitFor(t, "the key after the huge entries", func() bool { return rec.Has("after") })
	invalidatetest.WaitProven(t, sub)
	runtime.ReadMemStats(&after)

	allocated := after.TotalAlloc - before.TotalAlloc
	st := reader.Stats()
	t.Logf("reading %d entries of %d MiB allocated %.1f MiB; reader stats %+v", values+1, huge>>20, float64(allocated)/(1<<20), st)
	if allocated > 20<<20 {
		t.Errorf("reading %d entries of %d MiB allocated %.1f MiB; want under 20 MiB", values+1, huge>>20, float64(allocated)/(1<<20))
	}
	if st.MessagesMalformed != values+1 || st.FlushesMalformed == 0 {
		t.Errorf("MessagesMalformed = %d, FlushesMalformed = %d; want %d and at least 1", st.MessagesMalformed, st.FlushesMalformed, values+1)
	}
}
