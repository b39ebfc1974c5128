"""The Redis transport (``pip install "fastapi-catga[redis]"``)::

    transport = RedisTransport("redis://localhost:6379/0", cluster="orders")
    await transport.connect()

- `transport`: messaging over pub/sub (request/reply over a reply channel per transport).
- `reader`: the subscriber connection and the task that reads it, reconnecting when it breaks.
- `writer`: every PUBLISH, auto-pipelined over one connection.
- `connections`: the pool for membership commands and the two private pub/sub connections.
- `urls`, `locate`, `shard`: ``redis+sentinel://`` and ``redis+cluster://`` URLs; connections that
  ask a Sentinel or a Redis Cluster where the server is at each connect, and follow a failover.
- `membership`: the membership store, a TTL key per node indexed by a sorted set.
- `scripts`: the Lua scripts that membership runs on the server.
- `durable`, `durable_consumer`, `durable_scripts`: durable queues on Redis Streams (`transport.durable`).
- `errors`: how redis-py's errors become ours, in one table.
"""

from fastapi_catga.transports._shared import import_guard

with import_guard("redis", client="redis-py", broker="Redis"):
    from fastapi_catga.transports.redis.transport import RedisTransport

__all__ = ["RedisTransport"]
