package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// auditFigures is the "audit" object of a webapp's /stats (-audit-rate).
type auditFigures struct {
	Checked, Rechecks, Resolved, Inconsistencies, SourceErrors, Skipped uint64
	Consistency, Nines                                                  float64
}

// audit reads n's audit figures.
func (c *cluster) audit(t testing.TB, n *node) auditFigures {
	t.Helper()
	status, b, err := c.request(n, http.MethodGet, "/stats", nil)
	if err != nil || status != http.StatusOK {
		t.Fatalf("node %s: GET /stats = %d %s, %v", n.short, status, b, err)
	}
	var st struct{ Audit *auditFigures }
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	if st.Audit == nil {
		t.Fatalf("node %s: /stats has no audit object with -audit-rate", n.short)
	}
	return *st.Audit
}

// readItem returns what n serves for key, outside the history.
func (c *cluster) readItem(t testing.TB, n *node, key string) (item, int) {
	t.Helper()
	status, b, err := c.request(n, http.MethodGet, "/items/"+key, nil)
	if err != nil {
		t.Fatalf("node %s: GET %s: %v", n.short, key, err)
	}
	var it item
	if status == http.StatusOK {
		if err := json.Unmarshal(b, &it); err != nil {
			t.Fatal(err)
		}
	}
	return it, status
}

// auditRecheck is the webapp auditor's Recheck: its default, the nodes'
// MaxStaleness plus 3s.
const auditRecheck = maxStaleness + 3*time.Second

// TestWebappAudit runs three webapp nodes with -audit-rate 50. Under the
// standard workload, with captured outside writes on the put keys, they
// must report no inconsistency (a false alarm from a write in flight would
// show here). Then an outside write that skips the capture trigger
// (coherent.skip, as the store's own writes set it) leaves every node
// serving the replaced row, which only the auditors can notice: /stats
// must show the inconsistency and every node must then serve Postgres's
// row, long before the TTL (10m) would have.
func TestWebappAudit(t *testing.T) {
	c := newCluster(t, clusterConfig{Nodes: 3, Extra: map[int][]string{
		0: {"-audit-rate", "50"}, 1: {"-audit-rate", "50"}, 2: {"-audit-rate", "50"},
	}})
	w := standardWorkload()
	w.SQLOnPut = true
	stop := c.drive(w)
	time.Sleep(4 * time.Second)
	stop()
	c.check(t, w.keys(), w.AddKeys, Bounds{API: boundProof, SQL: boundCapture})
	time.Sleep(auditRecheck + time.Second) // the re-checks of the last writes' samples
	for _, n := range c.nodes {
		f := c.audit(t, n)
		t.Logf("node %s after the workload: %+v", n.short, f)
		if f.Inconsistencies != 0 {
			t.Errorf("node %s reported %d inconsistencies in a consistent run", n.short, f.Inconsistencies)
		}
		if f.Checked == 0 {
			t.Errorf("node %s checked nothing", n.short)
		}
	}

	const key = "uncaptured"
	if status, b, err := c.request(c.nodes[0], http.MethodPut, "/items/"+key, map[string]string{"value": "api"}); err != nil || status != http.StatusOK {
		t.Fatalf("PUT %s = %d %s, %v", key, status, b, err)
	}
	for _, n := range c.nodes {
		c.readItem(t, n, key)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	written := time.Now()
	err := pgx.BeginFunc(ctx, c.db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT set_config('coherent.skip', encode(`+pgx.Identifier{c.schema}.Sanitize()+
			`.outbox_key(convert_to('items', 'UTF8'), convert_to($1, 'UTF8')), 'hex'), true)`, key); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE `+c.table()+` SET value = 'sql', version = version + 1 WHERE id = $1`, key)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// The write is invisible to the nodes: each serves the old row (the
	// auditors cannot act before their Recheck).
	time.Sleep(maxStaleness + slack)
	for _, n := range c.nodes {
		if it, status := c.readItem(t, n, key); status != http.StatusOK || it.Value != "api" {
			t.Fatalf("node %s serves %d %+v %v after the uncaptured write; want the stale row (else the test proves nothing)", n.short, status, it, time.Since(written))
		}
	}
	deadline := time.Now().Add(auditRecheck + 10*time.Second)
	for {
		var found uint64
		for _, n := range c.nodes {
			found += c.audit(t, n).Inconsistencies
		}
		if found > 0 {
			t.Logf("the auditors reported %d inconsistency %v after the write", found, time.Since(written).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no node reported the inconsistency within %v", time.Since(written))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, n := range c.nodes {
		if it, status := c.readItem(t, n, key); status != http.StatusOK || it.Value != "sql" {
			t.Errorf("node %s serves %d %+v after the audit; want Postgres's row, value sql", n.short, status, it)
		}
		t.Logf("node %s: %s", n.short, fmt.Sprintf("%+v", c.audit(t, n)))
	}
}
