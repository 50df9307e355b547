package cache

import (
	"sync"
	"sync/atomic"
	"time"
)

// Clock tells a Cache the time. Tests inject one to drive TTLs and
// [Options.MaxStaleness] deterministically; the Time values it returns must
// be comparable with those of the Bus's [Subscription.LastProof].
type Clock interface {
	Now() time.Time
}

// tick is the resolution of the default clock.
const tick = time.Millisecond

// The default clock is coarse: one goroutine per process stores the
// monotonic time every tick, and the hit path reads it with one atomic load.
// Reading the monotonic clock itself costs about as much as the rest of a
// hit (measured: ~25 ns vs ~30 ns for a golang-lru Get on the CI machine).
// The goroutine runs only while at least one Cache without an
// [Options.Clock] is open.
//
// The coarse time lags real time by up to one tick plus the goroutine's
// scheduling delay. Expiry therefore happens at most that much late, and the
// staleness bound subtracts one tick so that only scheduling delay can
// stretch it (see provenUntil).
var coarse struct {
	now atomic.Int64 // nanoseconds since epoch

	mu   sync.Mutex // guards the fields below
	refs int
	stop chan struct{}
	done chan struct{}
}

// epoch is the origin of the default clock.
var epoch = time.Now()

func coarseNow() int64 { return coarse.now.Load() }

// acquireCoarse starts the clock goroutine if this is the first user.
func acquireCoarse() {
	coarse.mu.Lock()
	defer coarse.mu.Unlock()
	coarse.refs++
	if coarse.refs > 1 {
		return
	}
	coarse.now.Store(int64(time.Since(epoch)))
	stop, done := make(chan struct{}), make(chan struct{})
	coarse.stop, coarse.done = stop, done
	go func() {
		defer close(done)
		t := time.NewTicker(tick)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				coarse.now.Store(int64(time.Since(epoch)))
			}
		}
	}()
}

// releaseCoarse stops the clock goroutine when its last user is gone.
func releaseCoarse() {
	coarse.mu.Lock()
	defer coarse.mu.Unlock()
	coarse.refs--
	if coarse.refs > 0 {
		return
	}
	close(coarse.stop)
	<-coarse.done
}
