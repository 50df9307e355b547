package lockguard

import "github.com/redis/go-redis/v9"

// The scripts run with EVALSHA and fall back to EVAL when Redis answers
// NOSCRIPT (after a restart or SCRIPT FLUSH), through [redis.Script.Run].
// Each touches only keys of one lock, which share a hash tag, so they run
// unchanged on Redis Cluster.

// luaInt holds the Lua helpers of the scripts that read or change a fence
// counter. Lua's numbers are doubles, exact only up to 2^53: INCR's reply,
// or tonumber of a counter, above that comes out rounded (2^53+1 as 2^53,
// so a token would be issued twice, and MaxInt64 as 2^63, which Redis
// hands back as MinInt64). So the scripts never turn a counter into a Lua
// number: they read it with GET as a string, check it as INCR would, and
// compare such strings by sign, length and bytes (bytes, not Lua's < on
// strings, which follows the server's collation locale).
//
// natcmp compares two strings of digits without leading zeros. isint
// reports whether a string is an int64 as INCR reads it: decimal, an
// optional '-', no '+', spaces or leading zeros, in range. intless compares
// two such strings. incr raises a counter by one and returns its new value
// as a string, or nil and a status (fenceCorrupt or fenceExhausted) if
// INCR failed for one of those reasons, having changed nothing; any other
// failure of INCR (OOM, READONLY) is raised as it came.
const luaInt = `
local function natcmp(a, b)
	if #a ~= #b then
		return #a < #b and -1 or 1
	end
	for i = 1, #a do
		local x, y = string.byte(a, i), string.byte(b, i)
		if x ~= y then
			return x < y and -1 or 1
		end
	end
	return 0
end

local function isint(s)
	if s == '0' then
		return true
	end
	local neg = string.sub(s, 1, 1) == '-'
	local d = neg and string.sub(s, 2) or s
	if not string.find(d, '^[1-9][0-9]*$') then
		return false
	end
	return natcmp(d, neg and '9223372036854775808' or '9223372036854775807') <= 0
end

local function intless(a, b)
	local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
	if na ~= nb then
		return na
	end
	if na then
		return natcmp(string.sub(a, 2), string.sub(b, 2)) > 0
	end
	return natcmp(a, b) < 0
end

local function incr(key)
	local r = redis.pcall('INCR', key)
	if type(r) == 'table' and r.err then
		local v = redis.pcall('GET', key)
		if v == '9223372036854775807' then
			return nil, 3
		end
		if type(v) == 'table' or (v and not isint(v)) then
			return nil, 2
		end
		error(r)
	end
	return redis.call('GET', key)
end
`

// Statuses in the first element of the reply of acquireScript, and the
// reply of advanceFenceScript. Those of the fence match incr in luaInt.
const (
	lockTaken      = 0 // acquireScript: {0, pttl}
	lockGranted    = 1 // acquireScript: {1, token as a string of digits}
	fenceCorrupt   = 2 // the counter holds no int64: {2, 0}, or 2
	fenceExhausted = 3 // the counter is at MaxInt64: {3, 0}
)

// acquireScript takes the lock and issues its fencing token in one atomic
// step.
//
// KEYS[1] is the lock key, KEYS[2] the lock's fence counter, KEYS[3] its
// waiters flag; ARGV[1] is the acquisition's random value, ARGV[2] the
// lease in milliseconds, ARGV[3] how long in milliseconds to keep the
// waiters flag when the lock is taken (0: do not set it). The reply is
// {1, token} when the caller holds the lock, with the token as a string
// of digits (see luaInt), {0, pttl} when another owner does (pttl is the
// holder's remaining lease in ms, or -1 if the key has no expiry), and
// {2, 0} or {3, 0} when the counter cannot issue a token (fenceCorrupt,
// fenceExhausted); the lock is then left free.
//
// The key and its expiry are created by one SET NX PX: with SETNX followed
// by PEXPIRE, a client that dies between the two leaves a lock that never
// expires. The INCR runs in the same script, so no token is issued without
// the lock and tokens follow the order of acquisitions. It runs before the
// SET because Redis does not roll a script back: if INCR fails, the script
// returns (or stops) before it has taken the lock. The EXISTS check keeps
// a failed attempt from consuming a token; the script is atomic, so
// nothing can take the key between the check and the SET.
//
// The middle branch makes a retry idempotent. go-redis resends a command
// whose connection broke after it was written; if the first copy ran, the
// key already holds our value. Without the branch the retry would report
// "taken" and we would wait, behind ourselves, until our own lease ran
// out. Since values are unique and nobody else can acquire while our value
// is in the key, the counter still holds the token our INCR issued (or a
// higher one, if AdvanceFence raised it meanwhile; that one was issued to
// nobody, so it is as good). If the counter was deleted since, a new token
// is issued; if it was overwritten with garbage, the retry frees the lock
// it cannot fence rather than leave it taken by nobody for a whole lease.
//
// The last branch marks the lock as waited for, so that its release
// publishes a notification (see releaseScript). Each attempt of a waiter
// renews the mark, which outlives the waiter's longest wait between two
// attempts.
var acquireScript = redis.NewScript(luaInt + `
if redis.call('EXISTS', KEYS[1]) == 0 then
	local token, status = incr(KEYS[2])
	if not token then
		return {status, 0}
	end
	redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
	return {1, token}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
	local token, status = redis.pcall('GET', KEYS[2]), 2
	if token == false then
		token, status = incr(KEYS[2])
	elseif type(token) ~= 'string' or not isint(token) then
		token = nil
	end
	if not token then
		redis.call('DEL', KEYS[1])
		return {status, 0}
	end
	redis.call('PEXPIRE', KEYS[1], ARGV[2])
	return {1, token}
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

// advanceFenceScript raises the fence counter KEYS[1] to ARGV[1], an int64
// in decimal, if it is lower, and never lowers it; a missing counter counts
// as 0, the value from which INCR issues 1. It compares the two as strings
// (see luaInt), so it is exact over all of int64. It returns 1 if it raised
// the counter, 0 if the counter was already at least ARGV[1], and
// fenceCorrupt, changing nothing, if the counter holds no int64.
var advanceFenceScript = redis.NewScript(luaInt + `
if not isint(ARGV[1]) then
	return redis.error_reply('ERR lockguard: the floor is not an int64')
end
local cur = redis.pcall('GET', KEYS[1])
if cur == false then
	cur = '0'
elseif type(cur) ~= 'string' or not isint(cur) then
	return 2
end
if intless(cur, ARGV[1]) then
	redis.call('SET', KEYS[1], ARGV[1])
	return 1
end
return 0
`)
