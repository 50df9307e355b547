package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	tcredis "github.com/testcontainers/testcontainers-go/modules/redis"
)

// services are the Postgres and Redis the demo runs against, and the
// containers it started for them, if any.
type services struct {
	dbURL, redisURL string
	containers      []testcontainers.Container
}

func (s *services) close() {
	for _, c := range s.containers {
		testcontainers.TerminateContainer(c)
	}
}

// connect checks that Postgres and Redis answer at the given URLs. When one
// does not and a Docker engine does, it starts the missing service with
// testcontainers-go; when neither, it explains how to start them.
func connect(ctx context.Context, dbURL, redisURL string) (*services, error) {
	s := &services{dbURL: dbURL, redisURL: redisURL}
	pgErr := pingPostgres(ctx, dbURL)
	redisErr := pingRedis(ctx, redisURL)
	if pgErr == nil && redisErr == nil {
		return s, nil
	}
	if !dockerAvailable(ctx) {
		return nil, unreachableError{errors.Join(pgErr, redisErr)}
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if pgErr != nil {
		fmt.Printf("demo: %v\ndemo: starting Postgres with testcontainers-go\n", pgErr)
		c, err := tcpostgres.Run(cctx, "postgres:16-alpine",
			tcpostgres.WithDatabase("coherent"), tcpostgres.BasicWaitStrategies())
		if c != nil {
			s.containers = append(s.containers, c)
		}
		if err != nil {
			s.close()
			return nil, err
		}
		if s.dbURL, err = c.ConnectionString(cctx, "sslmode=disable"); err != nil {
			s.close()
			return nil, err
		}
	}
	if redisErr != nil {
		fmt.Printf("demo: %v\ndemo: starting Redis with testcontainers-go\n", redisErr)
		c, err := tcredis.Run(cctx, "redis:7-alpine")
		if c != nil {
			s.containers = append(s.containers, c)
		}
		if err != nil {
			s.close()
			return nil, err
		}
		if s.redisURL, err = c.ConnectionString(cctx); err != nil {
			s.close()
			return nil, err
		}
	}
	return s, nil
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
		return fmt.Errorf("redis URL: %w", err)
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

// unreachableError explains how to provide the services the demo needs.
type unreachableError struct{ err error }

func (e unreachableError) Unwrap() error { return e.err }

func (e unreachableError) Error() string {
	return e.err.Error() + `

Start them, or point -database-url / -redis-url (DATABASE_URL / REDIS_URL) at running ones:
  Debian/Ubuntu:  sudo apt install postgresql redis-server   (trust or password auth for user postgres)
  macOS:          brew install postgresql@16 redis && brew services start postgresql@16 && brew services start redis
  Docker:         docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16
                  docker run -d -p 6379:6379 redis:7
With a Docker engine running, the demo starts them itself.`
}
