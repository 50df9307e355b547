package store

import (
	"context"
	"time"
)

// afterPublish ends a committed write: it confirms the change's outbox row
// if the publication (whose error is err) succeeded, and otherwise makes
// the row due at once, so that the relay of a node whose link works
// publishes it within milliseconds, woken by the outbox's notification,
// rather than after Grace (the write returns nil, so G2 covers it). It
// reports whether the writer published.
func (s *Store) afterPublish(ctx context.Context, ns, key string, seq int64, err error) bool {
	if err == nil {
		s.confirm(ctx, ns, key, seq)
		return true
	}
	s.publishFailures.Add(1)
	if derr := s.makeDue(ctx, ns, key, seq); derr != nil {
		s.log.Warn("store: committed, but neither published nor handed to the relays; a relay publishes it after Grace",
			"namespace", ns, "err", err, "outbox_err", derr)
		return false
	}
	s.log.Warn("store: committed, but the invalidation was not published; handed to the relays",
		"namespace", ns, "err", err)
	return false
}

// confirm deletes the outbox row of a published change, unless a later
// change of the key replaced it (then its own writer, or the relay, takes
// care of it). While a relay runs on this Store, confirmations are batched
// off the write's path (see confirmLoop); otherwise the row is deleted
// here. A lost confirmation only means the relay publishes the change
// again, which is harmless.
func (s *Store) confirm(ctx context.Context, ns, key string, seq int64) {
	if s.relays.Load() > 0 {
		select {
		case s.confirms <- confirmation{ns: ns, key: key, seq: seq}:
			return
		default: // the confirmer is behind; do it here
		}
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := s.pool.Exec(cctx, s.sql.confirm, [][]byte{[]byte(ns)}, [][]byte{[]byte(key)}, []int64{seq}); err != nil {
		s.log.Warn("store: confirm outbox row", "namespace", ns, "err", err)
	}
}

// confirmation identifies the outbox row of a published change.
type confirmation struct {
	ns, key string
	seq     int64
}

// confirmLinger is how long confirmLoop waits for more confirmations after
// the first of a batch. It is far below any sensible Grace, so the relay
// rarely republishes a change that was confirmed.
const confirmLinger = 5 * time.Millisecond

// confirmLoop deletes confirmed outbox rows in batches, until ctx ends; then
// it confirms what is queued and returns. It runs inside RunRelay.
func (s *Store) confirmLoop(ctx context.Context) {
	var nss, keys [][]byte
	var seqs []int64
	flush := func() {
		if len(seqs) == 0 {
			return
		}
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if _, err := s.pool.Exec(cctx, s.sql.confirm, nss, keys, seqs); err != nil {
			s.log.Warn("store: confirm outbox rows", "rows", len(seqs), "err", err)
		}
		cancel()
		nss, keys, seqs = nss[:0], keys[:0], seqs[:0]
	}
	add := func(c confirmation) {
		nss, keys, seqs = append(nss, []byte(c.ns)), append(keys, []byte(c.key)), append(seqs, c.seq)
	}
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case c := <-s.confirms:
					add(c)
				default:
					flush()
					return
				}
			}
		case c := <-s.confirms:
			add(c)
			if len(seqs) == 1 {
				linger.Reset(confirmLinger)
			}
			if len(seqs) >= 512 {
				linger.Stop()
				flush()
			}
		case <-linger.C:
			flush()
		}
	}
}

// makeDue makes the outbox row of a change due now, unless a newer change
// replaced it: its writer could not publish it. The notification wakes
// the relays.
func (s *Store) makeDue(ctx context.Context, ns, key string, seq int64) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_, err := s.pool.Exec(ctx, s.sql.makeDue, []byte(ns), []byte(key), seq)
	return err
}

// Pending returns the number of outbox rows not yet published, due or not.
func (s *Store) Pending(ctx context.Context) (int64, error) {
	var n int64
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.ident+`.outbox`).Scan(&n)
	return n, err
}

// OutboxLag returns how long the oldest due outbox row has been waiting
// for a relay: 0 when no row is due. Rows a relay has claimed are not due
// until it hands them back or its lease ends. A lag of more than a few
// seconds means that no relay runs, or none can publish; a health check
// can report it.
func (s *Store) OutboxLag(ctx context.Context) (time.Duration, error) {
	var secs *float64
	err := s.pool.QueryRow(ctx, `SELECT extract(epoch FROM now() - min(relay_after))::float8 FROM `+s.ident+`.outbox WHERE relay_after <= now()`).Scan(&secs)
	if err != nil || secs == nil {
		return 0, err
	}
	return time.Duration(*secs * float64(time.Second)), nil
}
