package invalidate

import (
	"context"
	cryptorand "crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

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
	sub, err := bus.Subscribe("ns", rec)
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
		if bus.Proven() || !sub.LastProof().IsZero() {
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
