package invalidate

import (
	"context"
	"crypto/rand"
	"errors"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/piggyback"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

func TestNewPubSubRejects(t *testing.T) {
	t.Parallel()
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer ring.Close()
	replicas := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}, ReadOnly: true})
	defer replicas.Close()
	tests := []struct {
		name   string
		client redis.UniversalClient
		opts   *PubSubOptions
	}{
		{"nil client", nil, nil},
		{"ring", ring, nil},
		{"cluster reading replicas", replicas, nil},
		{"negative ProofInterval", client, &PubSubOptions{Options: Options{ProofInterval: -1}}},
		{"negative BatchWindow", client, &PubSubOptions{Options: Options{BatchWindow: -1}}},
		{"negative BatchKeys", client, &PubSubOptions{Options: Options{BatchKeys: -1}}},
		{"negative MaxBackoff", client, &PubSubOptions{Options: Options{MaxBackoff: -1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := NewPubSub(tt.client, tt.opts)
			if !errors.Is(err, ErrInvalidOptions) {
				if b != nil {
					_ = b.Close()
				}
				t.Fatalf("NewPubSub() error = %v; want ErrInvalidOptions", err)
			}
		})
	}
}

func TestPubSubSubscribeRejects(t *testing.T) {
	t.Parallel()
	b := newPubSub(t, newClient(t, nil), testOptions(uniqueName(t)))
	if _, err := b.Subscribe("", new(invalidatetest.Recorder), staleness); err == nil {
		t.Errorf("Subscribe(\"\") error = nil; want an error")
	}
	if _, err := b.Subscribe(strings.Repeat("n", cache.MaxKeyLen+1), new(invalidatetest.Recorder), staleness); err == nil {
		t.Errorf("Subscribe(too long) error = nil; want an error")
	}
	if _, err := b.Subscribe("ns", nil, staleness); err == nil {
		t.Errorf("Subscribe(nil handler) error = nil; want an error")
	}
	s, err := b.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	if err != nil {
		t.Fatal(err)
	}
	for _, keys := range [][]cache.Invalidation{{{Key: ""}}, {{Key: "ok"}, {Key: strings.Repeat("k", cache.MaxKeyLen+1)}}} {
		if err := s.Publish(context.Background(), keys); !errors.Is(err, cache.ErrInvalidKey) {
			t.Errorf("Publish(key of length %d) error = %v; want ErrInvalidKey", len(keys[len(keys)-1].Key), err)
		}
	}
	_ = b.Close()
	if _, err := b.Subscribe("ns", new(invalidatetest.Recorder), staleness); !errors.Is(err, ErrClosed) {
		t.Errorf("Subscribe after Close error = %v; want ErrClosed", err)
	}
	if err := s.Publish(context.Background(), []cache.Invalidation{{Key: "k"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Publish after Close error = %v; want ErrClosed", err)
	}
	if age, ok := s.ProofAge(); ok {
		t.Errorf("ProofAge after Close = %v, true; want no proof", age)
	}
}

// TestPubSubCloseStopsGoroutines is not parallel: it compares the
// goroutines before and after.
func TestPubSubCloseStopsGoroutines(t *testing.T) {
	testenv.RedisOptions(t) // skip before taking the snapshot
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	client := redis.NewClient(testenv.RedisOptions(t))
	defer client.Close()
	b, err := NewPubSub(client, testOptions(uniqueName(t)))
	if err != nil {
		t.Fatal(err)
	}
	s, err := b.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	if err != nil {
		t.Fatal(err)
	}
	invalidatetest.WaitProven(t, s)
	if err := s.Publish(context.Background(), []cache.Invalidation{{Key: "k"}}); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("Close() error = %v", err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close() error = %v; want nil", err)
	}
}

// TestPubSubPublishError checks that a failed PUBLISH reaches the writer
// (race 9), and that Publish honours its context while it waits.
func TestPubSubPublishError(t *testing.T) {
	t.Parallel()
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1})
	defer client.Close()
	b, err := NewPubSub(client, testOptions("ch"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	s, err := b.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Publish(context.Background(), []cache.Invalidation{{Key: "k"}})
	if err == nil || !strings.HasPrefix(err.Error(), "invalidate: ") {
		t.Errorf("Publish to an unreachable Redis error = %v; want an invalidate: error", err)
	}
	if st := b.Stats(); st.PublishErrors != 1 || st.MessagesSent != 0 {
		t.Errorf("Stats() = %+v; want PublishErrors 1, MessagesSent 0", st)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Publish(ctx, []cache.Invalidation{{Key: "k"}}); !errors.Is(err, context.Canceled) {
		t.Errorf("Publish(cancelled ctx) error = %v; want context.Canceled", err)
	}
	if age, ok := s.ProofAge(); ok {
		t.Errorf("ProofAge() without Redis = %v, true; want no proof", age)
	}
}

// TestPubSubGarbage publishes random bytes and hostile messages on the
// channel: each is counted and leads to a flush before the next proof
// (those in between share one), and the link keeps working.
func TestPubSubGarbage(t *testing.T) {
	t.Parallel()
	channel := uniqueName(t)
	raw := newClient(t, nil)
	b := newPubSub(t, newClient(t, nil), testOptions(channel))
	a := newPubSub(t, newClient(t, nil), testOptions(channel))
	rb := new(invalidatetest.Recorder)
	sb, _ := b.Subscribe("ns", rb, staleness)
	sa, _ := a.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	invalidatetest.WaitProven(t, sa, sb)
	rb.Reset()

	var garbage [][]byte
	for range 40 {
		g := make([]byte, 1+len(garbage)*7)
		_, _ = rand.Read(g)
		garbage = append(garbage, g)
	}
	hostile := func(m message) []byte { return appendMessage(nil, &m) }
	var origin nodeID
	_, _ = rand.Read(origin[:])
	valid := hostile(message{namespace: "ns", origin: origin, seq: 1, keys: []cache.Invalidation{{Key: "k"}}})
	garbage = append(garbage,
		nil,                                      // empty payload
		[]byte{magic, formatV3 + 1, kindKeys},    // a future version
		append(valid[:len(valid):len(valid)], 0), // trailing byte
		valid[:len(valid)-2],                     // truncated
		append([]byte{magic, formatV2, kindKeys}, 0xff, 0xff, 0xff), // huge namespace length
		hostile(message{namespace: "ns", origin: origin, seq: 0, flush: true}),
		[]byte(strings.Repeat("\xc0\x01\x01", 1000)),
		make([]byte, MaxMessageSize+1), // oversized
	)
	ctx := context.Background()
	for _, g := range garbage {
		if err := raw.Publish(ctx, channel, g).Err(); err != nil {
			t.Fatal(err)
		}
	}
	publishKeys(t, sa, "after")
	invalidatetest.WaitFor(t, "the key after the garbage", func() bool { return rb.Has("after") })
	// The flush is done before the proof that follows the garbage.
	invalidatetest.WaitProven(t, sb)
	st := b.Stats()
	if st.MessagesMalformed != uint64(len(garbage)) {
		t.Errorf("MessagesMalformed = %d; want %d", st.MessagesMalformed, len(garbage))
	}
	if st.FlushesMalformed == 0 || st.FlushesMalformed+st.FlushesCoalesced != uint64(len(garbage)) {
		t.Errorf("FlushesMalformed = %d, FlushesCoalesced = %d; want at least one flush, and %d in all", st.FlushesMalformed, st.FlushesCoalesced, len(garbage))
	}
	if got := rb.Flushes(); got != int(st.FlushesMalformed) {
		t.Errorf("handler flushed %d times; want %d (FlushesMalformed)", got, st.FlushesMalformed)
	}
	if st.FlushesResubscribe != 0 || st.Reconnects != 0 {
		t.Errorf("garbage broke the link: %+v", st)
	}
	start := time.Now()
	invalidatetest.WaitFor(t, "a new proof", func() bool { return invalidatetest.ProofTime(sb).After(start) })
}

func publishKeys(t testing.TB, s cache.Subscription, keys ...string) {
	t.Helper()
	invs := make([]cache.Invalidation, len(keys))
	for i, k := range keys {
		invs[i] = cache.Invalidation{Key: k}
	}
	ctx, cancel := context.WithTimeout(context.Background(), invalidatetest.Timeout)
	defer cancel()
	if err := s.Publish(ctx, invs); err != nil {
		t.Fatalf("Publish(%q) error = %v", keys, err)
	}
}

// TestPubSubSequenceGap feeds a node messages of a made-up origin: a skip,
// a replay and a message from a new origin.
func TestPubSubSequenceGap(t *testing.T) {
	t.Parallel()
	channel := uniqueName(t)
	raw := newClient(t, nil)
	b := newPubSub(t, newClient(t, nil), testOptions(channel))
	rb := new(invalidatetest.Recorder)
	sb, _ := b.Subscribe("ns", rb, staleness)
	invalidatetest.WaitProven(t, sb)
	rb.Reset()
	var x, y nodeID
	_, _ = rand.Read(x[:])
	_, _ = rand.Read(y[:])
	steps := []struct {
		origin nodeID
		seq    uint64
		key    string
		gap    bool
	}{
		{x, 7, "x7", false}, // a new origin sets its baseline
		{x, 8, "x8", false},
		{y, 1, "y1", false},
		{x, 10, "x10", true}, // 9 is missing
		{x, 11, "x11", false},
		{x, 11, "x11again", true}, // a replay
		{b.hub.cfg.node(), 99, "echo", false},
		{y, 2, "y2", false},
	}
	ctx := context.Background()
	for _, s := range steps {
		m := appendMessage(nil, &message{namespace: "ns", origin: s.origin, seq: s.seq, keys: []cache.Invalidation{{Key: s.key}}})
		if err := raw.Publish(ctx, channel, m).Err(); err != nil {
			t.Fatal(err)
		}
	}
	invalidatetest.WaitFor(t, "the last message", func() bool { return rb.Has("y2") })
	invalidatetest.WaitProven(t, sb) // the flush is done before the proof
	var want []string
	gaps := 0
	for _, s := range steps {
		switch {
		case s.gap:
			gaps++
		case s.origin != b.hub.cfg.node():
			want = append(want, s.key)
		}
	}
	if got := rb.Keys(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("delivered %q; want %q (a gap flushes instead of delivering; the echo is ignored)", got, want)
	}
	// The gaps share a flush if no proof came between them.
	if st := b.Stats(); st.FlushesGap == 0 || st.FlushesGap+st.FlushesCoalesced != uint64(gaps) || rb.Flushes() != int(st.FlushesGap) {
		t.Errorf("FlushesGap = %d, FlushesCoalesced = %d, handler flushes = %d; want %d gaps in all, each flush once", st.FlushesGap, st.FlushesCoalesced, rb.Flushes(), gaps)
	}
}

// panicky panics in Invalidate, and in Flush while flushPanics is set.
type panicky struct {
	invalidatetest.Recorder
	flushPanics atomic.Bool
}

func (p *panicky) Invalidate(keys []cache.Invalidation) {
	p.Recorder.Invalidate(keys)
	panic("bad handler")
}

func (p *panicky) Flush() {
	if p.flushPanics.Load() {
		panic("bad flush")
	}
	p.Recorder.Flush()
}

// TestPubSubHandlerPanic checks race 14: a handler that fails while
// applying an invalidation is flushed, and one whose Flush fails stays
// unproven until a Flush succeeds.
func TestPubSubHandlerPanic(t *testing.T) {
	t.Parallel()
	channel := uniqueName(t)
	a := newPubSub(t, newClient(t, nil), testOptions(channel))
	b := newPubSub(t, newClient(t, nil), testOptions(channel))
	sa, _ := a.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	h := new(panicky)
	sb, _ := b.Subscribe("ns", h, staleness)
	good := new(invalidatetest.Recorder)
	sg, _ := b.Subscribe("ns", good, staleness)
	invalidatetest.WaitProven(t, sa, sb, sg)
	h.Reset()

	publishKeys(t, sa, "k1")
	invalidatetest.WaitFor(t, "the flush after the panic", func() bool { return h.Flushes() == 1 })
	invalidatetest.WaitFor(t, "the other handler", func() bool { return good.Has("k1") })
	if st := b.Stats(); st.HandlerPanics != 1 {
		t.Errorf("HandlerPanics = %d; want 1", st.HandlerPanics)
	}
	if !invalidatetest.Proven(sb) {
		t.Errorf("a handler that panicked but flushed reports no proof")
	}

	h.flushPanics.Store(true)
	publishKeys(t, sa, "k2")
	invalidatetest.WaitFor(t, "the handler to be unproven", func() bool { return !invalidatetest.Proven(sb) })
	if !invalidatetest.Proven(sg) {
		t.Errorf("another handler lost its proof")
	}
	h.flushPanics.Store(false)
	publishKeys(t, sa) // a namespace flush, which now succeeds
	invalidatetest.WaitProven(t, sb)
}

// TestPubSubBatching checks that concurrent publications share messages,
// with or without a BatchWindow, and that BatchKeys 1 sends one key per
// message.
func TestPubSubBatching(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name      string
		batchKeys int
		window    time.Duration
	}{
		{"group commit", 0, 0},
		{"window", 0, 20 * time.Millisecond},
		{"one key per message", 1, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			channel := uniqueName(t)
			opts := testOptions(channel)
			opts.BatchKeys, opts.BatchWindow = tt.batchKeys, tt.window
			a := newPubSub(t, newClient(t, nil), opts)
			b := newPubSub(t, newClient(t, nil), testOptions(channel))
			sa, _ := a.Subscribe("ns", new(invalidatetest.Recorder), staleness)
			rb := new(invalidatetest.Recorder)
			sb, _ := b.Subscribe("ns", rb, staleness)
			invalidatetest.WaitProven(t, sa, sb)
			rb.Reset()
			const writers, each = 20, 25
			var wg sync.WaitGroup
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range each {
						publishKeys(t, sa, "w"+itoa(w)+"-"+itoa(i), "shared")
					}
				}()
			}
			wg.Wait()
			keys := writers*each + 1
			invalidatetest.WaitFor(t, "every key", func() bool {
				seen := map[string]bool{}
				for _, k := range rb.Keys() {
					seen[k] = true
				}
				return len(seen) == keys
			})
			st := a.Stats()
			t.Logf("%d Publish calls of 2 keys → %d messages, %d keys", writers*each, st.MessagesSent, st.KeysSent)
			switch {
			case tt.batchKeys == 1 && st.MessagesSent != st.KeysSent:
				t.Errorf("BatchKeys 1: %d messages for %d keys; want one per key", st.MessagesSent, st.KeysSent)
			case tt.batchKeys == 0 && tt.window == 0 && st.MessagesSent >= writers*each:
				t.Errorf("%d messages for %d concurrent Publish calls; want fewer (group commit)", st.MessagesSent, writers*each)
			case tt.window > 0 && st.MessagesSent*2 > writers*each:
				t.Errorf("%d messages for %d concurrent Publish calls; want them batched", st.MessagesSent, writers*each)
			}
			if f := rb.Flushes(); f != 0 {
				t.Errorf("%d flushes; want 0", f)
			}
		})
	}
}

// TestPubSubLargeBatchSplits publishes more than fits in one message.
func TestPubSubLargeBatchSplits(t *testing.T) {
	t.Parallel()
	channel := uniqueName(t)
	a := newPubSub(t, newClient(t, nil), testOptions(channel))
	b := newPubSub(t, newClient(t, nil), testOptions(channel))
	sa, _ := a.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	rb := new(invalidatetest.Recorder)
	sb, _ := b.Subscribe("ns", rb, staleness)
	invalidatetest.WaitProven(t, sa, sb)
	keys := make([]string, 1200) // 1200 × 4 KiB: over BatchKeys, over 4 MiB (two script calls)
	for i := range keys {
		keys[i] = itoa(i) + strings.Repeat("k", cache.MaxKeyLen-len(itoa(i)))
	}
	publishKeys(t, sa, keys...)
	invalidatetest.WaitFor(t, "every key", func() bool { return len(rb.Keys()) == len(keys) })
	if st := a.Stats(); st.MessagesSent < 5 {
		t.Errorf("MessagesSent = %d; want at least 5 (size limit)", st.MessagesSent)
	}
	if st := b.Stats(); st.FlushesGap+st.FlushesMalformed != 0 {
		t.Errorf("receiver stats %+v; want no flush", st)
	}
}

// TestPubSubKillSubscriber kills the reader's subscribed connection with
// CLIENT KILL ID while writes go on: go-redis resubscribes by itself, and
// the bus must flush each time (race 4), with no stale read.
func TestPubSubKillSubscriber(t *testing.T) {
	t.Parallel()
	channel := uniqueName(t)
	name := clientName(t)
	admin := newClient(t, nil)
	writer := newPubSub(t, newClient(t, nil), testOptions(channel))
	reader := newPubSub(t, newClient(t, func(o *redis.Options) { o.ClientName = name }), testOptions(channel))
	s := newScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	for i := 1; i <= 3; i++ {
		s.waitServing()
		var ids []string
		invalidatetest.WaitFor(t, "the subscriber in CLIENT LIST", func() bool {
			ids = clientIDs(t, admin, name)
			return len(ids) == 1
		})
		if err := admin.Do(context.Background(), "CLIENT", "KILL", "ID", ids[0]).Err(); err != nil {
			t.Fatalf("CLIENT KILL ID %s: %v", ids[0], err)
		}
		invalidatetest.WaitFor(t, "a resubscription flush", func() bool { return reader.Stats().FlushesResubscribe >= uint64(i) })
	}
	s.waitServing()
	s.stopAndCheck()
	t.Logf("reader bus %+v", reader.Stats())
}

// TestPubSubKillTypePubsub does the same with CLIENT KILL TYPE pubsub, on a
// private server so as not to disturb other tests' subscribers.
func TestPubSubKillTypePubsub(t *testing.T) {
	t.Parallel()
	srv := testenv.StartRedisServer(t)
	client := func() *redis.Client {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	admin := client()
	writer := newPubSub(t, client(), testOptions("ch"))
	reader := newPubSub(t, client(), testOptions("ch"))
	s := newScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	for i := 1; i <= 3; i++ {
		s.waitServing()
		if err := admin.Do(context.Background(), "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
			t.Fatalf("CLIENT KILL TYPE pubsub: %v", err)
		}
		invalidatetest.WaitFor(t, "resubscription flushes", func() bool {
			return reader.Stats().FlushesResubscribe >= uint64(i) && writer.Stats().FlushesResubscribe >= uint64(i)
		})
	}
	s.waitServing()
	s.stopAndCheck()
}

// TestPubSubSilentLink stalls the reader's link without closing it (race
// 5): the reader must bypass its cache after MaxStaleness, then flush and
// serve again when the link is back.
func TestPubSubSilentLink(t *testing.T) {
	t.Parallel()
	opt := testenv.RedisOptions(t)
	proxy, err := faultproxy.New(opt.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	channel := uniqueName(t)
	writer := newPubSub(t, newClient(t, nil), testOptions(channel))
	reader := newPubSub(t, newClient(t, func(o *redis.Options) { o.Addr = proxy.Addr() }), testOptions(channel))
	s := newScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	s.waitServing()

	proxy.Pause()
	s.waitBypassing()
	invalidatetest.WaitFor(t, "a proof timeout", func() bool { return reader.Stats().ProofTimeouts >= 1 })
	time.Sleep(300 * time.Millisecond) // let writes pile up behind the stalled link
	if age, ok := s.probe.ProofAge(); ok && age < staleness {
		t.Errorf("the proof advanced during the stall: %v ago", age)
	}
	proxy.Resume()
	invalidatetest.WaitFor(t, "a flush after the stall", func() bool {
		st := reader.Stats()
		return st.FlushesResubscribe+st.FlushesProofTimeout >= 1
	})
	s.waitServing()
	s.stopAndCheck()
	t.Logf("reader bus %+v", reader.Stats())
}

// TestPubSubNotServingBeforeProof checks race 12: a cache on a bus whose
// link has never been proven serves nothing cached.
func TestPubSubNotServingBeforeProof(t *testing.T) {
	t.Parallel()
	opt := testenv.RedisOptions(t)
	proxy, err := faultproxy.New(opt.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	proxy.Pause()
	bus := newPubSub(t, newClient(t, func(o *redis.Options) { o.Addr = proxy.Addr() }), testOptions(uniqueName(t)))
	src := &versioned{rows: map[string]int64{"k": 1}}
	c, err := cache.New("users", 10, src.load, &cache.Options[string, int64]{Bus: bus, MaxStaleness: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for range 50 {
		if _, err := c.Get(ctx, "k"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if st := c.Stats(); st.Hits != 0 || st.Bypassed != 50 {
		t.Errorf("before any proof: Stats() = %+v; want 0 hits, 50 bypassed", st)
	}
	proxy.Resume()
	invalidatetest.WaitFor(t, "a hit once proven", func() bool {
		_, _ = c.Get(ctx, "k")
		return c.Stats().Hits > 0
	})
}

// TestPubSubRedisRestart crashes and restarts a private Redis in the middle
// of a run: the reader bypasses during the outage, writes fail with an
// error (race 9), and after the restart the reader flushes and serves again.
func TestPubSubRedisRestart(t *testing.T) {
	t.Parallel()
	srv := testenv.StartRedisServer(t)
	client := func() *redis.Client {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	writer := newPubSub(t, client(), testOptions("ch"))
	reader := newPubSub(t, client(), testOptions("ch"))
	s := newScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	s.waitServing()

	srv.Stop()
	s.waitBypassing()
	invalidatetest.WaitFor(t, "failed writes", func() bool { return s.writeErrors.Load() > 0 })
	time.Sleep(400 * time.Millisecond)
	srv.Start()
	invalidatetest.WaitFor(t, "a flush after the restart", func() bool { return reader.Stats().FlushesResubscribe >= 1 })
	s.waitServing()
	s.stopAndCheck()
	if st := writer.Stats(); st.PublishErrors == 0 {
		t.Errorf("writer PublishErrors = 0 after an outage")
	}
	t.Logf("reader bus %+v", reader.Stats())
}

// blocking is a handler that blocks in Invalidate until released.
type blocking struct {
	invalidatetest.Recorder
	gate    chan struct{}
	blocked atomic.Bool
}

func (b *blocking) Invalidate(keys []cache.Invalidation) {
	b.blocked.Store(true)
	<-b.gate
	b.Recorder.Invalidate(keys)
}

// TestPubSubSlowSubscriber stalls a subscriber until Redis disconnects it
// for exceeding client-output-buffer-limit pubsub: a gap (race 4).
func TestPubSubSlowSubscriber(t *testing.T) {
	t.Parallel()
	srv := testenv.StartRedisServer(t, "--client-output-buffer-limit", "pubsub 32kb 16kb 1")
	client := func(name string) *redis.Client {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr(), ClientName: name})
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	admin := client("")
	writer := newPubSub(t, client(""), testOptions("ch"))
	// A long MaxStaleness (below), so that only Redis can end the
	// subscription.
	slow := newPubSub(t, client("slow"), testOptions("ch"))
	sw, _ := writer.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	h := &blocking{gate: make(chan struct{})}
	ss, _ := slow.Subscribe("ns", h, time.Minute)
	invalidatetest.WaitProven(t, sw, ss)

	publishKeys(t, sw, "first") // blocks the slow reader
	invalidatetest.WaitFor(t, "the reader to block", h.blocked.Load)
	big := strings.Repeat("x", 1000)
	for i := 0; len(clientIDs(t, admin, "slow")) > 0; i++ {
		if i > 10_000 {
			t.Fatalf("Redis did not disconnect the slow subscriber")
		}
		publishKeys(t, sw, big+itoa(i))
	}
	close(h.gate)
	invalidatetest.WaitFor(t, "a resubscription flush", func() bool { return slow.Stats().FlushesResubscribe >= 1 })
	invalidatetest.WaitProven(t, ss)
	publishKeys(t, sw, "after")
	invalidatetest.WaitFor(t, "delivery after the reconnect", func() bool { return h.Has("after") })
	t.Logf("slow bus %+v", slow.Stats())
}

// TestProveLateFlushes checks the proof rule on its own: a proof that comes
// more than the bus's staleness bound after the previous one flushes
// first, unless a flush happened in between.
func TestProveLateFlushes(t *testing.T) {
	t.Parallel()
	cfg, err := (&PubSubOptions{}).config()
	if err != nil {
		t.Fatal(err)
	}
	h := newHub(cfg, idleTransport{})
	r := new(invalidatetest.Recorder)
	if _, err := h.subscribe("ns", r, time.Second); err != nil {
		t.Fatal(err)
	}
	ms := int64(time.Second)
	steps := []struct {
		at      int64
		flushes int
	}{
		{1, 0},                 // first proof
		{1 + ms, 0},            // exactly MaxStaleness later: in time
		{2 + 2*ms + 1, 1},      // late: flush
		{3 + 3*ms + 2, 2},      // late again
		{3 + 3*ms + 100, 2},    // in time
		{math.MaxInt64 / 2, 3}, // far later
	}
	for i, s := range steps {
		h.prove(s.at, true)
		if got := r.Flushes(); got != s.flushes {
			t.Errorf("after proof %d at %d: %d flushes; want %d", i, s.at, got, s.flushes)
		}
	}
	h.flushAll(causeGap) // a flush in between: the next late proof needs none
	h.prove(math.MaxInt64/2+2*ms, true)
	if got := r.Flushes(); got != 4 {
		t.Errorf("late proof after a flush: %d flushes; want 4 (the gap's only)", got)
	}
	if st := h.stats.snapshot(); st.FlushesProofTimeout != 3 || st.Proofs != 7 {
		t.Errorf("Stats() = %+v; want FlushesProofTimeout 3, Proofs 7", st)
	}
}

// TestStalenessBound checks that the bus keeps the staleness bound of its
// subscriptions, set once, in the caches' options: the smallest of those
// open, or the default without one (a relay-only process); and that
// Subscribe rejects a bound the bus cannot keep, one not longer than its
// ProofInterval, with an error a cache passes on as its own invalid
// options.
func TestStalenessBound(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		interval, def time.Duration
	}{
		{0, time.Second}, // default ProofInterval, 100ms
		{500 * time.Millisecond, 5 * time.Second}, // ten ProofIntervals
	} {
		cfg, err := (&PubSubOptions{Options: Options{ProofInterval: tt.interval}}).config()
		if err != nil {
			t.Fatal(err)
		}
		h := newHub(cfg, idleTransport{})
		if got := h.maxStaleness(); got != tt.def {
			t.Errorf("ProofInterval %v: bound without a subscription = %v; want %v", cfg.ProofInterval, got, tt.def)
		}
		var subs []cache.Subscription
		for _, ms := range []time.Duration{3 * tt.def, 2 * tt.def, 4 * tt.def} {
			s, err := h.subscribe("ns", new(invalidatetest.Recorder), ms)
			if err != nil {
				t.Fatalf("subscribe(%v) error = %v", ms, err)
			}
			subs = append(subs, s)
		}
		for _, step := range []struct {
			close int
			want  time.Duration
		}{
			{-1, 2 * tt.def}, // the smallest
			{0, 2 * tt.def},
			{1, 4 * tt.def}, // the smallest of those left
			{2, tt.def},     // none left: the default
		} {
			if step.close >= 0 {
				_ = subs[step.close].Close()
			}
			if got := h.maxStaleness(); got != step.want {
				t.Errorf("ProofInterval %v, after closing subscription %d: bound = %v; want %v", cfg.ProofInterval, step.close, got, step.want)
			}
		}
		for _, ms := range []time.Duration{-1, 0, cfg.ProofInterval} {
			if _, err := h.subscribe("ns", new(invalidatetest.Recorder), ms); !errors.Is(err, cache.ErrInvalidOptions) {
				t.Errorf("ProofInterval %v: subscribe(%v) error = %v; want cache.ErrInvalidOptions", cfg.ProofInterval, ms, err)
			}
		}
		if got := h.maxStaleness(); got != tt.def {
			t.Errorf("bound after rejected subscriptions = %v; want %v", got, tt.def)
		}
	}
	// Through a cache, the error is the cache's own invalid options.
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = client.Close() })
	load := func(context.Context, string) (int, error) { return 0, nil }
	slow := Options{ProofInterval: time.Second}
	for _, b := range []cache.Bus{
		newPubSub(t, client, &PubSubOptions{Options: slow}),
		newStreams(t, client, &StreamsOptions{Options: slow}),
	} {
		if _, err := cache.New("ns", 10, load, &cache.Options[string, int]{Bus: b}); !errors.Is(err, cache.ErrInvalidOptions) {
			t.Errorf("%T: cache.New with the default MaxStaleness on a bus proving every second: error = %v; want cache.ErrInvalidOptions", b, err)
		}
	}
	if _, err := NewInProcess().Subscribe("ns", new(invalidatetest.Recorder), 0); !errors.Is(err, cache.ErrInvalidOptions) {
		t.Errorf("InProcess.Subscribe(0) error = %v; want cache.ErrInvalidOptions", err)
	}
}

// idleTransport is a transport that sends nothing anywhere, for tests of
// a hub on its own.
type idleTransport struct{}

func (idleTransport) send(context.Context, [][]byte, []*piggyback.Rider) error { return nil }
func (idleTransport) run(ctx context.Context)                                  { <-ctx.Done() }
