package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/bench/internal/benchenv"
	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/store"
)

type config struct {
	services    benchenv.Services
	keys        int
	concurrency int
	rate        float64 // requests/s over all connections; 0: closed loop
	duration    time.Duration
	warmup      time.Duration
	rounds      int
	pgConns     int
	wrk         bool
	wrkThreads  int
	// cpuProfile, if set, receives a CPU profile of profileVariant's
	// measurement in the first round.
	cpuProfile     string
	profileVariant string
}

// variants, in the order of the first round.
var variantNames = []string{"coherent", "postgres", "redis", "ceiling"}

// Result is what readpath reports, and what bench/chart reads.
type Result struct {
	Config struct {
		Keys        int     `json:"keys"`
		Concurrency int     `json:"concurrency"`
		Rate        float64 `json:"rate,omitempty"`
		DurationS   float64 `json:"duration_s"`
		Rounds      int     `json:"rounds"`
		PGConns     int     `json:"pg_conns"`
		GOMAXPROCS  int     `json:"gomaxprocs"`
		NumCPU      int     `json:"num_cpu"`
	} `json:"config"`
	Variants []Variant `json:"variants"`
	// Ratios of coherent's throughput to the others'.
	VsPostgres float64 `json:"coherent_vs_postgres"`
	VsRedis    float64 `json:"coherent_vs_redis"`
	// VsCeiling is coherent's throughput over the ceiling variant's: the
	// same handler over a source that costs nothing, so what HTTP over
	// loopback allows on this machine.
	VsCeiling float64 `json:"coherent_vs_ceiling"`
	Wrk       []Wrk   `json:"wrk,omitempty"`
}

// Variant is one variant's numbers over every round.
type Variant struct {
	Name      string  `json:"name"`
	Requests  int64   `json:"requests"`
	Errors    int64   `json:"errors"`
	ReqPerSec float64 `json:"req_per_s"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	P999us    float64 `json:"p999_us"`
	// CPUPerReqUs is this process's CPU time (server and load generator)
	// per request; RedisCPUPerReqUs the Redis server's.
	CPUPerReqUs      float64 `json:"cpu_per_req_us"`
	RedisCPUPerReqUs float64 `json:"redis_cpu_per_req_us"`
	// SchedP99us is the 99th percentile of the Go scheduler's latency
	// (time runnable before running) while measured, the worst round's.
	SchedP99us    float64  `json:"sched_p99_us"`
	Rounds        []Round  `json:"rounds"`
	CacheHitRatio *float64 `json:"cache_hit_ratio,omitempty"`
}

// Round is one measurement of a variant.
type Round struct {
	ReqPerSec float64 `json:"req_per_s"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	// SchedP99us: see Variant.
	SchedP99us float64 `json:"sched_p99_us"`
	LoadStart  string  `json:"load_start"`
	LoadEnd    string  `json:"load_end"`
}

// Wrk is one variant measured by wrk.
type Wrk struct {
	Name      string  `json:"name"`
	ReqPerSec float64 `json:"req_per_s"`
	P50us     float64 `json:"p50_us"`
	P99us     float64 `json:"p99_us"`
	Non2xx    int64   `json:"non_2xx"`
	Load      string  `json:"load"`
}

func run(ctx context.Context, cfg config, log io.Writer) (*Result, error) {
	if cfg.keys < 1 || cfg.concurrency < 1 || cfg.rounds < 1 || cfg.duration <= 0 {
		return nil, errors.New("keys, concurrency, rounds and duration must be positive")
	}
	pcfg, err := pgxpool.ParseConfig(cfg.services.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	pcfg.MaxConns = int32(cfg.pgConns)
	pcfg.ConnConfig.RuntimeParams["application_name"] = "coherent-bench-readpath"
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	// One client for the cache-aside variant, one for the bus, as two
	// services would have.
	rdb, ropts, err := cfg.services.Redis(ctx)
	if err != nil {
		return nil, err
	}
	defer rdb.Close()
	busRDB := redis.NewClient(ropts)
	defer busRDB.Close()

	schema := benchenv.Name("bench_readpath_")
	prefix := benchenv.Name("bench:readpath:") + ":"
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(cctx, `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`); err != nil {
			fmt.Fprintf(log, "readpath: drop schema %s: %v\n", schema, err)
		}
		if err := benchenv.DeleteKeys(cctx, rdb, prefix); err != nil {
			fmt.Fprintf(log, "readpath: delete keys %s*: %v\n", prefix, err)
		}
	}()
	keys := make([]string, cfg.keys)
	for i := range keys {
		keys[i] = "item-" + strconv.Itoa(i)
	}
	if err := setup(ctx, pool, schema, keys); err != nil {
		return nil, fmt.Errorf("set up schema %s: %w", schema, err)
	}

	load := store.Loader[string](pool, loaderQuery(schema), pgx.RowToStructByName[Item])
	bus, err := invalidate.NewPubSub(busRDB, &invalidate.PubSubOptions{Channel: prefix + "invalidations"})
	if err != nil {
		return nil, err
	}
	defer bus.Close()
	items, err := cache.New("items", 100_000, load, &cache.Options[string, Item]{
		Bus:     bus,
		Version: func(it Item) int64 { return it.Version },
	})
	if err != nil {
		return nil, err
	}
	defer items.Close()
	srcs := map[string]source{
		"coherent": coherentSource{items},
		"postgres": postgresSource{load},
		"redis":    redisSource{rdb: rdb, prefix: prefix, ttl: 10 * time.Minute, load: load},
		"ceiling":  ceilingSource{},
	}

	// Wait for the bus's first proof: until then the cache reads through.
	for !items.Proven() {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Fill the caches (and Postgres's buffers) with every hot key.
	for _, name := range variantNames {
		for _, k := range keys {
			if _, err := srcs[name].get(ctx, k); err != nil {
				return nil, fmt.Errorf("%s: warm %s: %w", name, k, err)
			}
		}
	}

	var serverErrors atomic.Int64
	var firstServerErr atomic.Value
	addrs := map[string]string{}
	for _, name := range variantNames {
		s := &server{src: srcs[name], errors: func(err error) {
			serverErrors.Add(1)
			firstServerErr.CompareAndSwap(nil, err.Error())
		}}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		srv := &http.Server{Handler: s.routes(), ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(l)
		defer srv.Close()
		addrs[name] = l.Addr().String()
	}

	reqs := requests(keys)
	res := &Result{}
	res.Config.Keys, res.Config.Concurrency, res.Config.DurationS = cfg.keys, cfg.concurrency, cfg.duration.Seconds()
	res.Config.Rate = cfg.rate
	res.Config.Rounds, res.Config.PGConns = cfg.rounds, cfg.pgConns
	res.Config.GOMAXPROCS, res.Config.NumCPU = runtime.GOMAXPROCS(0), runtime.NumCPU()
	type acc struct {
		requests, errors int64
		elapsed, cpu     time.Duration
		redisCPU         time.Duration
		latency          []time.Duration
		rounds           []Round
		stats            cache.Stats // the cache's hits, misses and bypasses while measured
	}
	accs := map[string]*acc{}
	for _, name := range variantNames {
		accs[name] = &acc{}
	}
	seed := uint64(1)
	for r := range cfg.rounds {
		for j := range variantNames {
			name := variantNames[(r+j)%len(variantNames)]
			a := accs[name]
			seed++
			if cfg.warmup > 0 {
				generate(ctx, addrs[name], reqs, cfg.concurrency, cfg.warmup, seed, cfg.rate)
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			st0 := items.Stats()
			load0 := benchenv.LoadAvg()
			stopProfile, err := startProfile(cfg, r, name)
			if err != nil {
				return nil, err
			}
			cpu0, rcpu0 := benchenv.CPUTime(), benchenv.RedisCPU(ctx, rdb)
			sched0 := benchenv.ReadSchedLatency()
			lr := generate(ctx, addrs[name], reqs, cfg.concurrency, cfg.duration, seed, cfg.rate)
			sched1 := benchenv.ReadSchedLatency()
			cpu1, rcpu1 := benchenv.CPUTime(), benchenv.RedisCPU(ctx, rdb)
			stopProfile()
			load1 := benchenv.LoadAvg()
			st1 := items.Stats()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if lr.firstErr != nil {
				fmt.Fprintf(log, "readpath: %s: %d errors, first: %v\n", name, lr.errors, lr.firstErr)
			}
			if name == "coherent" {
				a.stats.Hits += st1.Hits - st0.Hits
				a.stats.Misses += st1.Misses - st0.Misses
				a.stats.Bypassed += st1.Bypassed - st0.Bypassed
			}
			a.requests += lr.requests
			a.errors += lr.errors
			a.elapsed += lr.elapsed
			a.cpu += cpu1 - cpu0
			a.redisCPU += rcpu1 - rcpu0
			a.latency = append(a.latency, lr.latency...)
			sorted := benchenv.Sorted(lr.latency)
			round := Round{
				ReqPerSec:  float64(lr.requests) / lr.elapsed.Seconds(),
				P50us:      benchenv.Micros(benchenv.Percentile(sorted, 0.50)),
				P99us:      benchenv.Micros(benchenv.Percentile(sorted, 0.99)),
				SchedP99us: benchenv.Micros(sched1.Quantile(sched0, 0.99)),
				LoadStart:  load0,
				LoadEnd:    load1,
			}
			a.rounds = append(a.rounds, round)
			fmt.Fprintf(log, "readpath: round %d %-8s %9.0f req/s  p50 %7.0f µs  p99 %7.0f µs  sched p99 %6.0f µs  load %s → %s\n",
				r+1, name, round.ReqPerSec, round.P50us, round.P99us, round.SchedP99us, load0, load1)
		}
	}
	for _, name := range variantNames {
		a := accs[name]
		sorted := benchenv.Sorted(a.latency)
		v := Variant{
			Name:      name,
			Requests:  a.requests,
			Errors:    a.errors,
			ReqPerSec: float64(a.requests) / a.elapsed.Seconds(),
			P50us:     benchenv.Micros(benchenv.Percentile(sorted, 0.50)),
			P99us:     benchenv.Micros(benchenv.Percentile(sorted, 0.99)),
			P999us:    benchenv.Micros(benchenv.Percentile(sorted, 0.999)),
			Rounds:    a.rounds,
		}
		for _, rd := range a.rounds {
			v.SchedP99us = max(v.SchedP99us, rd.SchedP99us)
		}
		if a.requests > 0 {
			v.CPUPerReqUs = benchenv.Micros(a.cpu) / float64(a.requests)
			v.RedisCPUPerReqUs = benchenv.Micros(a.redisCPU) / float64(a.requests)
		}
		if name == "coherent" {
			if n := a.stats.Hits + a.stats.Misses + a.stats.Bypassed; n > 0 {
				hr := float64(a.stats.Hits) / float64(n)
				v.CacheHitRatio = &hr
			}
		}
		res.Variants = append(res.Variants, v)
	}
	if n := serverErrors.Load(); n > 0 {
		return res, fmt.Errorf("%d server errors, first: %v", n, firstServerErr.Load())
	}
	byName := func(n string) Variant {
		for _, v := range res.Variants {
			if v.Name == n {
				return v
			}
		}
		return Variant{}
	}
	if pg := byName("postgres").ReqPerSec; pg > 0 {
		res.VsPostgres = byName("coherent").ReqPerSec / pg
	}
	if rd := byName("redis").ReqPerSec; rd > 0 {
		res.VsRedis = byName("coherent").ReqPerSec / rd
	}
	if c := byName("ceiling").ReqPerSec; c > 0 {
		res.VsCeiling = byName("coherent").ReqPerSec / c
	}

	if cfg.wrk {
		// The same rotation of rounds as above, one wrk run per variant
		// and round; a round disturbed by another process then shows as
		// an outlier that the median leaves out.
		rounds := map[string][]Wrk{}
		for r := range cfg.rounds {
			for j := range variantNames {
				name := variantNames[(r+j)%len(variantNames)]
				w, err := runWrk(ctx, addrs[name], cfg, name)
				if err != nil {
					return res, fmt.Errorf("wrk %s: %w", name, err)
				}
				fmt.Fprintf(log, "readpath: wrk round %d %-8s %9.0f req/s  p50 %7.0f µs  p99 %7.0f µs  load %s\n", r+1, name, w.ReqPerSec, w.P50us, w.P99us, w.Load)
				rounds[name] = append(rounds[name], w)
			}
		}
		for _, name := range variantNames {
			res.Wrk = append(res.Wrk, medianWrk(name, rounds[name]))
		}
	}
	return res, nil
}

// startProfile starts the CPU profile of cfg, if this is its measurement,
// and returns the function that stops it.
func startProfile(cfg config, round int, name string) (func(), error) {
	if cfg.cpuProfile == "" || round != 0 || name != cfg.profileVariant {
		return func() {}, nil
	}
	f, err := os.Create(cfg.cpuProfile)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}, nil
}

// setup creates schema with the items table, one row per key.
func setup(ctx context.Context, pool *pgxpool.Pool, schema string, keys []string) error {
	s := pgx.Identifier{schema}.Sanitize()
	if _, err := pool.Exec(ctx, `CREATE SCHEMA `+s); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE `+s+`.items (id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+s+`.items SELECT k, 'value of ' || k, 1 FROM unnest($1::text[]) k`, keys); err != nil {
		return err
	}
	_, err := pool.Exec(ctx, `ANALYZE `+s+`.items`)
	return err
}

// runWrk measures the variant at addr with wrk for cfg.duration (after
// cfg.warmup of wrk load), drawing keys uniformly as the in-process
// generator does.
func runWrk(ctx context.Context, addr string, cfg config, name string) (Wrk, error) {
	dir, err := os.MkdirTemp("", "readpath-wrk")
	if err != nil {
		return Wrk{}, err
	}
	defer os.RemoveAll(dir)
	script := filepath.Join(dir, "keys.lua")
	lua := fmt.Sprintf(`math.randomseed(os.time())
request = function() return wrk.format(nil, "/items/item-" .. math.random(0, %d)) end
done = function(summary, latency, requests)
  io.write(string.format("P50US %%d\nP99US %%d\nNON2XX %%d\n", latency:percentile(50), latency:percentile(99), summary.errors.status))
end
`, cfg.keys-1)
	if err := os.WriteFile(script, []byte(lua), 0o644); err != nil {
		return Wrk{}, err
	}
	dur := func(d time.Duration) string { return strconv.Itoa(max(int(d.Seconds()+0.5), 1)) + "s" }
	wrk := func(d time.Duration) (string, error) {
		out, err := exec.CommandContext(ctx, "wrk", "-t", strconv.Itoa(cfg.wrkThreads), "-c", strconv.Itoa(cfg.concurrency),
			"-d", dur(d), "-s", script, "http://"+addr+"/").CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("%w: %s", err, out)
		}
		return string(out), nil
	}
	if cfg.warmup > 0 {
		if _, err := wrk(cfg.warmup); err != nil {
			return Wrk{}, err
		}
	}
	load := benchenv.LoadAvg()
	out, err := wrk(cfg.duration)
	if err != nil {
		return Wrk{}, err
	}
	w := Wrk{Name: name, Load: load + " → " + benchenv.LoadAvg()}
	num := func(re string) (float64, error) {
		m := regexp.MustCompile(re).FindStringSubmatch(out)
		if m == nil {
			return 0, fmt.Errorf("no %s in wrk output: %s", re, out)
		}
		return strconv.ParseFloat(m[1], 64)
	}
	if w.ReqPerSec, err = num(`Requests/sec:\s+([0-9.]+)`); err != nil {
		return w, err
	}
	if w.P50us, err = num(`P50US ([0-9]+)`); err != nil {
		return w, err
	}
	if w.P99us, err = num(`P99US ([0-9]+)`); err != nil {
		return w, err
	}
	n, err := num(`NON2XX ([0-9]+)`)
	w.Non2xx = int64(n)
	if strings.Contains(out, "Socket errors") {
		return w, fmt.Errorf("socket errors: %s", out)
	}
	return w, err
}

// medianWrk summarises a variant's wrk rounds: the median of each number,
// and every round's load.
func medianWrk(name string, rounds []Wrk) Wrk {
	med := func(f func(Wrk) float64) float64 {
		v := make([]float64, len(rounds))
		for i, w := range rounds {
			v[i] = f(w)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	w := Wrk{
		Name:      name,
		ReqPerSec: med(func(w Wrk) float64 { return w.ReqPerSec }),
		P50us:     med(func(w Wrk) float64 { return w.P50us }),
		P99us:     med(func(w Wrk) float64 { return w.P99us }),
	}
	var loads []string
	for _, r := range rounds {
		w.Non2xx += r.Non2xx
		loads = append(loads, r.Load)
	}
	w.Load = strings.Join(loads, "; ")
	return w
}

// print writes the results as Markdown tables.
func (r *Result) print(w io.Writer) {
	fmt.Fprintf(w, "| variant | req/s | p50 µs | p99 µs | p99.9 µs | process CPU µs/req | Redis CPU µs/req | Go sched. latency p99 µs | load per round (start → end) |\n")
	fmt.Fprintf(w, "|---|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, v := range r.Variants {
		var loads []string
		for _, rd := range v.Rounds {
			loads = append(loads, rd.LoadStart+" → "+rd.LoadEnd)
		}
		name := v.Name
		if v.CacheHitRatio != nil {
			name += fmt.Sprintf(" (hit ratio %.4f)", *v.CacheHitRatio)
		}
		errs := ""
		if v.Errors > 0 {
			errs = fmt.Sprintf(" (%d errors)", v.Errors)
		}
		fmt.Fprintf(w, "| %s | %.0f%s | %.0f | %.0f | %.0f | %.1f | %.1f | %.0f | %s |\n",
			name, v.ReqPerSec, errs, v.P50us, v.P99us, v.P999us, v.CPUPerReqUs, v.RedisCPUPerReqUs, v.SchedP99us, strings.Join(loads, "; "))
	}
	if r.Config.Rate > 0 {
		fmt.Fprintf(w, "\npaced at %.0f requests/s in total; %d keys, %d connections, %d round(s) of %.1fs, GOMAXPROCS %d\n",
			r.Config.Rate, r.Config.Keys, r.Config.Concurrency, r.Config.Rounds, r.Config.DurationS, r.Config.GOMAXPROCS)
	} else {
		fmt.Fprintf(w, "\ncoherent/postgres throughput: %.2f× (goal ≥ 5×); coherent/redis: %.2f× (goal ≥ 2×); coherent/ceiling: %.2f (goal ≥ 0.9); %d keys, %d connections, %d round(s) of %.1fs, GOMAXPROCS %d\n",
			r.VsPostgres, r.VsRedis, r.VsCeiling, r.Config.Keys, r.Config.Concurrency, r.Config.Rounds, r.Config.DurationS, r.Config.GOMAXPROCS)
	}
	if len(r.Wrk) > 0 {
		fmt.Fprintf(w, "\n| variant (wrk, median of %d rounds) | req/s | p50 µs | p99 µs | load per round (start → end) |\n|---|---:|---:|---:|---|\n", r.Config.Rounds)
		for _, v := range r.Wrk {
			fmt.Fprintf(w, "| %s | %.0f | %.0f | %.0f | %s |\n", v.Name, v.ReqPerSec, v.P50us, v.P99us, v.Load)
		}
	}
}
