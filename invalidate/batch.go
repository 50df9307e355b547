package invalidate

import (
	"context"
	"sync"
	"time"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/piggyback"
)

// batcher gathers publications into batches, one per namespace, and hands
// them to send on its own goroutine, one round at a time: a round's
// messages are sent, in order, only after the previous round's were
// acknowledged, so each origin's sequence reaches Redis in order.
//
// This is group commit: a publication on an idle bus goes out at once, and
// the publications that arrive while a round is being sent go out together
// in the next one, so batches grow with the load and a publication waits
// at most for the round ahead of it. With a window, a round under a burst
// (the last round carried several Publish calls, or calls arrived while it
// was being sent) also waits until window after its oldest call, or until
// it holds maxKeys keys. Lingering pays only when publications keep
// arriving regardless of their predecessors' fate, and Go timers are coarse
// below a millisecond; hence no window by default.
type batcher struct {
	window  time.Duration
	maxKeys int
	send    func(ctx context.Context, batches []*nsBatch, riders []*piggyback.Rider) error
	wake    chan struct{} // capacity 1: a call arrived

	mu       sync.Mutex         // guards the fields below
	pending  []*nsBatch         // in order of first publication
	riders   []*piggyback.Rider // of the calls in pending, sent after them if the transport can
	byNS     map[string]*nsBatch
	nkeys    int       // keys in pending, a flush counting as one
	calls    int       // Publish calls waiting for round
	oldest   time.Time // arrival of the first call of round
	round    *round    // nil when nothing is pending
	sending  bool
	burst    bool
	lastSent time.Time // end of the last send
	closed   bool
}

// round is the fate of one batch of publications.
type round struct {
	done chan struct{} // closed once err is set
	err  error
}

// nsBatch is what a round carries for one namespace.
type nsBatch struct {
	namespace string
	flush     bool                 // the namespace is flushed: keys is empty
	keys      []cache.Invalidation // at most one entry per key
	index     map[string]int       // key → index in keys, once keys is long
}

func newBatcher(window time.Duration, maxKeys int, send func(context.Context, []*nsBatch, []*piggyback.Rider) error) *batcher {
	return &batcher{window: window, maxKeys: maxKeys, send: send, wake: make(chan struct{}, 1), byNS: make(map[string]*nsBatch)}
}

// publish adds keys (nil: a flush) of namespace to the next round and waits
// for it to be sent. If ctx ends first it returns ctx.Err(); the keys are
// sent with their round all the same. A Rider r (nil: none) goes with the
// round, after its messages, if the transport can send it so.
func (b *batcher) publish(ctx context.Context, namespace string, keys []cache.Invalidation, r *piggyback.Rider) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	nb := b.byNS[namespace]
	if nb == nil {
		nb = &nsBatch{namespace: namespace}
		b.byNS[namespace] = nb
		b.pending = append(b.pending, nb)
	}
	switch {
	case len(keys) == 0:
		// A flush covers every key of the namespace, those pending too.
		if !nb.flush {
			b.nkeys += 1 - len(nb.keys)
		}
		nb.flush, nb.keys, nb.index = true, nil, nil
	case !nb.flush:
		b.nkeys += nb.add(keys)
	}
	if r != nil {
		b.riders = append(b.riders, r)
	}
	if b.round == nil {
		b.round = &round{done: make(chan struct{})}
		b.oldest = time.Now()
	}
	rd := b.round
	b.calls++
	// While a round is being sent, run looks for the next one when the
	// send returns; only an idle (or lingering) batcher needs waking.
	wake := !b.sending
	if b.sending {
		b.burst = true
	}
	b.mu.Unlock()
	if wake {
		select {
		case b.wake <- struct{}{}:
		default:
		}
	}
	select {
	case <-rd.done:
		return rd.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// add merges keys into the batch and returns how many keys it added; see
// merge.
func (nb *nsBatch) add(keys []cache.Invalidation) int {
	const indexAt = 16 // below this, a linear scan is cheaper than a map
	added := 0
	for _, k := range keys {
		i := -1
		if nb.index != nil {
			if j, ok := nb.index[k.Key]; ok {
				i = j
			}
		} else {
			for j := range nb.keys {
				if nb.keys[j].Key == k.Key {
					i = j
					break
				}
			}
		}
		if i >= 0 {
			nb.keys[i] = merge(nb.keys[i], k)
			continue
		}
		nb.keys = append(nb.keys, k)
		added++
		if nb.index != nil {
			nb.index[k.Key] = len(nb.keys) - 1
		} else if len(nb.keys) >= indexAt {
			nb.index = make(map[string]int, 2*len(nb.keys))
			for j, k := range nb.keys {
				nb.index[k.Key] = j
			}
		}
	}
	return added
}

// merge returns the invalidation that stands for two of one key: the
// stronger, version 0 (drop whatever is cached) or else the higher
// version, with that version's value or tombstone (none with version 0,
// which no receiver can install), at the higher of their positions, so
// that a load that follows reads a source that has both.
func merge(old, k cache.Invalidation) cache.Invalidation {
	pos := max(old.Position, k.Position)
	switch {
	case old.Version == 0:
	case k.Version == 0 || k.Version > old.Version:
		old = k
	}
	if old.Version == 0 {
		old.Value, old.Deleted = nil, false
	}
	old.Position = pos
	return old
}

// run sends rounds until ctx ends, then fails what is pending with
// ErrClosed.
func (b *batcher) run(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		b.mu.Lock()
		if b.round == nil {
			b.mu.Unlock()
			select {
			case <-ctx.Done():
				b.close()
				return
			case <-b.wake:
				continue
			}
		}
		if b.burst && time.Since(b.lastSent) > b.window && !b.sending {
			b.burst = false // the burst is over: this call is alone
		}
		if b.window > 0 && b.burst && b.nkeys < b.maxKeys {
			if wait := b.window - time.Since(b.oldest); wait > 0 {
				b.mu.Unlock()
				timer.Reset(wait)
				select {
				case <-ctx.Done():
					b.close()
					return
				case <-timer.C:
				case <-b.wake: // maybe maxKeys are pending now
					timer.Stop()
				}
				continue
			}
		}
		batches, riders, r := b.pending, b.riders, b.round
		b.burst = b.calls > 1
		b.pending, b.riders, b.round, b.nkeys, b.calls = nil, nil, nil, 0, 0
		clear(b.byNS)
		b.sending = true
		b.mu.Unlock()

		err := b.send(ctx, batches, riders)

		b.mu.Lock()
		b.sending = false
		b.lastSent = time.Now()
		b.mu.Unlock()
		r.err = err
		close(r.done)
	}
}

// close fails the pending round and every later publish with ErrClosed.
func (b *batcher) close() {
	b.mu.Lock()
	b.closed = true
	r := b.round
	b.pending, b.riders, b.round = nil, nil, nil
	b.mu.Unlock()
	if r != nil {
		r.err = ErrClosed
		close(r.done)
	}
}
