package main

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"testing"
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
