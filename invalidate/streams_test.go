package invalidate

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

func testStreamsOptions(stream string) *StreamsOptions {
	return &StreamsOptions{Stream: stream, Options: testBusOptions}
}

func newStreams(t testing.TB, client redis.UniversalClient, opts *StreamsOptions) *Streams {
	t.Helper()
	b, err := NewStreams(client, opts)
	if err != nil {
		t.Fatalf("NewStreams error = %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// streamKey returns a fresh stream key, deleted by t's cleanup.
func streamKey(t testing.TB, admin *redis.Client) string {
	key := uniqueName(t)
	t.Cleanup(func() { _ = admin.Del(context.Background(), key).Err() })
	return key
}

func TestStreamsConformance(t *testing.T) {
	t.Parallel()
	invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
		key := streamKey(t, newClient(t, nil))
		nodes := make([]cache.Bus, n)
		for i := range nodes {
			nodes[i] = newStreams(t, newClient(t, nil), testStreamsOptions(key))
		}
		return nodes
	})
}

func TestNewStreamsRejects(t *testing.T) {
	t.Parallel()
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer ring.Close()
	for _, tt := range []struct {
		name   string
		client redis.UniversalClient
		opts   *StreamsOptions
	}{
		{"nil client", nil, nil},
		{"ring", ring, nil},
		{"negative MaxLen", client, &StreamsOptions{MaxLen: -1}},
		{"negative ProofInterval", client, &StreamsOptions{Options: Options{ProofInterval: -1}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if b, err := NewStreams(tt.client, tt.opts); !errors.Is(err, ErrInvalidOptions) {
				if b != nil {
					_ = b.Close()
				}
				t.Fatalf("NewStreams() error = %v; want ErrInvalidOptions", err)
			}
		})
	}
}

// TestStreamsCloseStopsGoroutines is not parallel: it compares the
// goroutines before and after.
func TestStreamsCloseStopsGoroutines(t *testing.T) {
	testenv.RedisOptions(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	client := redis.NewClient(testenv.RedisOptions(t))
	defer client.Close()
	key := uniqueName(t)
	defer client.Del(context.Background(), key)
	b, err := NewStreams(client, testStreamsOptions(key))
	if err != nil {
		t.Fatal(err)
	}
	s, _ := b.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	invalidatetest.WaitProven(t, s)
	publishKeys(t, s, "k")
	_ = b.Close()
	_ = b.Close()
	if err := s.Publish(context.Background(), []cache.Invalidation{{Key: "k"}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Publish after Close error = %v; want ErrClosed", err)
	}
}

// proxied returns a client of the shared Redis through a fault proxy.
func proxied(t *testing.T) (*redis.Client, *faultproxy.Proxy) {
	t.Helper()
	proxy, err := faultproxy.New(testenv.RedisOptions(t).Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	return newClient(t, func(o *redis.Options) { o.Addr = proxy.Addr() }), proxy
}

// TestStreamsResumes cuts the reader off, twice (a killed connection and a
// stalled one), while another node publishes: the reader resumes from its
// position, receives everything in order, and does not flush.
func TestStreamsResumes(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	key := streamKey(t, admin)
	readerClient, proxy := proxied(t)
	writer := newStreams(t, newClient(t, nil), testStreamsOptions(key))
	reader := newStreams(t, readerClient, testStreamsOptions(key))
	sw, _ := writer.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	r := new(invalidatetest.Recorder)
	sr, _ := reader.Subscribe("ns", r, staleness)
	invalidatetest.WaitProven(t, sw, sr)
	r.Reset()

	var want []string
	publish := func(n int) {
		for range n {
			k := "k" + itoa(len(want))
			want = append(want, k)
			publishKeys(t, sw, k)
		}
	}
	publish(10)
	invalidatetest.WaitFor(t, "the first keys", func() bool { return len(r.Keys()) == len(want) })

	proxy.Pause()
	proxy.KillAll()
	publish(50)
	time.Sleep(100 * time.Millisecond)
	proxy.Resume()
	invalidatetest.WaitFor(t, "the keys sent while disconnected", func() bool { return len(r.Keys()) == len(want) })

	proxy.Pause() // stalled longer than MaxStaleness: the read is abandoned
	publish(50)
	invalidatetest.WaitFor(t, "the stalled read to be abandoned", func() bool { return reader.Stats().Reconnects >= 2 })
	if age, ok := sr.ProofAge(); ok && age < staleness {
		t.Errorf("the proof advanced during the stall: %v ago", age)
	}
	proxy.Resume()
	invalidatetest.WaitFor(t, "the keys sent while stalled", func() bool { return len(r.Keys()) == len(want) })
	invalidatetest.WaitProven(t, sr)

	if got := r.Keys(); !slices.Equal(got, want) {
		t.Errorf("received %d keys %q…; want %d in order", len(got), got[:min(5, len(got))], len(want))
	}
	if st := reader.Stats(); r.Flushes() != 0 || st.FlushesTrimmed != 0 {
		t.Errorf("reader flushed %d times (stats %+v); want 0: the stream held its position", r.Flushes(), st)
	}
}

// TestStreamsTrimmedPastPosition lets the stream be trimmed past a stalled
// reader's position: it flushes when it resumes.
func TestStreamsTrimmedPastPosition(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	key := streamKey(t, admin)
	readerClient, proxy := proxied(t)
	opts := testStreamsOptions(key)
	opts.MaxLen = 10 // trimmed by whole radix nodes of 100 entries
	writer := newStreams(t, newClient(t, nil), opts)
	reader := newStreams(t, readerClient, testStreamsOptions(key))
	sw, _ := writer.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	r := new(invalidatetest.Recorder)
	sr, _ := reader.Subscribe("ns", r, staleness)
	invalidatetest.WaitProven(t, sw, sr)
	r.Reset()

	proxy.Pause()
	for i := range 500 {
		publishKeys(t, sw, "k"+itoa(i))
	}
	if n := admin.XLen(context.Background(), key).Val(); n >= 500 {
		t.Fatalf("XLEN = %d; the stream was not trimmed", n)
	}
	proxy.Resume()
	invalidatetest.WaitFor(t, "a flush", func() bool { return r.Flushes() >= 1 })
	if st := reader.Stats(); st.FlushesTrimmed < 1 {
		t.Errorf("FlushesTrimmed = %d; want ≥ 1", st.FlushesTrimmed)
	}
	invalidatetest.WaitProven(t, sr)
	publishKeys(t, sw, "after")
	invalidatetest.WaitFor(t, "delivery after the flush", func() bool { return r.Has("after") })
}

// TestStreamsDeletedAfterPosition deletes (XDEL) an entry a stalled reader
// has not read: it flushes when it resumes.
func TestStreamsDeletedAfterPosition(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	key := streamKey(t, admin)
	readerClient, proxy := proxied(t)
	writer := newStreams(t, newClient(t, nil), testStreamsOptions(key))
	reader := newStreams(t, readerClient, testStreamsOptions(key))
	sw, _ := writer.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	r := new(invalidatetest.Recorder)
	sr, _ := reader.Subscribe("ns", r, staleness)
	invalidatetest.WaitProven(t, sw, sr)
	r.Reset()

	proxy.Pause()
	publishKeys(t, sw, "deleted")
	publishKeys(t, sw, "kept")
	ctx := context.Background()
	entries, err := admin.XRevRangeN(ctx, key, "+", "-", 2).Result()
	if err != nil || len(entries) != 2 {
		t.Fatalf("XREVRANGE = %v, %v", entries, err)
	}
	if err := admin.XDel(ctx, key, entries[1].ID).Err(); err != nil {
		t.Fatal(err)
	}
	proxy.Resume()
	invalidatetest.WaitFor(t, "a flush", func() bool { return r.Flushes() >= 1 })
	if st := reader.Stats(); st.FlushesTrimmed != 1 {
		t.Errorf("FlushesTrimmed = %d; want 1", st.FlushesTrimmed)
	}
	// The entry may have been delivered all the same, by a read that Redis
	// answered before the XDEL while the proxy held the reply: the bus
	// cannot tell, so it flushes either way.
}

// TestStreamsGarbage adds entries that are not ours: each leads to a flush
// before the next proof, and the reader reads on.
func TestStreamsGarbage(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	key := streamKey(t, admin)
	writer := newStreams(t, newClient(t, nil), testStreamsOptions(key))
	reader := newStreams(t, newClient(t, nil), testStreamsOptions(key))
	sw, _ := writer.Subscribe("ns", new(invalidatetest.Recorder), staleness)
	r := new(invalidatetest.Recorder)
	sr, _ := reader.Subscribe("ns", r, staleness)
	invalidatetest.WaitProven(t, sw, sr)
	r.Reset()
	ctx := context.Background()
	garbage := [][]any{
		{fieldMessage, "not a message"},
		{"other", "field"},
		{fieldMessage, appendMessage(nil, &message{namespace: "ns", origin: testOrigin, seq: 1, flush: true}), "extra", "x"},
	}
	for _, g := range garbage {
		if err := admin.XAdd(ctx, &redis.XAddArgs{Stream: key, Values: g}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	publishKeys(t, sw, "after")
	invalidatetest.WaitFor(t, "the key after the garbage", func() bool { return r.Has("after") })
	invalidatetest.WaitProven(t, sr) // the flush is done before the proof
	st := reader.Stats()
	if st.MessagesMalformed != uint64(len(garbage)) {
		t.Errorf("MessagesMalformed = %d; want %d", st.MessagesMalformed, len(garbage))
	}
	if st.FlushesMalformed == 0 || st.FlushesMalformed+st.FlushesCoalesced != uint64(len(garbage)) || r.Flushes() != int(st.FlushesMalformed) {
		t.Errorf("FlushesMalformed = %d, FlushesCoalesced = %d, handler flushes %d; want %d in all, each flush once", st.FlushesMalformed, st.FlushesCoalesced, r.Flushes(), len(garbage))
	}
}

// TestStreamsSilentLink stalls the reader's link: its cache bypasses after
// MaxStaleness, and serves again when the link is back; the stream held
// its position, so no flush is needed.
func TestStreamsSilentLink(t *testing.T) {
	t.Parallel()
	admin := newClient(t, nil)
	key := streamKey(t, admin)
	readerClient, proxy := proxied(t)
	writer := newStreams(t, newClient(t, nil), testStreamsOptions(key))
	reader := newStreams(t, readerClient, testStreamsOptions(key))
	s := newScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	s.waitServing()
	proxy.Pause()
	s.waitBypassing()
	time.Sleep(300 * time.Millisecond)
	proxy.Resume()
	s.waitServing()
	s.stopAndCheck()
	if st := reader.Stats(); st.FlushesTrimmed != 0 {
		t.Errorf("reader stats %+v; want no flush", st)
	}
}

// TestStreamsRedisRestart crashes and restarts a private Redis. Without
// persistence the stream is gone, and with it the reader's position: it
// flushes. With an append-only file synced on every write the stream
// survives: the reader resumes without a flush.
func TestStreamsRedisRestart(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name  string
		args  []string
		flush bool
	}{
		{"no persistence", nil, true},
		{"appendfsync always", []string{"--appendonly", "yes", "--appendfsync", "always"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv := testenv.StartRedisServer(t, tt.args...)
			client := func() *redis.Client {
				c := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
				t.Cleanup(func() { _ = c.Close() })
				return c
			}
			writer := newStreams(t, client(), testStreamsOptions("stream"))
			reader := newStreams(t, client(), testStreamsOptions("stream"))
			s := newScenario(t, writer, reader, 300*time.Millisecond)
			s.start()
			s.waitServing()
			srv.Stop()
			s.waitBypassing()
			time.Sleep(400 * time.Millisecond)
			srv.Start()
			s.waitServing()
			s.stopAndCheck()
			st := reader.Stats()
			if got := st.FlushesTrimmed > 0; got != tt.flush {
				t.Errorf("reader FlushesTrimmed = %d; want a flush: %v", st.FlushesTrimmed, tt.flush)
			}
			t.Logf("reader bus %+v", st)
		})
	}
}
