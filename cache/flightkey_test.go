package cache

import (
	"context"
	"fmt"
	"maps"
	"testing"
	"testing/synctest"
)

// collidingKey is a key whose single-key flight key equals the batch flight
// key of []string{"abc"} when both carry the same kind byte, at guard epoch,
// generation and time bucket 0 (a new cache, read before its first proof):
// the batch key encodes the key "abc" as generation 0 (8 bytes), length 3
// (8 bytes, little-endian) and "abc", where the single-key key has the
// generation and then the key itself.
const collidingKey = "\x03\x00\x00\x00\x00\x00\x00\x00abc"

// TestGetAndGetManyDoNotShareLoads guards against flight keys shared by
// loads of different kinds. While the link is unproven, Get and a GetMany
// through LoadMany both used the kind byte 'b' for their bypass flights, so
// Get(collidingKey) and GetMany([]string{"abc"}) built the same flight key
// and the later one joined the earlier one's load: GetMany then panicked on
// the unchecked assertion val.(map[K]V) in loadBatch, or Get returned "" with
// a nil error, the zero value from v, _ := val.(V). Each kind now has its
// own prefix, and a result of the wrong type is an error.
//
// The proven cases (a load of one key, 'l', against a batch, 'm') did not
// collide before; they guard the same property for the other kinds.
func TestGetAndGetManyDoNotShareLoads(t *testing.T) {
	for _, proven := range []bool{false, true} {
		for _, getFirst := range []bool{true, false} {
			name := fmt.Sprintf("proven=%v/getFirst=%v", proven, getFirst)
			t.Run(name, func(t *testing.T) { testGetAndGetManyDoNotShare(t, proven, getFirst) })
		}
	}
}

func testGetAndGetManyDoNotShare(t *testing.T, proven, getFirst bool) {
	synctest.Test(t, func(t *testing.T) {
		bus := &fakeBus{} // never proves: every read bypasses the cache
		if proven {
			bus.prove(forever)
		}
		gate := make(chan struct{})
		c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) {
			<-gate
			return "one:" + k, nil
		}, &Options[string, string]{
			Bus:   bus,
			Clock: newFakeClock(), // time bucket 0
			LoadMany: func(ctx context.Context, keys []string) (map[string]string, error) {
				<-gate
				m := make(map[string]string)
				for _, k := range keys {
					m[k] = "many:" + k
				}
				return m, nil
			},
		})
		ctx := context.Background()
		type result struct {
			v   string
			m   map[string]string
			err error
		}
		get := make(chan result, 1)
		getMany := make(chan result, 1)
		startGet := func() {
			go func() {
				v, err := c.Get(ctx, collidingKey)
				get <- result{v: v, err: err}
			}()
		}
		startGetMany := func() {
			go func() {
				defer func() {
					if r := recover(); r != nil {
						t.Errorf("GetMany panicked: %v", r)
						getMany <- result{}
					}
				}()
				m, err := c.GetMany(ctx, []string{"abc"})
				getMany <- result{m: m, err: err}
			}()
		}
		if getFirst {
			startGet()
			synctest.Wait() // Get's load is running
			startGetMany()
		} else {
			startGetMany()
			synctest.Wait() // GetMany's load is running
			startGet()
		}
		synctest.Wait() // the second has started a load of its own, or joined the first's
		close(gate)

		if r := <-get; r.err != nil || r.v != "one:"+collidingKey {
			t.Errorf("Get(%q) = %q, %v; want %q, nil", collidingKey, r.v, r.err, "one:"+collidingKey)
		}
		want := map[string]string{"abc": "many:abc"}
		if r := <-getMany; r.err != nil || !maps.Equal(r.m, want) {
			t.Errorf("GetMany([abc]) = %v, %v; want %v, nil", r.m, r.err, want)
		}
	})
}

// TestFlightKeysAreUnambiguous builds the flight keys of every kind of load
// for inputs crafted to collide (keys that spell out another kind's header,
// batches that split the same bytes differently) and checks that only equal
// inputs give equal keys. A shared key would let a caller join a load of
// other keys, or of another kind, and receive its result.
func TestFlightKeysAreUnambiguous(t *testing.T) {
	skeys := []string{"abc", collidingKey, "a", "bc", "ab", "c", "\x00", "\x00\x00\x00\x00\x00\x00\x00\x00"}
	toks := []token{{epoch: 0, gen: 0}, {epoch: 0, gen: 3}, {epoch: 1, gen: 0}}
	buckets := []int64{0, 3}
	batches := [][]string{{"abc"}, {"a", "bc"}, {"ab", "c"}, {"abc", "a"}, {"a", "abc"}, {collidingKey}, {"\x00"}}
	seen := make(map[string]string)
	add := func(key, input string) {
		t.Helper()
		if prev, ok := seen[key]; ok && prev != input {
			t.Errorf("flight key %q built for both %s and %s", key, prev, input)
		}
		seen[key] = input
	}
	for _, kind := range []byte{flightLoad, flightBypass} {
		for _, tok := range toks {
			for _, b := range buckets {
				for _, k := range skeys {
					add(flightKey(kind, tok, b, k), fmt.Sprintf("one(%c, %v, %d, %q)", kind, tok, b, k))
				}
			}
		}
	}
	for _, kind := range []byte{flightBatch, flightBatchBypass} {
		for _, epoch := range []uint64{0, 1} {
			for _, b := range buckets {
				for _, batch := range batches {
					for _, gen := range []uint64{0, 3} {
						ts := make([]token, len(batch))
						for i := range ts {
							ts[i] = token{epoch: epoch, gen: gen}
						}
						add(batchFlightKey(kind, epoch, b, ts, batch), fmt.Sprintf("batch(%c, %d, %d, %q, gen %d)", kind, epoch, b, batch, gen))
					}
				}
			}
		}
	}
}

// TestSharedResultOfWrongTypeIsAnError: a caller that receives a shared
// result of another kind of load gets an error, never a zero value with a
// nil error nor a panic. (Flight keys of different kinds no longer collide,
// so the test plants the foreign flight under the key the caller will use.)
// Without the checked assertions, Get returned "" with a nil error and
// GetMany panicked in loadBatch.
func TestSharedResultOfWrongTypeIsAnError(t *testing.T) {
	for _, many := range []bool{false, true} {
		t.Run(fmt.Sprintf("GetMany=%v", many), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				opts := &Options[string, string]{Clock: newFakeClock()}
				if many {
					opts.LoadMany = func(ctx context.Context, keys []string) (map[string]string, error) {
						return map[string]string{"k": "v"}, nil
					}
				}
				c := newTestCache(t, 10, func(ctx context.Context, k string) (string, error) { return "v", nil }, opts)
				gate := make(chan struct{})
				var fk string
				var foreign any
				if many {
					fk = batchFlightKey(flightBatch, 0, 0, []token{c.guard.token(c.hash("k"))}, []string{"k"})
					foreign = one[string]{"v"}
				} else {
					fk = flightKey(flightLoad, c.guard.token(c.hash("k")), 0, "k")
					foreign = map[string]string{"k": "v"}
				}
				c.flights.DoChan(fk, func() (any, error) { <-gate; return foreign, nil })
				errs := make(chan error, 1)
				go func() {
					defer func() {
						if r := recover(); r != nil {
							t.Errorf("panicked: %v", r)
							errs <- nil
						}
					}()
					var err error
					if many {
						var m map[string]string
						m, err = c.GetMany(context.Background(), []string{"k"})
						if err == nil {
							t.Errorf("GetMany = %v, nil; want an error", m)
						}
					} else {
						var v string
						v, err = c.Get(context.Background(), "k")
						if err == nil {
							t.Errorf("Get = %q, nil; want an error", v)
						}
					}
					errs <- err
				}()
				synctest.Wait() // the caller has joined the planted flight
				close(gate)
				<-errs
			})
		})
	}
}

// TestNilInterfaceValues: with an interface type for V, a nil value is a
// value like any other, through Get and GetMany, with and without LoadMany;
// the check of a shared result's type must not mistake it for a mismatch.
func TestNilInterfaceValues(t *testing.T) {
	for _, loadMany := range []bool{false, true} {
		t.Run(fmt.Sprintf("LoadMany=%v", loadMany), func(t *testing.T) {
			opts := &Options[string, fmt.Stringer]{}
			if loadMany {
				opts.LoadMany = func(ctx context.Context, keys []string) (map[string]fmt.Stringer, error) {
					return map[string]fmt.Stringer{"m": nil}, nil
				}
			}
			c := newTestCache(t, 10, func(ctx context.Context, k string) (fmt.Stringer, error) { return nil, nil }, opts)
			ctx := context.Background()
			for range 2 { // a load, then a hit
				if v, err := c.Get(ctx, "k"); v != nil || err != nil {
					t.Errorf("Get(%q) = %v, %v; want nil, nil", "k", v, err)
				}
				m, err := c.GetMany(ctx, []string{"m"})
				if v, ok := m["m"]; err != nil || !ok || v != nil {
					t.Errorf("GetMany([m]) = %v, %v; want map[m:<nil>], nil", m, err)
				}
			}
		})
	}
}
