package main

import (
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"testing"
)

// TestLargeValuesStayWithinTheByteBudget guards issue 12 item 6 in the
// webapp: before it set a byte budget, 150 PUTs of 1 MiB took it from
// 31 MB to 302 MB, and its 100,000-entry cap put about 100 GB within a
// client's reach. Now the items cache holds at most MaxWeight of values,
// however many large values are written and read.
func TestLargeValuesStayWithinTheByteBudget(t *testing.T) {
	ta := newTestApp(t, "")
	value := strings.Repeat("v", 1<<20-64) // fits the 1 MiB body limit with its JSON
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range 150 {
		path := itemPath(fmt.Sprint("big-", i))
		if code, body := ta.do(t, http.MethodPut, path, jsonBody(map[string]string{"value": value})); code != http.StatusOK {
			t.Fatalf("PUT %s = %d %s", path, code, body)
		}
		if code, body := ta.do(t, http.MethodGet, path, nil); code != http.StatusOK {
			t.Fatalf("GET %s = %d %.100s", path, code, body)
		}
	}
	st := ta.items.Cache().Stats()
	if st.Weight > 64<<20 {
		t.Errorf("cache weight after 150 values of 1 MiB = %d; want at most 64 MiB", st.Weight)
	}
	if st.WeightEvictions == 0 {
		t.Errorf("no entry was evicted for the byte budget: %+v", st)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > 100<<20 {
		t.Errorf("heap in use grew by %d MiB after 150 values of 1 MiB; want well under 150 (the budget is 64 MiB)", grew>>20)
	}
}
