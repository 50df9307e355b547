package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync/atomic"
	"time"

	"github.com/coherentcache/coherent/cache"
)

// AuditOptions configure an [Auditor]. A nil *AuditOptions, and every zero
// field, means the default; but one of Version and Equal must be set.
type AuditOptions[V any] struct {
	// Rate is the number of source reads per second the Auditor makes:
	// each tick reads one sampled entry, or re-checks one that differed.
	// It must be positive and at most 10,000. Default 10.
	Rate float64

	// Recheck is how long the Auditor waits before it reads the source
	// again for an entry that differed from it, to rule out a write in
	// flight: one that committed before the first read but whose
	// invalidation had not reached this node yet. It must exceed the
	// longest such legitimate window: the bus's delay, the cache's
	// MaxStaleness (while a link is down but not yet noticed), the relay's
	// delay for captured outside writes (RelayPoll, 1s, when it polls) and
	// for a writer that crashed before it published (Grace, 2s). Default:
	// the cache's MaxStaleness plus 3s.
	Recheck time.Duration

	// Version returns a value's version, the same function as the cache's
	// [cache.Options.Version]: a cached value and the source's differ when
	// their versions do. Default nil: Equal compares them.
	Version func(V) int64

	// Equal reports whether a cached value and the source's are the same,
	// for values without versions. It is used only when Version is nil.
	// Default nil.
	Equal func(cached, source V) bool

	// Timeout bounds one read of the source. Default 5s.
	Timeout time.Duration

	// Logger receives each inconsistency found, at level WARN, and source
	// errors, at level DEBUG. Default nil: discard.
	Logger *slog.Logger
}

// AuditStats is a snapshot of an Auditor's counters. Counters only grow.
type AuditStats struct {
	// Checked counts sampled entries compared with the source. An entry
	// waiting for its re-check is not checked again meanwhile.
	Checked uint64
	// Rechecks counts entries that differed from the source at first and
	// were read again after Recheck.
	Rechecks uint64
	// Resolved counts the Rechecks that found the difference gone: the
	// entry had been replaced or dropped, or the source agreed with it by
	// then (a write in flight at the first read).
	Resolved uint64
	// Inconsistencies counts entries still cached and still different from
	// the source after Recheck: stale values the cache would have served
	// until TTL. Each was invalidated, on every node.
	Inconsistencies uint64
	// SourceErrors counts failed reads of the source (not "not found").
	SourceErrors uint64
	// Skipped counts samples and rechecks dropped because the cache was
	// not serving from memory (its link unproven), or because too many
	// differences waited for their re-check (4,096).
	Skipped uint64
}

// Consistency returns the share of checked entries that were consistent
// with the source: 1 - Inconsistencies/Checked, and 1 before any check.
func (s AuditStats) Consistency() float64 {
	if s.Checked == 0 {
		return 1
	}
	return 1 - float64(min(s.Inconsistencies, s.Checked))/float64(s.Checked)
}

// Nines returns the consistency as a number of nines, -log10(1 -
// Consistency()): 2 for 99 %, 3 for 99.9 %. With no inconsistency found it
// is what the checks can show, log10(Checked) (as if the next check were
// to find one), so it grows with the evidence rather than being infinite;
// 0 before any check. In short: log10(Checked / max(Inconsistencies, 1)).
func (s AuditStats) Nines() float64 {
	if s.Checked == 0 {
		return 0
	}
	return math.Log10(float64(s.Checked) / float64(max(min(s.Inconsistencies, s.Checked), 1)))
}

// Auditor measures how consistent a cache is with its source of truth, and
// heals what it finds. It samples cached entries at a fixed rate
// ([cache.Cache.Sample], which disturbs neither the LRU order nor the hit
// path), reads each one's key from the source, and when the two differ
// reads the source again after [AuditOptions.Recheck]: an entry that is
// still the same cached entry ([cache.Cache.Holds]) and still differs
// then is an inconsistency. A cached absence of a row the source has
// counts, and so does a cached row the source has deleted. Each is
// counted, logged with its key, versions and age, and invalidated with
// [cache.Cache.Invalidate], which drops it here and on every other node.
//
// An Auditor belongs to one cache on one node; any node may run one, and
// none needs to. It is safe for concurrent use.
type Auditor[K comparable, V any] struct {
	cache  *cache.Cache[K, V]
	source cache.LoaderFunc[K, V]
	opts   AuditOptions[V]
	log    *slog.Logger
	checked, rechecks, resolved, inconsistencies,
	sourceErrors, skipped atomic.Uint64
}

// maxPending bounds the entries waiting for their re-check; past it new
// differences are skipped (and counted) until the queue drains.
const maxPending = 4096

// NewAuditor returns an Auditor of c that reads the source with source.
//
// source must read the primary and must not go through c: pass a loader
// such as [Loader] over the primary's pool, not c's own loader if that
// reads a replica (a lagging replica would pass for an inconsistent
// cache, or hide one), and never a function that calls c.Get. Its reads
// neither fill nor touch the cache. It must return an error for which
// errors.Is(err, cache.ErrNotFound) is true for a missing key, as [Loader]
// does.
//
// NewAuditor returns an error for which errors.Is(err, ErrInvalidOptions)
// is true when c or source is nil, when neither Version nor Equal is set,
// or when a field is out of range.
func NewAuditor[K comparable, V any](c *cache.Cache[K, V], source cache.LoaderFunc[K, V], opts *AuditOptions[V]) (*Auditor[K, V], error) {
	var o AuditOptions[V]
	if opts != nil {
		o = *opts
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: audit: "+format, append([]any{ErrInvalidOptions}, args...)...)
	}
	switch {
	case c == nil:
		return nil, bad("the cache is nil")
	case source == nil:
		return nil, bad("the source loader is nil")
	case o.Version == nil && o.Equal == nil:
		return nil, bad("AuditOptions needs Version or Equal to compare values")
	case o.Rate < 0 || math.IsNaN(o.Rate) || o.Rate > 10_000:
		return nil, bad("Rate must be in [0, 10000] (0: the default), got %v", o.Rate)
	case o.Recheck < 0:
		return nil, bad("Recheck must not be negative, got %v", o.Recheck)
	case o.Timeout < 0:
		return nil, bad("Timeout must not be negative, got %v", o.Timeout)
	}
	if o.Rate == 0 {
		o.Rate = 10
	}
	if o.Recheck == 0 {
		o.Recheck = c.MaxStaleness() + 3*time.Second
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Second
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Auditor[K, V]{cache: c, source: source, opts: o, log: log.With("namespace", c.Namespace())}, nil
}

// Stats returns a snapshot of the counters. It is safe to call at any time.
func (a *Auditor[K, V]) Stats() AuditStats {
	return AuditStats{
		Checked:         a.checked.Load(),
		Rechecks:        a.rechecks.Load(),
		Resolved:        a.resolved.Load(),
		Inconsistencies: a.inconsistencies.Load(),
		SourceErrors:    a.sourceErrors.Load(),
		Skipped:         a.skipped.Load(),
	}
}

// suspect is a sampled entry that differed from the source, waiting for
// its re-check.
type suspect[K comparable, V any] struct {
	s   cache.Sample[K, V]
	due time.Time
}

// Run audits until ctx ends, and then returns ctx.Err(). Every 1/Rate
// seconds it makes one read of the source: the re-check of the oldest
// suspect entry once it is due, else the check of a newly sampled entry.
// So the source sees at most Rate reads per second, one at a time, from
// each running Run. Nothing is read while the cache does not serve from
// memory ([cache.Cache.Proven] is false): its entries are not what readers
// get then. ctx bounds the reads of the source, each also bounded by
// [AuditOptions.Timeout], and the invalidations' publication.
func (a *Auditor[K, V]) Run(ctx context.Context) error {
	tick := time.NewTicker(time.Duration(float64(time.Second) / a.opts.Rate))
	defer tick.Stop()
	var pending []suspect[K, V] // in order of due, as Recheck is fixed
	// queued counts the pending suspects of each key. A key is not
	// checked again while it waits for its re-check: an entry is counted
	// once, however often it comes up, so that Inconsistencies and
	// Checked count the same thing.
	queued := make(map[K]int)
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case now := <-tick.C:
			if len(pending) > 0 && !now.Before(pending[0].due) {
				p := pending[0]
				pending[0] = suspect[K, V]{}
				pending = pending[1:]
				if queued[p.s.Key]--; queued[p.s.Key] == 0 {
					delete(queued, p.s.Key)
				}
				a.recheck(ctx, p.s, now.Sub(p.due)+a.opts.Recheck)
				continue
			}
			if s, ok := a.check(ctx, queued); ok {
				if len(pending) >= maxPending {
					a.skipped.Add(1)
					continue
				}
				pending = append(pending, suspect[K, V]{s: s, due: time.Now().Add(a.opts.Recheck)})
				queued[s.Key]++
			}
		}
	}
}

// check samples one entry, of a key not in queued, and compares it with
// the source. It reports the entry if the two differ.
func (a *Auditor[K, V]) check(ctx context.Context, queued map[K]int) (cache.Sample[K, V], bool) {
	var s cache.Sample[K, V]
	var found bool
	a.cache.Sample(4, func(x cache.Sample[K, V]) {
		if !found && queued[x.Key] == 0 {
			s, found = x, true
		}
	})
	if !found {
		return s, false
	}
	if !a.cache.Proven() {
		a.skipped.Add(1)
		return s, false
	}
	// The entry was sampled before the source is read: a write that
	// commits in between makes the source newer, which the re-check sorts
	// out; the source can never look older than an entry sampled first.
	v, ok, err := a.read(ctx, s.Key)
	if err != nil {
		return s, false
	}
	a.checked.Add(1)
	return s, a.differs(s, v, ok)
}

// recheck reads the source again for s, which differed from it when it
// was sampled, since ago, and invalidates s if it is still cached and
// still differs.
func (a *Auditor[K, V]) recheck(ctx context.Context, s cache.Sample[K, V], since time.Duration) {
	if !a.cache.Proven() {
		a.skipped.Add(1)
		return
	}
	a.rechecks.Add(1)
	if !a.cache.Holds(s) {
		a.resolved.Add(1) // replaced or dropped since: nothing is served from it
		return
	}
	v, ok, err := a.read(ctx, s.Key)
	if err != nil {
		return
	}
	// Holds again, after the read: were the entry replaced during it, by a
	// load that saw the source's row, the read's result would condemn an
	// entry no reader gets any more.
	if !a.differs(s, v, ok) || !a.cache.Holds(s) {
		a.resolved.Add(1)
		return
	}
	a.inconsistencies.Add(1)
	skey, _ := a.cache.EncodeKey(s.Key)
	var sourceVersion int64
	if ok && a.opts.Version != nil {
		sourceVersion = a.opts.Version(v)
	}
	err = a.cache.Invalidate(ctx, s.Key)
	a.log.Warn("store: audit: a cached entry differs from the source beyond the staleness bound; invalidated",
		"key", skey, "cached_version", a.cachedVersion(s), "cached_found", s.Found,
		"source_version", sourceVersion, "source_found", ok,
		"age", s.Age+since, "invalidate_err", err)
}

// read reads key from the source: its value and true, or false if the
// source does not have it. Other errors, a panic of the source included,
// are counted.
func (a *Auditor[K, V]) read(ctx context.Context, key K) (V, bool, error) {
	rctx, cancel := context.WithTimeout(ctx, a.opts.Timeout)
	defer cancel()
	v, err := a.call(rctx, key)
	switch {
	case err == nil:
		return v, true, nil
	case errors.Is(err, cache.ErrNotFound):
		return v, false, nil
	default:
		if ctx.Err() == nil { // not Run's end
			a.sourceErrors.Add(1)
			a.log.Debug("store: audit: reading the source failed", "err", err)
		}
		return v, false, err
	}
}

// call calls the source, turning a panic into an error: a faulty loader
// costs an audit, not the process.
func (a *Auditor[K, V]) call(ctx context.Context, key K) (v V, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("store: audit: the source panicked: %v", r)
		}
	}()
	return a.source(ctx, key)
}

// cachedVersion is the version of s's value, by Version if set.
func (a *Auditor[K, V]) cachedVersion(s cache.Sample[K, V]) int64 {
	if s.Found && a.opts.Version != nil {
		return a.opts.Version(s.Value)
	}
	return s.Version
}

// differs reports whether s differs from the source's v (found: whether
// the source has the key).
func (a *Auditor[K, V]) differs(s cache.Sample[K, V], v V, found bool) bool {
	switch {
	case s.Found != found:
		return true
	case !found:
		return false
	case a.opts.Version != nil:
		return a.opts.Version(s.Value) != a.opts.Version(v)
	default:
		return !a.opts.Equal(s.Value, v)
	}
}
