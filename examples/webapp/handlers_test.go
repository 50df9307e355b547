package main

import (
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/internal/faultproxy"
	"github.com/coherentcache/coherent/internal/testenv"
)

// TestAddRejectsOverflow guards against POST /items/{id}/add wrapping
// around int64: 5 + MaxInt64 was committed as a negative number. A sum
// out of range must be answered 422 with nothing written, and sums at the
// very edges of the range must still go through.
func TestAddRejectsOverflow(t *testing.T) {
	ta := newTestApp(t, "")
	for i, tc := range []struct {
		start string // "" for a missing item
		delta int64
		want  int    // status
		sum   string // the value after a 200
	}{
		{"5", math.MaxInt64, http.StatusUnprocessableEntity, ""},
		{"-5", math.MinInt64, http.StatusUnprocessableEntity, ""},
		{strconv.FormatInt(math.MaxInt64, 10), 1, http.StatusUnprocessableEntity, ""},
		{strconv.FormatInt(math.MinInt64, 10), -1, http.StatusUnprocessableEntity, ""},
		{"-1", math.MinInt64, http.StatusUnprocessableEntity, ""},
		{strconv.FormatInt(math.MaxInt64-1, 10), 1, http.StatusOK, strconv.FormatInt(math.MaxInt64, 10)},
		{strconv.FormatInt(math.MinInt64, 10), math.MaxInt64, http.StatusOK, "-1"},
		{"0", math.MinInt64, http.StatusOK, strconv.FormatInt(math.MinInt64, 10)},
		{"", math.MaxInt64, http.StatusOK, strconv.FormatInt(math.MaxInt64, 10)},
	} {
		id := fmt.Sprintf("overflow-%d", i)
		path := "/items/" + id
		if tc.start != "" {
			if status, body := ta.do(t, http.MethodPut, path, jsonBody(map[string]string{"value": tc.start})); status != http.StatusOK {
				t.Fatalf("PUT %s %q = %d %s; want 200", path, tc.start, status, body)
			}
		}
		before, existed := ta.row(t, id)
		status, body := ta.do(t, http.MethodPost, path+"/add", []byte(fmt.Sprintf(`{"delta":%d}`, tc.delta)))
		if status != tc.want {
			t.Errorf("%q + %d: POST %s/add = %d %s; want %d", tc.start, tc.delta, path, status, body, tc.want)
			continue
		}
		after, exists := ta.row(t, id)
		if status != http.StatusOK {
			if after != before || exists != existed {
				t.Errorf("%q + %d: rejected with %d, but Postgres holds %+v (found %v); before: %+v (found %v)", tc.start, tc.delta, status, after, exists, before, existed)
			}
			if status, body := ta.do(t, http.MethodGet, path, nil); status != http.StatusOK || decodeItem(t, body).Value != tc.start {
				t.Errorf("%q + %d: after the rejection GET %s = %d %s; want the value %q", tc.start, tc.delta, path, status, body, tc.start)
			}
			continue
		}
		if got := decodeItem(t, body); got.Value != tc.sum || after.Value != tc.sum {
			t.Errorf("%q + %d = %q (Postgres %q); want %q", tc.start, tc.delta, got.Value, after.Value, tc.sum)
		}
	}
}

// jsonBody is v as JSON.
func jsonBody(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// decodeItem decodes an item response.
func decodeItem(t testing.TB, body string) Item {
	t.Helper()
	var it Item
	if err := json.Unmarshal([]byte(body), &it); err != nil {
		t.Fatalf("response %q is not an item: %v", body, err)
	}
	return it
}

// itemPath is the path of the item id, escaped.
func itemPath(id string) string { return "/items/" + url.PathEscape(id) }

// TestInvalidInputIs400 guards against a client's malformed ids and values
// reaching Postgres: an id or a value with a NUL byte or invalid UTF-8 came
// back as "503 invalid byte sequence for encoding "UTF8"…", an answer that
// blames the server and tells the client to retry. Each must be a 400 that
// writes nothing, on every route; odd but valid ids and values must still
// be stored and read back unchanged.
func TestInvalidInputIs400(t *testing.T) {
	ta := newTestApp(t, "")
	long := strings.Repeat("x", maxID+1)
	for _, tc := range []struct {
		name, id, value string
	}{
		{"NUL in the id", "a\x00b", "v"},
		{"invalid UTF-8 in the id", "a\xffb", "v"},
		{"a truncated UTF-8 sequence in the id", "a\xc3", "v"},
		{"a UTF-16 surrogate in the id", "a\xed\xa0\x80", "v"},
		{"an id over maxID bytes", long, "v"},
		{"NUL in the value", "nul-value", "a\x00b"},
	} {
		path := itemPath(tc.id)
		requests := []struct {
			method, path string
			body         []byte
		}{
			{http.MethodGet, path, nil},
			{http.MethodPut, path, jsonBody(map[string]string{"value": tc.value})},
			{http.MethodPost, path + "/add", []byte(`{"delta":1}`)},
			{http.MethodDelete, path, nil},
		}
		if tc.id == "nul-value" {
			requests = requests[1:2]
		}
		for _, r := range requests {
			status, body := ta.do(t, r.method, r.path, r.body)
			if status != http.StatusBadRequest {
				t.Errorf("%s: %s %s = %d %s; want 400", tc.name, r.method, r.path, status, strings.TrimSpace(body))
			}
		}
	}
	// (Postgres cannot hold the other ids.)
	for _, id := range []string{long, "nul-value"} {
		if it, found := ta.row(t, id); found {
			t.Errorf("Postgres holds %+v", it)
		}
	}

	// Valid, if unusual: each is stored and read back as sent.
	for _, tc := range []struct{ id, value string }{
		{"ünïcødé ✓", "välue ✓"},
		{"with space", "with\ttab and\nnewline"},
		{"a/b", "slash"},
		{`quote'"; DROP TABLE items; --`, `'"; DROP TABLE items; --`},
		{"100%", "%00"},
		{"\x01control\x1f", "\x01\x7f"},
		{strings.Repeat("é", maxID/2), strings.Repeat("v", 1<<19)},
		{"replacement", "\ufffd"},
	} {
		path := itemPath(tc.id)
		status, body := ta.do(t, http.MethodPut, path, jsonBody(map[string]string{"value": tc.value}))
		if status != http.StatusOK {
			t.Errorf("PUT %s = %d %.200s; want 200", path, status, body)
			continue
		}
		status, body = ta.do(t, http.MethodGet, path, nil)
		if got := decodeItem(t, body); status != http.StatusOK || got.ID != tc.id || got.Value != tc.value {
			t.Errorf("GET %s = %d %.200s; want 200 with id %q, value %.50q", path, status, body, tc.id, tc.value)
		}
		if status, body := ta.do(t, http.MethodDelete, path, nil); status != http.StatusNoContent {
			t.Errorf("DELETE %s = %d %s; want 204", path, status, body)
		}
	}
}

// TestServerErrorsHideInternals guards against 5xx bodies that told any
// client the server's internals: SQLSTATEs and table names, Redis
// addresses, lock names and fence tokens. A 503 must say only what a
// client may know (retry; nothing written, or the outcome unknown), and
// the details must go to the log.
func TestServerErrorsHideInternals(t *testing.T) {
	// hidden are the internals of each case; logged must be in the log.
	check := func(t *testing.T, ta *testApp, method, path string, body []byte, wantMsg string, hidden []string, logged string) {
		t.Helper()
		status, got := ta.do(t, method, path, body)
		if status != http.StatusServiceUnavailable {
			t.Fatalf("%s %s = %d %s; want 503", method, path, status, got)
		}
		var e struct{ Error string }
		if err := json.Unmarshal([]byte(got), &e); err != nil || e.Error == "" {
			t.Errorf("%s %s: body %q is not {\"error\": …}", method, path, got)
		}
		for _, h := range hidden {
			if strings.Contains(got, h) {
				t.Errorf("%s %s = 503 %s; the body names %q", method, path, strings.TrimSpace(got), h)
			}
		}
		if !strings.Contains(e.Error, wantMsg) {
			t.Errorf("%s %s = 503 %q; want a message with %q", method, path, e.Error, wantMsg)
		}
		if !strings.Contains(ta.logs.String(), logged) {
			t.Errorf("%s %s: the log lacks %q:\n%s", method, path, logged, ta.logs)
		}
	}

	t.Run("fenced write", func(t *testing.T) {
		ta := newTestApp(t, "")
		if status, body := ta.do(t, http.MethodPut, "/items/k", []byte(`{"value":"1"}`)); status != http.StatusOK {
			t.Fatalf("PUT /items/k = %d %s", status, body)
		}
		// As if a later holder had committed: the next token of this lock
		// is below the stored one.
		ta.exec(t, `UPDATE `+pgx.Identifier{ta.schema, "fences"}.Sanitize()+` SET token = 1152921504606846976`)
		check(t, ta, http.MethodPut, "/items/k", []byte(`{"value":"2"}`), "nothing written",
			[]string{"1152921504606846976", "items:k", "fencing token", "store:"}, "1152921504606846976")
		if it, _ := ta.row(t, "k"); it.Value != "1" {
			t.Errorf("after the fenced write Postgres holds %+v; want value 1", it)
		}
	})

	t.Run("postgres error", func(t *testing.T) {
		ta := newTestApp(t, "")
		ta.exec(t, `DROP TABLE items CASCADE`)
		hidden := []string{"SQLSTATE", "42P01", "relation", "items\"", "does not exist"}
		check(t, ta, http.MethodGet, "/items/k", nil, "retry", hidden, "SQLSTATE 42P01")
		check(t, ta, http.MethodPut, "/items/k", []byte(`{"value":"1"}`), "retry", hidden, "SQLSTATE 42P01")
		check(t, ta, http.MethodPost, "/items/k/add", []byte(`{"delta":1}`), "retry", hidden, "SQLSTATE 42P01")
		check(t, ta, http.MethodDelete, "/items/k", nil, "retry", hidden, "SQLSTATE 42P01")
	})

	t.Run("redis down", func(t *testing.T) {
		p, err := faultproxy.New(testenv.RedisOptions(t).Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		ta := newTestApp(t, p.Addr())
		addr := p.Addr()
		p.Close() // refused from now on, and the open connections are gone
		_, port, _ := net.SplitHostPort(addr)
		hidden := []string{addr, ":" + port, "dial", "lockguard", "items:k", "redis:"}
		check(t, ta, http.MethodPut, "/items/k", []byte(`{"value":"1"}`), "retry", hidden, addr)
		check(t, ta, http.MethodGet, "/healthz", nil, "redis", hidden, addr)
	})
}
