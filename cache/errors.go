package cache

import (
	"errors"
	"fmt"
)

var (
	// ErrNotFound reports that the key does not exist in the source of
	// truth. A loader returns an error for which errors.Is(err, ErrNotFound)
	// is true to have the absence cached for [Options.NegativeTTL]; Get then
	// returns ErrNotFound itself.
	ErrNotFound = errors.New("cache: not found")

	// ErrClosed is returned by every method called after [Cache.Close].
	ErrClosed = errors.New("cache: closed")

	// ErrInvalidKey is returned for a key whose encoding is empty or longer
	// than [MaxKeyLen] bytes. Such a key is never loaded or cached.
	ErrInvalidKey = errors.New("cache: invalid key")

	// ErrInvalidOptions is returned by [New] for arguments it cannot use,
	// among them a MaxStaleness its Bus cannot keep ([Bus.Subscribe]).
	ErrInvalidOptions = errors.New("cache: invalid options")

	// ErrGoexit is wrapped by the error every caller waiting on a load
	// receives when code run by the load called runtime.Goexit, as
	// t.FailNow does in a test's loader. The cache keeps working; nothing
	// is stored for the load's keys.
	ErrGoexit = errors.New("cache: shared load called runtime.Goexit")
)

// PanicError is the error every caller waiting on a load receives when code
// run by the load panicked: the loader, [Options.LoadMany],
// [Options.Version], [Options.Weigher], or a [LoadTracer]. The cache keeps
// working; nothing is stored for the load's keys. [Cache.Set] and
// [Cache.Update] return one when Options.Weigher panics on the written
// value, after they dropped the key and published the write.
type PanicError struct {
	// Func names what panicked: "loader", "LoadMany", "Options.Version",
	// "Options.Weigher", "LoadTracer.TraceLoadStart" or
	// "LoadTracer.TraceLoadEnd". It is empty
	// for a panic elsewhere on the load's goroutine, such as in a Clock, in
	// the Bus's Subscription or in the Logger's handler.
	Func string
	// Value is what was passed to panic.
	Value any
	// Stack is the panicking goroutine's stack at the time of the panic.
	Stack []byte
}

func (e *PanicError) Error() string {
	what := e.Func
	if what == "" {
		what = "shared load"
	}
	return fmt.Sprintf("cache: %s panicked: %v", what, e.Value)
}

// Unwrap returns Value when it is an error.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}
