package cache

import "time"

// Clock tells a Cache the time. Tests inject one to drive TTLs and
// [Options.MaxStaleness] deterministically. It is the Cache's own: a Bus
// reports the age of its proofs ([Subscription.ProofAge]), measured by
// whatever clock the bus keeps, so the two need not be the same.
type Clock interface {
	Now() time.Time
}

// epoch is the origin of the default time base: the monotonic clock.
var epoch = time.Now()

// monotonic returns the monotonic time in nanoseconds since epoch.
//
// Every lookup reads it, because the staleness bound must hold for a Get
// that starts after the process was stalled (a VM freeze, CPU throttling,
// SIGSTOP). A clock cached by a ticking goroutine, read with an atomic load,
// costs less per hit (BENCHMARKS.md, BenchmarkClock), but after a stall
// request goroutines can run before the ticker does and see the time from
// before the stall: they would serve entries whose proof expired during it.
// The integration test TestStalledReaderResumes checks this.
func monotonic() int64 { return int64(time.Since(epoch)) }
