package store

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// DefaultSchema is the schema of the library's tables when none is given.
const DefaultSchema = "coherent"

// schemaPattern limits schema names to plain lower-case identifiers, so that
// the name can appear as an identifier, in a NOTIFY channel and inside
// generated trigger definitions without any quoting subtleties.
var schemaPattern = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,47}$`)

func checkSchema(schema string) (string, error) {
	if schema == "" {
		return DefaultSchema, nil
	}
	if !schemaPattern.MatchString(schema) {
		return "", fmt.Errorf("%w: schema %q must match %s", ErrInvalidOptions, schema, schemaPattern)
	}
	return schema, nil
}

type migration struct {
	version int
	name    string
	sql     string
}

// migrations returns the embedded migrations for schema, in order.
func migrations(schema string) ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("store: migration file %q is not named NNNN_name.sql", e.Name())
		}
		b, err := migrationFiles.ReadFile("migrations/" + e.Name())
		if err != nil {
			return nil, err
		}
		sql := strings.NewReplacer(
			"{{schema}}", pgx.Identifier{schema}.Sanitize(),
			"{{name}}", schema,
		).Replace(string(b))
		ms = append(ms, migration{version: v, name: e.Name(), sql: sql})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	return ms, nil
}

// Migrate creates or upgrades the library's tables in schema ("" means
// [DefaultSchema]). It is idempotent, and safe when several nodes run it at
// once: a transaction-scoped advisory lock serialises them, and every
// migration not yet recorded runs in that one transaction. Run it
// explicitly, at deploy or start-up; nothing in this package migrates
// silently.
//
// ctx bounds the whole migration.
func Migrate(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	schema, err := checkSchema(schema)
	if err != nil {
		return err
	}
	ms, err := migrations(schema)
	if err != nil {
		return err
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// The lock key is derived from the schema so that different
		// schemas migrate independently.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('coherent.migrate.' || $1, 0))`, schema); err != nil {
			return err
		}
		ident := pgx.Identifier{schema}.Sanitize()
		if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+ident); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+ident+`.migrations (
			version    int PRIMARY KEY,
			name       text NOT NULL,
			applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT version FROM `+ident+`.migrations`)
		if err != nil {
			return err
		}
		applied, err := pgx.CollectRows(rows, pgx.RowTo[int])
		if err != nil {
			return err
		}
		done := make(map[int]bool, len(applied))
		for _, v := range applied {
			done[v] = true
		}
		for _, m := range ms {
			if done[m.version] {
				continue
			}
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return fmt.Errorf("%s: %w", m.name, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO `+ident+`.migrations (version, name) VALUES ($1, $2)`, m.version, m.name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: migrate schema %q: %w", schema, translate(err))
	}
	return nil
}
