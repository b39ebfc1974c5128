"""The NATS membership store: a JetStream KV bucket ``catga_<cluster>``, one key per node id.

A node's value is its JSON record (``nats kv get catga_<cluster> <node id>`` shows it). Records
expire by per-key TTL where the server keeps one (2.11+), else by the bucket's max_age (2.9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from fastapi_catga.exceptions import ConfigurationError, TransportError
from fastapi_catga.transports._shared import WatchQueue
from fastapi_catga.transports.base import MemberEvent
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.errors import NatsErrors

__all__ = ["NatsMembers"]

logger = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*")  # a KV key: no leading, trailing or double dot
_CONSUMER_IDLE = 5.0  # s: the server deletes a KV consumer this long after its subscriber went
# Expiry markers written by the server (2.11+) carry a reason instead of KV-Operation.
_REMOVED_REASONS = frozenset({"MaxAge", "Purge", "Remove"})
_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})  # JetStream's error codes for a failed expectation


def _key(node_id: str) -> str:
    if not _KEY.fullmatch(node_id):
        raise ConfigurationError(f"node id {node_id!r} is no NATS KV key ([A-Za-z0-9_=.-], no edge dots)")
    return node_id


def _member_event(msg: Msg, prefix: str) -> MemberEvent | None:
    """The change a message on the bucket's stream stands for (None: a marker of unknown meaning)."""
    headers = msg.headers or {}
    key = msg.subject[len(prefix) :]
    reason = headers.get("Nats-Marker-Reason")
    if headers.get("KV-Operation") in ("DEL", "PURGE") or reason in _REMOVED_REASONS:
        return MemberEvent("delete", key, expired=reason == "MaxAge")
    return MemberEvent("put", key, msg.data) if reason is None else None


class _Watch(WatchQueue):
    """Member events from an ordered JetStream consumer on the bucket; ends at `stop` or a disconnect.

    Not nats-py's ``kv.watch()``: its iterator never ends when the connection closes, and its
    ``stop()`` raises on a closed connection before it wakes the iterator.
    """

    def __init__(self, watches: set[_Watch], prefix: str) -> None:
        super().__init__()
        self._watches = watches
        self._prefix = prefix
        self.sub: JetStreamContext.PushSubscription | None = None

    async def on_msg(self, msg: Msg) -> None:
        if (event := _member_event(msg, self._prefix)) is not None:
            self.put(event)

    async def stop(self) -> None:
        """Stop watching: the iterator ends, the consumer's subscription goes."""
        self._watches.discard(self)
        self.end()
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


class NatsMembers:
    """The membership store: KV bucket ``catga_<cluster>``; expiry by per-key TTL (2.11+) or max_age."""

    def __init__(self, connection: NatsConnection, cluster: str) -> None:
        self._connection = connection
        self.bucket = f"catga_{cluster}"
        self._prefix = f"$KV.{self.bucket}."  # the subject of key k is $KV.<bucket>.k
        self._kv: KeyValue | None = None
        self._per_key_ttl = False
        self._watches: set[_Watch] = set()

    def _ready(self) -> tuple[JetStreamContext, KeyValue]:
        js = self._connection.live()[1]
        if self._kv is None:
            raise ConfigurationError("call members.prepare(ttl) before using the membership store")
        return js, self._kv

    async def prepare(self, ttl: float) -> None:
        js, seconds = self._connection.live()[1], max(1, math.ceil(ttl))
        with NatsErrors(f"preparing KV bucket {self.bucket}"):
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self._create(js, seconds)
            config = (await self._kv.status()).stream_info.config
        # Per-key TTLs need a stream that allows them: not on 2.9, nor on a bucket 2.9 made.
        self._per_key_ttl = bool(config.allow_msg_ttl)
        if config.max_age != seconds:
            logger.warning(
                "KV bucket %s keeps records %s s, not %s s: it was made with another TTL "
                "(`nats kv del %s` lets the next start make it anew)",
                self.bucket, config.max_age, seconds, self.bucket,
            )  # fmt: skip

    async def _create(self, js: JetStreamContext, seconds: int) -> KeyValue:
        # max_age expires records on every server (2.9 ignores per-key TTLs); limit_marker_ttl
        # makes 2.11+ (JetStream API level 1+, None before) write expiry markers that watchers see.
        level = (await js.account_info()).api.level
        markers: dict[str, Any] = {"limit_marker_ttl": seconds} if level is not None and level >= 1 else {}
        # On a NATS cluster, keep three copies so membership outlives the loss of one server.
        replicas = [3, 1] if len(self._connection.live()[0].servers) >= 3 else [1]
        for count in replicas:
            try:
                return await js.create_key_value(
                    bucket=self.bucket, history=1, ttl=seconds, replicas=count, **markers
                )
            except nats.js.errors.APIError as exc:
                try:  # another node may have made it first, with another config
                    return await js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    logger.info("KV bucket %s with %d replica(s) refused (%s)", self.bucket, count, exc)
        raise TransportError(f"cannot create KV bucket {self.bucket}; is JetStream enabled (-js)?")

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        js, key = self._ready()[0], _key(node_id)
        # kv.put() takes no TTL: publish to the key's subject, with a TTL where the server keeps it.
        msg_ttl = max(1, math.ceil(ttl)) if self._per_key_ttl else None
        with NatsErrors(f"KV put {self.bucket}.{key}"):
            await js.publish(self._prefix + key, value, msg_ttl=msg_ttl)

    async def create(self, node_id: str, value: bytes, ttl: float, *, replacing: bytes | None = None) -> bool:
        js, key = self._ready()[0], _key(node_id)
        msg_ttl = max(1, math.ceil(ttl)) if self._per_key_ttl else None
        with NatsErrors(f"KV create {self.bucket}.{key}"):
            last: int | None = 0  # no entry: the publish expects the key's last sequence to be 0
            for _ in range(3):  # again only if the key changed between the publish and the read
                if last is None:
                    break
                expect = {"Nats-Expected-Last-Subject-Sequence": str(last)}
                try:
                    await js.publish(self._prefix + key, value, headers=expect, msg_ttl=msg_ttl)
                    return True
                except nats.js.errors.APIError as exc:
                    if exc.err_code not in _WRONG_LAST_SEQUENCE:
                        raise
                    last = await self._replaceable_at(key, replacing)
        return False

    async def _replaceable_at(self, key: str, replacing: bytes | None) -> int | None:
        """The sequence of the key's last entry when that is a removal (delete, purge, expiry marker)
        or the record ``replacing``; 0 when there is no entry; None when it holds another record."""
        js = self._ready()[0]
        try:
            msg = await js.get_last_msg(f"KV_{self.bucket}", self._prefix + key)
        except nats.js.errors.NotFoundError:
            return 0
        headers = msg.headers or {}
        if (
            headers.get("KV-Operation") in ("DEL", "PURGE")
            or headers.get("Nats-Marker-Reason") in _REMOVED_REASONS
            or (replacing is not None and msg.data == replacing)
        ):
            return msg.seq
        return None

    async def delete(self, node_id: str) -> None:
        kv, key = self._ready()[1], _key(node_id)
        with NatsErrors(f"KV delete {self.bucket}.{key}"):
            await kv.delete(key)

    async def list(self) -> dict[str, bytes]:
        # Not kv.keys() or kv.watchall(): they end the snapshot when consumer_info() reports nothing
        # pending, which it also does once everything is sent but not yet read, so they miss keys.
        # A consumer's create response counts what it will send, atomically.
        nc, js = self._connection.live()
        self._ready()
        prefix, done = self._prefix, asyncio.Event()
        records: dict[str, bytes] = {}
        received = [0]

        async def on_msg(msg: Msg) -> None:
            received[0] += 1
            event = _member_event(msg, prefix)
            if event is not None and event.kind == "put":
                records[event.node_id] = msg.data
            elif event is not None:
                records.pop(event.node_id, None)
            if msg.metadata.num_pending == 0:
                done.set()

        with NatsErrors(f"KV list {self.bucket}"):
            sub = await nc.subscribe(nc.new_inbox(), cb=on_msg)
            try:
                info = await js.add_consumer(
                    f"KV_{self.bucket}",
                    deliver_subject=sub.subject,
                    deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                    ack_policy=api.AckPolicy.NONE,
                    filter_subject=f"{prefix}>",
                    mem_storage=True,
                    inactive_threshold=_CONSUMER_IDLE,
                )
                if info.num_pending:
                    await self._all_sent(js, info, done, lambda: received[0])
            finally:
                await sub.unsubscribe()
        return records

    async def _all_sent(
        self, js: JetStreamContext, info: api.ConsumerInfo, done: asyncio.Event, received: Callable[[], int]
    ) -> None:
        """Wait for the last record the consumer counted at its creation. A record that expired
        meanwhile (bucket max_age) is never sent: the consumer then has nothing pending and has sent
        no more than was received."""
        deadline = asyncio.get_running_loop().time() + self._connection.connect_timeout
        while not done.is_set():
            try:
                async with asyncio.timeout(0.25):
                    await done.wait()
            except TimeoutError:
                now = await js.consumer_info(info.stream_name, info.name)
                if now.num_pending == 0 and (now.delivered.consumer_seq or 0) <= received():
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise

    async def watch(self) -> _Watch:
        js = self._ready()[0]
        watch = _Watch(self._watches, self._prefix)
        with NatsErrors(f"KV watch {self.bucket}"):
            watch.sub = await js.subscribe(
                f"{self._prefix}>",
                stream=f"KV_{self.bucket}",
                cb=watch.on_msg,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                inactive_threshold=_CONSUMER_IDLE,
            )
        self._watches.add(watch)
        return watch

    async def stop_watches(self) -> None:
        """End every watch: at a disconnect (the cluster layer starts new ones after) and at close."""
        for watch in list(self._watches):
            await watch.stop()
