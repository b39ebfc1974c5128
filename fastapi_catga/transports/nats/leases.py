"""`NatsLeases`: leases and done records in the KV bucket ``catga_<cluster>_done``.

- ``lease.<key>`` holds ``{"holder": ..., "until": <UNIX time>}``. The expiry is in the value, not a
  per-key TTL: nats-server 2.9 has none, and a lease renewed by an update could not carry one.
  Every change is a compare-and-set on the key's revision (``Nats-Expected-Last-Subject-Sequence``),
  so two nodes never both take, renew or commit one lease.
- ``done.<key>`` holds the encoded result; created only if absent, while the lease is ours. It
  expires after ``ttl``: a ``Catga-Until`` header says when (read as absent after that, and
  overwritten by the next commit: the only per-record expiry on 2.9), a per-key TTL removes it
  where the bucket allows them (made by 2.11+), and the bucket's max age removes it at the latest.

Keys are written in the bucket's alphabet: ``[A-Za-z0-9_-]`` as is, any other byte as ``=XX``
(``workers:m1`` -> ``lease.workers=3Am1``). Reads and writes go to the stream leader (no direct
get), so a node reads the lease another node just wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import string
from collections.abc import Callable

import nats.js.errors

from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.errors import NatsErrors
from fastapi_catga.transports.nats.streams import open_bucket

__all__ = ["NatsLeases", "kv_key"]

logger = logging.getLogger(__name__)

_PLAIN = frozenset(string.ascii_letters + string.digits + "_-")
_WRONG_LAST = (10071, 10164)  # JSStreamWrongLastSequenceErr(F), JSStreamWrongLastSequenceConstantErr
_STREAM_NOT_FOUND = 10059
_REMOVED = ("DEL", "PURGE")
_UNTIL = "Catga-Until"  # a done record's end, UNIX seconds
_MINE_KEPT = 10_000  # leases held by this process that are remembered with their revision


def kv_key(key: str) -> str:
    """``key`` in the KV alphabet, one to one: ``=`` starts an escaped byte and is escaped itself."""
    return "".join(c if c in _PLAIN else "".join(f"={b:02X}" for b in c.encode()) for c in key) or "="


def _lease(value: bytes) -> tuple[str, float]:
    """(holder, until) of a lease record; one that cannot be read has expired."""
    try:
        record = json.loads(value)
        return str(record["holder"]), float(record["until"])
    except (ValueError, TypeError, KeyError):
        return "", 0.0


def _until(value: str | None) -> float:
    """A done record's end; no header (or an unreadable one) never ends it here."""
    try:
        return float(value) if value is not None else math.inf
    except ValueError:
        return math.inf


class NatsLeases:
    """Leases and done records of one cluster (see the module)."""

    def __init__(self, connection: NatsConnection, cluster: str, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._clock = clock
        self.bucket = f"catga_{cluster}_done"
        self._stream = f"KV_{self.bucket}"
        self._prefix = f"$KV.{self.bucket}."
        self._per_key_ttl = False
        #: The leases this process holds, as it last wrote them: name -> (holder, record, revision,
        #: until). A change at that revision needs no read first: if anyone wrote the key since, the
        #: write fails, as a read would have shown the lease gone.
        self._mine: dict[str, tuple[str, bytes, int, float]] = {}

    async def prepare(self, window: float) -> None:
        seconds = max(1, math.ceil(window))
        kv = await open_bucket(self._connection, self.bucket, seconds)
        with NatsErrors(f"preparing KV bucket {self.bucket}"):
            config = (await kv.status()).stream_info.config
        self._per_key_ttl = bool(config.allow_msg_ttl)  # not on 2.9, nor on a bucket 2.9 made
        if config.max_age != seconds:
            logger.warning(
                "KV bucket %s keeps done records %s s, not %s s: it was made with another dedup window "
                "(`nats kv del %s` lets the next start make it anew)",
                self.bucket, config.max_age, seconds, self.bucket,
            )  # fmt: skip

    async def done(self, key: str) -> bytes | None:
        return (await self._read(f"done.{kv_key(key)}"))[0]

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        """`claim`, then `done` once the lease is held (JetStream has no read-and-write in one).

        A lease created where the key had no message at all needs no look-up: a commit writes its
        done record, then the lease's delete marker, and the bucket's max age drops the older one
        first, so no done record outlives every message of its lease key. (A client's KV
        ``PurgeDeletes()`` drops delete markers older than its threshold, 30 minutes by default:
        run it on this bucket only with a threshold longer than the dedup window.)"""
        name, (record, until) = f"lease.{kv_key(key)}", self._record(holder, ttl)
        if await self._write_mine(name, holder, record, until, last=0) is not None:
            return True  # a message id never run within the bucket's max age: the usual case
        claimed = await self._take_over(name, holder, record, until)
        done = await self.done(key)
        if done is None:
            return claimed
        if claimed:
            with contextlib.suppress(TransportError):  # the record is the answer; the lease ends by itself
                await self.release(key, holder)
        return done

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        name, (record, until) = f"lease.{kv_key(key)}", self._record(holder, ttl)
        if await self._write_mine(name, holder, record, until, last=0) is not None:
            return True  # nobody had it: the usual case, one round trip
        return await self._take_over(name, holder, record, until)

    async def _take_over(self, name: str, holder: str, record: bytes, until: float) -> bool:
        """Take a lease key that has a message: free (deleted), expired, or ``holder``'s already."""
        value, last = await self._read(name)
        if value is not None:
            other, ends = _lease(value)
            if other != holder and ends > self._clock():
                return False
        return await self._write_mine(name, holder, record, until, last=last) is not None

    async def renew(self, key: str, holder: str, ttl: float) -> bool:
        name = f"lease.{kv_key(key)}"
        held = await self._held(name, holder)
        if held is None:
            return False
        record, until = self._record(holder, ttl)
        return await self._write_mine(name, holder, record, until, last=held[1]) is not None

    async def release(self, key: str, holder: str) -> None:
        name = f"lease.{kv_key(key)}"
        mine = self._mine.get(name)
        if mine is not None and mine[0] == holder:
            del self._mine[name]
            revision = mine[2]
        else:
            value, revision = await self._read(name)
            if value is None or _lease(value)[0] != holder:
                return
        await self._write(name, b"", last=revision, delete=True)

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        lease, done = f"lease.{kv_key(key)}", f"done.{kv_key(key)}"
        held = await self._held(lease, holder)
        self._forget(lease, holder)
        if held is None:
            return False
        # Rewrite the lease at the revision it was held at: it succeeds only if nobody took it since.
        fence = await self._write(lease, held[0], last=held[1])
        if fence is None or not await self._create(done, result, ttl):
            return False
        await self._write(lease, b"", last=fence, delete=True)
        return True

    # -- records ---------------------------------------------------------------------------------------

    def _record(self, holder: str, ttl: float) -> tuple[bytes, float]:
        until = self._clock() + ttl
        return json.dumps({"holder": holder, "until": until}).encode(), until

    async def _held(self, name: str, holder: str) -> tuple[bytes, int] | None:
        """The lease record and its revision if ``holder`` holds it now, else None: as this process
        last wrote it (one read fewer), or as read."""
        mine = self._mine.get(name)
        if mine is not None and mine[0] == holder:
            return (mine[1], mine[2]) if mine[3] > self._clock() else None
        value, revision = await self._read(name)
        if value is None:
            return None
        other, until = _lease(value)
        return (value, revision) if other == holder and until > self._clock() else None

    async def _write_mine(
        self, name: str, holder: str, record: bytes, until: float, *, last: int
    ) -> int | None:
        """`_write` of ``holder``'s lease record, kept in `_mine` when it is written (a write that
        fails or ends unknown, by a timeout say, is forgotten: the next change reads first)."""
        self._forget(name, holder)
        revision = await self._write(name, record, last=last)
        if revision is not None:
            if len(self._mine) >= _MINE_KEPT:  # runs that ended without a commit or release
                del self._mine[next(iter(self._mine))]
            self._mine[name] = (holder, record, revision, until)
        return revision

    def _forget(self, name: str, holder: str) -> None:
        mine = self._mine.get(name)
        if mine is not None and mine[0] == holder:
            del self._mine[name]

    async def _create(self, name: str, value: bytes, ttl: float) -> bool:
        if await self._write(name, value, last=0, ttl=ttl) is not None:
            return True
        existing, revision = await self._read(name)  # a delete marker (`nats kv del`) counts as absent
        return existing is None and await self._write(name, value, last=revision, ttl=ttl) is not None

    async def _read(self, name: str) -> tuple[bytes | None, int]:
        """The key's value (None: absent or deleted) and revision (0: no message at all)."""
        js = self._connection.live()[1]
        with NatsErrors(f"KV get {self.bucket}.{name}"):
            try:
                msg = await js.get_last_msg(self._stream, self._prefix + name)
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    raise
                return None, 0
        headers = msg.headers or {}
        removed = headers.get("KV-Operation") in _REMOVED
        expired = _until(headers.get(_UNTIL)) <= self._clock()
        return (None if removed or expired else msg.data or b""), msg.seq or 0

    async def _write(
        self, name: str, value: bytes, *, last: int, ttl: float | None = None, delete: bool = False
    ) -> int | None:
        """Write if the key's revision is still ``last`` (0: no message); the new revision, or None."""
        js = self._connection.live()[1]
        headers = {"Nats-Expected-Last-Subject-Sequence": str(last)}
        if delete:
            headers["KV-Operation"] = "DEL"
        if ttl is not None:
            headers[_UNTIL] = repr(self._clock() + ttl)
        msg_ttl = max(1, math.ceil(ttl)) if ttl is not None and self._per_key_ttl else None
        with NatsErrors(f"KV write {self.bucket}.{name}"):
            try:
                ack = await js.publish(self._prefix + name, value, headers=headers, msg_ttl=msg_ttl)
            except nats.js.errors.APIError as exc:
                if exc.err_code in _WRONG_LAST:
                    return None
                raise
        return ack.seq
