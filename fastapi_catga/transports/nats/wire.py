"""nats-py beneath its public calls, on the hot path: receiving and sending a message.

Where this nats-py is one whose insides are known (`DIRECT`: 2.x; otherwise its public calls
serve, and both paths are tested):

- a received message is taken as nats-py reads it (`_Direct`), not through its ``asyncio.Queue``
  and task per subscription: that hop cost about a twentieth of a round trip's CPU. What the queue
  bounded (messages read but not yet handled) the cluster layer bounds itself: a handler slot per
  request, "busy" past the limit, a bounded queue of waiting events;
- such a message is handed over as its subject, reply subject and payload, straight from nats-py's
  parser (`_processor`): no ``Msg`` is built, and nats-py's per-message bookkeeping for features
  these subscriptions do not use (JetStream flow control, old-style requests, auto-unsubscribe) is
  skipped. A message with headers (a server status, such as "no responders") takes nats-py's path;
- what a read brought is cut into plain ``MSG`` frames by offsets in the bytes read (`_reader`),
  not by a regular expression per line, copies into and out of a ``bytearray`` and a dict of
  arguments per message. From the first byte that is anything else (``HMSG``, ``PING``, ``INFO``,
  ``-ERR``, a line not as a server writes it, a frame cut by the end of the read) the rest of the
  read goes to nats-py's parser; the next read gives it just what completes a cut frame;
- a sent message is a ``PUB`` command put on nats-py's outgoing buffer, which its flusher task
  writes (`publish`): ``Client.publish`` checks again, on every message, what holds already (the
  connection is live, nobody drains, the subject was checked) and builds its command in three
  more calls, about a tenth of a round trip;
- except the first one sent after a read that brought one message and nothing else (`_Pace`): on
  a quiet connection (a request at a time, or its reply) that one is written to the socket at
  once, when nothing else waits to go out (`WRITE_NOW`: where nats-py's TCP transport is known).
  The flusher's turns of the event loop, one on each side, were a sixth of such a round trip's
  instructions; under load reads bring many messages and what a turn sends goes out in one
  write, as before (at most one write more per read that brought one message).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from fastapi_catga.core.logs import LogLimiter

__all__ = ["DIRECT", "Take", "publish", "subscribe"]

logger = logging.getLogger(__name__)

# Where `_Direct` cannot stand in: per subscription, before nats-py drops messages as a slow
# consumer (counted, logged), a bound on what a node holds unread when its event loop falls behind.
_PENDING_MSGS = 65_536
_PENDING_BYTES = 64 * 1024 * 1024

#: Called with each received message's subject, reply subject (or ""), payload and headers (None
#: when it has none), in nats-py's reader: it must not block.
Take = Callable[[str, str, bytes, dict[str, str] | None], None]


class _Direct:
    """Stands in for a nats-py subscription's queue of received messages, and marks the
    subscription as one whose plain messages `_processor` hands to ``take`` itself. The others
    (with headers) nats-py ``put``s here, and they go to ``take`` at once, in nats-py's reader,
    with no task or queue hop between.

    ``take`` must not block. An error it raises is logged: in nats-py's reader it would count as a
    broken connection.
    """

    __slots__ = ("_sub", "_take")

    def __init__(self, sub: Subscription, take: Take) -> None:
        self._sub = sub
        self._take = take

    def put_nowait(self, msg: Msg) -> None:
        """A message that took nats-py's own path (`_processor` hands the others over itself)."""
        self._sub._pending_size -= len(msg.data)  # nats-py counts it as pending until taken
        try:
            self._take(msg.subject, msg.reply, msg.data, msg.headers)
        except Exception:
            logger.exception("handling a message on %s failed", msg.subject)

    # The rest of `asyncio.Queue` that nats-py uses on a subscription: nothing ever waits here.
    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


class _Pace:
    """Whether a connection is quiet: its last read brought one whole message and nothing else,
    and nothing has been written at once since (`publish` writes one message at once per such read)."""

    __slots__ = ("quiet",)

    def __init__(self) -> None:
        self.quiet = False


_PACE = "_catga_pace"  # where a connection keeps its `_Pace`


def _pace(nc: Client) -> _Pace:
    """The connection's `_Pace`, kept where `_reader` and `publish` both find it."""
    pace: _Pace | None = vars(nc).get(_PACE)
    if pace is None:
        pace = vars(nc)[_PACE] = _Pace()
    return pace


def _known_insides() -> bool:
    """Whether this nats-py keeps received messages in ``Subscription._pending_queue``, commands
    to send in ``Client._pending`` for its flusher task, and parses reads with a ``Parser`` that
    calls ``Client._process_msg`` per message (2.x does)."""
    try:
        client, subscription = Client(), Subscription(None)
    except Exception:  # a nats-py whose constructors changed: its public calls serve
        return False
    names = ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue", "_subs", "stats")
    parser = getattr(client, "_ps", None)
    return (
        all(name in vars(subscription) for name in ("_pending_queue", "_pending_size", "_received"))
        and all(hasattr(client, name) for name in (*names, "_status", "_transport"))
        and _parameters(getattr(Client, "_process_msg", None))
        == ["self", "sid", "subject", "reply", "data", "headers"]
        and isinstance(parser, Parser)
        and all(name in vars(parser) for name in ("buf", "state"))
        and _parameters(getattr(Parser, "parse", None)) == ["self", "data"]
    )


def _parameters(function: object) -> list[str]:
    try:
        return list(inspect.signature(function).parameters) if callable(function) else []
    except (TypeError, ValueError):
        return []


#: The hot path beneath nats-py's public calls (see the module docstring); they serve otherwise.
DIRECT = _known_insides()


def _known_writer() -> bool:
    """Whether nats-py's TCP transport keeps its ``asyncio.StreamWriter`` where `_write_now` finds it."""
    try:
        return "_io_writer" in vars(TcpTransport())  # type: ignore[no-untyped-call]
    except Exception:
        return False


#: A quiet connection's first message may be written at once (`_write_now`); otherwise it is buffered.
WRITE_NOW = DIRECT and _known_writer()


def publish(nc: Client, subject: str, data: bytes, reply: str, timeout: float) -> Awaitable[None]:
    """``nc.publish``; with `DIRECT`, without its checks of what the transport ensured already (a
    live connection, `NatsConnection.client`; a subject NATS can carry; nobody draining). nats-py's
    ``stats`` do not count what goes out this way.

    On a quiet connection (`_Pace`), with nothing buffered, nothing waiting for the flusher and
    nothing left unwritten in the socket's transport, the message is written at once instead.

    A full outgoing buffer (a server that stopped reading, or a socket slower than the senders)
    makes the sender wait until the flusher has written it, as ``publish`` does, but ``timeout``
    seconds at most: nats-py's own wait has no end, and swallows a cancellation.

    Raises:
        nats.errors.TimeoutError: the buffer was still not written after ``timeout`` seconds. The
            message stays in it: it goes out if the server reads again before the connection is
            given up.
    """
    if not DIRECT:
        return _within(nc, nc.publish(subject, data, reply=reply), timeout)
    if len(data) > nc.max_payload:  # the server's, which a reconnect may have lowered
        raise nats.errors.MaxPayloadError
    command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(data), data)
    if (
        WRITE_NOW
        and not nc._pending
        and (pace := vars(nc).get(_PACE)) is not None
        and pace.quiet
        and _write_now(nc, command)
    ):
        pace.quiet = False  # one per read that brought one message: the rest of this turn batches
        return _DONE
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    if nc._pending_data_size > nc._max_pending_size > 0:
        return _flushed(nc, timeout)
    if nc._flush_queue is not None and nc._flush_queue.empty():  # once per turn of the event loop
        if _BLIND_WRITELINES and _backlogged(nc) is not None:
            return _flushed(nc, timeout)
        return nc._flush_pending()  # wakes the flusher, which writes everything buffered by then
    return _DONE


def _write_now(nc: Client, command: bytes) -> bool:
    """Write ``command`` to the socket's transport now, if the connection is up, over TCP (TLS
    included), and the flusher has nothing to write (what nats-py buffered goes first). Not onto a
    transport that still holds bytes the socket did not take: that is a slow socket, which the
    flusher waits for (``drain``). False, and nothing written, otherwise."""
    queue, writer = nc._flush_queue, _live_writer(nc)
    if queue is None or not queue.empty() or writer is None:
        return False
    if writer.transport.is_closing() or writer.transport.get_write_buffer_size():
        return False
    writer.write(command)
    return True


def _live_writer(nc: Client) -> asyncio.StreamWriter | None:
    """The connection's socket writer, over TCP (TLS included); None while it is not connected
    (a reconnect's old transport is not the new connection's) or over another transport."""
    if getattr(nc, "_status", None) != Client.CONNECTED:
        return None
    transport = getattr(nc, "_transport", None)
    return getattr(transport, "_io_writer", None) if type(transport) is TcpTransport else None


_MAX_UNWRITTEN = 2 * 1024 * 1024  # nats-py 2.x's default bound of its buffer


#: CPython 3.12.0-3.12.8 and 3.13.0-3.13.1: a selector transport's ``writelines`` never pauses its
#: protocol (gh-127655, CVE-2024-12254), so nats-py's flusher never waits in ``drain`` (`_drained`).
_BLIND_WRITELINES = (3, 12) <= sys.version_info < (3, 12, 9) or (3, 13) <= sys.version_info < (3, 13, 2)


def _backlogged(nc: Client) -> asyncio.StreamWriter | None:
    """The connection's socket writer when its transport holds more bytes the socket has not taken
    than nats-py's buffer may hold; None otherwise."""
    writer = _live_writer(nc)
    limit = getattr(nc, "_max_pending_size", _MAX_UNWRITTEN)
    return writer if writer is not None and writer.transport.get_write_buffer_size() > limit else None


async def _drained(nc: Client) -> None:
    """Wait while the socket's transport holds more than nats-py's buffer may.

    nats-py's flusher writes with ``writelines`` and then waits for the transport (``drain``). On
    CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 that ``writelines`` never pauses the transport's
    protocol (gh-127655), so the flusher's wait ends at once: against a server that stopped
    reading nothing sent would ever fail, and all of it would pile up in memory. This has the
    transport check its limits again (setting them, to what they are, pauses it as ``write``
    would, on every kind of transport: plain, TLS, uvloop's), and waits."""
    writer = _backlogged(nc)
    if writer is None:
        return
    low, high = writer.transport.get_write_buffer_limits()
    writer.transport.set_write_buffer_limits(high=high, low=low)
    await writer.drain()


async def _flushed(nc: Client, timeout: float) -> None:
    """Wait, ``timeout`` seconds at most, for the flusher to write what is buffered now: it takes
    the futures on its queue in turn and sets each once it wrote (one cancelled here, it skips)."""
    assert nc._flush_queue is not None
    written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        async with asyncio.timeout(timeout):
            await nc._flush_queue.put(written)
            await written
            await _drained(nc)
    except TimeoutError:
        raise nats.errors.TimeoutError from None


async def _within(nc: Client, sent: Awaitable[None], timeout: float) -> None:
    """nats-py's ``publish``, ``timeout`` seconds at most (its wait for a full buffer swallows the
    cancellation that ends it, so the timeout is read off, not caught); then `_drained`."""
    async with asyncio.timeout(timeout) as bound:
        await sent
        if not bound.expired():  # else the cancellation was swallowed: nothing would end the wait
            await _drained(nc)
    if bound.expired():
        raise nats.errors.TimeoutError


class _Done:
    """An awaitable that is done at once (no coroutine made per message)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        return
        yield  # a generator function: one that stops at once


_DONE = _Done()
_bad_subjects = LogLimiter()


def _processor(nc: Client) -> Callable[[int, bytes, bytes, bytes, bytes | None], Awaitable[None]]:
    """What nats-py's parser calls with each received message, in place of ``nc._process_msg``: a
    plain message to a `_Direct` subscription goes to its taker at once; anything else (headers,
    other subscriptions: JetStream's, nats-py's own) to nats-py's method. The counts nats-py keeps
    for both (``stats``, a subscription's ``delivered``) are kept."""
    process_msg, subs, stats = nc._process_msg, nc._subs, nc.stats

    def process(
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> Awaitable[None]:
        sub = subs.get(sid)
        direct: Any = None if sub is None or headers else sub._pending_queue
        if type(direct) is not _Direct:
            return process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        direct._sub._received += 1
        try:
            direct._take(subject.decode(), reply.decode(), data, None)
        except UnicodeDecodeError:  # nats-py's own path would take the connection down for it
            _bad_subjects.log(logger, logging.WARNING, "subject", "dropped a message whose subject or "
                              "reply subject is no UTF-8: %r", (subject + b" " + reply)[:200])  # fmt: skip
        except Exception:
            logger.exception("handling a message on %s failed", subject.decode(errors="replace"))
        return _DONE

    return process


def _reader(parser: Parser, nc: Client) -> Callable[[bytes], Coroutine[Any, Any, None]]:
    """What nats-py's read loop calls with each read, in place of ``parser.parse``: the whole plain
    ``MSG`` frames go to ``nc._process_msg`` one by one, cut by offsets; the rest of the read, from
    the first byte that is anything else, to nats-py's parser. When the read before ended within a
    frame, nats-py's parser first gets just what completes it (the control line, then the payload)."""
    parse, pace = parser.parse, _pace(nc)

    async def read(data: bytes = b"") -> None:
        at, end = 0, len(data)
        pace.quiet = False
        while parser.state != AWAITING_CONTROL_LINE or parser.buf:  # it holds part of a frame
            if parser.state == AWAITING_MSG_PAYLOAD:  # what completes the payload, CRLF included
                upto = at + parser.needed + 2 - len(parser.buf)
            else:  # what completes the control line
                upto = data.find(b"\n", at) + 1 or end + 1
            if upto > end:
                await parse(data[at:])
                return
            await parse(data[at:upto])
            at = upto
        process: Any = nc._process_msg  # `_processor`'s, which takes headers=None
        buffer = parser.buf
        while data.startswith(b"MSG ", at):
            line_end = data.find(b"\r\n", at)
            line = data[at + 4 : line_end] if line_end > at else b""
            parts = line.split()
            match parts:
                case [subject, sid, reply, size] if _number(sid) and _number(size):
                    pass
                case [subject, sid, size] if _number(sid) and _number(size):
                    reply = b""
                case _:  # cut short: nats-py's parser keeps it for the next read
                    break
            if b" ".join(parts) != line:
                break  # not as a server writes it: nats-py's parser says what it is
            payload_at = line_end + 2
            payload_end = payload_at + int(size)
            if data[payload_end : payload_end + 2] != b"\r\n":  # the rest comes with the next read
                break
            # Quiet when this frame is the whole read, set before it is taken: on 3.12+ its reply
            # may be sent within `process`.
            pace.quiet = at == 0 and payload_end + 2 == end
            await process(int(sid), subject, reply, data[payload_at:payload_end], None)
            at = payload_end + 2
            if parser.buf is not buffer:  # reset meanwhile (a reconnect): the rest is the old socket's
                return
        if at < end:
            await parse(data[at:])

    return read


def _number(digits: bytes) -> bool:
    """Digits as nats-py's parser takes them, short of what ``int()`` refuses to read."""
    return digits.isdigit() and len(digits) < 19


async def subscribe(nc: Client, subject: str, take: Take, queue: str = "") -> Subscription:
    if DIRECT:
        if "_process_msg" not in vars(nc):  # this connection's, not the class's
            vars(nc)["_process_msg"] = _processor(nc)
            vars(nc._ps)["parse"] = _reader(nc._ps, nc)
        sub = await nc.subscribe(subject, queue=queue)  # no callback: nats-py starts no task
        sub._pending_queue = _Direct(sub, take)  # type: ignore[assignment]
        return sub

    async def callback(msg: Msg) -> None:
        take(msg.subject, msg.reply, msg.data, msg.headers)

    return await nc.subscribe(
        subject,
        queue=queue,
        cb=callback,
        pending_msgs_limit=_PENDING_MSGS,
        pending_bytes_limit=_PENDING_BYTES,
    )
