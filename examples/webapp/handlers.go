package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/coherentcache/coherent/cache"
	"github.com/coherentcache/coherent/lockguard"
	"github.com/coherentcache/coherent/store"
)

// maxID is the longest id accepted, in bytes.
const maxID = 256

// maxBody is the largest request body accepted, in bytes.
const maxBody = 1 << 20

// maxOutboxLag is how long the oldest due outbox row may wait for a relay
// before /healthz fails. A healthy relay publishes a due row within
// milliseconds of the notification.
const maxOutboxLag = 3 * time.Second

func (a *app) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /items/{id}", a.getItem)
	mux.HandleFunc("PUT /items/{id}", a.putItem)
	mux.HandleFunc("DELETE /items/{id}", a.deleteItem)
	mux.HandleFunc("POST /items/{id}/add", a.addItem)
	mux.HandleFunc("GET /stats", a.stats)
	mux.HandleFunc("GET /healthz", a.healthz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics, promhttp.HandlerOpts{}))
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

// itemID returns the path's id, or writes a 400 and returns false. An id is
// 1 to maxID bytes of text (see checkText).
func itemID(w http.ResponseWriter, r *http.Request) (string, bool) {
	id := r.PathValue("id")
	msg := ""
	switch {
	case id == "":
		msg = "empty id"
	case len(id) > maxID:
		msg = fmt.Sprintf("id longer than %d bytes", maxID)
	default:
		msg = checkText("id", id)
	}
	if msg != "" {
		writeError(w, http.StatusBadRequest, msg)
		return "", false
	}
	return id, true
}

// checkText returns why s, the client's field, cannot be stored in a text
// column, or "" if it can. Postgres rejects NUL bytes and invalid UTF-8 in
// text; checked here, they are the client's mistake (400), not a failure
// of the database (503).
func checkText(field, s string) string {
	switch {
	case !utf8.ValidString(s):
		return field + " is not valid UTF-8"
	case strings.IndexByte(s, 0) >= 0:
		return field + " contains a NUL byte"
	}
	return ""
}

// errTrailingData reports a body with more than one JSON value.
var errTrailingData = errors.New("data after the JSON object")

// decode reads the request's body, which must be one JSON value of at most
// maxBody bytes, into v. Otherwise it writes a 413 (too long) or a 400 and
// returns false.
func (a *app) decode(w http.ResponseWriter, r *http.Request, v any) bool {
	body := &bodyReader{r: http.MaxBytesReader(w, r.Body, maxBody)}
	dec := json.NewDecoder(body)
	dec.UseNumber()
	err := dec.Decode(v)
	if err == nil {
		// Reading on to the end enforces maxBody on what follows too.
		if _, err = dec.Token(); errors.Is(err, io.EOF) {
			return true
		} else if err == nil {
			err = errTrailingData
		}
	}
	var tooLong *http.MaxBytesError
	var netErr net.Error
	switch {
	case errors.As(body.err, &tooLong):
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body longer than %d bytes", maxBody))
	case body.err != nil:
		// The connection failed, or the server's ReadTimeout passed; the
		// error names addresses, which are not the client's business.
		a.log.Info("reading a request body", "method", r.Method, "path", r.URL.Path, "err", body.err)
		if errors.As(body.err, &netErr) && netErr.Timeout() {
			writeError(w, http.StatusRequestTimeout, "body not received in time")
		} else {
			writeError(w, http.StatusBadRequest, "could not read the body")
		}
	default:
		writeError(w, http.StatusBadRequest, "body is not a JSON object: "+err.Error())
	}
	return false
}

// bodyReader keeps the error of reading a body, apart from the errors of
// decoding it.
type bodyReader struct {
	r   io.Reader
	err error // the first error other than io.EOF
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && b.err == nil {
		b.err = err
	}
	return n, err
}

// The bodies of 503s. They tell a client what it may do and whether its
// write happened, never why it failed: SQLSTATEs, addresses, lock names and
// fencing tokens are the operator's business, and go to the log.
const (
	// A read, or a write that surely did not happen.
	msgUnavailable = "temporarily unavailable, retry"
	// A write whose transaction may have committed.
	msgUnknown = "temporarily unavailable, the write may or may not have happened; retry"
	// Writes that were rolled back.
	msgFenced   = "write lost its lock and was fenced off, nothing written; retry"
	msgLockLost = "write lost its lock, nothing written; retry"
	msgConflict = "write conflicted with a concurrent one, nothing written; retry"
)

// fail maps a library error to a response and logs what the response does
// not say.
func (a *app) fail(w http.ResponseWriter, r *http.Request, err error) {
	log := a.log.With("method", r.Method, "path", r.URL.Path, "err", err)
	switch {
	case errors.Is(err, cache.ErrInvalidKey):
		writeError(w, http.StatusBadRequest, err.Error())
	case r.Context().Err() != nil:
		writeError(w, 499, "request cancelled")
	case errors.Is(err, store.ErrCommitUnknown):
		// The write may have committed, whatever else went wrong (a
		// lost lock comes with it too): never "nothing written".
		log.Error("write of unknown outcome")
		writeError(w, http.StatusServiceUnavailable, msgUnknown)
	// Nothing was written; the client may retry.
	case errors.Is(err, store.ErrFenced):
		log.Warn("write fenced")
		writeError(w, http.StatusServiceUnavailable, msgFenced)
	case errors.Is(err, lockguard.ErrNotHeld):
		log.Warn("write lost its lock")
		writeError(w, http.StatusServiceUnavailable, msgLockLost)
	case errors.Is(err, store.ErrConflict):
		log.Warn("write conflicted")
		writeError(w, http.StatusServiceUnavailable, msgConflict)
	default:
		log.Error("request failed")
		msg := msgUnknown
		if r.Method == http.MethodGet {
			msg = msgUnavailable
		}
		writeError(w, http.StatusServiceUnavailable, msg)
	}
}

func (a *app) getItem(w http.ResponseWriter, r *http.Request) {
	id, ok := itemID(w, r)
	if !ok {
		return
	}
	it, err := a.items.Get(r.Context(), id)
	switch {
	case errors.Is(err, cache.ErrNotFound):
		writeError(w, http.StatusNotFound, "not found")
	case err != nil:
		a.fail(w, r, err)
	default:
		writeJSON(w, http.StatusOK, it)
	}
}

// upsert is the write of a new value: version 1 for a new row, one more
// otherwise.
func upsert(id, value string) store.TxFunc[Item] {
	return func(ctx context.Context, tx pgx.Tx) (cache.Change[Item], error) {
		rows, _ := tx.Query(ctx, `
			INSERT INTO items AS t (id, value, version) VALUES ($1, $2, 1)
			ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, version = t.version + 1
			RETURNING id, value, version`, id, value)
		it, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Item])
		return cache.Change[Item]{Value: it, Version: it.Version}, err
	}
}

func (a *app) putItem(w http.ResponseWriter, r *http.Request) {
	id, ok := itemID(w, r)
	if !ok {
		return
	}
	var body struct {
		Value *string `json:"value"`
	}
	if !a.decode(w, r, &body) {
		return
	}
	if body.Value == nil {
		writeError(w, http.StatusBadRequest, `missing field "value"`)
		return
	}
	if msg := checkText("value", *body.Value); msg != "" {
		writeError(w, http.StatusBadRequest, msg)
		return
	}
	ch, err := a.items.Update(r.Context(), id, upsert(id, *body.Value))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, ch.Value)
}

func (a *app) deleteItem(w http.ResponseWriter, r *http.Request) {
	id, ok := itemID(w, r)
	if !ok {
		return
	}
	_, err := a.items.Update(r.Context(), id, func(ctx context.Context, tx pgx.Tx) (cache.Change[Item], error) {
		_, err := tx.Exec(ctx, `DELETE FROM items WHERE id = $1`, id)
		// An item created again starts over at version 1, so the deletion
		// has no version that orders it against later writes: 0. (Any
		// version here would outrank the new item's first versions.)
		return cache.Change[Item]{Deleted: true}, err
	})
	if err != nil {
		a.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

var (
	// errNotInteger reports an add to an item whose value is not an integer.
	errNotInteger = errors.New("value is not an integer")
	// errOverflow reports an add whose sum does not fit in an int64.
	errOverflow = errors.New("the sum is out of the range of a 64-bit integer; nothing written")
)

// add returns n + delta, or errOverflow if the sum does not fit in an
// int64 (Go's + would wrap around).
func add(n, delta int64) (int64, error) {
	sum := n + delta
	if (delta > 0 && sum < n) || (delta < 0 && sum > n) {
		return 0, errOverflow
	}
	return sum, nil
}

func (a *app) addItem(w http.ResponseWriter, r *http.Request) {
	id, ok := itemID(w, r)
	if !ok {
		return
	}
	var body struct {
		Delta *json.Number `json:"delta"`
	}
	if !a.decode(w, r, &body) {
		return
	}
	if body.Delta == nil {
		writeError(w, http.StatusBadRequest, `missing field "delta"`)
		return
	}
	delta, err := body.Delta.Int64()
	if err != nil {
		writeError(w, http.StatusBadRequest, `"delta" is not an integer`)
		return
	}
	// Read, add and write under the lock: concurrent adds on any instance
	// are serialised, and none is lost.
	ch, err := a.items.Update(r.Context(), id, func(ctx context.Context, tx pgx.Tx) (cache.Change[Item], error) {
		var cur string
		err := tx.QueryRow(ctx, `SELECT value FROM items WHERE id = $1`, id).Scan(&cur)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return cache.Change[Item]{}, err
		}
		n := int64(0)
		if err == nil {
			if n, err = strconv.ParseInt(cur, 10, 64); err != nil {
				return cache.Change[Item]{}, errNotInteger
			}
		}
		sum, err := add(n, delta)
		if err != nil {
			return cache.Change[Item]{}, err
		}
		return upsert(id, strconv.FormatInt(sum, 10))(ctx, tx)
	})
	switch {
	case errors.Is(err, errNotInteger):
		writeError(w, http.StatusConflict, errNotInteger.Error())
	case errors.Is(err, errOverflow):
		writeError(w, http.StatusUnprocessableEntity, errOverflow.Error())
	case err != nil:
		a.fail(w, r, err)
	default:
		writeJSON(w, http.StatusOK, ch.Value)
	}
}

func (a *app) stats(w http.ResponseWriter, r *http.Request) {
	st := map[string]any{
		"cache": a.items.Cache().Stats(),
		"bus":   a.bus.Stats(),
		"store": a.store.Stats(),
	}
	if a.reads != nil {
		st["replica"] = a.reads.Stats()
	}
	if a.audit != nil {
		st["audit"] = newAuditFigures(a.audit.Stats())
	}
	writeJSON(w, http.StatusOK, st)
}

// auditFigures is the "audit" object of /stats: store.AuditStats, with its
// consistency ratio and nines.
type auditFigures struct {
	Checked         uint64  `json:"checked"`
	Rechecks        uint64  `json:"rechecks"`
	Resolved        uint64  `json:"resolved"`
	Inconsistencies uint64  `json:"inconsistencies"`
	SourceErrors    uint64  `json:"source_errors"`
	Skipped         uint64  `json:"skipped"`
	Consistency     float64 `json:"consistency"`
	Nines           float64 `json:"nines"`
}

func newAuditFigures(s store.AuditStats) auditFigures {
	return auditFigures{
		Checked: s.Checked, Rechecks: s.Rechecks, Resolved: s.Resolved, Inconsistencies: s.Inconsistencies,
		SourceErrors: s.SourceErrors, Skipped: s.Skipped, Consistency: s.Consistency(), Nines: s.Nines(),
	}
}

func (a *app) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := a.pool.Ping(ctx); err != nil {
		a.log.Warn("healthz: postgres", "err", err)
		writeError(w, http.StatusServiceUnavailable, "postgres unreachable")
		return
	}
	if err := a.rdb.Ping(ctx).Err(); err != nil {
		a.log.Warn("healthz: redis", "err", err)
		writeError(w, http.StatusServiceUnavailable, "redis unreachable")
		return
	}
	if !a.items.Cache().Proven() {
		writeError(w, http.StatusServiceUnavailable, "bus link not proven within MaxStaleness: serving from Postgres")
		return
	}
	// An outbox row that stays due means that no relay publishes: outside
	// writes (and writes whose publication failed) are not announced.
	lag, err := a.store.OutboxLag(ctx)
	if err != nil {
		a.log.Warn("healthz: outbox lag", "err", err)
		writeError(w, http.StatusServiceUnavailable, "postgres unreachable")
		return
	}
	if lag > maxOutboxLag {
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("outbox: the oldest due row has waited %v for a relay", lag.Round(time.Millisecond)))
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
