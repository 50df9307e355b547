package invalidate

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// The tests in this file pin the go-redis v9 behaviour that PubSub relies
// on, listed at the top of pubsub.go. If an upgrade changes it, they fail
// here rather than as a stale read somewhere else.

func receive(t *testing.T, ps *redis.PubSub) any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), invalidatetest.Timeout)
	defer cancel()
	msg, err := ps.Receive(ctx)
	if err != nil {
		t.Fatalf("Receive() error = %v", err)
	}
	return msg
}

// TestGoRedisResubscribesByItself: after its connection is killed, a
// PubSub returns the error once, then resubscribes by itself; the only
// sign is a new *Subscription.
func TestGoRedisResubscribesByItself(t *testing.T) {
	t.Parallel()
	name := clientName(t)
	client := newClient(t, func(o *redis.Options) { o.ClientName = name })
	admin := newClient(t, nil)
	channel := uniqueName(t)
	ps := client.Subscribe(context.Background(), channel)
	defer ps.Close()
	if _, ok := receive(t, ps).(*redis.Subscription); !ok {
		t.Fatalf("first Receive is not a *Subscription")
	}
	ids := clientIDs(t, admin, name)
	if len(ids) != 1 {
		t.Fatalf("subscribed connections named %s: %v", name, ids)
	}
	if err := admin.Do(context.Background(), "CLIENT", "KILL", "ID", ids[0]).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := ps.Receive(context.Background()); err == nil {
		t.Fatalf("Receive after CLIENT KILL error = nil; want the connection's error")
	}
	sub, ok := receive(t, ps).(*redis.Subscription)
	if !ok || sub.Kind != "subscribe" || sub.Channel != channel {
		t.Fatalf("Receive after the error = %v; want a new subscribe confirmation", sub)
	}
}

// TestGoRedisReceiveTimeoutKeepsConnection: a read timeout of
// ReceiveTimeout does not drop the connection, which is why the reader
// does not use it to detect a silent link (a timeout in the middle of a
// reply would leave the connection out of step).
func TestGoRedisReceiveTimeoutKeepsConnection(t *testing.T) {
	t.Parallel()
	client := newClient(t, nil)
	channel := uniqueName(t)
	ps := client.Subscribe(context.Background(), channel)
	defer ps.Close()
	receive(t, ps)
	_, err := ps.ReceiveTimeout(context.Background(), 10*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("ReceiveTimeout error = %v; want a timeout", err)
	}
	if err := client.Publish(context.Background(), channel, "after").Err(); err != nil {
		t.Fatal(err)
	}
	if m, ok := receive(t, ps).(*redis.Message); !ok || m.Payload != "after" {
		t.Fatalf("Receive after a timeout = %v; want the next message on the same subscription, no resubscription", m)
	}
}

// TestGoRedisHealthCheckMissesSilentLink: Channel()'s health check writes
// PING but never waits for the PONG, so a stalled link goes unnoticed.
func TestGoRedisHealthCheckMissesSilentLink(t *testing.T) {
	t.Parallel()
	proxy, err := faultproxy.New(testenv.RedisOptions(t).Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	client := newClient(t, func(o *redis.Options) { o.Addr = proxy.Addr() })
	ps := client.Subscribe(context.Background(), uniqueName(t))
	defer ps.Close()
	ps.Channel(redis.WithChannelHealthCheckInterval(20*time.Millisecond), redis.WithChannelPingTimeout(20*time.Millisecond))
	invalidatetest.WaitFor(t, "the subscription", func() bool { return proxy.Accepted() == 1 })
	proxy.Pause()
	time.Sleep(500 * time.Millisecond) // 25 health checks
	if n := proxy.Accepted(); n != 1 {
		t.Errorf("go-redis reconnected %d times on a stalled link; the health check now notices it (update pubsub.go)", n-1)
	}
	proxy.Resume()
}

// TestGoRedisChannelDropsWhenFull: Channel() drops a message once its
// buffer has stayed full for the send timeout.
func TestGoRedisChannelDropsWhenFull(t *testing.T) {
	t.Parallel()
	client := newClient(t, nil)
	channel := uniqueName(t)
	ps := client.Subscribe(context.Background(), channel)
	defer ps.Close()
	receive(t, ps) // confirmed before Channel takes over the reading
	ch := ps.Channel(redis.WithChannelSize(1), redis.WithChannelSendTimeout(10*time.Millisecond))
	const n = 10
	for i := range n {
		if err := client.Publish(context.Background(), channel, itoa(i)).Err(); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond) // a slow consumer
	got := 0
	for {
		select {
		case <-ch:
			got++
			continue
		case <-time.After(100 * time.Millisecond):
		}
		break
	}
	if got >= n {
		t.Errorf("Channel() delivered %d of %d messages to a slow consumer; want some dropped", got, n)
	}
}
