package invalidate

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// ciName returns a channel or stream name of the test's own on the shared
// cluster: its hash tag is the test's own, so it lies in a slot no other
// test uses, which the fault tests may move.
func ciName(t testing.TB) string {
	name := regexp.MustCompile(`[^A-Za-z0-9]+`).ReplaceAllString(t.Name(), "-")
	return "coherent-test:" + testenv.ClusterTag() + ":" + name
}

// TestCICluster runs the buses against the shared Redis Cluster of CI
// (REDIS_CLUSTER_ADDRS, three masters with a replica each; see
// internal/testenv and integration/rediscluster): the conformance suite of
// both transports, then the faults that change the cluster under caches
// that read and write. The faults come after the suite, not beside it:
// the suite counts flushes, and a failover flushes every subscription of
// the shard it swaps.
func TestCICluster(t *testing.T) {
	t.Parallel()
	testenv.RedisCluster(t) // skips, or fails under CI, without a cluster
	t.Run("Conformance", func(t *testing.T) {
		t.Run("PubSub", func(t *testing.T) {
			t.Parallel()
			invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
				cluster := testenv.RedisCluster(t)
				channel := ciName(t)
				nodes := make([]cache.Bus, n)
				for i := range nodes {
					// A client each, as separate processes would have.
					nodes[i] = newPubSub(t, cluster.Client(nil), testOptions(channel))
				}
				return nodes
			})
		})
		t.Run("Streams", func(t *testing.T) {
			t.Parallel()
			invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
				cluster := testenv.RedisCluster(t)
				key := ciStream(t, cluster)
				nodes := make([]cache.Bus, n)
				for i := range nodes {
					nodes[i] = newStreams(t, cluster.Client(nil), testStreamsOptions(key))
				}
				return nodes
			})
		})
	})
	// The two transports run at once, on different shards (0 and 1), and
	// each moves its slot to shard 2, which neither fails over: a slot
	// cannot move to a master that is being failed over, and a replica
	// cannot win a second election soon after its first (see
	// testenv.Cluster.Failover).
	t.Run("Faults", func(t *testing.T) {
		t.Run("PubSub", func(t *testing.T) {
			t.Parallel()
			cluster := testenv.RedisCluster(t)
			channel := ciShardName(t, cluster, 0)
			testCIClusterFaults(t, cluster, channel, true, func(clientName string) statsBus {
				client := cluster.Client(func(o *redis.ClusterOptions) { o.ClientName = clientName })
				return newPubSub(t, client, testOptions(channel))
			})
		})
		t.Run("Streams", func(t *testing.T) {
			t.Parallel()
			cluster := testenv.RedisCluster(t)
			key := ciShardName(t, cluster, 1)
			deleteStream(t, cluster, key)
			testCIClusterFaults(t, cluster, key, false, func(clientName string) statsBus {
				client := cluster.Client(func(o *redis.ClusterOptions) { o.ClientName = clientName })
				return newStreams(t, client, testStreamsOptions(key))
			})
		})
	})
}

// ciShardName is ciName in shard i of the cluster.
func ciShardName(t testing.TB, cluster *testenv.Cluster, i int) string {
	name := regexp.MustCompile(`[^A-Za-z0-9]+`).ReplaceAllString(t.Name(), "-")
	return "coherent-test:" + cluster.ShardTag(i) + ":" + name
}

// ciStream returns a stream key of the test's own, deleted at the end of
// the test.
func ciStream(t *testing.T, cluster *testenv.Cluster) string {
	key := ciName(t)
	deleteStream(t, cluster, key)
	return key
}

// deleteStream deletes key at the end of the test.
func deleteStream(t *testing.T, cluster *testenv.Cluster, key string) {
	admin := cluster.Client(nil)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = admin.Del(ctx, key).Err()
	})
}

// statsBus is a bus with counters: PubSub or Streams.
type statsBus interface {
	cache.Bus
	Stats() Stats
}

// testCIClusterFaults runs a writer cache and a reader cache, on two buses
// with clients of their own, while the test moves the slot of the bus's
// channel or stream to the master of shard 2 and back (CLUSTER SETSLOT
// MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE), then fails its master over
// to its replica and back (CLUSTER FAILOVER). The scenario counts every
// read that returns a version older than a write it must see (one that
// returned before the reader's last proof, or more than MaxStaleness
// before the read; see scenario), and after the faults every key must
// converge.
//
// What each fault costs a node, for PubSub: when the subscription is on a
// node that stops serving the slot (the source of a migration or one of
// its replicas, the master that a failover demotes), Redis unsubscribes it
// (sunsubscribe) and the bus subscribes again at the new owner and
// flushes (race 15); the test requires that flush, finding the node of
// each bus's subscribed connection by its client name before the fault. A
// subscription on the replica that a failover promotes stays, and needs no
// flush: the replica has received, in order, everything its master
// published before the master paused for the failover, and publishes the
// rest itself. For Streams the stream key moves with its slot (MIGRATE
// keeps its entries and IDs) or with its shard (a coordinated failover
// loses no write), so a node that follows the redirections resumes where
// it was without a flush; the test requires that it does not flush.
func testCIClusterFaults(t *testing.T, cluster *testenv.Cluster, name string, pubsub bool, newBus func(clientName string) statsBus) {
	slot := cluster.KeySlot(name)
	names := [2]string{testenv.Name("coh-test-writer-"), testenv.Name("coh-test-reader-")}
	buses := [2]statsBus{newBus(names[0]), newBus(names[1])}
	s := newScenario(t, buses[0], buses[1], 300*time.Millisecond)
	s.start()
	s.waitServing()

	// fault runs do, which takes the slot from the nodes at losing.
	checked := 0 // subscriptions found on a losing node
	fault := func(what string, losing []string, migration bool, do func()) {
		t.Helper()
		var before [2]Stats
		var at [2][]string
		for i, b := range buses {
			before[i] = b.Stats()
			if pubsub {
				at[i] = subscribedAt(t, cluster, names[i])
			}
		}
		bypassed := s.reader.Stats().Bypassed
		start := time.Now()
		do()
		took := time.Since(start)
		for i, b := range buses {
			if !slices.ContainsFunc(at[i], func(a string) bool { return slices.Contains(losing, a) }) {
				continue
			}
			checked++
			invalidatetest.WaitFor(t, fmt.Sprintf("a resubscription flush of the %s (subscribed at %v) after %s", nodeRole[i], at[i], what), func() bool {
				return b.Stats().FlushesResubscribe > before[i].FlushesResubscribe
			})
		}
		s.waitServing()
		var after [2]Stats
		for i, b := range buses {
			after[i] = b.Stats()
			if n := after[i].FlushesTrimmed - before[i].FlushesTrimmed; !pubsub && n != 0 {
				t.Errorf("the %s flushed %d times after %s as if the stream had lost entries; want 0 (it moves whole)", nodeRole[i], n, what)
			}
		}
		bypassed = s.reader.Stats().Bypassed - bypassed
		if pubsub && migration && bypassed == 0 {
			t.Errorf("the reader served from its cache throughout %s; want it to bypass the cache once its proofs stopped", what)
		}
		t.Logf("%s (slot %d, from %v) took %v; reads bypassing the cache %d", what, slot, losing, took.Round(time.Millisecond), bypassed)
		for i := range buses {
			t.Logf("  %s (subscribed at %v): %s", nodeRole[i], at[i], statsDelta(before[i], after[i]))
		}
	}
	// shardOf returns the addresses of the master that serves slot and of
	// its replicas.
	shardOf := func() (master string, all []string) {
		m, replicas := cluster.Shard(slot)
		all = []string{m.Addr}
		for _, r := range replicas {
			all = append(all, r.Addr)
		}
		return m.Addr, all
	}

	// The slot spends migrationPause, longer than MaxStaleness, between
	// MIGRATE and SETSLOT NODE, where the source redirects everything on
	// it with ASK: invalidations and probes, published by scripts that
	// declare the channel as a key, go to the target, which has no
	// subscribers yet. So PubSub nodes lose their proofs and must bypass
	// their caches until the move completes; the scenario checks that no
	// read returns a value older than MaxStaleness meanwhile.
	const migrationPause = 500 * time.Millisecond
	var back func()
	_, losing := shardOf()
	fault("slot moved to another master", losing, true, func() { back = cluster.MoveSlot(slot, 2, migrationPause) })
	_, losing = shardOf()
	fault("slot moved back", losing, true, func() { back() })
	master, _ := shardOf()
	fault("failover to the replica", []string{master}, false, func() { back = cluster.Failover(slot) })
	master, _ = shardOf()
	fault("fail-back", []string{master}, false, func() { back() })
	s.stopAndCheck()
	// Both subscriptions are on the slot's master before the first fault,
	// once the reader serves from its cache.
	if pubsub && checked < 2 {
		t.Errorf("found %d subscriptions on a node that lost the slot; want at least 2 (one per bus before the first move)", checked)
	}
}

var nodeRole = [2]string{"writer", "reader"}

// subscribedAt returns the addresses of the cluster nodes on which a
// connection named clientName holds sharded subscriptions.
func subscribedAt(t *testing.T, cluster *testenv.Cluster, clientName string) []string {
	t.Helper()
	var at []string
	for _, n := range cluster.Nodes() {
		admin := redis.NewClient(&redis.Options{Addr: n.Addr})
		list, err := admin.ClientList(context.Background()).Result()
		admin.Close()
		if err != nil {
			t.Fatalf("CLIENT LIST on %s: %v", n.Addr, err)
		}
		for _, line := range strings.Split(list, "\n") {
			fields := strings.Fields(line)
			if slices.Contains(fields, "name="+clientName) && !slices.Contains(fields, "ssub=0") && slices.ContainsFunc(fields, func(f string) bool { return strings.HasPrefix(f, "ssub=") }) {
				at = append(at, n.Addr)
			}
		}
	}
	return at
}

// statsDelta describes what changed between two snapshots of a bus's
// counters that a fault may change.
func statsDelta(a, b Stats) string {
	return "reconnects +" + itoa(int(b.Reconnects-a.Reconnects)) +
		", resubscribe flushes +" + itoa(int(b.FlushesResubscribe-a.FlushesResubscribe)) +
		", proof timeouts +" + itoa(int(b.ProofTimeouts-a.ProofTimeouts)) +
		", proof-timeout flushes +" + itoa(int(b.FlushesProofTimeout-a.FlushesProofTimeout)) +
		", gap flushes +" + itoa(int(b.FlushesGap-a.FlushesGap)) +
		", trimmed flushes +" + itoa(int(b.FlushesTrimmed-a.FlushesTrimmed)) +
		", publish errors +" + itoa(int(b.PublishErrors-a.PublishErrors)) +
		", messages received +" + itoa(int(b.MessagesReceived-a.MessagesReceived))
}
