// Package stampede benchmarks G5, one load per miss, across nodes: 1,000
// concurrent readers of one cold key on each of 3 in-process nodes, each
// node with its own Postgres pool, Redis client, pub/sub bus and cache,
// loading through store.Loader from a real table. It reports the loads per
// node (1) and per burst (3), next to a naive cache-aside (look up, load on
// a miss, store) on the same nodes and readers in the same run:
//
//	go test -run '^$' -bench . -benchtime=20x ./bench/stampede
//
// It needs Postgres and Redis (DATABASE_URL, REDIS_URL): it skips without
// them, and fails under CI. It works in a schema of its own, which it drops.
package stampede
