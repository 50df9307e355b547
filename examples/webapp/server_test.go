package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"
)

// TestServerCutsOffSlowClients guards against connections held forever: with
// only ReadHeaderTimeout set, a client that stalled or trickled its body,
// or kept an idle keep-alive connection open, held a connection (and a
// handler waiting on the body) for as long as it liked. The server runs
// with short timeouts here; the bounds of the test are generous multiples
// of them, so that a slow machine cannot fail it.
func TestServerCutsOffSlowClients(t *testing.T) {
	ta := newTestApp(t, "")
	to := timeouts{readHeader: 300 * time.Millisecond, read: 500 * time.Millisecond, write: 2 * time.Second, idle: 500 * time.Millisecond}
	const bound = 10 * time.Second
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newServer("", ta.h, to)
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	dial := func(t *testing.T) net.Conn {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	const putHead = "PUT /items/slow HTTP/1.1\r\nHost: webapp\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

	t.Run("stalled body", func(t *testing.T) {
		c := dial(t)
		if _, err := io.WriteString(c, putHead+`{"value":`); err != nil {
			t.Fatal(err)
		}
		resp := awaitClose(t, c, bound)
		checkCutOff(t, resp)
		if it, found := ta.row(t, "slow"); found {
			t.Errorf("Postgres holds %+v", it)
		}
	})

	t.Run("trickled body", func(t *testing.T) {
		c := dial(t)
		if _, err := io.WriteString(c, putHead+`{"value":"`); err != nil {
			t.Fatal(err)
		}
		// One byte every 50ms: each read of the server gets something, but
		// the body would take 5s.
		go func() {
			for range 90 {
				if _, err := c.Write([]byte("a")); err != nil {
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		}()
		checkCutOff(t, awaitClose(t, c, bound))
	})

	t.Run("idle keep-alive", func(t *testing.T) {
		c := dial(t)
		if _, err := io.WriteString(c, "GET /items/idle HTTP/1.1\r\nHost: webapp\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(bound))
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("reading the response: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound || resp.Close {
			t.Fatalf("GET /items/idle = %d (close %v); want 404 on a kept-alive connection", resp.StatusCode, resp.Close)
		}
		start := time.Now()
		if _, err := br.ReadByte(); errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("an idle connection was still open %v later (IdleTimeout %v)", bound, to.idle)
		}
		t.Logf("the idle connection was closed after %v (IdleTimeout %v)", time.Since(start).Round(time.Millisecond), to.idle)
	})
}

// awaitClose reads c until the server closes it and returns what it sent.
// It fails t if c is still open after bound.
func awaitClose(t *testing.T, c net.Conn, bound time.Duration) string {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(start.Add(bound))
	var got bytes.Buffer
	_, err := io.Copy(&got, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection was still open %v later; the server sent %q", bound, got.String())
	}
	t.Logf("the server closed the connection after %v", time.Since(start).Round(time.Millisecond))
	return got.String()
}

// checkCutOff checks what the server sent a client it cut off: nothing, or
// a 4xx that tells it nothing of the server.
func checkCutOff(t *testing.T, resp string) {
	t.Helper()
	if resp == "" {
		return
	}
	status, _, _ := strings.Cut(resp, "\r\n")
	t.Logf("the server answered %q", status)
	if !strings.HasPrefix(status, "HTTP/1.1 4") {
		t.Errorf("the server answered %q; want a 4xx or nothing", status)
	}
	for _, s := range []string{"tcp", "127.0.0.1", "timeout"} {
		if strings.Contains(resp, s) {
			t.Errorf("the server's answer names %q: %q", s, resp)
		}
	}
}

// TestServerTimeouts guards against a server whose timeouts are missing, or
// would cut off a legitimate write: one that waits for a lock whose holder
// stalled until its lease ran out.
func TestServerTimeouts(t *testing.T) {
	for _, ttl := range []time.Duration{time.Second, 10 * time.Second, time.Minute} {
		to := serverTimeouts(ttl)
		srv := newServer(":0", http.NotFoundHandler(), to)
		if srv.ReadHeaderTimeout <= 0 || srv.ReadTimeout <= 0 || srv.WriteTimeout <= 0 || srv.IdleTimeout <= 0 {
			t.Errorf("-lock-ttl %v: ReadHeaderTimeout %v, ReadTimeout %v, WriteTimeout %v, IdleTimeout %v; want all set",
				ttl, srv.ReadHeaderTimeout, srv.ReadTimeout, srv.WriteTimeout, srv.IdleTimeout)
		}
		if srv.WriteTimeout < ttl+5*time.Second {
			t.Errorf("-lock-ttl %v: WriteTimeout %v; want at least the lease and 5s for the transaction", ttl, srv.WriteTimeout)
		}
	}
}

// TestBodyLimit guards against bodies read without a bound on what the
// server reads: the 1 MiB limit was an io.LimitReader that cut a long body
// short (a misleading "unexpected EOF"), and a valid object followed by
// megabytes of anything was accepted. A body over maxBody must be a 413,
// with nothing written; one just under it is stored whole.
func TestBodyLimit(t *testing.T) {
	ta := newTestApp(t, "")
	for _, tc := range []struct {
		name, method, path string
		body               []byte
		want               int
	}{
		{"a value over the limit", http.MethodPut, "/items/big", []byte(`{"value":"` + strings.Repeat("a", maxBody) + `"}`), http.StatusRequestEntityTooLarge},
		{"an object, then padding over the limit", http.MethodPut, "/items/big", []byte(`{"value":"x"}` + strings.Repeat(" ", 2*maxBody)), http.StatusRequestEntityTooLarge},
		{"a delta, then padding over the limit", http.MethodPost, "/items/big/add", []byte(`{"delta":1}` + strings.Repeat(" ", 2*maxBody)), http.StatusRequestEntityTooLarge},
		{"a second object", http.MethodPut, "/items/big", []byte(`{"value":"x"} {"value":"y"}`), http.StatusBadRequest},
		{"trailing garbage", http.MethodPost, "/items/big/add", []byte(`{"delta":1}]`), http.StatusBadRequest},
	} {
		status, body := ta.do(t, tc.method, tc.path, tc.body)
		if status != tc.want {
			t.Errorf("%s: %s %s = %d %.200s; want %d", tc.name, tc.method, tc.path, status, body, tc.want)
		}
		if it, found := ta.row(t, "big"); found {
			t.Fatalf("%s: Postgres holds item %q of version %d", tc.name, it.ID, it.Version)
		}
	}

	value := strings.Repeat("v", maxBody-len(`{"value":""}`+"\n"))
	status, body := ta.do(t, http.MethodPut, "/items/max", append(jsonBody(map[string]string{"value": value}), '\n'))
	if status != http.StatusOK {
		t.Fatalf("PUT of a body of exactly %d bytes = %d %.200s; want 200", maxBody, status, body)
	}
	if it, _ := ta.row(t, "max"); it.Value != value {
		t.Errorf("Postgres holds a value of %d bytes; want %d", len(it.Value), len(value))
	}
}
