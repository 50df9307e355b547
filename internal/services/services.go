// Package services finds the Postgres and Redis that examples/demo and the
// integration tests run against, and starts the missing ones with
// testcontainers-go when a Docker engine answers.
package services

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	tcredis "github.com/testcontainers/testcontainers-go/modules/redis"
)

// pingTimeout bounds each check.
const pingTimeout = 3 * time.Second

// PingPostgres reports whether Postgres answers at url.
func PingPostgres(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("postgres unreachable: %w", err)
	}
	return conn.Close(ctx)
}

// PingRedis reports whether Redis answers at url.
func PingRedis(ctx context.Context, url string) error {
	opts, err := redis.ParseURL(url)
	if err != nil {
		return fmt.Errorf("redis URL: %w", err)
	}
	c := redis.NewClient(opts)
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis unreachable at %s: %w", opts.Addr, err)
	}
	return nil
}

// DockerAvailable reports whether a Docker engine answers.
func DockerAvailable(ctx context.Context) bool {
	p, err := testcontainers.NewDockerProvider()
	if err != nil {
		return false
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	return p.Health(ctx) == nil
}

// Containers are the services started by Start.
type Containers struct {
	// DatabaseURL and RedisURL address the services started; empty for
	// one not asked for.
	DatabaseURL, RedisURL string
	started               []testcontainers.Container
}

// Start starts Postgres and, or, Redis in containers, within 3 minutes of
// ctx. On error it stops what it started.
func Start(ctx context.Context, postgres, redis bool) (*Containers, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cs := &Containers{}
	if postgres {
		c, err := tcpostgres.Run(ctx, "postgres:16-alpine", tcpostgres.WithDatabase("coherent"), tcpostgres.BasicWaitStrategies())
		if c != nil {
			cs.started = append(cs.started, c)
		}
		if err == nil {
			cs.DatabaseURL, err = c.ConnectionString(ctx, "sslmode=disable")
		}
		if err != nil {
			cs.Stop()
			return nil, fmt.Errorf("starting Postgres with testcontainers-go: %w", err)
		}
	}
	if redis {
		c, err := tcredis.Run(ctx, "redis:7-alpine")
		if c != nil {
			cs.started = append(cs.started, c)
		}
		if err == nil {
			cs.RedisURL, err = c.ConnectionString(ctx)
		}
		if err != nil {
			cs.Stop()
			return nil, fmt.Errorf("starting Redis with testcontainers-go: %w", err)
		}
	}
	return cs, nil
}

// Stop terminates the containers. It is safe on a nil *Containers.
func (cs *Containers) Stop() {
	if cs == nil {
		return
	}
	for _, c := range cs.started {
		_ = testcontainers.TerminateContainer(c)
	}
	cs.started = nil
}
