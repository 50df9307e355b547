// The wire format of the buses' messages, which this file encodes and
// decodes.
//
// Every message (a pub/sub payload, or the value of a stream entry's field
// "m") is, in version 3:
//
//	offset  size      field
//	0       1         magic, 0xC0
//	1       1         format version, 3 (or 2, 1: see below)
//	2       1         kind: 1 keys, 2 flush the namespace
//	3       uvarint   namespace length n, 1 ≤ n ≤ cache.MaxKeyLen
//	        n         namespace
//	        16        origin: the publishing bus's NodeID
//	        uvarint   sequence number, ≥ 1; each origin numbers its
//	                  messages 1, 2, 3, … (all namespaces together)
//	kind 1 only:
//	        uvarint   key count k ≥ 1
//	        k times:  uvarint key length m, 1 ≤ m ≤ cache.MaxKeyLen
//	                  m bytes of key
//	                  varint version (zigzag, as encoding/binary's
//	                  AppendVarint); 0 means unknown
//	                  uvarint source position (a WAL position, opaque
//	                  here); 0 means unknown
//	                  1 byte payload: 0 none (a plain invalidation),
//	                  1 a value, 2 a tombstone (the write deleted the key)
//	                  payload 1 only: uvarint value length v,
//	                  0 ≤ v ≤ cache.MaxValueLen, then v bytes of value
//	                  (the publishing cache's Options.Codec encoding)
//
// Version 2 is version 3 without the payload byte and value (every key a
// plain invalidation), and version 1 is version 2 without the positions
// (its keys have position 0). Receivers decode all three. Publishers send
// version 3 only for a message that carries a value or a tombstone, and
// version 2 otherwise, so that nodes that speak only version 2 keep their
// caches during a rolling upgrade while value broadcast is off.
//
// Varints are those of encoding/binary, in their shortest form. Nothing
// follows the last field, and a message is at most MaxMessageSize bytes.
// A receiver rejects anything else, including a key count that the
// remaining bytes cannot hold, and flushes. A message of another format
// version is rejected the same way, so during a rolling upgrade that
// changes the format, old nodes flush on every new message: correct, but
// without a cache. (Nodes that speak only version 1 flush on version 2.)
//
// Streams entries hold one field: "m", a message, or "j", a marker a
// reader adds to mark its position (its value is the reader's NodeID, in
// hex). Readers skip markers and flush on anything else.

package invalidate

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"

	"github.com/coherentcache/coherent/cache"
)

const (
	// MaxMessageSize is the largest encoded message, in bytes, that a bus
	// sends or accepts. Publishers split larger batches into several
	// messages; a receiver treats a larger message as malformed.
	MaxMessageSize = 1 << 20

	magic    = 0xC0 // first byte of every message
	formatV3 = 3    // second byte of a message that carries values
	formatV2 = 2    // second byte of a message of plain invalidations
	formatV1 = 1    // the version before positions, still decoded

	payloadNone      = 0 // a plain invalidation
	payloadValue     = 1 // a value follows
	payloadTombstone = 2 // the write deleted the key

	kindKeys  = 1 // a batch of invalidated keys of one namespace
	kindFlush = 2 // every key of one namespace

	originLen = 16
)

// nodeID names one bus object, the origin of the messages it publishes.
type nodeID [originLen]byte

func (id nodeID) String() string { return hex.EncodeToString(id[:]) }

// message is the decoded form of one bus message.
type message struct {
	namespace string
	origin    nodeID
	// seq numbers the messages of one origin 1, 2, 3, …; a receiver that
	// sees anything but last+1 from a known origin has missed something.
	seq   uint64
	flush bool                 // kindFlush: keys is empty
	keys  []cache.Invalidation // kindKeys: at least one
}

// headerSize returns the encoded size of m without its keys, its key count
// included.
func headerSize(namespace string, seq uint64, nkeys int) int {
	return 3 + uvarintLen(uint64(len(namespace))) + len(namespace) + originLen +
		uvarintLen(seq) + uvarintLen(uint64(nkeys))
}

// keySize returns the encoded size of one key in version 3 (one byte more
// than in version 2).
func keySize(inv cache.Invalidation) int {
	n := uvarintLen(uint64(len(inv.Key))) + len(inv.Key) + varintLen(inv.Version) + uvarintLen(inv.Position) + 1
	if payloadOf(inv) == payloadValue {
		n += uvarintLen(uint64(len(inv.Value))) + len(inv.Value)
	}
	return n
}

// payloadOf returns the payload kind of inv: a tombstone if Deleted, else a
// value if Value is not nil.
func payloadOf(inv cache.Invalidation) byte {
	switch {
	case inv.Deleted:
		return payloadTombstone
	case inv.Value != nil:
		return payloadValue
	}
	return payloadNone
}

// formatOf returns the format version a publisher sends m in: version 3
// if a key carries a payload, else version 2.
func formatOf(m *message) byte {
	for _, k := range m.keys {
		if payloadOf(k) != payloadNone {
			return formatV3
		}
	}
	return formatV2
}

// appendMessage appends the encoding of m to dst, in the format version
// formatOf chooses. The caller keeps m within the limits that decode
// enforces (see validLen, MaxMessageSize, cache.MaxValueLen); the batcher
// splits batches so that it does.
func appendMessage(dst []byte, m *message) []byte {
	return appendMessageAt(dst, m, formatOf(m))
}

// appendMessageAt appends the encoding of m in format version 2 or 3;
// version 2 drops the payloads.
func appendMessageAt(dst []byte, m *message, version byte) []byte {
	kind := byte(kindKeys)
	if m.flush {
		kind = kindFlush
	}
	dst = append(dst, magic, version, kind)
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
		dst = binary.AppendUvarint(dst, k.Position)
		if version < formatV3 {
			continue
		}
		p := payloadOf(k)
		dst = append(dst, p)
		if p == payloadValue {
			dst = binary.AppendUvarint(dst, uint64(len(k.Value)))
			dst = append(dst, k.Value...)
		}
	}
	return dst
}

// decode parses one message. The namespace and keys of the result are
// substrings of data, which is not copied; values are copied. decode returns an error wrapping
// errVersion for a message of an unknown format version and errMalformed
// for anything else it cannot accept; it never panics and allocates no more
// than the input justifies.
//
// decode accepts exactly what appendMessage produces: varints must be in
// their shortest form and nothing may follow the last key, so a message that
// decodes re-encodes to the same bytes.
func decode(data string) (message, error) {
	var m message
	if len(data) > MaxMessageSize {
		return m, fmt.Errorf("%w: %d bytes exceeds the limit of %d", errMalformed, len(data), MaxMessageSize)
	}
	if len(data) < 3 {
		return m, fmt.Errorf("%w: %d bytes is too short", errMalformed, len(data))
	}
	if data[0] != magic {
		return m, fmt.Errorf("%w: bad magic byte %#x", errMalformed, data[0])
	}
	version := data[1]
	if version < formatV1 || version > formatV3 {
		return m, fmt.Errorf("%w: version %d (this node speaks %d to %d)", errVersion, version, formatV1, formatV3)
	}
	kind := data[2]
	if kind != kindKeys && kind != kindFlush {
		return m, fmt.Errorf("%w: unknown kind %d", errMalformed, kind)
	}
	r := reader{s: data, off: 3}
	ns, ok := r.str()
	if !ok || !validLen(len(ns)) {
		return m, fmt.Errorf("%w: bad namespace", errMalformed)
	}
	m.namespace = ns
	if len(r.s)-r.off < originLen {
		return m, fmt.Errorf("%w: truncated origin", errMalformed)
	}
	copy(m.origin[:], r.s[r.off:r.off+originLen])
	r.off += originLen
	if m.seq, ok = r.uvarint(); !ok || m.seq == 0 {
		return m, fmt.Errorf("%w: bad sequence number", errMalformed)
	}
	if kind == kindFlush {
		m.flush = true
		if r.off != len(r.s) {
			return m, fmt.Errorf("%w: %d trailing bytes", errMalformed, len(r.s)-r.off)
		}
		return m, nil
	}
	n, ok := r.uvarint()
	// Each key takes at least three bytes (length, one byte, version), one
	// more for its position from version 2 on and one more for its payload
	// kind in version 3, so a count the remaining bytes cannot hold is
	// rejected before anything is allocated for it.
	minKey := uint64(2 + version)
	if !ok || n == 0 || n > uint64(len(r.s)-r.off)/minKey {
		return m, fmt.Errorf("%w: bad key count", errMalformed)
	}
	m.keys = make([]cache.Invalidation, n)
	for i := range m.keys {
		k, ok := r.str()
		if !ok || !validLen(len(k)) {
			return m, fmt.Errorf("%w: bad key %d", errMalformed, i)
		}
		v, ok := r.varint()
		if !ok {
			return m, fmt.Errorf("%w: bad version of key %d", errMalformed, i)
		}
		var pos uint64
		if version != formatV1 {
			if pos, ok = r.uvarint(); !ok {
				return m, fmt.Errorf("%w: bad position of key %d", errMalformed, i)
			}
		}
		inv := cache.Invalidation{Key: k, Version: v, Position: pos}
		if version == formatV3 {
			if r.off >= len(r.s) {
				return m, fmt.Errorf("%w: truncated payload of key %d", errMalformed, i)
			}
			p := r.s[r.off]
			r.off++
			switch p {
			case payloadNone:
			case payloadTombstone:
				inv.Deleted = true
			case payloadValue:
				val, ok := r.str()
				if !ok || len(val) > cache.MaxValueLen {
					return m, fmt.Errorf("%w: bad value of key %d", errMalformed, i)
				}
				inv.Value = append(make([]byte, 0, len(val)), val...)
			default:
				return m, fmt.Errorf("%w: unknown payload %d of key %d", errMalformed, p, i)
			}
		}
		m.keys[i] = inv
	}
	if r.off != len(r.s) {
		return m, fmt.Errorf("%w: %d trailing bytes", errMalformed, len(r.s)-r.off)
	}
	return m, nil
}

// validLen reports whether n is an acceptable length of a key or namespace.
func validLen(n int) bool { return n > 0 && n <= cache.MaxKeyLen }

// reader consumes a string. Every method reports false, without panicking,
// on truncated or non-canonical input.
type reader struct {
	s   string
	off int
}

// uvarint reads an unsigned varint in its shortest encoding.
func (r *reader) uvarint() (uint64, bool) {
	var x uint64
	for i := 0; i < binary.MaxVarintLen64; i++ {
		if r.off >= len(r.s) {
			return 0, false
		}
		b := r.s[r.off]
		r.off++
		if b < 0x80 {
			if i > 0 && b == 0 {
				return 0, false // a longer encoding than needed
			}
			if i == binary.MaxVarintLen64-1 && b > 1 {
				return 0, false // overflows 64 bits
			}
			return x | uint64(b)<<(7*i), true
		}
		x |= uint64(b&0x7f) << (7 * i)
	}
	return 0, false
}

// varint reads a zigzag-encoded signed varint.
func (r *reader) varint() (int64, bool) {
	u, ok := r.uvarint()
	x := int64(u >> 1)
	if u&1 != 0 {
		x = ^x
	}
	return x, ok
}

// str reads a uvarint length and that many bytes.
func (r *reader) str() (string, bool) {
	n, ok := r.uvarint()
	if !ok || n > uint64(len(r.s)-r.off) {
		return "", false
	}
	s := r.s[r.off : r.off+int(n)]
	r.off += int(n)
	return s, true
}

func uvarintLen(x uint64) int {
	n := 1
	for x >= 0x80 {
		x >>= 7
		n++
	}
	return n
}

func varintLen(x int64) int {
	u := uint64(x) << 1
	if x < 0 {
		u = ^u
	}
	return uvarintLen(u)
}
