"""The Lua scripts of the Redis durable store; Redis runs each one atomically.

Every key a script touches shares the hash tag ``{<cluster>}``, so one script stays on one slot.
A queue is a stream read by consumer groups; its pending entries list (PEL) counts deliveries.
Beside each (stream, group) a sorted set, the *hold* set, keeps the entries handed back with a
delay longer than the lease, scored by when they are due (server time, ms).
"""

__all__ = [
    "CLAIM",
    "COMMIT",
    "DEAD_LETTERS",
    "KEEP_DEAD_LETTER",
    "RECLAIM",
    "RELEASE",
    "REMOVE_DEAD_LETTER",
    "RENEW",
    "SETTLE",
    "TOUCH",
]

_NOW_MS = """
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

#: Claim up to ``limit`` entries idle for a lease or more: as (id, fields, deliveries) triples.
#: XCLAIM counts the delivery, so the count is XPENDING's plus one (the script is atomic). An entry
#: held for a later retry is made idle again until it is due, uncounted. An entry deleted from the
#: stream (trimmed events) comes back empty (7.0) or as nil (6.2): acked, so it stops coming back.
RECLAIM = (
    """
local stream, hold = KEYS[1], KEYS[2]
local group, consumer = ARGV[1], ARGV[2]
local lease_ms, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
"""
    + _NOW_MS
    + """
local claimed = {}
for _ = 1, 10 do
  local want = limit - #claimed
  if want <= 0 then break end
  local held = 0
  for _, pending in ipairs(redis.call('XPENDING', stream, group, 'IDLE', lease_ms, '-', '+', want)) do
    local id, count = pending[1], pending[4]
    local due_ms = tonumber(redis.call('ZSCORE', hold, id))
    if due_ms and due_ms > now_ms then
      local idle_ms = math.max(0, lease_ms - (due_ms - now_ms))
      redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', idle_ms, 'JUSTID')
      held = held + 1
    else
      if due_ms then redis.call('ZREM', hold, id) end
      local entry = redis.call('XCLAIM', stream, group, consumer, lease_ms, id)[1]
      if entry then
        table.insert(claimed, {entry[1], entry[2], count + 1})
      else
        redis.call('XACK', stream, group, id)
      end
    end
  end
  if held == 0 then break end
end
return claimed
"""
)

#: Ack (or drop) an entry; a command entry (``delete`` = 1) is deleted with it: nobody else reads it.
SETTLE = """
local stream, hold = KEYS[1], KEYS[2]
local group, id, delete = ARGV[1], ARGV[2], ARGV[3]
redis.call('XACK', stream, group, id)
if delete == '1' then redis.call('XDEL', stream, id) end
redis.call('ZREM', hold, id)
"""

#: Reset an entry's idle time to ``idle_ms``, uncounted (JUSTID), if this delivery still owns it:
#: same consumer, same delivery count. ``hold_ms`` > 0 also holds it back that long (a retry delay
#: past the lease). Returns 1 if it was this delivery's.
TOUCH = (
    """
local stream, hold = KEYS[1], KEYS[2]
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local deliveries, idle_ms, hold_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local pending = redis.call('XPENDING', stream, group, id, id, 1)[1]
if not pending or pending[2] ~= consumer or pending[4] ~= deliveries then return 0 end
redis.call('XCLAIM', stream, group, consumer, 0, id, 'IDLE', idle_ms, 'JUSTID')
if hold_ms > 0 then
"""
    + _NOW_MS
    + """
  redis.call('ZADD', hold, now_ms + hold_ms, id)
end
return 1
"""
)

#: Take the lease for ``holder`` (or extend it, when it is already ``holder``'s).
CLAIM = """
local lease = KEYS[1]
local holder, ttl_ms = ARGV[1], ARGV[2]
local current = redis.call('GET', lease)
if current and current ~= holder then return 0 end
redis.call('SET', lease, holder, 'PX', ttl_ms)
return 1
"""

#: The done record if there is one; else CLAIM's answer (one step: no run starts after a commit).
TAKE = """
local lease, done = KEYS[1], KEYS[2]
local holder, ttl_ms = ARGV[1], ARGV[2]
local record = redis.call('GET', done)
if record then return record end
local current = redis.call('GET', lease)
if current and current ~= holder then return 0 end
redis.call('SET', lease, holder, 'PX', ttl_ms)
return 1
"""

#: Extend the lease if it is still ``holder``'s.
RENEW = """
local lease = KEYS[1]
local holder, ttl_ms = ARGV[1], ARGV[2]
if redis.call('GET', lease) ~= holder then return 0 end
redis.call('PEXPIRE', lease, ttl_ms)
return 1
"""

#: Delete the lease if it is ``holder``'s.
RELEASE = """
local lease = KEYS[1]
local holder = ARGV[1]
if redis.call('GET', lease) == holder then redis.call('DEL', lease) end
"""

#: Write the done record and end the lease, if the lease is ``holder``'s and no record exists.
COMMIT = """
local lease, done = KEYS[1], KEYS[2]
local holder, result, ttl_ms = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', lease) ~= holder or redis.call('EXISTS', done) == 1 then return 0 end
redis.call('SET', done, result, 'PX', ttl_ms)
redis.call('DEL', lease)
return 1
"""

# Dead letters: a hash id -> record, and a sorted set of the ids scored by when each was added
# (ms, strictly increasing, so ties keep insertion order); older than the retention: deleted.
_EXPIRE_LETTERS = (
    """
local letters, order = KEYS[1], KEYS[2]
local retention_ms = tonumber(ARGV[1])
"""
    + _NOW_MS
    + """
local cutoff = now_ms - retention_ms
local expired = redis.call('ZRANGEBYSCORE', order, '-inf', cutoff, 'LIMIT', 0, 100)
for _, letter_id in ipairs(expired) do
  redis.call('HDEL', letters, letter_id)
  redis.call('ZREM', order, letter_id)
end
"""
)

#: Keep a dead letter unless one with its id is kept; returns 1 if it was new.
KEEP_DEAD_LETTER = (
    _EXPIRE_LETTERS
    + """
local letter_id, record = ARGV[2], ARGV[3]
if redis.call('HSETNX', letters, letter_id, record) == 0 then return 0 end
local score = now_ms
local last = redis.call('ZRANGE', order, -1, -1, 'WITHSCORES')[2]
if last and tonumber(last) >= score then score = tonumber(last) + 1 end
redis.call('ZADD', order, score, letter_id)
return 1
"""
)

#: Up to ``limit`` dead-letter records, oldest first.
DEAD_LETTERS = (
    _EXPIRE_LETTERS
    + """
local limit = tonumber(ARGV[2])
local found = {}
for _, letter_id in ipairs(redis.call('ZRANGE', order, 0, limit - 1)) do
  local record = redis.call('HGET', letters, letter_id)
  if record then table.insert(found, record) else redis.call('ZREM', order, letter_id) end
end
return found
"""
)

#: Discard a dead letter; returns 1 if one was kept.
REMOVE_DEAD_LETTER = """
local letters, order = KEYS[1], KEYS[2]
local letter_id = ARGV[1]
redis.call('ZREM', order, letter_id)
return redis.call('HDEL', letters, letter_id)
"""
