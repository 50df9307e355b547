// Package lockguard is a named lock kept in Redis, with fencing tokens. It
// serialises the write path of package store per key across nodes, and
// can guard any other shared resource on its own.
//
// A [Guard] hands out locks; a [Lock] is one acquisition. Each
// acquisition gets a random value that proves ownership to Redis and a
// fencing token ([Lock.Token]) that grows with every acquisition of the
// name. Both types are safe for concurrent use.
//
//	g, err := lockguard.New(rdb, &lockguard.Options{TTL: 10 * time.Second, Watchdog: true})
//	...
//	err = g.WithLock(ctx, "account:42", func(ctx context.Context, l *lockguard.Lock) error {
//		// Read, compute, and write with l.Token(); the resource rejects
//		// the write if it has accepted an equal or greater token.
//		return writeBalance(ctx, 42, newBalance, l.Token())
//	})
//
// # What the lock guarantees, and what it does not
//
// A lock held in a single Redis deployment is an efficiency lock: it keeps
// nodes from doing the same work twice or tripping over each other, and
// usually keeps a read-modify-write to one holder at a time. It cannot, on
// its own, guarantee that two holders never overlap:
//
//   - A holder can pause (garbage collection, CPU starvation, a stopped
//     VM, a slow disk) past its lease. Redis lets the key expire, another
//     node acquires, and the first holder wakes up still believing it
//     holds the lock. No check done before the write closes this window;
//     the pause can fall between the check and the write.
//   - Redis replicates asynchronously. A failover can promote a replica
//     that never saw an acquisition, and hand the lock to a second holder.
//     A restart without fsync-on-every-write loses locks the same way.
//   - Redis expires keys by its wall clock; a clock jump on the server
//     ends leases early.
//
// Safety therefore comes from fencing, which is what upholds G6 (no lost
// updates) and answers race 6 (lock expiry during a pause) of DESIGN.md:
// the holder passes its token to the resource, and the resource accepts a
// write only if the token is greater than every token it has accepted
// before for that name, recording the new one in the same transaction.
// Package store checks and advances the token inside the Postgres
// transaction, so a holder whose lock expired cannot commit; it gets a
// typed error instead. The lock keeps such conflicts rare; the fence makes
// them harmless.
//
// # Fencing tokens
//
// The token comes from a counter in Redis (INCR, in the same script as the
// SET that takes the lock), never from a clock (race 16). The counter has
// no expiry and is never decremented, so tokens of a name strictly
// increase across acquisitions, processes and client restarts. Redis can
// still lose increments: deleting the counter key, FLUSHALL, eviction under
// an allkeys-* maxmemory-policy, a restart without persistence, or a
// failover to a replica that missed the latest INCRs all move it back. Two
// consequences:
//
//   - Two acquisitions can then receive the same token. The resource must
//     therefore require a token strictly greater than the one it stored,
//     not greater or equal, so that at most one of them can write.
//   - Every later token is rejected until the counter passes the stored
//     value again: safe, but writes to that name stall. The resource can
//     read the token it stored and pass it to [Guard.AdvanceFence], after
//     which the next acquisition gets a greater one.
//
// Tokens are exact over the whole int64 range: the scripts read the counter
// as a string of digits and compare such strings, because Lua's numbers
// are doubles that round integers above 2^53. The counter's two ends are
// typed errors, never raw Redis replies, and leave the lock free:
//
//   - At math.MaxInt64 no greater token exists: acquisitions fail with
//     [ErrFenceExhausted] (its documentation says how to reset the fence),
//     and so does AdvanceFence(math.MaxInt64). INCR alone would take 2^63
//     acquisitions to get there, so in practice the counter was set by
//     hand or advanced to a bogus value.
//   - A counter holding anything but a decimal int64 (as INCR reads it)
//     makes acquisitions and AdvanceFence fail with [ErrFenceCorrupt]; it
//     is left for an operator to delete, after which the counter heals as
//     after any loss.
//
// # Why not Redlock
//
// Redlock takes the lock on a majority of independent Redis masters. It
// does not remove the need for fencing: a pause longer than the lease
// defeats it just as it defeats a single-node lock, and its safety relies
// on bounded pauses, network delays and clock drift. It also cannot
// produce a fencing token: counters on independent masters do not agree,
// and taking the largest value from a majority does not order two
// acquisitions whose majorities overlap in a node with a lower count.
// Since correctness has to come from the resource anyway, the extra round
// trips and servers would buy nothing that the fence does not already
// give; a single Redis (with replicas for availability) is enough.
//
// # Failover and restarts
//
// After a failover or restart, a lock may be missing (a second holder can
// acquire; the fence rejects the older one's writes, as above) or its
// lease may have been reset. Scripts are sent again when Redis answers
// NOSCRIPT. A waiter's Acquire sees Redis errors as they come (go-redis
// retries a command a few times first) and returns them; it does not wait
// through an outage.
//
// # Leases, the watchdog, and losing a lock
//
// A lock is held for [Options.TTL] from when its acquisition was sent,
// measured on the local monotonic clock, minus a margin for clock rate and
// Redis's millisecond resolution; Redis keeps the key at least that long.
// [Lock.Extend] moves the lease. With [Options.Watchdog], the lease is
// renewed every TTL/3 until [Lock.Release]. The lock is lost, and
// [Lock.Lost] closed (and the context of [Guard.WithLock] cancelled),
// when a renewal or Extend finds the key gone or holding another value,
// or when the local lease runs out without a successful renewal, for
// example while the holder is cut off from Redis. This happens slightly
// before Redis would let another owner in. A lost lock is never taken back
// silently: Extend returns [ErrNotHeld], and the holder must acquire
// again.
//
// Release compares before it deletes, so a holder whose lease ran out
// cannot delete its successor's lock; it gets [ErrNotHeld].
//
// # Waiting
//
// [Guard.Acquire] polls with capped exponential backoff and jitter, and
// never waits past the holder's remaining lease, which each failed attempt
// reports. A waiting Acquire also listens for the release: a failed
// attempt flags the lock as waited for, and the release of a flagged lock
// PUBLISHes on a channel that the waiter's Guard subscribes to while
// someone waits for that lock (one connection per Guard). Uncontended
// releases publish nothing. A notification only makes a waiter poll early;
// a lost one costs at most the wait until its next poll.
// [Options.DisableNotify] turns this off.
//
// Under contention, notifications hand the lock over as soon as it is
// released, where polling alone leaves it idle until the next poll and
// lets unlucky waiters starve behind backed-off timers: with 8 nodes
// contending for one lock (BenchmarkContended), they raised throughput
// several times and cut the longest wait from seconds to milliseconds.
// They cost Redis commands, since every release wakes every waiter of that
// lock.
//
// # Keys
//
// For lock name N and prefix P ([Options.Prefix]) the keys are P{N} (the
// lock; it holds the random value and expires with the lease), P{N}:fence
// (the counter; it never expires) and P{N}:waiters (the flag; it expires).
// The channel of release notifications is named P{N}. The braces make the
// name the Redis Cluster hash tag, so the keys of one lock share a slot and
// the scripts run on a Cluster; '{', '}' and '%' in names are escaped as
// %7B, %7D and %25, so that every name, whatever its bytes, gets its own
// keys in one slot. Keep other writers out of the prefix: a SET on a lock
// key, or a DEL of a fence counter, breaks the lock.
//
// A name is 1 to [MaxNameLen] (16 KiB) bytes of any kind. Escaping can
// triple it, so each key of a lock is at most len(P) + 3*MaxNameLen + 10
// bytes; longer names would cost Redis memory and bandwidth out of
// proportion, so every method that takes a name refuses an empty or
// longer one with [ErrInvalidName] before it allocates keys or sends
// anything. An error quotes at most the first 64 bytes of the name of its
// lock, followed by the name's length when that is cut short.
//
// # Goroutines and contexts
//
// A lock with a watchdog has one goroutine, which Release stops and waits
// for: no goroutine of a lock outlives Release, and no renewal can follow
// a release that Release sends. (A release that a bus sends for
// [Lock.ReleaseOnPublish] stops renewals without waiting for one in
// flight, which then finds the key gone or another owner's and changes
// nothing.) [Guard.WithLock] starts no goroutine: a lock lost while fn
// runs cancels fn's context from the lease timer or the watchdog. The first Acquire of a Guard that has to wait starts the
// Guard's notification goroutine, with its pub/sub connection;
// [Guard.Close] stops it and waits for it. A Guard that never waited owns
// no goroutine. Contexts bound waits and round trips. Without [redis.Options.ContextTimeoutEnabled], go-redis
// bounds a round trip already on the wire by its read and write timeouts
// rather than by the context; the lease timer does not depend on either.
package lockguard
