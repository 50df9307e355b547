package cache

import (
	"context"
	"errors"
	"fmt"
)

// GetMany returns the values of keys that exist; keys that do not are
// absent from the map. It serves what it can from the cache and loads the
// rest: in one call of [Options.LoadMany] if set, otherwise through the
// loader, one concurrent load per key. Loads are shared with concurrent
// callers as in [Cache.Get]: per key through the loader, and per identical
// set of missing keys through LoadMany.
//
// ctx bounds how long this caller waits. If any load fails, GetMany returns
// a nil map and an error that wraps the first failure and names its key.
func (c *Cache[K, V]) GetMany(ctx context.Context, keys []K) (map[K]V, error) {
	if c.closed.Load() {
		return nil, ErrClosed
	}
	now := c.now()
	proven := c.proven(now)
	res := make(map[K]V, len(keys))
	var missing []K
	var seen map[K]struct{}
	for _, k := range keys {
		if proven {
			if e, ok := c.lookup(k, c.hash(k), now); ok {
				if !e.missing() {
					res[k] = e.value
				}
				continue
			}
		} else {
			c.stats.bypassed.Add(1)
		}
		if seen == nil {
			seen = make(map[K]struct{})
		}
		if _, dup := seen[k]; !dup {
			seen[k] = struct{}{}
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return res, nil
	}
	var err error
	if c.cfg.LoadMany != nil {
		err = c.loadBatch(ctx, missing, now, !proven, res)
	} else {
		err = c.loadEach(ctx, missing, now, !proven, res)
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}

// loadEach loads keys through the loader, concurrently, into res.
func (c *Cache[K, V]) loadEach(ctx context.Context, keys []K, now int64, bypass bool, res map[K]V) error {
	flights := make([]flight, len(keys))
	for i, k := range keys {
		f, err := c.startLoad(ctx, k, c.hash(k), now, bypass)
		if err != nil {
			return err
		}
		flights[i] = f
	}
	for i, k := range keys {
		val, err := c.wait(ctx, flights[i], 1)
		var v V
		if err == nil {
			v, err = c.loaded(val)
		}
		switch {
		case err == nil:
			res[k] = v
		case errors.Is(err, ErrNotFound):
		case errors.Is(err, ctx.Err()):
			return err
		default:
			return fmt.Errorf("cache: load %q: %w", c.keys.Encode(k), err)
		}
	}
	return nil
}

// loadBatch loads keys through Options.LoadMany into res.
func (c *Cache[K, V]) loadBatch(ctx context.Context, keys []K, now int64, bypass bool, res map[K]V) error {
	hashes := make([]uint64, len(keys))
	toks := make([]token, len(keys))
	skeys := make([]string, len(keys))
	kind := byte(flightBatch)
	if bypass {
		kind = flightBatchBypass
	}
	epoch := c.guard.epoch.Load()
	for i, k := range keys {
		skey, err := c.encode(k)
		if err != nil {
			return err
		}
		skeys[i] = skey
		hashes[i] = c.hash(k)
		toks[i] = c.guard.token(hashes[i])
	}
	fk := batchFlightKey(kind, epoch, c.bucket(now, bypass), toks, skeys)
	led := new(bool)
	ch := c.flights.DoChan(fk, func() (any, error) {
		*led = true
		return c.contain(func(at *string) (any, error) {
			return c.runBatch(ctx, keys, skeys, hashes, toks, !bypass, at)
		})
	})
	val, err := c.wait(ctx, flight{ch: ch, led: led}, len(keys))
	if err != nil {
		if errors.Is(err, ctx.Err()) {
			return err
		}
		return fmt.Errorf("cache: load %d keys: %w", len(keys), err)
	}
	found, ok := val.(map[K]V)
	if !ok {
		// A flight key shared by loads of different kinds; see flightKey.
		return fmt.Errorf("cache: internal error: a load of %d keys returned %T, not %T", len(keys), val, found)
	}
	for k, v := range found {
		res[k] = v
	}
	return nil
}

// batchToken returns the token whose position a LoadMany of keys whose
// tokens are toks must reach: the highest, and the smallest flush count
// (a report then vouches for the oldest). Without store, the link is
// unproven: PositionUnknown.
func batchToken(toks []token, store bool) token {
	var t token
	for i, tok := range toks {
		if i == 0 || tok.unknown < t.unknown {
			t.unknown = tok.unknown
		}
		t.pos = max(t.pos, tok.pos)
	}
	if !store {
		t.pos = PositionUnknown
	}
	return t
}

// runBatch is the body of a shared LoadMany; it runs inside contain. It
// returns the found values of keys only, whatever else LoadMany returned.
func (c *Cache[K, V]) runBatch(ctx context.Context, keys []K, skeys []string, hashes []uint64, toks []token, store bool, at *string) (any, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.LoadTimeout)
	ctx = withLoadPosition(ctx, c.guard, batchToken(toks, store))
	defer cancel()
	ctx, err := c.traceStart(ctx, skeys, !store, at)
	var found map[K]V
	var versions []int64
	var weights []uint32
	if err == nil {
		c.stats.loads.Add(1)
		var got map[K]V
		err = c.protect(at, "LoadMany", func() (err error) {
			got, err = c.cfg.LoadMany(ctx, keys)
			return err
		})
		if err == nil {
			found = make(map[K]V, len(got))
			if store && c.cfg.Version != nil {
				versions = make([]int64, len(keys))
			}
			if store && c.cfg.Weigher != nil {
				weights = make([]uint32, len(keys))
			}
		}
		// Every version and weight is taken before anything is stored, so
		// that a Version or Weigher that panics for one key leaves the
		// whole batch unstored.
		for i := 0; err == nil && i < len(keys); i++ {
			v, ok := got[keys[i]]
			if !ok {
				continue
			}
			found[keys[i]] = v
			if versions != nil {
				versions[i], err = c.version(v, at)
			}
			if err == nil && weights != nil {
				weights[i], err = c.weigh(keys[i], v, at)
			}
		}
		err = c.traceEnd(ctx, err, at)
	}
	if err != nil {
		c.stats.loadErrors.Add(1)
		return nil, err
	}
	for i, k := range keys {
		v, ok := found[k]
		switch {
		case !store:
		case ok:
			e := entry[V]{value: v}
			if versions != nil {
				e.version = versions[i]
			}
			if weights != nil {
				e.setWeight(weights[i])
			}
			c.fill(hashes[i], k, e, toks[i])
		case !c.cfg.DisableNegative:
			c.fill(hashes[i], k, absence[V](0), toks[i])
		}
	}
	return found, nil
}
