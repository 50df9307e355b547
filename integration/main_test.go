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

	"github.com/coherentcache/coherent/examples/services"
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
// (package services, shared with examples/demo) has not run here.
func provideServices() (stop func(), err error) {
	ctx := context.Background()
	stop = func() {}
	pgErr, redisErr := services.PingPostgres(ctx, testenv.DatabaseURL()), services.PingRedis(ctx, testenv.RedisURL())
	if pgErr != nil && os.Getenv("DATABASE_URL") != "" {
		return stop, fmt.Errorf("DATABASE_URL: %w", pgErr)
	}
	if redisErr != nil && os.Getenv("REDIS_URL") != "" {
		return stop, fmt.Errorf("REDIS_URL: %w", redisErr)
	}
	if pgErr == nil && redisErr == nil {
		return stop, nil
	}
	if !services.DockerAvailable(ctx) {
		return stop, fmt.Errorf("no Docker engine to start the missing services: %w", errors.Join(pgErr, redisErr))
	}
	cs, err := services.Start(ctx, pgErr != nil, redisErr != nil)
	if err != nil {
		return stop, err
	}
	if pgErr != nil {
		os.Setenv("DATABASE_URL", cs.DatabaseURL)
	}
	if redisErr != nil {
		os.Setenv("REDIS_URL", cs.RedisURL)
	}
	return cs.Stop, nil
}
