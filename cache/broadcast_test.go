package cache

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
)

// rowJSON is the JSON encoding of r, as JSONCodec[row] sends it.
func rowJSON(t testing.TB, r row) []byte {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// broadcastCache returns a cache over src with a JSON codec and versions,
// on a fake bus proven at every instant, and its handler.
func broadcastCache(t *testing.T, src *source, opts *Options[string, row]) (*Cache[string, row], *fakeBus, Handler) {
	t.Helper()
	bus := &fakeBus{proof: forever}
	o := Options[string, row]{Version: rowVersion, Codec: JSONCodec[row]{}}
	if opts != nil {
		o = *opts
	}
	o.Bus = bus
	if o.Version == nil {
		o.Version = rowVersion
	}
	c := newTestCache(t, 100, src.load, &o)
	return c, bus, bus.handler()
}

// failingCodec fails to encode values whose Value is "bad" and to decode
// anything that is not JSON.
type failingCodec struct{ JSONCodec[row] }

func (f failingCodec) Encode(r row) ([]byte, error) {
	switch r.Value {
	case "bad":
		return nil, errBoom
	case "panic":
		panic("encode")
	}
	return f.JSONCodec.Encode(r)
}

func TestBroadcastPublishes(t *testing.T) {
	ctx := context.Background()
	big := row{Value: strings.Repeat("x", 100), Version: 9}
	tests := []struct {
		name  string
		opts  Options[string, row]
		write func(c *Cache[string, row]) error
		want  Invalidation
		stats Stats // the broadcast counters only
	}{
		{"Update sends the value", Options[string, row]{Codec: JSONCodec[row]{}},
			func(c *Cache[string, row]) error {
				return c.Update(ctx, "k", func(context.Context) (Change[row], error) {
					return Change[row]{Value: row{"v3", 3}, Version: 3, Position: 70}, nil
				})
			}, Invalidation{Key: "k", Version: 3, Position: 70, Value: []byte(`{"Value":"v3","Version":3}`)}, Stats{ValuesSent: 1}},
		{"Update of a deletion sends a tombstone", Options[string, row]{Codec: JSONCodec[row]{}},
			func(c *Cache[string, row]) error {
				return c.Update(ctx, "k", func(context.Context) (Change[row], error) {
					return Change[row]{Deleted: true, Version: 4}, nil
				})
			}, Invalidation{Key: "k", Version: 4, Deleted: true}, Stats{ValuesSent: 1}},
		{"Set sends the value", Options[string, row]{Codec: JSONCodec[row]{}},
			func(c *Cache[string, row]) error { return c.Set(ctx, "k", row{"v5", 5}, 5) },
			Invalidation{Key: "k", Version: 5, Value: []byte(`{"Value":"v5","Version":5}`)}, Stats{ValuesSent: 1}},
		{"Delete sends a tombstone", Options[string, row]{Codec: JSONCodec[row]{}},
			func(c *Cache[string, row]) error { return c.Delete(ctx, "k", 6) },
			Invalidation{Key: "k", Version: 6, Deleted: true}, Stats{ValuesSent: 1}},
		{"Delete without negative caching is plain", Options[string, row]{Codec: JSONCodec[row]{}, DisableNegative: true},
			func(c *Cache[string, row]) error { return c.Delete(ctx, "k", 6) },
			Invalidation{Key: "k", Version: 6}, Stats{}},
		{"unknown version is plain", Options[string, row]{Codec: JSONCodec[row]{}},
			func(c *Cache[string, row]) error { return c.Set(ctx, "k", row{"v", 0}, 0) },
			Invalidation{Key: "k"}, Stats{}},
		{"no codec is plain", Options[string, row]{},
			func(c *Cache[string, row]) error { return c.Set(ctx, "k", row{"v7", 7}, 7) },
			Invalidation{Key: "k", Version: 7}, Stats{}},
		{"oversize value is plain", Options[string, row]{Codec: JSONCodec[row]{}, MaxBroadcastSize: 64},
			func(c *Cache[string, row]) error { return c.Set(ctx, "k", big, 9) },
			Invalidation{Key: "k", Version: 9}, Stats{OversizeValues: 1}},
		{"encode error is plain", Options[string, row]{Codec: failingCodec{}},
			func(c *Cache[string, row]) error { return c.Set(ctx, "k", row{"bad", 10}, 10) },
			Invalidation{Key: "k", Version: 10}, Stats{CodecErrors: 1}},
		{"encode panic is plain", Options[string, row]{Codec: failingCodec{}},
			func(c *Cache[string, row]) error { return c.Set(ctx, "k", row{"panic", 11}, 11) },
			Invalidation{Key: "k", Version: 11}, Stats{CodecErrors: 1}},
		{"Invalidate is plain", Options[string, row]{Codec: JSONCodec[row]{}},
			func(c *Cache[string, row]) error { return c.Invalidate(ctx, "k") },
			Invalidation{Key: "k"}, Stats{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, bus, _ := broadcastCache(t, newSource(), &tt.opts)
			if err := tt.write(c); err != nil {
				t.Fatalf("write: %v", err)
			}
			if len(bus.published) != 1 || len(bus.published[0]) != 1 {
				t.Fatalf("published %v; want one invalidation", bus.published)
			}
			got := bus.published[0][0]
			if got.Key != tt.want.Key || got.Version != tt.want.Version || got.Position != tt.want.Position ||
				got.Deleted != tt.want.Deleted || (got.Value == nil) != (tt.want.Value == nil) || string(got.Value) != string(tt.want.Value) {
				t.Errorf("published %+v (value %s); want %+v (value %s)", got, got.Value, tt.want, tt.want.Value)
			}
			st := c.Stats()
			if st.ValuesSent != tt.stats.ValuesSent || st.OversizeValues != tt.stats.OversizeValues || st.CodecErrors != tt.stats.CodecErrors {
				t.Errorf("Stats: ValuesSent %d, OversizeValues %d, CodecErrors %d; want %d, %d, %d",
					st.ValuesSent, st.OversizeValues, st.CodecErrors, tt.stats.ValuesSent, tt.stats.OversizeValues, tt.stats.CodecErrors)
			}
		})
	}
}

func TestBroadcastOptions(t *testing.T) {
	load := func(context.Context, string) (row, error) { return row{}, nil }
	for _, opts := range []*Options[string, row]{
		{MaxBroadcastSize: 100},
		{Codec: JSONCodec[row]{}},
		{Codec: JSONCodec[row]{}, MaxBroadcastSize: -1},
		{Codec: JSONCodec[row]{}, MaxBroadcastSize: MaxValueLen + 1},
	} {
		if _, err := New("ns", 10, load, opts); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("New(%+v) error = %v; want ErrInvalidOptions", opts, err)
		}
	}
}

// TestBroadcastRules drives the rules under which a received value is
// installed: only when this node can tell it is the newest it knows of.
// Each case fails without its rule in install.
func TestBroadcastRules(t *testing.T) {
	type step struct {
		op      string // "load", "value", "tomb", "inv" (plain, remote), "flush", "garbage" (undecodable value)
		version int64
	}
	tests := []struct {
		name      string
		steps     []step
		want      int64 // version Get returns afterwards; -1: not found
		loads     int64 // loads Get costs afterwards
		installed uint64
		rejected  uint64
	}{
		{"a newer value replaces the cached one", []step{{"load", 5}, {"value", 6}}, 6, 0, 1, 0},
		{"a value of the cached version replaces it", []step{{"load", 5}, {"value", 5}}, 5, 0, 1, 0},
		{"a value without a cached entry is dropped", []step{{"value", 6}}, 7, 1, 0, 1},
		{"values out of order: the newer stays (race 7)", []step{{"load", 5}, {"value", 7}, {"value", 6}}, 7, 0, 1, 1},
		{"a value after a newer plain invalidation is dropped", []step{{"load", 5}, {"inv", 7}, {"value", 6}}, 7, 1, 0, 1},
		{"a value after an unversioned invalidation is dropped", []step{{"load", 5}, {"inv", 0}, {"value", 6}}, 7, 1, 0, 1},
		{"a value after a flush is dropped", []step{{"load", 5}, {"flush", 0}, {"value", 6}}, 7, 1, 0, 1},
		{"after a flush, a loaded value is the reference again", []step{{"flush", 0}, {"load", 5}, {"value", 6}}, 6, 0, 1, 0},
		{"a tombstone caches the absence", []step{{"load", 5}, {"tomb", 6}}, -1, 0, 1, 0},
		{"a value replaces an older tombstone", []step{{"load", 5}, {"tomb", 6}, {"value", 7}}, 7, 0, 2, 0},
		{"an older value keeps a newer tombstone", []step{{"load", 5}, {"tomb", 7}, {"value", 6}}, -1, 0, 1, 1},
		{"an undecodable value drops the key", []step{{"load", 5}, {"garbage", 6}}, 7, 1, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := newSource()
			c, _, h := broadcastCache(t, src, nil)
			// The source ends at version 7 (or deleted), newer than any
			// step but a tombstone's or value's own.
			for _, s := range tt.steps {
				r := row{Value: "v" + strconv.FormatInt(s.version, 10), Version: s.version}
				switch s.op {
				case "load":
					src.rows["k"] = r
					mustGet(t, c, "k")
				case "value":
					h.Invalidate([]Invalidation{{Key: "k", Version: s.version, Value: rowJSON(t, r)}})
				case "garbage":
					h.Invalidate([]Invalidation{{Key: "k", Version: s.version, Value: []byte("{not json")}})
				case "tomb":
					h.Invalidate([]Invalidation{{Key: "k", Version: s.version, Deleted: true}})
				case "inv":
					h.Invalidate([]Invalidation{{Key: "k", Version: s.version}})
				case "flush":
					h.Flush()
				}
			}
			if tt.want >= 0 {
				src.rows["k"] = row{Value: "v7", Version: 7}
			} else {
				src.remove("k")
			}
			before := src.loads.Load()
			r, err := c.Get(context.Background(), "k")
			switch {
			case tt.want < 0 && !errors.Is(err, ErrNotFound):
				t.Errorf("Get(k) = %v, %v; want ErrNotFound", r, err)
			case tt.want >= 0 && (err != nil || r.Version != tt.want):
				t.Errorf("Get(k) = %v, %v; want version %d", r, err, tt.want)
			}
			if n := src.loads.Load() - before; n != tt.loads {
				t.Errorf("Get(k) cost %d loads; want %d", n, tt.loads)
			}
			st := c.Stats()
			if st.ValuesInstalled != tt.installed || st.ValuesRejected != tt.rejected {
				t.Errorf("ValuesInstalled, ValuesRejected = %d, %d; want %d, %d", st.ValuesInstalled, st.ValuesRejected, tt.installed, tt.rejected)
			}
			wantErrs := uint64(0)
			if tt.steps[len(tt.steps)-1].op == "garbage" {
				wantErrs = 1
			}
			if st.CodecErrors != wantErrs {
				t.Errorf("CodecErrors = %d; want %d", st.CodecErrors, wantErrs)
			}
			if st.Flushes > 1 {
				t.Errorf("Flushes = %d; a value never flushes", st.Flushes)
			}
		})
	}
}

// TestBroadcastDuringLoad pins the interleaving of a value broadcast and a
// load of its key that read the row the broadcast write replaced:
//
//	load:  token ... reads v5 ........................... store v5?
//	bus:              value v6 arrives: no entry, key dropped
//
// The value cannot be installed (this node holds no entry of the key to
// order it against), but it bumps the key's guard slot like any
// invalidation, so the load does not store v5 (race 1).
func TestBroadcastDuringLoad(t *testing.T) {
	src := newSource()
	src.rows["k"] = row{Value: "v5", Version: 5}
	reading, release := make(chan struct{}), make(chan struct{})
	load := func(ctx context.Context, key string) (row, error) {
		r, err := src.load(ctx, key)
		if r.Version == 5 {
			close(reading)
			<-release
		}
		return r, err
	}
	bus := &fakeBus{proof: forever}
	c := newTestCache(t, 10, load, &Options[string, row]{Bus: bus, Version: rowVersion, Codec: JSONCodec[row]{}})
	done := make(chan row)
	go func() { done <- mustGet(t, c, "k") }()
	<-reading
	src.write("k", "v6")
	bus.handler().Invalidate([]Invalidation{{Key: "k", Version: 6, Value: rowJSON(t, row{Value: "v6", Version: 6})}})
	close(release)
	if r := <-done; r.Version != 5 {
		t.Errorf("the load in flight returned %v; want v5, what it read", r)
	}
	if r := mustGet(t, c, "k"); r.Version != 6 {
		t.Errorf("Get(k) after the load = %v; want v6: the load stored the row the broadcast replaced", r)
	}
	if st := c.Stats(); st.ValuesRejected != 1 || st.Loads != 2 {
		t.Errorf("ValuesRejected, Loads = %d, %d; want 1, 2", st.ValuesRejected, st.Loads)
	}
}

// TestBroadcastWithoutCodec checks that a receiver without a Codec treats a
// value as a plain invalidation of its version.
func TestBroadcastWithoutCodec(t *testing.T) {
	src := newSource()
	c, _, h := broadcastCache(t, src, &Options[string, row]{Version: rowVersion})
	src.rows["k"] = row{Value: "v5", Version: 5}
	mustGet(t, c, "k")
	src.rows["k"] = row{Value: "v6", Version: 6}
	h.Invalidate([]Invalidation{{Key: "k", Version: 6, Value: rowJSON(t, row{"v6", 6})}})
	before := src.loads.Load()
	if r := mustGet(t, c, "k"); r.Version != 6 || src.loads.Load() != before+1 {
		t.Errorf("Get(k) = %v after %d loads; want v6 loaded once", r, src.loads.Load()-before)
	}
	if st := c.Stats(); st.ValuesInstalled != 0 || st.ValuesRejected != 0 {
		t.Errorf("Stats = %+v; want no values counted", st)
	}
}
