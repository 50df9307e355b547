package services

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
)

// TestPingHidesCredentials guards against the errors of PingPostgres and
// PingRedis, which examples/demo and the integration suite print, showing
// a password: go-redis quotes a URL it cannot parse whole, and pgx's
// best-effort redaction of a connection string it cannot parse lets parts
// of a password with a space or an unescaped '@' through. The services
// are unreachable or the strings malformed, so that every ping fails.
func TestPingHidesCredentials(t *testing.T) {
	ctx := context.Background()
	for _, dsn := range []string{
		"host=127.0.0.1 user=postgres password='hunter2 XyZzy9 dbname=postgres",
		`host=127.0.0.1 user=postgres password=hunter2\ XyZzy9 sslmode=bogus`,
		"postgres://postgres:hunter2@XyZzy9:x@127.0.0.1:5432/postgres",
		"postgres://postgres:hunter2 XyZzy9@127.0.0.1:5432/postgres",
		"postgres://postgres:hunter2%20XyZzy9%40@127.0.0.1:1/postgres?sslmode=disable",
		"host=127.0.0.1 port=1 user=postgres password='hunter2 XyZzy9' sslmode=disable",
	} {
		err := PingPostgres(ctx, dsn)
		if err == nil {
			t.Errorf("PingPostgres(%q) = nil; want an error", dsn)
			continue
		}
		checkNoSecret(t, "PingPostgres", err.Error())
	}
	for _, dsn := range []string{
		"redis://:hunter2 XyZzy9@127.0.0.1:6379/0",
		"redis://user:hunter2%zzXyZzy9@127.0.0.1:6379/0",
		"redis://user:hunter2XyZzy9@[::1:6379/0",
		"redis://user:hunter2%20XyZzy9%40@127.0.0.1:1/0?max_retries=-1",
	} {
		err := PingRedis(ctx, dsn)
		if err == nil {
			t.Errorf("PingRedis(%q) = nil; want an error", dsn)
			continue
		}
		checkNoSecret(t, "PingRedis", err.Error())
	}
}

func checkNoSecret(t *testing.T, what, out string) {
	t.Helper()
	for _, s := range []string{"hunter2", "XyZzy9"} {
		if strings.Contains(out, s) {
			t.Errorf("the error of %s shows %q of the password: %s", what, s, out)
		}
	}
}

// TestHideSecret guards against a driver's connection error that quotes
// the password, as is or escaped as in a URL: none does today, and
// HideSecret keeps it so if one starts to.
func TestHideSecret(t *testing.T) {
	const pw = "hunter2 XyZzy9@:/?#%'"
	for _, msg := range []string{
		"auth failed for password " + pw,
		"cannot dial redis://u:" + url.QueryEscape(pw) + "@h:1/0",
		"cannot dial " + (&url.URL{Scheme: "postgres", User: url.UserPassword("u", pw), Host: "h:1"}).String(),
	} {
		got := HideSecret(errors.New(msg), pw)
		checkNoSecret(t, "HideSecret", got.Error())
		if !strings.Contains(got.Error(), "xxxxx") {
			t.Errorf("HideSecret(%q) = %q; want the password replaced by xxxxx", msg, got)
		}
	}
	err := errors.New("connection refused")
	if got := HideSecret(err, pw); got != err {
		t.Errorf("HideSecret(%v) = %v; want the error itself", err, got)
	}
}
