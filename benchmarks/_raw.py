"""The raw-client baselines, written the way a user would hand-roll them (no framework).

NATS: ``nc.request`` against a subscription whose callback does ``msg.respond``.

Redis pub/sub request/reply: the requester publishes ``<reply channel>|<id>|<payload>`` to the
request channel and keeps one subscription on its own reply channel, where the responder
publishes ``<id>|<16 bytes>``; the requester resolves the waiting future by id. Two variants:

- ``awaited``: every ``PUBLISH`` is its own awaited command (a pooled connection per call);
- ``pipelined``: one writer task sends every ``PUBLISH`` queued since its last round trip in one
  pipeline (an auto-pipeline, as catga's ``redis/writer.py`` does), on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from typing import Literal

import nats
from nats.aio.client import Client as NatsClient
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub

__all__ = [
    "NATS_SUBJECT",
    "REDIS_CHANNELS",
    "Batcher",
    "RawNatsRequester",
    "RawRedisRequester",
    "RedisVariant",
    "redis_client",
]

NATS_SUBJECT = "bench.raw.echo"
RedisVariant = Literal["awaited", "pipelined"]
REDIS_CHANNELS: dict[RedisVariant, str] = {
    "awaited": "bench:raw:awaited",
    "pipelined": "bench:raw:pipelined",
}


def redis_client(url: str, max_connections: int = 200) -> Redis:
    """A client whose pool waits for a free connection instead of raising."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10)
    return Redis(connection_pool=pool)


class Batcher:
    """Auto-pipeline: queue ``PUBLISH``es, send everything queued in one round trip at a time."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._pending: list[tuple[bytes | str, bytes]] = []
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def publish(self, channel: bytes | str, data: bytes) -> None:
        self._pending.append((channel, data))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            async with self._client.pipeline(transaction=False) as pipe:
                for channel, data in batch:
                    pipe.publish(channel, data)
                await pipe.execute()

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class RawNatsRequester:
    def __init__(self, url: str, payload: bytes) -> None:
        self._url = url
        self._payload = payload
        self._nc: NatsClient | None = None

    async def connect(self) -> None:
        self._nc = await nats.connect(self._url)

    async def request(self) -> bytes:
        assert self._nc is not None
        msg = await self._nc.request(NATS_SUBJECT, self._payload, timeout=5)
        return msg.data

    async def aclose(self) -> None:
        if self._nc is not None:
            await self._nc.close()


class RawRedisRequester:
    def __init__(self, url: str, payload: bytes, variant: RedisVariant) -> None:
        self._client = redis_client(url)
        self._payload = payload
        self._variant = variant
        self._channel = REDIS_CHANNELS[variant]
        self._reply_channel = f"bench:raw:reply:{uuid.uuid4().hex}".encode()
        self._ids = itertools.count()
        self._waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._batcher: Batcher | None = None

    async def connect(self) -> None:
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(self._reply_channel)
        self._reader = asyncio.get_running_loop().create_task(self._read(self._pubsub))
        if self._variant == "pipelined":
            self._batcher = Batcher(self._client)

    async def _read(self, pubsub: PubSub) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            corr, _, body = message["data"].partition(b"|")
            future = self._waiting.pop(corr, None)
            if future is not None and not future.done():
                future.set_result(body)

    async def request(self) -> bytes:
        corr = str(next(self._ids)).encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[corr] = future
        data = b"|".join((self._reply_channel, corr, self._payload))
        try:
            if self._batcher is not None:
                self._batcher.publish(self._channel, data)
            elif not await self._client.publish(self._channel, data):
                raise RuntimeError(f"nobody subscribes {self._channel}")
            async with asyncio.timeout(5):
                return await future
        finally:
            self._waiting.pop(corr, None)

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated in redis-py
        await self._client.aclose()
