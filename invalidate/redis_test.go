package invalidate

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/coherentcache/coherent/internal/testenv"
)

func TestMain(m *testing.M) {
	// Every test closes what it opened; this checks that nothing, bus
	// goroutines included, outlives the package's tests.
	goleak.VerifyTestMain(m)
}

// newClient returns a client of the shared Redis, closed by t's cleanup.
// edit, if not nil, adjusts its options.
func newClient(t testing.TB, edit func(*redis.Options)) *redis.Client {
	t.Helper()
	opt := testenv.RedisOptions(t)
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

// testOptions are fast proofs for tests: with subscriptions of staleness,
// faults show within a fraction of a second.
func testOptions(channel string) *PubSubOptions {
	return &PubSubOptions{Channel: channel, Options: testBusOptions}
}

// testBusOptions are the options of testOptions and testStreamsOptions.
var testBusOptions = Options{ProofInterval: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}

// staleness is the MaxStaleness with which the tests subscribe, unless
// they need another.
const staleness = 300 * time.Millisecond

func newPubSub(t testing.TB, client redis.UniversalClient, opts *PubSubOptions) *PubSub {
	t.Helper()
	b, err := NewPubSub(client, opts)
	if err != nil {
		t.Fatalf("NewPubSub error = %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
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
