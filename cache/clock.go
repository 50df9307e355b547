package cache

import "time"

// Clock tells a Cache the time. Tests inject one to drive TTLs and
// [Options.MaxStaleness] deterministically; the Time values it returns must
// be comparable with those of the Bus's [Subscription.LastProof].
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
// costs less (BENCHMARKS.md), but after a stall
// request goroutines can run before the ticker does and see the time from
// before the stall: they would serve entries whose proof expired during it.
// The integration test TestStalledReaderResumes caught exactly that.
func monotonic() int64 { return int64(time.Since(epoch)) }
