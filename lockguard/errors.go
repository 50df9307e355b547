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
)
