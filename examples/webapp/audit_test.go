package main

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// writeUncaptured changes item id to value, bumping its version, in a
// transaction that the capture trigger skips for that key (coherent.skip,
// as the store's own writes do): an outside write no instance hears of.
func (ta *testApp) writeUncaptured(t testing.TB, id, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := pgx.BeginFunc(ctx, ta.db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT set_config('coherent.skip', encode(`+pgx.Identifier{ta.schema}.Sanitize()+
			`.outbox_key(convert_to('items', 'UTF8'), convert_to($1, 'UTF8')), 'hex'), true)`, id); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE items SET value = $2, version = version + 1 WHERE id = $1`, id, value)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// auditStats reads the "audit" object of /stats; ok is false without one.
func (ta *testApp) auditStats(t testing.TB) (fig auditFigures, ok bool) {
	t.Helper()
	code, body := ta.do(t, http.MethodGet, "/stats", nil)
	if code != http.StatusOK {
		t.Fatalf("GET /stats = %d %s", code, body)
	}
	var st struct{ Audit *auditFigures }
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if st.Audit == nil {
		return fig, false
	}
	return *st.Audit, true
}

// TestAuditRate guards -audit-rate: with it, an instance finds an item
// that an uncaptured outside write left stale, reports it on /stats and
// /metrics, and then serves what Postgres holds; without it, the stale
// item stays (so the test fails without the auditor) and /stats and
// /metrics carry no audit figures.
func TestAuditRate(t *testing.T) {
	for _, rate := range []float64{0, 100} {
		t.Run(map[bool]string{true: "off", false: "on"}[rate == 0], func(t *testing.T) {
			ta := newTestAppWith(t, "", func(c *config) { c.auditRate = rate })
			if code, body := ta.do(t, http.MethodPut, "/items/k", []byte(`{"value":"v1"}`)); code != http.StatusOK {
				t.Fatalf("PUT = %d %s", code, body)
			}
			ta.writeUncaptured(t, "k", "outside")
			if rate == 0 {
				time.Sleep(time.Second)
				if _, body := ta.do(t, http.MethodGet, "/items/k", nil); !strings.Contains(body, `"v1"`) {
					t.Errorf("GET after the uncaptured write, no auditor = %s; want the stale v1 (else the test proves nothing)", body)
				}
				if _, ok := ta.auditStats(t); ok {
					t.Errorf("/stats has an audit object without -audit-rate")
				}
				if _, body := ta.do(t, http.MethodGet, "/metrics", nil); strings.Contains(body, "coherent_audit_") {
					t.Errorf("/metrics has coherent_audit_ metrics without -audit-rate")
				}
				return
			}
			deadline := time.Now().Add(15 * time.Second)
			for {
				fig, ok := ta.auditStats(t)
				if !ok {
					t.Fatalf("/stats has no audit object with -audit-rate %v", rate)
				}
				if fig.Inconsistencies > 0 {
					t.Logf("audit: %+v", fig)
					if fig.Inconsistencies != 1 || fig.Consistency >= 1 || fig.Checked == 0 {
						t.Errorf("audit figures = %+v; want 1 inconsistency", fig)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no inconsistency reported within 15s: %+v", fig)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if _, body := ta.do(t, http.MethodGet, "/items/k", nil); !strings.Contains(body, `"outside"`) {
				t.Errorf("GET after the audit = %s; want Postgres's value, outside", body)
			}
			_, metrics := ta.do(t, http.MethodGet, "/metrics", nil)
			for _, want := range []string{"coherent_audit_inconsistencies_total 1", "coherent_audit_checked_total ", "coherent_audit_consistency_ratio ", "coherent_audit_nines "} {
				if !strings.Contains(metrics, want) {
					t.Errorf("/metrics lacks %q", want)
				}
			}
			if !strings.Contains(ta.logs.String(), "key=k") {
				t.Errorf("the log does not name the key:\n%s", ta.logs)
			}
		})
	}
}

// TestAuditRateFlag: -audit-rate is off by default, takes a rate, and
// refuses one the auditor cannot run.
func TestAuditRateFlag(t *testing.T) {
	getenv := func(string) string { return "" }
	var out strings.Builder
	if cfg, err := parseFlags(nil, getenv, &out); err != nil || cfg.auditRate != 0 {
		t.Errorf("parseFlags() auditRate = %v, %v; want 0 (off)", cfg.auditRate, err)
	}
	if cfg, err := parseFlags([]string{"-audit-rate", "50"}, getenv, &out); err != nil || cfg.auditRate != 50 {
		t.Errorf("parseFlags(-audit-rate 50) = %v, %v; want 50", cfg.auditRate, err)
	}
	for _, bad := range []string{"-1", "NaN", "1e9"} {
		out.Reset()
		if _, err := parseFlags([]string{"-audit-rate", bad}, getenv, &out); err == nil || !strings.Contains(out.String(), "-audit-rate") {
			t.Errorf("parseFlags(-audit-rate %s) = %v, output %q; want an error naming the flag", bad, err, out.String())
		}
	}
}
