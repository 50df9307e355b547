package store

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Run the write-path benchmarks together, so that the full path, its raw
// parts and the capture trigger share one machine state, and summarise
// with benchstat (which wants at least 6 runs for a confidence interval):
//
//	go test -run '^$' -bench 'WritePath|Capture' -benchtime=2000x -count=6 ./store/ | tee new.txt
//	benchstat new.txt
//
// They need Postgres and Redis (DATABASE_URL, REDIS_URL), like the tests,
// and each run works in a schema and a Redis key prefix of its own, which
// it removes. Latencies are reported as p50 and p99 in µs; ns/op is the
// mean time of one iteration, which in the VsRaw and Capture benchmarks
// holds one write of each kind.

// writePath is the state of one benchmark of the write path: a node, the
// rows it writes and, for optimistic writes, their current versions.
type writePath struct {
	n        *benchNode
	versions map[string]int64 // of the optimistic keys
	seq      uint64           // of the raw messages
	buf      []byte
}

// Each path writes its own rows, so that none of them waits for another's.
const (
	fullKeys       = "full-"
	rawKeys        = "raw-"
	optimisticKeys = "opt-"
)

// newWritePath sets up the given paths ("full", "raw", "optimistic") on a
// node of a fresh env, instrumented by tr if not nil. The node runs the
// relay, as every node of a deployment does, so that writes confirm their
// outbox rows off their path.
func newWritePath(b *testing.B, tr *benchTrace, paths ...string) *writePath {
	b.Helper()
	e := newEnv(b)
	w := &writePath{n: newBenchNode(b, e, tr), versions: make(map[string]int64)}
	prefixes := map[string]string{"full": fullKeys, "raw": rawKeys, "optimistic": optimisticKeys}
	for _, path := range paths {
		e.seed(b, e.table, prefixes[path])
	}
	for i := range benchKeys {
		w.versions[benchKey(optimisticKeys, i)] = 1
	}
	rctx, stop := context.WithCancel(context.Background())
	relayed := make(chan struct{})
	go func() {
		defer close(relayed)
		w.n.s.RunRelay(rctx)
	}()
	b.Cleanup(func() { stop(); <-relayed })
	// Warm up: every key's lock counter, fence and outbox row exist, every
	// statement is prepared on the connections the loop will use, and
	// every script is loaded.
	ctx := b.Context()
	for i := range 2 * benchKeys {
		for _, path := range paths {
			if err := w.write(ctx, path, i); err != nil {
				b.Fatal(err)
			}
		}
	}
	w.drain(b)
	return w
}

// drain waits until the outbox rows of the writes so far are confirmed.
func (w *writePath) drain(b *testing.B) {
	waitFor(b, "the outbox confirmations", func() bool {
		n, err := w.n.s.Pending(context.Background())
		return err == nil && n == 0
	})
}

// check fails b unless every write published its invalidation and
// confirmed its outbox row: a benchmark of writes that fell back on the
// relay would measure something else.
func (w *writePath) check(b *testing.B) {
	b.Helper()
	w.drain(b)
	if st := w.n.s.Stats(); st.PublishFailures != 0 {
		b.Errorf("Stats().PublishFailures = %d; want 0", st.PublishFailures)
	}
}

// write writes key i through path, discarding a raw write's parts.
func (w *writePath) write(ctx context.Context, path string, i int) error {
	switch path {
	case "full":
		return w.full(ctx, i)
	case "raw":
		_, err := w.raw(ctx, i)
		return err
	case "optimistic":
		return w.optimistic(ctx, i)
	}
	return fmt.Errorf("no path %q", path)
}

// full writes key i through Update: lock, fence, the user function, the
// outbox, commit, install, PUBLISH through the bus, confirm, release.
func (w *writePath) full(ctx context.Context, i int) error {
	key := benchKey(fullKeys, i)
	_, err := NewTable(w.n.s, w.n.c, nil).Update(ctx, key, w.n.e.put(key, strconv.Itoa(i)))
	return err
}

// raw writes key i by hand with the same user function and no more than
// the round trips a lock-guarded write must make.
func (w *writePath) raw(ctx context.Context, i int) (rawParts, error) {
	w.seq++
	p, buf, err := w.n.rawWrite(ctx, benchKey(rawKeys, i), strconv.Itoa(i), w.seq, w.buf)
	w.buf = buf
	return p, err
}

// optimistic writes key i through UpdateOptimistic with a version check.
func (w *writePath) optimistic(ctx context.Context, i int) error {
	key := benchKey(optimisticKeys, i)
	ch, err := NewTable(w.n.s, w.n.c, nil).UpdateOptimistic(ctx, key, w.n.e.putIf(key, strconv.Itoa(i), w.versions[key]))
	if err != nil {
		return err
	}
	w.versions[key] = ch.Version
	return nil
}

// BenchmarkWritePath measures one uncontended write of a row through each
// path, each in its own sub-benchmark:
//
//   - path=full: Update through a lock guard and a Redis pub/sub bus;
//   - path=raw: the same row written by hand with the fewest round trips
//     a lock-guarded, published write needs (see rawWrite), whose parts
//     it also reports;
//   - path=optimistic: UpdateOptimistic with a version check.
//
// For ratios, prefer BenchmarkWritePathVsRaw, which interleaves them.
func BenchmarkWritePath(b *testing.B) {
	for _, path := range []string{"full", "raw", "optimistic"} {
		b.Run("path="+path, func(b *testing.B) {
			w := newWritePath(b, nil, path)
			ctx := b.Context()
			if path == "raw" {
				var lat rawLatencies
				b.ReportAllocs()
				b.ResetTimer()
				for i := range b.N {
					p, err := w.raw(ctx, i)
					if err != nil {
						b.Fatal(err)
					}
					lat.add(p)
				}
				b.StopTimer()
				w.check(b)
				reportLatency(b, "", lat.total)
				lat.reportParts(b)
				return
			}
			lat := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				t0 := time.Now()
				if err := w.write(ctx, path, i); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			b.StopTimer()
			w.check(b)
			reportLatency(b, "", lat)
		})
	}
}

// BenchmarkWritePathVsRaw interleaves the paths of BenchmarkWritePath in
// one loop, rotating which goes first, so that all see the same machine:
// on a shared 2-core machine separate runs drift more than the differences
// being measured. It reports each path's p50 and p99, the raw parts' p50s
// and their sum, and the ratios to raw: full/raw is the goal of issue 5
// (at most 1.3). One op is one write of each path.
func BenchmarkWritePathVsRaw(b *testing.B) {
	order := []string{"full", "raw", "optimistic"}
	w := newWritePath(b, nil, order...)
	ctx := b.Context()
	lat := map[string][]time.Duration{}
	var raw rawLatencies
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		for j := range order {
			path := order[(i+j)%len(order)]
			if path == "raw" {
				p, err := w.raw(ctx, i)
				if err != nil {
					b.Fatal(err)
				}
				raw.add(p)
				continue
			}
			t0 := time.Now()
			if err := w.write(ctx, path, i); err != nil {
				b.Fatal(err)
			}
			lat[path] = append(lat[path], time.Since(t0))
		}
	}
	b.StopTimer()
	w.check(b)
	raw50, raw99 := reportLatency(b, "raw-", raw.total)
	b.ReportMetric(µs(raw.reportParts(b)), "raw-parts-sum-p50-µs")
	for _, path := range []string{"full", "optimistic"} {
		short := map[string]string{"full": "full", "optimistic": "opt"}[path]
		p50, p99 := reportLatency(b, short+"-", lat[path])
		b.ReportMetric(float64(p50)/float64(raw50), short+"/raw-p50")
		b.ReportMetric(float64(p99)/float64(raw99), short+"/raw-p99")
	}
}

// BenchmarkWritePathRoundTrips counts and times the round trips of one
// write of each path: pgx's tracer sees every statement (begin and commit
// included), a go-redis hook every command, and counters on the sockets
// every message sent, which catches what the tracers cannot see (pool
// pings). It reports round trips per write, the p50 of each round trip
// and of the gaps between them (see reportRoundTrips), and logs the
// sequence of one write; the bus's probes, sent in the background every
// 100ms, are left out of the counts by the hook but not by the socket
// counters. The tracing slows the writes down: take latencies from the
// other benchmarks.
func BenchmarkWritePathRoundTrips(b *testing.B) {
	for _, path := range []string{"full", "raw", "optimistic"} {
		b.Run("path="+path, func(b *testing.B) {
			tr := &benchTrace{rec: new(rtRecorder)}
			w := newWritePath(b, tr, path)
			ctx := b.Context()
			lat := make([]time.Duration, 0, b.N)
			spans := make([][2]time.Time, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			tr.rec.on.Store(true)
			for i := range b.N {
				tr.rec.op.Store(int64(i))
				t0 := time.Now()
				if err := w.write(ctx, path, i); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				lat = append(lat, t1.Sub(t0))
				spans = append(spans, [2]time.Time{t0, t1})
			}
			tr.rec.on.Store(false)
			b.StopTimer()
			w.check(b)
			reportLatency(b, "", lat)
			reportRoundTrips(b, path, tr, spans)
		})
	}
}

// reportRoundTrips reports the round trips per write that tr saw, the p50
// of each step (unit: the step's label) and the p50 of the time before it
// in which the write made no round trip (unit: gap- and the label; gap-end
// is the time after the last one): Go code, goroutine hand-offs and
// scheduling. between-rts-p50-µs is the p50 of the writes' sums of gaps.
// spans are the writes' start and end times. It logs the sequence of one
// write.
func reportRoundTrips(b *testing.B, path string, tr *benchTrace, spans [][2]time.Time) {
	tr.rec.mu.Lock()
	events := slices.Clone(tr.rec.events)
	tr.rec.mu.Unlock()
	n := float64(b.N)
	counts := map[string]int{}
	byLabel := map[string][]time.Duration{}
	byOp := make([][]rtEvent, b.N)
	for _, ev := range events {
		if ev.background() {
			continue
		}
		if offPath(ev.label) {
			counts[ev.system+"-async"]++
		} else {
			counts[ev.system]++
			byOp[ev.op] = append(byOp[ev.op], ev)
		}
		byLabel[ev.label] = append(byLabel[ev.label], ev.end.Sub(ev.start))
	}
	b.ReportMetric(float64(counts["pg"])/n, "pg-rt/op")
	b.ReportMetric(float64(counts["redis"])/n, "redis-rt/op")
	if counts["pg-async"] > 0 {
		b.ReportMetric(float64(counts["pg-async"])/n, "pg-rt-async/op")
	}
	b.ReportMetric(float64(tr.pgWrites.Load())/n, "pg-sends/op")
	b.ReportMetric(float64(tr.rdWrites.Load())/n, "redis-sends/op")
	for label, lat := range byLabel {
		slices.Sort(lat)
		b.ReportMetric(µs(percentile(lat, 0.5)), metricUnit(label))
	}

	// The gaps between the round trips of each write, and their sum.
	gaps := map[string][]time.Duration{}
	between := make([]time.Duration, 0, b.N)
	for op, evs := range byOp {
		slices.SortFunc(evs, func(a, b rtEvent) int { return a.start.Compare(b.start) })
		prev := spans[op][0]
		var sum time.Duration
		for _, ev := range evs {
			gap := max(0, ev.start.Sub(prev))
			gaps[ev.label] = append(gaps[ev.label], gap)
			sum += gap
			prev = ev.end
		}
		gap := max(0, spans[op][1].Sub(prev))
		gaps["end"] = append(gaps["end"], gap)
		between = append(between, sum+gap)
	}
	reportP50(b, "between-rts-p50-µs", between)
	for label, lat := range gaps {
		slices.Sort(lat)
		b.ReportMetric(µs(percentile(lat, 0.5)), metricUnit("gap-"+label))
	}

	// One write from the middle of the run, in order.
	var seq []string
	for _, ev := range byOp[b.N/2] {
		name := rtNames[ev.label]
		if name == "" {
			name = ev.label
		}
		seq = append(seq, fmt.Sprintf("%s %s", ev.system, name))
	}
	b.Logf("path=%s, N=%d, round trips of one write: %s", path, b.N, strings.Join(seq, " → "))
}

// metricUnit is the unit of the p50 of label.
func metricUnit(label string) string {
	return strings.Join(strings.Fields(label), "_") + "-p50-µs"
}

// BenchmarkCaptureTrigger measures what the capture trigger adds to a write
// made outside the library: the same UPDATE of one row, by plain pgx in
// autocommit, on a table without capture and on one after Store.Capture
// (with a version column), alternating between the two. Sub-benchmarks:
//
//   - writes=outside/relay=off: no relay runs; the trigger upserts the
//     key's outbox row, which stays.
//   - writes=outside/relay=off/notify=off: the same with the outbox's
//     NOTIFY trigger disabled, to show what the NOTIFY costs.
//   - writes=outside/relay=on: Store.RunRelay runs, woken by each write's
//     NOTIFY, and deletes each row soon after it was written; the writes
//     share the machine with it, as in production.
//   - writes=outside/relay=inline: after each captured write, one
//     Store.RelayOnce publishes and deletes its row, timed on its own
//     (relay-p50-µs: the relay's cost for a lone row).
//   - writes=skipped: transactions that name their row in coherent.skip
//     first, as the store's own writes do (BEGIN; set_config; UPDATE;
//     COMMIT): what a captured table costs the library's writes.
//
// Each reports the p50 and p99 of both writes, the trigger's cost per write
// (the difference of the p50s) and their ratio. relay=off also times one
// RelayOnce of the rows left in the outbox (relay-batch-µs/row).
func BenchmarkCaptureTrigger(b *testing.B) {
	for _, bc := range []struct {
		name          string
		relay         string // "off", "on" or "inline"
		notifyOff     bool
		skipCapture   bool
		reportBatched bool
	}{
		{name: "writes=outside/relay=off", relay: "off", reportBatched: true},
		{name: "writes=outside/relay=off/notify=off", relay: "off", notifyOff: true},
		{name: "writes=outside/relay=on", relay: "on"},
		{name: "writes=outside/relay=inline", relay: "inline"},
		{name: "writes=skipped", relay: "off", skipCapture: true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			e := newEnv(b)
			n := newBenchNode(b, e, nil)
			ctx := b.Context()
			plain := pgx.Identifier{e.schema, "plain_items"}.Sanitize()
			if _, err := e.pool.Exec(ctx, `CREATE TABLE `+plain+` (id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`); err != nil {
				b.Fatal(err)
			}
			e.seed(b, plain, "k")
			e.seed(b, e.table, "k")
			if err := n.s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"}); err != nil {
				b.Fatal(err)
			}
			if bc.notifyOff {
				if _, err := e.pool.Exec(ctx, `ALTER TABLE `+pgx.Identifier{e.schema, "outbox"}.Sanitize()+` DISABLE TRIGGER outbox_notify`); err != nil {
					b.Fatal(err)
				}
			}
			if bc.relay == "on" {
				rctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- n.s.RunRelay(rctx) }()
				b.Cleanup(func() {
					cancel()
					if err := <-done; !errors.Is(err, context.Canceled) {
						b.Errorf("RunRelay = %v; want context.Canceled", err)
					}
				})
			}
			// The writes come from another client, as psql or another
			// service would make them.
			outside := newPool(b, e.schema+"_outside")
			update := func(table string) func(ctx context.Context, key, value string) error {
				sql := `UPDATE ` + table + ` SET value = $2, version = version + 1 WHERE id = $1`
				if !bc.skipCapture {
					return func(ctx context.Context, key, value string) error {
						tag, err := outside.Exec(ctx, sql, key, value)
						if err == nil {
							err = ExpectRows(tag, 1)
						}
						return err
					}
				}
				return func(ctx context.Context, key, value string) error {
					return pgx.BeginFunc(ctx, outside, func(tx pgx.Tx) error {
						if _, err := tx.Exec(ctx, `SELECT set_config('coherent.skip', $1, true)`, outboxKeyHex("items", key)); err != nil {
							return err
						}
						tag, err := tx.Exec(ctx, sql, key, value)
						if err == nil {
							err = ExpectRows(tag, 1)
						}
						return err
					})
				}
			}
			writePlain, writeCaptured := update(plain), update(e.table)
			relayInline := func() (time.Duration, error) {
				t0 := time.Now()
				got, err := n.s.RelayOnce(ctx)
				if err == nil && got != 1 {
					err = fmt.Errorf("RelayOnce published %d rows; want 1", got)
				}
				return time.Since(t0), err
			}
			for i := range 2 * benchKeys { // warm up
				key, v := benchKey("k", i), strconv.Itoa(i)
				if err := writePlain(ctx, key, v); err != nil {
					b.Fatal(err)
				}
				if err := writeCaptured(ctx, key, v); err != nil {
					b.Fatal(err)
				}
				if bc.relay == "inline" {
					if _, err := relayInline(); err != nil {
						b.Fatal(err)
					}
				}
			}
			relayedBefore := n.s.Stats().Relayed

			plainLat := make([]time.Duration, 0, b.N)
			capLat := make([]time.Duration, 0, b.N)
			relayLat := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				key, v := benchKey("k", i), strconv.Itoa(i)
				for j := range 2 {
					t0 := time.Now()
					if (i+j)%2 == 0 {
						if err := writePlain(ctx, key, v); err != nil {
							b.Fatal(err)
						}
						plainLat = append(plainLat, time.Since(t0))
						continue
					}
					if err := writeCaptured(ctx, key, v); err != nil {
						b.Fatal(err)
					}
					capLat = append(capLat, time.Since(t0))
					if bc.relay == "inline" {
						d, err := relayInline()
						if err != nil {
							b.Fatal(err)
						}
						relayLat = append(relayLat, d)
					}
				}
			}
			b.StopTimer()
			plain50, plain99 := reportLatency(b, "plain-", plainLat)
			cap50, cap99 := reportLatency(b, "captured-", capLat)
			b.ReportMetric(µs(cap50-plain50), "trigger-p50-µs")
			b.ReportMetric(µs(cap99-plain99), "trigger-p99-µs")
			b.ReportMetric(float64(cap50)/float64(plain50), "captured/plain-p50")
			switch {
			case bc.relay == "inline":
				reportP50(b, "relay-p50-µs", relayLat)
			case bc.relay == "on":
				b.ReportMetric(float64(n.s.Stats().Relayed-relayedBefore)/float64(b.N), "relayed/write")
			case bc.reportBatched:
				pending, err := n.s.Pending(ctx)
				if err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				got, err := n.s.RelayOnce(ctx)
				d := time.Since(t0)
				if err != nil {
					b.Fatal(err)
				}
				if int64(got) != pending {
					b.Fatalf("RelayOnce published %d rows; want the %d pending", got, pending)
				}
				b.ReportMetric(µs(d)/float64(got), "relay-batch-µs/row")
			}
		})
	}
}
