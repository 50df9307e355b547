package store

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/coherentcache/coherent/cache"
)

// Querier runs a query: a *pgxpool.Pool, a *pgx.Conn or a pgx.Tx.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

var _ Querier = (pgx.Tx)(nil)

// Loader returns a cache loader that runs query with the key as its only
// parameter ($1) and turns its single row into a V with scan, for example
// pgx.RowToStructByName[User]. No row becomes an error for which
// errors.Is(err, cache.ErrNotFound) is true, so the absence is cached.
//
//	load := store.Loader[int64](pool, `SELECT id, name, version FROM users WHERE id = $1`, pgx.RowToStructByName[User])
//	users, err := cache.New("users", 10_000, load, opts)
func Loader[K comparable, V any](db Querier, query string, scan pgx.RowToFunc[V]) cache.LoaderFunc[K, V] {
	return func(ctx context.Context, key K) (V, error) {
		rows, err := db.Query(ctx, query, key)
		if err != nil {
			var zero V
			return zero, err
		}
		v, err := pgx.CollectExactlyOneRow(rows, scan)
		if errors.Is(err, pgx.ErrNoRows) {
			return v, fmt.Errorf("%w: %v", cache.ErrNotFound, key)
		}
		return v, err
	}
}

// LoaderMany returns a loader for cache.Options.LoadMany that runs query
// with the keys as its only parameter ($1, an array: WHERE id = ANY($1)),
// turns each row into a V with scan, and files it under keyOf(v). Keys
// without a row are absent from the result.
func LoaderMany[K comparable, V any](db Querier, query string, scan pgx.RowToFunc[V], keyOf func(V) K) func(ctx context.Context, keys []K) (map[K]V, error) {
	return func(ctx context.Context, keys []K) (map[K]V, error) {
		rows, err := db.Query(ctx, query, keys)
		if err != nil {
			return nil, err
		}
		vs, err := pgx.CollectRows(rows, scan)
		if err != nil {
			return nil, err
		}
		m := make(map[K]V, len(vs))
		for _, v := range vs {
			m[keyOf(v)] = v
		}
		return m, nil
	}
}
