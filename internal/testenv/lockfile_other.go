//go:build !unix

package testenv

import (
	"os"
	"time"
)

// lockFile does not lock where flock is missing: tests that share a
// replica then run side by side, as without the lock.
func lockFile(*os.File, time.Duration) error { return nil }

func unlockFile(*os.File) {}
