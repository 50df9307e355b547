package integration

import (
	"testing"
	"time"

	"github.com/coherentcache/coherent/internal/testenv"
)

// TestReplicaReads runs three nodes whose loads read a streaming replica
// (the webapp's -replica-url) while API and outside SQL writes go on, and
// pauses the replica's replay for two seconds in the middle (DESIGN race
// 10). Without the positions invalidations carry, a node whose
// invalidation arrived before the replica replayed the write would load
// the row the write replaced and serve it until its TTL: the checker would
// find reads stale far beyond the bound. With them, loads that the replica
// cannot serve go to the primary, and every bound holds.
func TestReplicaReads(t *testing.T) {
	primary, replica := testenv.ReplicaURLs(t)
	testenv.LockReplay(t, replica)
	c := newCluster(t, clusterConfig{Nodes: 3, DatabaseURL: primary, ReplicaURL: replica})
	w := standardWorkload()
	w.SQLOnPut = true
	w.SQLKeys = []string{"s1", "s2"}
	stop := c.drive(w)
	time.Sleep(1500 * time.Millisecond)
	before := c.replicaStats(t)
	resume := testenv.PauseReplay(t, replica)
	time.Sleep(2 * time.Second)
	paused := c.replicaStats(t)
	resume()
	time.Sleep(1500 * time.Millisecond)
	stop()
	after := c.replicaStats(t)
	c.check(t, w.keys(), w.AddKeys, Bounds{API: boundProof, SQL: boundCapture})
	t.Logf("replica stats summed over the nodes: before the pause %+v, at its end %+v, at the end %+v", before, paused, after)
	if before.ReplicaReads == 0 {
		t.Errorf("no load read the replica before its replay was paused: %+v", before)
	}
	if paused.Waits == before.Waits || paused.PrimaryReads == before.PrimaryReads {
		t.Errorf("with the replay paused, no load waited for the replica and then read the primary: %+v, before %+v", paused, before)
	}
	if after.ReplicaReads == paused.ReplicaReads {
		t.Errorf("no load read the replica after its replay resumed: %+v, at the pause's end %+v", after, paused)
	}
}

// replicaStats sums the nodes' replica counters.
func (c *cluster) replicaStats(t testing.TB) (sum struct{ ReplicaReads, Waits, PrimaryReads, ReplicaErrors uint64 }) {
	t.Helper()
	for _, n := range c.nodes {
		s, err := c.stats(n)
		if err != nil {
			t.Fatalf("%s: stats: %v", n.short, err)
		}
		sum.ReplicaReads += s.Replica.ReplicaReads
		sum.Waits += s.Replica.Waits
		sum.PrimaryReads += s.Replica.PrimaryReads
		sum.ReplicaErrors += s.Replica.ReplicaErrors
	}
	return sum
}
