package invalidate

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate/invalidatetest"
)

// rawReply returns the raw reply of a command, as RawWriteToCmd streams
// it to an xreader.
func rawReply(t *testing.T, c *redis.Client, args ...any) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := c.Process(context.Background(), redis.NewRawWriteToCmd(context.Background(), &buf, args...)); err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return buf.Bytes()
}

// feed writes reply to a new xreader in pieces of size bytes and returns
// the entries it handed on and its result, or the error of a Write.
func feed(reply []byte, size, maxValue int) ([]streamEntry, int, error) {
	var got []streamEntry
	x := &xreader{maxValue: maxValue, onEntry: func(e *streamEntry) { got = append(got, *e) }}
	x.reset()
	for p := reply; len(p) > 0; {
		k := min(size, len(p))
		n, err := x.Write(p[:k])
		if err != nil {
			return got, x.n, err
		}
		if n != k {
			return got, x.n, errors.New("short write without an error")
		}
		p = p[k:]
	}
	n, err := x.result()
	return got, n, err
}

// TestXReaderRealReplies guards the parser that keeps a Streams node from
// reading hostile entries whole: it must read what Redis really sends, in
// RESP2 and RESP3, however go-redis cuts it into Writes, keep the first
// field of each entry only up to its limits, and report null and error
// replies.
func TestXReaderRealReplies(t *testing.T) {
	t.Parallel()
	for _, protocol := range []int{2, 3} {
		t.Run("RESP"+itoa(protocol), func(t *testing.T) {
			t.Parallel()
			c := newClient(t, func(o *redis.Options) { o.Protocol = protocol })
			key := streamKey(t, c)
			ctx := context.Background()
			big := strings.Repeat("v", 100)
			entries := [][]any{
				{fieldMessage, "hello"},
				{fieldMarker, "node"},
				{fieldMessage, big},                        // over a maxValue of 99
				{strings.Repeat("n", maxFieldName+1), "x"}, // a long name
				{fieldMessage, "a", "b", "c"},              // two fields
			}
			var ids []string
			for _, e := range entries {
				id, err := c.XAdd(ctx, &redis.XAddArgs{Stream: key, Values: e}).Result()
				if err != nil {
					t.Fatal(err)
				}
				ids = append(ids, id)
			}
			reply := rawReply(t, c, "xread", "count", 10, "streams", key, "0")
			want := []streamEntry{
				{id: ids[0], pairs: 1, field: fieldMessage, value: "hello", kept: true, largest: 5},
				{id: ids[1], pairs: 1, field: fieldMarker, value: "node", kept: true, largest: 4},
				{id: ids[2], pairs: 1, field: fieldMessage, largest: 100},
				{id: ids[3], pairs: 1, largest: maxFieldName + 1, largestName: true},
				{id: ids[4], pairs: 2, field: fieldMessage, value: "a", kept: true, largest: 1, largestName: true},
			}
			for _, size := range []int{1, 2, 3, 7, 64, len(reply)} {
				got, n, err := feed(reply, size, 99)
				if err != nil || n != len(want) {
					t.Fatalf("pieces of %d: result = %d, %v; want %d, nil", size, n, err, len(want))
				}
				for i := range want {
					if got[i] != want[i] {
						t.Errorf("pieces of %d: entry %d = %+v; want %+v", size, i, got[i], want[i])
					}
				}
			}

			// A read that times out, and one of nothing new.
			for _, args := range [][]any{
				{"xread", "count", 10, "block", 1, "streams", key, "$"},
				{"xread", "count", 10, "streams", key, ids[len(ids)-1]},
			} {
				if got, n, err := feed(rawReply(t, c, args...), 3, 99); err != nil || n != 0 || len(got) != 0 {
					t.Errorf("%v: %d entries, %v; want none, nil", args, n, err)
				}
			}
			// An error reply.
			str := streamKey(t, c)
			if err := c.Set(ctx, str, "x", 0).Err(); err != nil {
				t.Fatal(err)
			}
			wrongType := rawReply(t, c, "xread", "count", 10, "streams", str, "0")
			_, _, err := feed(wrongType, 5, 99)
			var re replyError
			if !errors.As(err, &re) || !strings.HasPrefix(string(re), "WRONGTYPE") {
				t.Errorf("XREAD of a string: error %v; want a WRONGTYPE replyError", err)
			}
			// After an error reply (a ClusterClient answers MOVED and ASK by
			// sending the command again, to the same writer), the next reply
			// is read afresh.
			var got []streamEntry
			x := &xreader{maxValue: 99, onEntry: func(e *streamEntry) { got = append(got, *e) }}
			x.reset()
			if _, err := x.Write(wrongType); !errors.As(err, &re) {
				t.Fatalf("Write(error reply) = %v; want a replyError", err)
			}
			if _, err := x.Write(reply); err != nil {
				t.Fatalf("Write(the reply after an error reply) = %v", err)
			}
			if n, err := x.result(); n != len(want) || err != nil || got[0] != want[0] {
				t.Errorf("the reply after an error reply: %d entries, %v, first %+v; want %d, nil, %+v", n, err, got[0], len(want), want[0])
			}
		})
	}
}

// TestXReaderRejects checks that a reply xreader does not understand, cut
// short, or followed by more, is an error, not a panic or a wrong entry.
func TestXReaderRejects(t *testing.T) {
	t.Parallel()
	for _, reply := range []string{
		"",                         // nothing
		"*1\r\n*2\r\n$1\r\nk\r\n",  // cut short
		"$3\r\nabc\r\n",            // a string at the top
		":1\r\n",                   // a number at the top
		"*1\r\n*3\r\n",             // not a pair
		"*1\r\n*2\r\n:1\r\n*0\r\n", // a number for a key
		"*1\r\n*2\r\n$1\r\nk\r\n*1\r\n*2\r\n$100\r\n" + strings.Repeat("1", 100) + "\r\n*0\r\n", // a long id
		"*1\r\n*2\r\n$1\r\nk\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*1\r\n$1\r\nm\r\n",                     // an odd field list
		"*1\r\n*2\r\n$1\r\nk\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n*0\r\n$1\r\nx\r\n",               // a nested field
		"*-1\r\n*-1\r\n", // two replies
		"*1\r" + strings.Repeat("1", 2000) + "\r\n", // a long line
		"*1\n",   // no CR
		"?1\r\n", // an unknown type
		"$-2\r\n",
	} {
		if got, n, err := feed([]byte(reply), 3, 99); err == nil {
			t.Errorf("%q: %d entries %+v, nil error; want an error", reply, n, got)
		}
	}
}

// FuzzXReader feeds xreader arbitrary replies, cut in two: it must never
// panic, and never keep more than its limits allow.
func FuzzXReader(f *testing.F) {
	f.Add([]byte("*1\r\n*2\r\n$1\r\nk\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nm\r\n$5\r\nhello\r\n"), 7)
	f.Add([]byte("%1\r\n$1\r\nk\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nm\r\n$5\r\nhello\r\n"), 3)
	f.Add([]byte("_\r\n"), 1)
	f.Add([]byte("-ERR x\r\n"), 2)
	f.Fuzz(func(t *testing.T, reply []byte, cut int) {
		const maxValue = 8
		x := &xreader{maxValue: maxValue, onEntry: func(e *streamEntry) {
			if len(e.id) > maxEntryID || len(e.field) > maxFieldName || len(e.value) > maxValue {
				t.Fatalf("kept %d, %d, %d bytes", len(e.id), len(e.field), len(e.value))
			}
		}}
		x.reset()
		cut = min(max(cut, 0), len(reply))
		if _, err := x.Write(reply[:cut]); err == nil {
			_, _ = x.Write(reply[cut:])
		}
		_, _ = x.result()
		if cap(x.bulk) > maxReplyLine+2 || cap(x.line) > 2*maxReplyLine {
			t.Fatalf("buffers grew to %d and %d bytes", cap(x.bulk), cap(x.line))
		}
	})
}

// TestStreamsRESP2 runs the Streams conformance suite over clients that
// speak RESP2, whose XREAD replies differ in shape from RESP3's (the
// default), which the other tests use.
func TestStreamsRESP2(t *testing.T) {
	t.Parallel()
	invalidatetest.Run(t, func(t *testing.T, n int) []cache.Bus {
		key := streamKey(t, newClient(t, nil))
		nodes := make([]cache.Bus, n)
		for i := range nodes {
			nodes[i] = newStreams(t, newClient(t, func(o *redis.Options) { o.Protocol = 2 }), testStreamsOptions(key))
		}
		return nodes
	})
}
