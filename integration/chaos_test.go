package integration

import (
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"
)

// chaosStall is how long the chaos test stops a node: past its lock's
// lease (chaosLockTTL), and past MaxStaleness.
const (
	chaosStall   = 1200 * time.Millisecond
	chaosLockTTL = 500 * time.Millisecond
)

// boundChaos is G2's bound under every fault at once: boundRelay (a
// writer's publication failed while Redis restarted), plus one more
// RelayPoll (a relay round failed, its connection terminated, and it backs
// off), plus a stall (a relay stopped while it held outbox rows FOR UPDATE,
// which the other relays skip).
var boundChaos = grace + 2*relayPoll + maxStaleness + chaosStall + slack

// TestChaos injects every fault of the suite, at random and overlapping,
// for 15 seconds, under the standard workload plus outside writes: CLIENT
// KILL TYPE pubsub, Redis restarts, pg_terminate_backend of the nodes'
// connections (one goroutine); SIGSTOP of a node past its lock's lease,
// and nodes restarted to crash after a commit (another). Then it heals
// everything and checks G1, G2 within boundChaos, G3 and G6.
func TestChaos(t *testing.T) {
	runChaos(t, 15*time.Second)
}

// TestSoak is TestChaos for -soak.duration (default 5m). It runs only with
// -soak:
//
//	go test -race -timeout 30m -run TestSoak ./integration/ -soak
func TestSoak(t *testing.T) {
	if !*soak {
		t.Skip("the soak runs with -soak")
	}
	runChaos(t, *soakDuration)
}

func runChaos(t *testing.T, d time.Duration) {
	rs := startRedisServer(t)
	admin := rs.Client()
	c := newCluster(t, clusterConfig{Nodes: 3, RedisURL: rs.URL(), LockTTL: chaosLockTTL})
	w := standardWorkload()
	w.SQLOnPut = true
	w.SQLKeys = []string{"s1", "s2"}
	w.SQLPace = 50 * time.Millisecond
	if d > time.Minute {
		// A long run needs fresh keys to delete.
		for i := range int(d / (2 * time.Second)) {
			w.DelKeys = append(w.DelKeys, "d"+strconv.Itoa(i+100))
		}
	}
	stop := c.drive(w)
	until := time.Now().Add(d)
	counts := struct {
		sync.Mutex
		m map[string]int
	}{m: map[string]int{}}
	count := func(fault string) {
		counts.Lock()
		counts.m[fault]++
		counts.Unlock()
	}
	pause := func() { time.Sleep(500*time.Millisecond + rand.N(time.Second)) }

	var wg sync.WaitGroup
	// The links: Redis and Postgres.
	wg.Go(func() {
		for time.Now().Before(until) {
			pause()
			var err error
			switch rand.IntN(3) {
			case 0:
				_, err = killPubSub(admin)
				count("CLIENT KILL TYPE pubsub")
			case 1:
				rs.Stop()
				time.Sleep(time.Second)
				err = rs.TryStart()
				count("Redis restart")
			case 2:
				_, err = c.terminateBackends()
				count("pg_terminate_backend")
			}
			if err != nil {
				t.Errorf("chaos: %v", err)
				return
			}
		}
	})
	// The processes.
	wg.Go(func() {
		for time.Now().Before(until) {
			pause()
			n := c.nodes[rand.IntN(len(c.nodes))]
			switch rand.IntN(2) {
			case 0:
				n.pause()
				time.Sleep(chaosStall)
				n.resume()
				count("SIGSTOP past the lock's lease")
			case 1:
				// A process killed under load dies between a commit and
				// its publication now and then; TestCrashAfterCommit
				// makes that happen on purpose.
				n.kill()
				count("SIGKILL")
				if err := n.up(); err != nil {
					t.Errorf("restarting %s: %v", n.short, err)
					return
				}
			}
		}
	})
	wg.Wait()
	time.Sleep(500 * time.Millisecond) // writes on healed links, so the end is not all faults
	stop()
	t.Logf("faults injected: %v", counts.m)
	c.check(t, w.keys(), w.AddKeys, Bounds{API: boundChaos, SQL: boundChaos})
}
