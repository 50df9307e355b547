package invalidate

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
	"github.com/coherentcache/coherent/lockguard"
)

// readmeACL returns the arguments of the ACL SETUSER line in the README,
// with its password replaced by password, and the user's name.
func readmeACL(t *testing.T, password string) (args []any, user string) {
	t.Helper()
	f, err := os.Open("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if !strings.HasPrefix(sc.Text(), "ACL SETUSER ") {
			continue
		}
		fields := strings.Fields(sc.Text())
		for _, f := range fields {
			if strings.HasPrefix(f, ">") {
				f = ">" + password
			}
			args = append(args, f)
		}
		return args, fields[2]
	}
	t.Fatalf("README.md has no ACL SETUSER line (err %v)", sc.Err())
	return nil, ""
}

// TestACLLineFromREADME guards the ACL line that the README's "Trust"
// section gives for the application's Redis user, on a single server and
// on a Cluster: it must let both buses prove their links and carry
// invalidations, and lockguard take, wait for and release locks, with the
// default names; and it must keep the user off every other key and
// channel, and off administration. A command or pattern missing from the
// line shows as a bus that never proves its link or a lock that cannot be
// taken; one too many, as a command that is not refused.
func TestACLLineFromREADME(t *testing.T) {
	t.Parallel()
	var pw [16]byte
	_, _ = rand.Read(pw[:])
	password := hex.EncodeToString(pw[:])
	args, user := readmeACL(t, password)
	ctx := context.Background()

	t.Run("Server", func(t *testing.T) {
		t.Parallel()
		srv := testenv.StartRedisServer(t)
		admin := srv.Client()
		if err := admin.Do(ctx, args...).Err(); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		newUserClient := func(protocol int) *redis.Client {
			c := redis.NewClient(&redis.Options{Addr: srv.Addr(), Username: user, Password: password, Protocol: protocol, ClientName: "coherent-acl-test"})
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
		for _, protocol := range []int{2, 3} {
			t.Run("RESP"+itoa(protocol), func(t *testing.T) {
				testACLBuses(t, func() redis.UniversalClient { return newUserClient(protocol) })
			})
		}
		t.Run("lockguard", func(t *testing.T) {
			testACLLocks(t, newUserClient(3), newUserClient(3), func(channel string) int64 {
				return admin.PubSubNumSub(ctx, channel).Val()[channel]
			})
		})
		t.Run("denied", func(t *testing.T) {
			testACLDenied(t, admin, newUserClient(3), user)
		})
	})

	t.Run("Cluster", func(t *testing.T) {
		t.Parallel()
		cluster := startRedisCluster(t)
		for i := range cluster.nodes {
			if err := cluster.admin(i).Do(ctx, args...).Err(); err != nil {
				t.Fatalf("%v: %v", args, err)
			}
		}
		newUserClient := func() redis.UniversalClient {
			c := redis.NewClusterClient(&redis.ClusterOptions{
				Addrs: []string{cluster.nodes[0].Addr(), cluster.nodes[1].Addr()}, Username: user, Password: password,
			})
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
		testACLBuses(t, newUserClient)
		t.Run("lockguard", func(t *testing.T) {
			testACLLocks(t, newUserClient(), newUserClient(), func(channel string) int64 {
				var n int64
				for i := range cluster.nodes {
					n += cluster.admin(i).PubSubNumSub(ctx, channel).Val()[channel]
				}
				return n
			})
		})
	})
}

// testACLBuses runs two nodes of each transport, on clients newClient
// makes, with the default names: they must prove their links and carry an
// invalidation and a namespace flush, without errors.
func testACLBuses(t *testing.T, newClient func() redis.UniversalClient) {
	ctx := context.Background()
	names := map[string]string{"PubSub": "coherent:invalidations", "Streams": "coherent:invalidations:stream"}
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			a := tr.newBus(t, newClient(), names[tr.name])
			b := tr.newBus(t, newClient(), names[tr.name])
			sa, err := a.Subscribe("ns", new(invalidatetest.Recorder), staleness)
			if err != nil {
				t.Fatal(err)
			}
			defer sa.Close()
			rb := new(invalidatetest.Recorder)
			sb, err := b.Subscribe("ns", rb, staleness)
			if err != nil {
				t.Fatal(err)
			}
			defer sb.Close()
			invalidatetest.WaitProven(t, sa, sb)
			rb.Reset()
			publishKeys(t, sa, "k")
			invalidatetest.WaitFor(t, "the invalidation", func() bool { return rb.Has("k") })
			if err := a.Publish(ctx, "ns", nil); err != nil { // a namespace flush
				t.Fatal(err)
			}
			invalidatetest.WaitFor(t, "the flush", func() bool { return rb.Flushes() > 0 })
			invalidatetest.WaitProven(t, sb)
			for _, bus := range []provenBus{a, b} {
				if st := bus.Stats(); st.PublishErrors+st.Reconnects+st.MessagesMalformed != 0 {
					t.Errorf("Stats() = %+v; want no errors, reconnections or malformed messages", st)
				}
			}
		})
	}
}

// testACLLocks has one guard take and extend a lock, and another wait for
// it, subscribed to its release (subscribers counts the subscribers of a
// channel), take it when the first releases it, and unsubscribe.
func testACLLocks(t *testing.T, c1, c2 redis.UniversalClient, subscribers func(channel string) int64) {
	ctx, cancel := context.WithTimeout(context.Background(), invalidatetest.Timeout)
	defer cancel()
	g1, err := lockguard.New(c1, &lockguard.Options{TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer g1.Close()
	g2, err := lockguard.New(c2, &lockguard.Options{TTL: 5 * time.Second, MaxBackoff: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	const name, channel = "users/42", "coherent:lock:{users/42}"
	l1, err := g1.Acquire(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := l1.Extend(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	type result struct {
		l   *lockguard.Lock
		err error
	}
	got := make(chan result, 1)
	go func() {
		l, err := g2.Acquire(ctx, name) // its backoff is long: it waits for the notification
		got <- result{l, err}
	}()
	var r result
	received := false
	defer func() { // on every return: no goroutine or lock outlives the test
		if !received {
			cancel()
			r = <-got
		}
		if r.l != nil {
			_ = r.l.Release(context.Background())
		}
	}()
	invalidatetest.WaitFor(t, "the waiter to subscribe", func() bool { return subscribers(channel) > 0 })
	if err := l1.Release(ctx); err != nil {
		t.Fatal(err)
	}
	r, received = <-got, true
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() <= l1.Token() {
		t.Errorf("second token %d; want above %d", r.l.Token(), l1.Token())
	}
	invalidatetest.WaitFor(t, "the waiter to unsubscribe", func() bool { return subscribers(channel) == 0 })
	if err := r.l.Release(ctx); err != nil {
		t.Error(err)
	}
	if err := g1.AdvanceFence(ctx, name, r.l.Token()+10); err != nil {
		t.Error(err)
	}
}

// testACLDenied checks that c, logged in as user, can touch no key or
// channel outside coherent's prefixes, directly or from a script, nor
// administer the server.
func testACLDenied(t *testing.T, admin, c *redis.Client, user string) {
	ctx := context.Background()
	for _, cmd := range [][]any{
		{"set", "app:key", "x"},
		{"get", "app:key"},
		{"del", "app:key"},
		{"publish", "app:channel", "x"},
		{"subscribe", "app:channel"},
		{"eval", "return redis.call('SET', KEYS[1], 'x')", 1, "app:key"},
		{"eval", "return redis.call('PUBLISH', 'app:channel', 'x')", 0},
		{"flushall"},
		{"keys", "*"},
		{"config", "set", "maxmemory", "1"},
		{"acl", "setuser", user, "+@all"},
		{"client", "kill", "type", "pubsub"},
	} {
		// A script's command that the ACL refuses fails with ERR, not
		// NOPERM.
		if err := c.Do(ctx, cmd...).Err(); err == nil || !strings.Contains(err.Error(), "NOPERM") && !strings.Contains(err.Error(), "user executing the script can't") {
			t.Errorf("%v as %s: error %v; want a refusal", cmd, user, err)
		}
	}
	if n, err := admin.Exists(ctx, "app:key").Result(); err != nil || n != 0 {
		t.Errorf("app:key exists: %d, %v; want 0", n, err)
	}
}
