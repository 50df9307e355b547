package main

import (
	"context"
	"errors"
	"fmt"

	svc "github.com/coherentcache/coherent/examples/services"
)

// services are the Postgres and Redis the demo runs against, and the
// containers it started for them, if any.
type services struct {
	dbURL, redisURL string
	containers      *svc.Containers
}

func (s *services) close() { s.containers.Stop() }

// connect checks that Postgres and Redis answer at the given URLs. When one
// does not and a Docker engine does, it starts the missing service with
// testcontainers-go; when neither, it explains how to start them.
func connect(ctx context.Context, dbURL, redisURL string) (*services, error) {
	s := &services{dbURL: dbURL, redisURL: redisURL}
	pgErr := svc.PingPostgres(ctx, dbURL)
	redisErr := svc.PingRedis(ctx, redisURL)
	if pgErr == nil && redisErr == nil {
		return s, nil
	}
	if !svc.DockerAvailable(ctx) {
		return nil, unreachableError{errors.Join(pgErr, redisErr)}
	}
	for _, err := range []error{pgErr, redisErr} {
		if err != nil {
			fmt.Printf("demo: %v\n", err)
		}
	}
	fmt.Println("demo: starting the missing services with testcontainers-go")
	cs, err := svc.Start(ctx, pgErr != nil, redisErr != nil)
	if err != nil {
		return nil, err
	}
	s.containers = cs
	if pgErr != nil {
		s.dbURL = cs.DatabaseURL
	}
	if redisErr != nil {
		s.redisURL = cs.RedisURL
	}
	return s, nil
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
