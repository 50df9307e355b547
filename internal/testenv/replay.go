package testenv

import (
	"context"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// The replica of DATABASE_REPLICA_URL is shared by the test binaries of a
// run, which go test runs side by side. A test that pauses its replay, or
// that needs it running to see the replica catch up, holds the replay lock
// (a file lock, so across processes) for as long as it runs: see
// [PauseReplay] and [WaitReplayed].

// replay is this process's hold of the replay lock: tests of one binary
// share it (a subtest of a test that holds it, for one).
var replay struct {
	sync.Mutex
	f     *os.File
	holds int
}

// LockReplay takes the replica's replay lock until t ends, waiting for
// another test binary's hold to end for up to two minutes.
func LockReplay(t testing.TB, replica string) {
	t.Helper()
	replay.Lock()
	defer replay.Unlock()
	if replay.holds == 0 {
		h := fnv.New64a()
		h.Write([]byte(replica))
		path := filepath.Join(os.TempDir(), fmt.Sprintf("coherent-replay-%x.lock", h.Sum64()))
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o666)
		if err != nil {
			t.Fatalf("replay lock: %v", err)
		}
		if err := lockFile(f, 2*time.Minute); err != nil {
			f.Close()
			t.Fatalf("replay lock %s: %v", path, err)
		}
		replay.f = f
	}
	replay.holds++
	t.Cleanup(func() {
		replay.Lock()
		defer replay.Unlock()
		if replay.holds--; replay.holds == 0 {
			unlockFile(replay.f)
			replay.f.Close()
			replay.f = nil
		}
	})
}

// PauseReplay stops the replica's replay of the WAL it receives (it keeps
// receiving it), holding the replay lock, and waits until the replay has
// stopped. The replay resumes when resume is called or the test ends.
func PauseReplay(t testing.TB, replica string) (resume func()) {
	t.Helper()
	LockReplay(t, replica)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var state string
	if err := queryRow(ctx, replica, `SELECT pg_wal_replay_pause()::text`, new(string)); err != nil {
		t.Fatalf("pause the replica's replay: %v", err)
	}
	resumed := false
	resume = func() {
		if resumed {
			return
		}
		resumed = true
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := queryRow(ctx, replica, `SELECT pg_wal_replay_resume()::text`, new(string)); err != nil {
			t.Errorf("resume the replica's replay: %v", err)
		}
	}
	t.Cleanup(resume)
	for state != "paused" {
		if err := queryRow(ctx, replica, `SELECT pg_get_wal_replay_pause_state()`, &state); err != nil {
			t.Fatalf("the replica's replay state: %v", err)
		}
		if state != "paused" {
			time.Sleep(5 * time.Millisecond)
		}
	}
	return resume
}

// WaitReplayed waits, holding the replay lock, until the replica has
// replayed everything the primary had written when it was called.
func WaitReplayed(t testing.TB, primary, replica string) {
	t.Helper()
	LockReplay(t, replica)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var target string
	if err := queryRow(ctx, primary, `SELECT pg_current_wal_insert_lsn()::text`, &target); err != nil {
		t.Fatalf("the primary's position: %v", err)
	}
	for {
		var done bool
		// target is a pg_lsn's text form, read from the server: no quote.
		// A hot standby cancels queries, and even connections, that
		// conflict with what it replays (a dropped schema, say): retry.
		if err := queryRow(ctx, replica, `SELECT pg_last_wal_replay_lsn() >= '`+target+`'::pg_lsn`, &done); err != nil {
			if ctx.Err() != nil {
				t.Fatalf("the replica's replay: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
			continue
		}
		if done {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}
