// Package services finds the Postgres and Redis that examples/demo (and
// the project's integration tests) run against, and starts the missing
// ones with testcontainers-go when a Docker engine answers. It is part of
// the examples: copy it with the demo.
package services

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"
	tcredis "github.com/testcontainers/testcontainers-go/modules/redis"
)

// pingTimeout bounds each check.
const pingTimeout = 3 * time.Second

// The errors of URLs that do not parse. They show nothing of the URL, nor
// the parser's message: go-redis quotes the URL whole, and pgx's redaction
// of a string it cannot parse is best effort, which lets parts of a
// password with a space or an unescaped '@' through.
var (
	// ErrDatabaseURL reports a Postgres URL or keyword/value string that
	// does not parse.
	ErrDatabaseURL = errors.New("the Postgres URL is neither a URL nor a keyword/value string; not shown, as it may hold a password (percent-encode special characters in a URL's password)")
	// ErrRedisURL reports a Redis URL that does not parse.
	ErrRedisURL = errors.New("the Redis URL is not redis://[[user]:password@]host:port/db; not shown, as it may hold a password (percent-encode special characters in it)")
)

// PingPostgres reports whether Postgres answers at dsn, a URL or a
// keyword/value string. Its error never shows the password: it is
// [ErrDatabaseURL] if dsn does not parse.
func PingPostgres(ctx context.Context, dsn string) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return ErrDatabaseURL
	}
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return HideSecret(fmt.Errorf("postgres unreachable: %w", err), cfg.Password)
	}
	return conn.Close(ctx)
}

// PingRedis reports whether Redis answers at rawURL. Its error never shows
// the password: it is [ErrRedisURL] if rawURL does not parse.
func PingRedis(ctx context.Context, rawURL string) error {
	opts, err := redis.ParseURL(rawURL)
	if err != nil {
		return ErrRedisURL
	}
	c := redis.NewClient(opts)
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		return HideSecret(fmt.Errorf("redis unreachable at %s: %w", opts.Addr, err), opts.Password)
	}
	return nil
}

// HideSecret returns err, or an error of the same message with every
// occurrence of secret (as is, or escaped as in a URL) replaced by "xxxxx".
// The drivers' connection errors name hosts, users and databases, never the
// password; this keeps it so, whatever their next version says.
func HideSecret(err error, secret string) error {
	if err == nil || secret == "" {
		return err
	}
	msg := err.Error()
	hidden := msg
	for _, s := range []string{secret, url.QueryEscape(secret), strings.TrimPrefix(url.UserPassword("", secret).String(), ":")} {
		hidden = strings.ReplaceAll(hidden, s, "xxxxx")
	}
	if hidden == msg {
		return err
	}
	return errors.New(hidden)
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
