package testenv

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The private Postgres servers of the tests that need more than
// DATABASE_URL are named by three variables, which
// integration/pgreplica/pg.sh prints and .ci/run exports:
//
//	DATABASE_PRIMARY_URL  a primary of the test run's own
//	DATABASE_REPLICA_URL  a hot standby streaming from it
//	DATABASE_POOLER_URL   pgbouncer in pool_mode = transaction in front of
//	                      the primary
//
// By hand:
//
//	while read -r v; do export "$v"; done < <(integration/pgreplica/pg.sh start)
//	go test -race -count=1 ./store
//	integration/pgreplica/pg.sh stop
//
// Without them the tests that need them skip, or fail under CI, as with
// the other services. The servers are the run's own: a test may create
// databases there (drop them at its end), and may stop the replica's
// replay (resume it at its end), but must not restart the servers, which
// other packages' tests use at the same time.

// ReplicaURLs returns DATABASE_PRIMARY_URL and DATABASE_REPLICA_URL. It
// skips t when either is not set, or the servers do not answer as a
// primary and a hot standby streaming from it, and fails it instead under
// CI (see [Unavailable]).
func ReplicaURLs(t testing.TB) (primary, replica string) {
	t.Helper()
	primary, replica = os.Getenv("DATABASE_PRIMARY_URL"), os.Getenv("DATABASE_REPLICA_URL")
	if primary == "" || replica == "" {
		Unavailable(t, "a Postgres primary and replica", errors.New("DATABASE_PRIMARY_URL or DATABASE_REPLICA_URL is not set (start them with integration/pgreplica/pg.sh)"))
	}
	if err := replicaCheck(primary, replica); err != nil {
		Unavailable(t, "the Postgres primary and replica", err)
	}
	return primary, replica
}

// PoolerURL returns DATABASE_POOLER_URL, a pgbouncer in transaction mode,
// and DATABASE_PRIMARY_URL, the server behind it. It skips t when either
// is not set or does not answer, or when they do not reach the same
// server, and fails it instead under CI (see [Unavailable]). The URL
// carries no default_query_exec_mode: see [WithParam].
func PoolerURL(t testing.TB) (pooler, primary string) {
	t.Helper()
	pooler, primary = os.Getenv("DATABASE_POOLER_URL"), os.Getenv("DATABASE_PRIMARY_URL")
	if pooler == "" || primary == "" {
		Unavailable(t, "pgbouncer", errors.New("DATABASE_POOLER_URL or DATABASE_PRIMARY_URL is not set (start them with integration/pgreplica/pg.sh)"))
	}
	if err := poolerCheck(pooler, primary); err != nil {
		Unavailable(t, "pgbouncer", err)
	}
	return pooler, primary
}

// WithParam returns the Postgres URL u with the query parameter key set to
// value, default_query_exec_mode for example.
func WithParam(t testing.TB, u, key, value string) string {
	t.Helper()
	p, err := url.Parse(u)
	if err != nil || !strings.Contains(u, "://") {
		t.Fatalf("%q is not a Postgres URL", u)
	}
	q := p.Query()
	q.Set(key, value)
	p.RawQuery = q.Encode()
	return p.String()
}

// WithDatabase returns the Postgres URL u naming database db instead.
func WithDatabase(t testing.TB, u, db string) string {
	t.Helper()
	p, err := url.Parse(u)
	if err != nil || !strings.Contains(u, "://") {
		t.Fatalf("%q is not a Postgres URL", u)
	}
	p.Path = "/" + db
	return p.String()
}

// Database creates a database of the test's own on the server of the
// Postgres URL admin (not through a pooler: CREATE DATABASE cannot run in
// a transaction block, which a pooler does not change, but DROP DATABASE
// must terminate the pooler's server connections to it) and drops it at
// the end of the test, terminating the connections still open to it. A
// pooler in front of that server reaches it under the same name (pg.sh's
// pgbouncer routes every database name). It returns the database's name.
func Database(t testing.TB, admin string) string {
	t.Helper()
	name := Name("coh_test_")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		Unavailable(t, "Postgres", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `CREATE DATABASE `+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, admin)
		if err != nil {
			t.Errorf("drop database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, `DROP DATABASE `+pgx.Identifier{name}.Sanitize()+` WITH (FORCE)`); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	return name
}

var replicaChecks sync.Map // "primary\x00replica" → *onceErr

type onceErr struct {
	once sync.Once
	err  error
}

func checkOnce(key string, check func() error) error {
	v, _ := replicaChecks.LoadOrStore(key, &onceErr{})
	o := v.(*onceErr)
	o.once.Do(func() { o.err = check() })
	return o.err
}

// replicaCheck makes sure, once per test binary, that primary is a
// primary and replica a hot standby that streams from it.
func replicaCheck(primary, replica string) error {
	return checkOnce("replica\x00"+primary+"\x00"+replica, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var recovery bool
		var sysid, standbyOf string
		if err := queryRow(ctx, primary, `SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system())`, &recovery, &sysid); err != nil {
			return fmt.Errorf("DATABASE_PRIMARY_URL: %w", err)
		}
		if recovery {
			return errors.New("DATABASE_PRIMARY_URL names a server in recovery, not a primary")
		}
		if err := queryRow(ctx, replica, `SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system())`, &recovery, &standbyOf); err != nil {
			return fmt.Errorf("DATABASE_REPLICA_URL: %w", err)
		}
		if !recovery || standbyOf != sysid {
			return errors.New("DATABASE_REPLICA_URL names no hot standby of DATABASE_PRIMARY_URL")
		}
		var streaming bool
		if err := queryRow(ctx, replica, `SELECT EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')`, &streaming); err != nil {
			return fmt.Errorf("DATABASE_REPLICA_URL: %w", err)
		}
		if !streaming {
			return errors.New("DATABASE_REPLICA_URL does not stream from its primary")
		}
		return nil
	})
}

// poolerCheck makes sure, once per test binary, that pooler answers and
// reaches the server of primary.
func poolerCheck(pooler, primary string) error {
	return checkOnce("pooler\x00"+pooler+"\x00"+primary, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var a, b string
		if err := queryRow(ctx, primary, `SELECT system_identifier::text || ':' || current_setting('port') FROM pg_control_system()`, &a); err != nil {
			return fmt.Errorf("DATABASE_PRIMARY_URL: %w", err)
		}
		// The simple protocol: whatever the pooler keeps of prepared
		// statements, this works.
		cfg, err := pgx.ParseConfig(pooler)
		if err != nil {
			return fmt.Errorf("DATABASE_POOLER_URL: %w", err)
		}
		cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return fmt.Errorf("DATABASE_POOLER_URL: %w", err)
		}
		defer conn.Close(ctx)
		if err := conn.QueryRow(ctx, `SELECT system_identifier::text || ':' || current_setting('port') FROM pg_control_system()`).Scan(&b); err != nil {
			return fmt.Errorf("DATABASE_POOLER_URL: %w", err)
		}
		if a != b {
			return errors.New("DATABASE_POOLER_URL does not lead to the server of DATABASE_PRIMARY_URL")
		}
		return nil
	})
}

func queryRow(ctx context.Context, dsn, sql string, dst ...any) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return err
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return conn.QueryRow(ctx, sql).Scan(dst...)
}
