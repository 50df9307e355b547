package store

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
)

// silentPublisher is the bus of a node whose Redis link is half-open: its
// publications block until their context ends. proven says whether the bus
// has noticed yet (its last proof is younger than MaxStaleness).
type silentPublisher struct {
	proven  atomic.Bool
	calls   atomic.Int64
	blocked chan struct{} // receives a value each time a Publish starts blocking
}

func newSilentPublisher(proven bool) *silentPublisher {
	p := &silentPublisher{blocked: make(chan struct{}, 100)}
	p.proven.Store(proven)
	return p
}

func (p *silentPublisher) Publish(ctx context.Context, ns string, keys []cache.Invalidation) error {
	p.calls.Add(1)
	select {
	case p.blocked <- struct{}{}:
	default:
	}
	<-ctx.Done()
	return ctx.Err()
}

func (p *silentPublisher) Proven() bool { return p.proven.Load() }

// runRelay runs s's relay until the test ends.
func runRelay(t testing.TB, s *Store) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.RunRelay(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("RunRelay = %v; want context.Canceled", err)
		}
	})
}

// outsideWrite changes the items table as psql would.
func (e *env) outsideWrite(t testing.TB, sql string, args ...any) {
	t.Helper()
	if _, err := e.pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatal(err)
	}
}

// TestRelayWithASilentLinkHoldsNoRows guards issue 11 item 1 (DESIGN race
// 17): node A's Redis link is half-open, so its publications hang. Before
// the fix A's relay claimed a captured row FOR UPDATE, blocked in Publish
// while holding the row lock (10 s), and retried the same row within
// milliseconds of each failure; the healthy relay of node B skipped the
// locked row, and B's cache served the value the outside write replaced
// for as long as the link stayed frozen. Now a relay whose bus is not
// proven claims nothing, and one that has not noticed yet claims rows
// with a short lease, publishes outside any transaction within
// PublishTimeout, and hands the rows back at once when it fails.
func TestRelayWithASilentLinkHoldsNoRows(t *testing.T) {
	for _, tc := range []struct {
		name   string
		proven bool // A's bus has not noticed the silence yet
	}{
		{"unproven", false},
		{"not noticed yet", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := context.Background()
			silent := newSilentPublisher(tc.proven)
			a := e.store(&Options{Publisher: silent, RelayPoll: time.Hour, PublishTimeout: 100 * time.Millisecond})
			b := e.store(&Options{RelayPoll: time.Hour}) // only notifications wake it
			if err := a.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id", VersionColumn: "version"}); err != nil {
				t.Fatal(err)
			}
			reader := e.node(b)
			e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'old', 1)`)
			if err := relayAll(ctx, b); err != nil {
				t.Fatal(err)
			}
			if it, err := reader.Get(ctx, "k"); err != nil || it.Value != "old" {
				t.Fatalf("reader.Get = %+v, %v; want old", it, err)
			}

			runRelay(t, a)
			e.outsideWrite(t, `UPDATE `+e.table+` SET value = 'new', version = 2 WHERE id = 'k'`)
			if tc.proven {
				// Let A's relay take the row first and hang on it.
				select {
				case <-silent.blocked:
				case <-time.After(10 * time.Second):
					t.Fatal("A's relay never tried to publish")
				}
			}
			runRelay(t, b)
			waitFor(t, "the healthy node to see the outside write", func() bool {
				it, err := reader.Get(ctx, "k")
				return err == nil && it.Value == "new"
			})
			if !tc.proven && silent.calls.Load() != 0 {
				t.Errorf("an unproven relay published %d times; want it to claim nothing", silent.calls.Load())
			}
		})
	}
}

// relayAll runs RelayOnce until the outbox has no due rows.
func relayAll(ctx context.Context, s *Store) error {
	for {
		n, err := s.RelayOnce(ctx)
		if err != nil || n == 0 {
			return err
		}
	}
}

// TestPoisonRowsDoNotWedgeTheRelay guards issue 11 item 2 (DESIGN race 18):
// a captured key longer than cache.MaxKeyLen cannot be published; before
// the fix the relay's whole batch rolled back on it, and since the same
// oldest row led every next batch, no outside write and no crashed
// writer's row was relayed again. Now such a row becomes a flush of its
// namespace, and a row whose namespace no cache can have is dropped; both
// are counted, and the other rows go out.
func TestPoisonRowsDoNotWedgeTheRelay(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(&Options{RelayPoll: time.Hour})
	e.captureItems(t, s)
	reader := e.node(e.store(nil))
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'old', 1)`)
	if err := relayAll(ctx, s); err != nil {
		t.Fatal(err)
	}
	if it, err := reader.Get(ctx, "k"); err != nil || it.Value != "old" {
		t.Fatalf("reader.Get = %+v, %v; want old", it, err)
	}
	flushes := reader.Stats().Flushes

	// A long URL as a text key, and a row for a namespace no cache can
	// subscribe to, then an ordinary outside write.
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ($1, 'long', 1)`, strings.Repeat("u", cache.MaxKeyLen+1))
	e.outsideWrite(t, `SELECT `+pgx.Identifier{e.schema}.Sanitize()+`.outbox_put($1, 'x', 0, interval '0')`, []byte(strings.Repeat("n", cache.MaxKeyLen+1)))
	runRelay(t, s)
	e.outsideWrite(t, `UPDATE `+e.table+` SET value = 'new', version = 2 WHERE id = 'k'`)
	waitFor(t, "the ordinary write to be relayed", func() bool {
		it, err := reader.Get(ctx, "k")
		return err == nil && it.Value == "new"
	})
	waitFor(t, "the outbox to empty", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
	if got := reader.Stats().Flushes - flushes; got < 1 {
		t.Errorf("the namespace of the over-long key was flushed %d times; want at least 1", got)
	}
	if st := s.Stats(); st.PoisonRows != 2 {
		t.Errorf("PoisonRows = %d; want 2", st.PoisonRows)
	}
}

// TestFailedPublishMakesTheRowDueAtOnce guards issue 11 item 3: a write
// whose publication failed returns nil, so G2 covers it; before the fix
// its outbox row waited for Grace (and the next poll) before any relay
// would publish it, and healthy nodes served the old value meanwhile. Now
// the writer makes the row due at once, and the notification wakes a
// healthy relay.
func TestFailedPublishMakesTheRowDueAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(t *testing.T, e *env, s *Store, c *cache.Cache[string, item]) error
	}{
		{"Update", func(t *testing.T, e *env, s *Store, c *cache.Cache[string, item]) error {
			_, err := NewTable(s, c, nil).Update(context.Background(), "k", e.put("k", "new"))
			return err
		}},
		{"Store.Write", func(t *testing.T, e *env, s *Store, c *cache.Cache[string, item]) error {
			return s.Write(context.Background(), "items", "k", func(ctx context.Context, tx pgx.Tx) error {
				_, err := e.put("k", "new")(ctx, tx)
				return err
			})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			ctx := context.Background()
			writerBus := &failingBus{Bus: e.bus}
			writerPub := &testPublisher{bus: e.bus}
			writer := e.store(&Options{Grace: time.Hour, Publisher: writerPub})
			healthy := e.store(&Options{RelayPoll: time.Hour})
			w, err := cache.New("items", 100, e.loader(writer.pool), &cache.Options[string, item]{Bus: writerBus})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { w.Close() })
			reader := e.node(healthy)
			if _, err := NewTable(writer, w, nil).Update(ctx, "k", e.put("k", "old")); err != nil {
				t.Fatal(err)
			}
			if it, _ := reader.Get(ctx, "k"); it.Value != "old" {
				t.Fatalf("reader.Get = %+v; want old", it)
			}
			runRelay(t, healthy)

			writerBus.setFail(errors.New("link down"))
			writerPub.setFail(errors.New("link down"))
			if err := tc.write(t, e, writer, w); err != nil {
				t.Fatalf("write with the publication failing = %v; want nil (committed)", err)
			}
			waitFor(t, "a healthy relay to publish the write", func() bool {
				it, err := reader.Get(ctx, "k")
				return err == nil && it.Value == "new"
			})
		})
	}
}

// TestListenBackoffResets guards issue 11 item 4: the relay's LISTEN
// connection reconnects after each failure with a growing backoff, which
// must start over once a LISTEN succeeds. Before the fix it never did:
// after about ten terminated backends each reconnection waited 3 to 5 s,
// and outside writes waited for the poll.
func TestListenBackoffResets(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(&Options{RelayPoll: time.Hour})
	runRelay(t, s)
	listener := func() int32 {
		var pid int32
		err := e.pool.QueryRow(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN %'`, e.app).Scan(&pid)
		if err != nil {
			return 0
		}
		return pid
	}
	for i := range 12 {
		var pid int32
		waitFor(t, "the relay to listen", func() bool { pid = listener(); return pid != 0 })
		if _, err := e.pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the relay to listen again", func() bool { p := listener(); return p != 0 && p != pid })
		if n := s.listenFailures.Load(); n > 1 {
			t.Fatalf("after %d terminated LISTEN connections, each followed by a successful LISTEN, the relay counts %d consecutive failures; want at most 1", i+1, n)
		}
	}
}

// TestFailedRelayHandsRowsBack: a relay whose publication failed hands its
// claimed rows back at once, as due as they were (the other relays are
// notified, and OutboxLag keeps counting from when they first became due),
// rather than leaving them leased until the lease ends.
func TestFailedRelayHandsRowsBack(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	silent := newSilentPublisher(true)
	s := e.store(&Options{Publisher: silent, PublishTimeout: time.Second})
	if err := s.Capture(ctx, "items", &TableOptions{Table: e.table, KeyColumn: "id"}); err != nil {
		t.Fatal(err)
	}
	if lag, err := s.OutboxLag(ctx); err != nil || lag != 0 {
		t.Fatalf("OutboxLag of an empty outbox = %v, %v; want 0", lag, err)
	}
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('k', 'v', 1)`)
	time.Sleep(20 * time.Millisecond) // some lag to measure, not a synchronisation
	if _, err := s.RelayOnce(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("RelayOnce through a silent link = %v; want a deadline error", err)
	}
	lag, err := s.OutboxLag(ctx)
	if err != nil || lag < 20*time.Millisecond {
		t.Errorf("OutboxLag after the failed publication = %v, %v; want the row due again, waiting since the write (≥ 20ms)", lag, err)
	}
	if st := s.Stats(); st.Relayed != 0 {
		t.Errorf("Relayed = %d after a failed publication; want 0", st.Relayed)
	}
}

// TestWritesCarryTheirPosition guards the store's part of DESIGN race 10:
// the invalidation of a write through the store, and of a captured
// outside write, names a WAL position at or after its commit, so that
// another node's next load of the key is told to read a source that has
// reached it.
func TestWritesCarryTheirPosition(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	s := e.store(&Options{RelayPoll: time.Hour})
	e.captureItems(t, s)
	runRelay(t, s)
	writer := NewTable(s, e.node(s), nil)
	var mu sync.Mutex
	required := map[string]uint64{}
	reader, err := cache.New("items", 100, func(ctx context.Context, id string) (item, error) {
		pos, _ := cache.RequiredPosition(ctx)
		mu.Lock()
		required[id] = pos
		mu.Unlock()
		return e.loader(s.pool)(ctx, id)
	}, &cache.Options[string, item]{Bus: e.bus, Version: func(it item) int64 { return it.Version }})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	lsn := func() uint64 {
		var p int64
		if err := e.pool.QueryRow(ctx, sqlPosition).Scan(&p); err != nil {
			t.Fatal(err)
		}
		return uint64(p)
	}
	requiredOf := func(id string) uint64 {
		mu.Lock()
		defer mu.Unlock()
		return required[id]
	}

	before := lsn()
	ch, err := writer.Update(ctx, "w", e.put("w", "v"))
	if err != nil {
		t.Fatal(err)
	}
	if ch.Position <= before {
		t.Errorf("Change.Position = %d; want past the position before the write, %d", ch.Position, before)
	}
	if _, err := reader.Get(ctx, "w"); err != nil {
		t.Fatal(err)
	}
	if got := requiredOf("w"); got < ch.Position {
		t.Errorf("another node's load after the write requires %d; want at least the write's %d", got, ch.Position)
	}

	beforeOutside := lsn()
	e.outsideWrite(t, `INSERT INTO `+e.table+` VALUES ('o', 'outside', 1)`)
	waitFor(t, "the outside write to be relayed", func() bool { n, err := s.Pending(ctx); return err == nil && n == 0 })
	if _, err := reader.Get(ctx, "o"); err != nil {
		t.Fatal(err)
	}
	if got := requiredOf("o"); got <= beforeOutside {
		t.Errorf("a load after a relayed outside write requires %d; want a position past %d, before the write", got, beforeOutside)
	}
}
