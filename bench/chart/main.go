// Command chart draws the SVG charts of BENCHMARKS.md from the JSON that
// bench/readpath and bench/fanout write, with no dependency but the
// standard library:
//
//	go run ./bench/chart -readpath out/readpath.json -readpath-paced out/readpath-rate.json \
//		-fanout out/fanout.json -dir bench
//
// It writes readpath.svg (requests/s, and p50 and p99, per variant, and the
// latencies of the paced run if one is given) and
// fanout.svg (Redis messages/s, deliveries/s and propagation p50/p99
// against the node count, and messages/s against the write rate) in -dir.
// A missing input skips its chart.
//
// With -benchmd it instead turns the output of go test -bench into a
// Markdown table (mean, min and max of every metric over the runs):
//
//	go run ./bench/chart -benchmd out/hitpath.txt
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

// readpathResult is the part of bench/readpath's JSON that is drawn.
type readpathResult struct {
	Config struct {
		Keys        int     `json:"keys"`
		Concurrency int     `json:"concurrency"`
		Rate        float64 `json:"rate"`
		DurationS   float64 `json:"duration_s"`
		Rounds      int     `json:"rounds"`
		GOMAXPROCS  int     `json:"gomaxprocs"`
	} `json:"config"`
	Variants []struct {
		Name      string  `json:"name"`
		ReqPerSec float64 `json:"req_per_s"`
		P50us     float64 `json:"p50_us"`
		P99us     float64 `json:"p99_us"`
	} `json:"variants"`
}

// fanoutResult is the part of bench/fanout's JSON that is drawn.
type fanoutResult struct {
	Nodes []fanoutRow `json:"nodes"`
	Rates []fanoutRow `json:"rates"`
}

type fanoutRow struct {
	Nodes          int     `json:"nodes"`
	TargetRate     int     `json:"target_writes_per_s"`
	WritesPerS     float64 `json:"writes_per_s"`
	MsgsPerS       float64 `json:"msgs_per_s"`
	DeliveriesPerS float64 `json:"deliveries_per_s"`
	P50us          float64 `json:"p50_us"`
	P99us          float64 `json:"p99_us"`
}

func main() {
	readpath := flag.String("readpath", "", "bench/readpath's JSON")
	paced := flag.String("readpath-paced", "", "bench/readpath's JSON of a run with -rate, drawn beside -readpath's")
	fanout := flag.String("fanout", "", "bench/fanout's JSON")
	dir := flag.String("dir", ".", "directory of the SVG files")
	benchmd := flag.String("benchmd", "", "print this go test -bench output as a Markdown table, and draw nothing")
	flag.Parse()
	if *benchmd != "" {
		if err := benchMarkdown(*benchmd, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "chart: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*readpath, *paced, *fanout, *dir); err != nil {
		fmt.Fprintf(os.Stderr, "chart: %v\n", err)
		os.Exit(1)
	}
}

func run(readpath, paced, fanout, dir string) error {
	if readpath != "" {
		var r readpathResult
		if err := readJSON(readpath, &r); err != nil {
			return err
		}
		var p *readpathResult
		if paced != "" {
			p = new(readpathResult)
			if err := readJSON(paced, p); err != nil {
				return err
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "readpath.svg"), readpathChart(&r, p), 0o644); err != nil {
			return err
		}
	}
	if fanout != "" {
		var f fanoutResult
		if err := readJSON(fanout, &f); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "fanout.svg"), fanoutChart(&f), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
