package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/internal/testenv"
)

// pollingWarning starts the relay's warning when notifications do not
// reach its LISTEN.
const pollingWarning = "store: notifications do not reach the relay's LISTEN"

// TestWebappThroughAPooler runs two webapp nodes whose -database-url goes
// through pgbouncer in transaction mode, with default_query_exec_mode=exec:
// n1 with -listen-url straight to the primary, n2 without. Puts, adds and
// deletes on both nodes and outside writes through the pooler must keep
// G1, G2 (outside writes within boundCapture: n1's relay is woken by
// notifications, n2's polls every RelayPoll) and G3. n1's relay must
// report that notifications reach it; n2's must warn that they do not,
// and poll. It guards a pooled deployment against statements that need a
// session (pgx's prepared statements, session settings, a LISTEN on a
// pooled connection), which fail or, for LISTEN, silently leave outside
// writes unannounced.
func TestWebappThroughAPooler(t *testing.T) {
	pooler, primary := testenv.PoolerURL(t)
	db := testenv.Database(t, primary)
	schema := testenv.Name("coh_test_")
	direct := testenv.WithDatabase(t, primary, db)
	// The webapp's unqualified "items" resolves through search_path, which
	// pgbouncer refuses as a connection parameter: the database carries
	// it. It is set before anything connects to the database through the
	// pooler, so that every server connection the pooler opens has it.
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, direct)
	if err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(ctx, `ALTER DATABASE `+pgx.Identifier{db}.Sanitize()+` SET search_path = `+pgx.Identifier{schema}.Sanitize())
	conn.Close(ctx)
	if err != nil {
		t.Fatal(err)
	}
	viaPooler := testenv.WithParam(t, testenv.WithDatabase(t, pooler, db), "default_query_exec_mode", "exec")
	c := newCluster(t, clusterConfig{Nodes: 2, DatabaseURL: viaPooler, Schema: schema,
		Extra: map[int][]string{0: {"-listen-url", direct}}})
	n1, n2 := c.node("n1"), c.node("n2")

	eventually(t, "n1's relay to report that notifications reach it", func() bool {
		s, err := c.stats(n1)
		return err == nil && s.Store.RelayListening
	})
	eventually(t, "n2's relay to warn that notifications do not reach it", func() bool {
		return strings.Contains(n2.log.String(), pollingWarning)
	})
	if s, err := c.stats(n2); err != nil || s.Store.RelayListening {
		t.Errorf("n2's /stats: RelayListening %v, %v; want false: it polls", s.Store.RelayListening, err)
	}
	if strings.Contains(n1.log.String(), pollingWarning) {
		t.Errorf("n1, with -listen-url, warns that notifications do not reach its relay:\n%s", tail(n1.log.String(), 20))
	}

	// An outside write through the pooler, to a key both nodes cache.
	for _, n := range c.nodes {
		if g := c.get(n, "x"); g.Outcome != OK || g.Found {
			t.Fatalf("get x on %s = %s; want a cached 404", n.short, describeOp(g))
		}
	}
	if op := c.sqlUpsert("x", "outside", 0); op.Outcome == Unknown {
		t.Fatalf("outside write through the pooler: %s", op.Err)
	}
	for _, n := range c.nodes {
		eventually(t, "node "+n.short+" to see the outside write", func() bool {
			g := c.get(n, "x")
			return g.Outcome == OK && g.Found && g.Value == "outside"
		})
	}

	w := standardWorkload()
	w.SQLOnPut = true
	w.SQLKeys = []string{"s1", "s2"}
	stop := c.drive(w)
	time.Sleep(3 * time.Second)
	stop()
	c.check(t, append(w.keys(), "x"), w.AddKeys, Bounds{API: boundProof, SQL: boundCapture})
}

// eventually polls cond until it holds, failing t after 10 s.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
