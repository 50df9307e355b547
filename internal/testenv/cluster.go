package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The shared Redis Cluster of the tests is named by REDIS_CLUSTER_ADDRS,
// a comma-separated list of seed addresses (host:port). .ci/run starts one
// with integration/rediscluster/cluster.sh, which a developer can run by
// hand too:
//
//	export "$(integration/rediscluster/cluster.sh start)"
//	go test -race -count=1 ./invalidate ./lockguard
//	integration/rediscluster/cluster.sh stop
//
// Without REDIS_CLUSTER_ADDRS the tests that need the cluster skip, or
// fail under CI, as with the other services.
//
// Conventions for tests that share the cluster, which tests of several
// packages use at the same time:
//
//   - Every key and channel of a test carries a hash tag of the test's own
//     ([ClusterTag], [Cluster.ShardTag]), or a prefix of its own
//     ([Cluster.KeyPrefix]), so that tests never share keys, and a test that
//     moves a slot moves only its own keys.
//   - Faults that change the cluster ([Cluster.MoveSlot], [Cluster.Failover])
//     undo themselves at the end of the test. A slot move touches only the
//     test's slot. A failover swaps master and replica of one shard, a third
//     of the slots: the clients of other tests see MOVED replies, which
//     go-redis's ClusterClient follows, and a pause of writes to that shard
//     while the replica takes over (well under a second here). Tests of
//     other packages must tolerate that (no leases or deadlines that
//     short); tests of the same package that count flushes or
//     reconnections must not run beside it.
//   - Shards are numbered by their main slot range (shard 0 serves slot 0).
//     Package invalidate's fault tests fail over shards 0 and 1 and move
//     their slots to shard 2; nothing fails shard 2 over.

// ClusterAddrs returns the seed addresses in REDIS_CLUSTER_ADDRS, or nil
// if it is not set.
func ClusterAddrs() []string {
	var addrs []string
	for a := range strings.SplitSeq(os.Getenv("REDIS_CLUSTER_ADDRS"), ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	return addrs
}

// Cluster is the Redis Cluster named by REDIS_CLUSTER_ADDRS, with the
// administration a fault test needs. It belongs to the test that
// [RedisCluster] was called with, which its methods fail and whose cleanup
// closes what they open: a subtest calls RedisCluster again.
type Cluster struct {
	t     testing.TB
	addrs []string
}

var clusterCheck struct {
	once sync.Once
	err  error
}

// RedisCluster returns the cluster named by REDIS_CLUSTER_ADDRS. It skips t
// when REDIS_CLUSTER_ADDRS is not set or the cluster is unreachable or not
// in state ok, and fails it instead under CI (see [Unavailable]).
func RedisCluster(t testing.TB) *Cluster {
	t.Helper()
	addrs := ClusterAddrs()
	if len(addrs) == 0 {
		Unavailable(t, "Redis Cluster", errors.New("REDIS_CLUSTER_ADDRS is not set (start one with integration/rediscluster/cluster.sh)"))
	}
	clusterCheck.once.Do(func() {
		clusterCheck.err = checkCluster(addrs)
	})
	if clusterCheck.err != nil {
		Unavailable(t, "Redis Cluster at "+strings.Join(addrs, ","), clusterCheck.err)
	}
	return &Cluster{t: t, addrs: addrs}
}

// checkCluster makes sure that a seed answers and every node it knows sees
// the cluster in state ok.
func checkCluster(addrs []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nodes, err := clusterNodesVia(ctx, addrs)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		c := redis.NewClient(&redis.Options{Addr: n.Addr, MaxRetries: -1})
		info, err := c.ClusterInfo(ctx).Result()
		c.Close()
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Addr, err)
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return fmt.Errorf("node %s: cluster_state is not ok", n.Addr)
		}
	}
	return nil
}

// ClusterClient returns a client of the cluster named by
// REDIS_CLUSTER_ADDRS, closed at the end of the test; see [RedisCluster].
func ClusterClient(t testing.TB) *redis.ClusterClient {
	t.Helper()
	return RedisCluster(t).Client(nil)
}

// Addrs returns the seed addresses.
func (c *Cluster) Addrs() []string { return slices.Clone(c.addrs) }

// Client returns a new client of the cluster, closed at the end of the
// test. mod, if not nil, adjusts its options first.
func (c *Cluster) Client(mod func(*redis.ClusterOptions)) *redis.ClusterClient {
	opt := &redis.ClusterOptions{Addrs: c.Addrs()}
	if mod != nil {
		mod(opt)
	}
	cc := redis.NewClusterClient(opt)
	c.t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// ClusterTag returns a Redis Cluster hash tag of the caller's own,
// "{coh-" followed by 12 random hex digits and "}": every key or channel
// that contains it hashes to its slot, and no other test's does (barring
// a collision of random tags on one of 16384 slots).
func ClusterTag() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "{coh-" + hex.EncodeToString(b[:]) + "}"
}

// ShardTag returns a [ClusterTag] whose slot lies in the main slot range
// of shard i (a master and its replicas), numbering the shards by the
// start of their main range, from 0, modulo their number. A shard's main
// range is its largest: a slot that a test moved there does not count,
// and the numbering survives failovers.
func (c *Cluster) ShardTag(i int) string {
	c.t.Helper()
	shard := c.shardRange(i)
	for range 10000 {
		tag := ClusterTag()
		if s := c.KeySlot(tag); shard[0] <= s && s <= shard[1] {
			return tag
		}
	}
	c.t.Fatalf("no tag found in slots %d-%d", shard[0], shard[1])
	return ""
}

// shardRange returns the main slot range of shard i.
func (c *Cluster) shardRange(i int) [2]int {
	c.t.Helper()
	var ranges [][2]int
	for _, n := range c.Nodes() {
		if n.IsMaster() && len(n.Slots) > 0 {
			ranges = append(ranges, mainRange(n.Slots))
		}
	}
	if len(ranges) == 0 {
		c.t.Fatalf("the cluster has no master with slots")
	}
	slices.SortFunc(ranges, func(a, b [2]int) int { return a[0] - b[0] })
	return ranges[i%len(ranges)]
}

// mainRange returns the largest of ranges.
func mainRange(ranges [][2]int) [2]int {
	return slices.MaxFunc(ranges, func(a, b [2]int) int { return (a[1] - a[0]) - (b[1] - b[0]) })
}

// KeyPrefix returns a key prefix of the test's own, made of
// "coherent-test:" and a [ClusterTag], so that its keys share one slot;
// they are deleted through client at the end of the test.
func (c *Cluster) KeyPrefix(client *redis.ClusterClient) string {
	prefix := "coherent-test:" + ClusterTag() + ":"
	DeleteClusterKeys(c.t, client, prefix)
	return prefix
}

// DeleteClusterKeys removes the keys matching prefix* from every master of
// the cluster at the end of the test, with a fresh context. (A SCAN
// through a ClusterClient visits one node only.)
func DeleteClusterKeys(t testing.TB, client *redis.ClusterClient, prefix string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		err := client.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			iter := m.Scan(ctx, 0, prefix+"*", 1000).Iterator()
			for iter.Next(ctx) {
				// One key at a time: keys of one prefix may lie in
				// several slots, and a DEL of several must not.
				if err := m.Del(ctx, iter.Val()).Err(); err != nil && !isRedirect(err) {
					return err
				}
			}
			return iter.Err()
		})
		if err != nil {
			t.Errorf("deleting the cluster keys %s*: %v", prefix, err)
		}
	})
}

// isRedirect reports whether err is a MOVED or ASK reply: the key moved
// away between SCAN and DEL, and is deleted where it went.
func isRedirect(err error) bool {
	s := err.Error()
	return strings.HasPrefix(s, "MOVED ") || strings.HasPrefix(s, "ASK ")
}

// ClusterNode is a node of the cluster, as one node's CLUSTER NODES
// describes it.
type ClusterNode struct {
	ID       string
	Addr     string   // host:port
	Flags    []string // myself, master, slave, fail?, fail, handshake, ...
	MasterID string   // for a replica, its master's ID; else empty
	Slots    [][2]int // slot ranges served, inclusive
}

// IsMaster reports whether the node is a master.
func (n ClusterNode) IsMaster() bool { return slices.Contains(n.Flags, "master") }

// Failing reports whether the node is flagged as failing, or not yet
// known.
func (n ClusterNode) Failing() bool {
	for _, f := range n.Flags {
		switch f {
		case "fail", "fail?", "handshake", "noaddr":
			return true
		}
	}
	return false
}

// Serves reports whether the node serves slot.
func (n ClusterNode) Serves(slot int) bool {
	for _, r := range n.Slots {
		if r[0] <= slot && slot <= r[1] {
			return true
		}
	}
	return false
}

// parseClusterNodes parses the reply of CLUSTER NODES.
func parseClusterNodes(s string) ([]ClusterNode, error) {
	var nodes []ClusterNode
	for line := range strings.SplitSeq(strings.TrimSpace(s), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			return nil, fmt.Errorf("CLUSTER NODES line %q: too few fields", line)
		}
		addr, _, _ := strings.Cut(f[1], "@")
		n := ClusterNode{ID: f[0], Addr: addr, Flags: strings.Split(f[2], ",")}
		if f[3] != "-" {
			n.MasterID = f[3]
		}
		for _, r := range f[8:] {
			if strings.HasPrefix(r, "[") { // a migration in progress: [slot->-id], [slot-<-id]
				continue
			}
			lo, hi, ok := strings.Cut(r, "-")
			if !ok {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("CLUSTER NODES line %q: bad slot range %q", line, r)
			}
			n.Slots = append(n.Slots, [2]int{a, b})
		}
		nodes = append(nodes, n)
	}
	return nodes, nil
}

// clusterNodesVia returns CLUSTER NODES of the first seed that answers.
func clusterNodesVia(ctx context.Context, addrs []string) ([]ClusterNode, error) {
	var errs []error
	for _, a := range addrs {
		c := redis.NewClient(&redis.Options{Addr: a, MaxRetries: -1})
		s, err := c.ClusterNodes(ctx).Result()
		c.Close()
		if err == nil {
			return parseClusterNodes(s)
		}
		errs = append(errs, fmt.Errorf("%s: %w", a, err))
	}
	return nil, errors.Join(errs...)
}

// Admin returns a plain client of the node at addr, closed at the end of
// the test.
func (c *Cluster) Admin(addr string) *redis.Client {
	a := redis.NewClient(&redis.Options{Addr: addr})
	c.t.Cleanup(func() { _ = a.Close() })
	return a
}

// nodeClient returns a plain client of the node at addr, for the caller
// to close.
func nodeClient(addr string) *redis.Client {
	return redis.NewClient(&redis.Options{Addr: addr})
}

// Nodes returns the nodes as the first seed that answers sees them.
func (c *Cluster) Nodes() []ClusterNode {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nodes, err := clusterNodesVia(ctx, c.addrs)
	if err != nil {
		c.t.Fatalf("CLUSTER NODES: %v", err)
	}
	return nodes
}

// KeySlot returns the slot of key, as the server computes it.
func (c *Cluster) KeySlot(key string) int {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, a := range c.addrs {
		cl := redis.NewClient(&redis.Options{Addr: a, MaxRetries: -1})
		n, err := cl.ClusterKeySlot(ctx, key).Result()
		cl.Close()
		if err == nil {
			return int(n)
		}
	}
	c.t.Fatalf("CLUSTER KEYSLOT %q: no seed answered", key)
	return 0
}

// Shard returns the master that serves slot and its replicas, as the
// first seed that answers sees them.
func (c *Cluster) Shard(slot int) (master ClusterNode, replicas []ClusterNode) {
	c.t.Helper()
	nodes := c.Nodes()
	found := false
	for _, n := range nodes {
		if n.IsMaster() && n.Serves(slot) {
			master, found = n, true
		}
	}
	if !found {
		c.t.Fatalf("no master serves slot %d: %+v", slot, nodes)
	}
	for _, n := range nodes {
		if n.MasterID == master.ID && !n.Failing() {
			replicas = append(replicas, n)
		}
	}
	return master, replicas
}

// waitConverged waits until every node of the cluster reports cluster
// state ok and a view of the nodes for which ok returns true, and fails
// the test if that takes longer than 30 seconds.
func (c *Cluster) waitConverged(what string, ok func(view []ClusterNode) bool) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := c.converged(ok)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("the cluster did not converge on %s within 30s: %v", what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *Cluster) converged(ok func(view []ClusterNode) bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	nodes, err := clusterNodesVia(ctx, c.addrs)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		cl := redis.NewClient(&redis.Options{Addr: n.Addr, MaxRetries: -1})
		info, err1 := cl.ClusterInfo(ctx).Result()
		s, err2 := cl.ClusterNodes(ctx).Result()
		cl.Close()
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("node %s: %w", n.Addr, err)
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return fmt.Errorf("node %s: cluster_state not ok", n.Addr)
		}
		view, err := parseClusterNodes(s)
		if err != nil {
			return err
		}
		if !ok(view) {
			return fmt.Errorf("node %s sees:\n%s", n.Addr, s)
		}
	}
	return nil
}

// owner returns the ID of the master that serves slot in view.
func owner(view []ClusterNode, slot int) string {
	for _, n := range view {
		if n.IsMaster() && n.Serves(slot) {
			return n.ID
		}
	}
	return ""
}

func nodeByID(view []ClusterNode, id string) (ClusterNode, bool) {
	for _, n := range view {
		if n.ID == id {
			return n, true
		}
	}
	return ClusterNode{}, false
}

// MoveSlot migrates slot, with its keys, from its master to the master of
// shard toShard (numbered as in [Cluster.ShardTag]), as redis-cli
// --cluster reshard does: SETSLOT IMPORTING on the target, SETSLOT
// MIGRATING on the source, MIGRATE of every key, then SETSLOT NODE on
// every master; it waits until every node agrees. Between the MIGRATE and
// the SETSLOT NODE it waits for pause: in that window the source still
// owns the slot but redirects every command on its keys to the target
// with ASK, and a script that declares a key it does not hold runs at the
// target too. MoveSlot returns a function that moves the slot back to the
// master of its first shard the same way, which also runs at the end of
// the test unless called before. Move only a slot of the test's own
// ([ClusterTag]), to a shard that no test fails over meanwhile.
func (c *Cluster) MoveSlot(slot, toShard int, pause time.Duration) (back func()) {
	c.t.Helper()
	from, _ := c.Shard(slot)
	home := mainRange(from.Slots)
	to := c.shardRange(toShard)
	target, _ := c.Shard(to[0])
	if target.ID == from.ID {
		c.t.Fatalf("slot %d is in shard %d already", slot, toShard)
	}
	c.moveSlot(slot, from, target, pause)
	back = c.once(func() {
		c.t.Helper()
		cur, _ := c.Shard(slot)
		orig, _ := c.Shard(home[0]) // the shard's master now
		if cur.ID != orig.ID {
			c.moveSlot(slot, cur, orig, pause)
		}
	})
	c.t.Cleanup(back)
	return back
}

// once returns a function that runs f on its first call only. (Unlike
// sync.Once it adds no frame between the caller and f, so that f's
// t.Helper calls point log lines at the caller.)
func (c *Cluster) once(f func()) func() {
	var mu sync.Mutex
	done := false
	return func() {
		c.t.Helper()
		mu.Lock()
		defer mu.Unlock()
		if done {
			return
		}
		done = true
		f()
	}
}

func (c *Cluster) moveSlot(slot int, from, to ClusterNode, pause time.Duration) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	src, dst := nodeClient(from.Addr), nodeClient(to.Addr)
	defer src.Close()
	defer dst.Close()
	do := func(cl *redis.Client, args ...any) {
		c.t.Helper()
		if err := cl.Do(ctx, args...).Err(); err != nil {
			c.t.Fatalf("%v on %s: %v", args, cl.Options().Addr, err)
		}
	}
	do(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", from.ID)
	do(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", to.ID)
	host, port, _ := strings.Cut(to.Addr, ":")
	for {
		keys, err := src.ClusterGetKeysInSlot(ctx, slot, 100).Result()
		if err != nil {
			c.t.Fatalf("CLUSTER GETKEYSINSLOT %d: %v", slot, err)
		}
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", host, port, "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		do(src, args...)
	}
	time.Sleep(pause)
	// The new owner first, so that it never refuses what the old one
	// redirects to it; then every other master, as redis-cli does.
	do(dst, "CLUSTER", "SETSLOT", slot, "NODE", to.ID)
	do(src, "CLUSTER", "SETSLOT", slot, "NODE", to.ID)
	for _, n := range c.Nodes() {
		if n.IsMaster() && n.ID != from.ID && n.ID != to.ID && !n.Failing() {
			cl := nodeClient(n.Addr)
			_ = cl.Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", to.ID).Err()
			cl.Close()
		}
	}
	c.waitConverged(fmt.Sprintf("slot %d at %s", slot, to.Addr), func(view []ClusterNode) bool {
		return owner(view, slot) == to.ID
	})
}

// Failover makes a replica of the master that serves slot its master,
// with a coordinated CLUSTER FAILOVER (the master pauses writes until the
// replica has caught up, so no write is lost), and waits until every node
// agrees that the replica serves slot and the old master is its replica.
// The old master may still be resynchronising when Failover returns. It
// returns a function that fails back the same way, which also runs at the
// end of the test unless called before. A replica that was asked to fail
// over a few seconds ago is first given time to be able to again (see
// failover).
func (c *Cluster) Failover(slot int) (back func()) {
	c.t.Helper()
	master, replicas := c.Shard(slot)
	if len(replicas) == 0 {
		c.t.Fatalf("the master %s of slot %d has no replica to fail over to", master.Addr, slot)
	}
	c.failover(slot, master, replicas[0])
	back = c.once(func() {
		c.t.Helper()
		cur, _ := c.Shard(slot)
		old, ok := nodeByID(c.Nodes(), master.ID)
		switch {
		case !ok:
			c.t.Errorf("node %s left the cluster; no fail-back", master.Addr)
		case cur.ID == master.ID: // back already
		case old.MasterID != cur.ID:
			c.t.Errorf("node %s no longer replicates %s; no fail-back", master.Addr, cur.Addr)
		default:
			c.failover(slot, cur, old)
		}
	})
	c.t.Cleanup(back)
	return back
}

func (c *Cluster) failover(slot int, master, replica ClusterNode) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rc := nodeClient(replica.Addr)
	defer rc.Close()
	linkUp := func(cl *redis.Client) bool {
		info, err := cl.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "master_link_status:up")
	}
	c.waitFor(fmt.Sprintf("replica %s linked to its master", replica.Addr), func() bool { return linkUp(rc) })
	done := func() bool {
		return c.converged(func(view []ClusterNode) bool {
			m, ok := nodeByID(view, master.ID)
			return owner(view, slot) == replica.ID && ok && m.MasterID == replica.ID
		}) == nil
	}
	// Redis 7.0 (clusterHandleSlaveFailover) times a replica's elections
	// with authTimeout = max(2×cluster-node-timeout, 2s): a manual failover
	// asked for less than authTimeout after the replica's previous election
	// reuses that election's votes and old epoch, so the replica claims
	// the slots, loses them at once to the current master, and the master
	// stays paused for writes for the 5s a manual failover may take; up to
	// 2×authTimeout, the replica only reports "Failover attempt expired".
	// So wait until 2×authTimeout has passed since the replica's last
	// election, which a file per node ID records across test processes.
	// A manual failover also gives up after 5s if the master does not
	// answer in time: ask again, until 2×authTimeout and some.
	nodeTimeout := 15 * time.Second // Redis's default
	if v, err := rc.ConfigGet(ctx, "cluster-node-timeout").Result(); err == nil {
		if ms, err := strconv.Atoi(v["cluster-node-timeout"]); err == nil {
			nodeTimeout = time.Duration(ms) * time.Millisecond
		}
	}
	retryAfter := 2*max(2*nodeTimeout, 2*time.Second) + 500*time.Millisecond
	if d := retryAfter - sinceElection(replica.ID); d > 0 {
		c.t.Logf("waiting %v: replica %s held an election less than %v ago", d.Round(time.Millisecond), replica.Addr, retryAfter)
		time.Sleep(d)
	}
	isReplica := func() bool {
		info, err := rc.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "role:slave")
	}
	deadline := time.Now().Add(retryAfter + 10*time.Second)
	var asked time.Time
	for !done() {
		if time.Now().After(deadline) {
			c.t.Fatalf("the failover of slot %d from %s to %s did not complete", slot, master.Addr, replica.Addr)
		}
		if time.Since(asked) > retryAfter && isReplica() {
			recordElection(replica.ID)
			if err := rc.ClusterFailover(ctx).Err(); err != nil {
				c.t.Fatalf("CLUSTER FAILOVER on %s: %v", replica.Addr, err)
			}
			asked = time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// electionsDir holds a file per cluster node ID whose modification time is
// when a test last asked that node to fail over.
var electionsDir = filepath.Join(os.TempDir(), "coherent-rediscluster-elections")

// sinceElection returns how long ago a test asked node id to fail over,
// or a long time if none did.
func sinceElection(id string) time.Duration {
	fi, err := os.Stat(filepath.Join(electionsDir, filepath.Base(id)))
	if err != nil {
		return 24 * time.Hour
	}
	return time.Since(fi.ModTime())
}

// recordElection records that node id is asked to fail over now.
func recordElection(id string) {
	_ = os.MkdirAll(electionsDir, 0o755)
	_ = os.WriteFile(filepath.Join(electionsDir, filepath.Base(id)), nil, 0o644)
	now := time.Now()
	_ = os.Chtimes(filepath.Join(electionsDir, filepath.Base(id)), now, now)
}

// waitFor polls cond for up to 30 seconds and fails the test if it does
// not hold by then.
func (c *Cluster) waitFor(what string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			c.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
