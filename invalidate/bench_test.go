package invalidate

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// Run the benchmarks together, so that the raw go-redis baseline and the
// buses share one machine state:
//
//	go test -run '^$' -bench . -benchtime=3000x -count=5 ./invalidate/

// signal is a Handler that reports every key it receives.
type signal struct {
	keys chan string
	n    atomic.Int64
}

func (s *signal) Invalidate(keys []cache.Invalidation) {
	for _, k := range keys {
		s.n.Add(1)
		select {
		case s.keys <- k.Key:
		default:
		}
	}
}

func (s *signal) Flush()    {}
func (s *signal) LinkLost() {}

// reportLatencies reports the median and 99th percentile of lat.
func reportLatencies(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	p := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Nanoseconds()) / 1e3 }
	b.ReportMetric(p(0.50), "p50-µs")
	b.ReportMetric(p(0.99), "p99-µs")
	b.ReportMetric(0, "ns/op") // the loop's time includes the waits
}

// BenchmarkPropagation measures the delay from a publication on one node
// to its delivery on another: raw go-redis PUBLISH → Receive (the physical
// limit), then PubSub and Streams from Publish to the Handler.
func BenchmarkPropagation(b *testing.B) {
	payload := appendMessage(nil, &message{namespace: "users", origin: testOrigin, seq: 1, keys: []cache.Invalidation{{Key: "user:123456", Version: 42}}})

	b.Run("raw", func(b *testing.B) {
		channel := uniqueName(b)
		pub, sub := newClient(b, nil), newClient(b, nil)
		ps := sub.Subscribe(context.Background(), channel)
		defer ps.Close()
		if _, err := ps.Receive(context.Background()); err != nil { // the confirmation
			b.Fatal(err)
		}
		got := make(chan struct{}, 1)
		go func() {
			for {
				if _, err := ps.ReceiveMessage(context.Background()); err != nil {
					return
				}
				got <- struct{}{}
			}
		}()
		lat := make([]time.Duration, 0, b.N)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			start := time.Now()
			if err := pub.Publish(context.Background(), channel, payload).Err(); err != nil {
				b.Fatal(err)
			}
			<-got
			lat = append(lat, time.Since(start))
		}
		b.StopTimer()
		reportLatencies(b, lat)
	})

	buses := []struct {
		name string
		make func(b *testing.B, name string) cache.Bus
	}{
		{"pubsub", func(b *testing.B, name string) cache.Bus {
			return newPubSub(b, newClient(b, nil), &PubSubOptions{Channel: name})
		}},
		{"streams", func(b *testing.B, name string) cache.Bus {
			return newStreams(b, newClient(b, nil), &StreamsOptions{Stream: name})
		}},
	}
	for _, bus := range buses {
		b.Run(bus.name, func(b *testing.B) {
			name := uniqueName(b)
			b.Cleanup(func() { _ = newClient(b, nil).Del(context.Background(), name).Err() })
			from, to := bus.make(b, name), bus.make(b, name)
			sa, err := from.Subscribe("users", new(invalidatetest.Recorder), invalidatetest.MaxStaleness)
			if err != nil {
				b.Fatal(err)
			}
			sig := &signal{keys: make(chan string, 1)}
			sb, err := to.Subscribe("users", sig, invalidatetest.MaxStaleness)
			if err != nil {
				b.Fatal(err)
			}
			invalidatetest.WaitProven(b, sa, sb)
			keys := []cache.Invalidation{{Key: "user:123456", Version: 42}}
			lat := make([]time.Duration, 0, b.N)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				start := time.Now()
				if err := sa.Publish(context.Background(), keys); err != nil {
					b.Fatal(err)
				}
				<-sig.keys
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			reportLatencies(b, lat)
		})
	}
}

// BenchmarkThroughput measures invalidations per second from one node to
// another, each a single key published by one of many concurrent writers
// (64, then 256): raw go-redis PUBLISH of one message per key, then PubSub
// without batching (BatchKeys 1), with it (the defaults: group commit), and
// with a BatchWindow of 1ms, which these writers, each waiting for its
// publication, only slow down. Under group commit a message carries the
// writers that arrived while the previous one was in flight. BENCHMARKS.md
// ("The bus alone") has figures.
func BenchmarkThroughput(b *testing.B) {
	payload := appendMessage(nil, &message{namespace: "users", origin: testOrigin, seq: 1, keys: []cache.Invalidation{{Key: "user:123456", Version: 42}}})
	for _, publishers := range []int{64, 256} {
		b.Run("raw/writers="+itoa(publishers), func(b *testing.B) {
			channel := uniqueName(b)
			pub, sub := newClient(b, func(o *redis.Options) { o.PoolSize = publishers }), newClient(b, nil)
			ps := sub.Subscribe(context.Background(), channel)
			defer ps.Close()
			if _, err := ps.Receive(context.Background()); err != nil {
				b.Fatal(err)
			}
			var received atomic.Int64
			done := make(chan struct{})
			go func() {
				for {
					if _, err := ps.ReceiveMessage(context.Background()); err != nil {
						return
					}
					if received.Add(1) == int64(b.N) {
						close(done)
					}
				}
			}()
			b.ResetTimer()
			run(b, publishers, func() {
				if err := pub.Publish(context.Background(), channel, payload).Err(); err != nil {
					b.Error(err)
				}
			})
			<-done
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "keys/s")
		})

		for _, tt := range []struct {
			name      string
			batchKeys int
			window    time.Duration
		}{
			{"unbatched", 1, 0},
			{"batched", 0, 0},
			{"batched-window-1ms", 0, time.Millisecond},
		} {
			b.Run(tt.name+"/writers="+itoa(publishers), func(b *testing.B) {
				channel := uniqueName(b)
				from := newPubSub(b, newClient(b, func(o *redis.Options) { o.PoolSize = publishers }), &PubSubOptions{Channel: channel, Options: Options{BatchKeys: tt.batchKeys, BatchWindow: tt.window}})
				to := newPubSub(b, newClient(b, nil), &PubSubOptions{Channel: channel})
				sa, _ := from.Subscribe("users", new(invalidatetest.Recorder), invalidatetest.MaxStaleness)
				sig := &signal{keys: make(chan string)}
				sb, _ := to.Subscribe("users", sig, invalidatetest.MaxStaleness)
				invalidatetest.WaitProven(b, sa, sb)
				var i atomic.Int64
				b.ResetTimer()
				run(b, publishers, func() {
					// Distinct keys, so that batches cannot merge any.
					k := "user:" + itoa(int(i.Add(1)))
					if err := sa.Publish(context.Background(), []cache.Invalidation{{Key: k}}); err != nil {
						b.Error(err)
					}
				})
				for sig.n.Load() < int64(b.N) {
					time.Sleep(100 * time.Microsecond)
				}
				b.StopTimer()
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "keys/s")
				st := from.Stats()
				b.ReportMetric(float64(st.KeysSent)/float64(st.MessagesSent), "keys/msg")
			})
		}
	}
}

// run calls fn b.N times from publishers goroutines.
func run(b *testing.B, publishers int, fn func()) {
	var wg sync.WaitGroup
	var n atomic.Int64
	for range publishers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n.Add(1) <= int64(b.N) {
				fn()
			}
		}()
	}
	wg.Wait()
}
