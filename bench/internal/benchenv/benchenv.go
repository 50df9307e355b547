// Package benchenv holds what the programs under bench/ share: the service
// flags with the defaults of examples/webapp, the load average and process
// CPU time recorded next to every number, percentiles, unique names and the
// JSON results that bench/chart and bench/run.sh read.
package benchenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// Services are the URLs of the Postgres and Redis a program uses.
type Services struct {
	DatabaseURL string
	RedisURL    string
}

// Register adds -database-url and -redis-url to fs, with DATABASE_URL and
// REDIS_URL or the local services as defaults, as in examples/webapp.
func (s *Services) Register(fs *flag.FlagSet) {
	fs.StringVar(&s.DatabaseURL, "database-url", Env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"), "Postgres URL")
	fs.StringVar(&s.RedisURL, "redis-url", Env("REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis URL")
}

// Redis opens a client of the Services' Redis and checks that it answers.
// It returns the client's options too, for clients of the program's own
// nodes.
func (s *Services) Redis(ctx context.Context) (*redis.Client, *redis.Options, error) {
	opts, err := redis.ParseURL(s.RedisURL)
	if err != nil {
		return nil, nil, fmt.Errorf("redis: %w", err)
	}
	c := redis.NewClient(opts)
	if err := c.Ping(ctx).Err(); err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("redis: %w", err)
	}
	return c, opts, nil
}

// Ints parses a comma-separated list of positive integers (a flag such as
// -nodes 1,4,8,16).
func Ints(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// Env returns the environment variable name, or def if it is unset or empty.
func Env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// LoadAvg returns the 1-, 5- and 15-minute load averages as uptime prints
// them ("2.20 2.52 2.42"), or "?" if /proc/loadavg cannot be read.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// CPUTime returns the user plus system CPU time this process has used so
// far (getrusage RUSAGE_SELF), every thread included.
func CPUTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// RedisCPU returns the CPU time the Redis server has used so far (INFO cpu:
// used_cpu_user plus used_cpu_sys), or 0 if it cannot tell.
func RedisCPU(ctx context.Context, rdb redis.UniversalClient) time.Duration {
	info, err := rdb.Info(ctx, "cpu").Result()
	if err != nil {
		return 0
	}
	var total float64
	for line := range strings.SplitSeq(info, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok || (k != "used_cpu_user" && k != "used_cpu_sys") {
			continue
		}
		var f float64
		if _, err := fmt.Sscanf(v, "%g", &f); err == nil {
			total += f
		}
	}
	return time.Duration(total * float64(time.Second))
}

// Name returns prefix followed by 12 random hex digits: a schema, key
// prefix or channel of the run's own.
func Name(prefix string) string {
	b := make([]byte, 6)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// Percentile returns the q-quantile (0 ≤ q ≤ 1) of sorted, by the
// nearest-rank method, or 0 for an empty slice.
func Percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// Sorted returns a sorted copy of d.
func Sorted(d []time.Duration) []time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s
}

// Micros returns d in microseconds.
func Micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// WriteJSON writes v, indented, to path; an empty path writes nothing.
func WriteJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// DeleteKeys removes the Redis keys matching prefix*.
func DeleteKeys(ctx context.Context, rdb redis.UniversalClient, prefix string) error {
	iter := rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return err
	}
	for c := range slices.Chunk(keys, 500) {
		if err := rdb.Del(ctx, c...).Err(); err != nil {
			return err
		}
	}
	return nil
}

// SchedLatency is a snapshot of the runtime's histogram of the time
// goroutines spent runnable before they ran (/sched/latencies:seconds).
type SchedLatency struct{ h *metrics.Float64Histogram }

// ReadSchedLatency takes a snapshot of the scheduling latency histogram.
func ReadSchedLatency() SchedLatency {
	s := []metrics.Sample{{Name: "/sched/latencies:seconds"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return SchedLatency{}
	}
	return SchedLatency{s[0].Value.Float64Histogram()}
}

// Quantile returns the q-quantile of the scheduling latencies recorded
// between the snapshot from and s (the upper bound of its bucket), or 0.
func (s SchedLatency) Quantile(from SchedLatency, q float64) time.Duration {
	if s.h == nil || from.h == nil || len(s.h.Counts) != len(from.h.Counts) {
		return 0
	}
	var total uint64
	for i := range s.h.Counts {
		total += s.h.Counts[i] - from.h.Counts[i]
	}
	if total == 0 {
		return 0
	}
	want := uint64(q * float64(total))
	var seen uint64
	for i := range s.h.Counts {
		seen += s.h.Counts[i] - from.h.Counts[i]
		if seen > want {
			up := s.h.Buckets[i+1]
			if math.IsInf(up, 1) {
				up = s.h.Buckets[i]
			}
			return time.Duration(up * float64(time.Second))
		}
	}
	return 0
}
