package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzItemRequests guards the webapp's parsing of what clients send: ids,
// JSON bodies and deltas. It serves requests of any id and body through
// the handlers of an app wired by newApp, against the real Postgres and
// Redis, and checks each answer against an oracle built from the API's
// rules and the standard library's JSON, not from the handlers' code:
//
//   - no input is answered with a 5xx, and none makes a handler panic;
//   - an invalid id (empty, over maxID bytes, not UTF-8, with a NUL) is a
//     400; a body over maxBody is a 413; a body that is not one JSON
//     value, misses its field or has one of the wrong type, a value with a
//     NUL, a delta that is not an int64: 400; an add to a value that is not
//     an integer: 409; a sum out of the int64 range: 422;
//   - a rejected request writes nothing;
//   - valid input is accepted and stored exactly: a put stores its value,
//     an add the sum, a get returns what is stored, a delete removes it.
//
// Each input first deletes the item and, unless initial is "", puts
// initial (with invalid UTF-8 made valid), so that the outcome does not
// depend on earlier inputs. kind selects the request: put, add, get or
// delete. The seed corpus runs under plain go test.
func FuzzItemRequests(f *testing.F) {
	ta := newTestApp(f, "")
	for _, s := range []struct {
		id, initial string
		kind        uint8
		body        string
	}{
		{"k", "v", 0, `{"value":"w"}`},
		{"k", "v", 0, `{"value":"a\u0000b"}`},
		{"k", "v", 0, `{"value":5}`},
		{"k", "v", 0, `{"value":null}`},
		{"k", "v", 0, `{"VALUE":"case-insensitive, as encoding/json"}`},
		{"k", "v", 0, `{"value":"x"} {"value":"y"}`},
		{"k", "v", 0, `{"value":"x"}]`},
		{"k", "v", 0, `[]`},
		{"k", "v", 0, `null`},
		{"k", "v", 0, ``},
		{"k", "v", 0, "{\"value\":\"\xff\"}"},
		{"k", "v", 0, `{"value":"\ud800"}`},
		{"k", "5", 1, `{"delta":9223372036854775807}`},
		{"k", "-5", 1, `{"delta":-9223372036854775808}`},
		{"k", "9223372036854775806", 1, `{"delta":1}`},
		{"k", "", 1, `{"delta":-9223372036854775808}`},
		{"k", "x", 1, `{"delta":1}`},
		{"k", "1", 1, `{"delta":1.5}`},
		{"k", "1", 1, `{"delta":1e3}`},
		{"k", "1", 1, `{"delta":"7"}`},
		{"k", "1", 1, `{"delta":"seven"}`},
		{"k", "1", 1, `{"delta":99999999999999999999}`},
		{"k", "1", 1, `{"delta":-0}`},
		{"k", "1", 1, `{}`},
		{"k", "v", 2, ``},
		{"k", "v\x00", 2, ``},
		{"k", "v", 3, ``},
		{"a\x00b", "", 2, ``},
		{"\xff", "", 0, `{"value":"v"}`},
		{"a\xed\xa0\x80", "", 1, `{"delta":1}`},
		{strings.Repeat("x", maxID), "v", 2, ``},
		{strings.Repeat("x", maxID+1), "", 3, ``},
		{"ünïcødé ✓", "välue", 0, `{"value":"wért"}`},
		{"a/b", "v", 2, ``},
		{"a/", "v", 2, ``},
		{"100%", "v", 2, ``},
		{"?x=1#y", "v", 2, ``},
		{"..", "v", 2, ``},
		{"a//b", "v", 0, `{"value":"w"}`},
		{"", "", 0, `{"value":"w"}`},
	} {
		f.Add(s.id, s.initial, s.kind, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, id, initial string, kind uint8, body []byte) {
		target := "/items/" + escapePath(id)
		// The mux redirects a path that is not canonical ("..", "a//b")
		// and has no route for an empty id: such requests reach no item.
		routed := id != "" && canonicalPath("/items/"+id)
		validID := id != "" && len(id) <= maxID && utf8.ValidString(id) && !strings.Contains(id, "\x00")
		method, suffix := [...]string{http.MethodPut, http.MethodPost, http.MethodGet, http.MethodDelete}[kind%4], ""
		if method == http.MethodPost {
			suffix = "/add"
		}
		if method == http.MethodGet || method == http.MethodDelete {
			body = nil
		}
		status, resp := ta.do(t, method, target+suffix, body)
		req := fmt.Sprintf("%s %s %q", method, target+suffix, body)
		if status >= 500 {
			t.Fatalf("%s = %d %s; a client's input is never a 5xx", req, status, resp)
		}
		if !routed {
			return
		}
		if status >= 400 {
			var e struct{ Error string }
			if err := json.Unmarshal([]byte(resp), &e); err != nil || e.Error == "" {
				t.Errorf("%s = %d %q; want a body {\"error\": …}", req, status, resp)
			}
		}
		if !validID {
			if status != http.StatusBadRequest {
				t.Fatalf("%s = %d %s; want 400 for the id %q", req, status, resp, id)
			}
			return
		}

		// The state the request starts from.
		if st, r := ta.do(t, http.MethodDelete, target, nil); st != http.StatusNoContent {
			t.Fatalf("DELETE %s = %d %s; want 204", target, st, r)
		}
		initial = strings.ToValidUTF8(initial, "\uFFFD")
		stored := initial != "" && !strings.Contains(initial, "\x00")
		if initial != "" {
			want := http.StatusOK
			if !stored {
				want = http.StatusBadRequest
			}
			if st, r := ta.do(t, http.MethodPut, target, jsonBody(map[string]string{"value": initial})); st != want {
				t.Fatalf("PUT %s %q = %d %s; want %d", target, initial, st, r, want)
			}
		}
		before, found := ta.row(t, id)
		if found != stored || stored && before.Value != initial {
			t.Fatalf("after PUT %s %q Postgres holds %+v (found %v)", target, initial, before, found)
		}

		status, resp = ta.do(t, method, target+suffix, body)
		want, value := expect(method, body, before, found)
		if status != want {
			t.Fatalf("%s on %+v (found %v) = %d %s; want %d", req, before, found, status, resp, want)
		}
		after, exists := ta.row(t, id)
		switch {
		case status >= 400:
			if exists != found || after != before {
				t.Fatalf("%s was rejected with %d, but Postgres went from %+v (found %v) to %+v (found %v)", req, status, before, found, after, exists)
			}
		case method == http.MethodDelete:
			if exists {
				t.Fatalf("%s = 204, but Postgres holds %+v", req, after)
			}
		default:
			var got Item
			if err := json.Unmarshal([]byte(resp), &got); err != nil {
				t.Fatalf("%s = %d %q: not an item: %v", req, status, resp, err)
			}
			if got.ID != id || got.Value != value || after != got {
				t.Fatalf("%s = %+v, Postgres %+v; want id %q, value %q in both", req, got, after, id, value)
			}
		}
	})
}

// expect returns the status of a request to an item with a valid id,
// which Postgres holds as cur if found, and the value it then returns.
func expect(method string, body []byte, cur Item, found bool) (int, string) {
	switch method {
	case http.MethodGet:
		if !found {
			return http.StatusNotFound, ""
		}
		return http.StatusOK, cur.Value
	case http.MethodDelete:
		return http.StatusNoContent, ""
	}
	if len(body) > maxBody {
		return http.StatusRequestEntityTooLarge, ""
	}
	if !json.Valid(body) {
		return http.StatusBadRequest, ""
	}
	if method == http.MethodPut {
		var b struct{ Value *string }
		if json.Unmarshal(body, &b) != nil || b.Value == nil || strings.Contains(*b.Value, "\x00") {
			return http.StatusBadRequest, ""
		}
		return http.StatusOK, *b.Value
	}
	var b struct{ Delta *json.Number }
	if json.Unmarshal(body, &b) != nil || b.Delta == nil {
		return http.StatusBadRequest, ""
	}
	delta, err := strconv.ParseInt(string(*b.Delta), 10, 64)
	if err != nil {
		return http.StatusBadRequest, ""
	}
	n := int64(0)
	if found {
		if n, err = strconv.ParseInt(cur.Value, 10, 64); err != nil {
			return http.StatusConflict, ""
		}
	}
	// The sum in 128 bits, as it were: out of range if the signs of n and
	// delta agree and the sign of the wrapped sum does not.
	sum := n + delta
	if (n >= 0) == (delta >= 0) && (sum >= 0) != (n >= 0) {
		return http.StatusUnprocessableEntity, ""
	}
	return http.StatusOK, strconv.FormatInt(sum, 10)
}

// canonicalPath reports whether the mux serves p without redirecting it to
// its cleaned form.
func canonicalPath(p string) bool {
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c == p
}

// escapePath escapes id as one path segment, as a client would.
func escapePath(id string) string { return strings.TrimPrefix(itemPath(id), "/items/") }
