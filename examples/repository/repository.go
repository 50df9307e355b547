// Package repository shows how a service wires coherent into its own
// repository layer: a UserRepository interface, a Postgres implementation
// that knows nothing about caching, and a decorator that serves reads from
// a coherent cache and sends writes through the lock-guarded write path.
// Copy it and rename.
package repository

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/store"
)

// User is a row of the users table:
//
//	CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, version bigint NOT NULL)
type User struct {
	ID      int64  `db:"id"`
	Name    string `db:"name"`
	Email   string `db:"email"`
	Version int64  `db:"version"`
}

// ErrNotFound is returned for a user that does not exist.
var ErrNotFound = errors.New("user not found")

// UserRepository is what the rest of the service sees.
type UserRepository interface {
	Get(ctx context.Context, id int64) (User, error)
	Rename(ctx context.Context, id int64, name string) (User, error)
	Delete(ctx context.Context, id int64) error
}

// Postgres is the plain implementation: every call is a query.
type Postgres struct{ Pool *pgxpool.Pool }

const selectUser = `SELECT id, name, email, version FROM users WHERE id = $1`

func (p Postgres) Get(ctx context.Context, id int64) (User, error) {
	rows, _ := p.Pool.Query(ctx, selectUser, id)
	u, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[User])
	if errors.Is(err, pgx.ErrNoRows) {
		return u, ErrNotFound
	}
	return u, err
}

// rename is the statement both implementations run; it bumps the version
// that the cache orders writes by.
func rename(ctx context.Context, tx pgx.Tx, id int64, name string) (User, error) {
	rows, _ := tx.Query(ctx, `UPDATE users SET name = $2, version = version + 1 WHERE id = $1
		RETURNING id, name, email, version`, id, name)
	u, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[User])
	if errors.Is(err, pgx.ErrNoRows) {
		return u, ErrNotFound
	}
	return u, err
}

func (p Postgres) Rename(ctx context.Context, id int64, name string) (u User, err error) {
	err = pgx.BeginFunc(ctx, p.Pool, func(tx pgx.Tx) error {
		u, err = rename(ctx, tx, id, name)
		return err
	})
	return u, err
}

func (p Postgres) Delete(ctx context.Context, id int64) error {
	_, err := p.Pool.Exec(ctx, `DELETE FROM users WHERE id = $1`, id)
	return err
}

// Cached decorates a UserRepository with a coherent cache. Reads come from
// memory; writes go through the table's Update, which locks the user across
// all instances, commits with an outbox row, installs the new row in this
// instance's cache and tells every other instance to drop its copy.
type Cached struct {
	Users *store.Table[int64, User]
}

// NewCached builds the cache of users. bus is the process's invalidation
// bus (package invalidate), shared with its other caches.
func NewCached(pool *pgxpool.Pool, s *store.Store, bus cache.Bus) (*Cached, error) {
	users, err := cache.New("users", 100_000,
		// Missing rows become cache.ErrNotFound, so absences are cached
		// (and invalidated) like rows.
		store.Loader[int64](pool, selectUser, pgx.RowToStructByName[User]),
		&cache.Options[int64, User]{
			Bus:     bus,
			Version: func(u User) int64 { return u.Version },
		})
	if err != nil {
		return nil, err
	}
	return &Cached{Users: store.NewTable(s, users, &store.TableOptions{Table: "users", KeyColumn: "id", VersionColumn: "version"})}, nil
}

var _ UserRepository = (*Cached)(nil)

func (c *Cached) Get(ctx context.Context, id int64) (User, error) {
	u, err := c.Users.Get(ctx, id)
	if errors.Is(err, cache.ErrNotFound) {
		return u, ErrNotFound
	}
	return u, err
}

func (c *Cached) Rename(ctx context.Context, id int64, name string) (User, error) {
	ch, err := c.Users.Update(ctx, id, func(ctx context.Context, tx pgx.Tx) (cache.Change[User], error) {
		u, err := rename(ctx, tx, id, name)
		return cache.Change[User]{Value: u, Version: u.Version}, err
	})
	return ch.Value, err
}

func (c *Cached) Delete(ctx context.Context, id int64) error {
	_, err := c.Users.Update(ctx, id, func(ctx context.Context, tx pgx.Tx) (cache.Change[User], error) {
		_, err := tx.Exec(ctx, `DELETE FROM users WHERE id = $1`, id)
		// A user created again starts over at version 1: the deletion
		// carries no version (0), or it would outrank the new row.
		return cache.Change[User]{Deleted: true}, err
	})
	return err
}

// Close releases the cache.
func (c *Cached) Close() error { return c.Users.Cache().Close() }
