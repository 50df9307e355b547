package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
)

type config struct {
	services    benchenv.Services
	nodes       []int
	rate        int
	sweepNodes  int
	sweepRates  []int
	duration    time.Duration
	warmup      time.Duration
	batchWindow time.Duration
}

// Result is what fanout reports, and what bench/chart reads.
type Result struct {
	DurationS float64 `json:"duration_s"`
	// Nodes holds the first sweep (fixed rate), Rates the second (fixed
	// node count).
	Nodes []Row `json:"nodes"`
	Rates []Row `json:"rates"`
}

// Row is one configuration's numbers.
type Row struct {
	Nodes      int     `json:"nodes"`
	TargetRate int     `json:"target_writes_per_s"`
	Writes     int64   `json:"writes"`
	WritesPerS float64 `json:"writes_per_s"`
	// MsgsPerS counts PUBLISHes of invalidations (all buses); DeliveriesPerS
	// the messages the buses received from other nodes.
	MsgsPerS       float64 `json:"msgs_per_s"`
	MsgsPerWrite   float64 `json:"msgs_per_write"`
	KeysPerMsg     float64 `json:"keys_per_msg"`
	DeliveriesPerS float64 `json:"deliveries_per_s"`
	AppliedPerS    float64 `json:"applied_per_s"`
	Applied        int64   `json:"applied"`
	Missing        int64   `json:"missing"` // invalidations never applied
	Flushes        uint64  `json:"flushes"`
	// CPU: this process's, per applied invalidation and per write; the
	// idle cost of the buses (probes) per second; Redis's per applied
	// invalidation.
	CPUPerAppliedUs      float64 `json:"cpu_per_applied_us"`
	CPUPerWriteUs        float64 `json:"cpu_per_write_us"`
	IdleCPUPct           float64 `json:"idle_cpu_pct"`
	RedisCPUPerAppliedUs float64 `json:"redis_cpu_per_applied_us"`
	P50us                float64 `json:"p50_us"`
	P99us                float64 `json:"p99_us"`
	LoadStart            string  `json:"load_start"`
	LoadEnd              string  `json:"load_end"`
}

func run(ctx context.Context, cfg config, log io.Writer) (*Result, error) {
	if cfg.rate < 1 || cfg.duration <= 0 {
		return nil, errors.New("rate and duration must be positive")
	}
	admin, ropts, err := cfg.services.Redis(ctx)
	if err != nil {
		return nil, err
	}
	defer admin.Close()
	res := &Result{DurationS: cfg.duration.Seconds()}
	for _, n := range cfg.nodes {
		row, err := measure(ctx, cfg, ropts, admin, n, cfg.rate)
		if err != nil {
			return nil, fmt.Errorf("%d nodes: %w", n, err)
		}
		fmt.Fprintf(log, "fanout: %s\n", row.short())
		res.Nodes = append(res.Nodes, row)
	}
	if cfg.sweepNodes > 0 {
		for _, rate := range cfg.sweepRates {
			row, err := measure(ctx, cfg, ropts, admin, cfg.sweepNodes, rate)
			if err != nil {
				return nil, fmt.Errorf("%d nodes at %d writes/s: %w", cfg.sweepNodes, rate, err)
			}
			fmt.Fprintf(log, "fanout: %s\n", row.short())
			res.Rates = append(res.Rates, row)
		}
	}
	return res, nil
}

func (r Row) short() string {
	return fmt.Sprintf("%2d nodes %6d writes/s: %7.0f msgs/s (%.2f keys/msg), %7.0f applied/s, CPU %.1f µs/applied, p50 %.0f µs p99 %.0f µs, load %s → %s",
		r.Nodes, r.TargetRate, r.MsgsPerS, r.KeysPerMsg, r.AppliedPerS, r.CPUPerAppliedUs, r.P50us, r.P99us, r.LoadStart, r.LoadEnd)
}

// value is what the caches hold: small, as in bench/size.
type value struct{ A, B int64 }

// node is one instance: its own client, bus and cache.
type node struct {
	rdb   *redis.Client
	bus   *invalidate.PubSub
	items *cache.Cache[int64, value]
}

func (n *node) close() {
	if n.items != nil {
		n.items.Close()
	}
	if n.bus != nil {
		n.bus.Close()
	}
	n.rdb.Close()
}

// recorder is every node's InvalidationTracer: it times each applied
// invalidation from the start of the write that caused it.
type recorder struct {
	start time.Time
	sent  []atomic.Int64 // by key: ns since start when its Set began; 0 before
	from  atomic.Int64   // keys below this were written before the measurement
	mu    sync.Mutex
	lat   []time.Duration
	seen  atomic.Int64 // applied invalidations of measured keys
}

func (r *recorder) TraceLoadStart(ctx context.Context, _ cache.TraceLoadStartData) context.Context {
	return ctx
}

func (r *recorder) TraceLoadEnd(context.Context, cache.TraceLoadEndData) {}

func (r *recorder) TraceInvalidation(d cache.TraceInvalidationData) {
	if !d.Remote || d.Keys == nil {
		return
	}
	now := int64(time.Since(r.start))
	var lat []time.Duration
	for _, inv := range d.Keys {
		k, err := strconv.ParseInt(inv.Key, 10, 64)
		if err != nil || k < r.from.Load() || k >= int64(len(r.sent)) {
			continue
		}
		if t := r.sent[k].Load(); t > 0 {
			lat = append(lat, time.Duration(now-t))
		}
	}
	if len(lat) == 0 {
		return
	}
	r.seen.Add(int64(len(lat)))
	r.mu.Lock()
	r.lat = append(r.lat, lat...)
	r.mu.Unlock()
}

// measure runs n nodes under rate writes/s and returns their numbers.
func measure(ctx context.Context, cfg config, ropts *redis.Options, admin *redis.Client, n, rate int) (Row, error) {
	channel := benchenv.Name("bench:fanout:")
	maxKeys := int(float64(rate)*(cfg.warmup+cfg.duration).Seconds()*1.1) + 1024
	rec := &recorder{start: time.Now(), sent: make([]atomic.Int64, maxKeys)}
	nodes := make([]*node, n)
	defer func() {
		for _, nd := range nodes {
			if nd != nil {
				nd.close()
			}
		}
	}()
	for i := range nodes {
		o := *ropts
		o.ClientName = fmt.Sprintf("coherent-bench-fanout-%d", i)
		nd := &node{rdb: redis.NewClient(&o)}
		nodes[i] = nd
		var err error
		if nd.bus, err = invalidate.NewPubSub(nd.rdb, &invalidate.PubSubOptions{Channel: channel, Options: invalidate.Options{BatchWindow: cfg.batchWindow}}); err != nil {
			return Row{}, err
		}
		if nd.items, err = cache.New("fanout", maxKeys, func(_ context.Context, k int64) (value, error) {
			return value{A: k, B: k}, nil
		}, &cache.Options[int64, value]{Bus: nd.bus, Tracer: rec}); err != nil {
			return Row{}, err
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, nd := range nodes {
		for !nd.items.Proven() {
			if time.Now().After(deadline) {
				return Row{}, errors.New("buses not proven within 10s")
			}
			if ctx.Err() != nil {
				return Row{}, ctx.Err()
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// The buses' idle cost: probes only.
	idle := min(cfg.duration, time.Second)
	cpuIdle0 := benchenv.CPUTime()
	time.Sleep(idle)
	idleCPU := float64(benchenv.CPUTime()-cpuIdle0) / float64(idle)

	// Open loop: a dispatcher issues the writes due every millisecond, each
	// on its own goroutine, on the nodes in turn; a write does not wait for
	// the one before it, as requests of a service do not.
	var next atomic.Int64
	var failed atomic.Int64
	var firstErr atomic.Value
	var inflight sync.WaitGroup
	write := func() {
		k := next.Add(1) - 1
		if k >= int64(len(rec.sent)) {
			return
		}
		nd := nodes[int(k)%n]
		inflight.Go(func() {
			rec.sent[k].Store(int64(time.Since(rec.start)))
			if err := nd.items.Set(ctx, k, value{A: k, B: k}, 1); err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
		})
	}
	issue := func(d time.Duration) int64 {
		t0 := time.Now()
		issued := int64(0)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for ctx.Err() == nil {
			el := time.Since(t0)
			if el >= d {
				break
			}
			for due := int64(el.Seconds() * float64(rate)); issued < due; issued++ {
				write()
			}
			<-tick.C
		}
		return issued
	}
	issue(cfg.warmup)
	inflight.Wait()
	rec.from.Store(next.Load())

	busStats := func() (s invalidate.Stats) {
		for _, nd := range nodes {
			b := nd.bus.Stats()
			s.MessagesSent += b.MessagesSent
			s.KeysSent += b.KeysSent
			s.MessagesReceived += b.MessagesReceived
			s.KeysReceived += b.KeysReceived
			s.FlushesResubscribe += b.FlushesResubscribe + b.FlushesGap + b.FlushesMalformed + b.FlushesProofTimeout
		}
		return s
	}
	applied := func() (a uint64) {
		for _, nd := range nodes {
			a += nd.items.Stats().InvalidationsReceived
		}
		return a
	}
	row := Row{Nodes: n, TargetRate: rate, LoadStart: benchenv.LoadAvg()}
	b0, a0 := busStats(), applied()
	cpu0, rcpu0 := benchenv.CPUTime(), benchenv.RedisCPU(ctx, admin)
	t0 := time.Now()
	writes := issue(cfg.duration)
	inflight.Wait()
	// Let the last deliveries arrive.
	want := writes * int64(n-1)
	for drain := time.Now().Add(5 * time.Second); rec.seen.Load() < want && time.Now().Before(drain); {
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(t0)
	cpu1, rcpu1 := benchenv.CPUTime(), benchenv.RedisCPU(ctx, admin)
	b1, a1 := busStats(), applied()
	row.LoadEnd = benchenv.LoadAvg()
	if err := ctx.Err(); err != nil {
		return Row{}, err
	}
	if f := failed.Load(); f > 0 {
		return Row{}, fmt.Errorf("%d writes failed, first: %v", f, firstErr.Load())
	}

	sec := elapsed.Seconds()
	row.Writes = writes
	row.WritesPerS = float64(writes) / sec
	msgs := float64(b1.MessagesSent - b0.MessagesSent)
	row.MsgsPerS = msgs / sec
	if writes > 0 {
		row.MsgsPerWrite = msgs / float64(writes)
	}
	if msgs > 0 {
		row.KeysPerMsg = float64(b1.KeysSent-b0.KeysSent) / msgs
	}
	row.DeliveriesPerS = float64(b1.MessagesReceived-b0.MessagesReceived) / sec
	row.Applied = int64(a1 - a0)
	row.AppliedPerS = float64(row.Applied) / sec
	row.Missing = max(want-rec.seen.Load(), 0)
	row.Flushes = b1.FlushesResubscribe - b0.FlushesResubscribe
	cpu := cpu1 - cpu0
	if row.Applied > 0 {
		row.CPUPerAppliedUs = benchenv.Micros(cpu) / float64(row.Applied)
		row.RedisCPUPerAppliedUs = benchenv.Micros(rcpu1-rcpu0) / float64(row.Applied)
	}
	if writes > 0 {
		row.CPUPerWriteUs = benchenv.Micros(cpu) / float64(writes)
	}
	row.IdleCPUPct = 100 * idleCPU
	rec.mu.Lock()
	lat := benchenv.Sorted(rec.lat)
	rec.mu.Unlock()
	row.P50us = benchenv.Micros(benchenv.Percentile(lat, 0.50))
	row.P99us = benchenv.Micros(benchenv.Percentile(lat, 0.99))
	return row, nil
}

// print writes the results as Markdown tables.
func (r *Result) print(w io.Writer) {
	table := func(rows []Row) {
		fmt.Fprintf(w, "| nodes | writes/s | Redis msgs/s (PUBLISH) | msgs/write | keys/msg | deliveries/s | applied inv./s | CPU µs/applied | CPU µs/write | idle CPU %% | Redis CPU µs/applied | propagation p50 µs | p99 µs | missing | load (start → end) |\n")
		fmt.Fprintf(w, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
		for _, x := range rows {
			dash := func(v float64, f string) string {
				if x.Applied == 0 {
					return "—"
				}
				return fmt.Sprintf(f, v)
			}
			fmt.Fprintf(w, "| %d | %.0f | %.0f | %.3f | %.2f | %.0f | %.0f | %s | %.1f | %.1f | %s | %s | %s | %d | %s → %s |\n",
				x.Nodes, x.WritesPerS, x.MsgsPerS, x.MsgsPerWrite, x.KeysPerMsg, x.DeliveriesPerS, x.AppliedPerS,
				dash(x.CPUPerAppliedUs, "%.1f"), x.CPUPerWriteUs, x.IdleCPUPct, dash(x.RedisCPUPerAppliedUs, "%.2f"),
				dash(x.P50us, "%.0f"), dash(x.P99us, "%.0f"), x.Missing, x.LoadStart, x.LoadEnd)
		}
	}
	if len(r.Nodes) > 0 {
		fmt.Fprintf(w, "Fixed write rate, %.1fs per row:\n\n", r.DurationS)
		table(r.Nodes)
	}
	if len(r.Rates) > 0 {
		fmt.Fprintf(w, "\nFixed node count, rising write rate, %.1fs per row:\n\n", r.DurationS)
		table(r.Rates)
	}
}
