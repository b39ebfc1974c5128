"""`NatsDurable`: the durable store on JetStream (``transport.durable``).

Everything lives under the ``dur`` token, so no stream captures the core request/reply subjects
(``catga.<cluster>.node.*``, ``type.*``, ``event.*``): a stream acks every publish it captures.

- ``CATGA_<cluster>_CMD``: WorkQueue, ``catga.<cluster>.dur.cmd.<type>``, discard new (a full stream
  refuses commands rather than drop queued ones), no max age; one durable pull consumer per type,
  ``cmd_<type>``, deliver all (WorkQueue demands it).
- ``CATGA_<cluster>_EVT``: Limits, ``catga.<cluster>.dur.evt.<type>``, max age = retention; one durable
  pull consumer per (group, type), ``evt_<group>_<type>``, created to deliver new events only.
- ``CATGA_<cluster>_DLQ``: the dead letters (`dead_letters`); KV ``catga_<cluster>_done``: leases and
  done records (`leases`); the pull loop: `pull`.

Consumers ack explicitly, ``ack_wait`` = the lease, ``max_deliver`` -1: the cluster layer counts
deliveries (``num_delivered``, kept by the server) and dead-letters itself. Type names and groups
become single subject tokens and parts of names by `safe_name`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext, api

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports._shared import BadFrames, frame
from fastapi_catga.transports.durable import DeadLetter, Queue, QueueKind, Stored
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.dead_letters import NatsDeadLetters
from fastapi_catga.transports.nats.errors import NatsErrors
from fastapi_catga.transports.nats.leases import NatsLeases
from fastapi_catga.transports.nats.pull import NatsConsumer
from fastapi_catga.transports.nats.streams import ensure_stream, header_room, safe_name

__all__ = ["NatsDurable"]

logger = logging.getLogger(__name__)

_DUPLICATE_WINDOW = 120.0  # s: JetStream's default; the docs caution against larger ones


@dataclass(frozen=True, slots=True)
class _Settings:
    lease: float
    dedup_window: float
    retention: float


class NatsDurable:
    """The `DurableStore` of a `NatsTransport`: queues on JetStream streams, leases and done records in
    a KV bucket, dead letters in a stream of their own.

    Args:
        connection: the transport's connection.
        cluster: the cluster name, already checked to be ``[A-Za-z0-9_-]+``.
        payload_limit: the transport's largest envelope in bytes (lowered to the server's at connect).
        clock: wall-clock seconds, for lease expiry (shared by every node: keep their clocks in sync).
    """

    def __init__(
        self,
        connection: NatsConnection,
        cluster: str,
        payload_limit: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._connection = connection
        self._payload_limit = payload_limit
        self._prefix = f"catga.{cluster}.dur."
        self._streams: dict[QueueKind, str] = {"cmd": f"CATGA_{cluster}_CMD", "evt": f"CATGA_{cluster}_EVT"}
        self._leases = NatsLeases(connection, cluster, clock)
        self._letters = NatsDeadLetters(connection, cluster, payload_limit)
        self._settings: _Settings | None = None
        self._consumers: set[NatsConsumer] = set()
        self._bad_frames = BadFrames(logger)

    def subject(self, kind: QueueKind, type_name: str) -> str:
        """Where messages of ``type_name`` are stored."""
        return f"{self._prefix}{kind}.{safe_name(type_name)}"

    def consumer_name(self, queue: Queue) -> str:
        """The durable consumer that ``queue``'s group shares."""
        if queue.kind == "cmd":
            return f"cmd_{safe_name(queue.type_name)}"
        return f"evt_{safe_name(queue.group)}_{safe_name(queue.type_name)}"

    # -- streams and consumers ------------------------------------------------------------------------

    async def prepare(
        self, queues: Sequence[Queue], *, lease: float, dedup_window: float, retention: float
    ) -> None:
        """Create the streams, the queues' consumers and the KV bucket; what exists stays as it is.

        Raises:
            TransportError: JetStream refused or did not answer (is the server started with -js?).
        """
        self._settings = _Settings(lease, dedup_window, retention)
        js = self._connection.live()[1]
        kinds: tuple[QueueKind, ...] = ("cmd", "evt")
        for kind in kinds:
            await ensure_stream(self._connection, self._stream_config(kind))
        await ensure_stream(self._connection, self._letters.stream_config(retention))
        for queue in queues:
            await self._ensure_consumer(js, queue, lease)
        await self._leases.prepare(dedup_window)

    async def restore(self, queue: Queue, lease: float) -> None:
        """Create a queue's stream and consumer again (a server lost its store, someone deleted them)."""
        if self._settings is None:
            raise ConfigurationError("call durable.prepare() before fetching from a durable queue")
        js = self._connection.live()[1]
        await ensure_stream(self._connection, self._stream_config(queue.kind))
        await self._ensure_consumer(js, queue, lease)

    def _stream_config(self, kind: QueueKind) -> api.StreamConfig:
        assert self._settings is not None
        window = min(self._settings.dedup_window, _DUPLICATE_WINDOW)
        if kind == "cmd":  # gone once acked or terminated; never dropped unread
            return api.StreamConfig(
                name=self._streams[kind],
                subjects=[f"{self._prefix}cmd.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                discard=api.DiscardPolicy.NEW,
                storage=api.StorageType.FILE,
                duplicate_window=window,
            )
        return api.StreamConfig(
            name=self._streams[kind],
            subjects=[f"{self._prefix}evt.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=self._settings.retention,
            duplicate_window=min(window, self._settings.retention),  # the server wants it <= max_age
        )

    async def _ensure_consumer(self, js: JetStreamContext, queue: Queue, lease: float) -> None:
        stream, name = self._streams[queue.kind], self.consumer_name(queue)
        with NatsErrors(f"preparing consumer {name} of stream {stream}"):
            try:
                info = await js.consumer_info(stream, name)
            except nats.js.errors.NotFoundError:
                # Commands: everything queued (WorkQueue demands it); events: from now on, since a
                # new group should not replay the stream's whole history.
                deliver = api.DeliverPolicy.ALL if queue.kind == "cmd" else api.DeliverPolicy.NEW
                config = api.ConsumerConfig(
                    name=name,
                    durable_name=name,
                    deliver_policy=deliver,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=lease,
                    max_deliver=-1,
                    filter_subject=self.subject(queue.kind, queue.type_name),
                )
                info = await js.add_consumer(stream, config)
        if not math.isclose(info.config.ack_wait or 0, lease):
            logger.warning(
                "consumer %s of stream %s has a %s s lease (ack_wait), not %s s: it was made with other "
                "settings (`nats consumer edit %s %s` changes it)",
                name, stream, info.config.ack_wait, lease, stream, name,
            )  # fmt: skip

    # -- queues -------------------------------------------------------------------------------------

    async def append(self, kind: QueueKind, type_name: str, envelope: Envelope, *, dedup_id: str) -> Stored:
        """Store a message; JetStream drops a repeat of ``dedup_id`` within its duplicate window.

        Raises:
            TransportError: no PubAck came (it may or may not be stored).
            MessageTooLargeError: over the server's max_payload; nothing was sent.
        """
        js, subject = self._connection.live()[1], self.subject(kind, type_name)
        headers = {"Nats-Msg-Id": dedup_id, "Nats-Expected-Stream": self._streams[kind]}
        data = frame(envelope, self._payload_limit() - header_room(headers), "NATS")
        with NatsErrors(f"durable append to {subject}"):
            ack = await js.publish(subject, data, headers=headers)
        return Stored(duplicate=bool(ack.duplicate))

    def consumer(self, queue: Queue, *, consumer: str, lease: float) -> NatsConsumer:
        """A reader of ``queue``'s durable consumer, which every node of the group shares (JetStream
        tells their pull requests apart by reply subject; ``consumer`` names this one in logs)."""
        reader = NatsConsumer(
            self._connection,
            queue,
            stream=self._streams[queue.kind],
            name=self.consumer_name(queue),
            reader=consumer,
            lease=lease,
            restore=self.restore,
            readers=self._consumers,
            bad_frames=self._bad_frames,
        )
        self._consumers.add(reader)
        return reader

    def connection_lost(self) -> None:
        """Fail the pulls in flight at once: their answers would go to a connection that is gone."""
        for reader in list(self._consumers):
            reader.interrupt()

    # -- leases and done records ------------------------------------------------------------------------

    async def done(self, key: str) -> bytes | None:
        return await self._leases.done(key)

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        return await self._leases.claim(key, holder, ttl)

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        return await self._leases.take(key, holder, ttl)

    async def renew(self, key: str, holder: str, ttl: float) -> bool:
        return await self._leases.renew(key, holder, ttl)

    async def release(self, key: str, holder: str) -> None:
        await self._leases.release(key, holder)

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        return await self._leases.commit(key, holder, result, ttl)

    # -- dead letters -------------------------------------------------------------------------------

    async def add_dead_letter(self, letter: DeadLetter, envelope: Envelope) -> bool:
        return await self._letters.add(letter, envelope)

    async def dead_letters(self, limit: int) -> list[tuple[DeadLetter, Envelope]]:
        return await self._letters.list(limit)

    async def dead_letter(self, letter_id: str) -> tuple[DeadLetter, Envelope] | None:
        return await self._letters.get(letter_id)

    async def remove_dead_letter(self, letter_id: str) -> bool:
        return await self._letters.remove(letter_id)
