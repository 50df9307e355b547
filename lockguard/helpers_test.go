package lockguard

import (
	"context"
	crand "crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/coherentcache/coherent/internal/testenv"
)

// TestMain fails the run if any goroutine (a watchdog, a lease timer, a
// Guard's notifier) is still alive after the tests: no goroutine may
// outlive Release.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// tb is what the helpers need of a *testing.T or *testing.B.
type tb interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
}

// newClient returns a client of the test Redis, closed at cleanup. mod, if
// not nil, adjusts the options first. Without Redis the test is skipped,
// unless CI is set, where it fails (testenv.RedisOptions).
func newClient(t testing.TB, mod func(*redis.Options)) *redis.Client {
	t.Helper()
	opt := testenv.RedisOptions(t)
	if mod != nil {
		mod(opt)
	}
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// testPrefix returns a key prefix unique to this test and deletes every key
// under it at cleanup, with a fresh context.
func testPrefix(t tb, c redis.UniversalClient) string {
	t.Helper()
	prefix := "lockguard-test:" + crand.Text() + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if len(keys) > 0 {
			_ = c.Del(ctx, keys...).Err()
		}
	})
	return prefix
}

// newGuard returns a Guard on c under prefix with opts (which may be nil);
// it fails the test if New does.
func newGuard(t tb, c redis.UniversalClient, prefix string, opts *Options) *Guard {
	t.Helper()
	var o Options
	if opts != nil {
		o = *opts
	}
	o.Prefix = prefix
	g, err := New(c, &o)
	if err != nil {
		t.Fatalf("New() = %v", err)
	}
	t.Cleanup(func() { _ = g.Close() })
	return g
}

// cmdHook counts the commands a client processes, and lets a test observe
// each finished command.
type cmdHook struct {
	mu      sync.Mutex
	n       int
	observe func(cmd redis.Cmder) // called after each command, if set; under mu
}

func (h *cmdHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *cmdHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		h.mu.Lock()
		h.n++
		if h.observe != nil {
			h.observe(cmd)
		}
		h.mu.Unlock()
		return err
	}
}

func (h *cmdHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		h.mu.Lock()
		h.n += len(cmds)
		h.mu.Unlock()
		return err
	}
}

func (h *cmdHook) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// isScript reports whether cmd runs script s (by EVALSHA or EVAL).
func isScript(cmd redis.Cmder, s *redis.Script) bool {
	args := cmd.Args()
	if len(args) < 2 {
		return false
	}
	switch strings.ToLower(cmd.Name()) {
	case "evalsha":
		sha, _ := args[1].(string)
		return sha == s.Hash()
	case "eval":
		src, _ := args[1].(string)
		sum := sha1.Sum([]byte(src))
		return hex.EncodeToString(sum[:]) == s.Hash()
	}
	return false
}

// within fails the test unless ch is closed within d.
func within(t *testing.T, ch <-chan struct{}, d time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("%s did not happen within %v", what, d)
	}
}

// isClosed reports whether ch is closed.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
