package store

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
)

// RunRelay publishes the outbox rows nobody confirmed: changes of writers
// that crashed between commit and publish, or whose publication failed
// (after [Options.Grace]), and changes recorded by capture triggers
// (at once). It deletes each row in the transaction that published it, so a
// crash in between only publishes the row again, which is harmless:
// invalidations are idempotent.
//
// Run it on every node: rows are claimed with FOR UPDATE SKIP LOCKED, so
// relays share the work without waiting for each other. A relay wakes on a
// notification from the outbox, and otherwise every [Options.RelayPoll].
// Each round publishes at most [Options.RelayBatch] rows. While the bus is
// down the rows wait; the outbox holds at most one row per key, so it stays
// bounded by the keys written meanwhile, and the relay catches up when the
// bus returns.
//
// RunRelay blocks until ctx ends and then returns ctx.Err(). It returns an
// error at once if the Store has no [Options.Publisher]. It holds one pool
// connection to listen for notifications while it runs.
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
	for {
		n, err := s.RelayOnce(ctx)
		if err != nil && ctx.Err() == nil {
			failures++
			s.relayErrors.Add(1)
			s.log.Warn("store: relay", "err", err)
		} else if err == nil {
			failures = 0
		}
		var wait time.Duration
		switch {
		case failures > 0:
			wait = backoff(failures, s.poll)
		case n == s.batch:
			continue // more rows are due
		default:
			wait = s.poll
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-wake:
			t.Stop()
		case <-t.C:
		}
	}
}

// backoff is the wait after the n-th consecutive failure: exponential from
// 10 ms, capped at ceiling, with jitter.
func backoff(n int, ceiling time.Duration) time.Duration {
	d := 10 * time.Millisecond << min(n-1, 16)
	d = min(d, ceiling)
	return d/2 + rand.N(d/2+1)
}

// listen signals wake on every notification on the outbox's channel until
// ctx ends, reconnecting as needed.
func (s *Store) listen(ctx context.Context, wake chan<- struct{}) {
	failures := 0
	for ctx.Err() == nil {
		err := s.listenOnce(ctx, wake)
		if ctx.Err() != nil {
			return
		}
		failures++
		s.log.Warn("store: relay listen", "err", err)
		t := time.NewTimer(backoff(failures, 5*time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (s *Store) listenOnce(ctx context.Context, wake chan<- struct{}) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	channel := pgx.Identifier{s.schema + ".outbox"}.Sanitize()
	if _, err := conn.Exec(ctx, "LISTEN "+channel); err != nil {
		return err
	}
	defer func() {
		// Leave the pooled connection as we found it.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		conn.Exec(uctx, "UNLISTEN "+channel)
		cancel()
	}()
	for {
		if _, err := conn.Conn().WaitForNotification(ctx); err != nil {
			return err
		}
		select {
		case wake <- struct{}{}:
		default: // a wake-up is pending already
		}
	}
}

// RelayOnce publishes one batch of due outbox rows and returns how many it
// published. [Store.RunRelay] calls it in a loop; call it directly to drain
// the outbox on demand (in tests, or before shutdown).
func (s *Store) RelayOnce(ctx context.Context) (int, error) {
	if s.pub == nil {
		return 0, fmt.Errorf("%w: the relay needs a Publisher", ErrInvalidOptions)
	}
	var n int
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `
			SELECT key_hash, namespace, key, version FROM `+s.ident+`.outbox
			WHERE relay_after <= now()
			ORDER BY relay_after
			LIMIT $1
			FOR UPDATE SKIP LOCKED`, s.batch)
		if err != nil {
			return err
		}
		type row struct {
			hash, ns, key []byte
			version       int64
		}
		due, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
			var x row
			err := r.Scan(&x.hash, &x.ns, &x.key, &x.version)
			return x, err
		})
		if err != nil || len(due) == 0 {
			return err
		}
		// Group by namespace; an empty key (a TRUNCATE) flushes its
		// namespace and makes its other keys moot.
		byNS := make(map[string][]cache.Invalidation)
		flush := make(map[string]bool)
		var order []string
		hashes := make([][]byte, 0, len(due))
		for _, r := range due {
			ns := string(r.ns)
			if _, seen := byNS[ns]; !seen && !flush[ns] {
				order = append(order, ns)
			}
			hashes = append(hashes, r.hash)
			if len(r.key) == 0 {
				flush[ns] = true
				byNS[ns] = nil
				continue
			}
			if !flush[ns] {
				byNS[ns] = append(byNS[ns], cache.Invalidation{Key: string(r.key), Version: r.version})
			}
		}
		// The rows stay locked while publishing; bound it so that a hung
		// bus does not hold them (and writers of those keys) forever.
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		for _, ns := range order {
			if err := s.pub.Publish(pctx, ns, byNS[ns]); err != nil {
				return fmt.Errorf("publish %d keys of %q: %w", len(byNS[ns]), ns, err)
			}
		}
		// The rows are locked by this transaction: nobody changed them
		// since the SELECT, so deleting them deletes exactly what was
		// published.
		if _, err := tx.Exec(ctx, `DELETE FROM `+s.ident+`.outbox WHERE key_hash = ANY($1)`, hashes); err != nil {
			return err
		}
		n = len(due)
		return nil
	})
	if err != nil {
		if errors.Is(err, ctx.Err()) {
			return 0, err
		}
		return 0, fmt.Errorf("store: relay: %w", translate(err))
	}
	s.relayed.Add(uint64(n))
	return n, nil
}

// Pending returns the number of outbox rows not yet published, due or not.
func (s *Store) Pending(ctx context.Context) (int64, error) {
	var n int64
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.ident+`.outbox`).Scan(&n)
	return n, err
}
