package hitpath

import (
	"context"
	"hash/maphash"
	"math/bits"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/maypok86/otter/v2"

	"github.com/coherentcache/coherent/cache"
)

// keys is the hot set every implementation holds: one pass over it is one
// block of the interleaved benchmarks.
const keys = 1024

func keySet() []string {
	ks := make([]string, keys)
	for i := range ks {
		ks[i] = "user:" + strconv.Itoa(i)
	}
	return ks
}

// impl is one implementation's hit: get returns the value of a key it holds.
type impl struct {
	name string
	get  func(k string) int
}

// names are the implementations, in the order of the first round.
var names = []string{"coherent", "golang-lru", "otter", "sharded-lru", "sharded-peek"}

// shardedLRU is a sharded LRU with nothing else: 16 independently locked
// simplelru segments picked by the high bits of a maphash, as cache.New
// builds its shards for this capacity on 2 cores, with no clock, expiry,
// counters or lock-free index. It is what the library's hit path was
// before hits stopped taking the shard lock.
type shardedLRU struct {
	seed   maphash.Seed
	shards []lruShard
}

type lruShard struct {
	mu  sync.Mutex
	lru *simplelru.LRU[string, int] // guarded by mu
	_   [112]byte                   // one shard per 128 bytes, as in package cache
}

func newShardedLRU(size, shards int) *shardedLRU {
	s := &shardedLRU{seed: maphash.MakeSeed(), shards: make([]lruShard, shards)}
	for i := range s.shards {
		s.shards[i].lru, _ = simplelru.NewLRU[string, int](size/shards, nil)
	}
	return s
}

func (s *shardedLRU) shard(k string) *lruShard {
	i, _ := bits.Mul64(maphash.String(s.seed, k), uint64(len(s.shards)))
	return &s.shards[i]
}

func (s *shardedLRU) add(k string, v int) {
	sh := s.shard(k)
	sh.mu.Lock()
	sh.lru.Add(k, v)
	sh.mu.Unlock()
}

// peek is get without moving the entry to the front: what a hit would cost
// if it wrote nothing (as under a CLOCK policy whose access bit is already
// set), an upper bound on what skipping the promotion can buy.
func (s *shardedLRU) peek(k string) (int, bool) {
	sh := s.shard(k)
	sh.mu.Lock()
	v, ok := sh.lru.Peek(k)
	sh.mu.Unlock()
	return v, ok
}

// holds reports whether every key of ks is in s, without moving any.
func (s *shardedLRU) holds(ks []string) bool {
	for _, k := range ks {
		if _, ok := s.peek(k); !ok {
			return false
		}
	}
	return true
}

func (s *shardedLRU) get(k string) (int, bool) {
	sh := s.shard(k)
	sh.mu.Lock()
	v, ok := sh.lru.Get(k)
	sh.mu.Unlock()
	return v, ok
}

// impls returns the implementations, each holding every key of ks in a
// capacity of capacity (at least len(ks)).
func impls(b *testing.B, ks []string, capacity int) []impl {
	b.Helper()
	c, err := cache.New("bench", capacity, func(_ context.Context, k string) (int, error) { return len(k), nil }, &cache.Options[string, int]{Shards: 16})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	raw, err := lru.New[string, int](capacity)
	if err != nil {
		b.Fatal(err)
	}
	ot, err := otter.New(&otter.Options[string, int]{MaximumSize: capacity})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for i, k := range ks {
		if _, err := c.Get(ctx, k); err != nil {
			b.Fatal(err)
		}
		raw.Add(k, i)
		ot.Set(k, i)
	}
	// Each segment holds capacity/16 keys: a seed that hashes more of ks
	// to one segment evicts some (rarely, at two-thirds full). Take
	// another seed then, so that every implementation holds every key.
	var sharded *shardedLRU
	for try := 0; ; try++ {
		sharded = newShardedLRU(capacity, 16)
		for i, k := range ks {
			sharded.add(k, i)
		}
		if sharded.holds(ks) || try == 100 {
			break
		}
	}
	// Every key must be a hit before anything is timed.
	for _, k := range ks {
		if _, ok := raw.Get(k); !ok {
			b.Fatalf("golang-lru: Get(%q) missed", k)
		}
		if _, ok := ot.GetIfPresent(k); !ok {
			b.Fatalf("otter: GetIfPresent(%q) missed", k)
		}
		if _, ok := sharded.get(k); !ok {
			b.Fatalf("sharded-lru: Get(%q) missed", k)
		}
	}
	before := c.Stats().Misses
	for _, k := range ks {
		c.Get(ctx, k)
	}
	if m := c.Stats().Misses; m != before {
		b.Fatalf("coherent: %d misses of held keys", m-before)
	}
	return []impl{
		{"coherent", func(k string) int {
			v, _ := c.Get(ctx, k)
			return v
		}},
		{"golang-lru", func(k string) int {
			v, _ := raw.Get(k)
			return v
		}},
		{"otter", func(k string) int {
			v, _ := ot.GetIfPresent(k)
			return v
		}},
		{"sharded-lru", func(k string) int {
			v, _ := sharded.get(k)
			return v
		}},
		{"sharded-peek", func(k string) int {
			v, _ := sharded.peek(k)
			return v
		}},
	}
}

var sink atomic.Int64

// fills are the two occupancies measured: the key set in four times its
// size (every shard a quarter full, so that no entry is far from the front
// of its shard's LRU), and in one and a half times its size (two-thirds
// full: keys do not hash evenly, and a shard must not overflow), where most
// entries sit beyond the front third and a hit may move its entry.
var fills = []struct {
	name     string
	capacity int
}{{"quarter", 4 * keys}, {"two-thirds", keys * 3 / 2}}

// accesses are the two orders in which the keys are read: cyclic, every
// key in turn (each hit is on the key read longest ago: an LRU's worst
// case), and Zipf(1.1), where a few keys take most reads (a hot set).
var accesses = []struct {
	name string
	seq  func() []int // indexes into the key set
}{
	{"cyclic", func() []int {
		seq := make([]int, keys)
		for i := range seq {
			seq[i] = i
		}
		return seq
	}},
	{"zipf", func() []int {
		z := rand.NewZipf(rand.New(rand.NewPCG(1, 2)), 1.1, 1, keys-1)
		seq := make([]int, 1<<16)
		for i := range seq {
			seq[i] = int(z.Uint64())
		}
		return seq
	}},
}

// BenchmarkHit is one goroutine's Get of a held key; compare the
// implementations with benchstat -col /impl.
func BenchmarkHit(b *testing.B) {
	eachCase(b, func(b *testing.B, get func(string) int, ks []string, seq []int) {
		s, i := 0, 0
		for b.Loop() {
			s += get(ks[seq[i%len(seq)]])
			i++
		}
		sink.Add(int64(s))
	})
}

// BenchmarkHitParallel is Get of held keys from GOMAXPROCS goroutines;
// ns/op is wall time per Get over all of them.
func BenchmarkHitParallel(b *testing.B) {
	eachCase(b, func(b *testing.B, get func(string) int, ks []string, seq []int) {
		var seed atomic.Int64
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			s, i := 0, int(seed.Add(7919))
			for pb.Next() {
				s += get(ks[seq[i%len(seq)]])
				i++
			}
			sink.Add(int64(s))
		})
	})
}

// eachCase runs loop as a sub-benchmark for every fill, access order and
// implementation: get is the implementation's Get, and loop reads the keys
// ks[seq[0]], ks[seq[1]], … cyclically.
func eachCase(b *testing.B, loop func(b *testing.B, get func(string) int, ks []string, seq []int)) {
	ks := keySet()
	for _, fill := range fills {
		for _, acc := range accesses {
			seq := acc.seq()
			for _, name := range names {
				b.Run("fill="+fill.name+"/access="+acc.name+"/impl="+name, func(b *testing.B) {
					get := pick(impls(b, ks, fill.capacity), name)
					b.ReportAllocs()
					loop(b, get, ks, seq)
				})
			}
		}
	}
}

func pick(is []impl, name string) func(string) int {
	for _, im := range is {
		if im.name == name {
			return im.get
		}
	}
	panic("no implementation " + name)
}

// BenchmarkHitVsRaw interleaves the implementations in one loop: each
// iteration runs one pass over the key set through each of them, in an
// order that rotates, timing each pass. It reports ns per Get of each and
// the library's ratio to the other two. ns/op is one pass of all three.
func BenchmarkHitVsRaw(b *testing.B) {
	ks := keySet()
	is := impls(b, ks, 4*keys)
	var spent [5]time.Duration
	b.ReportAllocs()
	s, round := 0, 0
	for b.Loop() {
		for j := range is {
			n := (round + j) % len(is)
			get := is[n].get
			t0 := time.Now()
			for _, k := range ks {
				s += get(k)
			}
			spent[n] += time.Since(t0)
		}
		round++
	}
	sink.Add(int64(s))
	reportVsRaw(b, is, spent[:], int64(round)*keys)
}

// BenchmarkHitVsRawParallel is BenchmarkHitVsRaw on GOMAXPROCS goroutines
// at once, each rotating through the implementations pass by pass. The ns
// per Get it reports is the time one goroutine spends per Get while the
// others run too, so the implementations see the same contention.
func BenchmarkHitVsRawParallel(b *testing.B) {
	ks := keySet()
	is := impls(b, ks, 4*keys)
	var mu sync.Mutex
	var spent [5]time.Duration
	var gets int64
	var seed atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var mine [5]time.Duration
		round := int(seed.Add(1))
		s, passes := 0, int64(0)
		off := round * 331
		for pb.Next() {
			for j := range is {
				n := (round + j) % len(is)
				get := is[n].get
				t0 := time.Now()
				for i := range keys {
					s += get(ks[(off+i)&(keys-1)])
				}
				mine[n] += time.Since(t0)
			}
			round++
			passes++
		}
		sink.Add(int64(s))
		mu.Lock()
		for n := range mine {
			spent[n] += mine[n]
		}
		gets += passes * keys
		mu.Unlock()
	})
	reportVsRaw(b, is, spent[:], gets)
}

// reportVsRaw reports each implementation's ns per Get, from the time
// spent in it over gets Gets, and the library's ratios to the others.
func reportVsRaw(b *testing.B, is []impl, spent []time.Duration, gets int64) {
	if gets == 0 {
		return
	}
	per := make(map[string]float64)
	for n, im := range is {
		per[im.name] = float64(spent[n].Nanoseconds()) / float64(gets)
		b.ReportMetric(per[im.name], im.name+"-ns/get")
	}
	b.ReportMetric(per["coherent"]/per["golang-lru"], "coherent/golang-lru")
	b.ReportMetric(per["coherent"]/per["otter"], "coherent/otter")
	b.ReportMetric(per["coherent"]/per["sharded-lru"], "coherent/sharded-lru")
}

var epoch = time.Now()

// BenchmarkClock is the read of the monotonic clock that the library's hit
// path makes on every lookup (cache/clock.go), next to an atomic load, the
// alternative it gave up.
func BenchmarkClock(b *testing.B) {
	b.Run("read=monotonic", func(b *testing.B) {
		b.ReportAllocs()
		var s int64
		for b.Loop() {
			s += int64(time.Since(epoch))
		}
		sink.Add(s)
	})
	b.Run("read=atomic", func(b *testing.B) {
		var now atomic.Int64
		now.Store(1)
		b.ReportAllocs()
		var s int64
		for b.Loop() {
			s += now.Load()
		}
		sink.Add(s)
	})
}
