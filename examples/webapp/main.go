// Command webapp is a multi-instance web service whose instances share one
// Postgres and one Redis and keep their in-process caches of the items
// table consistent:
//
//	go run ./examples/webapp -addr :8081 -node a
//	go run ./examples/webapp -addr :8082 -node b
//
// API
//
//	GET    /items/{id}        200 {"id":…,"value":…,"version":N} through the cache, or 404
//	PUT    /items/{id}        {"value":"…"} → 200 with the stored item (version 1, 2, …)
//	DELETE /items/{id}        204
//	POST   /items/{id}/add    {"delta":N} → 200 with value = old value + N (a missing item counts as 0)
//	GET    /stats             the cache's, bus's and store's counters (and the auditor's, with -audit-rate)
//	GET    /metrics           the same, and load and write durations, for Prometheus
//	GET    /healthz           200 when Postgres, Redis, a proven bus link and a relayed outbox are there, else 503
//
// An id is 1 to 256 bytes of UTF-8 without NUL; a value is UTF-8 without
// NUL, as long as the body allows. A body is one JSON object of at most
// 1 MiB. Errors are {"error":"…"}: 400 for an invalid id, body, value or
// delta, 413 for a body over the limit, 409 for an add to a value that is
// not an integer, 422 for an add whose sum leaves the int64 range; none of
// them writes anything. A 503 asks the client to retry: its message says
// "nothing written" when the write was rolled back, and otherwise that its
// outcome is unknown; the server logs why.
//
// Writes go through the lock guard and the outbox (package store); writes
// to the table from any other client are captured and relayed. With
// -replica-url, loads read a streaming replica once it has replayed what
// they must see, and the primary otherwise. With -broadcast, a write sends
// the item it committed (JSON, up to 8 KiB) to the other instances, which
// serve it without reloading it when they hold the item at an older
// version (cache.Options.Codec); captured writes from other clients stay
// plain invalidations. /stats reports the cache's loads (Loads) and the
// values sent, installed and rejected.
//
// With -audit-rate N, the instance audits its cache: N times a second it
// compares a cached item with the primary, and invalidates, on every
// instance, an item still different after the staleness bound
// (store.Auditor). /stats reports the figures under "audit", /metrics as
// coherent_audit_*.
//
// Behind a pooler in transaction mode (pgbouncer's pool_mode =
// transaction), put default_query_exec_mode=exec in -database-url, and
// give the relay a direct connection to the primary for its LISTEN with
// -listen-url (or DATABASE_LISTEN_URL); without it the relay polls every
// second and logs a warning at start. A pooler refuses search_path as a
// connection parameter: set it on the database or the role instead (ALTER
// DATABASE … SET search_path = …).
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/invalidate"
	"github.com/coherentcache/coherent/lockguard"
	"github.com/coherentcache/coherent/store"
)

// config is the command line.
type config struct {
	addr, node      string
	dbURL, redisURL string
	replicaURL      string // a streaming replica for loads; "": none
	listenURL       string // a direct connection for the relay's LISTEN; "": one of the pool's
	// The rest serve operators and the fault tests of integration/.
	schema       string        // the library's tables
	redisPrefix  string        // the bus channel and lock keys
	lockTTL      time.Duration // lease of the write locks
	maxStaleness time.Duration
	auditRate    float64 // samples per second of the consistency auditor; 0: off
	broadcast    bool    // send written values, not only keys (cache.Options.Codec)
}

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Getenv, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case err != nil:
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("node", cfg.node)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		fmt.Fprintf(os.Stderr, "webapp: %v\n", err)
		os.Exit(1)
	}
}

// The services' URLs when neither the flags nor the environment give them.
const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultRedisURL    = "redis://127.0.0.1:6379/0"
)

// parseFlags parses the command line args. -database-url and -redis-url
// default to the environment variables DATABASE_URL and REDIS_URL, which
// getenv reads; they are read after parsing, so that the usage message
// never prints them, or a password in them. Errors and usage go to out.
func parseFlags(args []string, getenv func(string) string, out io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("webapp", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.addr, "addr", ":8081", "listen address")
	fs.StringVar(&cfg.node, "node", "a", "name of this instance, for logs and connection names")
	fs.StringVar(&cfg.dbURL, "database-url", "", "Postgres URL; a search_path parameter selects the schema of the items table (default $DATABASE_URL, or "+defaultDatabaseURL+")")
	fs.StringVar(&cfg.redisURL, "redis-url", "", "Redis URL (default $REDIS_URL, or "+defaultRedisURL+")")
	fs.StringVar(&cfg.replicaURL, "replica-url", "", "URL of a streaming replica of -database-url that loads read once it has replayed what they must see (default $DATABASE_REPLICA_URL, or none: loads read the primary)")
	fs.StringVar(&cfg.listenURL, "listen-url", "", "URL of a direct connection to the primary (not through a pooler in transaction mode) on which the relay LISTENs for notifications (default $DATABASE_LISTEN_URL, or none: a connection of -database-url)")
	fs.StringVar(&cfg.schema, "schema", store.DefaultSchema, "schema of the library's tables")
	fs.StringVar(&cfg.redisPrefix, "redis-prefix", "coherent:", "prefix of the bus channel and the lock keys")
	fs.DurationVar(&cfg.lockTTL, "lock-ttl", lockguard.DefaultTTL, "lease of a write's lock")
	fs.DurationVar(&cfg.maxStaleness, "max-staleness", time.Second, "serve from memory only while the bus link was proven this recently")
	fs.Float64Var(&cfg.auditRate, "audit-rate", 0, "cached items per second the consistency auditor compares with the primary, healing those still stale after the staleness bound (0: no auditor)")
	fs.BoolVar(&cfg.broadcast, "broadcast", false, "value broadcast: a write sends the item (JSON, up to 8 KiB) to the other instances, which install it instead of loading it again")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if cfg.auditRate < 0 || cfg.auditRate > 10_000 || math.IsNaN(cfg.auditRate) {
		err := fmt.Errorf("-audit-rate must be between 0 and 10000, got %v", cfg.auditRate)
		fmt.Fprintln(out, err)
		return cfg, err
	}
	cfg.dbURL = cmp.Or(cfg.dbURL, getenv("DATABASE_URL"), defaultDatabaseURL)
	cfg.redisURL = cmp.Or(cfg.redisURL, getenv("REDIS_URL"), defaultRedisURL)
	cfg.replicaURL = cmp.Or(cfg.replicaURL, getenv("DATABASE_REPLICA_URL"))
	cfg.listenURL = cmp.Or(cfg.listenURL, getenv("DATABASE_LISTEN_URL"))
	return cfg, nil
}

// The errors of URLs that do not parse. They show nothing of the URL, nor
// the parser's message: go-redis quotes the URL whole, and pgx's redaction
// of a string it cannot parse is best effort, which lets parts of a
// password with a space or an unescaped '@' through.
var (
	errDatabaseURL = errors.New("-database-url (or DATABASE_URL) is neither a Postgres URL nor a keyword/value string; not shown, as it may hold a password (percent-encode special characters in a URL's password)")
	errRedisURL    = errors.New("-redis-url (or REDIS_URL) is not a Redis URL, redis://[[user]:password@]host:port/db; not shown, as it may hold a password (percent-encode special characters in it)")
	errReplicaURL  = errors.New("-replica-url (or DATABASE_REPLICA_URL) is neither a Postgres URL nor a keyword/value string; not shown, as it may hold a password")
	errListenURL   = errors.New("-listen-url (or DATABASE_LISTEN_URL) is neither a Postgres URL nor a keyword/value string; not shown, as it may hold a password")
)

// hideSecret returns err, or an error of the same message with every
// occurrence of secret (as is, or escaped as in a URL) replaced by "xxxxx".
// The drivers' connection errors name hosts, users and databases, never the
// password; this keeps it so, whatever their next version says.
func hideSecret(err error, secret string) error {
	if err == nil || secret == "" {
		return err
	}
	msg := err.Error()
	hidden := msg
	for _, s := range []string{secret, url.QueryEscape(secret), strings.TrimPrefix(url.UserPassword("", secret).String(), ":")} {
		hidden = strings.ReplaceAll(hidden, s, "xxxxx")
	}
	if hidden == msg {
		return err
	}
	return errors.New(hidden)
}

func run(ctx context.Context, cfg config, log *slog.Logger) error {
	pcfg, err := pgxpool.ParseConfig(cfg.dbURL)
	if err != nil {
		return errDatabaseURL
	}
	pw := pcfg.ConnConfig.Password
	pcfg.ConnConfig.RuntimeParams["application_name"] = "coherent-webapp-" + cfg.node
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return hideSecret(fmt.Errorf("postgres: %w", err), pw)
	}
	defer pool.Close()
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		return hideSecret(fmt.Errorf("postgres at %s unreachable: %w", redact(cfg.dbURL), err), pw)
	}
	var replica *pgxpool.Pool
	if cfg.replicaURL != "" {
		rcfg, err := pgxpool.ParseConfig(cfg.replicaURL)
		if err != nil {
			return errReplicaURL
		}
		rcfg.ConnConfig.RuntimeParams["application_name"] = "coherent-webapp-" + cfg.node + "-replica"
		if _, ok := rcfg.ConnConfig.RuntimeParams["search_path"]; !ok {
			if sp, ok := pcfg.ConnConfig.RuntimeParams["search_path"]; ok {
				rcfg.ConnConfig.RuntimeParams["search_path"] = sp // the items table's schema
			}
		}
		if replica, err = pgxpool.NewWithConfig(ctx, rcfg); err != nil {
			return hideSecret(fmt.Errorf("postgres replica: %w", err), rcfg.ConnConfig.Password)
		}
		defer replica.Close()
		// A replica that is down at start is not fatal: loads read the
		// primary until it answers.
	}
	ropts, err := redis.ParseURL(cfg.redisURL)
	if err != nil {
		return errRedisURL
	}
	ropts.ClientName = "coherent-webapp-" + cfg.node
	rdb := redis.NewClient(ropts)
	defer rdb.Close()
	if err := rdb.Ping(pctx).Err(); err != nil {
		return hideSecret(fmt.Errorf("redis at %s unreachable: %w", ropts.Addr, err), ropts.Password)
	}

	app, err := newApp(ctx, cfg, pool, replica, rdb, log)
	if err != nil {
		return err
	}
	defer app.close()

	srv := newServer(cfg.addr, app.routes(), serverTimeouts(cfg.lockTTL))
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	log.Info("listening", "addr", cfg.addr)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	return srv.Shutdown(sctx)
}

// timeouts bound how long a client may hold a connection; see http.Server.
type timeouts struct {
	readHeader, read, write, idle time.Duration
}

// serverTimeouts returns the timeouts of a server whose writes take locks
// with a lease of lockTTL.
func serverTimeouts(lockTTL time.Duration) timeouts {
	return timeouts{
		readHeader: 5 * time.Second,
		// The whole request, body included: at least 100 KB/s for a body
		// of maxBody.
		read: 10 * time.Second,
		// From the end of the request's headers to the end of the
		// response. The slowest legitimate write waits for a lock whose
		// holder stalled until the lease runs out, then runs its
		// transaction: the lease and 5s, and never less than 15s.
		write: max(15*time.Second, lockTTL+5*time.Second),
		idle:  60 * time.Second,
	}
}

// newServer returns the server of handler h on addr, with the timeouts to.
func newServer(addr string, h http.Handler, to timeouts) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           h,
		ReadHeaderTimeout: to.readHeader,
		ReadTimeout:       to.read,
		WriteTimeout:      to.write,
		IdleTimeout:       to.idle,
	}
}

// redact drops the password from a URL for messages.
func redact(u string) string {
	cfg, err := pgx.ParseConfig(u)
	if err != nil {
		return "(unparsable URL)"
	}
	return fmt.Sprintf("%s:%d/%s", cfg.Host, cfg.Port, cfg.Database)
}

// Item is a row of the items table.
type Item struct {
	ID      string `json:"id" db:"id"`
	Value   string `json:"value" db:"value"`
	Version int64  `json:"version" db:"version"`
}

type app struct {
	pool    *pgxpool.Pool
	rdb     *redis.Client
	bus     *invalidate.PubSub
	locks   *lockguard.Guard
	store   *store.Store
	metrics *prometheus.Registry
	items   *store.Table[string, Item]
	reads   *store.Replica               // nil without -replica-url
	audit   *store.Auditor[string, Item] // nil without -audit-rate
	log     *slog.Logger
	cancel  context.CancelFunc
	relay   chan error
	audited chan error // Run's result; nil without -audit-rate
}

// newApp wires the app: writes go to pool, the primary; loads go to
// replica, a streaming replica of it, when it is not nil and has replayed
// what they must see (store.Replica), else to the primary.
func newApp(ctx context.Context, cfg config, pool, replica *pgxpool.Pool, rdb *redis.Client, log *slog.Logger) (*app, error) {
	if err := store.Migrate(ctx, pool, cfg.schema); err != nil {
		return nil, err
	}
	// Instances start together; CREATE TABLE IF NOT EXISTS is not safe
	// against itself, so serialise it.
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('coherent.webapp.items', 0))`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS items (
			id text PRIMARY KEY, value text NOT NULL, version bigint NOT NULL)`)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create table items: %w", err)
	}
	bus, err := invalidate.NewPubSub(rdb, &invalidate.PubSubOptions{
		Channel: cfg.redisPrefix + "invalidations",
		Options: invalidate.Options{Logger: log},
	})
	if err != nil {
		return nil, err
	}
	// The watchdog renews a write's lock while it runs, so that a slow
	// transaction does not outlive its lease; a stalled process still
	// loses it, and the fence rejects its commit.
	locks, err := lockguard.New(rdb, &lockguard.Options{Prefix: cfg.redisPrefix + "lock:", TTL: cfg.lockTTL, Watchdog: true, Logger: log})
	if err != nil {
		bus.Close()
		return nil, err
	}
	var listen *pgx.ConnConfig
	if cfg.listenURL != "" {
		if listen, err = pgx.ParseConfig(cfg.listenURL); err != nil {
			locks.Close()
			bus.Close()
			return nil, errListenURL
		}
		listen.RuntimeParams["application_name"] = "coherent-webapp-" + cfg.node + "-listen"
	}
	reg := prometheus.NewRegistry()
	tr := newTracer(reg)
	s, err := store.New(pool, &store.Options{Schema: cfg.schema, Locks: locks, Publisher: bus, Tracer: tr, Logger: log, ListenConfig: listen})
	if err != nil {
		bus.Close()
		return nil, err
	}
	const selectItem = `SELECT id, value, version FROM items WHERE id = $1`
	load := store.Loader[string](pool, selectItem, pgx.RowToStructByName[Item])
	var reads *store.Replica
	if replica != nil {
		if reads, err = store.NewReplica(pool, replica, &store.ReplicaOptions{Logger: log}); err != nil {
			bus.Close()
			return nil, err
		}
		load = store.ReplicaLoader[string](reads, selectItem, pgx.RowToStructByName[Item])
	}
	var codec cache.Codec[Item]
	if cfg.broadcast {
		// Writes through the store send the committed item; captured
		// writes from other clients stay plain invalidations.
		codec = cache.JSONCodec[Item]{}
	}
	itemsCache, err := cache.New("items", 100_000,
		load,
		&cache.Options[string, Item]{
			Bus:          bus,
			MaxStaleness: cfg.maxStaleness,
			Version:      func(it Item) int64 { return it.Version },
			// A byte budget beside the entry count: 100,000 entries of
			// values up to 1 MiB would otherwise let clients fill about
			// 100 GB. The budget is split among the shards, and a value
			// larger than a shard's share is served but not cached; with
			// 16 shards a share is 4 MiB, whatever the machine's cores.
			MaxWeight: 64 << 20,
			Weigher:   itemWeight,
			Shards:    16,
			Tracer:    tr,
			Logger:    log,
			Codec:     codec,
		})
	if err != nil {
		bus.Close()
		return nil, err
	}
	items := store.NewTable(s, itemsCache, &store.TableOptions{Table: "items", KeyColumn: "id", VersionColumn: "version"})
	if err := items.Capture(ctx); err != nil { // writes from other clients invalidate too
		itemsCache.Close()
		bus.Close()
		return nil, err
	}
	var audit *store.Auditor[string, Item]
	if cfg.auditRate > 0 {
		// The auditor reads the primary, whatever the loads read: a
		// lagging replica would pass for a stale cache.
		audit, err = store.NewAuditor(itemsCache, store.Loader[string](pool, selectItem, pgx.RowToStructByName[Item]),
			&store.AuditOptions[Item]{Rate: cfg.auditRate, Version: func(it Item) int64 { return it.Version }, Logger: log})
		if err != nil {
			itemsCache.Close()
			bus.Close()
			return nil, err
		}
	}
	sc := statsCollector{cache: itemsCache.Stats, bus: bus.Stats, store: s.Stats}
	if reads != nil {
		sc.replica = reads.Stats
	}
	if audit != nil {
		sc.audit = audit.Stats
	}
	reg.MustRegister(sc,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	a := &app{pool: pool, rdb: rdb, bus: bus, locks: locks, store: s, items: items, reads: reads, audit: audit, metrics: reg, log: log, cancel: cancel, relay: make(chan error, 1)}
	go func() { a.relay <- s.RunRelay(rctx) }()
	if audit != nil {
		a.audited = make(chan error, 1)
		go func() { a.audited <- audit.Run(rctx) }()
	}
	return a, nil
}

func (a *app) close() {
	a.cancel()
	<-a.relay
	if a.audited != nil {
		<-a.audited
	}
	a.items.Cache().Close()
	a.bus.Close()
	a.locks.Close()
}

// itemWeight is what an item costs the cache: its bytes, and a fixed
// overhead for the entry.
func itemWeight(id string, it Item) uint32 {
	return uint32(min(uint64(64+len(id)+len(it.ID)+len(it.Value)), math.MaxUint32))
}
