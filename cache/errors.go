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

	// ErrInvalidOptions is returned by [New] for arguments it cannot use.
	ErrInvalidOptions = errors.New("cache: invalid options")
)

// PanicError is the error every caller waiting on a load receives when the
// loader panicked. The cache keeps working; nothing is stored for the key.
type PanicError struct {
	// Value is what the loader passed to panic.
	Value any
	// Stack is the loader goroutine's stack at the time of the panic.
	Stack []byte
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("cache: loader panicked: %v", e.Value)
}

// Unwrap returns Value when it is an error.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}
