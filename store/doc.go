// Package store is the write path to Postgres (jackc/pgx/v5): lock-guarded,
// fenced write-through with a transactional outbox, optimistic writes,
// change capture for writes that bypass the library, the relay that
// publishes what writers did not, and loader helpers that wire a cache to a
// table. It upholds G1, G3, G4 and G6 of the design together with packages
// cache, invalidate and lockguard. A Store is safe for concurrent use.
//
//	if err := store.Migrate(ctx, pool, ""); err != nil { ... } // explicit, idempotent
//	s, err := store.New(pool, &store.Options{Locks: locks, Publisher: bus})
//	go s.RunRelay(ctx)                                         // on every node
//
//	itemsCache, err := cache.New("items", 100_000,
//		store.Loader[string](pool, `SELECT id, value, version FROM items WHERE id = $1`, pgx.RowToStructByName[Item]),
//		&cache.Options[string, Item]{Bus: bus, Version: func(it Item) int64 { return it.Version }})
//	items := store.NewTable(s, itemsCache, &store.TableOptions{Table: "items", KeyColumn: "id", VersionColumn: "version"})
//	err = items.Capture(ctx) // writes from other clients invalidate too
//
//	it, err := items.Get(ctx, "a")
//	ch, err := items.Update(ctx, "a", func(ctx context.Context, tx pgx.Tx) (cache.Change[Item], error) {
//		rows, _ := tx.Query(ctx, `UPDATE items SET value = $2, version = version + 1 WHERE id = $1 RETURNING *`, "a", "x")
//		it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Item])
//		return cache.Change[Item]{Value: it, Version: it.Version}, err
//	})
//
// A [Table] is the handle a repository layer holds: the Store, the cache of
// the table on this node, and the table's columns. [Store.Write] is the
// write path for code that holds no cache of the namespace.
//
// # The write path
//
// [Table.Update] takes the lockguard lock of the key, begins a transaction,
// checks and advances the lock's fencing token in the table fences (a
// token not greater than the stored one rolls back with a [*FenceError]:
// its holder stalled past its lease and someone else has written since),
// runs the caller's function, upserts an outbox row for the key, and
// commits. Then the writer's cache installs the committed row, the
// invalidation is published on the bus and the outbox row is deleted. The
// lock serialises writers of a key across nodes; the fence makes that
// serialisation safe when a lease runs out, because Postgres, not Redis,
// has the last word.
//
// A lock-guarded write whose function makes one statement costs five
// round trips: the lock's acquisition; BEGIN, with the fence, in one
// simple query (so it works behind poolers in transaction mode, in every
// pgx QueryExecMode); the statement; the outbox upsert pipelined with
// COMMIT; and the publication, with the lock's release in the same
// pipeline when the bus is a Redis bus of package invalidate (PubSub or
// Streams) on the lock guard's own client to one Redis server (lockguard's Lock.ReleaseOnPublish; on a
// Cluster, or with separate clients, the release is a sixth). An
// optimistic write makes the Postgres three and the publication.
//
// [Table.UpdateOptimistic] skips the lock: the function detects a concurrent
// change with a version check ([ExpectRows]) and the write fails with
// [ErrConflict], which [RetryConflicts] retries. Serialization failures and
// deadlocks are reported as ErrConflict too.
//
// # The outbox and the relay
//
// A writer that crashes between commit and publish leaves its outbox row
// behind, due after [Options.Grace]; a writer whose publication fails
// makes its row due at once before it returns. [Store.RunRelay], run on
// every node, claims due rows with a short lease, publishes them outside
// any transaction within [Options.PublishTimeout], and deletes them; a
// relay that cannot publish hands its rows back at once, and one whose
// link is not proven claims nothing, so a partitioned node never keeps
// rows from the healthy ones (DESIGN race 17). A row that no cache can
// hold becomes a flush of its namespace (race 18). The outbox holds at
// most one row per key, so while the bus is down it grows only with the
// number of distinct keys written, and the relay catches up when the bus
// returns; [Store.OutboxLag] tells how long the oldest due row has waited.
// Publishing twice is harmless: invalidations are idempotent.
//
// # Change capture
//
// [Table.Capture] (or [Store.Capture]) installs triggers on a table so that every INSERT,
// UPDATE, DELETE and TRUNCATE from any client records an outbox row that
// the relay publishes at once (woken by NOTIFY): psql sessions, other
// services and migrations invalidate the caches too (G4). Staleness after
// such a write is bounded by the relay's latency, not by the bus's Δ.
// A write through this package records its own versioned row for its
// key, which the trigger skips; every other row its function changes is
// captured. Keys are the key column's text form (see [Store.Capture]).
// Captured writes, and everything else the relay publishes from the
// outbox, are plain invalidations even when the cache broadcasts values
// (cache.Options.Codec): the trigger has no codec, so the caches drop
// those keys and load them again.
//
// # Read replicas
//
// Loads may read a streaming replica without breaking G1–G3 (DESIGN race
// 10). Every invalidation of a committed write carries a WAL position at
// or after its commit: a write through this package reads
// pg_current_wal_insert_lsn() after COMMIT in the same round trip, and the
// relay reads one after it saw a captured row. The cache remembers, per
// key and per flush, the highest position it was told of, this node's own
// writes included, and hands it to the load (cache.RequiredPosition).
// [ReplicaLoader] and [ReplicaLoaderMany], over a [Replica], read the
// replica in one round trip that also reads its pg_last_wal_replay_lsn();
// a replica that has not replayed the required position is polled for up
// to [ReplicaOptions.MaxWait] (default 50ms), and then the primary serves
// the load. When the cache cannot name a position (while it is new, after a
// flush, or while its link is unproven) the primary serves it and reports where it stood,
// so that later loads may use the replica again. A replica that is down or
// fails is read around. [Replica.Stats] counts replica reads, waits,
// primary reads and replica errors. The replica must stream from the
// primary the Store writes: positions of two servers are not comparable.
//
// # Auditing consistency
//
// [Auditor] turns "are the caches stale?" into a number. On any node that
// runs one, it samples cached entries at [AuditOptions.Rate] per second
// ([cache.Cache.Sample]: no lock, no change to the LRU order or the hit
// path), reads each key from the primary through the loader it is given
// (outside the cache, which it never fills; a replica would lag), and
// compares versions ([AuditOptions.Version]) or values
// ([AuditOptions.Equal]). A difference may be a write in flight, so the
// key is read again after [AuditOptions.Recheck] (the cache's MaxStaleness
// plus the relay's delays, 3s, by default); if the very entry sampled is
// still cached ([cache.Cache.Holds]) and still differs, it is an
// inconsistency: counted, logged with its key, versions and age, and
// invalidated on every node ([cache.Cache.Invalidate]). A cached absence
// of a row the primary has counts, and so does a cached row it deleted.
// The primary sees at most Rate reads per second from each auditor,
// re-checks included. [AuditStats] reports the counts, the consistency
// ratio and its nines. In a system that keeps G1–G4 the count stays 0;
// what it finds are writes the caches never heard of (a table without
// capture, a write that skipped it, a bug), which it heals within about
// Recheck of sampling them.
//
// # Pooled deployment
//
// Behind a pooler in transaction mode (pgbouncer's pool_mode =
// transaction) a server connection serves a client for one transaction
// only. Everything in this package keeps its session state inside a
// transaction (SET LOCAL, set_config(…, true), pg_advisory_xact_lock), so
// the write path, the fence, the outbox, the relay's rounds, [Migrate],
// [Store.Capture], the loaders and [Replica] work there, given two
// settings:
//
//   - The pool's statements must not rely on prepared statements kept by
//     a connection: put default_query_exec_mode=exec in its URL
//     (cache_describe and simple_protocol work too). pgx's default,
//     cache_statement, fails with "prepared statement … already exists"
//     or "does not exist"; this package's errors then name the fix. The
//     package cannot tell a pooler from a server, so it rejects no mode.
//   - The relay's LISTEN needs a session: set [Options.ListenConfig] to a
//     direct connection to the primary. Without it the relay finds that
//     its probe notification does not arrive, logs a warning once, and
//     polls every [Options.RelayPoll]; [Stats].RelayListening reports
//     which.
//
// # Limits
//
// The library's tables live in one schema (default "coherent"), created by
// [Migrate], which nodes may run concurrently. Keys are stored as bytea in
// the outbox and hashed for the indexes, so any key the cache accepts fits;
// Postgres text columns cannot hold NUL bytes, which user tables reject.
// The fences table holds one row per key ever written under a lock.
// Capture needs PostgreSQL 14 or later (CREATE OR REPLACE TRIGGER).
package store
