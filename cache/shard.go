package cache

import (
	"sync"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// entry is what a shard stores for a key.
type entry[V any] struct {
	value   V
	version int64 // 0: unknown
	expires int64 // in Cache.now's time base
	missing bool  // the key does not exist in the source (negative entry)
}

// shard is one independently locked segment of the LRU. Parallel readers of
// different shards never contend.
type shard[K comparable, V any] struct {
	mu        sync.Mutex
	lru       *simplelru.LRU[K, entry[V]] // guarded by mu
	size      int                         // capacity of lru; immutable
	hits      uint64                      // guarded by mu
	misses    uint64                      // guarded by mu
	evictions uint64                      // guarded by mu
	// Keep neighbouring shards' mutexes off this cache line: 48 bytes of
	// fields above, padded to 128 (two lines, for the adjacent-line
	// prefetcher).
	_ [80]byte
}

func newLRU[K comparable, V any](size int) *simplelru.LRU[K, entry[V]] {
	// NewLRU fails only for size <= 0, which New rules out.
	l, _ := simplelru.NewLRU[K, entry[V]](size, nil)
	return l
}

// lookup returns the live entry of key and counts a hit or a miss. An
// expired entry is removed and counts as a miss.
func (s *shard[K, V]) lookup(key K, now int64) (entry[V], bool) {
	s.mu.Lock()
	e, ok := s.lru.Get(key)
	if ok && now < e.expires {
		s.hits++
		s.mu.Unlock()
		return e, true
	}
	if ok {
		s.lru.Remove(key)
	}
	s.misses++
	s.mu.Unlock()
	return entry[V]{}, false
}

// peek returns the live entry of key without counting or touching recency.
func (s *shard[K, V]) peek(key K, now int64) (entry[V], bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.lru.Peek(key)
	return e, ok && now < e.expires
}

// keeps reports whether a cached entry old must be kept rather than be
// replaced by, or dropped for, a change at version. Only a known version
// at least as new as the change's known version is kept.
func keeps(old int64, version int64) bool {
	return version != 0 && old >= version
}
