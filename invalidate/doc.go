// Package invalidate carries invalidations between the nodes of a service:
// it implements the [cache.Bus] that keeps every node's [cache.Cache]
// consistent with the source of truth. It knows nothing about SQL.
//
// There are three transports:
//
//   - [PubSub], over Redis pub/sub: the default, and the lowest latency.
//     A node that loses its subscription flushes its caches.
//   - [Streams], over a Redis stream: every node reads the stream from its
//     own position, so a node that loses its connection resumes where it
//     stopped and flushes only if the stream no longer holds its position.
//   - [InProcess], inside one process: for tests and single-node use.
//     Delivery is a function call, so it cannot lose a message and never
//     flushes by itself.
//
// Create one bus per process, share it among every cache of the process
// (each namespace subscribes on the same bus), and close it after them:
//
//	rdb := redis.NewClient(&redis.Options{Addr: "localhost:6379"})
//	bus, err := invalidate.NewPubSub(rdb, nil)
//	if err != nil { ... }
//	defer bus.Close()
//	users, err := cache.New("users", 10_000, loadUser, &cache.Options[int64, User]{Bus: bus})
//
// Settings live in one place each. The staleness bound is the caches'
// ([cache.Options.MaxStaleness]): each cache hands it to the bus when it
// subscribes, and the bus keeps the smallest of its subscriptions'. The
// bus's own settings are [Options], shared by [PubSubOptions] and
// [StreamsOptions]. The bus and the caches need not share a clock: a bus
// reports how old its last proof is ([cache.Subscription.ProofAge]), not
// when it was made.
//
// A publisher that is not a cache, such as the outbox relay of package
// store, calls the bus's own Publish method (PubSub.Publish,
// Streams.Publish, InProcess.Publish), which delivers to this node's
// subscriptions too. Before it acts on what it publishes (the relay, before
// it claims outbox rows: race 17), it asks the bus's Proven method whether
// the link is proven; so can a health check.
//
// Buses are safe for concurrent use. Each Redis bus owns a few goroutines,
// which Close stops and waits for. Closing a bus ends the proof of every
// cache still on it at once.
//
// # Guarantees
//
// A Redis bus upholds the bus's half of G2 and G3 (see package cache):
//
//   - Proofs. The bus proves its link with a round trip through the
//     subscription itself, and a cache serves cached values only until
//     its MaxStaleness after the proof, and nothing cached before the
//     first proof after it subscribed (race 12). Every ProofInterval,
//     PubSub publishes a probe, 16 random bytes, on a channel of its own
//     (the channel's name plus ":proof:" and its NodeID; on a cluster, in
//     the channel's slot), to which it subscribes on the same connection
//     as to the invalidations. Invalidations and probes alike are
//     published by a script that only a master runs, so the channel's one
//     master orders all of them and relays them in that order; when a
//     probe has been read back, every invalidation published before it was
//     sent has been delivered. Only the outstanding probe, byte for byte,
//     received on the subscription it was sent for, proves anything, so a
//     client that may publish on the channel can neither guess a probe nor
//     replay one (see Trust). Streams reads with XREAD BLOCK
//     ProofInterval: a read that returns with fewer entries than it asked
//     for has returned everything added before it was sent.
//   - The staleness bound. The bus keeps the smallest MaxStaleness of its
//     open subscriptions (without one, 1s, or ten ProofIntervals if that
//     is longer): a probe that has not come back within it, or a read that
//     has not returned, ends the link, and [PubSub.Proven] and
//     [Streams.Proven] hold only that long after a proof. Subscribe
//     rejects a MaxStaleness not longer than ProofInterval.
//   - Gaps flush (race 4). Whenever a node may have missed an invalidation
//     it flushes every local subscription, before it reports a newer
//     proof: after every subscription (what was published while the node
//     was not subscribed is lost), the bus's first included, and after
//     Streams' first position marker (a cache may hold a value it wrote
//     through before the bus was listening, which a write published
//     meanwhile overwrote: race 19); after a message it cannot decode; and
//     after a message that does not follow its origin's previous one. For
//     these last two, and for a namespace flush that a publisher asks for,
//     the flush is due rather than done at once: from the moment the node
//     reads the message, the subscriptions concerned (every one, or the
//     namespace's) report no proof and their Handlers are told (LinkLost),
//     so their caches read through and serve nothing they hold; the flush
//     is done before the next proof is recorded, once for all such
//     messages read in between, and at most about twice per
//     ProofInterval. So a flood of them costs reads through to the source
//     and a flush per proof, never a flush per message, and never a
//     skipped flush.
//   - Lost links end the proof at once. The moment a bus notices that its
//     link failed (a connection error, a server-side unsubscribe, a probe
//     that did not come back, a failed read or position check, a position
//     the stream no longer holds), every subscription's ProofAge reports
//     no proof, and then its Handler is told ([cache.Handler.LinkLost]):
//     caches read through from that moment, not MaxStaleness after the
//     last proof, until the bus proves its link again. That is not a
//     flush: Streams resumes from its position and keeps the caches'
//     entries; PubSub flushes when it subscribes again. Stats.LinksLost
//     counts these.
//   - Own messages. A publishing node applies its changes locally before
//     it publishes; [cache.Subscription.Publish] also delivers, before it
//     sends anything, to the other subscriptions of the namespace on the
//     same bus; and the bus ignores the echo of its own messages.
//   - Errors. Publish returns the error of the PUBLISH or XADD that carried
//     the keys to the writer, who falls back on the outbox (race 3); the
//     bus reconnects by itself, with capped exponential backoff and jitter.
//     If Publish's context ends first, Publish returns its error and the
//     keys go out with their batch all the same.
//   - Handlers. A panic in a [cache.Handler] is recovered and counted; the
//     handler is flushed (race 14). If its Flush panics too, its
//     subscription reports no proof until a later Flush succeeds.
//
// # Faults
//
// What each fault does on a node, in the order a node notices them:
//
//   - The subscribed connection is killed (CLIENT KILL, a network error, a
//     server restart): the caches stop serving at once (LinkLost), and
//     there is no proof until the bus has subscribed again; then a flush
//     (Stats.FlushesResubscribe). Publications fail with an error while
//     the server is unreachable.
//   - The link goes silent without closing (a half-open TCP connection, a
//     stalled server or proxy), or the subscription sits where the
//     invalidations do not go (a replica after a failover or a slot move):
//     no probe comes back; the caches bypass themselves once their
//     MaxStaleness has passed since the last proof. A probe that has not
//     come back within the bus's staleness bound makes the bus close the
//     connection (a lost link, as above) and subscribe again
//     (Stats.ProofTimeouts), which flushes. A proof that arrives more than
//     the bound after the previous one flushes even without a
//     resubscription (Stats.FlushesProofTimeout).
//   - The node reads too slowly and Redis disconnects it
//     (client-output-buffer-limit pubsub): as a killed connection.
//   - A malformed message, of an unknown format version, or too large:
//     the caches read through until the next proof, before which they are
//     flushed (Stats.MessagesMalformed, FlushesMalformed, and
//     FlushesCoalesced for those that shared a flush); logged at most once
//     a second.
//   - A message from an origin whose sequence skips, repeats or goes back:
//     the same, counted in Stats.FlushesGap. This catches publications
//     that failed on the way to Redis. The table of origins is bounded;
//     an origin that has sent two messages in sequence stays in it
//     however many made-up origins come by.
//   - Redis Cluster migrates the channel's slot and unsubscribes the node
//     (sunsubscribe) (race 15): a lost link; the bus closes the
//     subscription and subscribes again at the new owner, which flushes.
//   - Streams: an entry that is not a message, or whose fields are larger
//     than a message can be: it is taken for a malformed message (as
//     above). What a read allocates is bounded whatever the stream holds:
//     the reader keeps one entry at a time and passes over any field
//     larger than [MaxMessageSize] unread.
//   - Streams: the stream was trimmed past the node's position (it fell
//     more than MaxLen entries behind), an entry after it was deleted
//     (XDEL), or the stream was lost (a restart without persistence): the
//     node adds a marker entry, flushes (Stats.FlushesTrimmed) and reads on
//     from the marker; its caches read through from the moment it notices.
//     A connection loss or a restart that kept the stream costs no flush:
//     the caches read through from the failed read until the node has read
//     what it missed, and keep their entries. A restart that restores the
//     stream from a snapshot taken after the node's position but before
//     entries it had not read yet loses those entries without trace (only
//     the sequence check of their origin's next message notices): run
//     Redis with appendfsync always, or use PubSub, which flushes on every
//     reconnection.
//
// # Trust
//
// The buses trust the Redis user of the client they are given. Another
// client that may publish on the channel, or write to the stream, can
// make nodes read through to the source and flush, as fast as it sends,
// at the cost of one flush per proof, but cannot make a node serve a
// cached value past MaxStaleness (it cannot forge a proof) or exhaust its
// memory (what a node keeps per origin, per message and per stream read is
// bounded). A client that may write the stream can also delete entries
// before the nodes read them, by deleting the stream and adding back the
// rest: keep the stream's key, like the channels, to the application's
// user with a Redis ACL. The README gives one, with the commands the buses
// send. With value broadcast on ([cache.Options.Codec]) the stakes are
// higher: a message can carry a value, which a node installs as it would
// a value it loaded, so such a client could make nodes serve values of its
// choosing.
//
// # Redis deployments
//
// The buses take a [redis.UniversalClient] the application built, so
// AUTH/ACL, TLS, Sentinel and Cluster come from the client. Both need
// Redis 7.0 or later.
//
//   - *redis.Client: a single server, or Sentinel through
//     redis.NewFailoverClient. After a failover, a subscription left on
//     the old master stops receiving probes unless that server relays them
//     as a replica, and the bus then subscribes again through Sentinel; a
//     publication or a Streams position check that reaches a replica is
//     refused and retried at the master. (Not tested against a real
//     Sentinel.)
//   - *redis.ClusterClient: PubSub uses sharded pub/sub, SSUBSCRIBE and
//     SPUBLISH of the channel and its probe channel, which share a slot (a
//     Channel with a '}' outside a hash tag is rejected); after any loss
//     of the subscription the bus asks the client to reload its slot map
//     before it subscribes again (a resubscription that still reaches the
//     old owner costs one more reconnection and flush). Streams' stream
//     lives in one slot. A ClusterClient that reads from replicas
//     (ReadOnly, RouteByLatency, RouteRandomly) is rejected. The proofs
//     rely on one master at a time running the scripts of the channel's
//     slot, which Redis Cluster ensures outside a network partition (while
//     a slot migrates, the MIGRATING source redirects with ASK every
//     script that names the channel, never a key it holds). A master cut
//     off from the majority goes on serving its side until
//     cluster-node-timeout: a node subscribed there can prove its link
//     while writers publish at the new master, and serves stale values
//     that long.
//   - *redis.Ring is rejected: its shards can disagree about who owns the
//     channel.
//
// What the buses rely on in go-redis and in Redis itself is in
// docs/go-redis.md at the root of the module.
//
// # Batching
//
// Publications share messages by group commit: a publication on an idle
// bus is sent at once, and those that arrive while a message is being sent
// go out together in the next one, one message per namespace (split at
// BatchKeys keys or [MaxMessageSize] bytes). A bus sends one round of
// messages at a time and waits for Redis to acknowledge it before the
// next, so its messages reach Redis in sequence. BatchWindow adds a wait
// for more publications under a burst. Two publications of one key in a
// round merge into the stronger (version 0, else the higher version, with
// that version's value or tombstone, at the higher position).
// BENCHMARKS.md has the figures.
//
// # Values
//
// An [cache.Invalidation] may carry the value its write committed, or a
// tombstone (value broadcast, [cache.Options.Codec]). The buses carry them
// as opaque bytes, at most [cache.MaxValueLen] per key, in format version
// 3 of their messages; a message without one is sent in version 2, which
// nodes of the previous release read. The wire format is described in
// codec.go.
//
// # Observability
//
// Stats returns counters: messages and keys sent and received, proofs,
// reconnections, publish errors, and flushes by cause. The Logger option
// receives reconnections and flushes (Warn) and handler panics (Error).
package invalidate
