package lockguard

import "errors"

var (
	// ErrNotAcquired reports that a lock is held by another owner.
	// [Guard.TryAcquire] returns an error for which errors.Is(err,
	// ErrNotAcquired) is true when the lock is taken, and so does
	// [Guard.Acquire] when its context ends while the lock is still taken.
	ErrNotAcquired = errors.New("lockguard: lock held by another owner")

	// ErrNotHeld reports that the caller no longer holds a lock: it was
	// released, its lease ran out, or another owner holds it now.
	// [Lock.Release] and [Lock.Extend] return an error for which
	// errors.Is(err, ErrNotHeld) is true in that case, and never touch
	// another owner's lock. A lost lock's cause, as given to the function
	// run by [Guard.WithLock], is such an error too.
	ErrNotHeld = errors.New("lockguard: lock not held")

	// ErrInvalidName is returned for an empty lock name or one longer than
	// [MaxNameLen], before anything is sent to Redis.
	ErrInvalidName = errors.New("lockguard: invalid lock name")

	// ErrInvalidTTL is returned by [Lock.Extend] for a ttl shorter than a
	// millisecond, the resolution of Redis expiry.
	ErrInvalidTTL = errors.New("lockguard: invalid ttl")

	// ErrInvalidOptions is returned by [New] for arguments it cannot use.
	ErrInvalidOptions = errors.New("lockguard: invalid options")

	// ErrClosed is returned by the methods of a [Guard] called after
	// [Guard.Close], and by an Acquire that was waiting when Close was
	// called.
	ErrClosed = errors.New("lockguard: guard closed")

	// ErrFenceExhausted reports that the fence counter of a lock name is
	// at math.MaxInt64, so no greater token can be issued. Every
	// acquisition of the name fails with it, at once and leaving the lock
	// free, and so does [Guard.AdvanceFence] with atLeast MaxInt64. INCR
	// alone would take 2^63 acquisitions to get there: the counter was set
	// by hand or advanced to a bogus value. Recovery needs an operator,
	// because both sides of the fence must move down together: stop every
	// writer of the name, then delete the counter (see Keys in the package
	// documentation) and the token the resource stored for the name (in
	// package store, its row in the table fences). Lowering only the counter
	// stalls every write; lowering only the stored token would let a
	// stalled holder of an old, higher token through.
	ErrFenceExhausted = errors.New("lockguard: fence counter exhausted at MaxInt64; reset it and the stored token together")

	// ErrFenceCorrupt reports that the fence counter key of a lock name
	// holds something other than an int64 in decimal (text, a float, a
	// value of another type): something other than lockguard wrote under
	// its prefix. Every acquisition of the name fails with it, leaving the
	// lock free, and so does [Guard.AdvanceFence], which leaves the key
	// alone: only an operator can tell what it held. To recover, delete
	// the key; tokens then restart from 1, which the resource rejects until
	// the counter is advanced past the token it stored, as after any loss
	// of the counter (package store does so on the first rejected write).
	ErrFenceCorrupt = errors.New("lockguard: fence counter is not an integer; delete it, then advance the fence")
)
