package invalidate

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// redisCluster is a private two-node Redis Cluster: the first node holds
// every slot, the second none, until a test moves one.
type redisCluster struct {
	t     *testing.T
	nodes [2]*testenv.RedisServer
	ids   [2]string
}

func startRedisCluster(t *testing.T) *redisCluster {
	t.Helper()
	c := &redisCluster{t: t}
	for i := range c.nodes {
		c.nodes[i] = testenv.StartRedisServer(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--repl-diskless-sync-delay", "0")
	}
	ctx := context.Background()
	admin := c.admin(0)
	if err := admin.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", 0, 16383).Err(); err != nil {
		t.Fatalf("CLUSTER ADDSLOTSRANGE: %v", err)
	}
	host, port, _ := strings.Cut(c.nodes[1].Addr(), ":")
	if err := admin.ClusterMeet(ctx, host, port).Err(); err != nil {
		t.Fatalf("CLUSTER MEET: %v", err)
	}
	for i := range c.nodes {
		c.ids[i] = c.admin(i).ClusterMyID(ctx).Val()
		invalidatetest.WaitFor(t, "the cluster to form", func() bool {
			info := c.admin(i).ClusterInfo(ctx).Val()
			nodes := c.admin(i).ClusterNodes(ctx).Val()
			return strings.Contains(info, "cluster_state:ok") && strings.Count(nodes, "connected") == 2
		})
	}
	return c
}

func (c *redisCluster) admin(i int) *redis.Client {
	a := redis.NewClient(&redis.Options{Addr: c.nodes[i].Addr()})
	c.t.Cleanup(func() { _ = a.Close() })
	return a
}

func (c *redisCluster) client() *redis.ClusterClient {
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{c.nodes[0].Addr(), c.nodes[1].Addr()}})
	c.t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// moveSlot gives the slot of key, which holds no keys, to node to.
func (c *redisCluster) moveSlot(key string, to int) {
	ctx := context.Background()
	slot := c.admin(0).ClusterKeySlot(ctx, key).Val()
	for _, i := range []int{to, 1 - to} { // the new owner first
		if err := c.admin(i).Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", c.ids[to]).Err(); err != nil {
			c.t.Fatalf("CLUSTER SETSLOT %d NODE %s on node %d: %v", slot, c.ids[to], i, err)
		}
	}
}

func TestClusterConformance(t *testing.T) {
	t.Parallel()
	cluster := startRedisCluster(t)
	t.Run("PubSub", func(t *testing.T) {
		t.Parallel()
		invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
			channel := uniqueName(t)
			nodes := make([]cache.Bus, n)
			for i := range nodes {
				nodes[i] = newPubSub(t, cluster.client(), testOptions(channel))
			}
			return nodes
		})
	})
	t.Run("Streams", func(t *testing.T) {
		t.Parallel()
		invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
			key := uniqueName(t)
			nodes := make([]cache.Bus, n)
			for i := range nodes {
				nodes[i] = newStreams(t, cluster.client(), testStreamsOptions(key))
			}
			return nodes
		})
	})
}

// TestClusterSlotMigration moves the channel's slot to another node and
// back while writes go on (race 15): Redis unsubscribes the sharded
// subscription (sunsubscribe), and the bus must subscribe again at the new
// owner and flush, with no stale read. Moving the slot back leaves the
// second node without slots, so Redis makes it a replica of the first: a
// subscription that lands there answers PINGs but, in this setup, gets
// none of the invalidations, which is why the bus proves its link with
// probes published like invalidations.
func TestClusterSlotMigration(t *testing.T) {
	t.Parallel()
	cluster := startRedisCluster(t)
	channel := uniqueName(t)
	writer := newPubSub(t, cluster.client(), testOptions(channel))
	reader := newPubSub(t, cluster.client(), testOptions(channel))
	s := newScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	for i, to := range []int{1, 0} {
		s.waitServing()
		cluster.moveSlot(channel, to)
		invalidatetest.WaitFor(t, "a resubscription flush", func() bool { return reader.Stats().FlushesResubscribe >= uint64(i+1) })
	}
	s.waitServing()
	s.stopAndCheck()
	t.Logf("reader bus %+v", reader.Stats())
}

// TestClusterSubscribedToReplica routes everything the reader's client
// sends for the slot, its subscription and its publications, to a replica
// of the slot's master, as a stale slot map does after a failover. The
// replica relays what the master publishes, later (or, in some runs, not
// at all for a while); it would also accept a
// bare SPUBLISH and deliver it at once, so probes published that way would
// overtake the invalidations and prove too much (this test saw 15766 stale
// reads out of 93167 that way). Published through the master-only script,
// they come back after every invalidation published before them.
func TestClusterSubscribedToReplica(t *testing.T) {
	t.Parallel()
	cluster := startRedisCluster(t)
	ctx := context.Background()
	if err := cluster.admin(1).Do(ctx, "CLUSTER", "REPLICATE", cluster.ids[0]).Err(); err != nil {
		t.Fatalf("CLUSTER REPLICATE: %v", err)
	}
	invalidatetest.WaitFor(t, "node 1 to be a replica", func() bool {
		return strings.Contains(cluster.admin(1).Info(ctx, "replication").Val(), "master_link_status:up")
	})
	// The reader's client believes node 1 is the master of every slot.
	replica := cluster.nodes[1].Addr()
	misrouted := redis.NewClusterClient(&redis.ClusterOptions{
		ClusterSlots: func(context.Context) ([]redis.ClusterSlot, error) {
			return []redis.ClusterSlot{{Start: 0, End: 16383, Nodes: []redis.ClusterNode{{Addr: replica}}}}, nil
		},
	})
	t.Cleanup(func() { _ = misrouted.Close() })
	channel := uniqueName(t)
	writer := newPubSub(t, cluster.client(), testOptions(channel))
	reader := newPubSub(t, misrouted, testOptions(channel))
	s := newUnprovenScenario(t, writer, reader, 300*time.Millisecond)
	s.start()
	time.Sleep(time.Second)
	s.stopAndCheck()
	// Whether the replica relays (some runs it does not, for a while) only
	// decides whether the reader serves from its cache or bypasses it.
	t.Logf("reader bus %+v", reader.Stats())
}
