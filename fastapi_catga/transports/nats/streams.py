"""JetStream helpers the durable store's parts share: safe names, header sizes, streams and buckets
made once."""

from __future__ import annotations

import hashlib
import logging
import math
import re

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.errors import NatsErrors

__all__ = ["ensure_stream", "header_room", "open_bucket", "replica_choices", "safe_name"]

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[A-Za-z0-9-]+")  # "_" joins the parts of a name, so a part never holds one as is
_UNSAFE = re.compile(r"[^A-Za-z0-9-]")
_MAX_PART = 48


def safe_name(name: str) -> str:
    """``name`` as one subject token and as part of a stream or consumer name.

    Itself if it is only ``[A-Za-z0-9-]`` (and not long), else its other characters replaced by
    ``_`` plus a hash of the original (``orders.Place`` -> ``orders_Place_5d0e9c1b``), so that two
    names never meet, and ``evt_<group>_<type>`` splits one way only.
    """
    if _SAFE.fullmatch(name) and len(name) <= _MAX_PART:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', name)[:_MAX_PART]}_{digest}"


def header_room(headers: dict[str, str]) -> int:
    """Bytes NATS headers take on the wire: the server counts them toward max_payload, nats-py not."""
    return len("NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())


def replica_choices(connection: NatsConnection) -> list[int]:
    """Three copies on a NATS cluster (the data outlives one server), else one; as membership does."""
    return [3, 1] if len(connection.live()[0].servers) >= 3 else [1]


async def ensure_stream(connection: NatsConnection, config: api.StreamConfig) -> None:
    """Create the stream unless it exists; an existing one is left as it is (a warning if its age
    limit or duplicate window differ from ``config``: another node, or an older start, made it).

    Raises:
        TransportError: JetStream refused or did not answer.
    """
    js, name = connection.live()[1], config.name
    assert name is not None
    with NatsErrors(f"preparing stream {name}"):
        try:
            have = (await js.stream_info(name)).config
        except nats.js.errors.NotFoundError:
            have = (await _create(connection, js, config)).config
    if not math.isclose(have.max_age or 0, config.max_age or 0) or not math.isclose(
        have.duplicate_window, config.duplicate_window
    ):
        logger.warning(
            "stream %s keeps messages %s s with a %s s duplicate window, not %s s and %s s: it was made "
            "with other settings (`nats stream edit %s` changes them)",
            name, have.max_age or 0, have.duplicate_window,
            config.max_age or 0, config.duplicate_window, name,
        )  # fmt: skip


async def _create(
    connection: NatsConnection, js: JetStreamContext, config: api.StreamConfig
) -> api.StreamInfo:
    assert config.name is not None
    refused: list[str] = []
    for count in replica_choices(connection):
        try:
            return await js.add_stream(config.evolve(num_replicas=count))
        except nats.js.errors.APIError as exc:
            try:  # another node may have made it first
                return await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                refused.append(f"{count} replica(s): {exc}")
    raise TransportError(
        f"cannot create stream {config.name} ({'; '.join(refused)}); is JetStream enabled (-js)?"
    )


async def open_bucket(connection: NatsConnection, bucket: str, ttl: int) -> KeyValue:
    """The KV bucket, created (history 1, records kept ``ttl`` s) unless it exists.

    Raises:
        TransportError: JetStream refused or did not answer.
    """
    js = connection.live()[1]
    with NatsErrors(f"preparing KV bucket {bucket}"):
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        refused: list[str] = []
        for count in replica_choices(connection):
            try:
                return await js.create_key_value(bucket=bucket, history=1, ttl=ttl, replicas=count)
            except nats.js.errors.APIError as exc:
                try:  # another node may have made it first
                    return await js.key_value(bucket)
                except nats.js.errors.BucketNotFoundError:
                    refused.append(f"{count} replica(s): {exc}")
    raise TransportError(
        f"cannot create KV bucket {bucket} ({'; '.join(refused)}); is JetStream enabled (-js)?"
    )
