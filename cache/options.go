package cache

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"time"
)

// LoaderFunc loads the value of key from the source of truth. It returns an
// error for which errors.Is(err, ErrNotFound) is true when the key does not
// exist. ctx carries the values of the Get that started the load but not its
// cancellation; it is cancelled after [Options.LoadTimeout].
type LoaderFunc[K comparable, V any] func(ctx context.Context, key K) (V, error)

// Options configure a [Cache]. A nil *Options, and every zero field, means
// the default. New copies the Options; changing them afterwards has no
// effect.
type Options[K comparable, V any] struct {
	// Bus carries invalidations to and from the other nodes. Without a Bus
	// the Cache is node-local: it never bypasses itself and Invalidate,
	// Set and Delete only affect this node. Default nil.
	Bus Bus

	// MaxStaleness bounds how long the Cache serves cached values after its
	// last proof that the bus link is live and in order. Past it, Get reads
	// through to the loader until the link is proven again. It is set here
	// only: New passes it to the Bus when it subscribes, and the bus keeps
	// its proofs within it or New fails (see [Bus.Subscribe]). Default 1s.
	MaxStaleness time.Duration

	// TTL is the lifetime of an entry. It bounds memory and is a safety net;
	// consistency comes from invalidations, not from TTL. Default 10m.
	TTL time.Duration

	// NegativeTTL is the lifetime of the record that a key does not exist
	// (the loader returned ErrNotFound). Default 1m.
	NegativeTTL time.Duration

	// DisableNegative turns negative caching off: every Get of a missing key
	// calls the loader. Default false.
	DisableNegative bool

	// Jitter is the largest fraction of TTL (and NegativeTTL) removed at
	// random from each entry's lifetime, so that entries filled together do
	// not expire together. It must be in [0, 1). Default 0.1.
	Jitter float64

	// Shards is the number of independently locked LRU segments (hits
	// take no lock; fills, writes and invalidations lock one). Capacity,
	// and MaxWeight, are split among them. It must not exceed capacity,
	// nor MaxWeight if set, nor 65,536: each shard costs a few hundred
	// bytes however few entries it holds.
	// Default: 8 per GOMAXPROCS, rounded up to a power of two, but at most
	// one per 64 entries of capacity, and at most MaxWeight.
	Shards int

	// MaxWeight bounds the total weight of the entries, in the unit of
	// Weigher (bytes, usually), on top of the bound on their number that
	// capacity sets: a few large values can exhaust memory long before
	// capacity is reached. It is split among the shards like capacity,
	// and each shard evicts from the back of its LRU until its entries fit
	// its share. An entry heavier than its shard's share, about
	// MaxWeight/Shards, would evict every other entry of the shard and
	// still not fit: it is returned to its callers but not cached (see
	// [Stats].Oversized). The default number of shards grows with
	// GOMAXPROCS, so set Shards too when the largest values to be cached
	// are a sizeable fraction of MaxWeight. MaxWeight must not be below
	// Shards, and needs Weigher. Default 0: no weight bound.
	MaxWeight uint64

	// Weigher returns the weight of an entry, in the unit of MaxWeight:
	// typically the bytes its key and value hold beyond the cache's own
	// overhead per entry (about 200 bytes), which capacity bounds. A
	// weight beyond math.MaxUint32 should saturate rather than wrap, or a
	// huge value would pass for a light one. The Cache calls Weigher once
	// for every value it is about to store, loaded or written, before it
	// takes a lock; never for a cached absence, which holds no value and
	// weighs 0. In a load it runs on the goroutine of the shared load: a
	// panic fails the load with a [*PanicError] and stores nothing. In Set
	// and Update it runs on the caller's goroutine, after the write has
	// committed: a panic drops the key on this node and publishes the
	// invalidation as for any write, and then the call returns a
	// [*PanicError]. Weigher needs MaxWeight. Default nil: entries are
	// bounded by number only.
	Weigher func(key K, value V) uint32

	// Keys encodes keys for the bus. Default: the identity for string keys
	// and base-10 text for integer keys; other key types must set it.
	Keys KeyCodec[K]

	// LoadMany, if set, loads several keys at once for [Cache.GetMany].
	// Keys absent from the returned map do not exist. Default nil: GetMany
	// loads each missing key through the loader, concurrently.
	LoadMany func(ctx context.Context, keys []K) (map[K]V, error)

	// Version returns the version of a value, for values that carry one
	// (a row version, an update counter). With it, a load never replaces a
	// cached value of a higher version. Versions must grow with every write
	// of a key, deletions and re-creations included: where a re-created
	// row starts over at 1, report its deletion with version 0 (unknown),
	// or the deletion would outrank the new row. Version runs on the
	// goroutine of the shared load; if it panics, the load fails with a
	// [*PanicError] and stores nothing. Default nil: loaded values have
	// version 0.
	Version func(V) int64

	// Codec, if set, turns value broadcast on. A write through this Cache
	// ([Cache.Update], [Cache.Set], [Cache.Delete], and so package store's
	// Table.Update) at a known version then publishes the committed value,
	// encoded by Codec, with its version and source position (a deletion
	// as a tombstone), instead of only its key; and a value that reaches
	// this Cache from the bus is installed under the rules of a
	// write-through, instead of the key being dropped and loaded again by
	// the next Get. So a write of a key every node reads costs no load on
	// the other nodes.
	//
	// A received value is installed only if this node can tell it is the
	// newest version of its key it knows of: when it holds a live entry of
	// that key whose version is no higher. Otherwise the key is dropped,
	// as for a plain invalidation: a key this node does not hold is
	// loaded by its next Get, as without broadcast. Codec needs
	// [Options.Version], by which loaded values are ordered against
	// received ones.
	//
	// What goes out as a plain invalidation: a write of unknown version
	// (0); a value whose encoding fails (counted in [Stats].CodecErrors)
	// or is larger than MaxBroadcastSize ([Stats].OversizeValues); a
	// deletion with DisableNegative; [Cache.Invalidate]; and everything
	// the outbox relay publishes for a writer that crashed or could not
	// publish, and captured outside writes, which have no codec. A value
	// that a receiver's Codec cannot decode is a plain invalidation there
	// (counted in CodecErrors). Every node of a namespace must use
	// compatible Codecs; nodes without one treat values as plain
	// invalidations.
	//
	// A value broadcast is trusted like the value a loader returns: a
	// client that may PUBLISH on the bus's channels could make nodes serve
	// a value of its choosing. Confine the channels to the application's
	// Redis user (see the README's Trust section). Default nil: plain
	// invalidations only.
	Codec Codec[V]

	// MaxBroadcastSize is the largest encoded value, in bytes, that a
	// write broadcasts; a larger one goes out as a plain invalidation. It
	// must not exceed [MaxValueLen], and needs Codec. Default 8 KiB.
	MaxBroadcastSize int

	// LoadTimeout bounds one shared load. A load runs on behalf of every
	// caller waiting for it, so no caller's context cancels it. Default 10s.
	LoadTimeout time.Duration

	// Logger receives flushes, loader panics and bus errors. Default nil:
	// discard.
	Logger *slog.Logger

	// Tracer observes loads, and invalidations if it also implements
	// [InvalidationTracer]. A panic in TraceLoadStart or TraceLoadEnd
	// fails the load it traces with a [*PanicError]. Default nil.
	Tracer LoadTracer

	// Clock replaces the default clock, for tests. It drives TTLs and
	// MaxStaleness; the Bus keeps its own clock, if any, since it reports
	// the age of its proofs rather than their time. Default nil: the
	// monotonic clock.
	Clock Clock
}

// maxShards bounds Options.Shards: New allocates every shard up front.
const maxShards = 1 << 16

// config is the validated, defaulted form of the arguments of New.
type config[K comparable, V any] struct {
	Options[K, V]
	namespace string
	capacity  int
	load      LoaderFunc[K, V]
}

func newConfig[K comparable, V any](namespace string, capacity int, load LoaderFunc[K, V], opts *Options[K, V]) (*config[K, V], error) {
	c := &config[K, V]{namespace: namespace, capacity: capacity, load: load}
	if opts != nil {
		c.Options = *opts
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	c.setDefaults()
	return c, nil
}

func (c *config[K, V]) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidOptions}, args...)...)
	}
	switch {
	case c.namespace == "":
		return bad("namespace is empty")
	case len(c.namespace) > MaxKeyLen:
		return bad("namespace is longer than %d bytes", MaxKeyLen)
	case c.capacity <= 0:
		return bad("capacity must be positive, got %d", c.capacity)
	case c.load == nil:
		return bad("loader is nil")
	case c.MaxStaleness < 0:
		return bad("MaxStaleness must not be negative, got %v", c.MaxStaleness)
	case c.TTL < 0:
		return bad("TTL must not be negative, got %v", c.TTL)
	case c.NegativeTTL < 0:
		return bad("NegativeTTL must not be negative, got %v", c.NegativeTTL)
	case c.LoadTimeout < 0:
		return bad("LoadTimeout must not be negative, got %v", c.LoadTimeout)
	case !(c.Jitter >= 0 && c.Jitter < 1):
		return bad("Jitter must be in [0, 1), got %v", c.Jitter)
	case c.Shards < 0:
		return bad("Shards must not be negative, got %d", c.Shards)
	case c.Shards > c.capacity:
		return bad("Shards (%d) exceeds capacity (%d)", c.Shards, c.capacity)
	case c.Shards > maxShards:
		return bad("Shards (%d) exceeds %d", c.Shards, maxShards)
	case c.MaxWeight != 0 && c.Weigher == nil:
		return bad("MaxWeight is set without a Weigher")
	case c.MaxWeight == 0 && c.Weigher != nil:
		return bad("Weigher is set without a MaxWeight")
	case c.MaxBroadcastSize < 0:
		return bad("MaxBroadcastSize must not be negative, got %d", c.MaxBroadcastSize)
	case c.MaxBroadcastSize > MaxValueLen:
		return bad("MaxBroadcastSize (%d) exceeds MaxValueLen (%d)", c.MaxBroadcastSize, MaxValueLen)
	case c.MaxBroadcastSize != 0 && c.Codec == nil:
		return bad("MaxBroadcastSize is set without a Codec")
	case c.Codec != nil && c.Version == nil:
		return bad("Codec is set without Version")
	case c.MaxWeight != 0 && uint64(c.Shards) > c.MaxWeight:
		return bad("Shards (%d) exceeds MaxWeight (%d)", c.Shards, c.MaxWeight)
	}
	return nil
}

func (c *config[K, V]) setDefaults() {
	if c.MaxStaleness == 0 {
		c.MaxStaleness = time.Second
	}
	if c.TTL == 0 {
		c.TTL = 10 * time.Minute
	}
	if c.NegativeTTL == 0 {
		c.NegativeTTL = time.Minute
	}
	if c.Jitter == 0 {
		c.Jitter = 0.1
	}
	if c.MaxBroadcastSize == 0 {
		c.MaxBroadcastSize = 8 << 10
	}
	if c.LoadTimeout == 0 {
		c.LoadTimeout = 10 * time.Second
	}
	if c.Shards == 0 {
		n := 1
		for n < 8*runtime.GOMAXPROCS(0) {
			n <<= 1
		}
		c.Shards = max(1, min(n, c.capacity/64, maxShards))
		if c.MaxWeight != 0 {
			// Give every shard a share of at least 1.
			c.Shards = int(min(uint64(c.Shards), c.MaxWeight))
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}
