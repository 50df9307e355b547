package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coherentcache/coherent/internal/testenv"
)

// secretParts are the pieces of the passwords below: none may appear in
// any output. The passwords hold a space and characters that need
// escaping in a URL, as real ones do.
var secretParts = []string{"hunter2", "XyZzy9"}

// checkNoSecret fails t if out shows any part of the password.
func checkNoSecret(t *testing.T, what, out string) {
	t.Helper()
	for _, s := range secretParts {
		if strings.Contains(out, s) {
			t.Errorf("%s shows %q of the password:\n%s", what, s, out)
		}
	}
}

// TestFlagsHideCredentials guards against the usage message printing
// DATABASE_URL and REDIS_URL, passwords included: they were the defaults
// of -database-url and -redis-url, which -h and every mistyped flag print.
// The variables must still be used when the flags are absent, and the
// flags must win over them.
func TestFlagsHideCredentials(t *testing.T) {
	envs := map[string]string{
		"DATABASE_URL": "postgres://postgres:hunter2%20XyZzy9%40@127.0.0.1:5432/postgres?sslmode=disable",
		"REDIS_URL":    "redis://:hunter2%20XyZzy9%40@127.0.0.1:6379/0",
		// The relay's LISTEN connection, behind a pooler.
		"DATABASE_LISTEN_URL": "postgres://postgres:hunter2%20XyZzy9%40@127.0.0.1:5433/postgres?sslmode=disable",
	}
	getenv := func(name string) string { return envs[name] }
	for _, args := range [][]string{{"-h"}, {"-no-such-flag"}, {"-lock-ttl", "soon"}} {
		var out bytes.Buffer
		if _, err := parseFlags(args, getenv, &out); err == nil {
			t.Errorf("parseFlags(%q) = nil error", args)
		}
		if !strings.Contains(out.String(), "-database-url") {
			t.Errorf("parseFlags(%q) printed no usage:\n%s", args, &out)
		}
		checkNoSecret(t, "the usage of "+strings.Join(args, " "), out.String())
	}

	var out bytes.Buffer
	cfg, err := parseFlags(nil, getenv, &out)
	if err != nil || cfg.dbURL != envs["DATABASE_URL"] || cfg.redisURL != envs["REDIS_URL"] {
		t.Errorf("parseFlags() = %q, %q, %v; want DATABASE_URL and REDIS_URL", cfg.dbURL, cfg.redisURL, err)
	}
	if cfg.listenURL != envs["DATABASE_LISTEN_URL"] {
		t.Errorf("parseFlags().listenURL = %q; want DATABASE_LISTEN_URL", cfg.listenURL)
	}
	if cfg, err := parseFlags([]string{"-listen-url", "postgres://listen"}, getenv, &out); err != nil || cfg.listenURL != "postgres://listen" {
		t.Errorf("parseFlags(-listen-url) = %q, %v; want the flag", cfg.listenURL, err)
	}
	cfg, err = parseFlags([]string{"-database-url", "postgres://flag", "-redis-url", "redis://flag"}, getenv, &out)
	if err != nil || cfg.dbURL != "postgres://flag" || cfg.redisURL != "redis://flag" {
		t.Errorf("parseFlags(-database-url, -redis-url) = %q, %q, %v; want the flags", cfg.dbURL, cfg.redisURL, err)
	}
	cfg, err = parseFlags(nil, func(string) string { return "" }, &out)
	if err != nil || cfg.dbURL != "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" || cfg.redisURL != "redis://127.0.0.1:6379/0" {
		t.Errorf("parseFlags() without the variables = %q, %q, %v; want the local defaults", cfg.dbURL, cfg.redisURL, err)
	}
	checkNoSecret(t, "parseFlags", out.String())
}

// TestStartupErrorsHideCredentials guards against the errors of run, which
// main prints, showing a password: go-redis quotes a URL it cannot parse
// whole, and pgx's best-effort redaction of a connection string it cannot
// parse lets parts of a password with a space or an unescaped '@' through.
// Connection errors for URLs that parse must not show it either.
func TestStartupErrorsHideCredentials(t *testing.T) {
	db, rdb := testenv.DatabaseURL(), testenv.RedisURL()
	for _, tc := range []struct {
		name, db, redis string
	}{
		{"keyword/value, unterminated quote", "host=127.0.0.1 user=postgres password='hunter2 XyZzy9 dbname=postgres", rdb},
		{"keyword/value, escaped space", `host=127.0.0.1 user=postgres password=hunter2\ XyZzy9 sslmode=bogus`, rdb},
		{"keyword/value, quoted, invalid setting", `host=127.0.0.1 user=postgres password='hunter2\' XyZzy9' sslmode=bogus`, rdb},
		{"URL, unescaped @ and :", "postgres://postgres:hunter2@XyZzy9:x@127.0.0.1:5432/postgres", rdb},
		{"URL, unescaped space", "postgres://postgres:hunter2 XyZzy9@127.0.0.1:5432/postgres", rdb},
		{"URL, bad escape", "postgres://postgres:hunter2%zzXyZzy9@127.0.0.1:5432/postgres", rdb},
		{"URL, Postgres unreachable", "postgres://postgres:hunter2%20XyZzy9%40%3A@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=2", rdb},
		{"keyword/value, Postgres unreachable", "host=127.0.0.1 port=1 user=postgres password='hunter2 XyZzy9' sslmode=disable connect_timeout=2", rdb},
		{"Redis URL, unescaped space", db, "redis://:hunter2 XyZzy9@127.0.0.1:6379/0"},
		{"Redis URL, bad escape", db, "redis://user:hunter2%zzXyZzy9@127.0.0.1:6379/0"},
		{"Redis URL, unescaped @ and :", db, "redis://user:hunter2@XyZzy9:x@127.0.0.1:6379/0"},
		{"Redis URL, missing bracket", db, "redis://user:hunter2XyZzy9@[::1:6379/0"},
		{"Redis URL, bad option", db, "redis://user:hunter2%20XyZzy9@127.0.0.1:6379/zero?dial_timeout=soon"},
		{"Redis unreachable", db, "redis://user:hunter2%20XyZzy9%40@127.0.0.1:1/0?dial_timeout=1s&max_retries=-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cfg := config{addr: "127.0.0.1:0", node: "test", dbURL: tc.db, redisURL: tc.redis}
			err := run(ctx, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
			if err == nil {
				t.Fatal("run = nil error; want one")
			}
			t.Logf("run: %v", err)
			checkNoSecret(t, "the error of run", err.Error())
			checkNoSecret(t, "the log", logs.String())
		})
	}
}

// TestHideSecret guards against a driver's connection error that quotes
// the password, as is or escaped as in a URL: none does today, and
// hideSecret keeps it so if one starts to.
func TestHideSecret(t *testing.T) {
	const pw = "hunter2 XyZzy9@:/?#%'"
	for _, msg := range []string{
		"auth failed for password " + pw,
		"cannot dial redis://u:" + url.QueryEscape(pw) + "@h:1/0",
		"cannot dial " + (&url.URL{Scheme: "postgres", User: url.UserPassword("u", pw), Host: "h:1"}).String(),
	} {
		got := hideSecret(errors.New(msg), pw)
		checkNoSecret(t, "hideSecret", got.Error())
		if !strings.Contains(got.Error(), "xxxxx") {
			t.Errorf("hideSecret(%q) = %q; want the password replaced by xxxxx", msg, got)
		}
	}
	err := errors.New("connection refused")
	if got := hideSecret(err, pw); got != err {
		t.Errorf("hideSecret(%v) = %v; want the error itself", err, got)
	}
}

func TestBroadcastFlag(t *testing.T) {
	getenv := func(string) string { return "" }
	for _, tt := range []struct {
		args []string
		want bool
	}{{nil, false}, {[]string{"-broadcast"}, true}} {
		cfg, err := parseFlags(tt.args, getenv, io.Discard)
		if err != nil || cfg.broadcast != tt.want {
			t.Errorf("parseFlags(%q): broadcast = %v, %v; want %v", tt.args, cfg.broadcast, err, tt.want)
		}
	}
}
