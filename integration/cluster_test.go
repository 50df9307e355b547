package integration

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/internal/testenv"
)

// The webapp's timings, which the bounds below are made of. MaxStaleness
// is the webapp's -max-staleness (its default); Grace and RelayPoll are
// store.Options' defaults, which the webapp does not change.
const (
	maxStaleness = time.Second
	grace        = 2 * time.Second
	relayPoll    = time.Second
	// slack covers what the bounds do not: the default clock of package
	// cache lags real time by a tick plus its goroutine's scheduling
	// delay, and this machine is shared.
	slack = 50 * time.Millisecond
)

// The G2 bounds of the scenarios; see the package documentation.
var (
	// boundProof is G2's bound when every acknowledged write was
	// published: a node serves a cached value only while it holds a proof
	// sent less than MaxStaleness ago, and a probe sent after a publication
	// comes back after it, so a read that starts MaxStaleness after the
	// write returned is either proven past the invalidation or bypasses.
	boundProof = maxStaleness + slack
	// boundRelay is the bound when a writer's publication may have failed
	// after its commit (Redis went away under it): the outbox row waits
	// Grace, a relay finds it within RelayPoll, and the argument above
	// applies from its publication.
	boundRelay = grace + relayPoll + maxStaleness + slack
	// boundCapture is the bound of outside writes: the relay is woken by
	// NOTIFY at the commit, or polls within RelayPoll, and then as above.
	boundCapture = relayPoll + maxStaleness + slack
)

// clusterConfig configures a cluster of webapp processes.
type clusterConfig struct {
	Nodes    int
	RedisURL string        // default: testenv.RedisURL()
	LockTTL  time.Duration // the webapp's -lock-ttl; default 2s
	// MaxStaleness is the webapp's -max-staleness; default maxStaleness.
	// The bounds above assume the default.
	MaxStaleness time.Duration
	// Extra holds more flags for some nodes, by index.
	Extra map[int][]string
	// DatabaseURL is the Postgres of the nodes (-database-url) and of
	// the test's own writes. Without Schema, newCluster adds to it
	// search_path set to the test's schema; with Schema, it is used as it
	// is, and its database's search_path must lead to Schema (a pooler
	// refuses search_path as a connection parameter: ALTER DATABASE … SET
	// search_path). Default DATABASE_URL.
	DatabaseURL string
	// Schema is the test's schema, which newCluster creates and drops;
	// default a new name.
	Schema string
	// ReplicaURL, if set, is a streaming replica of DatabaseURL that every
	// node's loads read (the webapp's -replica-url), with search_path
	// added as to DatabaseURL.
	ReplicaURL string
}

// cluster is a set of webapp processes sharing a schema of the test's own
// (for the items table and the library's tables) and a Redis key prefix
// of its own, plus the history of what the test did to them.
type cluster struct {
	t          testing.TB
	id         string // names the nodes; unique per test
	schema     string
	dbURL      string
	replicaURL string // "": the nodes read the primary
	redisURL   string
	prefix     string
	lockTTL    time.Duration
	staleness  time.Duration
	db         *pgxpool.Pool // outside writes and snapshots
	hist       *History
	http       *http.Client
	nodes      []*node

	mu         sync.Mutex // guards unexpected
	unexpected []string   // nodes that exited without the test asking
}

// node is one webapp process, restarted as needed on the same address.
type node struct {
	c     *cluster
	name  string // the webapp's -node; its connections are named coherent-webapp-<name>
	short string // n1, n2, …: in histories
	log   *logBuffer

	mu       sync.Mutex // guards the fields below
	addr     string     // where it listens; changes only if another process took the port
	cmd      *exec.Cmd
	done     chan struct{} // closed when the current incarnation exits
	expected bool          // the test killed it, or made it crash
	stopped  bool          // SIGSTOPped
	starts   int
	mark     int // where the current incarnation's output begins in log
}

// logBuffer collects a process's output.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// newCluster starts cfg.Nodes webapp processes and waits until each is
// healthy. Everything is torn down at the end of the test: the processes
// are killed, the schema dropped, the Redis keys deleted.
func newCluster(t testing.TB, cfg clusterConfig) *cluster {
	t.Helper()
	dbURL := cmp.Or(cfg.DatabaseURL, testenv.DatabaseURL())
	db := testenv.Pool(t, testenv.PoolConfigFor(t, dbURL, "coherent-integration", ""))
	if cfg.RedisURL == "" {
		cfg.RedisURL = testenv.RedisURL()
	}
	if cfg.LockTTL == 0 {
		cfg.LockTTL = 2 * time.Second
	}
	if cfg.MaxStaleness == 0 {
		cfg.MaxStaleness = maxStaleness
	}
	c := &cluster{
		t:         t,
		id:        testenv.Name("")[:8],
		schema:    cfg.Schema,
		redisURL:  cfg.RedisURL,
		lockTTL:   cfg.LockTTL,
		staleness: cfg.MaxStaleness,
		db:        db,
		hist:      NewHistory(),
		http: &http.Client{
			Timeout:   5 * time.Second,
			Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true},
		},
	}
	c.prefix = "coherent-it:" + c.id + ":"
	if cfg.RedisURL == testenv.RedisURL() {
		testenv.DeleteKeys(t, testenv.Redis(t), c.prefix)
	}
	if c.schema == "" {
		c.schema = testenv.Schema(t, db)
	} else {
		ident := pgx.Identifier{c.schema}.Sanitize()
		if _, err := db.Exec(context.Background(), `CREATE SCHEMA `+ident); err != nil {
			t.Fatalf("create schema: %v", err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := db.Exec(ctx, `DROP SCHEMA `+ident+` CASCADE`); err != nil {
				t.Errorf("drop schema %s: %v", c.schema, err)
			}
		})
	}
	var err error
	c.dbURL, c.replicaURL = dbURL, cfg.ReplicaURL
	if cfg.Schema == "" {
		if c.dbURL, err = withSearchPath(dbURL, c.schema); err != nil {
			t.Fatal(err)
		}
		if cfg.ReplicaURL != "" {
			if c.replicaURL, err = withSearchPath(cfg.ReplicaURL, c.schema); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(c.teardown)
	addrs, err := freeAddrs(cfg.Nodes)
	if err != nil {
		t.Fatal(err)
	}
	for i := range cfg.Nodes {
		n := &node{c: c, short: fmt.Sprintf("n%d", i+1), log: &logBuffer{}, addr: addrs[i]}
		n.name = c.id + "-" + n.short
		c.nodes = append(c.nodes, n)
	}
	errs := make([]error, len(c.nodes))
	var wg sync.WaitGroup
	for i, n := range c.nodes {
		wg.Go(func() { errs[i] = n.up(cfg.Extra[i]...) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %s: %v\n%s", c.nodes[i].short, err, tail(c.nodes[i].log.String(), 30))
		}
	}
	return c
}

// nodeEnv is the environment of a node: the test's, without the
// variables the webapp reads in place of a flag the cluster did not give
// (under CI, DATABASE_REPLICA_URL names a replica of another primary).
func nodeEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DATABASE_REPLICA_URL=") && !strings.HasPrefix(kv, "DATABASE_LISTEN_URL=") {
			env = append(env, kv)
		}
	}
	return env
}

// withSearchPath adds search_path=schema to a Postgres URL or keyword/value
// string. pgx passes parameters it does not know to the server as run-time
// parameters, so the webapp's unqualified "items" resolves in schema.
func withSearchPath(dsn, schema string) (string, error) {
	if !strings.Contains(dsn, "://") {
		return dsn + " search_path=" + schema, nil
	}
	u, err := url.Parse(dsn)
	if err != nil {
		return "", fmt.Errorf("DATABASE_URL: %w", err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// freeAddrs returns n distinct loopback addresses whose ports nobody
// listens on now. (Another process may take one before a node binds it; up
// then moves the node to another.)
func freeAddrs(n int) ([]string, error) {
	var addrs []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close() // held until all are chosen, so they differ
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}

// table is the items table of the cluster, quoted.
func (c *cluster) table() string { return pgx.Identifier{c.schema, "items"}.Sanitize() }

// teardown kills the processes; on failure it keeps the history and the
// logs in a directory it names, and prints the end of each log.
func (c *cluster) teardown() {
	for _, n := range c.nodes {
		n.kill()
	}
	c.http.CloseIdleConnections()
	for _, n := range c.nodes {
		if strings.Contains(n.log.String(), "DATA RACE") {
			c.t.Errorf("node %s: the race detector found a data race; see its log", n.short)
		}
	}
	c.reportUnexpected()
	if !c.t.Failed() && os.Getenv("COHERENT_IT_KEEP") == "" {
		return
	}
	dir, err := os.MkdirTemp("", "coherent-integration-"+c.id+"-")
	if err == nil {
		var h strings.Builder
		for _, o := range c.hist.Ops() {
			h.WriteString(o.String() + "\n")
		}
		_ = os.WriteFile(filepath.Join(dir, "history.txt"), []byte(h.String()), 0o644)
		for _, n := range c.nodes {
			_ = os.WriteFile(filepath.Join(dir, n.short+".log"), []byte(n.log.String()), 0o644)
		}
		c.t.Logf("full history and node logs kept in %s", dir)
	}
	if !c.t.Failed() {
		return
	}
	for _, n := range c.nodes {
		c.t.Logf("last lines of %s's log (%s):\n%s", n.short, n.name, tail(n.log.String(), 25))
	}
}

func tail(s string, lines int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > lines {
		ls = append([]string{fmt.Sprintf("… %d lines before", len(ls)-lines)}, ls[len(ls)-lines:]...)
	}
	return "    " + strings.Join(ls, "\n    ")
}

func (c *cluster) reportUnexpected() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.unexpected {
		c.t.Errorf("%s", s)
	}
	c.unexpected = nil
}

// node returns the node whose short name is short.
func (c *cluster) node(short string) *node {
	for _, n := range c.nodes {
		if n.short == short {
			return n
		}
	}
	c.t.Fatalf("no node %s", short)
	return nil
}

// up starts an incarnation of n (which must not be running) with flags
// added to the cluster's, and waits until it is healthy. It starts it
// again whenever it exits first: the webapp exits at once if Redis or
// Postgres is unreachable at start-up (as during a restart of Redis), or if
// another process took its port (then it moves to another). It gives up
// after 30 seconds. An exit after up returned fails the test, unless the
// test killed the node.
func (n *node) up(flags ...string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := n.launch(flags); err != nil {
			return err
		}
		err := n.awaitHealthy(time.Until(deadline))
		if err == nil {
			n.mu.Lock()
			n.expected = false
			n.mu.Unlock()
			if !n.running() {
				return errors.New("exited right after it was healthy")
			}
			return nil
		}
		if n.running() || time.Now().After(deadline) {
			return err
		}
		if strings.Contains(n.log.String()[n.logMark():], "address already in use") {
			addrs, err := freeAddrs(1)
			if err != nil {
				return err
			}
			n.mu.Lock()
			n.addr = addrs[0]
			n.mu.Unlock()
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// mustUp is up for the test's goroutine.
func (n *node) mustUp(t testing.TB, flags ...string) {
	t.Helper()
	if err := n.up(flags...); err != nil {
		t.Fatalf("node %s: %v\n%s", n.short, err, tail(n.log.String(), 30))
	}
}

// logMark returns where the current incarnation's output begins in n.log.
func (n *node) logMark() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.mark
}

// address returns where n listens.
func (n *node) address() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.addr
}

// launch starts an incarnation, whose exit is expected until up has seen
// it healthy.
func (n *node) launch(flags []string) error {
	c := n.c
	args := []string{
		"-addr", n.address(), "-node", n.name,
		"-database-url", c.dbURL, "-redis-url", c.redisURL,
		"-schema", c.schema, "-redis-prefix", c.prefix,
		"-lock-ttl", c.lockTTL.String(), "-max-staleness", c.staleness.String(),
	}
	if c.replicaURL != "" {
		args = append(args, "-replica-url", c.replicaURL)
	}
	args = append(args, flags...)
	cmd := exec.Command(webappBin, args...)
	cmd.Stdout, cmd.Stderr = n.log, n.log
	cmd.Env = append(nodeEnv(), "GORACE=halt_on_error=1")
	testenv.DieWithParent(cmd)
	n.mu.Lock()
	defer n.mu.Unlock()
	n.starts++
	n.mark = len(n.log.String())
	fmt.Fprintf(n.log, "--- integration: start #%d at %s: webapp %s\n", n.starts, fmtDur(c.hist.Now()), strings.Join(flags, " "))
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", n.short, err)
	}
	done := make(chan struct{})
	n.cmd, n.done, n.expected, n.stopped = cmd, done, true, false
	go func() {
		err := cmd.Wait()
		n.mu.Lock()
		expected := n.expected
		n.mu.Unlock()
		fmt.Fprintf(n.log, "--- integration: exit at %s: %v\n", fmtDur(c.hist.Now()), err)
		if !expected {
			c.mu.Lock()
			c.unexpected = append(c.unexpected, fmt.Sprintf("node %s exited unexpectedly at %s: %v", n.short, fmtDur(c.hist.Now()), err))
			c.mu.Unlock()
		}
		close(done)
	}()
	return nil
}

// running reports whether n's current incarnation is alive.
func (n *node) running() bool {
	n.mu.Lock()
	done := n.done
	n.mu.Unlock()
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// serving reports whether n runs and is not stopped.
func (n *node) serving() bool {
	n.mu.Lock()
	stopped := n.stopped
	n.mu.Unlock()
	return !stopped && n.running()
}

// awaitHealthy waits until n answers /healthz with 200: connected to
// Postgres and Redis, with a proven bus link.
func (n *node) awaitHealthy(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		if !n.running() {
			return errors.New("exited before it was healthy")
		}
		status, body, err := n.c.request(n, http.MethodGet, "/healthz", nil)
		switch {
		case err != nil:
			last = err.Error()
		case status == http.StatusOK:
			return nil
		default:
			last = fmt.Sprintf("HTTP %d %s", status, body)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not healthy after %v: %s", timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pause stops n with SIGSTOP, as a long GC pause or a frozen VM would.
func (n *node) pause() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := n.cmd.Process.Signal(syscall.SIGSTOP); err == nil {
		n.stopped = true
		fmt.Fprintf(n.log, "--- integration: SIGSTOP at %s\n", fmtDur(n.c.hist.Now()))
	}
}

// resume continues n after pause.
func (n *node) resume() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stopped {
		_ = n.cmd.Process.Signal(syscall.SIGCONT)
		n.stopped = false
		fmt.Fprintf(n.log, "--- integration: SIGCONT at %s\n", fmtDur(n.c.hist.Now()))
	}
}

// kill kills n's current incarnation with SIGKILL and waits for it. A
// stopped (paused) incarnation dies without running again.
func (n *node) kill() {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.expected = true
	n.stopped = false
	n.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		n.c.t.Errorf("node %s did not exit 10s after SIGKILL", n.short)
	}
}

// request sends one HTTP request to n and returns the status and body.
func (c *cluster) request(n *node, method, path string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+n.address()+path, rd)
	if err != nil {
		return 0, nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		return resp.StatusCode, nil, err
	}
	return resp.StatusCode, b, nil
}

// item is the webapp's JSON item.
type item struct {
	ID      string `json:"id"`
	Value   string `json:"value"`
	Version int64  `json:"version"`
}

// do runs one API operation on n and records it.
func (c *cluster) do(n *node, kind Kind, key, arg string) Op {
	op := Op{Node: n.short, Kind: kind, Key: key, Arg: arg}
	path := "/items/" + url.PathEscape(key)
	var method string
	var body any
	switch kind {
	case KindGet:
		method = http.MethodGet
	case KindPut:
		method, body = http.MethodPut, map[string]string{"value": arg}
	case KindAdd:
		d, _ := strconv.ParseInt(arg, 10, 64)
		method, path, body = http.MethodPost, path+"/add", map[string]int64{"delta": d}
	case KindDelete:
		method = http.MethodDelete
	}
	op.Start = c.hist.Now()
	status, b, err := c.request(n, method, path, body)
	op.End = c.hist.Now()
	op.Status = status
	classify(&op, b, err)
	return c.hist.Add(op)
}

// classify sets op's outcome from the response.
func classify(op *Op, body []byte, err error) {
	unknown := Unknown
	if op.Kind == KindGet {
		unknown = Failed // a failed read has no effect; nothing to check
	}
	switch {
	case err != nil:
		op.Outcome, op.Err = unknown, err.Error()
	case op.Status == http.StatusOK:
		var it item
		if err := json.Unmarshal(body, &it); err != nil {
			op.Outcome, op.Err = unknown, "bad JSON: "+err.Error()
			return
		}
		op.Outcome, op.Found, op.Value, op.Version = OK, true, it.Value, it.Version
	case op.Status == http.StatusNotFound && op.Kind == KindGet:
		op.Outcome = OK
	case op.Status == http.StatusNoContent && op.Kind == KindDelete:
		op.Outcome = OK
	case op.Status == http.StatusBadRequest || op.Status == http.StatusConflict:
		op.Outcome, op.Err = Failed, strings.TrimSpace(string(body))
	default:
		op.Outcome, op.Err = unknown, strings.TrimSpace(string(body))
		// The fence rolled the transaction back: the write did not
		// happen. (G6's check is then stricter, not looser.)
		if op.fenced() {
			op.Outcome = Failed
		}
	}
}

func (c *cluster) get(n *node, key string) Op        { return c.do(n, KindGet, key, "") }
func (c *cluster) put(n *node, key, value string) Op { return c.do(n, KindPut, key, value) }
func (c *cluster) del(n *node, key string) Op        { return c.do(n, KindDelete, key, "") }
func (c *cluster) add(n *node, key string, d int64) Op {
	return c.do(n, KindAdd, key, strconv.FormatInt(d, 10))
}

// sqlUpsert writes key outside the library, as psql would, and records it.
// With version 0 it bumps the row's version like the webapp does (for keys
// the API writes too); otherwise it sets that version (for keys only
// outside writes change, which may be deleted and inserted again).
func (c *cluster) sqlUpsert(key, value string, version int64) Op {
	op := Op{Node: SQLNode, Kind: KindSQLUpsert, Key: key, Arg: value}
	q := `INSERT INTO ` + c.table() + ` AS t (id, value, version) VALUES ($1, $2, 1)
		ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, version = t.version + 1
		RETURNING value, version`
	args := []any{key, value}
	if version != 0 {
		q = `INSERT INTO ` + c.table() + ` AS t (id, value, version) VALUES ($1, $2, $3)
			ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version
			RETURNING value, version`
		args = append(args, version)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	op.Start = c.hist.Now()
	err := c.db.QueryRow(ctx, q, args...).Scan(&op.Value, &op.Version)
	op.End = c.hist.Now()
	if err != nil {
		op.Outcome, op.Err = Unknown, err.Error()
	} else {
		op.Found = true
	}
	return c.hist.Add(op)
}

// sqlDelete deletes key outside the library and records the deletion as
// version tombstone of the key, which the caller keeps above every
// version the key had.
func (c *cluster) sqlDelete(key string, tombstone int64) Op {
	op := Op{Node: SQLNode, Kind: KindSQLDelete, Key: key, Version: tombstone}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	op.Start = c.hist.Now()
	_, err := c.db.Exec(ctx, `DELETE FROM `+c.table()+` WHERE id = $1`, key)
	op.End = c.hist.Now()
	if err != nil {
		op.Outcome, op.Err = Unknown, err.Error()
	}
	return c.hist.Add(op)
}

// snapshot reads keys from Postgres.
func (c *cluster) snapshot(keys []string) (map[string]Row, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := c.db.Query(ctx, `SELECT id, value, version FROM `+c.table()+` WHERE id = ANY($1)`, keys)
	if err != nil {
		return nil, err
	}
	snap := make(map[string]Row, len(keys))
	for _, k := range keys {
		snap[k] = Row{}
	}
	var id string
	var r Row
	_, err = pgx.ForEachRow(rows, []any{&id, &r.Value, &r.Version}, func() error {
		r.Found = true
		snap[id] = r
		return nil
	})
	return snap, err
}

// workload describes the operations drive issues.
type workload struct {
	// Workers is the number of goroutines issuing gets, puts and adds on
	// random nodes, back to back.
	Workers int
	// AddKeys are written only by adds of small positive deltas (G6).
	AddKeys []string
	// PutKeys are written by puts of unique values, and by outside
	// upserts if SQLOnPut.
	PutKeys  []string
	SQLOnPut bool
	// SQLKeys are written only outside the library: upserts and deletes,
	// with versions kept growing across deletes.
	SQLKeys []string
	// DelKeys are put a few times, then deleted, through the API, by one
	// goroutine in turn; a deleted key is only read afterwards (the webapp
	// would restart its version at 1).
	DelKeys []string
	// SQLPace is the pause between outside writes. Default 25ms.
	SQLPace time.Duration
}

func (w workload) keys() []string {
	return slices.Concat(w.AddKeys, w.PutKeys, w.SQLKeys, w.DelKeys)
}

// standardWorkload is what most tests drive: four workers, a few hot keys
// of each kind, so that reads and writes of one key race across nodes.
func standardWorkload() workload {
	return workload{
		Workers: 4,
		AddKeys: []string{"a1", "a2"},
		PutKeys: []string{"p1", "p2", "p3"},
		DelKeys: []string{"d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"},
	}
}

// drive issues w's operations on random nodes until the returned function
// is called; that function waits for every operation in flight.
func (c *cluster) drive(w workload) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var seq sync.Mutex
	n := 0
	unique := func(worker string) string {
		seq.Lock()
		defer seq.Unlock()
		n++
		return fmt.Sprintf("%s-%d", worker, n)
	}
	all := w.keys()
	// Operations go to nodes that run: a request to a stopped node waits
	// for it (the tests that stop nodes send those on purpose), and a
	// dead node refuses it.
	randomNode := func() *node {
		for range 8 {
			if n := c.nodes[rand.IntN(len(c.nodes))]; n.serving() {
				return n
			}
		}
		return c.nodes[rand.IntN(len(c.nodes))]
	}
	for i := range w.Workers {
		wg.Go(func() {
			name := fmt.Sprintf("w%d", i+1)
			for ctx.Err() == nil {
				p := rand.IntN(100)
				switch {
				case p < 25 && len(w.AddKeys) > 0:
					c.add(randomNode(), w.AddKeys[rand.IntN(len(w.AddKeys))], 1+rand.Int64N(5))
				case p < 45 && len(w.PutKeys) > 0:
					c.put(randomNode(), w.PutKeys[rand.IntN(len(w.PutKeys))], unique(name))
				default:
					c.get(randomNode(), all[rand.IntN(len(all))])
				}
			}
		})
	}
	if len(w.DelKeys) > 0 {
		wg.Go(func() {
			for _, k := range w.DelKeys {
				certain := true
				for range 2 + rand.IntN(3) {
					if ctx.Err() != nil {
						return
					}
					op := c.put(randomNode(), k, unique("del"))
					certain = certain && op.Outcome != Unknown
					sleepCtx(ctx, 100*time.Millisecond)
				}
				// A put of unknown outcome may still commit after the
				// delete and recreate the key at version 1: leave it.
				if certain && ctx.Err() == nil {
					c.del(randomNode(), k)
				}
				sleepCtx(ctx, 200*time.Millisecond)
			}
		})
	}
	if w.SQLOnPut || len(w.SQLKeys) > 0 {
		pace := w.SQLPace
		if pace == 0 {
			pace = 25 * time.Millisecond
		}
		wg.Go(func() {
			versions := map[string]int64{} // the highest version each SQL key had
			for ctx.Err() == nil {
				if len(w.SQLKeys) > 0 && (!w.SQLOnPut || rand.IntN(2) == 0) {
					k := w.SQLKeys[rand.IntN(len(w.SQLKeys))]
					versions[k]++
					if rand.IntN(4) == 0 {
						c.sqlDelete(k, versions[k])
					} else {
						c.sqlUpsert(k, unique("sql"), versions[k])
					}
				} else {
					c.sqlUpsert(w.PutKeys[rand.IntN(len(w.PutKeys))], unique("sql"), 0)
				}
				sleepCtx(ctx, pace)
			}
		})
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// converge checks G3: once the test has stopped its faults and writes, it
// waits until every running node is healthy and returns, for every key,
// exactly what Postgres holds (404 for a missing row), in a round that
// Postgres did not change during. It fails the test, with the stragglers
// and their keys' histories, if that does not happen within timeout (which
// must stay well below the webapp's TTLs, 10m and 1m for absences, so that
// expiry cannot pass for convergence). It returns the final snapshot.
func (c *cluster) converge(t testing.TB, keys []string, timeout time.Duration) map[string]Row {
	t.Helper()
	start := c.hist.Now()
	deadline := time.Now().Add(timeout)
	var live []*node
	for _, n := range c.nodes {
		if n.running() {
			live = append(live, n)
		}
	}
	for _, n := range live {
		if err := n.awaitHealthy(time.Until(deadline)); err != nil {
			t.Errorf("G3: node %s: %v", n.short, err)
			return nil
		}
	}
	type miss struct {
		node     *node
		key      string
		got, db  Row
		lastRead Op
	}
	var misses []miss
	for {
		snap, err := c.snapshot(keys)
		if err != nil {
			t.Fatalf("G3: reading Postgres: %v", err)
		}
		misses = misses[:0]
		for _, n := range live {
			for _, k := range keys {
				op := c.get(n, k)
				got := Row{Found: op.Found, Value: op.Value, Version: op.Version}
				if op.Outcome != OK || got != snap[k] {
					misses = append(misses, miss{n, k, got, snap[k], op})
				}
			}
		}
		if len(misses) == 0 {
			again, err := c.snapshot(keys)
			if err == nil && mapsEqual(again, snap) {
				t.Logf("G3: %d nodes agree with Postgres on %d keys, %v after the writes stopped", len(live), len(keys), (c.hist.Now() - start).Round(time.Millisecond))
				return snap
			}
			continue
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	ops := c.hist.Ops()
	shown := map[string]bool{}
	for _, m := range misses {
		got := m.got.String()
		if m.lastRead.Outcome != OK {
			got = fmt.Sprintf("an error (HTTP %d %s)", m.lastRead.Status, m.lastRead.Err)
		}
		t.Errorf("G3: %v after the writes stopped, node %s returns %s for %q; Postgres holds %s", timeout, m.node.short, got, m.key, m.db)
		if !shown[m.key] {
			shown[m.key] = true
			t.Log(explainKey(ops, m.key, m.lastRead.ID))
		}
	}
	return nil
}

// explainKey formats the writes of key, and the last reads, up to op last.
func explainKey(ops []Op, key string, last int) string {
	var lastWrite time.Duration
	for _, o := range ops {
		if o.Key == key && o.Kind.isWrite() {
			lastWrite = max(lastWrite, o.End)
		}
	}
	v := Violation{Rule: "G3", Key: key, Msg: "the node never converged", Ops: []int{last}}
	return Explain(ops, v, lastWrite-2*time.Second, lastWrite+time.Second)
}

func mapsEqual(a, b map[string]Row) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// check runs converge (G3) and then the history checks (G1, G2 with
// bounds, versions, and G6 for addKeys), failing t with the offending
// slices of the history, and logs what the history shows.
func (c *cluster) check(t testing.TB, keys, addKeys []string, b Bounds) CheckResult {
	t.Helper()
	c.reportUnexpected()
	final := c.converge(t, keys, 20*time.Second)
	ops := c.hist.Ops()
	res := Check(ops, b)
	vs := res.Violations
	if final != nil {
		vs = append(vs, CheckAdds(ops, addKeys, final)...)
	}
	for _, e := range explainByKey(ops, vs, time.Second) {
		t.Error(e)
	}
	t.Logf("history: %d operations; writes: %d acknowledged, %d failed (%d fenced), %d unknown; reads: %d, of which %d saw a state older than a write that had returned (legitimate within the bounds): longest behind a node's write %v (bound %v), behind an outside write %v (bound %v)",
		len(ops), res.Acked, res.Failed, res.Fenced, res.Unknown, res.Reads, res.Stale,
		res.MaxLagAPI.Round(time.Millisecond), b.API, res.MaxLagSQL.Round(time.Millisecond), b.SQL)
	c.logStats(t)
	return res
}

// nodeStats is the part of the webapp's /stats the tests look at.
type nodeStats struct {
	Cache struct {
		Hits, Misses, Bypassed, Flushes, SkippedStores, Loads uint64
		ValuesSent, ValuesInstalled, ValuesRejected           uint64
	}
	Bus struct {
		Reconnects, FlushesResubscribe, FlushesGap, FlushesProofTimeout, ProofTimeouts, PublishErrors uint64
	}
	Store struct {
		PublishFailures, Relayed, RelayErrors uint64
		RelayListening                        bool
	}
	Replica struct { // with -replica-url only
		ReplicaReads, Waits, PrimaryReads, ReplicaErrors uint64
	}
}

func (c *cluster) stats(n *node) (nodeStats, error) {
	var s nodeStats
	status, b, err := c.request(n, http.MethodGet, "/stats", nil)
	if err != nil {
		return s, err
	}
	if status != http.StatusOK {
		return s, fmt.Errorf("HTTP %d %s", status, b)
	}
	return s, json.Unmarshal(b, &s)
}

func (c *cluster) logStats(t testing.TB) {
	t.Helper()
	for _, n := range c.nodes {
		if !n.running() {
			continue
		}
		s, err := c.stats(n)
		if err != nil {
			t.Logf("%s: stats: %v", n.short, err)
			continue
		}
		t.Logf("%s (this incarnation): cache hits %d misses %d bypassed %d flushes %d skipped stores %d; bus reconnects %d, flushes on resubscribe %d, on gap %d, on late proof %d, proof timeouts %d, publish errors %d; store publish failures %d, relayed %d, relay errors %d",
			n.short, s.Cache.Hits, s.Cache.Misses, s.Cache.Bypassed, s.Cache.Flushes, s.Cache.SkippedStores,
			s.Bus.Reconnects, s.Bus.FlushesResubscribe, s.Bus.FlushesGap, s.Bus.FlushesProofTimeout, s.Bus.ProofTimeouts, s.Bus.PublishErrors,
			s.Store.PublishFailures, s.Store.Relayed, s.Store.RelayErrors)
	}
}

// killPubSub closes the subscribed Redis connections of the cluster's nodes
// (found by their client names), as CLIENT KILL TYPE pubsub would, without
// touching anyone else's on a shared server. It returns how many it closed.
func (c *cluster) killPubSub(admin *redis.Client) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := admin.Do(ctx, "CLIENT", "LIST", "TYPE", "pubsub").Text()
	if err != nil {
		return 0, fmt.Errorf("CLIENT LIST TYPE pubsub: %w", err)
	}
	killed := 0
	for _, line := range strings.Split(list, "\n") {
		fields := map[string]string{}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, "="); ok {
				fields[k] = v
			}
		}
		if !strings.HasPrefix(fields["name"], "coherent-webapp-"+c.id+"-") {
			continue
		}
		if err := admin.Do(ctx, "CLIENT", "KILL", "ID", fields["id"]).Err(); err == nil {
			killed++
		}
	}
	return killed, nil
}

// terminateBackends runs pg_terminate_backend on every Postgres connection
// of the cluster's nodes and returns how many it terminated.
func (c *cluster) terminateBackends() (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var n int
	err := c.db.QueryRow(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name LIKE $1 AND pid <> pg_backend_pid()`, "coherent-webapp-"+c.id+"-%").Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("pg_terminate_backend: %w", err)
	}
	return n, nil
}
