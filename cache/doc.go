// Package cache is the node-local half of coherent: an in-process LRU cache
// of one namespace of a source of truth (a Postgres table, say), which stays
// consistent with that source while other nodes write to it.
//
// A [Cache] is filled by a loader, on misses, and kept consistent by
// invalidations that travel on a [Bus] (package invalidate has an in-process
// bus and Redis transports). It is safe for concurrent use.
//
//	users, err := cache.New("users", 10_000, loadUser, &cache.Options[int64, User]{
//		Bus: bus, // shared by every cache of the process
//	})
//	u, err := users.Get(ctx, 42)
//	err = users.Update(ctx, 42, func(ctx context.Context) (cache.Change[User], error) {
//		u, err := db.Rename(ctx, 42, "Ada") // commits, and returns the row
//		return cache.Change[User]{Value: u, Version: u.Version}, err
//	})
//
// Over Postgres, package store wraps the cache in a table handle whose
// writes lock, fence and record the change in an outbox.
//
// # Writing
//
// The write side is [Cache.Update], [Cache.Invalidate] and
// [Cache.InvalidateAll]. Update brackets the write itself: it knows when
// the write began, so it installs the committed value on this node whenever
// nothing newer can have reached it, with or without versions, and every
// other node drops its copy. Invalidate drops keys everywhere after a write
// the cache did not run. [Cache.Set] and [Cache.Delete] remain for a change
// that was committed elsewhere and arrives with its version (a change
// stream, a message from another service): use them instead of Update when
// the cache did not run the write, and its version is known. [Cache.EncodeKey]
// gives the text form of a key that the bus, the outbox and lock names use
// (for package store's Store.Write, say), and [Cache.Namespace] names the
// cache in logs and metrics.
//
// # Guarantees
//
// With Δ the bus's propagation delay:
//
//   - G1, read your writes: after Update, Set, Delete or Invalidate returns
//     on a node, every later Get on that node sees the write or a newer one.
//   - G2, bounded staleness: a Get on any node that starts later than Δ
//     after a write returned sees it or a newer one. A node that cannot
//     prove its bus link live and in order stops serving cached values once
//     [Options.MaxStaleness] has passed since its last proof, and reads
//     through to the loader until the link is proven again; if the bus
//     notices that its link failed, the cache stops serving cached values
//     at once ([Handler.LinkLost]) rather than MaxStaleness after the last
//     proof. A new cache serves nothing cached before its first proof.
//   - G3, no permanent staleness: a cache never stores a value that an
//     overlapping invalidation made stale, so once writes stop and the bus
//     has delivered, every node returns what the source holds. TTL is a
//     memory bound and a safety net, never the consistency mechanism.
//   - G5, one load per miss: concurrent misses of a key on a node share one
//     load. The load belongs to no single caller: one caller's cancelled
//     context does not fail it for the others. A panic in the code the load
//     runs (the loader, [Options.LoadMany], [Options.Version],
//     [Options.Weigher], a [LoadTracer]) becomes a [*PanicError] for every
//     waiter, and a call of runtime.Goexit (t.FailNow in a test's loader)
//     an error wrapping [ErrGoexit]; the process survives, no waiter hangs,
//     and nothing of that load is cached.
//
// # How loads and invalidations are ordered
//
// Before a load reads the source it takes a token from a fixed-size table
// of generations, indexed by key hash and kept outside the LRU so that
// eviction cannot erase it. Every invalidation and local write bumps its
// key's generation before dropping or replacing the entry, and every flush
// bumps a global epoch. A load stores its result only if its token is still
// current: the interleaving "load reads the old row; a write commits and its
// invalidation arrives; the load stores the old row" cannot leave the old
// row cached. The singleflight key carries the token too, so a Get that
// starts after an invalidation never joins a load that began before it.
//
// Values may carry versions ([Options.Version], and the version passed to
// Set and Delete). A cached value is never replaced by an older version, an
// invalidation of an older version leaves a newer cached value in place,
// and a write-through of a version older than one already seen for the key
// is dropped rather than installed.
//
// # Value broadcast
//
// With [Options.Codec] (and [Options.Version], which it requires), a write
// through the cache at a known version publishes the committed value, or a
// tombstone for a deletion, instead of only its key, and a cache that
// receives it installs it instead of dropping the key, so that a key every
// node reads costs no load per write on the other nodes. A received value
// is installed only over a live entry of its key whose version is no
// higher: that entry was stored after every change of the key announced
// to this node, so nothing newer has reached it. In every other case (no
// entry, a newer or unversioned invalidation since, a flush) the value is
// a plain invalidation of its version, so G1–G3 rest on the same rules as
// without it. Like every invalidation it bumps the key's guard slot, so a
// load in flight does not store the row it replaced. Values that cannot be
// encoded, or are larger than [Options.MaxBroadcastSize], go out as plain
// invalidations; a value a receiver cannot decode drops its key there.
// [Stats] counts each case. [JSONCodec] is a ready Codec.
//
// # Cost
//
// A hit takes no lock, moves nothing and makes no allocation: it reads the
// monotonic clock and a lock-free index of the shard's entries, marks its
// entry read unless it is marked already, and adds to a counter striped
// across cores; so parallel hits on different cores write no shared cache
// line. Eviction approximates LRU by second chance (CLOCK): the entry at the
// back of its shard's list is evicted unless it was read since it last went
// to the front, and then goes to the front again, unmarked, instead; an
// entry is evicted once it has gone the length of the list without a hit.
// The moves are made by stores, under the shard's lock they take anyway,
// a bounded number per store. The clock is read on every
// lookup, not cached by a ticking goroutine, so that the staleness bound
// holds for reads that start right after the process was stalled.
//
// An entry costs one node, which holds the key and the value and links the
// entry into both the shard's index and its LRU list, and a bucket of the
// index (BENCHMARKS.md has the bytes per entry against golang-lru).
// Memory follows the entries, not the capacity: each shard's index starts
// small and doubles as the shard fills, and a flush shrinks it again, so
// a capacity far above what will ever be held (math.MaxInt, say) costs
// nothing up front. The generation table holds 16 bytes per slot, between
// 1,024 and 65,536 slots depending on capacity; [Stats] reports its size.
//
// # Sampling
//
// [Cache.Sample] hands out live entries picked at random (value, version,
// whether it is a cached absence, age) for audits such as the store
// package's Auditor, which compares them with the source. It reads the
// same lock-free indexes as hits, so it takes no lock, moves nothing in
// the LRU order and counts no hit. [Cache.Holds] then tells whether a
// sampled entry is still the one cached: any write, invalidation, flush,
// eviction, expiry or reload since replaces or removes it.
//
// # Memory held by values
//
// Capacity bounds the number of entries, not the memory their values
// hold: a cache sized for many small values can be filled with large ones.
// [Options.MaxWeight] with [Options.Weigher] adds a budget, in bytes say.
// Each shard holds a share of it and, after every store, evicts from the
// back of its LRU until its entries fit. A value heavier than a shard's
// share would evict the whole shard and still not fit: it is returned to
// its callers but not cached, and counted ([Stats].Oversized). Weights are
// kept under the shard's lock as entries are stored and removed; hits
// neither read nor write them. A cached absence weighs nothing: it holds
// no value, and capacity bounds its fixed cost.
package cache
