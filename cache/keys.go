package cache

import (
	"fmt"
	"reflect"
	"strconv"
	"unsafe"
)

// MaxKeyLen is the length in bytes of the longest encoded key a Cache
// accepts. Longer keys, and keys that encode to the empty string, get
// [ErrInvalidKey].
const MaxKeyLen = 4096

// KeyCodec turns keys into the strings the bus carries and back. Encode must
// be injective, and Decode(Encode(k)) must equal k on every node.
type KeyCodec[K comparable] interface {
	Encode(key K) string
	Decode(s string) (K, error)
}

// defaultCodec returns the codec used when [Options.Keys] is nil: the
// identity for key types whose underlying type is string, and base-10 text
// for integer kinds. Other key types need an explicit codec.
func defaultCodec[K comparable]() (KeyCodec[K], error) {
	typ := reflect.TypeFor[K]()
	switch typ.Kind() {
	case reflect.String:
		return stringCodec[K]{}, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return intCodec[K]{typ: typ}, nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return uintCodec[K]{typ: typ}, nil
	}
	return nil, fmt.Errorf("%w: Options.Keys is required for key type %v", ErrInvalidOptions, typ)
}

// stringCodec is the identity on key types whose underlying type is string.
type stringCodec[K comparable] struct{}

func (stringCodec[K]) Encode(k K) string {
	// K's underlying type is string (checked in defaultCodec), so the
	// conversion reinterprets the same header.
	return *(*string)(unsafe.Pointer(&k))
}

func (stringCodec[K]) Decode(s string) (K, error) {
	return *(*K)(unsafe.Pointer(&s)), nil
}

type intCodec[K comparable] struct{ typ reflect.Type }

func (intCodec[K]) Encode(k K) string {
	return strconv.FormatInt(reflect.ValueOf(k).Int(), 10)
}

func (c intCodec[K]) Decode(s string) (K, error) {
	var zero K
	n, err := strconv.ParseInt(s, 10, c.typ.Bits())
	if err != nil {
		return zero, fmt.Errorf("cache: decode key %q: %w", s, err)
	}
	v := reflect.New(c.typ).Elem()
	v.SetInt(n)
	return v.Interface().(K), nil
}

type uintCodec[K comparable] struct{ typ reflect.Type }

func (uintCodec[K]) Encode(k K) string {
	return strconv.FormatUint(reflect.ValueOf(k).Uint(), 10)
}

func (c uintCodec[K]) Decode(s string) (K, error) {
	var zero K
	n, err := strconv.ParseUint(s, 10, c.typ.Bits())
	if err != nil {
		return zero, fmt.Errorf("cache: decode key %q: %w", s, err)
	}
	v := reflect.New(c.typ).Elem()
	v.SetUint(n)
	return v.Interface().(K), nil
}
