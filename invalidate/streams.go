package invalidate

import (
	"cmp"
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/piggyback"
)

// Streams is a [cache.Bus] over a Redis stream: publications are XADDed
// to one stream, which every node reads with XREAD BLOCK from its own
// position. A node that loses its connection resumes where it stopped and
// flushes only if the stream no longer holds its position. Latency is a
// little higher than [PubSub]'s, and every node reads every entry. See the
// package documentation for the guarantees and the faults it survives.
//
// Create one Streams per process, pass it to every [cache.Cache], and close
// it after them. It is safe for concurrent use.
type Streams struct {
	hub     *hub
	client  redis.UniversalClient // publishes
	reader  redis.UniversalClient // reads; see readerClient
	cluster *redis.ClusterClient  // reader, if it is one
	owned   bool                  // reader was made by NewStreams; run closes it
	key     string

	xr xreader // parses the reader's XREAD replies; belongs to the reader goroutine
}

var _ cache.Bus = (*Streams)(nil)

const (
	// streamReadCount is the COUNT of each XREAD. A read that returns that
	// many entries may have left more behind, so it proves nothing.
	streamReadCount = 256

	fieldMessage = "m" // an entry's encoded message
	fieldMarker  = "j" // a reader's position marker (its node id)
)

// holdsScript reports whether the stream still holds the entry ARGV[1],
// and the stream's max-deleted-entry-id. Trimming removes entries from the
// head only, so while the entry is there, every entry after it is there
// too, except those removed by XDEL, which max-deleted-entry-id reveals
// (trimming does not update it).
//
// The #!lua line (Redis 7) declares a script that may write, which a
// replica refuses: a reader whose connection ended up on a replica gets no
// proof from it, and its next connection goes to the master. The XREAD
// before the check ran on the same connection, so a read from a lagging
// replica is never taken for a proof. See docs/go-redis.md ("Streams",
// "Redis") for the facts this relies on.
var holdsScript = redis.NewScript(`#!lua
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return {0, ''}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then
    return {1, info[i + 1]}
  end
end
return {1, ''}
`)

// NewStreams returns a bus that adds its publications to one Redis stream
// through client and reads the stream from its own position, and starts
// its goroutines. It does not wait for Redis: subscriptions stay unproven,
// and their caches bypass themselves, until the first read returns.
//
// client may be a *redis.Client (single server or Sentinel) or a
// *redis.ClusterClient (the stream lives in one slot). NewStreams returns
// an error for which errors.Is(err, ErrInvalidOptions) is true for a nil
// client, a *redis.Ring, a ClusterClient that reads from replicas, or
// unusable options.
func NewStreams(client redis.UniversalClient, opts *StreamsOptions) (*Streams, error) {
	if _, err := checkClient(client); err != nil {
		return nil, err
	}
	cfg, err := opts.config()
	if err != nil {
		return nil, err
	}
	b := &Streams{client: client, key: cfg.name}
	b.reader, b.owned = readerClient(client)
	b.cluster, _ = b.reader.(*redis.ClusterClient)
	b.hub = newHub(cfg, b)
	b.hub.start()
	return b, nil
}

// Subscribe registers h for the invalidations of namespace published by
// other nodes and by the other subscriptions of this Streams, for a cache
// whose staleness bound is maxStaleness; the bus keeps the smallest bound
// of its subscriptions (see [StreamsOptions.ProofInterval]). The returned
// Subscription reports no proof until a read of the stream started after
// this call has returned. Subscribe returns ErrClosed after Close, and an
// error for which errors.Is(err, cache.ErrInvalidOptions) is true for a
// maxStaleness not longer than ProofInterval.
func (b *Streams) Subscribe(namespace string, h cache.Handler, maxStaleness time.Duration) (cache.Subscription, error) {
	return b.hub.subscribe(namespace, h, maxStaleness)
}

// Publish announces that keys of namespace changed to every node, this one
// included; see [PubSub.Publish].
func (b *Streams) Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error {
	return b.hub.publish(ctx, nil, namespace, keys)
}

// Stats returns a snapshot of the counters.
func (b *Streams) Stats() Stats { return b.hub.stats.snapshot() }

// Proven reports whether the bus's link was proven within its staleness
// bound and has not been detected lost since; see [PubSub.Proven]. It is
// false before the first read of the stream, from the moment a read, a
// marker or a position check fails, or the stream no longer holds the
// reader's position, until the next read that proves the link, once the
// bound has passed since the last proof (a silent link), and after Close.
func (b *Streams) Proven() bool { return b.hub.proven() }

// Close stops every goroutine of the bus and waits for them (a read in
// progress ends by its deadline, the bus's staleness bound at most; a
// publication in progress by the client's timeouts), and fails pending and
// later publications with ErrClosed. It does not close the client.
// Subscriptions report no proof afterwards. It is safe to call more than
// once and always returns nil.
func (b *Streams) Close() error {
	b.hub.close()
	return nil
}

// xadd adds an entry of one field to the stream through p.
func (b *Streams) xadd(ctx context.Context, p redis.Cmdable, field string, value any) *redis.StringCmd {
	return p.XAdd(ctx, &redis.XAddArgs{Stream: b.key, MaxLen: b.hub.cfg.maxLen, Approx: true, Values: []any{field, value}})
}

// send implements transport: it adds msgs to the stream in order, with one
// XADD, or a pipeline on one connection, which Redis executes in order. On
// a single server, riders whose client is the bus's own go in the same
// pipeline, after the XADDs, as with PubSub (see its send for why that
// order, and why the other would do too).
func (b *Streams) send(ctx context.Context, msgs [][]byte, riders []*piggyback.Rider) error {
	if _, cluster := b.client.(*redis.ClusterClient); len(riders) > 0 && !cluster {
		pipe := b.client.Pipeline()
		adds := make([]*redis.StringCmd, len(msgs))
		for i, m := range msgs {
			adds[i] = b.xadd(ctx, pipe, fieldMessage, m)
		}
		finish := piggyback.BoardAll(ctx, riders, b.client, pipe)
		_, _ = pipe.Exec(ctx) // each command carries its own error
		if finish != nil {
			finish()
		}
		for _, c := range adds {
			if err := c.Err(); err != nil {
				return err
			}
		}
		return nil
	}
	if len(msgs) == 1 {
		return b.xadd(ctx, b.client, fieldMessage, msgs[0]).Err()
	}
	_, err := b.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, m := range msgs {
			b.xadd(ctx, p, fieldMessage, m)
		}
		return nil
	})
	return err
}

// run implements transport: it runs the reader until ctx ends, then
// closes the reader's client if NewStreams made it.
func (b *Streams) run(ctx context.Context) {
	b.readLoop(ctx)
	if b.owned {
		_ = b.reader.Close()
	}
}

// readLoop is the reader goroutine. It keeps two positions: pos, the last
// entry read, and anchor, an entry that was still in the stream after
// everything up to it had been read. Before a read may count as a proof,
// the stream must still hold anchor, which shows that nothing after anchor
// was trimmed before that read. When the stream no longer holds it, the
// loop adds a marker entry, flushes, and reads on from the marker.
func (b *Streams) readLoop(ctx context.Context) {
	var (
		pos, anchor string // "" until the first marker is added
		first       = true
		attempt     int
	)
	fail := func(what string, err error) bool {
		if ctx.Err() != nil {
			return false
		}
		// Entries are added meanwhile that this node has not read: end
		// the proof now. No flush: the next read resumes from pos.
		b.hub.linkLost()
		ok := b.hub.retry(ctx, attempt, "stream "+what+" failed", err)
		attempt++
		return ok
	}
	for {
		if anchor == "" {
			// The marker is added before the flush: whatever was added
			// before the marker, and is now skipped, comes from writes that
			// committed before the flush, so a load after the flush sees
			// them. The first pass flushes too (race 19): nothing was
			// loaded into a cache without a proof, but a local write may
			// have installed a value that an entry before the marker,
			// never to be read here, overwrote.
			mctx, cancel := context.WithTimeout(ctx, b.hub.maxStaleness())
			id, err := b.xadd(mctx, b.reader, fieldMarker, b.hub.cfg.node().String()).Result()
			cancel()
			if err != nil {
				if !fail("marker", err) {
					return
				}
				continue
			}
			if first {
				b.hub.flushAll(causeFirstSubscription)
			} else {
				b.hub.flushAll(causeTrimmed)
			}
			first = false
			pos, anchor = id, id
		}
		sentAt := b.hub.now()
		// A read that does not return within the staleness bound is
		// abandoned, and its connection with it: the link is silent (race
		// 5). Entries delivered before a read fails stay delivered: pos
		// has moved past them.
		rctx, cancel := context.WithTimeout(ctx, b.hub.maxStaleness())
		n, err := b.read(rctx, &pos)
		cancel()
		if err != nil {
			if b.cluster != nil {
				// As PubSub does before it subscribes again: after a
				// failover or a slot move that the read did not follow
				// (an UNBLOCKED reply, a timeout), the client's slot map
				// may be out of date.
				b.cluster.ReloadState(ctx)
			}
			if !fail("read", err) {
				return
			}
			continue
		}
		if n == streamReadCount {
			continue // there may be more: read on before proving
		}
		ok, err := b.holds(ctx, anchor)
		if err != nil {
			if !fail("position check", err) {
				return
			}
			continue
		}
		if !ok {
			// Entries this node has not read are gone: end the proof now,
			// not after the marker's round trip (or its retries), and
			// flush once the marker is in.
			b.hub.log.Warn("invalidate: the stream no longer holds this node's position", "position", anchor)
			b.hub.linkLost()
			anchor = ""
			continue
		}
		// The stream held anchor after the read, so it held every entry
		// after anchor before the read; the read returned fewer than COUNT
		// entries, so it returned all of them up to the moment Redis ran
		// it, which was after sentAt.
		anchor = pos
		attempt = 0
		b.hub.prove(sentAt, false)
	}
}

// read reads the stream after *pos, with XREAD BLOCK ProofInterval, and
// delivers the entries as they come off the socket, moving *pos past each.
// It returns the number of entries read.
//
// What one read allocates is bounded, whatever the stream holds: the
// reply is not read whole but parsed as it streams (see xreader), one
// entry at a time, and a field name or value larger than a message can
// be is passed over and the entry taken for a malformed message. So a
// client that writes a huge entry to the stream, or many, costs this node
// a flush and the time to skip the bytes, not the memory to hold them.
func (b *Streams) read(ctx context.Context, pos *string) (int, error) {
	b.xr.maxValue = MaxMessageSize
	b.xr.onEntry = func(e *streamEntry) {
		b.entry(e)
		*pos = e.id
	}
	b.xr.reset()
	block := max(b.hub.cfg.ProofInterval.Milliseconds(), 1) // BLOCK 0 would wait for ever
	cmd := redis.NewRawWriteToCmd(ctx, &b.xr, "xread", "count", streamReadCount, "block", block, "streams", b.key, *pos)
	err := b.reader.Process(ctx, cmd)
	n, rerr := b.xr.result()
	if err == nil {
		err = rerr
	}
	return n, err
}

// entry delivers one stream entry.
func (b *Streams) entry(e *streamEntry) {
	switch {
	case e.pairs == 1 && e.kept && e.field == fieldMessage:
		b.hub.receive(e.value)
	case e.pairs == 1 && e.kept && e.field == fieldMarker:
		// a reader's position marker
	case e.largest > MaxMessageSize:
		// not read: malformed, so flush
		b.hub.reject(fmt.Errorf("%w: stream entry %s has a field of %d bytes", errMalformed, e.id, e.largest), e.largest)
	default:
		// not ours: malformed, so flush
		b.hub.reject(fmt.Errorf("%w: stream entry %s has %d fields, the first %q", errMalformed, e.id, e.pairs, truncate(e.field)), e.largest)
	}
}

// truncate shortens a field name for a log line.
func truncate(s string) string {
	if len(s) > 16 {
		return s[:16] + "…"
	}
	return s
}

// holds reports whether the stream still holds id and no entry after it
// was deleted. The check takes the bus's staleness bound at most.
func (b *Streams) holds(ctx context.Context, id string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, b.hub.maxStaleness())
	defer cancel()
	res, err := holdsScript.Run(ctx, b.reader, []string{b.key}, id).Slice()
	if err != nil {
		return false, err
	}
	if len(res) != 2 {
		return false, fmt.Errorf("invalidate: unexpected reply %v to the position check", res)
	}
	if found, _ := res[0].(int64); found == 0 {
		return false, nil
	}
	deleted, _ := res[1].(string)
	if deleted == "" {
		return true, nil
	}
	return compareIDs(deleted, id) <= 0, nil
}

// compareIDs compares two stream ids ("ms-seq"). An unparsable id compares
// greater, so that doubt ends in a flush.
func compareIDs(a, b string) int {
	pa, okA := parseID(a)
	pb, okB := parseID(b)
	switch {
	case !okA:
		return 1
	case !okB:
		return -1
	case pa[0] != pb[0]:
		return cmp.Compare(pa[0], pb[0])
	default:
		return cmp.Compare(pa[1], pb[1])
	}
}

func parseID(id string) ([2]uint64, bool) {
	ms, seq, ok := strings.Cut(id, "-")
	if !ok {
		return [2]uint64{}, false
	}
	a, err1 := strconv.ParseUint(ms, 10, 64)
	b, err2 := strconv.ParseUint(seq, 10, 64)
	return [2]uint64{a, b}, err1 == nil && err2 == nil
}

// readerClient returns the client the reader goroutine uses, and whether
// it made it. Every command of the reader carries a deadline, the bus's
// staleness bound, which the socket must honour, or a silent link would
// hold a blocked XREAD, and Close, for its BLOCK time plus 10s. So for a
// *redis.Client or *redis.ClusterClient the reader gets a client of its
// own: one connection (per node), the user's options (address, Sentinel,
// TLS, credentials), ContextTimeoutEnabled and no ReadTimeout but the
// context's, without the client-side cache and push processor that a
// second client must not share. Other implementations are used as they
// are. docs/go-redis.md ("Streams") says why each option is set.
func readerClient(client redis.UniversalClient) (redis.UniversalClient, bool) {
	switch c := client.(type) {
	case *redis.Client:
		opt := *c.Options()
		if opt.MaintNotificationsConfig != nil {
			mn := *opt.MaintNotificationsConfig
			opt.MaintNotificationsConfig = &mn
		}
		opt.PushNotificationProcessor = nil
		opt.ClientSideCache, opt.ClientSideCacheConfig = nil, nil
		opt.AutoPipelineOptions = nil
		opt.ContextTimeoutEnabled, opt.ReadTimeout = true, -1
		opt.PoolSize, opt.MinIdleConns, opt.MaxIdleConns, opt.MaxActiveConns = 1, 0, 0, 0
		return redis.NewClient(&opt), true
	case *redis.ClusterClient:
		opt := *c.Options()
		if opt.MaintNotificationsConfig != nil {
			mn := *opt.MaintNotificationsConfig
			opt.MaintNotificationsConfig = &mn
		}
		opt.PushNotificationProcessor = nil
		opt.AutoPipelineOptions = nil
		opt.ContextTimeoutEnabled, opt.ReadTimeout = true, -1
		opt.PoolSize, opt.MinIdleConns, opt.MaxIdleConns, opt.MaxActiveConns = 1, 0, 0, 0
		return redis.NewClusterClient(&opt), true
	}
	return client, false
}
