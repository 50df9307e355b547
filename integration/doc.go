// Package integration is the end-to-end suite of coherent: it runs several
// processes of examples/webapp against real Postgres and Redis, drives
// concurrent reads and writes through their HTTP API, injects faults,
// records every operation and checks the history against the guarantees of
// the design (G1, G2, G3, G4, G6). It holds no library code; its only
// non-test file is the history checker, history.go.
//
// # Running it
//
//	go test -race -count=1 ./integration/...
//
// TestMain builds examples/webapp once (with -race when the tests run with
// -race, and the processes run with GORACE=halt_on_error=1, so that a data
// race in the library under a fault stops its node and fails the test).
// Postgres and Redis come from DATABASE_URL and REDIS_URL, else the local
// defaults, else containers started with testcontainers-go when a Docker
// engine answers; without them the tests skip, or fail when CI is set. The
// shared Redis is used by other packages' tests at the same time, so faults
// that would disturb them run against a private redis-server on a free port
// (Redis restarts, CLIENT KILL TYPE pubsub in the chaos test; without a
// redis-server binary those tests skip, or fail under CI), and on the shared
// one the suite closes only its own nodes' connections (CLIENT KILL ID).
//
// Every test has a schema of its own (the items table, through a
// search_path parameter of the nodes' database URL, and the library's
// tables), a Redis key prefix of its own, and its own node names, which name
// the nodes' Postgres and Redis connections (coherent-webapp-<id>-n1, …);
// faults aimed at connections select them by those names. Processes,
// schemas and keys are removed at the end of the test. When a test fails it
// prints the offending slices of the history and the end of each node's
// log, and keeps the full history and logs in a directory it names (set
// COHERENT_IT_KEEP=1 to keep them when it passes too).
//
// The whole suite takes about 90 seconds on a 2-core machine. A long chaos
// run is behind a flag:
//
//	go test -race -timeout 30m -run TestSoak ./integration/ -soak -soak.duration=5m
//
// # Histories
//
// Each operation is recorded with its node, key, argument, start and end
// (on the test's monotonic clock, taken before the request is sent and
// after its response is read, so the server's own interval lies inside),
// its outcome and the item it returned. A write is acknowledged (200), failed
// (400, 409, or rejected by the fence: it certainly did not happen), or of
// unknown outcome (a timeout, a lost connection, any other error: it may have
// committed). Reads that fail are ignored. Outside writes, made with a plain
// Postgres client, are recorded as operations of node "sql".
//
// Versions order a key's states: the webapp's puts and adds, and outside
// writes, increase the row's version by one. A key deleted through the API
// would start again at version 1 if it were written again, so the workloads
// never write such a key again (it is only read afterwards), and outside
// deletes and inserts keep versions growing by giving each deletion a
// version of its own. The checks:
//
//   - G1: a read on a node that starts after a write acknowledged on that
//     node returned sees that write's version or a newer one.
//   - G2: a read on any node that starts later than a write's return plus the
//     scenario's bound sees that version or a newer one. A 404 is credited
//     with the newest delete that could have preceded it.
//   - Versions: no version of a key carries two values, and no two
//     acknowledged writes return the same version (that would be a lost
//     update).
//   - G6: for keys written only by adds of positive deltas, the final value in
//     Postgres lies between the sum of the acknowledged deltas and that sum
//     plus the deltas of adds of unknown outcome; the final version, which
//     counts the adds applied, lies between the two counts likewise.
//   - G3: after the faults and writes stop, every running node becomes healthy
//     and returns, for every key of the test, exactly what Postgres holds (a
//     404 for a missing row), within 20 seconds, well below the webapp's TTLs
//     (10m, 1m for absences), so that expiry cannot pass for convergence.
//
// # Bounds
//
// G2 promises a bound of Δ, the bus's delay, on a healthy link. The checks
// use bounds that hold under the faults of each test, derived from the
// webapp's settings (MaxStaleness 1s, the store's Grace 2s and RelayPoll
// 1s) plus 50ms of slack for scheduling on a shared machine.
// The tests log the longest staleness they observed next to the bound.
//
//   - boundProof, MaxStaleness + slack, whenever every acknowledged write was
//     published before it returned (healthy links, killed subscriptions,
//     crashed nodes, terminated Postgres connections, a stopped reader): a
//     node serves a cached value only while it holds a proof whose probe was
//     sent less than MaxStaleness ago, and a probe sent after a publication
//     comes back after it.
//   - boundCapture, RelayPoll + MaxStaleness + slack, for outside writes: the
//     relay, woken by NOTIFY or polling, publishes them.
//   - boundRelay, Grace + RelayPoll + MaxStaleness + slack, when an
//     acknowledged write may not have been published (Redis restarts, a
//     node's Redis link stalls, a node stops while it holds a lock): a writer
//     whose publication failed after its commit still succeeds and leaves the
//     invalidation to the outbox relay, after Grace.
//   - boundChaos, boundRelay + RelayPoll + the 1.2s stall, in the chaos test,
//     where a relay may also fail a round or be stopped while it holds rows.
//
// A write that never returned (a crash between commit and publish) obliges
// no read; TestCrashAfterCommit checks separately that its change reaches
// every node within boundRelay of the crash.
package integration
