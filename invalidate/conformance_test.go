package invalidate

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

func TestInProcessConformance(t *testing.T) {
	t.Parallel()
	invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
		bus := NewInProcess()
		nodes := make([]cache.Bus, n)
		for i := range nodes {
			nodes[i] = bus // every subscription of an InProcess is a node
		}
		return nodes
	})
}

func TestPubSubConformance(t *testing.T) {
	t.Parallel()
	for _, proto := range []int{2, 3} {
		t.Run("RESP"+string(rune('0'+proto)), func(t *testing.T) {
			t.Parallel()
			invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
				channel := uniqueName(t)
				nodes := make([]cache.Bus, n)
				for i := range nodes {
					// Separate clients, as separate processes would have.
					client := newClient(t, func(o *redis.Options) { o.Protocol = proto })
					nodes[i] = newPubSub(t, client, testOptions(channel))
				}
				return nodes
			})
		})
	}
}

// namespacePublisher is what package store's relay needs of a bus: it
// publishes by namespace, and claims outbox rows only while Proven (race
// 17).
type namespacePublisher interface {
	cache.Bus
	Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error
	Proven() bool
}

var (
	_ namespacePublisher = (*InProcess)(nil)
	_ namespacePublisher = (*PubSub)(nil)
	_ namespacePublisher = (*Streams)(nil)
)

// TestPublishNamespace checks the bus-level Publish: every subscription of
// the namespace hears of it, on this node before Publish returns, and on
// the others.
func TestPublishNamespace(t *testing.T) {
	t.Parallel()
	inproc := NewInProcess()
	for _, tt := range []struct {
		name  string
		nodes func(t *testing.T) (namespacePublisher, cache.Bus)
	}{
		{"InProcess", func(t *testing.T) (namespacePublisher, cache.Bus) { return inproc, inproc }},
		{"PubSub", func(t *testing.T) (namespacePublisher, cache.Bus) {
			channel := uniqueName(t)
			return newPubSub(t, newClient(t, nil), testOptions(channel)), newPubSub(t, newClient(t, nil), testOptions(channel))
		}},
		{"Streams", func(t *testing.T) (namespacePublisher, cache.Bus) {
			key := streamKey(t, newClient(t, nil))
			return newStreams(t, newClient(t, nil), testStreamsOptions(key)), newStreams(t, newClient(t, nil), testStreamsOptions(key))
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			pub, other := tt.nodes(t)
			local, remote := new(invalidatetest.Recorder), new(invalidatetest.Recorder)
			ls, err := pub.Subscribe("ns", local, staleness)
			if err != nil {
				t.Fatal(err)
			}
			defer ls.Close()
			rs, err := other.Subscribe("ns", remote, staleness)
			if err != nil {
				t.Fatal(err)
			}
			defer rs.Close()
			invalidatetest.WaitProven(t, ls, rs)
			local.Reset()
			remote.Reset()
			ctx := context.Background()
			if err := pub.Publish(ctx, "ns", []cache.Invalidation{{Key: "k", Version: 3}}); err != nil {
				t.Fatalf("Publish error = %v", err)
			}
			if !local.Has("k") {
				t.Errorf("the local subscription did not receive k before Publish returned")
			}
			invalidatetest.WaitFor(t, "k on the other node", func() bool { return remote.Has("k") })
			if err := pub.Publish(ctx, "ns", nil); err != nil {
				t.Fatalf("Publish(flush) error = %v", err)
			}
			if local.Flushes() != 1 {
				t.Errorf("local flushes = %d; want 1", local.Flushes())
			}
			invalidatetest.WaitFor(t, "the flush on the other node", func() bool { return remote.Flushes() == 1 })
		})
	}
}

// TestInProcessStats: the in-process bus counts what it carries like the
// Redis transports do, so code that reports a bus's Stats works on any.
func TestInProcessStats(t *testing.T) {
	ctx := context.Background()
	bus := NewInProcess()
	var a, b, c recordingHandler
	subA, _ := bus.Subscribe("ns", &a, time.Second)
	bus.Subscribe("ns", &b, time.Second)
	bus.Subscribe("other", &c, time.Second)
	if err := subA.Publish(ctx, []cache.Invalidation{{Key: "k1"}, {Key: "k2"}}); err != nil {
		t.Fatal(err)
	}
	if err := bus.Publish(ctx, "ns", nil); err != nil { // a flush, to both
		t.Fatal(err)
	}
	want := Stats{MessagesSent: 2, KeysSent: 2, MessagesReceived: 3, KeysReceived: 2}
	if got := bus.Stats(); got != want {
		t.Errorf("Stats = %+v; want %+v", got, want)
	}
}

type recordingHandler struct{ n int }

func (h *recordingHandler) Invalidate([]cache.Invalidation) { h.n++ }
func (h *recordingHandler) Flush()                          { h.n++ }
func (h *recordingHandler) LinkLost()                       {}
