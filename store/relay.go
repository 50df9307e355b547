package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/internal/backoff"
)

// RunRelay publishes the outbox rows nobody confirmed: changes recorded by
// capture triggers (at once), changes whose writer's publication failed
// (at once), and changes of writers that crashed between commit and
// publish (after [Options.Grace]).
//
// Run it on every node. A relay claims due rows with a short lease (twice
// [Options.PublishTimeout]) in a statement of its own, publishes them
// outside any transaction, each publication bounded by PublishTimeout, and
// then deletes what it published, unless a newer change of the key
// replaced the row meanwhile. No row lock is held across a publication, so
// a relay whose link has gone silent keeps rows from the others for one
// lease at most; when a publication fails it hands the rows back at once,
// which wakes the other relays, and it backs off. A relay whose Publisher
// is not [Publisher.Proven] claims nothing (DESIGN race 17). A crash
// between publishing and deleting only publishes the rows again, which is
// harmless: invalidations are idempotent.
//
// A row that no cache can hold does not stop the others: a key longer than
// cache.MaxKeyLen is published as a flush of its namespace, and a row
// whose namespace no cache can have is dropped; both are counted in
// [Stats].PoisonRows and logged once per namespace.
//
// A relay wakes on a notification from the outbox, when the next row
// becomes due, and otherwise every [Options.RelayPoll]. Each round claims
// at most [Options.RelayBatch] rows. While the bus is down the rows wait;
// the outbox holds at most one row per key, so it stays bounded by the
// keys written meanwhile, and the relay catches up when the bus returns.
//
// Notifications need a connection that stays the relay's own: the relay
// LISTENs on a connection made with [Options.ListenConfig] if set, else on
// one it holds from the pool. After each LISTEN it sends a probe
// notification through the pool and waits a few seconds for it. Behind a
// pooler in transaction mode the probe never arrives: the relay then logs
// a warning once, polls every RelayPoll, and LISTENs and probes again
// every minute, logging again only when notifications come through.
// [Stats].RelayListening tells which.
//
// RunRelay blocks until ctx ends and then returns ctx.Err(). It returns an
// error at once if the Store has no [Options.Publisher].
func (s *Store) RunRelay(ctx context.Context) error {
	if s.pub == nil {
		return fmt.Errorf("%w: the relay needs a Publisher", ErrInvalidOptions)
	}
	wake := make(chan struct{}, 1)
	listenDone := make(chan struct{})
	go func() {
		defer close(listenDone)
		s.listen(ctx, wake)
	}()
	defer func() { <-listenDone }()
	// While a relay runs, writers hand their outbox confirmations to it.
	confirmDone := make(chan struct{})
	s.relays.Add(1)
	go func() {
		defer close(confirmDone)
		s.confirmLoop(ctx)
	}()
	defer func() {
		s.relays.Add(-1)
		<-confirmDone
	}()

	failures := 0
	unproven, ran := false, false
	for {
		n, next, err := s.relay(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var wait time.Duration
		wakeable := true
		switch {
		case errors.Is(err, ErrUnproven):
			s.relayUnproven.Add(1)
			if !unproven && ran {
				// Not at start-up, when the bus has yet to prove its link.
				s.log.Warn("store: relay paused: the publisher's link is not proven")
			}
			unproven = true
			// Proofs come every ProofInterval; look again soon. A
			// notification changes nothing while the link is unproven.
			wait, wakeable = min(s.poll, unprovenRecheck), false
		case err != nil:
			failures++
			s.relayErrors.Add(1)
			s.log.Warn("store: relay", "err", err)
			// The rows went back to the other relays, and the
			// notification that woke them wakes this one too: ignore
			// it, or a relay with a broken link would take the rows
			// again at once.
			wait, wakeable = backoff.Policy{Min: 10 * time.Millisecond, Max: s.poll}.Wait(failures-1), false
		default:
			if unproven && ran {
				s.log.Info("store: relay resumed")
			}
			failures, unproven, ran = 0, false, true
			if n == s.batch {
				continue // more rows are due
			}
			wait = min(s.poll, next)
		}
		if !sleep(ctx, wait, wakeable, wake) {
			return ctx.Err()
		}
	}
}

// unprovenRecheck is how often a relay whose link is unproven looks again.
const unprovenRecheck = 50 * time.Millisecond

// sleep waits for d, or for a wake-up if wakeable; it reports false if ctx
// ended first.
func sleep(ctx context.Context, d time.Duration, wakeable bool, wake <-chan struct{}) bool {
	if !wakeable {
		wake = nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-wake:
	case <-t.C:
	}
	return true
}

// listenBackoff spaces the relay's attempts to LISTEN.
var listenBackoff = backoff.Policy{Min: 10 * time.Millisecond, Max: 5 * time.Second}

const (
	// defaultProbeWait bounds the wait for the relay's probe notification.
	defaultProbeWait = 3 * time.Second
	// defaultListenRecheck is how long a relay whose probe notification
	// did not arrive polls before it LISTENs and probes again.
	defaultListenRecheck = time.Minute
)

// probePrefix starts the payload of every relay's probe notification. The
// outbox's own notifications carry an empty payload (see the migrations),
// so a listener tells probes apart by the prefix alone, and ignores those
// of other relays without waking its rounds.
const probePrefix = "coherent.probe:"

// Outcomes of the relay's last probe, for Store.probeState.
const (
	probeUnknown int32 = iota
	probeDelivered
	probeLost
)

// listen signals wake on every notification on the outbox's channel until
// ctx ends, reconnecting as needed. The backoff between attempts starts
// over after every LISTEN that succeeded: a connection that worked for a
// while and then broke is a new failure, not the next of a streak. When
// the probe of a LISTEN does not arrive, the relay polls, and LISTENs and
// probes again every listenRecheck.
func (s *Store) listen(ctx context.Context, wake chan<- struct{}) {
	for ctx.Err() == nil {
		delivered, err := s.listenOnce(ctx, wake)
		s.listening.Store(false)
		if ctx.Err() != nil {
			return
		}
		if err == nil && !delivered {
			if !backoff.Sleep(ctx, s.listenRecheck) {
				return
			}
			continue
		}
		failures := s.listenFailures.Add(1)
		s.log.Warn("store: relay listen", "err", err)
		if !backoff.Sleep(ctx, listenBackoff.Wait(int(failures)-1)) {
			return
		}
	}
}

// listenOnce LISTENs on a connection of its own ([Options.ListenConfig])
// or of the pool, and proves with a probe that notifications reach it.
// If they do, it signals wake on every outbox notification until the
// connection fails, and returns delivered true and the error. If the
// probe does not arrive, it returns delivered false and a nil error at
// once.
func (s *Store) listenOnce(ctx context.Context, wake chan<- struct{}) (delivered bool, err error) {
	var conn *pgx.Conn
	if s.listenConfig != nil {
		conn, err = connectListener(ctx, s.listenConfig)
		if err != nil {
			return false, fmt.Errorf("ListenConfig: %w", err)
		}
		defer func() {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			conn.Close(cctx)
			cancel()
		}()
	} else {
		pc, err := s.pool.Acquire(ctx)
		if err != nil {
			return false, err
		}
		defer pc.Release()
		conn = pc.Conn()
	}
	channel := s.schema + ".outbox"
	ident := pgx.Identifier{channel}.Sanitize()
	// Exec without arguments uses the simple protocol, whatever the
	// connection's DefaultQueryExecMode.
	if _, err := conn.Exec(ctx, "LISTEN "+ident); err != nil {
		return false, err
	}
	s.listenFailures.Store(0)
	if s.listenConfig == nil {
		defer func() {
			// Leave the pooled connection as we found it. Behind a pooler
			// in transaction mode, this reaches the server connection that
			// ran LISTEN only if the pooler hands that one out again (as
			// pgbouncer does by default, last in first out): the
			// registration may stay until the pooler closes it, and its
			// notifications go to other clients, which ignore them.
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			conn.Exec(uctx, "UNLISTEN "+ident)
			cancel()
		}()
	}
	// Rows may have become due while nobody listened.
	signal(wake)
	delivered, err = s.probe(ctx, conn, channel, wake)
	if err != nil {
		return false, err
	}
	s.probed(delivered)
	if !delivered {
		return false, nil
	}
	s.listening.Store(true)
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return true, err
		}
		s.notified(n, wake)
	}
}

// notified signals wake for a notification of the outbox; another relay's
// probe wakes nothing.
func (s *Store) notified(n *pgconn.Notification, wake chan<- struct{}) {
	if strings.HasPrefix(n.Payload, probePrefix) {
		s.foreignProbes.Add(1)
		return
	}
	signal(wake)
}

// connectListener connects with cfg; a configuration that pgx refuses
// with a panic (one not made by pgx.ParseConfig) is an error.
func connectListener(ctx context.Context, cfg *pgx.ConnConfig) (conn *pgx.Conn, err error) {
	defer func() {
		if r := recover(); r != nil {
			conn, err = nil, fmt.Errorf("%w: %v", ErrInvalidOptions, r)
		}
	}()
	return pgx.ConnectConfig(ctx, cfg)
}

// probe proves that notifications reach conn, which LISTENs on channel: it
// sends a notification with an unguessable payload through the pool, as
// the outbox's trigger would, and waits up to probeWait for it on conn. It
// reports false if the probe did not arrive: behind a pooler in
// transaction mode the server connection that ran LISTEN went back to the
// pooler, and its notifications reach whichever client holds it next, if
// any. Outbox notifications that arrive meanwhile signal wake.
func (s *Store) probe(ctx context.Context, conn *pgx.Conn, channel string, wake chan<- struct{}) (bool, error) {
	var b [16]byte
	rand.Read(b[:])
	payload := probePrefix + hex.EncodeToString(b[:])
	s.probes.Add(1)
	if _, err := s.pool.Exec(ctx, `SELECT pg_notify($1::text, $2::text)`, channel, payload); err != nil {
		return false, fmt.Errorf("probe notification: %w", translate(err))
	}
	wctx, cancel := context.WithTimeout(ctx, s.probeWait)
	defer cancel()
	for {
		// A deadline interrupts the wait without breaking the
		// connection (pgconn treats a timeout as not fatal).
		n, err := conn.WaitForNotification(wctx)
		switch {
		case err != nil && ctx.Err() == nil && wctx.Err() != nil && !conn.IsClosed():
			return false, nil
		case err != nil:
			return false, err
		case n.Payload == payload:
			return true, nil
		default:
			s.notified(n, wake)
		}
	}
}

// probed records the outcome of a probe and logs it when it changed: the
// first lost probe, and the first delivered one after lost ones.
func (s *Store) probed(delivered bool) {
	state := probeLost
	if delivered {
		state = probeDelivered
	}
	switch old := s.probeState.Swap(state); {
	case old == state:
	case !delivered:
		hint := "set Options.ListenConfig to a direct connection"
		if s.listenConfig != nil {
			hint = "Options.ListenConfig must lead to the database the pool writes, not through a pooler in transaction mode"
		}
		s.log.Warn("store: notifications do not reach the relay's LISTEN (a pooler in transaction mode?); "+
			"polling every RelayPoll; "+hint,
			"relay_poll", s.poll, "recheck", s.listenRecheck)
	case old == probeLost:
		s.log.Info("store: notifications reach the relay's LISTEN again")
	}
}

// signal sends a wake-up unless one is pending already.
func signal(wake chan<- struct{}) {
	select {
	case wake <- struct{}{}:
	default:
	}
}

// RelayOnce publishes one batch of due outbox rows and returns how many it
// took care of (published, or dropped as poison). [Store.RunRelay] calls
// it in a loop; call it directly to drain the outbox on demand (in tests,
// or before shutdown). It returns ErrUnproven, claiming nothing, while the
// Publisher's link is not proven, and the error of the first publication
// that failed, after handing the rows it could not publish back.
func (s *Store) RelayOnce(ctx context.Context) (int, error) {
	if s.pub == nil {
		return 0, fmt.Errorf("%w: the relay needs a Publisher", ErrInvalidOptions)
	}
	n, _, err := s.relay(ctx)
	return n, err
}

// outboxRow is a claimed outbox row.
type outboxRow struct {
	ns, key []byte
	version int64
	seq     int64
	flush   bool // a flush of the namespace (a TRUNCATE, a broken capture)
	// pos is a source position read by the claim, after the change
	// committed (its row is visible): a replica that has replayed it
	// holds the change.
	pos uint64
	was time.Time // relay_after before the claim
}

// relay runs one round: claim, publish, delete. It returns how many rows
// it took care of and, when it claimed fewer than a batch, how long until
// the next row becomes due (RelayPoll if none is waiting).
func (s *Store) relay(ctx context.Context) (n int, next time.Duration, err error) {
	if !s.pub.Proven() {
		return 0, 0, ErrUnproven
	}
	rows, err := s.claim(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("store: relay: claim: %w", translate(err))
	}
	if len(rows) > 0 {
		n, err = s.publishClaimed(ctx, rows)
		s.relayed.Add(uint64(n))
		if err != nil {
			return n, 0, err
		}
	}
	next = s.poll
	if len(rows) < s.batch {
		if d, err := s.nextDue(ctx); err == nil {
			next = min(next, d)
		}
	}
	return n, next, nil
}

// claim takes up to a batch of due rows for this relay: it moves their
// relay_after one lease ahead, so that no other relay takes them
// meanwhile, and returns them with the relay_after they had. The claim
// commits at once; losing it in a crash only makes the rows due again.
func (s *Store) claim(ctx context.Context) ([]outboxRow, error) {
	rows, err := s.pool.Query(ctx, s.sql.claim, s.batch, (2 * s.pubTTL).Seconds())
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (outboxRow, error) {
		var x outboxRow
		var async string
		var pos int64
		err := r.Scan(&x.ns, &x.key, &x.version, &x.seq, &x.flush, &x.was, &pos, &async)
		x.pos = uint64(pos)
		return x, err
	})
}

// publishClaimed publishes claimed rows, one publication per namespace in
// the order the rows became due, deletes those it published and hands the
// others back. It returns how many rows it took care of.
func (s *Store) publishClaimed(ctx context.Context, rows []outboxRow) (int, error) {
	type nsBatch struct {
		ns    string
		keys  []cache.Invalidation
		flush bool
		rows  []outboxRow
	}
	var order []*nsBatch
	byNS := make(map[string]*nsBatch)
	batch := func(r outboxRow) *nsBatch {
		ns := string(r.ns)
		b := byNS[ns]
		if b == nil {
			b = &nsBatch{ns: ns}
			byNS[ns] = b
			order = append(order, b)
		}
		b.rows = append(b.rows, r)
		return b
	}
	var dropped []outboxRow
	for _, r := range rows {
		switch {
		case len(r.ns) == 0 || len(r.ns) > cache.MaxKeyLen:
			// No cache can subscribe to this namespace.
			s.poison(string(r.ns), "namespace", len(r.key))
			dropped = append(dropped, r)
		case r.flush: // a TRUNCATE, or a capture that could not read its row
			batch(r).flush = true
		case len(r.key) == 0:
			// A captured empty key: no cache holds one (an encoded key
			// is never empty), so there is nothing to drop.
			s.poison(string(r.ns), "key", 0)
			dropped = append(dropped, r)
		case len(r.key) > cache.MaxKeyLen:
			// No cache holds this key, but one may hold a key that the
			// row stands for (a codec that shortens, say): flush the
			// namespace rather than guess.
			s.poison(string(r.ns), "key", len(r.key))
			batch(r).flush = true
		default:
			b := batch(r)
			b.keys = append(b.keys, cache.Invalidation{Key: string(r.key), Version: r.version, Position: r.pos})
		}
	}
	done := dropped
	var failed error
	var back []outboxRow
	for _, b := range order {
		if failed != nil {
			back = append(back, b.rows...)
			continue
		}
		keys := b.keys
		if b.flush {
			keys = nil
		}
		pctx, cancel := context.WithTimeout(ctx, s.pubTTL)
		err := s.pub.Publish(pctx, b.ns, keys)
		cancel()
		if err != nil {
			// Most likely the link, which every later namespace goes
			// through too: hand them all back.
			failed = fmt.Errorf("store: relay: publish %d keys of %q: %w", len(keys), b.ns, err)
			back = append(back, b.rows...)
			continue
		}
		done = append(done, b.rows...)
	}
	// Deleting and handing back happen even if ctx ended meanwhile: the
	// rows must not wait for the lease when this relay stops.
	octx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if len(back) > 0 {
		if err := s.handBack(octx, back); err != nil {
			s.log.Warn("store: relay: hand rows back", "rows", len(back), "err", err)
		}
	}
	if len(done) > 0 {
		if err := s.deleteRows(octx, done); err != nil {
			// They are published; the lease ends and they go out again.
			s.log.Warn("store: relay: delete published rows", "rows", len(done), "err", err)
		}
	}
	return len(done), failed
}

// deleteRows deletes rows that were published, unless a newer change of
// their key replaced them since the claim (seq changed).
func (s *Store) deleteRows(ctx context.Context, rows []outboxRow) error {
	nss, keys, seqs := make([][]byte, len(rows)), make([][]byte, len(rows)), make([]int64, len(rows))
	for i, r := range rows {
		nss[i], keys[i], seqs[i] = r.ns, r.key, r.seq
	}
	_, err := s.pool.Exec(ctx, s.sql.confirm, nss, keys, seqs)
	return err
}

// handBack ends the lease of rows this relay could not publish: they are
// due again as they were, which notifies the other relays.
func (s *Store) handBack(ctx context.Context, rows []outboxRow) error {
	nss, keys, seqs, was := make([][]byte, len(rows)), make([][]byte, len(rows)), make([]int64, len(rows)), make([]time.Time, len(rows))
	for i, r := range rows {
		nss[i], keys[i], seqs[i], was[i] = r.ns, r.key, r.seq, r.was
	}
	_, err := s.pool.Exec(ctx, s.sql.handBack, nss, keys, seqs, was)
	return err
}

// nextDue returns how long until the earliest row not yet due becomes due
// (a writer's row after Grace, a lease that ends), or RelayPoll if none.
func (s *Store) nextDue(ctx context.Context) (time.Duration, error) {
	var secs *float64
	if err := s.pool.QueryRow(ctx, s.sql.nextDue).Scan(&secs); err != nil {
		return 0, err
	}
	if secs == nil {
		return s.poll, nil
	}
	return max(time.Duration(*secs*float64(time.Second)), time.Millisecond), nil
}

// poison counts a row no cache can hold and logs it the first time its
// namespace is seen.
func (s *Store) poison(ns, what string, keyLen int) {
	s.poisonRows.Add(1)
	if s.poisonLog.first(ns) {
		shown := ns
		if len(shown) > 64 {
			shown = shown[:64] + "…"
		}
		s.log.Error("store: relay: an outbox row no cache can hold", "namespace", shown, "invalid", what,
			"namespace_bytes", len(ns), "key_bytes", keyLen,
			"action", poisonAction(what, keyLen))
	}
}

func poisonAction(what string, keyLen int) string {
	switch {
	case what == "namespace":
		return "dropped"
	case keyLen == 0:
		return "dropped: no cache holds an empty key"
	}
	return "flushed its namespace"
}

// poisonLog remembers the namespaces whose poison rows were logged, up to
// a bound; past it, poison rows are counted only.
type poisonLog struct {
	mu   sync.Mutex
	seen map[string]struct{}
}

func (l *poisonLog) first(ns string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.seen[ns]; ok || len(l.seen) >= 1024 {
		return false
	}
	if l.seen == nil {
		l.seen = make(map[string]struct{})
	}
	l.seen[ns] = struct{}{}
	return true
}
