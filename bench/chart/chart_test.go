package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// TestCharts draws both charts from small inputs and checks that they are
// well-formed XML with an svg root.
func TestCharts(t *testing.T) {
	dir := t.TempDir()
	rp := filepath.Join(dir, "readpath.json")
	fo := filepath.Join(dir, "fanout.json")
	os.WriteFile(rp, []byte(`{"config":{"keys":10,"concurrency":2,"duration_s":1,"rounds":1,"gomaxprocs":2},
		"variants":[{"name":"coherent","req_per_s":70000,"p50_us":300,"p99_us":3000},{"name":"postgres","req_per_s":24000,"p50_us":1200,"p99_us":3500},{"name":"redis","req_per_s":32000,"p50_us":900,"p99_us":2800}]}`), 0o644)
	os.WriteFile(fo, []byte(`{"nodes":[{"nodes":1,"target_writes_per_s":2000,"msgs_per_s":1600},{"nodes":2,"target_writes_per_s":2000,"msgs_per_s":2000,"deliveries_per_s":2000,"p50_us":130,"p99_us":330}],
		"rates":[{"nodes":4,"target_writes_per_s":250,"writes_per_s":250,"msgs_per_s":250},{"nodes":4,"target_writes_per_s":16000,"writes_per_s":16000,"msgs_per_s":6400}]}`), 0o644)
	if err := run(rp, rp, fo, dir); err != nil {
		t.Fatalf("run: %v", err)
	}
	for _, name := range []string{"readpath.svg", "fanout.svg"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		d := xml.NewDecoder(bytes.NewReader(b))
		root := ""
		for {
			tok, err := d.Token()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s is not well-formed: %v", name, err)
			}
			if se, ok := tok.(xml.StartElement); ok && root == "" {
				root = se.Name.Local
			}
		}
		if root != "svg" {
			t.Errorf("%s: root element %q; want svg", name, root)
		}
	}
}
