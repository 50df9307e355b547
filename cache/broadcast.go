package cache

import (
	"encoding/json"
	"fmt"
)

// Codec encodes values for value broadcast (see [Options.Codec]). Decode
// must accept what Encode of the same type produces on every node; it
// returns an error, never a half-filled value, for input it cannot read.
// Both may be called from several goroutines at once.
type Codec[V any] interface {
	Encode(V) ([]byte, error)
	Decode([]byte) (V, error)
}

// JSONCodec is a [Codec] that encodes values with encoding/json. Fields
// that encoding/json leaves out (unexported ones, those tagged "-") do not
// reach the other nodes: a value installed from the bus has them zero.
type JSONCodec[V any] struct{}

// Encode returns the JSON encoding of v.
func (JSONCodec[V]) Encode(v V) ([]byte, error) { return json.Marshal(v) }

// Decode parses the JSON encoding of a V.
func (JSONCodec[V]) Decode(b []byte) (V, error) {
	var v V
	if err := json.Unmarshal(b, &v); err != nil {
		var zero V
		return zero, err
	}
	return v, nil
}

// attach makes inv, the invalidation of a committed write of version
// inv.Version, a value broadcast of v (or, if deleted, a tombstone), when
// the Cache has a Codec and a Bus and the version is known: receivers
// cannot order a value without one. A value whose encoding fails or is
// larger than MaxBroadcastSize leaves inv a plain invalidation, counted.
func (c *Cache[K, V]) attach(inv *Invalidation, v V, deleted bool) {
	if c.cfg.Codec == nil || c.sub == nil || inv.Version == 0 {
		return
	}
	if deleted {
		inv.Deleted = true
		return
	}
	b, err := c.encodeValue(v)
	switch {
	case err != nil:
		c.bstats.codecErrors.Add(1)
		c.log.Warn("cache: Options.Codec cannot encode a written value; publishing a plain invalidation", "err", err)
	case len(b) > c.cfg.MaxBroadcastSize:
		c.bstats.oversizeValues.Add(1)
	default:
		if b == nil {
			b = []byte{} // nil would mean no value
		}
		inv.Value = b
	}
}

// encodeValue runs the Codec's Encode, turning a panic into an error: the
// write it reports has committed, and must be published all the same.
func (c *Cache[K, V]) encodeValue(v V) (b []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("cache: Options.Codec.Encode panicked: %v", r)
		}
	}()
	return c.cfg.Codec.Encode(v)
}

// decodeValue runs the Codec's Decode, turning a panic into an error.
func (c *Cache[K, V]) decodeValue(b []byte) (v V, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("cache: Options.Codec.Decode panicked: %v", r)
		}
	}()
	return c.cfg.Codec.Decode(b)
}

// carries reports whether inv is a value broadcast this Cache can use: it
// has a Codec, and inv a value or a tombstone at a known version.
func (c *Cache[K, V]) carries(inv Invalidation) bool {
	return c.cfg.Codec != nil && inv.Version != 0 && (inv.Value != nil || inv.Deleted)
}

// receive applies inv, a value broadcast of key (hashed to h) from another
// node. See installRemote for when the value is installed; otherwise key
// is dropped, as for a plain invalidation of inv.Version.
func (c *Cache[K, V]) receive(h uint64, key K, inv Invalidation) {
	var e entry[V]
	switch {
	case inv.Deleted && c.cfg.DisableNegative:
		c.drop(h, key, inv.Version, inv.Position)
		return
	case inv.Deleted:
		e = absence[V](inv.Version)
	default:
		v, err := c.decodeValue(inv.Value)
		if err != nil {
			c.bstats.codecErrors.Add(1)
			c.log.Debug("cache: Options.Codec cannot decode a broadcast value; dropping the key", "err", err)
			c.drop(h, key, inv.Version, inv.Position)
			return
		}
		e = entry[V]{value: v, version: inv.Version}
		if c.cfg.Weigher != nil {
			// A panic here ends in a flush (see handler.Invalidate).
			e.setWeight(c.cfg.Weigher(key, v))
		}
	}
	if c.installRemote(h, key, e, inv.Position) {
		c.bstats.valuesInstalled.Add(1)
	} else {
		c.bstats.valuesRejected.Add(1)
	}
}

// installRemote installs e, a value of key at e.version (not 0) that
// another node wrote, if this node can tell that it is the newest version
// of key it knows of; otherwise it drops key. It reports whether it
// installed e.
//
// The reference is a live entry of key with a known version no higher
// than e's. Such an entry was stored after every change of key announced
// here before it (a change announced while it was loaded would have made
// its load skip the store), and every change announced since named an
// older version, or it would have been dropped. So nothing newer than e
// has reached this node, and whatever is newer and still on its way will
// replace e when it arrives.
//
// Without such an entry there is no reference: the guard's high marks do
// not cover the changes made before this cache existed or while a gap
// flushed it, and a slow publisher's value can arrive after a newer write
// whose message went past this node in that time:
//
//	writer A: commit v6 ............................................ publish v6
//	writer B:          commit v7; publish v7 (before B's cache subscribed)
//	this node:                                    subscribes; ......... v6 arrives
//
// Installing v6 there would keep it until TTL. So key is dropped, and the
// next Get loads it: what a plain invalidation costs.
//
// The guard is bumped first either way, under the shard lock, so that a
// load of key in flight, which may have read the row this write replaced,
// does not store it (race 1):
//
//	load:  token=g0 ... reads v5 ................................. store v5?
//	bus:                value v6 arrives: gen=g1, key dropped
func (c *Cache[K, V]) installRemote(h uint64, key K, e entry[V], pos uint64) bool {
	now := c.now()
	s := c.shard(h)
	s.mu.Lock()
	defer s.mu.Unlock()
	c.guard.bump(h, e.version, pos)
	old, ok := s.peek(key, h, now)
	switch {
	case !ok || old.version == 0:
		s.remove(key, h) // no reference: a plain invalidation
		return false
	case old.version > e.version:
		return false // race 7: the cached value is newer; keep it
	}
	e.expires = now + c.lifetime(e.missing())
	s.add(key, h, e, now)
	return true
}
