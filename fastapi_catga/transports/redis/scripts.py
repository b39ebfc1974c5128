"""The Lua scripts of the Redis membership store; Redis runs each one atomically.

``catga:{<cluster>}:node:<id>`` holds a node's record with a PX TTL; the sorted set
``catga:{<cluster>}:members`` indexes the ids, scored by when the record expires in Redis server
time (ms), so the nodes' clocks never matter. Each change is announced on the events channel, by
``PUBLISH`` or, on a Redis Cluster of 7.0 or later, ``SPUBLISH`` (the last argument). The hash
tag keeps every key and channel in one slot.
"""

__all__ = ["DELETE", "LIST", "PUT"]

#: Write a node's record, restart its TTL, and announce it: 1. With ARGV[7] = '1' only if no
#: record is held now, or the one held is ARGV[8] (a claim of the node id), else 0.
PUT = """
local record_key, index = KEYS[1], KEYS[2]
local node_id, ttl_ms, record, events, notice, publish = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if ARGV[7] == '1' then
  local held = redis.call('GET', record_key)
  if held and held ~= ARGV[8] then
    return 0
  end
end
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('SET', record_key, record, 'PX', ttl_ms)
redis.call('ZADD', index, now_ms + tonumber(ttl_ms), node_id)  -- the score: older nodes' LIST reads it
redis.call(publish, events, notice)
return 1
"""

#: Remove a node's record, and announce it.
DELETE = """
local record_key, index = KEYS[1], KEYS[2]
local node_id, events, notice, publish = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('DEL', record_key)
redis.call('ZREM', index, node_id)
redis.call(publish, events, notice)
"""

#: Every unexpired record as id, record, id, record...; drops what expired from the index. A record
#: counts as expired when its key is gone, never by the index's score: a script sees keys expire by
#: the clock as its run started, TIME reads it later, and the score can be a millisecond early. A
#: node id that `list` no longer shows must be free for PUT's claim.
LIST = """
local index, record_prefix = KEYS[1], ARGV[1]
local found = {}
for _, node_id in ipairs(redis.call('ZRANGE', index, 0, -1)) do
  local record = redis.call('GET', record_prefix .. node_id)
  if record then
    table.insert(found, node_id)
    table.insert(found, record)
  else
    redis.call('ZREM', index, node_id)
  end
end
return found
"""
