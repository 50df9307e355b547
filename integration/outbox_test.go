package integration

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestHealthzReportsAStuckOutbox: an outbox row that stays due means that
// outside writes, and writes whose publication failed, are not announced.
// Before issue 11 item 2's fix a relay wedged on a poison row while
// /healthz said ok. Here a transaction holds the lock of a due row, so
// every relay skips it: /healthz must fail once the row has waited more
// than a few seconds, and recover once the relays can publish it.
func TestHealthzReportsAStuckOutbox(t *testing.T) {
	c := newCluster(t, clusterConfig{Nodes: 1})
	n := c.nodes[0]
	ctx := context.Background()
	outbox := pgx.Identifier{c.schema, "outbox"}.Sanitize()
	// Due in two seconds; locked before then.
	if _, err := c.db.Exec(ctx, `SELECT `+pgx.Identifier{c.schema}.Sanitize()+`.outbox_put('items', 'stuck', 0, interval '2 seconds')`); err != nil {
		t.Fatal(err)
	}
	tx, err := c.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT 1 FROM `+outbox+` WHERE key = 'stuck' FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	health := func() (int, string) {
		status, body, err := c.request(n, http.MethodGet, "/healthz", nil)
		if err != nil {
			return 0, err.Error()
		}
		return status, string(body)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		status, body := health()
		if status == http.StatusServiceUnavailable && strings.Contains(body, "outbox") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz with an outbox row stuck for 18 s = %d %s; want 503 naming the outbox", status, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.awaitHealthy(10 * time.Second); err != nil {
		t.Errorf("after the row was released: %v", err)
	}
}
