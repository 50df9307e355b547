package invalidate

import "errors"

var (
	// ErrClosed is returned when publishing through a closed subscription
	// or bus, and when subscribing to a closed bus.
	ErrClosed = errors.New("invalidate: closed")

	// ErrInvalidOptions is wrapped by the errors [NewPubSub] and
	// [NewStreams] return for arguments they cannot use. (A MaxStaleness
	// that a bus cannot keep is the cache's option: Subscribe rejects it
	// with cache.ErrInvalidOptions.)
	ErrInvalidOptions = errors.New("invalidate: invalid options")

	// errNilHandler is returned by Subscribe for a nil Handler.
	errNilHandler = errors.New("invalidate: nil handler")

	// errMalformed reports a message that does not follow the format. The
	// receiver cannot know what it missed, so it flushes.
	errMalformed = errors.New("invalidate: malformed message")

	// errVersion reports a message of a format version this package does
	// not know, such as one from a newer node during a rolling upgrade.
	errVersion = errors.New("invalidate: unknown message format version")

	// errUnsubscribed reports that the server ended the subscription by
	// itself, as Redis Cluster does when the channel's slot migrates (race
	// 15).
	errUnsubscribed = errors.New("invalidate: the server unsubscribed the channel")

	// errProtocol reports an XREAD reply xreader does not understand.
	errProtocol = errors.New("invalidate: unexpected XREAD reply")
)
