package cache

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math"
	"math/bits"
	"math/rand/v2"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"
)

// Cache is a node-local cache of one namespace of a source of truth, kept
// consistent with it by a [Bus]. It is safe for concurrent use.
type Cache[K comparable, V any] struct {
	// provenUntil is read by every Get: the time (in now's base) until
	// which cached values may be served, from the bus's last proof plus
	// MaxStaleness. Otherwise it holds a value below any time:
	// math.MinInt64 once closed; revokedBase+n while the link is unproven,
	// before the first proof (n = 0) and after the n-th [Handler.LinkLost].
	// Each revocation stores a value never stored before, so that proven
	// can tell that one came between its load and its CompareAndSwap.
	provenUntil atomic.Int64
	// revocations counts the LinkLost calls so far; see provenUntil.
	revocations atomic.Int64
	clock       Clock     // nil: the monotonic clock
	epoch       time.Time // origin of now's time base
	seed        maphash.Seed
	shards      []shard[K, V]

	cfg     *config[K, V]
	keys    KeyCodec[K]
	guard   *guard
	flights singleflight.Group
	sub     Subscription // nil without a Bus
	log     *slog.Logger
	stats   counters
	hits    *stripes

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error

	bstats broadcastCounters
}

// counters are the Stats not kept per shard.
type counters struct {
	bypassed, loads, loadErrors, coalesced, skipped atomic.Uint64
	sent, received, publishErrors, flushes          atomic.Uint64
}

// broadcastCounters are the Stats of value broadcast (see Options.Codec).
// They live at the end of Cache, so that the fields the hit path reads
// keep their places.
type broadcastCounters struct {
	valuesSent, valuesInstalled, valuesRejected, oversizeValues, codecErrors atomic.Uint64
}

// New returns a Cache of at most capacity entries of namespace, filled by
// load. namespace names the keys on the bus: every node caching the same
// data must use the same namespace, and different data different ones.
//
// New returns an error for which errors.Is(err, ErrInvalidOptions) is true
// when an argument is unusable, or the error of subscribing to opts.Bus.
func New[K comparable, V any](namespace string, capacity int, load LoaderFunc[K, V], opts *Options[K, V]) (*Cache[K, V], error) {
	cfg, err := newConfig(namespace, capacity, load, opts)
	if err != nil {
		return nil, err
	}
	keys := cfg.Keys
	if keys == nil {
		if keys, err = defaultCodec[K](); err != nil {
			return nil, err
		}
	}
	c := &Cache[K, V]{
		clock:  cfg.Clock,
		epoch:  epoch,
		seed:   maphash.MakeSeed(),
		shards: make([]shard[K, V], cfg.Shards),
		cfg:    cfg,
		keys:   keys,
		guard:  newGuard(min(max(capacity/4, 1024), 1<<16)),
		hits:   newStripes(),
		log:    cfg.Logger.With("namespace", namespace),
	}
	if c.clock != nil {
		c.epoch = c.clock.Now()
	}
	for i := range c.shards {
		// Spread capacity so that the shards' sizes sum to capacity, and
		// MaxWeight likewise.
		size := capacity / len(c.shards)
		if i < capacity%len(c.shards) {
			size++
		}
		n := uint64(len(c.shards))
		budget := cfg.MaxWeight / n
		if uint64(i) < cfg.MaxWeight%n {
			budget++
		}
		c.shards[i].init(size, budget)
	}
	c.provenUntil.Store(math.MaxInt64)
	if cfg.Bus != nil {
		// Race 12: serve nothing cached until the subscription is proven.
		c.provenUntil.Store(math.MinInt64 + 1)
		if c.sub, err = cfg.Bus.Subscribe(namespace, handler[K, V]{c}, cfg.MaxStaleness); err != nil {
			return nil, fmt.Errorf("cache: subscribe %q: %w", namespace, err)
		}
	}
	return c, nil
}

// now returns the current time in nanoseconds since c.epoch.
func (c *Cache[K, V]) now() int64 {
	if c.clock == nil {
		return monotonic()
	}
	return int64(c.clock.Now().Sub(c.epoch))
}

func (c *Cache[K, V]) hash(key K) uint64 { return maphash.Comparable(c.seed, key) }

func (c *Cache[K, V]) shard(h uint64) *shard[K, V] {
	// The high bits pick the shard; the guard uses the low bits.
	i, _ := bits.Mul64(h, uint64(len(c.shards)))
	return &c.shards[i]
}

// lookup returns the live entry of key, of hash h, counting a hit or a
// miss.
func (c *Cache[K, V]) lookup(key K, h uint64, now int64) (entry[V], bool) {
	e, ok, counted := c.shard(h).lookup(key, h, now)
	if ok && !counted {
		c.hits.add()
	}
	return e, ok
}

// revokedBase is provenUntil before the first proof, as New stores it: the
// first of the values that mean "unproven" (see Cache.provenUntil), far
// below any time and above math.MinInt64, which means closed.
const revokedBase = math.MinInt64 + 1

// proven reports whether cached values may be served at now (G2). When the
// cached proof has run out, it asks the bus for a newer one and extends
// provenUntil.
//
// now must have been read before proven is called. The bus measures the
// proof's age, by its own clock, when it is asked, which is later: so
// now-age is no later than the proof, in this cache's time base, and
// provenUntil no later than the proof plus MaxStaleness, whatever the
// bus's clock reads (race 16). Reading the clock after asking would let
// the time between the two readings extend the proof.
func (c *Cache[K, V]) proven(now int64) bool {
	// provenUntil is read before the bus is asked, and extended only from
	// that very value. Were it extended from whatever it holds at the end,
	// this interleaving would undo a revocation:
	//
	//	proven: ProofAge() = a ....................... provenUntil = now-a+MaxStaleness
	//	bus:                    link fails; ProofAge() not ok; LinkLost: provenUntil = revoked
	//
	// and the cache would serve until the old proof ran out on a proof
	// the bus has withdrawn. Every revocation stores a new value, so the
	// CompareAndSwap below fails after one, however many came between.
	pu := c.provenUntil.Load()
	if now < pu {
		return true
	}
	if c.sub == nil || pu == math.MinInt64 || c.closed.Load() {
		return false
	}
	age, ok := c.sub.ProofAge()
	if !ok || age >= c.cfg.MaxStaleness {
		return false
	}
	until := addSat(now, int64(c.cfg.MaxStaleness-max(age, 0)))
	if c.provenUntil.CompareAndSwap(pu, until) {
		return !c.closed.Load()
	}
	// Another call changed provenUntil first: a proven that read the bus no
	// earlier than this one, a revocation or Close. Go by what it holds now.
	return now < c.provenUntil.Load() && !c.closed.Load()
}

// addSat returns t+d, or math.MaxInt64 if that overflows; d is positive.
func addSat(t, d int64) int64 {
	if t > math.MaxInt64-d {
		return math.MaxInt64
	}
	return t + d
}

// revoke ends the cached proof at once, so that the next Get asks the bus
// (see proven). Close's math.MinInt64 stays.
func (c *Cache[K, V]) revoke() {
	r := revokedBase + c.revocations.Add(1)
	for {
		old := c.provenUntil.Load()
		if old == math.MinInt64 || c.provenUntil.CompareAndSwap(old, r) {
			return
		}
	}
}

// Proven reports whether the Cache serves cached values now: it is open,
// and its bus link was proven within [Options.MaxStaleness] (always, without
// a Bus). While it is false, Get reads through to the loader. Health checks
// can report it.
func (c *Cache[K, V]) Proven() bool { return c.proven(c.now()) }

// Get returns the value of key.
//
// On a hit it returns the cached value, or ErrNotFound for a cached absence.
// On a miss it loads key through the loader, once however many callers miss
// it at the same time (G5), and caches the result unless an invalidation or
// flush overlapped the load (race 1). A Get that starts after an
// invalidation of key never shares a load that began before it (race 2).
//
// When the bus link has not been proven for [Options.MaxStaleness], Get
// does not serve cached values: it reads through to the loader and stores
// nothing (G2).
//
// ctx bounds how long this caller waits; it does not cancel the shared
// load, which runs until it finishes or [Options.LoadTimeout] passes. Get
// returns the loader's error, a [*PanicError] if the loader or another
// callback of the load ([Options.Version], [Options.Weigher], the
// [LoadTracer]) panicked, an error wrapping ErrGoexit if one called
// runtime.Goexit, ctx.Err(), ErrInvalidKey, or ErrClosed. A loaded value
// heavier than a shard's share of [Options.MaxWeight] is returned but not
// cached.
func (c *Cache[K, V]) Get(ctx context.Context, key K) (V, error) {
	now := c.now()
	if now < c.provenUntil.Load() {
		h := c.hash(key)
		if e, ok := c.lookup(key, h, now); ok {
			if e.missing() {
				var zero V
				return zero, ErrNotFound
			}
			return e.value, nil
		}
		return c.load(ctx, key, h, now, false)
	}
	return c.getUnproven(ctx, key, now)
}

// getUnproven is Get when the cached proof has run out: the bus may have a
// newer one, or the link is down.
func (c *Cache[K, V]) getUnproven(ctx context.Context, key K, now int64) (V, error) {
	if c.closed.Load() {
		var zero V
		return zero, ErrClosed
	}
	h := c.hash(key)
	if !c.proven(now) {
		c.stats.bypassed.Add(1)
		return c.load(ctx, key, h, now, true)
	}
	if e, ok := c.lookup(key, h, now); ok {
		if e.missing() {
			var zero V
			return zero, ErrNotFound
		}
		return e.value, nil
	}
	return c.load(ctx, key, h, now, false)
}

// flight is one caller's view of a shared load.
type flight struct {
	ch  <-chan singleflight.Result
	led *bool // set by the load function, which runs only for the leader
}

// wait returns the flight's result, or ctx.Err() if ctx ends first.
func (c *Cache[K, V]) wait(ctx context.Context, f flight, keys int) (any, error) {
	select {
	case r := <-f.ch:
		if !*f.led {
			c.stats.coalesced.Add(uint64(keys))
		}
		return r.Val, r.Err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Namespace returns the namespace the Cache was created with.
func (c *Cache[K, V]) Namespace() string { return c.cfg.namespace }

// EncodeKey returns the form of key carried on the bus, in outbox rows and
// in lock names: [Options.Keys]'s encoding. It returns ErrInvalidKey for a
// key whose encoding is empty or longer than [MaxKeyLen].
func (c *Cache[K, V]) EncodeKey(key K) (string, error) { return c.encode(key) }

// encode returns the bus form of key, or ErrInvalidKey.
func (c *Cache[K, V]) encode(key K) (string, error) {
	s := c.keys.Encode(key)
	if s == "" || len(s) > MaxKeyLen {
		return "", fmt.Errorf("%w: encoded length %d not in [1, %d]", ErrInvalidKey, len(s), MaxKeyLen)
	}
	return s, nil
}

// bucket is the time bucket of a bypass flight: a caller joins a bypass
// load only if it started in the same half of MaxStaleness, so a read
// through an unproven link never returns a value loaded much before it began.
func (c *Cache[K, V]) bucket(now int64, bypass bool) int64 {
	if !bypass {
		return 0
	}
	return now / max(int64(c.cfg.MaxStaleness/2), 1)
}

// startLoad joins or starts the load of key.
func (c *Cache[K, V]) startLoad(ctx context.Context, key K, h uint64, now int64, bypass bool) (flight, error) {
	skey, err := c.encode(key)
	if err != nil {
		return flight{}, err
	}
	// The token is taken before the load starts reading the source; see guard.
	tok := c.guard.token(h)
	kind := byte(flightLoad)
	if bypass {
		kind = flightBypass
		// The link is unproven: changes may have passed this node by, at
		// positions it was not told.
		tok.pos = PositionUnknown
	}
	led := new(bool)
	ch := c.flights.DoChan(flightKey(kind, tok, c.bucket(now, bypass), skey), func() (any, error) {
		*led = true
		return c.contain(func(at *string) (any, error) {
			return c.runLoad(ctx, key, skey, h, tok, !bypass, at)
		})
	})
	return flight{ch: ch, led: led}, nil
}

func (c *Cache[K, V]) load(ctx context.Context, key K, h uint64, now int64, bypass bool) (V, error) {
	var zero V
	f, err := c.startLoad(ctx, key, h, now, bypass)
	if err != nil {
		return zero, err
	}
	val, err := c.wait(ctx, f, 1)
	if err != nil {
		return zero, err
	}
	return c.loaded(val)
}

// runLoad is the body of a shared load of one key; it runs inside contain.
func (c *Cache[K, V]) runLoad(ctx context.Context, key K, skey string, h uint64, tok token, store bool, at *string) (any, error) {
	// The load belongs to every caller waiting for it, not to the one whose
	// ctx it inherits values from.
	if store {
		// A caller that missed just before another flight stored the key
		// starts a flight of its own; serve what that flight stored rather
		// than load again. A live entry is current: every invalidation
		// since it was stored would have dropped it.
		s := c.shard(h)
		s.mu.Lock()
		e, ok := s.peek(key, h, c.now())
		s.mu.Unlock()
		if ok {
			if e.missing() {
				return nil, ErrNotFound
			}
			return one[V]{e.value}, nil
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.LoadTimeout)
	defer cancel()
	ctx = withLoadPosition(ctx, c.guard, tok)
	ctx, err := c.traceStart(ctx, []string{skey}, !store, at)
	var v V
	var version int64
	var weight uint32
	if err == nil {
		c.stats.loads.Add(1)
		err = c.protect(at, "loader", func() (err error) {
			v, err = c.cfg.load(ctx, key)
			return err
		})
		// The version and weight are taken before the tracer ends the
		// load, so that the tracer sees a panic in Version or Weigher as
		// the load's error.
		if err == nil && store {
			version, err = c.version(v, at)
		}
		if err == nil && store {
			weight, err = c.weigh(key, v, at)
		}
		err = c.traceEnd(ctx, err, at)
	}
	switch {
	case err == nil:
		if store {
			e := entry[V]{value: v, version: version}
			e.setWeight(weight)
			c.fill(h, key, e, tok)
		}
		return one[V]{v}, nil
	case errors.Is(err, ErrNotFound):
		if store && !c.cfg.DisableNegative {
			c.fill(h, key, absence[V](0), tok)
		}
		return nil, err
	default:
		c.stats.loadErrors.Add(1)
		return nil, err
	}
}

// protect runs fn, which calls the user's callback named what, turning a
// panic into a *PanicError; see contain. While fn runs, *at is what.
func (c *Cache[K, V]) protect(at *string, what string, fn func() error) (err error) {
	*at = what
	defer func() {
		if r := recover(); r != nil {
			err = c.panicked(what, r)
			*at = ""
		}
	}()
	err = fn()
	*at = ""
	return err
}

// version returns the version of v, a loaded value.
func (c *Cache[K, V]) version(v V, at *string) (version int64, err error) {
	if c.cfg.Version == nil {
		return 0, nil
	}
	err = c.protect(at, "Options.Version", func() error {
		version = c.cfg.Version(v)
		return nil
	})
	return version, err
}

// weigh returns the weight of v, a loaded value of key, on the goroutine
// of the shared load.
func (c *Cache[K, V]) weigh(key K, v V, at *string) (weight uint32, err error) {
	if c.cfg.Weigher == nil {
		return 0, nil
	}
	err = c.protect(at, "Options.Weigher", func() error {
		weight = c.cfg.Weigher(key, v)
		return nil
	})
	return weight, err
}

// weighWrite sets the weight of e, the value a committed write gave key,
// on the caller's goroutine, before the shard is locked. The write has
// committed whatever the Weigher does: if it panics, or calls
// runtime.Goexit, weighWrite drops key on this node and publishes inv, as
// for any write this node cannot install, so that neither this node (G1)
// nor the others (G3) keep the value the write replaced. Then a panic is
// returned as a *PanicError (joined with the publish error, if any), and a
// Goexit goes on ending the goroutine.
func (c *Cache[K, V]) weighWrite(ctx context.Context, h uint64, key K, e *entry[V], inv []Invalidation) (err error) {
	if c.cfg.Weigher == nil {
		return nil
	}
	returned := false
	defer func() {
		if returned {
			return
		}
		// recover returns nil during a Goexit; a panic(nil) panics with
		// a *runtime.PanicNilError.
		p := recover()
		c.drop(h, key, e.version, inv[0].Position)
		perr := c.publish(ctx, inv)
		if p == nil {
			c.log.Error("cache: runtime.Goexit in Options.Weigher on a write; key dropped")
			return
		}
		c.log.Error("cache: Options.Weigher panicked on a write; key dropped", "panic", p)
		err = &PanicError{Func: "Options.Weigher", Value: p, Stack: debug.Stack()}
		if perr != nil {
			err = errors.Join(err, perr)
		}
	}()
	e.setWeight(c.cfg.Weigher(key, e.value))
	returned = true
	return nil
}

// lifetime returns the jittered lifetime of a new entry.
func (c *Cache[K, V]) lifetime(missing bool) int64 {
	ttl := int64(c.cfg.TTL)
	if missing {
		ttl = int64(c.cfg.NegativeTTL)
	}
	if j := int64(float64(ttl) * c.cfg.Jitter); j > 0 {
		ttl -= rand.Int64N(j + 1)
	}
	return ttl
}

// fill stores a loaded entry if the guard token is still current (race 1).
func (c *Cache[K, V]) fill(h uint64, key K, e entry[V], tok token) {
	now := c.now()
	if !c.proven(now) {
		c.stats.skipped.Add(1)
		return
	}
	s := c.shard(h)
	s.mu.Lock()
	if !c.guard.current(h, tok) {
		s.mu.Unlock()
		c.stats.skipped.Add(1)
		return
	}
	if old, ok := s.peek(key, h, now); ok && old.version > e.version {
		s.mu.Unlock() // race 7: never replace a newer version
		return
	}
	e.expires = now + c.lifetime(e.missing())
	s.add(key, h, e, now)
	s.mu.Unlock()
}

// install records a committed write of key on this node: the value (or,
// if e.missing(), the absence) at e.version (0: unknown). tok, if not nil,
// was taken before the write began.
//
// The write is installed only if this node can tell it is the newest it
// knows of; otherwise key is dropped, so that the next Get loads it. Either
// way every later Get on this node sees the write or a newer one (G1). What
// a late install must not do is resurrect a value that a newer write,
// already invalidated here, overwrote (race 13):
//
//	writer A: commit v5 ........................... install v5?
//	writer B:           commit v6; invalidation v6 arrives, key dropped
func (c *Cache[K, V]) install(h uint64, key K, e entry[V], tok *token, pos uint64) {
	now := c.now()
	s := c.shard(h)
	s.mu.Lock()
	defer s.mu.Unlock()
	// Nothing that changed key's slot happened since the write began: no
	// newer write can have been announced here.
	untouched := tok != nil && c.guard.current(h, *tok)
	high := c.guard.high(h)
	// Bumping under the shard lock is enough to stop loads that read the
	// row before this write: they check the guard under the same lock.
	c.guard.bump(h, e.version, pos)
	old, ok := s.peek(key, h, now)
	var install bool
	switch {
	case ok && old.version != 0 && e.version != 0 && old.version > e.version:
		return // race 7: the cached value is newer; keep it
	case untouched:
		install = true
	case e.version == 0:
		// Without a version and with a change since the write began,
		// there is no telling which is newer.
	case ok && old.version != 0:
		// A live entry with a version was stored after every
		// invalidation of key that reached this node (each drops it,
		// unless it names an older version), so it is the reference.
		install = true
	default:
		// No entry: only the slot's high mark is left. It is exact for
		// this key unless a flush, or a change without a version, blurred
		// it.
		install = !c.guard.everFlushed() && high <= e.version
	}
	if !install {
		s.remove(key, h)
		return
	}
	e.expires = now + c.lifetime(e.missing())
	s.add(key, h, e, now)
}

// drop removes key from this node unless it holds version or newer, and
// records the change's source position pos (0: unknown).
func (c *Cache[K, V]) drop(h uint64, key K, version int64, pos uint64) {
	c.guard.bump(h, version, pos)
	s := c.shard(h)
	s.mu.Lock()
	if n := s.index.Load().find(key, h); n != nil && !keeps(n.e.version, version) {
		s.drop(n)
	}
	s.mu.Unlock()
}

// flush drops every entry of this node.
func (c *Cache[K, V]) flush() {
	// Bump first so that loads in flight do not store; see guard.
	c.guard.flush()
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		s.reset(s.size)
		s.mu.Unlock()
	}
	c.stats.flushes.Add(1)
}

// publish sends invs to the other nodes.
func (c *Cache[K, V]) publish(ctx context.Context, invs []Invalidation) error {
	c.traceInvalidation(invs, false)
	if c.sub == nil {
		return nil
	}
	if err := c.sub.Publish(ctx, invs); err != nil {
		c.stats.publishErrors.Add(1)
		return fmt.Errorf("cache: publish to %q: %w", c.cfg.namespace, err)
	}
	c.stats.sent.Add(uint64(max(len(invs), 1)))
	for _, inv := range invs {
		if inv.Value != nil || inv.Deleted {
			c.bstats.valuesSent.Add(1)
		}
	}
	return nil
}

// Change is what a write reports about the key it wrote: the value it
// committed and its version, or its deletion.
type Change[V any] struct {
	// Value is the value as committed, typically from UPDATE ... RETURNING.
	// It is ignored for a deletion.
	Value V
	// Version is the key's version after the write, or 0 if unknown. It
	// must grow with every write of the key (see [Options.Version]); for a
	// deletion of a row whose versions start over when it is created again,
	// leave it 0.
	Version int64
	// Deleted reports that the write deleted the key.
	Deleted bool
	// Position is the source position at or after which the write is
	// visible (a WAL position after its commit, say), or 0 if unknown. It
	// travels with the invalidation, so that a load of the key that
	// follows, here or on another node, reads a source that has reached it
	// (see RequiredPosition).
	Position uint64
}

// Update runs write, which must commit a change of key to the source of
// truth and report it, and then makes every node see it. A deletion is a
// Change with Deleted set; an error from write always means the write
// failed, whatever the error wraps (ErrNotFound included: a write that
// looked up a missing row and gave up is a failed write, not a deletion).
//
// This node installs the result (a deletion as a cached absence, unless
// [Options.DisableNegative]) unless something that may be newer reached it
// while write ran (race 13); it drops key otherwise. Either way every later
// Get on this node sees the write or a newer one (G1). Then Update
// publishes an invalidation, so that other nodes drop older copies (G2).
// Unlike Set, Update is safe without versions: it knows when the write
// began. A value heavier than a shard's share of [Options.MaxWeight] is
// not installed: key is dropped.
//
// If write returns an error, Update drops key on this node (the write may
// have committed without saying so), publishes nothing and returns the
// error. If [Options.Weigher] panics on the written value, Update drops
// key, publishes, and returns a [*PanicError]. Otherwise it returns the
// publish error, if any; the local effect has happened regardless. ctx is
// passed to write and bounds the publication.
func (c *Cache[K, V]) Update(ctx context.Context, key K, write func(ctx context.Context) (Change[V], error)) error {
	if c.closed.Load() {
		return ErrClosed
	}
	skey, err := c.encode(key)
	if err != nil {
		return err
	}
	h := c.hash(key)
	tok := c.guard.token(h)
	ch, err := c.runWrite(ctx, h, key, write)
	if err != nil {
		c.drop(h, key, 0, 0)
		return err
	}
	inv := []Invalidation{{Key: skey, Version: ch.Version, Position: ch.Position}}
	switch {
	case !ch.Deleted:
		e := entry[V]{value: ch.Value, version: ch.Version}
		if err := c.weighWrite(ctx, h, key, &e, inv); err != nil {
			return err
		}
		c.install(h, key, e, &tok, ch.Position)
		c.attach(&inv[0], ch.Value, false)
	case c.cfg.DisableNegative:
		c.drop(h, key, ch.Version, ch.Position)
	default:
		c.install(h, key, absence[V](ch.Version), &tok, ch.Position)
		c.attach(&inv[0], ch.Value, true)
	}
	return c.publish(ctx, inv)
}

// runWrite runs the write function of Update. If it panics or ends the
// goroutine (runtime.Goexit), which it may do after it committed, key is
// dropped on this node, as after an error, before the panic goes on.
func (c *Cache[K, V]) runWrite(ctx context.Context, h uint64, key K, write func(ctx context.Context) (Change[V], error)) (Change[V], error) {
	returned := false
	defer func() {
		if !returned {
			c.drop(h, key, 0, 0)
		}
	}()
	ch, err := write(ctx)
	returned = true
	return ch, err
}

// Set records on every node that a write committed value as key's value at
// version. This node installs value if it can tell that value is the newest
// version of key it knows of, and drops key otherwise; either way every
// later Get on this node sees this write or a newer one (G1). A cached value
// of a higher version is kept (race 7). Then Set publishes an invalidation,
// so that other nodes drop older copies and load the new value on their
// next Get (G2).
//
// Set cannot know what happened while the write was in flight; it orders
// itself by versions alone. When an invalidation without a version, or a
// flush, has blurred that order, it drops key rather than guess, and with
// version 0 it always drops. [Cache.Update] knows when the write began and
// installs in those cases too. A value heavier than a shard's share of
// [Options.MaxWeight] is not installed either: key is dropped.
//
// Call Set only after the write has committed. ctx bounds the publication.
// Set returns the publish error, if any; the local effect has happened
// regardless. If [Options.Weigher] panics on value, Set drops key,
// publishes, and returns a [*PanicError]. It returns ErrInvalidKey or
// ErrClosed without doing anything.
func (c *Cache[K, V]) Set(ctx context.Context, key K, value V, version int64) error {
	return c.write(ctx, key, entry[V]{value: value, version: version})
}

// Delete records on every node that a write deleted key at version. It is
// Set for an absence: this node caches that key does not exist (unless
// negative caching is disabled, or it cannot tell the deletion is the newest
// write), and other nodes drop key.
func (c *Cache[K, V]) Delete(ctx context.Context, key K, version int64) error {
	if c.cfg.DisableNegative {
		return c.invalidate(ctx, []K{key}, version)
	}
	return c.write(ctx, key, absence[V](version))
}

func (c *Cache[K, V]) write(ctx context.Context, key K, e entry[V]) error {
	if c.closed.Load() {
		return ErrClosed
	}
	skey, err := c.encode(key)
	if err != nil {
		return err
	}
	h := c.hash(key)
	inv := []Invalidation{{Key: skey, Version: e.version}}
	if !e.missing() {
		if err := c.weighWrite(ctx, h, key, &e, inv); err != nil {
			return err
		}
	}
	c.install(h, key, e, nil, 0)
	c.attach(&inv[0], e.value, e.missing())
	return c.publish(ctx, inv)
}

// Invalidate drops keys on every node: here before it returns, so that the
// next Get on this node loads them (G1), and elsewhere through the bus. Call
// it after a write that changed keys in the source of truth.
//
// ctx bounds the publication. Invalidate returns the publish error, if any;
// the local drop has happened regardless. It returns ErrInvalidKey (for any
// key) or ErrClosed without doing anything.
func (c *Cache[K, V]) Invalidate(ctx context.Context, keys ...K) error {
	return c.invalidate(ctx, keys, 0)
}

func (c *Cache[K, V]) invalidate(ctx context.Context, keys []K, version int64) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if len(keys) == 0 {
		return nil
	}
	invs := make([]Invalidation, len(keys))
	for i, k := range keys {
		skey, err := c.encode(k)
		if err != nil {
			return err
		}
		invs[i] = Invalidation{Key: skey, Version: version}
	}
	for _, k := range keys {
		c.drop(c.hash(k), k, version, 0)
	}
	return c.publish(ctx, invs)
}

// InvalidateAll drops every entry of the namespace on every node: here
// before it returns, and elsewhere through the bus. ctx bounds the
// publication.
func (c *Cache[K, V]) InvalidateAll(ctx context.Context) error {
	if c.closed.Load() {
		return ErrClosed
	}
	c.flush()
	return c.publish(ctx, nil)
}

// Close unsubscribes from the bus and releases the entries. Every later call
// returns ErrClosed; loads in flight finish for their callers. Close returns
// the error of closing the subscription, and is safe to call more than once.
func (c *Cache[K, V]) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.provenUntil.Store(math.MinInt64)
		if c.sub != nil {
			c.closeErr = c.sub.Close()
		}
		c.guard.flush()
		for i := range c.shards {
			s := &c.shards[i]
			s.mu.Lock()
			s.reset(1) // let the entries go
			s.mu.Unlock()
		}
	})
	return c.closeErr
}

// handler receives the bus's deliveries for c. It is a separate type so
// that Cache's own method set stays the user's API.
type handler[K comparable, V any] struct{ c *Cache[K, V] }

func (h handler[K, V]) Invalidate(invs []Invalidation) {
	c := h.c
	// Race 14: whatever goes wrong while applying an invalidation ends in a
	// flush, never in a skipped key: a panic, and a KeyCodec that ends the
	// goroutine (runtime.Goexit, for which recover returns nil).
	applied := false
	defer func() {
		if applied {
			return
		}
		r := recover()
		c.log.Error("cache: applying an invalidation failed; flushing", "panic", r, "goexit", r == nil)
		c.flush()
	}()
	for _, inv := range invs {
		key, err := c.keys.Decode(inv.Key)
		if err != nil {
			c.log.Warn("cache: undecodable key in invalidation; flushing", "err", err)
			c.flush()
			applied = true
			return
		}
		if h := c.hash(key); c.carries(inv) {
			c.receive(h, key, inv)
		} else {
			c.drop(h, key, inv.Version, inv.Position)
		}
	}
	applied = true
	c.stats.received.Add(uint64(len(invs)))
	c.traceRemote(invs)
}

func (h handler[K, V]) Flush() {
	h.c.flush()
	h.c.traceRemote(nil)
}

// traceRemote traces invalidations applied from the bus. The tracer runs
// after they took effect; a panic in it is logged, not passed on to the
// bus, which would take it for a failure to apply them.
func (c *Cache[K, V]) traceRemote(invs []Invalidation) {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("cache: InvalidationTracer panicked", "panic", r)
		}
	}()
	c.traceInvalidation(invs, true)
}

// LinkLost revokes the cached proof: the next Get falls to getUnproven,
// whose proven asks the bus, which reports no proof until it has proven
// its link again. The entries stay; see [Handler.LinkLost].
func (h handler[K, V]) LinkLost() { h.c.revoke() }
