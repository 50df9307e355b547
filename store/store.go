package store

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/lockguard"
)

// Publisher announces invalidations to every node, this one included.
// The Redis transports and the in-process bus of package invalidate
// implement it. The relay needs one; so does [Store.Write].
type Publisher interface {
	// Publish announces that keys of namespace changed; an empty keys
	// flushes the namespace. ctx bounds it.
	Publish(ctx context.Context, namespace string, keys []cache.Invalidation) error
	// Proven reports whether the publisher's link was proven live and in
	// order recently enough that a publication through it reaches the
	// other nodes (for a bus of package invalidate: within the smallest
	// MaxStaleness of its caches, and not lost since).
	// The relay claims outbox rows only while it is true, so that rows
	// are left to the relays of healthy nodes (DESIGN race 17).
	Proven() bool
}

// Options configure a [Store]. A nil *Options, and every zero field, means
// the default.
type Options struct {
	// Schema is the schema of the library's tables, created by [Migrate].
	// Default [DefaultSchema].
	Schema string

	// Locks guards lock-guarded writes ([Update], [Store.Write]). Default
	// nil: only optimistic writes are available.
	Locks *lockguard.Guard

	// Publisher carries the invalidations of [Store.Write] and of the
	// relay. Default nil: Store.Write leaves them to the relay of another
	// node, and [Store.RunRelay] returns an error.
	Publisher Publisher

	// Grace is how long the relay leaves a writer's outbox row alone, so
	// that it does not republish what the writer is about to publish
	// itself. A writer that crashed between commit and publish is covered
	// after Grace. Default 2s.
	Grace time.Duration

	// RelayBatch is the most outbox rows the relay publishes in one
	// transaction. Default 500.
	RelayBatch int

	// RelayPoll is how often the relay looks for due rows when no
	// notification wakes it and no row is about to become due. It bounds
	// the staleness after an outside write when notifications cannot reach
	// the relay (see ListenConfig). Default 1s.
	RelayPoll time.Duration

	// ListenConfig, if not nil, is the configuration of a connection the
	// relay makes for itself to LISTEN for the outbox's notifications,
	// instead of holding one of the pool's. Set it when the pool goes
	// through a pooler in transaction mode (pgbouncer's pool_mode =
	// transaction), which hands the server connection that ran LISTEN to
	// other clients: point it at the primary directly, or at a pooler in
	// session mode. It must reach the database the pool writes, and come
	// from pgx.ParseConfig. Default nil: a connection of the pool.
	//
	// Either way the relay checks that notifications reach its LISTEN (see
	// [Store.RunRelay]) and polls every RelayPoll while they do not.
	ListenConfig *pgx.ConnConfig

	// PublishTimeout bounds one publication: a writer's, after its
	// commit, and each of the relay's. Keep it well under the caches'
	// MaxStaleness: a relay that has claimed rows holds them from the
	// other relays for about twice this long at most, and a writer whose
	// publication fails hands its row to the relays only after it.
	// Default 250ms.
	PublishTimeout time.Duration

	// Tracer observes writes, and the moment after each commit if it also
	// implements [CommitTracer]. Default nil.
	Tracer WriteTracer

	// Logger receives relay and publish errors. Default nil: discard.
	Logger *slog.Logger
}

// Store is the write path to Postgres: lock-guarded, fenced write-through
// with a transactional outbox, optimistic writes, change capture and the
// relay. It is safe for concurrent use.
type Store struct {
	pool   *pgxpool.Pool
	schema string // validated name
	ident  string // schema as a quoted identifier
	locks  *lockguard.Guard
	pub    Publisher
	grace  time.Duration
	batch  int
	poll   time.Duration
	pubTTL time.Duration // Options.PublishTimeout
	log    *slog.Logger
	tracer WriteTracer

	listenConfig *pgx.ConnConfig // Options.ListenConfig
	// probeWait bounds the wait for the relay's probe notification, and
	// listenRecheck is how long a relay whose probe did not arrive polls
	// before it tries again (fields, so that tests can shorten them).
	probeWait, listenRecheck time.Duration

	// sql holds the statements of the write path, built once.
	sql struct{ outboxPut, confirm, claim, handBack, nextDue, makeDue string }

	relays   atomic.Int32      // RunRelay calls running
	confirms chan confirmation // to confirmLoop

	// listenFailures counts the relay's consecutive failures to LISTEN.
	listenFailures atomic.Int64
	// listening is set while a relay LISTENs on a connection its probe
	// notification reached; probeState is the outcome of the last probe
	// (probeUnknown, probeDelivered, probeLost), for logging changes only.
	listening  atomic.Bool
	probeState atomic.Int32
	// probes counts the probes sent and foreignProbes those of other
	// relays a listener ignored (tests read them).
	probes, foreignProbes atomic.Uint64
	poisonLog             poisonLog

	publishFailures atomic.Uint64
	relayed         atomic.Uint64
	relayErrors     atomic.Uint64
	poisonRows      atomic.Uint64
	relayUnproven   atomic.Uint64
}

// New returns a Store writing to the database of pool. It does not touch
// the database; run [Migrate] first.
func New(pool *pgxpool.Pool, opts *Options) (*Store, error) {
	if pool == nil {
		return nil, fmt.Errorf("%w: nil pool", ErrInvalidOptions)
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	schema, err := checkSchema(o.Schema)
	if err != nil {
		return nil, err
	}
	switch {
	case o.Grace < 0:
		return nil, fmt.Errorf("%w: negative Grace %v", ErrInvalidOptions, o.Grace)
	case o.RelayBatch < 0:
		return nil, fmt.Errorf("%w: negative RelayBatch %d", ErrInvalidOptions, o.RelayBatch)
	case o.RelayPoll < 0:
		return nil, fmt.Errorf("%w: negative RelayPoll %v", ErrInvalidOptions, o.RelayPoll)
	case o.PublishTimeout < 0:
		return nil, fmt.Errorf("%w: negative PublishTimeout %v", ErrInvalidOptions, o.PublishTimeout)
	case o.ListenConfig != nil && o.ListenConfig.Host == "":
		// pgx connects only with a configuration from ParseConfig, which
		// always names a host (or socket directory).
		return nil, fmt.Errorf("%w: ListenConfig names no host; make it with pgx.ParseConfig", ErrInvalidOptions)
	}
	s := &Store{
		pool:   pool,
		schema: schema,
		ident:  pgx.Identifier{schema}.Sanitize(),
		locks:  o.Locks,
		pub:    o.Publisher,
		grace:  o.Grace,
		batch:  o.RelayBatch,
		poll:   o.RelayPoll,
		pubTTL: o.PublishTimeout,
		log:    o.Logger,
		tracer: o.Tracer,

		probeWait:     defaultProbeWait,
		listenRecheck: defaultListenRecheck,
	}
	if o.ListenConfig != nil {
		s.listenConfig = o.ListenConfig.Copy()
	}
	if s.grace == 0 {
		s.grace = 2 * time.Second
	}
	if s.batch == 0 {
		s.batch = 500
	}
	if s.poll == 0 {
		s.poll = time.Second
	}
	if s.pubTTL == 0 {
		s.pubTTL = 250 * time.Millisecond
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.confirms = make(chan confirmation, 1024)
	// The statements are plain SQL rather than calls of the schema's SQL
	// functions: pgx prepares and caches them per connection, where a SQL
	// function's body is planned again on every call. (The fence is a
	// PL/pgSQL function, whose plans are cached per session; see
	// beginQuery.)
	// The upsert of outbox_put (see the migration), inlined.
	s.sql.outboxPut = `
		INSERT INTO ` + s.ident + `.outbox AS o (key_hash, namespace, key, version, relay_after)
		VALUES (sha256(int4send(length($1::bytea)) || $1::bytea || $2::bytea), $1, $2, $3, now() + make_interval(secs => $4))
		ON CONFLICT (key_hash) DO UPDATE SET
			version     = CASE WHEN o.version = 0 OR EXCLUDED.version = 0 THEN 0
			                   ELSE greatest(o.version, EXCLUDED.version) END,
			seq         = nextval('` + s.ident + `.outbox_seq'),
			relay_after = least(o.relay_after, EXCLUDED.relay_after)
		RETURNING seq`
	// Deleting confirmed rows needs no durable commit: a lost deletion
	// only makes the relay publish the change again.
	s.sql.confirm = `
		WITH d AS (
			DELETE FROM ` + s.ident + `.outbox o
			USING unnest($1::bytea[], $2::bytea[], $3::bigint[]) AS c(ns, key, seq)
			WHERE o.key_hash = sha256(int4send(length(c.ns)) || c.ns || c.key) AND o.seq = c.seq)
		SELECT set_config('synchronous_commit', 'off', true)`
	// The relay's claim: due rows, oldest first, skipping those another
	// relay is claiming, move one lease ahead. It returns relay_after as
	// it was, for handing the rows back. Like the deletion of published
	// rows, the claim needs no durable commit: a lost claim only makes the
	// rows due again.
	s.sql.claim = `
		WITH due AS (
			SELECT key_hash, relay_after FROM ` + s.ident + `.outbox
			WHERE relay_after <= now()
			ORDER BY relay_after
			LIMIT $1
			FOR UPDATE SKIP LOCKED),
		claimed AS (
			UPDATE ` + s.ident + `.outbox o SET relay_after = now() + make_interval(secs => $2)
			FROM due WHERE o.key_hash = due.key_hash
			RETURNING o.namespace, o.key, o.version, o.seq, o.flush, due.relay_after AS was)
		SELECT namespace, key, version, seq, flush, was,
			(pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint,
			set_config('synchronous_commit', 'off', true)
		FROM claimed ORDER BY was`
	// Rows a relay could not publish are due again as they were, unless a
	// newer change replaced them (which set its own relay_after). The
	// outbox's trigger notifies the relays.
	s.sql.handBack = `
		UPDATE ` + s.ident + `.outbox o SET relay_after = c.was
		FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::timestamptz[]) AS c(ns, key, seq, was)
		WHERE o.key_hash = sha256(int4send(length(c.ns)) || c.ns || c.key) AND o.seq = c.seq`
	s.sql.nextDue = `SELECT extract(epoch FROM min(relay_after) - now())::float8 FROM ` + s.ident + `.outbox`
	s.sql.makeDue = `
		UPDATE ` + s.ident + `.outbox SET relay_after = now()
		WHERE key_hash = sha256(int4send(length($1::bytea)) || $1::bytea || $2::bytea) AND seq = $3 AND relay_after > now()`
	return s, nil
}

// Stats are the Store's counters.
type Stats struct {
	// PublishFailures counts writes that committed but whose invalidation
	// the bus did not take; the relay published them later.
	PublishFailures uint64
	// Relayed counts outbox rows the relay published.
	Relayed uint64
	// RelayErrors counts failed relay rounds.
	RelayErrors uint64
	// PoisonRows counts outbox rows no cache can hold: a key longer than
	// cache.MaxKeyLen, published as a flush of its namespace instead, or a
	// namespace no cache can have (empty or too long), dropped. Each is
	// logged the first time its namespace is seen.
	PoisonRows uint64
	// RelayUnproven counts relay rounds that claimed nothing because the
	// Publisher's link was not proven.
	RelayUnproven uint64
	// RelayListening reports whether a relay ([Store.RunRelay]) LISTENs on
	// a connection that its probe notification reached: notifications wake
	// it. False while no relay runs, while it reconnects, and while it
	// polls every [Options.RelayPoll] because notifications do not reach
	// its LISTEN (a pooler in transaction mode: see
	// [Options.ListenConfig]).
	RelayListening bool
}

// Stats returns a snapshot of the counters.
func (s *Store) Stats() Stats {
	return Stats{
		PublishFailures: s.publishFailures.Load(),
		Relayed:         s.relayed.Load(),
		RelayErrors:     s.relayErrors.Load(),
		PoisonRows:      s.poisonRows.Load(),
		RelayUnproven:   s.relayUnproven.Load(),
		RelayListening:  s.listening.Load(),
	}
}

// lockName is the lockguard lock of one key of a namespace. The length
// prefix keeps ("a:b", "c") and ("a", "b:c") apart.
func lockName(namespace, key string) string {
	return strconv.Itoa(len(namespace)) + ":" + namespace + ":" + key
}

func checkName(namespace, key string) error {
	if namespace == "" || len(namespace) > cache.MaxKeyLen || key == "" || len(key) > cache.MaxKeyLen {
		return fmt.Errorf("%w: namespace and key must be 1 to %d bytes", cache.ErrInvalidKey, cache.MaxKeyLen)
	}
	return nil
}
