package integration

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	tcredis "github.com/testcontainers/testcontainers-go/modules/redis"

	"github.com/coherentcache/coherent/internal/testenv"
)

var (
	soak         = flag.Bool("soak", false, "run TestSoak: the chaos test for -soak.duration")
	soakDuration = flag.Duration("soak.duration", 5*time.Minute, "how long TestSoak injects faults")
)

// webappBin is the examples/webapp binary that TestMain built.
var webappBin string

// raceEnabled is set by race_test.go when the tests run with -race; the
// webapp is then built with -race too, so that a data race in the library
// under the faults below stops its process (GORACE=halt_on_error=1) and
// fails the test.
var raceEnabled bool

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "coherent-integration-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if webappBin, err = buildWebapp(dir); err != nil {
		fmt.Fprintln(os.Stderr, "integration: building examples/webapp:", err)
		return 1
	}
	stop, err := provideServices()
	if err != nil {
		// The tests report it: they skip, or fail under CI.
		fmt.Fprintln(os.Stderr, "integration:", err)
	}
	defer stop()
	return m.Run()
}

// moduleRoot is the directory of go.mod: the parent of this file's.
func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// buildWebapp builds examples/webapp into dir and returns the binary's path.
func buildWebapp(dir string) (string, error) {
	bin := filepath.Join(dir, "webapp")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "./examples/webapp")
	cmd := exec.Command("go", args...)
	cmd.Dir = moduleRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %v: %v\n%s", args, err, out)
	}
	return bin, nil
}

// provideServices makes DATABASE_URL and REDIS_URL point at running
// services: the ones they name, or the local defaults, or, when a variable
// is unset, its local default is unreachable and a Docker engine answers, a
// container started with testcontainers-go (stopped by the returned
// function). A service named explicitly is never replaced. Otherwise it
// returns an error, and the tests skip, or fail under CI
// (testenv.Unavailable).
//
// There was no Docker engine where this was written: the container path
// follows examples/demo/services.go, which uses the same calls, but has not
// run here.
func provideServices() (stop func(), err error) {
	ctx := context.Background()
	var containers []testcontainers.Container
	stop = func() {
		for _, c := range containers {
			_ = testcontainers.TerminateContainer(c)
		}
	}
	pgErr, redisErr := pingPostgres(ctx, testenv.DatabaseURL()), pingRedis(ctx, testenv.RedisURL())
	if pgErr != nil && os.Getenv("DATABASE_URL") != "" {
		return stop, fmt.Errorf("DATABASE_URL: %w", pgErr)
	}
	if redisErr != nil && os.Getenv("REDIS_URL") != "" {
		return stop, fmt.Errorf("REDIS_URL: %w", redisErr)
	}
	if pgErr == nil && redisErr == nil {
		return stop, nil
	}
	if !dockerAvailable(ctx) {
		return stop, fmt.Errorf("no Docker engine to start the missing services: %w", errors.Join(pgErr, redisErr))
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if pgErr != nil {
		c, err := tcpostgres.Run(cctx, "postgres:16-alpine", tcpostgres.WithDatabase("coherent"), tcpostgres.BasicWaitStrategies())
		if c != nil {
			containers = append(containers, c)
		}
		if err != nil {
			return stop, fmt.Errorf("starting Postgres with testcontainers-go: %w", err)
		}
		u, err := c.ConnectionString(cctx, "sslmode=disable")
		if err != nil {
			return stop, err
		}
		os.Setenv("DATABASE_URL", u)
	}
	if redisErr != nil {
		c, err := tcredis.Run(cctx, "redis:7-alpine")
		if c != nil {
			containers = append(containers, c)
		}
		if err != nil {
			return stop, fmt.Errorf("starting Redis with testcontainers-go: %w", err)
		}
		u, err := c.ConnectionString(cctx)
		if err != nil {
			return stop, err
		}
		os.Setenv("REDIS_URL", u)
	}
	return stop, nil
}

func pingPostgres(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("postgres unreachable: %w", err)
	}
	return conn.Close(ctx)
}

func pingRedis(ctx context.Context, url string) error {
	opts, err := redis.ParseURL(url)
	if err != nil {
		return fmt.Errorf("REDIS_URL: %w", err)
	}
	c := redis.NewClient(opts)
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis unreachable at %s: %w", opts.Addr, err)
	}
	return nil
}

func dockerAvailable(ctx context.Context) bool {
	p, err := testcontainers.NewDockerProvider()
	if err != nil {
		return false
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	return p.Health(ctx) == nil
}
