package main

import (
	"fmt"
	"strconv"
)

var (
	blue   = "#3b6fb6"
	orange = "#e08a2c"
	green  = "#4a9a5b"
	grey   = "#8c8c8c"
	red    = "#c0392b"
)

// readpathChart draws requests/s per variant, and p50 and p99 per variant;
// with paced (a run at a fixed offered load), also its p50 and p99.
func readpathChart(r, paced *readpathResult) []byte {
	width := 900.0
	if paced != nil {
		width = 1340
	}
	c := newCanvas(width, 380, fmt.Sprintf("Read path over HTTP: %d hot keys, %d connections, %d×%gs per variant, GOMAXPROCS %d",
		r.Config.Keys, r.Config.Concurrency, r.Config.Rounds, r.Config.DurationS, r.Config.GOMAXPROCS))
	names, rps, p50, p99 := readpathSeries(r)
	c.bars(panel{x: 10, y: 40, w: 430, h: 330, title: "throughput, closed loop (higher is better)", ylabel: "requests/s", categories: names},
		[]series{{name: "req/s", color: blue, values: rps}})
	c.bars(panel{x: 460, y: 40, w: 430, h: 330, title: "latency, closed loop (lower is better)", ylabel: "µs", categories: names},
		[]series{{name: "p50", color: green, values: p50}, {name: "p99", color: orange, values: p99}})
	if paced != nil {
		names, _, p50, p99 := readpathSeries(paced)
		c.bars(panel{x: 900, y: 40, w: 430, h: 330, title: fmt.Sprintf("latency, paced at %s requests/s (lower is better)", format(paced.Config.Rate)), ylabel: "µs", categories: names},
			[]series{{name: "p50", color: green, values: p50}, {name: "p99", color: orange, values: p99}})
	}
	return c.bytes()
}

func readpathSeries(r *readpathResult) (names []string, rps, p50, p99 []float64) {
	for _, v := range r.Variants {
		names = append(names, v.Name)
		rps = append(rps, v.ReqPerSec)
		p50 = append(p50, v.P50us)
		p99 = append(p99, v.P99us)
	}
	return names, rps, p50, p99
}

// fanoutChart draws Redis messages and deliveries per second, and the
// propagation delay, against the node count; and messages against the
// write rate.
func fanoutChart(f *fanoutResult) []byte {
	c := newCanvas(1020, 380, "Invalidation fan-out through Redis pub/sub")
	var nodes []string
	var msgs, deliveries, p50, p99 []float64
	rate := 0
	for _, r := range f.Nodes {
		nodes = append(nodes, strconv.Itoa(r.Nodes))
		msgs = append(msgs, r.MsgsPerS)
		deliveries = append(deliveries, r.DeliveriesPerS)
		p50 = append(p50, r.P50us)
		p99 = append(p99, r.P99us)
		rate = r.TargetRate
	}
	if len(f.Nodes) > 0 {
		c.lines(panel{x: 10, y: 40, w: 330, h: 330, title: fmt.Sprintf("messages/s at %d writes/s", rate), ylabel: "per second", xlabel: "nodes (log scale)", categories: nodes},
			[]series{{name: "PUBLISH (sent)", color: blue, values: msgs}, {name: "deliveries (received)", color: grey, values: deliveries}})
		// A single node has no receiver: leave it out of the latency panel.
		lo := 0
		if len(f.Nodes) > 1 && f.Nodes[0].Nodes == 1 {
			lo = 1
		}
		c.lines(panel{x: 350, y: 40, w: 330, h: 330, title: "propagation, write → applied elsewhere", ylabel: "µs", xlabel: "nodes (log scale)", categories: nodes[lo:]},
			[]series{{name: "p50", color: green, values: p50[lo:]}, {name: "p99", color: orange, values: p99[lo:]}})
	}
	if len(f.Rates) > 0 {
		var rates []string
		var writes, sent []float64
		n := 0
		for _, r := range f.Rates {
			rates = append(rates, format(float64(r.TargetRate)))
			writes = append(writes, r.WritesPerS)
			sent = append(sent, r.MsgsPerS)
			n = r.Nodes
		}
		c.lines(panel{x: 690, y: 40, w: 320, h: 330, title: fmt.Sprintf("messages vs writes, %d nodes", n), ylabel: "per second", xlabel: "target writes/s (log scale)", categories: rates},
			[]series{{name: "writes", color: red, values: writes}, {name: "PUBLISH (sent)", color: blue, values: sent}})
	}
	return c.bytes()
}
