package integration

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/coherentcache/coherent/internal/testenv"
)

// TestWebappPrintsNoCredentials guards against the webapp process printing
// a password: in its usage message (DATABASE_URL and REDIS_URL were the
// flags' defaults), or in the error it exits with when a URL does not parse
// (go-redis quotes the URL whole; pgx's redaction is best effort). It runs
// the binary the operators run, with passwords that hold a space and
// characters a URL must escape, and checks everything it writes.
func TestWebappPrintsNoCredentials(t *testing.T) {
	env := append(os.Environ(),
		"DATABASE_URL=postgres://postgres:hunter2%20XyZzy9%40@127.0.0.1:1/postgres?sslmode=disable",
		"REDIS_URL=redis://:hunter2%20XyZzy9%40@127.0.0.1:1/0",
	)
	for _, tc := range []struct {
		name     string
		args     []string
		exit     int
		mentions string // what the output must name
	}{
		{"usage", []string{"-h"}, 0, "-database-url"},
		{"unknown flag", []string{"-no-such-flag"}, 2, "-redis-url"},
		{"malformed Postgres URL", []string{"-database-url", "host=127.0.0.1 user=postgres password='hunter2 XyZzy9 dbname=postgres"}, 1, "-database-url"},
		{"Postgres URL with an unescaped @", []string{"-database-url", "postgres://postgres:hunter2@XyZzy9:x@127.0.0.1:5432/postgres"}, 1, "-database-url"},
		{"malformed Redis URL", []string{"-database-url", testenv.DatabaseURL(), "-redis-url", "redis://:hunter2 XyZzy9@127.0.0.1:6379/0"}, 1, "-redis-url"},
		{"unreachable services", nil, 1, "unreachable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, webappBin, append([]string{"-addr", "127.0.0.1:0"}, tc.args...)...)
			cmd.Env = env
			out, err := cmd.CombinedOutput()
			exit := 0
			if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
				exit = ee.ExitCode()
			} else if err != nil {
				t.Fatalf("webapp %s: %v", strings.Join(tc.args, " "), err)
			}
			if exit != tc.exit || !strings.Contains(string(out), tc.mentions) {
				t.Errorf("webapp %s exited with %d; want %d, with output naming %q:\n%s", strings.Join(tc.args, " "), exit, tc.exit, tc.mentions, out)
			}
			for _, s := range []string{"hunter2", "XyZzy9"} {
				if strings.Contains(string(out), s) {
					t.Errorf("webapp %s printed %q of the password:\n%s", strings.Join(tc.args, " "), s, out)
				}
			}
		})
	}
}

// TestWebappCutsOffAStalledBody guards against a client that sends a
// request's headers and part of its body, then nothing, holding a
// connection of the webapp forever (it had only ReadHeaderTimeout). The
// webapp as run must close it after its ReadTimeout (10s); the bound here
// is three times that.
func TestWebappCutsOffAStalledBody(t *testing.T) {
	c := newCluster(t, clusterConfig{Nodes: 1})
	conn, err := net.Dial("tcp", c.nodes[0].address())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	if _, err := io.WriteString(conn, "PUT /items/stalled HTTP/1.1\r\nHost: webapp\r\nContent-Length: 100\r\n\r\n{\"value\":"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(start.Add(30 * time.Second))
	out, err := io.ReadAll(conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection was still open 30s after the body stalled; the webapp sent %q", out)
	}
	t.Logf("the webapp closed the connection %v after the body stalled, having sent %q", time.Since(start).Round(time.Millisecond), out)
	if snap, err := c.snapshot([]string{"stalled"}); err != nil || snap["stalled"].Found {
		t.Errorf("Postgres holds %+v (%v); want nothing", snap["stalled"], err)
	}
}
