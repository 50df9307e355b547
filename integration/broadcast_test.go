package integration

import (
	"testing"
	"time"

	"github.com/coherentcache/coherent/internal/testenv"
)

// TestBroadcast runs the standard workload, with outside writes of the put
// keys, on three nodes with value broadcast on (-broadcast), and closes
// their subscribed connections once midway: writes through the API send
// their values, which the other nodes install when they can tell they are
// the newest, captured writes stay invalidations, and the resubscription
// flushes. G1, G2 within boundProof, G3 and G6 hold as without broadcast,
// and values were installed.
func TestBroadcast(t *testing.T) {
	on := []string{"-broadcast"}
	c := newCluster(t, clusterConfig{Nodes: 3, Extra: map[int][]string{0: on, 1: on, 2: on}})
	w := standardWorkload()
	w.SQLOnPut = true
	stop := c.drive(w)
	time.Sleep(2 * time.Second)
	if _, err := c.killPubSub(testenv.Redis(t)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	stop()
	c.check(t, w.keys(), w.AddKeys, Bounds{API: boundProof, SQL: boundCapture})
	var sent, installed uint64
	for _, n := range c.nodes {
		s, err := c.stats(n)
		if err != nil {
			t.Fatalf("node %s: /stats: %v", n.short, err)
		}
		t.Logf("node %s: loads %d, values sent %d, installed %d, rejected %d", n.short, s.Cache.Loads, s.Cache.ValuesSent, s.Cache.ValuesInstalled, s.Cache.ValuesRejected)
		sent += s.Cache.ValuesSent
		installed += s.Cache.ValuesInstalled
	}
	if sent == 0 || installed == 0 {
		t.Errorf("values sent %d, installed %d; want both above 0 with -broadcast", sent, installed)
	}
}
