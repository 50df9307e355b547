package store

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
)

// replicaEnv is an env on the private primary of DATABASE_PRIMARY_URL,
// with a pool on its streaming replica.
type replicaEnv struct {
	*env
	primaryURL, replicaURL string
	replica                *pgxpool.Pool
}

func newReplicaEnv(t testing.TB) *replicaEnv {
	t.Helper()
	primary, replica := testenv.ReplicaURLs(t)
	useURL(t, primary)
	e := &replicaEnv{env: newEnv(t), primaryURL: primary, replicaURL: replica}
	// No ping: a hot standby may cancel a connection being set up when it
	// conflicts with what it replays, and a Replica reads around a
	// replica that fails, as the tests expect of it.
	pool, err := pgxpool.NewWithConfig(context.Background(), testenv.PoolConfigFor(t, replica, e.app+"_replica", ""))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	e.replica = pool
	return e
}

// replicaOf returns a Replica reading e's replica for s's node, with a
// short MaxWait so that the tests do not wait long for a paused replay.
func (e *replicaEnv) replicaOf(t testing.TB, s *Store) *Replica {
	t.Helper()
	r, err := NewReplica(s.pool, e.replica, &ReplicaOptions{MaxWait: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// replicaNode returns a cache of the items table on the env's bus that
// loads through r, and r's Store-side twin: a Table writing through s.
func (e *replicaEnv) replicaNode(t testing.TB, s *Store, r *Replica, capacity, shards int) *Table[string, item] {
	t.Helper()
	c, err := cache.New("items", capacity, ReplicaLoader[string](r, `SELECT id, value, version FROM `+e.table+` WHERE id = $1`, pgx.RowToStructByName[item]),
		&cache.Options[string, item]{
			Bus:     e.bus,
			Shards:  shards,
			Version: func(it item) int64 { return it.Version },
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return NewTable(s, c, nil)
}

// TestReplicaLag guards DESIGN race 10 against a real streaming replica
// whose replay is paused: node A writes, the invalidation reaches node B at
// once, and B's replica has not replayed the write. Without the position
// the invalidation carries (or with a loader that ignored
// cache.RequiredPosition), B's next load reads the replica, caches the row
// the write replaced, and serves it until its TTL: G3 broken silently.
// Now B reads the primary after waiting MaxWait for the replica, and never
// caches the old row; once the replay resumes, B's loads go to the
// replica again.
func TestReplicaLag(t *testing.T) {
	e := newReplicaEnv(t)
	ctx := context.Background()
	sA, sB := e.store(nil), e.store(nil)
	a := NewTable(sA, e.node(sA), nil)
	r := e.replicaOf(t, sB)
	b := e.replicaNode(t, sB, r, 1000, 0)
	get := func(node *Table[string, item], id string) item {
		t.Helper()
		it, err := node.Get(ctx, id)
		if err != nil {
			t.Fatalf("Get(%s): %v", id, err)
		}
		return it
	}

	if _, err := a.Update(ctx, "k", e.put("k", "v1")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Update(ctx, "first", e.put("first", "f")); err != nil {
		t.Fatal(err)
	}
	if it := get(b, "first"); it.Value != "f" { // a new cache reads the primary
		t.Fatalf("B's first read = %+v; want f", it)
	}
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	if it := get(b, "k"); it.Value != "v1" {
		t.Fatalf("B's read of k = %+v; want v1", it)
	}
	if st := r.Stats(); st.ReplicaReads != 1 || st.PrimaryReads != 1 {
		t.Fatalf("B's first reads, the second with the replica caught up: %+v; want one from the primary (a new cache's), one from the replica", st)
	}

	resume := testenv.PauseReplay(t, e.replicaURL)
	for i := 2; i <= 4; i++ {
		want := fmt.Sprintf("v%d", i)
		if _, err := a.Update(ctx, "k", e.put("k", want)); err != nil {
			t.Fatal(err)
		}
		// The invalidation has reached B (the in-process bus delivers
		// before Publish returns); the replica still holds v1.
		for range 3 {
			if it := get(b, "k"); it.Value != want {
				t.Fatalf("B after A wrote %s, replay paused: %+v (stats %+v); want %s", want, it, r.Stats(), want)
			}
		}
	}
	st := r.Stats()
	if st.ReplicaReads != 1 || st.Waits != 3 || st.PrimaryReads != 4 {
		t.Errorf("three writes with the replay paused: %+v; want 3 waits, each ending on the primary", st)
	}
	// The replica is far behind: loads of other keys it has not replayed
	// either go to the primary too, and never cache a missing row.
	if _, err := a.Update(ctx, "new", e.put("new", "n1")); err != nil {
		t.Fatal(err)
	}
	if it := get(b, "new"); it.Value != "n1" {
		t.Fatalf("B's read of a row the paused replica does not have = %+v; want n1", it)
	}

	resume()
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	if _, err := a.Update(ctx, "k", e.put("k", "v5")); err != nil {
		t.Fatal(err)
	}
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	before := r.Stats()
	if it := get(b, "k"); it.Value != "v5" {
		t.Fatalf("B after the replay resumed = %+v; want v5", it)
	}
	if st := r.Stats(); st.ReplicaReads != before.ReplicaReads+1 || st.PrimaryReads != before.PrimaryReads {
		t.Errorf("B's read with the replay resumed: %+v, before %+v; want it served by the replica", st, before)
	}
}

// TestReplicaLagOwnWrite guards G1 after an eviction with a replica: node
// B writes a key through its own Table, the entry is evicted, and B's next
// load must not read the replica that has not replayed B's own commit. The
// cache's guard table remembers the write's position past the eviction.
func TestReplicaLagOwnWrite(t *testing.T) {
	e := newReplicaEnv(t)
	ctx := context.Background()
	s := e.store(nil)
	r := e.replicaOf(t, s)
	b := e.replicaNode(t, s, r, 1, 1) // room for one entry
	if _, err := b.Update(ctx, "k", e.put("k", "v1")); err != nil {
		t.Fatal(err)
	}
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	testenv.PauseReplay(t, e.replicaURL)
	if _, err := b.Update(ctx, "k", e.put("k", "v2")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Update(ctx, "other", e.put("other", "o")); err != nil { // evicts k
		t.Fatal(err)
	}
	if _, err := b.Get(ctx, "other"); err != nil {
		t.Fatal(err)
	}
	if it, err := b.Get(ctx, "k"); err != nil || it.Value != "v2" {
		t.Fatalf("B's own write read back after its eviction, replay paused: %+v, %v (stats %+v); want v2", it, err, r.Stats())
	}
}

// TestReplicaLagCapture guards race 10 for captured outside writes: a
// write by psql or another service is published by the relay with a
// position read after the relay saw the committed outbox row; with the
// replay paused, the reader goes to the primary.
func TestReplicaLagCapture(t *testing.T) {
	e := newReplicaEnv(t)
	ctx := context.Background()
	s := e.store(&Options{RelayPoll: 50 * time.Millisecond})
	e.captureItems(t, s)
	runRelay(t, s)
	r := e.replicaOf(t, s)
	b := e.replicaNode(t, s, r, 1000, 0)
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'v1', 1)`)
	waitFor(t, "the outside insert to be relayed", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	if it, err := b.Get(ctx, "k"); err != nil || it.Value != "v1" {
		t.Fatalf("Get = %+v, %v; want v1", it, err)
	}

	testenv.PauseReplay(t, e.replicaURL)
	e.outsideWrite(t, `UPDATE `+e.table+` SET value = 'v2', version = 2 WHERE id = 'k'`)
	// The entry goes when the relay's invalidation arrives; until then B
	// serves v1 within the bound, as for any outside write.
	waitFor(t, "the outside update to be relayed", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
	for range 3 {
		if it, err := b.Get(ctx, "k"); err != nil || it.Value != "v2" {
			t.Fatalf("B after a relayed outside write, replay paused: %+v, %v (stats %+v); want v2", it, err, r.Stats())
		}
	}
	if st := r.Stats(); st.PrimaryReads == 0 {
		t.Errorf("stats %+v; want the read after the outside write served by the primary", st)
	}
}

// TestReplicaLagMany is TestReplicaLag for batch loads (GetMany through
// ReplicaLoaderMany): a batch must read a source that has reached the
// highest position of its keys, or it caches the rows the writes replaced.
func TestReplicaLagMany(t *testing.T) {
	e := newReplicaEnv(t)
	ctx := context.Background()
	sA, sB := e.store(nil), e.store(nil)
	a := NewTable(sA, e.node(sA), nil)
	r := e.replicaOf(t, sB)
	query := `SELECT id, value, version FROM ` + e.table + ` WHERE id = ANY($1)`
	b, err := cache.New("items", 1000, ReplicaLoader[string](r, `SELECT id, value, version FROM `+e.table+` WHERE id = $1`, pgx.RowToStructByName[item]),
		&cache.Options[string, item]{
			Bus:      e.bus,
			Version:  func(it item) int64 { return it.Version },
			LoadMany: ReplicaLoaderMany(r, query, pgx.RowToStructByName[item], func(it item) string { return it.ID }),
		})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	keys := []string{"k1", "k2", "k3"}
	for _, k := range keys {
		if _, err := a.Update(ctx, k, e.put(k, "v1")); err != nil {
			t.Fatal(err)
		}
	}
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	if m, err := b.GetMany(ctx, keys); err != nil || len(m) != 3 {
		t.Fatalf("GetMany = %v, %v", m, err)
	}
	if st := r.Stats(); st.ReplicaReads != 0 || st.PrimaryReads != 1 {
		t.Fatalf("a new cache's first batch: %+v; want it read from the primary", st)
	}
	testenv.PauseReplay(t, e.replicaURL)
	if _, err := a.Update(ctx, "k2", e.put("k2", "v2")); err != nil {
		t.Fatal(err)
	}
	m, err := b.GetMany(ctx, append(keys, "absent"))
	if err != nil {
		t.Fatal(err)
	}
	if m["k1"].Value != "v1" || m["k2"].Value != "v2" || m["k3"].Value != "v1" || len(m) != 3 {
		t.Fatalf("GetMany after A wrote k2, replay paused = %+v (stats %+v); want k2 at v2", m, r.Stats())
	}
	if it, err := b.Get(ctx, "k2"); err != nil || it.Value != "v2" {
		t.Fatalf("Get(k2) after the batch = %+v, %v; want v2 (the batch must not have cached v1)", it, err)
	}
}

// TestReplicaOfAnotherCluster guards against a misconfigured replica URL:
// a standby of another cluster replays positions that say nothing about
// the primary's, and can look caught up to any of them, so that its rows,
// not the primary's, would be served and cached. The Replica finds the
// system identifiers differ and reads the primary only.
func TestReplicaOfAnotherCluster(t *testing.T) {
	primary, replica := testenv.ReplicaURLs(t)
	e := newEnv(t) // on DATABASE_URL: another cluster than the replica's
	ctx := context.Background()
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'v', 1)`)
	// The same table on the replica's cluster, with another row: what a
	// load would serve from the wrong replica.
	theirs := testenv.Pool(t, testenv.PoolConfigFor(t, primary, e.app+"_theirs", ""))
	for _, sql := range []string{
		`CREATE SCHEMA ` + pgx.Identifier{e.schema}.Sanitize(),
		`CREATE TABLE ` + e.table + ` (id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`,
		`INSERT INTO ` + e.table + ` VALUES ('k', 'theirs', 7)`,
	} {
		if _, err := theirs.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		theirs.Exec(context.Background(), `DROP SCHEMA `+pgx.Identifier{e.schema}.Sanitize()+` CASCADE`)
	})
	testenv.WaitReplayed(t, primary, replica)
	other := testenv.Pool(t, testenv.PoolConfigFor(t, replica, e.app+"_other", ""))
	r, err := NewReplica(e.pool, other, nil)
	if err != nil {
		t.Fatal(err)
	}
	bus := &fakeProofBus{}
	c, err := cache.New("items", 10, ReplicaLoader[string](r, `SELECT id, value, version FROM `+e.table+` WHERE id = $1`, pgx.RowToStructByName[item]),
		&cache.Options[string, item]{Bus: bus})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 {
		if it, err := c.Get(ctx, "k"); err != nil || it.Value != "v" {
			t.Fatalf("Get = %+v, %v; want v from the primary", it, err)
		}
		bus.h.Invalidate([]cache.Invalidation{{Key: "k", Position: uint64(i + 1)}})
	}
	if st := r.Stats(); !st.Unrelated || st.ReplicaReads != 0 || st.PrimaryReads != 3 {
		t.Errorf("stats %+v; want the replica found unrelated and every load on the primary", st)
	}
}

// TestReplicaLagNewNode guards a node that starts, or a cache that is
// created, just after another node's write, while the replica has not
// replayed it: the new cache heard no invalidation of the key, yet must
// not load the row the write replaced from the replica and keep it (no
// invalidation would ever come for it). A new cache's positions are
// unknown, as after a flush: its first load reads the primary.
func TestReplicaLagNewNode(t *testing.T) {
	e := newReplicaEnv(t)
	ctx := context.Background()
	sA, sB := e.store(nil), e.store(nil)
	a := NewTable(sA, e.node(sA), nil)
	if _, err := a.Update(ctx, "k", e.put("k", "v1")); err != nil {
		t.Fatal(err)
	}
	testenv.WaitReplayed(t, e.primaryURL, e.replicaURL)
	testenv.PauseReplay(t, e.replicaURL)
	if _, err := a.Update(ctx, "k", e.put("k", "v2")); err != nil {
		t.Fatal(err)
	}
	r := e.replicaOf(t, sB)
	b := e.replicaNode(t, sB, r, 1000, 0) // starts now
	for range 3 {
		if it, err := b.Get(ctx, "k"); err != nil || it.Value != "v2" {
			t.Fatalf("a new node's read after another node's write, replay paused: %+v, %v (stats %+v); want v2", it, err, r.Stats())
		}
	}
}
