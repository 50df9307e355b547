package lockguard

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// notifier wakes the Guard's waiters when a lock they wait for is
// released. It holds one pub/sub subscription for the whole Guard, opened
// by the first Acquire that waits and kept until [Guard.Close], subscribed
// to the release channels of exactly the locks being waited for. (An
// earlier version opened it per waiting period, so that a Guard needed no
// Close; under contention that cost a new connection for most
// acquisitions, and a third of the throughput.)
//
// Notifications are hints. Every waiter still polls on its backoff, so a
// notification that is lost (not yet subscribed, a reconnect, a release
// that did not publish) costs it at most the wait until its next poll.
// Two cases are handled more eagerly: each confirmation of a
// subscription, including go-redis's resubscription after a reconnect,
// wakes the channel's waiters to poll once, since a release may have
// happened just before it; and a receive error wakes every waiter.
type notifier struct {
	client redis.UniversalClient
	log    *slog.Logger

	// sem serializes the subscription's lifecycle and its SUBSCRIBE and
	// UNSUBSCRIBE commands, which do I/O and so are kept off mu. It is a
	// channel so that a waiter whose ctx ends need not wait for it.
	sem chan struct{}
	// Guarded by sem:
	ps         *redis.PubSub
	subscribed map[string]bool // channels subscribed to
	stop       chan struct{}   // closed to stop receive
	done       chan struct{}   // closed when receive has returned
	closed     bool

	mu      sync.Mutex                            // protects waiters
	waiters map[string]map[chan struct{}]struct{} // channel → wake channels of its waiters
}

func newNotifier(client redis.UniversalClient, log *slog.Logger) *notifier {
	return &notifier{
		client:     client,
		log:        log,
		sem:        make(chan struct{}, 1),
		subscribed: make(map[string]bool),
		waiters:    make(map[string]map[chan struct{}]struct{}),
	}
}

// register adds a waiter on channel. The returned channel receives a value
// when the waiter should poll again; unregister must be called when the
// waiter stops waiting. register subscribes to channel if need be; if that
// fails (or ctx ends first, or the notifier is closed) the waiter just
// polls.
func (nt *notifier) register(ctx context.Context, channel string) (wake <-chan struct{}, unregister func()) {
	ch := make(chan struct{}, 1)
	nt.mu.Lock()
	set := nt.waiters[channel]
	if set == nil {
		set = make(map[chan struct{}]struct{})
		nt.waiters[channel] = set
	}
	set[ch] = struct{}{}
	nt.mu.Unlock()
	nt.reconcile(ctx, channel)
	return ch, func() {
		nt.mu.Lock()
		delete(set, ch)
		if len(set) == 0 {
			delete(nt.waiters, channel)
		}
		nt.mu.Unlock()
		// A waiter that gave up because its ctx ended still leaves the
		// subscription tidy; UNSUBSCRIBE only writes to a socket.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		nt.reconcile(ctx, channel)
	}
}

// reconcile makes the subscription match the waiters: subscribed to
// channel if and only if someone waits on it. It reads the wanted state
// after taking sem, so concurrent calls converge on the latest state
// whatever their order.
func (nt *notifier) reconcile(ctx context.Context, channel string) {
	select {
	case nt.sem <- struct{}{}:
	case <-ctx.Done():
		return
	}
	err := nt.reconcileLocked(ctx, channel)
	<-nt.sem
	if err != nil {
		// Logged after sem is released: the handler is user code.
		nt.log.Debug("lockguard: release notifications unavailable; polling", "channel", channel, "error", err)
	}
}

func (nt *notifier) reconcileLocked(ctx context.Context, channel string) error {
	if nt.closed {
		return nil
	}
	nt.mu.Lock()
	want := len(nt.waiters[channel]) > 0
	nt.mu.Unlock()
	switch {
	case want && !nt.subscribed[channel]:
		if nt.ps == nil {
			nt.ps = nt.client.Subscribe(context.WithoutCancel(ctx))
			nt.stop, nt.done = make(chan struct{}), make(chan struct{})
			go nt.receive(nt.ps, nt.stop, nt.done)
		}
		if err := nt.ps.Subscribe(ctx, channel); err != nil {
			return err
		}
		nt.subscribed[channel] = true
	case !want && nt.subscribed[channel]:
		delete(nt.subscribed, channel)
		return nt.ps.Unsubscribe(ctx, channel)
	}
	return nil
}

// close ends the subscription and waits for its goroutine to exit. Later
// waiters only poll.
func (nt *notifier) close() {
	nt.sem <- struct{}{}
	defer func() { <-nt.sem }()
	if nt.closed {
		return
	}
	nt.closed = true
	if nt.ps != nil {
		close(nt.stop)
		_ = nt.ps.Close() // makes receive's Receive return
		<-nt.done
		nt.ps = nil
	}
}

// receive reads the subscription until stop is closed.
func (nt *notifier) receive(ps *redis.PubSub, stop, done chan struct{}) {
	defer close(done)
	for {
		msg, err := ps.Receive(context.Background())
		select {
		case <-stop:
			return
		default:
		}
		if err != nil {
			// Messages may have been lost: everybody polls now. Then
			// pause, so that a Redis outage does not turn this loop
			// into a busy one; go-redis reconnects on the next Receive.
			nt.log.Debug("lockguard: release notifications interrupted", "error", err)
			nt.wake("", true)
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Message:
			nt.wake(m.Channel, false)
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				nt.wake(m.Channel, false)
			}
		}
	}
}

// wake signals the waiters of channel, or all waiters. It never blocks: a
// waiter with a signal pending gets no second one.
func (nt *notifier) wake(channel string, all bool) {
	nt.mu.Lock()
	defer nt.mu.Unlock()
	for c, set := range nt.waiters {
		if !all && c != channel {
			continue
		}
		for ch := range set {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}
}
