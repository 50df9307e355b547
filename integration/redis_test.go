package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisServer is a private redis-server started by a test, for the faults
// that must not disturb the shared one, which other packages' tests use at
// the same time: restarts, and CLIENT KILL TYPE pubsub.
type redisServer struct {
	t    testing.TB
	port int
	dir  string

	mu  sync.Mutex // guards cmd
	cmd *exec.Cmd
	out *logBuffer
}

// startRedisServer starts a private redis-server on a free port, without
// persistence, and stops it at the end of the test. It skips t if
// redis-server is not installed, or fails it under CI.
func startRedisServer(t testing.TB) *redisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("redis-server not found: %v", err)
		}
		t.Skipf("redis-server not found: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	s := &redisServer{t: t, port: port, dir: t.TempDir(), out: &logBuffer{}}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

func (s *redisServer) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.port) }

func (s *redisServer) URL() string { return "redis://" + s.Addr() + "/0" }

// Client returns a client of the server, closed at the end of the test.
func (s *redisServer) Client() *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: s.Addr()})
	s.t.Cleanup(func() { c.Close() })
	return c
}

// Start starts the server (again, on the same port, empty) and waits until
// it answers. It fails the test if the server does not come up; call it on
// the test's goroutine.
func (s *redisServer) Start() {
	s.t.Helper()
	if err := s.start(); err != nil {
		s.t.Fatal(err)
	}
}

// start is Start for any goroutine.
func (s *redisServer) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return nil
	}
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", s.dir, "--logfile", "")
	cmd.Stdout, cmd.Stderr = s.out, s.out
	dieWithTest(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting redis-server: %w", err)
	}
	s.cmd = cmd
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for c.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on %s did not start:\n%s", s.Addr(), tail(s.out.String(), 20))
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// Stop kills the server, as a crash would, and waits for it to exit. Its
// data (locks, fence counters) is gone.
func (s *redisServer) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// killPubSub runs CLIENT KILL TYPE pubsub: every subscribed connection of
// the server is closed. It returns how many.
func killPubSub(admin *redis.Client) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := admin.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Int()
	if err != nil {
		return 0, fmt.Errorf("CLIENT KILL TYPE pubsub: %w", err)
	}
	return n, nil
}
