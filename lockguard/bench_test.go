package lockguard

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Run with, for example:
//
//	go test -run '^$' -bench . -benchtime=2000x -count=5 ./lockguard/
//
// Each benchmark reports the p50 and p99 of one operation besides ns/op.

// rawRelease is the compare-and-delete of the raw recipe, which the
// library's release script matches.
var rawRelease = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('DEL', KEYS[1])
end
return 0
`)

// rawPair takes and releases a lock the raw way: SET key value NX PX, then
// EVALSHA of a compare-and-delete, with a fresh random value per round.
func rawPair(ctx context.Context, rdb *redis.Client, key string) error {
	value := crand.Text()
	ok, err := rdb.SetArgs(ctx, key, value, redis.SetArgs{Mode: "NX", TTL: DefaultTTL}).Result()
	if err != nil {
		return err
	}
	if ok != "OK" {
		return ErrNotAcquired
	}
	n, err := rdb.EvalSha(ctx, rawRelease.Hash(), []string{key}, value).Int64()
	if err != nil {
		return err
	}
	if n != 1 {
		return ErrNotHeld
	}
	return nil
}

// libPair takes and releases a lock with the library.
func libPair(ctx context.Context, g *Guard, name string) error {
	l, err := g.TryAcquire(ctx, name)
	if err != nil {
		return err
	}
	return l.Release(ctx)
}

// benchSetup returns a client, a Guard under a fresh prefix, and the raw
// key; the scripts are loaded, so no run pays for NOSCRIPT.
func benchSetup(b *testing.B) (*redis.Client, *Guard, string) {
	rdb := newClient(b, nil)
	prefix := testPrefix(b, rdb)
	g := newGuard(b, rdb, prefix, nil)
	ctx := context.Background()
	for _, s := range []*redis.Script{acquireScript, releaseScript, rawRelease} {
		if err := s.Load(ctx, rdb).Err(); err != nil {
			b.Fatal(err)
		}
	}
	return rdb, g, prefix + "raw"
}

// percentile returns the p-th percentile of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

func reportLatency(b *testing.B, prefix string, lat []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(lat)
	p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
	b.ReportMetric(float64(p50.Microseconds()), prefix+"p50-µs")
	b.ReportMetric(float64(p99.Microseconds()), prefix+"p99-µs")
	return p50, p99
}

// BenchmarkAcquireRelease measures an uncontended TryAcquire plus Release.
func BenchmarkAcquireRelease(b *testing.B) {
	_, g, _ := benchSetup(b)
	ctx := context.Background()
	lat := make([]time.Duration, 0, 4096)
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		if err := libPair(ctx, g, "bench"); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportLatency(b, "", lat)
}

// BenchmarkRawSetNXEvalSHA measures the baseline: SET NX PX plus an
// EVALSHA compare-and-delete.
func BenchmarkRawSetNXEvalSHA(b *testing.B) {
	rdb, _, key := benchSetup(b)
	ctx := context.Background()
	lat := make([]time.Duration, 0, 4096)
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		if err := rawPair(ctx, rdb, key); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportLatency(b, "", lat)
}

// BenchmarkAcquireReleaseVsRaw alternates the library's pair and the raw
// pair in one loop, so that both see the same machine, and reports their
// latencies and the ratios library/raw. One op is one of each.
func BenchmarkAcquireReleaseVsRaw(b *testing.B) {
	rdb, g, key := benchSetup(b)
	ctx := context.Background()
	libLat := make([]time.Duration, 0, 4096)
	rawLat := make([]time.Duration, 0, 4096)
	i := 0
	for b.Loop() {
		// Alternate which goes first, so that neither always follows
		// the other's round trips.
		for j := range 2 {
			t0 := time.Now()
			if (i+j)%2 == 0 {
				if err := libPair(ctx, g, "bench"); err != nil {
					b.Fatal(err)
				}
				libLat = append(libLat, time.Since(t0))
			} else {
				if err := rawPair(ctx, rdb, key); err != nil {
					b.Fatal(err)
				}
				rawLat = append(rawLat, time.Since(t0))
			}
		}
		i++
	}
	lib50, lib99 := reportLatency(b, "lib-", libLat)
	raw50, raw99 := reportLatency(b, "raw-", rawLat)
	b.ReportMetric(float64(lib50)/float64(raw50), "p50-ratio")
	b.ReportMetric(float64(lib99)/float64(raw99), "p99-ratio")
}

// BenchmarkContended runs 8 workers, each on its own client (8 nodes),
// that take one lock in turn and increment a counter in Redis under it
// (GET, then SET), then spend think outside the lock before the next
// Acquire. It reports acquisitions per second, Redis commands per
// acquisition (attempts, the increment, the release), the p50/p99/max
// time a worker waits in Acquire, and fairness: the smallest worker's
// share of acquisitions, relative to an even split (1 is fair).
func BenchmarkContended(b *testing.B) {
	for _, think := range []time.Duration{0, time.Millisecond} {
		for _, bc := range []struct {
			name string
			opts Options
		}{
			{"poll", Options{DisableNotify: true}},
			{"notify", Options{}},
		} {
			b.Run(fmt.Sprintf("think=%v/%s", think, bc.name), func(b *testing.B) { benchContended(b, bc.opts, think) })
		}
	}
}

func benchContended(b *testing.B, opts Options, think time.Duration) {
	const workers = 8
	admin := newClient(b, nil)
	prefix := testPrefix(b, admin)
	counter := prefix + "counter"
	ctx := context.Background()

	type worker struct {
		rdb  *redis.Client
		g    *Guard
		hook *cmdHook
		n    int
	}
	ws := make([]*worker, workers)
	for i := range ws {
		rdb := newClient(b, nil)
		hook := &cmdHook{}
		rdb.AddHook(hook)
		ws[i] = &worker{rdb: rdb, g: newGuard(b, rdb, prefix, &opts), hook: hook}
		// Load the scripts and warm the connection.
		if err := libPair(ctx, ws[i].g, "warm"); err != nil {
			b.Fatal(err)
		}
	}
	before := 0
	for _, w := range ws {
		before += w.hook.count()
	}

	var remaining atomic.Int64
	remaining.Store(int64(b.N))
	var mu sync.Mutex
	var waits []time.Duration
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for _, w := range ws {
		wg.Go(func() {
			var mine []time.Duration
			defer func() {
				mu.Lock()
				waits = append(waits, mine...)
				mu.Unlock()
			}()
			for remaining.Add(-1) >= 0 {
				t0 := time.Now()
				l, err := w.g.Acquire(ctx, "hot")
				if err != nil {
					b.Error(err)
					return
				}
				mine = append(mine, time.Since(t0))
				w.n++
				n, err := w.rdb.Get(ctx, counter).Int()
				if err != nil && !errors.Is(err, redis.Nil) {
					b.Error(err)
				}
				if err := w.rdb.Set(ctx, counter, n+1, 0).Err(); err != nil {
					b.Error(err)
				}
				if err := l.Release(ctx); err != nil {
					b.Error(err)
				}
				if think > 0 {
					time.Sleep(think)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if got, _ := admin.Get(ctx, counter).Int(); got != b.N {
		b.Fatalf("counter = %d; want %d", got, b.N)
	}
	after, least := 0, b.N
	for _, w := range ws {
		after += w.hook.count()
		least = min(least, w.n)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "acq/s")
	b.ReportMetric(float64(after-before)/float64(b.N), "cmds/acq")
	b.ReportMetric(float64(least)*workers/float64(b.N), "min-share")
	reportLatency(b, "wait-", waits)
	b.ReportMetric(float64(waits[len(waits)-1].Microseconds()), "wait-max-µs")
}
