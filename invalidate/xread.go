package invalidate

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"

	"github.com/redis/go-redis/v9"
)

// How go-redis's typed XRead and its RawWriteToCmd read a reply, and how a
// ClusterClient treats the error a writer returns, which xreader is built
// on, is in docs/go-redis.md ("Streams").

// streamEntry is what xreader keeps of one stream entry: its id and, if
// they were short enough to keep, the name and value of its first field.
type streamEntry struct {
	id          string
	pairs       int    // field-value pairs
	field       string // the first field's name, if kept
	value       string // the first field's value, if kept
	kept        bool   // field and value were kept
	largest     int    // the length of its largest field name or value
	largestName bool   // that was a name
}

// Limits of what xreader keeps, besides a message field's value.
const (
	maxReplyLine = 1024 // a header line or an error reply
	maxEntryID   = 64   // "ms-seq": two 20-digit numbers and a dash
	maxFieldName = 16   // fieldMessage and fieldMarker are one byte
)

// replyError is an error reply from the server, such as MOVED, ASK or
// WRONGTYPE. Its text is the server's, and it implements redis.Error, so
// that go-redis handles it as an error reply it parsed itself:
// a ClusterClient follows MOVED and ASK, and the connection is kept.
type replyError string

func (e replyError) Error() string { return string(e) }

// RedisError marks replyError as a reply of the server: [redis.Error].
func (replyError) RedisError() {}

var _ redis.Error = replyError("")

// xreader parses the reply of XREAD [COUNT n] [BLOCK ms] STREAMS key id,
// for one stream, in RESP2 or RESP3, as go-redis's RawWriteToCmd streams
// it: it is the io.Writer the command writes to. It hands each entry to
// onEntry as soon as the entry is complete, and keeps no more than that
// entry, of which it keeps the id and, of the first field, a name of at
// most maxFieldName bytes and a value of at most maxValue.
// The bytes of anything larger are counted and dropped as they pass. So
// what a read allocates on this node is bounded whatever the stream
// holds: about maxValue, however many entries the reply carries and
// however large they are, where reading the reply whole would allocate
// all of it.
//
// A reply is a tree of aggregates; xreader keeps the path to the current
// element (stack) and checks each element's kind against its place:
//
//	RESP2: *1 → *2 → [key, *N entries]; RESP3: %1 → key, *N entries
//	entry: *2 → [id, *2k → [name, value, ...]]
//
// so the entries are at depth entries+1, where entries is 2 for RESP2
// and 1 for RESP3. A timeout is a null reply (*-1, or _ in RESP3).
type xreader struct {
	maxValue int
	onEntry  func(*streamEntry)

	line  []byte // the header line so far, CRLF included
	bulk  []byte // the kept payload of the current bulk string, CRLF included
	left  int    // bytes of the current bulk string still to come (CRLF included); 0 between elements
	keep  bool   // the current bulk string is kept in bulk
	blen  int    // the current bulk string's length
	kind  byte   // the current bulk string's kind: '$', '=' or '!'
	stack []frame

	entries int         // the depth of the entries array, once the top is known
	entry   streamEntry // the entry being read

	n    int   // entries handed to onEntry
	done bool  // the whole reply has been read
	err  error // a protocol error: every later Write fails with it
}

// frame is an aggregate being read: the number of its elements still to
// come, and the index of the next one.
type frame struct{ left, index int }

// reset prepares x for a new command.
func (x *xreader) reset() {
	x.restart()
	x.n, x.err = 0, nil
	if cap(x.bulk) > 64<<10 {
		x.bulk = nil // keep no large buffer between reads
	}
}

// restart prepares x for a new reply to the same command, after an error
// reply (which go-redis may answer by sending the command again).
func (x *xreader) restart() {
	x.line, x.bulk, x.stack = x.line[:0], x.bulk[:0], x.stack[:0]
	x.left, x.keep, x.blen, x.kind = 0, false, 0, 0
	x.entries, x.entry, x.done = 0, streamEntry{}, false
}

// result reports how the reply ended: the entries read, and an error if
// the reply was incomplete or malformed. (An error reply ended the
// command with that error already.)
func (x *xreader) result() (int, error) {
	switch {
	case x.err != nil:
		return x.n, x.err
	case !x.done:
		return x.n, fmt.Errorf("%w: the reply ended early", errProtocol)
	}
	return x.n, nil
}

// Write implements io.Writer.
func (x *xreader) Write(p []byte) (int, error) {
	if x.err != nil {
		return 0, x.err
	}
	total := len(p)
	for len(p) > 0 {
		if x.left > 0 {
			k := min(x.left, len(p))
			if x.keep {
				x.bulk = append(x.bulk, p[:k]...)
			}
			x.left -= k
			p = p[k:]
			if x.left == 0 {
				if err := x.endBulk(); err != nil {
					return total - len(p), x.fail(err)
				}
			}
			continue
		}
		i := bytes.IndexByte(p, '\n')
		end := len(p)
		if i >= 0 {
			end = i + 1
		}
		if len(x.line)+end > maxReplyLine {
			x.err = fmt.Errorf("%w: a line of more than %d bytes", errProtocol, maxReplyLine)
			return total - len(p), x.err
		}
		x.line = append(x.line, p[:end]...)
		p = p[end:]
		if i < 0 {
			continue
		}
		err := x.header()
		x.line = x.line[:0]
		if err != nil {
			return total - len(p), x.fail(err)
		}
	}
	return total, nil
}

// fail returns err, the end of a reply: an error reply, after which x
// expects a new reply, or a protocol error, after which every Write fails.
func (x *xreader) fail(err error) error {
	var reply replyError
	if errors.As(err, &reply) {
		x.restart()
		return err
	}
	x.err = err
	return err
}

// header handles a complete header line.
func (x *xreader) header() error {
	line := x.line
	if x.done {
		return fmt.Errorf("%w: data after the reply", errProtocol)
	}
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return fmt.Errorf("%w: a malformed line", errProtocol)
	}
	kind, body := line[0], line[1:len(line)-2]
	switch kind {
	case '$', '=', '!': // bulk string, verbatim string, blob error
		n, err := strconv.Atoi(string(body))
		if err != nil || n < -1 {
			return fmt.Errorf("%w: bulk length %q", errProtocol, body)
		}
		if n == -1 {
			return x.element('_', 0, nil)
		}
		x.kind, x.blen, x.left = kind, n, n+2
		x.keep = n <= x.limit()
		if x.keep && cap(x.bulk) < n+2 {
			x.bulk = make([]byte, 0, n+2)
		}
		x.bulk = x.bulk[:0]
		return nil
	case '*', '%', '~', '>': // array, map, set, push
		n, err := strconv.Atoi(string(body))
		if err != nil || n < -1 {
			return fmt.Errorf("%w: aggregate length %q", errProtocol, body)
		}
		if n == -1 {
			return x.element('_', 0, nil)
		}
		return x.element(kind, n, nil)
	case '-': // error
		return x.element('-', 0, body)
	case '_', '+', ':', ',', '#', '(': // null, simple string, numbers, boolean
		return x.element(kind, 0, body)
	}
	return fmt.Errorf("%w: reply type %q", errProtocol, kind)
}

// endBulk handles the end of a bulk string's payload.
func (x *xreader) endBulk() error {
	var data []byte
	if x.keep {
		if len(x.bulk) < 2 || !bytes.HasSuffix(x.bulk, []byte("\r\n")) {
			return fmt.Errorf("%w: a bulk string without CRLF", errProtocol)
		}
		data = x.bulk[:len(x.bulk)-2]
	}
	kind := x.kind
	if kind == '!' {
		kind = '-'
	} else {
		kind = '$'
	}
	return x.element(kind, x.blen, data)
}

// place returns the depth and index of the element that comes next.
func (x *xreader) place() (depth, index int) {
	if d := len(x.stack); d > 0 {
		return d, x.stack[d-1].index
	}
	return 0, 0
}

// limit returns how long a bulk string may be, in the next place, for
// xreader to keep it; a longer one is dropped as it passes. Only ids,
// first field names and values, and error replies are kept.
func (x *xreader) limit() int {
	depth, index := x.place()
	switch {
	case depth == 0:
		return maxReplyLine // a blob error
	case x.entries == 0:
		return 0
	case depth == x.entries+2 && index == 0:
		return maxEntryID
	case depth == x.entries+3 && index == 0:
		return maxFieldName
	case depth == x.entries+3 && index == 1:
		return x.maxValue
	}
	return 0
}

// element handles a complete scalar (kind '$' for a bulk string, with
// data if it was kept, '_' for null, '-' for an error, or a simple type),
// or the header of an aggregate of n elements.
func (x *xreader) element(kind byte, n int, data []byte) error {
	depth, index := x.place()
	aggregate := kind == '*' || kind == '%' || kind == '~' || kind == '>'
	bad := func(what string) error {
		return fmt.Errorf("%w: %s at depth %d", errProtocol, what, depth)
	}
	e := &x.entry
	switch d := x.entries; {
	case depth == 0:
		switch kind {
		case '_':
			x.done = true // BLOCK timed out: no entries
			return nil
		case '-':
			return replyError(data)
		case '*':
			x.entries = 2
		case '%':
			x.entries = 1
		default:
			return bad(fmt.Sprintf("reply type %q", kind))
		}
	case depth < d: // RESP2: one stream's [key, entries]
		if kind != '*' || n != 2 {
			return bad("not a [key, entries] pair")
		}
	case depth == d && index%2 == 0: // the stream's key
		if kind != '$' {
			return bad("not a stream key")
		}
	case depth == d: // the stream's entries
		if kind != '*' {
			return bad("not an array of entries")
		}
	case depth == d+1: // an entry: [id, fields]
		if kind != '*' || n != 2 {
			return bad("not an entry")
		}
		*e = streamEntry{}
	case depth == d+2 && index == 0: // the entry's id
		if kind != '$' || data == nil {
			return bad("not an entry id")
		}
		e.id = string(data)
	case depth == d+2: // its fields; XREAD never returns a deleted entry's null
		if kind != '*' || n%2 != 0 {
			return bad("not a list of fields")
		}
		e.pairs = n / 2
	case depth == d+3: // a field name or value
		if kind != '$' {
			return bad("not a field")
		}
		if n > e.largest {
			e.largest, e.largestName = n, index%2 == 0
		}
		switch {
		case index == 0 && data != nil:
			e.field = string(data)
		case index == 1 && data != nil && e.field != "":
			e.value, e.kept = string(data), true
		}
	default:
		return bad("an element")
	}
	if aggregate {
		count := n
		if kind == '%' {
			count = 2 * n
		}
		if count > 0 {
			x.stack = append(x.stack, frame{left: count})
			return nil
		}
	}
	return x.complete()
}

// complete records that the element in the current place is complete,
// and so are the aggregates it completes, handing on each entry that
// ends.
func (x *xreader) complete() error {
	for {
		d := len(x.stack)
		if d == 0 {
			x.done = true
			return nil
		}
		f := &x.stack[d-1]
		f.index++
		f.left--
		if f.left > 0 {
			return nil
		}
		x.stack = x.stack[:d-1]
		if d-1 == x.entries+1 { // an entry has ended
			x.n++
			if x.onEntry != nil {
				x.onEntry(&x.entry)
			}
			x.entry = streamEntry{}
		}
	}
}
