package lockguard

import "github.com/redis/go-redis/v9"

// The scripts run with EVALSHA and fall back to EVAL when Redis answers
// NOSCRIPT (after a restart or SCRIPT FLUSH), through [redis.Script.Run].
// Each touches only keys of one lock, which share a hash tag, so they run
// unchanged on Redis Cluster.

// acquireScript takes the lock and issues its fencing token in one atomic
// step.
//
// KEYS[1] is the lock key, KEYS[2] the lock's fence counter, KEYS[3] its
// waiters flag; ARGV[1] is the acquisition's random value, ARGV[2] the
// lease in milliseconds, ARGV[3] how long in milliseconds to keep the
// waiters flag when the lock is taken (0: do not set it). The reply is
// {1, token} when the caller holds the lock, {0, pttl} when another owner
// does (pttl is the holder's remaining lease in ms, or -1 if the key has no
// expiry).
//
// The key and its expiry are created by one SET NX PX: with SETNX followed
// by PEXPIRE, a client that dies between the two leaves a lock that never
// expires. The INCR runs in the same script, so no token is issued without
// the lock and tokens follow the order of acquisitions. It runs before the
// SET because Redis does not roll a script back: if INCR fails (the counter
// holds something other than an integer) the script stops before it has
// taken the lock. The EXISTS check keeps a failed attempt from consuming a
// token; the script is atomic, so nothing can take the key between the
// check and the SET.
//
// The middle branch makes a retry idempotent. go-redis resends a command
// whose connection broke after it was written; if the first copy ran, the
// key already holds our value. Without the branch the retry would report
// "taken" and we would wait, behind ourselves, until our own lease ran
// out. Since values are unique and nobody else can acquire while our value
// is in the key, the counter still holds the token our INCR issued (or a
// higher one, if AdvanceFence raised it meanwhile; that one was issued to
// nobody, so it is as good).
//
// The last branch marks the lock as waited for, so that its release
// publishes a notification (see releaseScript). Each attempt of a waiter
// renews the mark, which outlives the waiter's longest wait between two
// attempts.
var acquireScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then
	local token = redis.call('INCR', KEYS[2])
	redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
	return {1, token}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
	redis.call('PEXPIRE', KEYS[1], ARGV[2])
	local f = tonumber(redis.call('GET', KEYS[2]))
	if f == nil then
		f = redis.call('INCR', KEYS[2])
	end
	return {1, f}
end
if ARGV[3] ~= '0' then
	redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
end
return {0, redis.call('PTTL', KEYS[1])}
`)

// releaseScript deletes the lock key KEYS[1] only if it still holds the
// caller's value ARGV[1]; it returns 1 if it deleted the key and 0
// otherwise.
//
// A plain DEL is wrong in this interleaving:
//
//	A acquires, then stalls (GC pause, slow disk) past its lease
//	the key expires; B acquires and starts its critical section
//	A wakes up and sends DEL: B's lock is gone
//	C acquires while B still works: two holders
//
// Comparing the value first, in the same script, makes A's release a no-op.
//
// If the waiters flag KEYS[2] is set, the release is published on a
// channel named after the lock key, to wake the waiters (see notifier).
// Uncontended releases publish nothing: on Redis Cluster a PUBLISH goes to
// every node.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	redis.call('DEL', KEYS[1])
	if redis.call('EXISTS', KEYS[2]) == 1 then
		redis.call('PUBLISH', KEYS[1], '')
	end
	return 1
end
return 0
`)

// extendScript resets the lease of the lock key to ARGV[2] ms only if the
// key still holds the caller's value; it returns 1 on success and 0
// otherwise. It never creates the key: a holder whose lease ran out must
// not silently take the lock again, because another owner may have held it
// in between and the holder's work since then was unprotected.
var extendScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
	return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
`)

// advanceFenceScript raises the fence counter KEYS[1] to ARGV[1] if it is
// lower, and never lowers it. It returns the counter's value afterwards.
var advanceFenceScript = redis.NewScript(`
local want = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < want then
	redis.call('SET', KEYS[1], ARGV[1])
	return want
end
return cur
`)
