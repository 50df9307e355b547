package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
)

// benchMarkdown reads the output of go test -bench (any -count) from path
// and writes one Markdown row per benchmark and unit: the mean, the minimum
// and the maximum over the runs. Metrics a benchmark zeroed (ns/op of the
// latency benchmarks) are left out.
func benchMarkdown(path string, w io.Writer) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	type key struct{ name, unit string }
	var order []key
	vals := map[key][]float64{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(fields[1]); err != nil {
			continue
		}
		for i := 2; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				continue
			}
			k := key{fields[0], fields[i+1]}
			if _, ok := vals[k]; !ok {
				order = append(order, k)
			}
			vals[k] = append(vals[k], v)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	fmt.Fprintf(w, "| benchmark | unit | mean | min | max | runs |\n|---|---|---:|---:|---:|---:|\n")
	for _, k := range order {
		vs := vals[k]
		sum, lo, hi := 0.0, math.Inf(1), math.Inf(-1)
		for _, v := range vs {
			sum += v
			lo, hi = math.Min(lo, v), math.Max(hi, v)
		}
		if hi == 0 && (k.unit == "ns/op" || k.unit == "B/op" || k.unit == "allocs/op") && !strings.Contains(k.name, "Hit") {
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %d |\n", k.name, k.unit, num(sum/float64(len(vs))), num(lo), num(hi), len(vs))
	}
	return nil
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case a == 0:
		return "0"
	case a >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}
