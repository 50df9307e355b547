package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/testenv"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
)

// syncBuffer is a bytes.Buffer for a logger that several goroutines use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// runAuditor runs a's Run until the test ends.
func runAuditor[K comparable, V any](t testing.TB, a *Auditor[K, V]) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Auditor.Run = %v; want context.Canceled", err)
		}
	})
}

func itemVersion(it item) int64 { return it.Version }

// skipCapture makes tx's writes of key in namespace ns invisible to the
// capture triggers, as the store's own writes are (see Capture): an
// outside write that the caches never hear of.
func (e *env) skipCapture(ctx context.Context, tx pgx.Tx, ns, key string) error {
	_, err := tx.Exec(ctx, `SELECT set_config('coherent.skip', $1, true)`, outboxKeyHex(ns, key))
	return err
}

// TestAuditFindsUncapturedWrites guards the auditor's reason to exist: an
// outside write that the caches never hear of (here one that skips the
// capture trigger, as a table without capture or a lost message would)
// leaves nodes serving the replaced row until TTL. The auditor on node A
// must find it, count and log it, and heal it on A and on B. Each case
// first checks that both nodes do serve the stale state, so that the test
// fails without the auditor (or with one that only counts).
func TestAuditFindsUncapturedWrites(t *testing.T) {
	for _, tc := range []struct {
		name string
		seed string // SQL run before the nodes cache the key; "" for none
		// write is the outside write, and want what Postgres then holds.
		write        string
		want         item
		wantFound    bool
		staleFound   bool
		staleVersion int64
	}{
		{
			name:  "update",
			seed:  `INSERT INTO %s VALUES ('k', 'v1', 1)`,
			write: `UPDATE %s SET value = 'v2', version = 2 WHERE id = 'k'`,
			want:  item{ID: "k", Value: "v2", Version: 2}, wantFound: true,
			staleFound: true, staleVersion: 1,
		},
		{
			name:  "insert over a cached absence",
			write: `INSERT INTO %s VALUES ('k', 'new', 1)`,
			want:  item{ID: "k", Value: "new", Version: 1}, wantFound: true,
			staleFound: false,
		},
		{
			name:       "delete of a cached row",
			seed:       `INSERT INTO %s VALUES ('k', 'v1', 1)`,
			write:      `DELETE FROM %s WHERE id = 'k'`,
			wantFound:  false,
			staleFound: true, staleVersion: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := context.Background()
			s := e.store(nil)
			if err := s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"}); err != nil {
				t.Fatal(err)
			}
			runRelay(t, s)
			a, b := e.node(s), e.node(e.store(nil))
			if tc.seed != "" {
				e.outsideWrite(t, fmt.Sprintf(tc.seed, e.table))
				waitFor(t, "the relay", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
			}
			for _, c := range []*cache.Cache[string, item]{a, b} {
				c.Get(ctx, "k")
			}
			err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
				if err := e.skipCapture(ctx, tx, "items", "k"); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, fmt.Sprintf(tc.write, e.table))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if n, _ := s.Pending(ctx); n != 0 {
				t.Fatalf("outbox rows after the uncaptured write = %d; want 0", n)
			}
			// Without the auditor the nodes serve the state the write
			// replaced (the relay had the time to publish, had there
			// been anything to publish).
			time.Sleep(100 * time.Millisecond)
			for name, c := range map[string]*cache.Cache[string, item]{"A": a, "B": b} {
				it, err := c.Get(ctx, "k")
				if found := err == nil; found != tc.staleFound || it.Version != tc.staleVersion {
					t.Fatalf("node %s before the audit: Get(k) = %+v, %v; want the stale state (found %v, version %d)", name, it, err, tc.staleFound, tc.staleVersion)
				}
			}

			var logs syncBuffer
			aud, err := NewAuditor(a, e.loader(e.pool), &AuditOptions[item]{
				Rate: 50, Recheck: 300 * time.Millisecond, Version: itemVersion,
				Logger: slog.New(slog.NewTextHandler(&logs, nil)),
			})
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			runAuditor(t, aud)
			waitFor(t, "the auditor to find the inconsistency", func() bool { return aud.Stats().Inconsistencies > 0 })
			t.Logf("found after %v (Recheck 300ms, a sample every 20ms)", time.Since(start).Round(time.Millisecond))
			for name, c := range map[string]*cache.Cache[string, item]{"A": a, "B": b} {
				it, err := c.Get(ctx, "k")
				if found := err == nil; found != tc.wantFound || (found && it != tc.want) {
					t.Errorf("node %s after the audit: Get(k) = %+v, %v; want %+v (found %v), what Postgres holds", name, it, err, tc.want, tc.wantFound)
				}
			}
			if st := aud.Stats(); st.Inconsistencies != 1 || st.Checked == 0 || st.Consistency() >= 1 {
				t.Errorf("Stats = %+v, Consistency %v; want 1 inconsistency", st, st.Consistency())
			}
			log := logs.String()
			wantLog := []string{"key=k", fmt.Sprintf("cached_found=%v", tc.staleFound), fmt.Sprintf("cached_version=%d", tc.staleVersion),
				fmt.Sprintf("source_found=%v", tc.wantFound), fmt.Sprintf("source_version=%d", tc.want.Version), "age="}
			for _, w := range wantLog {
				if !strings.Contains(log, w) {
					t.Errorf("log lacks %q:\n%s", w, log)
				}
			}
		})
	}
}

// TestAuditWriteInFlightIsNoInconsistency guards against false alarms
// from a write in flight: the auditor samples v1, a write commits v2
// before the source is read, and the invalidation reaches the node only
// after that read. The first comparison differs; the re-check must see
// that the sampled entry is no longer the one cached, and count nothing.
// Without the re-check (counting the first difference), or with a
// re-check that compares the old sample with the source without asking
// Holds, it reports an inconsistency. The control case, where the
// invalidation never comes, must report exactly one.
func TestAuditWriteInFlightIsNoInconsistency(t *testing.T) {
	for _, delivered := range []bool{true, false} {
		t.Run(fmt.Sprintf("invalidation delivered=%v", delivered), func(t *testing.T) {
			ctx := context.Background()
			var mu sync.Mutex
			row := item{ID: "k", Value: "v1", Version: 1}
			load := func(context.Context, string) (item, error) {
				mu.Lock()
				defer mu.Unlock()
				return row, nil
			}
			c, err := cache.New("items", 10, load, &cache.Options[string, item]{Version: itemVersion})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Get(ctx, "k")
			firstRead := make(chan struct{})
			var reads atomic.Int64
			source := func(ctx context.Context, key string) (item, error) {
				if reads.Add(1) == 1 {
					mu.Lock()
					row = item{ID: "k", Value: "v2", Version: 2} // the write commits
					mu.Unlock()
					defer close(firstRead)
				}
				return load(ctx, key)
			}
			aud, err := NewAuditor(c, source, &AuditOptions[item]{Rate: 1000, Recheck: 50 * time.Millisecond, Version: itemVersion})
			if err != nil {
				t.Fatal(err)
			}
			runAuditor(t, aud)
			<-firstRead
			if delivered {
				c.Invalidate(ctx, "k") // the write's invalidation arrives
				if it, _ := c.Get(ctx, "k"); it.Version != 2 {
					t.Fatalf("Get(k) after the invalidation = %+v; want version 2", it)
				}
			}
			waitFor(t, "a re-check", func() bool { return aud.Stats().Rechecks > 0 })
			want := uint64(0)
			if !delivered {
				want = 1
				waitFor(t, "the inconsistency", func() bool { return aud.Stats().Inconsistencies > 0 })
			}
			time.Sleep(100 * time.Millisecond) // more checks and re-checks
			st := aud.Stats()
			if st.Inconsistencies != want || st.Resolved == 0 && delivered {
				t.Errorf("Stats = %+v; want %d inconsistencies (and the first difference resolved)", st, want)
			}
			if it, _ := c.Get(ctx, "k"); it.Version != 2 {
				t.Errorf("Get(k) = %+v; want version 2", it)
			}
		})
	}
}

// auditNode is a node of TestAuditConsistentUnderWrites: its own pool,
// Redis client, pub/sub bus, lock guard, store with its relay, and cache.
type auditNode struct {
	s     *Store
	c     *cache.Cache[string, item]
	items *Table[string, item]
}

func newAuditNode(t *testing.T, e *env) *auditNode {
	t.Helper()
	ropt, err := redis.ParseURL(testenv.RedisURL())
	if err != nil {
		t.Fatalf("REDIS_URL: %v", err)
	}
	rdb := redis.NewClient(ropt)
	t.Cleanup(func() { rdb.Close() })
	bus, err := invalidate.NewPubSub(rdb, &invalidate.PubSubOptions{Channel: e.prefix + "invalidations"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Close() })
	locks, err := lockguard.New(rdb, &lockguard.Options{Prefix: e.prefix + "lock:", TTL: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { locks.Close() })
	s := e.store(&Options{Locks: locks, Publisher: bus})
	c, err := cache.New("items", 1000, e.loader(s.pool), &cache.Options[string, item]{Bus: bus, Version: itemVersion})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() }) // before the bus's Close
	runRelay(t, s)
	waitFor(t, "the bus's first proof", func() bool { return bus.Stats().Proofs > 0 })
	return &auditNode{s: s, c: c, items: NewTable(s, c, &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"})}
}

// TestAuditConsistentUnderWrites guards against false alarms in a busy,
// consistent system: two nodes on a real Redis bus, writes through
// Table.Update on both and captured outside writes, reads on both, a few
// hot keys, and an auditor on each at 500 samples per second with the
// default Recheck. Writes land between a sample and its source read all
// the time; every such difference must be resolved by the re-check, and
// none counted. (Counting the first difference, or re-checking without
// asking Holds, reports hundreds of inconsistencies in this run.)
func TestAuditConsistentUnderWrites(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	nodes := []*auditNode{newAuditNode(t, e), newAuditNode(t, e)}
	if err := nodes[0].items.Capture(ctx); err != nil {
		t.Fatal(err)
	}
	keys := make([]string, 8)
	for i := range keys {
		keys[i] = fmt.Sprintf("k%d", i)
		e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ($1, 'v', 1)`, keys[i])
	}
	keys = append(keys, "never") // a cached absence, inserted by an outside write later
	var auds []*Auditor[string, item]
	for _, n := range nodes {
		a, err := NewAuditor(n.c, e.loader(e.pool), &AuditOptions[item]{Rate: 500, Version: itemVersion})
		if err != nil {
			t.Fatal(err)
		}
		runAuditor(t, a)
		auds = append(auds, a)
	}
	runCtx, stop := context.WithTimeout(ctx, 4*time.Second)
	defer stop()
	var wg sync.WaitGroup
	var writes, outside atomic.Int64
	for i := range 4 {
		n := nodes[i%2]
		wg.Go(func() {
			for runCtx.Err() == nil {
				k := keys[rand.IntN(len(keys)-1)]
				if rand.IntN(3) == 0 {
					if _, err := n.items.Update(runCtx, k, e.put(k, fmt.Sprint(rand.Int()))); err == nil {
						writes.Add(1)
					}
				} else {
					n.c.Get(runCtx, k)
				}
			}
		})
	}
	wg.Go(func() { // outside writes, captured
		for i := 0; runCtx.Err() == nil; i++ {
			k := keys[rand.IntN(len(keys))]
			sql := `INSERT INTO ` + e.table + ` AS t VALUES ($1, 'sql', 1) ON CONFLICT (id) DO UPDATE SET value = 'sql', version = t.version + 1`
			if i%20 == 19 && k == "never" {
				sql = `DELETE FROM ` + e.table + ` WHERE id = $1`
			}
			if _, err := e.pool.Exec(runCtx, sql, k); err == nil {
				outside.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
	wg.Wait()
	// Let every re-check queued during the writes run.
	time.Sleep(auds[0].opts.Recheck + 500*time.Millisecond)
	for i, a := range auds {
		st := a.Stats()
		t.Logf("node %d: %+v; consistency %v, nines %.2f", i, st, st.Consistency(), st.Nines())
		if st.Inconsistencies != 0 {
			t.Errorf("node %d: %d inconsistencies reported in a consistent system", i, st.Inconsistencies)
		}
		if st.Checked < 500 {
			t.Errorf("node %d checked %d entries in 4s at 500/s; want more", i, st.Checked)
		}
	}
	t.Logf("%d writes through the store, %d outside writes", writes.Load(), outside.Load())
	if r := auds[0].Stats().Rechecks + auds[1].Stats().Rechecks; r == 0 {
		t.Errorf("no re-check in 4s of writes: the test exercised no write in flight")
	}
}

// TestAuditOptions: NewAuditor rejects what it cannot use, and fills in
// the defaults.
func TestAuditOptions(t *testing.T) {
	c, err := cache.New("items", 10, func(context.Context, string) (item, error) { return item{}, nil }, &cache.Options[string, item]{MaxStaleness: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := func(context.Context, string) (item, error) { return item{}, nil }
	v := itemVersion
	for name, tc := range map[string]struct {
		c    *cache.Cache[string, item]
		src  cache.LoaderFunc[string, item]
		opts *AuditOptions[item]
	}{
		"nil cache":        {nil, src, &AuditOptions[item]{Version: v}},
		"nil source":       {c, nil, &AuditOptions[item]{Version: v}},
		"nil options":      {c, src, nil},
		"no comparison":    {c, src, &AuditOptions[item]{Rate: 1}},
		"negative rate":    {c, src, &AuditOptions[item]{Rate: -1, Version: v}},
		"NaN rate":         {c, src, &AuditOptions[item]{Rate: math.NaN(), Version: v}},
		"huge rate":        {c, src, &AuditOptions[item]{Rate: 1e6, Version: v}},
		"negative recheck": {c, src, &AuditOptions[item]{Recheck: -1, Version: v}},
		"negative timeout": {c, src, &AuditOptions[item]{Timeout: -1, Version: v}},
	} {
		if _, err := NewAuditor(tc.c, tc.src, tc.opts); !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("NewAuditor(%s) = %v; want ErrInvalidOptions", name, err)
		}
	}
	a, err := NewAuditor(c, src, &AuditOptions[item]{Equal: func(x, y item) bool { return x == y }})
	if err != nil {
		t.Fatal(err)
	}
	if a.opts.Rate != 10 || a.opts.Recheck != 5*time.Second || a.opts.Timeout != 5*time.Second {
		t.Errorf("defaults: Rate %v, Recheck %v, Timeout %v; want 10, 5s (MaxStaleness 2s + 3s), 5s", a.opts.Rate, a.opts.Recheck, a.opts.Timeout)
	}
}

// TestAuditStatsNines pins the figures the webapp exports.
func TestAuditStatsNines(t *testing.T) {
	for _, tc := range []struct {
		st          AuditStats
		consistency float64
		nines       float64
	}{
		{AuditStats{}, 1, 0},
		{AuditStats{Checked: 1000}, 1, 3},
		{AuditStats{Checked: 1000, Inconsistencies: 1}, 0.999, 3},
		{AuditStats{Checked: 100, Inconsistencies: 10}, 0.9, 1},
		{AuditStats{Checked: 10, Inconsistencies: 10}, 0, 0},
	} {
		if got := tc.st.Consistency(); math.Abs(got-tc.consistency) > 1e-12 {
			t.Errorf("%+v.Consistency() = %v; want %v", tc.st, got, tc.consistency)
		}
		if got := tc.st.Nines(); math.Abs(got-tc.nines) > 1e-12 {
			t.Errorf("%+v.Nines() = %v; want %v", tc.st, got, tc.nines)
		}
	}
}

// TestAuditSourceFailures: a source that fails or panics costs the audit
// of that entry, counted as a source error, never the process or a false
// inconsistency.
func TestAuditSourceFailures(t *testing.T) {
	ctx := context.Background()
	c, err := cache.New("items", 10, func(context.Context, string) (item, error) { return item{ID: "k", Version: 1}, nil }, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Get(ctx, "k")
	var calls atomic.Int64
	source := func(context.Context, string) (item, error) {
		if calls.Add(1)%2 == 0 {
			panic("boom")
		}
		return item{}, errors.New("connection refused")
	}
	a, err := NewAuditor(c, source, &AuditOptions[item]{Rate: 1000, Version: itemVersion})
	if err != nil {
		t.Fatal(err)
	}
	runAuditor(t, a)
	waitFor(t, "source errors", func() bool { return a.Stats().SourceErrors >= 10 })
	if st := a.Stats(); st.Checked != 0 || st.Inconsistencies != 0 {
		t.Errorf("Stats = %+v; want nothing checked or found", st)
	}
}
