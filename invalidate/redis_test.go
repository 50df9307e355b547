package invalidate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// Every test closes what it opened; this checks that nothing, bus
	// goroutines included, outlives the package's tests.
	goleak.VerifyTestMain(m)
}

// redisURL is where the shared Redis of the tests lives.
func redisURL() string {
	if u := os.Getenv("REDIS_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

var redisCheck struct {
	once sync.Once
	err  error
}

// redisOptions returns options for the shared Redis. It skips t when Redis
// is unreachable, or fails it when the environment variable CI is set.
func redisOptions(t testing.TB) *redis.Options {
	t.Helper()
	opt, err := redis.ParseURL(redisURL())
	if err != nil {
		t.Fatalf("REDIS_URL %q: %v", redisURL(), err)
	}
	redisCheck.once.Do(func() {
		c := redis.NewClient(opt)
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		redisCheck.err = c.Ping(ctx).Err()
	})
	if redisCheck.err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("Redis at %s is unreachable: %v", redisURL(), redisCheck.err)
		}
		t.Skipf("Redis at %s is unreachable: %v", redisURL(), redisCheck.err)
	}
	return opt
}

// newClient returns a client of the shared Redis, closed by t's cleanup.
// edit, if not nil, adjusts its options.
func newClient(t testing.TB, edit func(*redis.Options)) *redis.Client {
	t.Helper()
	opt := redisOptions(t)
	if edit != nil {
		edit(opt)
	}
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// uniqueName returns a channel or key name no other test uses.
func uniqueName(t testing.TB) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := regexp.MustCompile(`[^A-Za-z0-9]+`).ReplaceAllString(t.Name(), "-")
	return "coherent-test:" + name + ":" + hex.EncodeToString(b[:])
}

// testOptions are fast proofs for tests: faults show within a fraction of
// a second.
func testOptions(channel string) *PubSubOptions {
	return &PubSubOptions{Channel: channel, ProofInterval: 10 * time.Millisecond, MaxStaleness: 300 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
}

func newPubSub(t testing.TB, client redis.UniversalClient, opts *PubSubOptions) *PubSub {
	t.Helper()
	b, err := NewPubSub(client, opts)
	if err != nil {
		t.Fatalf("NewPubSub error = %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// redisServer is a private redis-server started by a test, for faults that
// must not disturb the shared one: restarts and configuration changes.
type redisServer struct {
	t    testing.TB
	port int
	dir  string
	args []string

	mu  sync.Mutex
	cmd *exec.Cmd
}

// startRedisServer starts a private redis-server on a free port with args
// added to its command line. It skips t if redis-server is not installed,
// or fails it when CI is set.
func startRedisServer(t testing.TB, args ...string) *redisServer {
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
	_ = l.Close()
	s := &redisServer{t: t, port: port, dir: t.TempDir(), args: args}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

func (s *redisServer) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.port) }

// Start starts the server (again) and waits until it answers.
func (s *redisServer) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return
	}
	args := append([]string{"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--daemonize", "no", "--dir", s.dir, "--logfile", ""}, s.args...)
	cmd := exec.Command("redis-server", args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("starting redis-server: %v", err)
	}
	s.cmd = cmd
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for c.Ping(context.Background()).Err() != nil {
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on %s did not start: %s", s.Addr(), out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop kills the server, as a crash would, and waits for it to exit.
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

// clientIDs returns the CLIENT IDs of the subscribed connections named name.
func clientIDs(t testing.TB, admin *redis.Client, name string) []string {
	t.Helper()
	list, err := admin.ClientList(context.Background()).Result()
	if err != nil {
		t.Fatalf("CLIENT LIST: %v", err)
	}
	var ids []string
	for _, line := range strings.Split(list, "\n") {
		fields := map[string]string{}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, "="); ok {
				fields[k] = v
			}
		}
		if fields["name"] == name && (fields["sub"] > "0" || fields["ssub"] > "0") {
			ids = append(ids, fields["id"])
		}
	}
	return ids
}

func clientName(t testing.TB) string {
	return fmt.Sprintf("coherent-test-%s", uniqueName(t)[len("coherent-test:"):])
}
