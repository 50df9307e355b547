package invalidate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/coherentcache/coherent/cache"
)

var testOrigin = nodeID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}

func TestCodecRoundTrip(t *testing.T) {
	long := strings.Repeat("k", cache.MaxKeyLen)
	tests := []struct {
		name string
		m    message
	}{
		{"one key", message{namespace: "users", origin: testOrigin, seq: 1, keys: []cache.Invalidation{{Key: "42"}}}},
		{"versions", message{namespace: "n", origin: testOrigin, seq: 1 << 40, keys: []cache.Invalidation{
			{Key: "a", Version: 1}, {Key: "b", Version: -1}, {Key: "c", Version: math.MaxInt64}, {Key: "d", Version: math.MinInt64},
		}}},
		{"flush", message{namespace: "orders", origin: testOrigin, seq: math.MaxUint64, flush: true}},
		{"longest key and namespace", message{namespace: long, origin: testOrigin, seq: 7, keys: []cache.Invalidation{{Key: long, Version: 3}}}},
		{"binary key", message{namespace: "\x00\xff", origin: testOrigin, seq: 2, keys: []cache.Invalidation{{Key: "\x00'; DROP TABLE x;--\xff"}}}},
		{"positions", message{namespace: "n", origin: testOrigin, seq: 3, keys: []cache.Invalidation{
			{Key: "a", Version: 2, Position: 1}, {Key: "b", Position: 0x16B374D8}, {Key: "c", Version: 5, Position: math.MaxUint64},
		}}},
		{"values", message{namespace: "n", origin: testOrigin, seq: 4, keys: []cache.Invalidation{
			{Key: "a", Version: 2, Position: 1, Value: []byte(`{"name":"Ada"}`)}, {Key: "b", Version: 3, Deleted: true},
			{Key: "c", Version: 4, Value: []byte{}}, {Key: "d"}, {Key: "e", Version: 5, Value: []byte("\x00\xff")},
		}}},
		{"longest value", message{namespace: "n", origin: testOrigin, seq: 5, keys: []cache.Invalidation{
			{Key: long, Version: math.MaxInt64, Position: math.MaxUint64, Value: bytes.Repeat([]byte{'v'}, cache.MaxValueLen)},
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := appendMessage(nil, &tt.m)
			if got, want := len(b), headerSize(tt.m.namespace, tt.m.seq, len(tt.m.keys))+keysSize(tt.m.keys)-flushAdjust(tt.m)-v2Adjust(tt.m); got != want {
				t.Errorf("encoded size = %d; want %d (headerSize+keySize)", got, want)
			}
			got, err := decode(string(b))
			if err != nil {
				t.Fatalf("decode(appendMessage(%+v)) error = %v", tt.m, err)
			}
			if !reflect.DeepEqual(got, tt.m) {
				t.Errorf("decode(appendMessage(m)) = %+v; want %+v", got, tt.m)
			}
		})
	}
}

// TestDecodeVersion1 guards the upgrade to version 2 (source positions):
// a message of version 1, as a node of the previous release sends it,
// still decodes, its keys at position 0.
func TestDecodeVersion1(t *testing.T) {
	m := message{namespace: "users", origin: testOrigin, seq: 9, keys: []cache.Invalidation{{Key: "42", Version: 7}, {Key: "43"}}}
	got, err := decode(string(appendMessageV1(nil, &m)))
	if err != nil {
		t.Fatalf("decode of a version 1 message: %v", err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Errorf("decode of a version 1 message = %+v; want %+v", got, m)
	}
}

// TestDecodeVersion2 guards the upgrade to version 3 (value broadcast): a
// message of version 2 still decodes, its keys plain invalidations, and a
// message without values or tombstones is still sent in version 2, which
// nodes of the previous release read.
func TestDecodeVersion2(t *testing.T) {
	m := message{namespace: "users", origin: testOrigin, seq: 9, keys: []cache.Invalidation{{Key: "42", Version: 7, Position: 3}, {Key: "43"}}}
	b := appendMessage(nil, &m)
	if b[1] != formatV2 {
		t.Errorf("a message of plain invalidations is sent in version %d; want %d", b[1], formatV2)
	}
	got, err := decode(string(b))
	if err != nil {
		t.Fatalf("decode of a version 2 message: %v", err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Errorf("decode of a version 2 message = %+v; want %+v", got, m)
	}
	// One value makes the whole message version 3; its plain keys stay
	// plain.
	m.keys = append(m.keys, cache.Invalidation{Key: "44", Version: 8, Value: []byte("v")})
	b = appendMessage(nil, &m)
	if b[1] != formatV3 {
		t.Errorf("a message with a value is sent in version %d; want %d", b[1], formatV3)
	}
	if got, err = decode(string(b)); err != nil || !reflect.DeepEqual(got, m) {
		t.Errorf("decode of a version 3 message = %+v, %v; want %+v", got, err, m)
	}
}

// appendMessageV1 encodes m in format version 1, which has no positions
// (m's must be 0): what a node of the previous release sends.
func appendMessageV1(dst []byte, m *message) []byte {
	kind := byte(kindKeys)
	if m.flush {
		kind = kindFlush
	}
	dst = append(dst, magic, formatV1, kind)
	dst = binary.AppendUvarint(dst, uint64(len(m.namespace)))
	dst = append(dst, m.namespace...)
	dst = append(dst, m.origin[:]...)
	dst = binary.AppendUvarint(dst, m.seq)
	if m.flush {
		return dst
	}
	dst = binary.AppendUvarint(dst, uint64(len(m.keys)))
	for _, k := range m.keys {
		dst = binary.AppendUvarint(dst, uint64(len(k.Key)))
		dst = append(dst, k.Key...)
		dst = binary.AppendVarint(dst, k.Version)
	}
	return dst
}

func keysSize(keys []cache.Invalidation) int {
	n := 0
	for _, k := range keys {
		n += keySize(k)
	}
	return n
}

// v2Adjust is the payload byte per key that a version 2 message does not
// carry.
func v2Adjust(m message) int {
	if formatOf(&m) == formatV2 {
		return len(m.keys)
	}
	return 0
}

// flushAdjust is the key count byte that a flush message does not carry.
func flushAdjust(m message) int {
	if m.flush {
		return 1
	}
	return 0
}

func TestDecodeRejects(t *testing.T) {
	good := appendMessage(nil, &message{namespace: "ns", origin: testOrigin, seq: 5, keys: []cache.Invalidation{{Key: "k", Version: 1}}})
	// header is everything up to the key count.
	header := good[:3+1+2+originLen+1]
	withKeys := func(count uint64, rest ...byte) string {
		b := append([]byte(nil), header...)
		b = binary.AppendUvarint(b, count)
		return string(append(b, rest...))
	}
	withKeysV3 := func(count uint64, rest ...byte) string {
		b := []byte(withKeys(count, rest...))
		b[1] = formatV3
		return string(b)
	}
	tests := []struct {
		name string
		in   string
		want error
	}{
		{"empty", "", errMalformed},
		{"short", "\xC0\x01", errMalformed},
		{"bad magic", "\xC1" + string(good[1:]), errMalformed},
		{"unknown version", "\xC0\x04" + string(good[2:]), errVersion},
		{"version 0", "\xC0\x00" + string(good[2:]), errVersion},
		{"unknown payload", withKeysV3(1, 1, 'k', 2, 0, 3), errMalformed},
		{"missing payload", withKeysV3(1, 1, 'k', 2, 0), errMalformed},
		{"value past end", withKeysV3(1, 1, 'k', 2, 0, 1, 5, 'v'), errMalformed},
		{"missing value length", withKeysV3(1, 1, 'k', 2, 0, 1), errMalformed},
		{"value too long", withKeysV3(1, append([]byte{1, 'k', 2, 0, 1}, append(binary.AppendUvarint(nil, cache.MaxValueLen+1), bytes.Repeat([]byte{'v'}, cache.MaxValueLen+1)...)...)...), errMalformed},
		{"trailing after tombstone", withKeysV3(1, 1, 'k', 2, 0, 2, 0), errMalformed},
		{"payload byte in version 2", withKeys(1, 1, 'k', 2, 0, 0), errMalformed},
		{"unknown kind", "\xC0\x01\x03" + string(good[3:]), errMalformed},
		{"empty namespace", "\xC0\x01\x01\x00", errMalformed},
		{"namespace too long", string(appendMessage(nil, &message{namespace: strings.Repeat("n", cache.MaxKeyLen+1), origin: testOrigin, seq: 1, flush: true})), errMalformed},
		{"truncated origin", string(good[:3+1+2+5]), errMalformed},
		{"zero seq", string(appendMessage(nil, &message{namespace: "ns", origin: testOrigin, seq: 0, flush: true})), errMalformed},
		{"zero keys", withKeys(0), errMalformed},
		{"huge count", withKeys(math.MaxUint64, 1, 'k', 0), errMalformed},
		{"count beyond bytes", withKeys(2, 1, 'k', 0), errMalformed},
		{"empty key", withKeys(1, 0, 0, 0), errMalformed},
		{"key too long", withKeys(1, append(binary.AppendUvarint(nil, cache.MaxKeyLen+1), []byte(strings.Repeat("k", cache.MaxKeyLen+1)+"\x00")...)...), errMalformed},
		{"key past end", withKeys(1, 5, 'k', 0), errMalformed},
		{"missing version", withKeys(1, 2, 'k', 'k'), errMalformed},
		{"overlong varint", withKeys(1, 0x81, 0x00, 'k', 0), errMalformed},
		{"varint overflow", withKeys(1, 1, 'k', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02), errMalformed},
		{"trailing bytes", string(good) + "x", errMalformed},
		{"trailing after flush", string(appendMessage(nil, &message{namespace: "ns", origin: testOrigin, seq: 1, flush: true})) + "\x00", errMalformed},
		{"too large", "\xC0\x01\x01" + strings.Repeat("\x00", MaxMessageSize), errMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := decode(tt.in)
			if !errors.Is(err, tt.want) {
				t.Fatalf("decode(%.40q) = %+v, %v; want error %v", tt.in, m, err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "invalidate: ") {
				t.Errorf("error %q lacks the package prefix", err)
			}
		})
	}
}

// FuzzDecode checks that decode never panics and that whatever it accepts
// re-encodes to exactly the input: the format has one encoding per message.
func FuzzDecode(f *testing.F) {
	f.Add(appendMessage(nil, &message{namespace: "users", origin: testOrigin, seq: 1, keys: []cache.Invalidation{{Key: "42", Version: 7}}}))
	f.Add(appendMessage(nil, &message{namespace: "users", origin: testOrigin, seq: 300, flush: true}))
	f.Add(appendMessage(nil, &message{namespace: "n", origin: testOrigin, seq: math.MaxUint64, keys: []cache.Invalidation{
		{Key: "a", Version: -1}, {Key: "bb", Version: math.MinInt64}, {Key: strings.Repeat("c", 200), Version: 1 << 40},
	}}))
	f.Add([]byte{})
	f.Add([]byte{0xC0, 0x01, 0x01, 0x01, 'n'})
	f.Add([]byte("\xC0\x03 future format"))
	f.Add(appendMessageV1(nil, &message{namespace: "users", origin: testOrigin, seq: 1, keys: []cache.Invalidation{{Key: "42", Version: 7}}}))
	f.Add(appendMessage(nil, &message{namespace: "p", origin: testOrigin, seq: 2, keys: []cache.Invalidation{{Key: "k", Position: 1 << 40}}}))
	f.Add(appendMessage(nil, &message{namespace: "users", origin: testOrigin, seq: 3, keys: []cache.Invalidation{
		{Key: "42", Version: 8, Position: 1 << 30, Value: []byte(`{"id":42,"name":"Ada","version":8}`)},
		{Key: "43", Version: 9, Deleted: true}, {Key: "44", Version: 2}, {Key: "45", Version: 3, Value: []byte{}},
	}}))
	f.Add(appendMessageAt(nil, &message{namespace: "users", origin: testOrigin, seq: 4, keys: []cache.Invalidation{{Key: "42", Version: 7}}}, formatV3))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := decode(string(data))
		if err != nil {
			if !errors.Is(err, errMalformed) && !errors.Is(err, errVersion) {
				t.Fatalf("decode error %v wraps neither errMalformed nor errVersion", err)
			}
			return
		}
		if !validLen(len(m.namespace)) || m.seq == 0 || m.flush == (len(m.keys) > 0) {
			t.Fatalf("decode accepted an invalid message %+v", m)
		}
		for _, k := range m.keys {
			if !validLen(len(k.Key)) {
				t.Fatalf("decode accepted a key of length %d", len(k.Key))
			}
			if len(k.Value) > cache.MaxValueLen || (k.Value != nil && (k.Deleted || data[1] != formatV3)) {
				t.Fatalf("decode accepted a key %+v in version %d", k, data[1])
			}
		}
		var b []byte
		if data[1] == formatV1 {
			b = appendMessageV1(nil, &m)
		} else {
			b = appendMessageAt(nil, &m, data[1])
		}
		if !bytes.Equal(b, data) {
			t.Fatalf("appendMessage(decode(%x)) = %x; want the input", data, b)
		}
	})
}

// TestBatchMergeKeepsValueOfItsVersion checks that two publications of one
// key merged into one message carry the value of the version that wins,
// never a value beside another version, and the higher position.
func TestBatchMergeKeepsValueOfItsVersion(t *testing.T) {
	v5 := cache.Invalidation{Key: "k", Version: 5, Position: 9, Value: []byte("five")}
	v6 := cache.Invalidation{Key: "k", Version: 6, Position: 7, Value: []byte("six")}
	tomb7 := cache.Invalidation{Key: "k", Version: 7, Deleted: true}
	plain := cache.Invalidation{Key: "k", Position: 8}
	tests := []struct {
		name     string
		in       []cache.Invalidation
		want     cache.Invalidation
		wantKind byte
	}{
		{"higher version wins", []cache.Invalidation{v5, v6}, cache.Invalidation{Key: "k", Version: 6, Position: 9, Value: []byte("six")}, payloadValue},
		{"lower version arriving second", []cache.Invalidation{v6, v5}, cache.Invalidation{Key: "k", Version: 6, Position: 9, Value: []byte("six")}, payloadValue},
		{"tombstone wins", []cache.Invalidation{v6, tomb7}, cache.Invalidation{Key: "k", Version: 7, Position: 7, Deleted: true}, payloadTombstone},
		{"version 0 drops the value", []cache.Invalidation{v6, plain}, cache.Invalidation{Key: "k", Position: 8}, payloadNone},
		{"version 0 first keeps it plain", []cache.Invalidation{plain, v6}, cache.Invalidation{Key: "k", Position: 8}, payloadNone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var nb nsBatch
			for _, k := range tt.in {
				nb.add([]cache.Invalidation{k})
			}
			if len(nb.keys) != 1 || !reflect.DeepEqual(nb.keys[0], tt.want) || payloadOf(nb.keys[0]) != tt.wantKind {
				t.Errorf("merge of %+v = %+v; want %+v", tt.in, nb.keys, tt.want)
			}
		})
	}
}
