// Package hitpath benchmarks the cache's hit path against raw
// hashicorp/golang-lru/v2 and maypok86/otter/v2, one goroutine and
// parallel, in the same run:
//
//	go test -run '^$' -bench . -count 6 ./bench/hitpath | tee hit.txt
//	benchstat -col /impl hit.txt
//
// sharded-lru is a sharded LRU and nothing else (16 locked simplelru
// segments: the library's hit path before hits stopped taking a lock), and
// sharded-peek the same without moving the entry to the front on a hit.
// BenchmarkHit and BenchmarkHitParallel run each at two occupancies: the
// keys in four times their number of entries, and in one and a half times.
//
// BenchmarkHitVsRaw and BenchmarkHitVsRawParallel interleave them in
// blocks of one pass over the key set inside one loop and report each one's
// ns per Get and the ratios, so that drift of a shared machine falls on all
// of them alike. BenchmarkClock is the monotonic clock read that the
// library's hit path pays for its staleness bound (cache/clock.go).
package hitpath
