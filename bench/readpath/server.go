package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	"github.com/coherentcache/coherent/cache"
)

// Item is a row of the items table, as in examples/webapp.
type Item struct {
	ID      string `json:"id" db:"id"`
	Value   string `json:"value" db:"value"`
	Version int64  `json:"version" db:"version"`
}

// maxID is the longest id accepted, in bytes (as in examples/webapp).
const maxID = 256

// source is the data access of one variant: all that differs between them.
// get returns an error for which errors.Is(err, cache.ErrNotFound) is true
// for a missing item.
type source interface {
	get(ctx context.Context, id string) (Item, error)
}

// server is the HTTP side shared by every variant: examples/webapp's
// GET /items/{id}, over src.
type server struct {
	src    source
	errors func(error) // counts failures
}

func (s *server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /items/{id}", s.getItem)
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

func (s *server) getItem(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	switch {
	case id == "":
		writeError(w, http.StatusBadRequest, "empty id")
		return
	case len(id) > maxID:
		writeError(w, http.StatusBadRequest, fmt.Sprintf("id longer than %d bytes", maxID))
		return
	}
	it, err := s.src.get(r.Context(), id)
	switch {
	case errors.Is(err, cache.ErrNotFound):
		writeError(w, http.StatusNotFound, "not found")
	case r.Context().Err() != nil:
		// The load generator hung up at the end of a measurement.
		writeError(w, 499, "request cancelled")
	case err != nil:
		s.errors(err)
		writeError(w, http.StatusServiceUnavailable, err.Error())
	default:
		writeJSON(w, http.StatusOK, it)
	}
}

// coherentSource reads through the library.
type coherentSource struct{ items *cache.Cache[string, Item] }

func (s coherentSource) get(ctx context.Context, id string) (Item, error) {
	return s.items.Get(ctx, id)
}

// postgresSource reads every request from Postgres, with the loader the
// cache uses on a miss.
type postgresSource struct {
	load cache.LoaderFunc[string, Item]
}

func (s postgresSource) get(ctx context.Context, id string) (Item, error) {
	return s.load(ctx, id)
}

// redisSource is cache-aside on Redis: GET; on a miss, the loader and SET
// with a TTL. Values are stored as JSON.
type redisSource struct {
	rdb    *redis.Client
	prefix string
	ttl    time.Duration
	load   cache.LoaderFunc[string, Item]
}

func (s redisSource) get(ctx context.Context, id string) (Item, error) {
	key := s.prefix + id
	b, err := s.rdb.Get(ctx, key).Bytes()
	switch {
	case err == nil:
		var it Item
		if err := json.Unmarshal(b, &it); err != nil {
			return Item{}, fmt.Errorf("decode %s: %w", key, err)
		}
		return it, nil
	case !errors.Is(err, redis.Nil):
		return Item{}, err
	}
	it, err := s.load(ctx, id)
	if err != nil {
		return Item{}, err
	}
	b, err = json.Marshal(it)
	if err != nil {
		return Item{}, err
	}
	if err := s.rdb.Set(ctx, key, b, s.ttl).Err(); err != nil {
		return Item{}, err
	}
	return it, nil
}

// ceilingSource answers every id with the item the table holds for it
// (as setup wrote it), made up at no cost: the same handler over it measures what HTTP over
// loopback, JSON encoding and the load generator allow on the machine,
// which bounds the other variants.
type ceilingSource struct{}

func (ceilingSource) get(_ context.Context, id string) (Item, error) {
	return Item{ID: id, Value: "value of " + id, Version: 1}, nil
}

// loaderQuery is examples/webapp's loader query, on the run's own schema.
func loaderQuery(schema string) string {
	return `SELECT id, value, version FROM ` + pgx.Identifier{schema, "items"}.Sanitize() + ` WHERE id = $1`
}
