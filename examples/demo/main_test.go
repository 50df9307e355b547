package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestFlagsHideCredentials guards against the usage message printing
// DATABASE_URL and REDIS_URL, passwords included: they were the defaults
// of -database-url and -redis-url, which -h and every mistyped flag print.
// The variables must still be used when the flags are absent, and the
// flags must win over them.
func TestFlagsHideCredentials(t *testing.T) {
	envs := map[string]string{
		"DATABASE_URL": "postgres://postgres:hunter2%20XyZzy9%40@127.0.0.1:5432/postgres?sslmode=disable",
		"REDIS_URL":    "redis://:hunter2%20XyZzy9%40@127.0.0.1:6379/0",
	}
	getenv := func(name string) string { return envs[name] }
	for _, args := range [][]string{{"-h"}, {"-no-such-flag"}, {"-nodes", "many"}} {
		var out bytes.Buffer
		if _, err := parseFlags(args, getenv, &out); err == nil {
			t.Errorf("parseFlags(%q) = nil error", args)
		}
		if !strings.Contains(out.String(), "-database-url") {
			t.Errorf("parseFlags(%q) printed no usage:\n%s", args, &out)
		}
		for _, s := range []string{"hunter2", "XyZzy9"} {
			if strings.Contains(out.String(), s) {
				t.Errorf("the usage of %s shows %q of the password:\n%s", strings.Join(args, " "), s, &out)
			}
		}
	}

	var out bytes.Buffer
	cfg, err := parseFlags(nil, getenv, &out)
	if err != nil || cfg.dbURL != envs["DATABASE_URL"] || cfg.redisURL != envs["REDIS_URL"] {
		t.Errorf("parseFlags() = %q, %q, %v; want DATABASE_URL and REDIS_URL", cfg.dbURL, cfg.redisURL, err)
	}
	cfg, err = parseFlags([]string{"-database-url", "postgres://flag", "-redis-url", "redis://flag"}, getenv, &out)
	if err != nil || cfg.dbURL != "postgres://flag" || cfg.redisURL != "redis://flag" {
		t.Errorf("parseFlags(-database-url, -redis-url) = %q, %q, %v; want the flags", cfg.dbURL, cfg.redisURL, err)
	}
	cfg, err = parseFlags(nil, func(string) string { return "" }, &out)
	if err != nil || cfg.dbURL != "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" || cfg.redisURL != "redis://127.0.0.1:6379/0" {
		t.Errorf("parseFlags() without the variables = %q, %q, %v; want the local defaults", cfg.dbURL, cfg.redisURL, err)
	}
}
