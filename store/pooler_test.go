package store

import (
	"testing"

	"github.com/coherentcache/coherent/internal/testenv"
)

// TestThroughPooler runs the store's tests of the write path, optimistic
// writes, the relay and capture through pgbouncer in transaction mode,
// with each of pgx's exec modes that need no prepared statement kept
// across transactions.
func TestThroughPooler(t *testing.T) {
	pooler, primary := testenv.PoolerURL(t)
	for _, mode := range []string{"exec", "cache_describe", "simple_protocol"} {
		t.Run(mode, func(t *testing.T) {
			useURL(t, testenv.WithParam(t, pooler, "default_query_exec_mode", mode))
			useListenURL(t, primary)
			for _, tc := range poolerTests {
				t.Run(tc.name, tc.test)
			}
		})
	}
}

var poolerTests = []struct {
	name string
	test func(*testing.T)
}{
	{"MigrateIsIdempotentAndSafeConcurrently", TestMigrateIsIdempotentAndSafeConcurrently},
	{"MigrationKeepsCapturedTables", TestMigrationKeepsCapturedTables},
	{"WriteThroughReachesEveryNode", TestWriteThroughReachesEveryNode},
	{"DeleteThroughUpdate", TestDeleteThroughUpdate},
	{"NoLostUpdatesUnderTheLock", TestNoLostUpdatesUnderTheLock},
	{"NoLostUpdatesOptimistic", TestNoLostUpdatesOptimistic},
	{"FencingRejectsAStalledHolder", TestFencingRejectsAStalledHolder},
	{"FenceHealsACounterThatWentBackwards", TestFenceHealsACounterThatWentBackwards},
	{"LockLostMidTransaction", TestLockLostMidTransaction},
	{"CrashBetweenCommitAndPublish", TestCrashBetweenCommitAndPublish},
	{"PublishFailureAfterCommit", TestPublishFailureAfterCommit},
	{"OutboxStaysBoundedWhileTheBusIsDown", TestOutboxStaysBoundedWhileTheBusIsDown},
	{"RelayPublishesCapturedWrites", TestRelayPublishesCapturedWrites},
	{"StoreWritesSkipCapture", TestStoreWritesSkipCapture},
	{"ConfirmationsWhileTheRelayRuns", TestConfirmationsWhileTheRelayRuns},
	{"CaptureRejectsUnknownColumns", TestCaptureRejectsUnknownColumns},
	{"HostileKeys", TestHostileKeys},
	{"DeadlockIsAConflict", TestDeadlockIsAConflict},
	{"Tracer", TestTracer},
	{"PublishOutlivesTheCallersContext", TestPublishOutlivesTheCallersContext},
	{"FailedFnIsAFailedWrite", TestFailedFnIsAFailedWrite},
	{"CaptureInsideStoreTransactions", TestCaptureInsideStoreTransactions},
	{"CaptureKeysAreTheColumnTextForm", TestCaptureKeysAreTheColumnTextForm},
	{"RelayWithASilentLinkHoldsNoRows", TestRelayWithASilentLinkHoldsNoRows},
	{"PoisonRowsDoNotWedgeTheRelay", TestPoisonRowsDoNotWedgeTheRelay},
	{"FailedPublishMakesTheRowDueAtOnce", TestFailedPublishMakesTheRowDueAtOnce},
	{"FailedRelayHandsRowsBack", TestFailedRelayHandsRowsBack},
	{"WritesCarryTheirPosition", TestWritesCarryTheirPosition},
	{"CaptureWritesOfARestrictedRole", TestCaptureWritesOfARestrictedRole},
	{"CaptureDoesNotQueueBehindLongWrites", TestCaptureDoesNotQueueBehindLongWrites},
	{"CaptureFailsClearlyOrFlushes", TestCaptureFailsClearlyOrFlushes},
}
