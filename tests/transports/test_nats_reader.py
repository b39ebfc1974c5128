"""`wire._reader` against nats-py's own parser: the same bytes, cut anywhere into reads, give the
same calls in the same order, the same error and the same parser state (no server: a recorder
stands in for the client)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

from fastapi_catga.transports.nats import wire


class CountingParser(Parser):
    """nats-py's parser, counting the bytes it is given."""

    fed = 0

    async def parse(self, data: bytes = b"") -> None:
        self.fed += len(data)
        await super().parse(data)


class Recorder:
    """The client calls nats-py's parser makes, written down."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self._ps = CountingParser(self)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        self.seen.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, error: str) -> None:
        self.seen.append(("err", error))


tokens = st.text("abcXYZ019_.", min_size=1, max_size=12).map(str.encode)
payloads = st.binary(max_size=40) | st.sampled_from([b"", b"\r\n", b"MSG a 1 2\r\nhi\r\n", b"PING\r\n"])
# Lines no server writes: nats-py's parser decides what they are (an error, mostly).
odd_lines = st.sampled_from(
    [
        b"MSG a  1 2",
        b"MSG a\t1 2",
        b"MSG a 1 2 ",
        b"MSG a 1 +2",
        b"MSG a x 2",
        b"MSG a\rb 1 2",
        b"MSG a 1 007",
    ]
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["msgs", "msgs", "msgs", "msgs", "hmsg", "ping", "pong", "ok", "info", "err", "odd"])
    )
    sid = draw(st.integers(1, 99_999))
    if kind == "msgs":
        out = b""
        for _ in range(draw(st.integers(1, 5))):
            subject, data, reply = draw(tokens), draw(payloads), draw(st.none() | tokens)
            middle = b" " + reply if reply is not None else b""
            out += b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, middle, len(data), data)
        return out
    if kind == "hmsg":
        subject, data = draw(tokens), draw(payloads)
        head = b"NATS/1.0\r\nX-Test: %s\r\n\r\n" % draw(tokens)
        return b"HMSG %s %d %d %d\r\n%s%s\r\n" % (subject, sid, len(head), len(head) + len(data), head, data)
    if kind == "info":
        return b"INFO %s\r\n" % json.dumps({"server_id": draw(tokens).decode()}).encode()
    if kind == "err":
        return b"-ERR 'unknown subject'\r\n"
    if kind == "odd":
        return draw(odd_lines) + b"\r\nab\r\n"
    return {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n"}[kind]


def feed(stream: bytes, points: list[int], fast: bool) -> tuple[Any, ...]:
    """What the client was called with, the error the reads ended with, and the parser's state."""
    recorder = Recorder()
    parse = wire._reader(recorder._ps, recorder) if fast else recorder._ps.parse  # type: ignore[arg-type]
    cuts = sorted({0, *(min(max(point, 0), len(stream)) for point in points), len(stream)})
    error = None

    async def run() -> None:
        for start, end in zip(cuts, cuts[1:], strict=False):
            await parse(stream[start:end])

    try:
        asyncio.run(run())
    except Exception as exc:  # a protocol error: the same one, after the same calls
        error = (type(exc).__name__, str(exc))
        return recorder.seen, error  # what the parser holds then is dropped with the connection
    return recorder.seen, error, bytes(recorder._ps.buf), recorder._ps.state


@settings(max_examples=400, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=10), st.data())
def test_any_stream_cut_anywhere_gives_what_nats_pys_parser_gives(
    parts: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(parts)
    # Cuts where they matter most, a few bytes either side of a frame's end and of each CRLF, and anywhere.
    edges = [len(b"".join(parts[:i])) for i in range(len(parts))] + [
        i for i in range(len(stream)) if stream[i] == 10
    ]
    near = st.builds(lambda edge, shift: edge + shift, st.sampled_from(edges), st.integers(-3, 3))
    points = data.draw(st.lists(near | st.integers(0, len(stream)), max_size=8))
    assert feed(stream, points, fast=True) == feed(stream, points, fast=False)


def test_whole_plain_frames_are_cut_by_offsets_and_the_rest_goes_to_nats_pys_parser() -> None:
    stream = b"MSG a 1 _INBOX.x 2\r\nhi\r\nMSG b 2 0\r\n\r\nPING\r\nMSG c 3 1\r\nz\r\nMSG d 4 5\r\nab"
    recorder = Recorder()
    read = wire._reader(recorder._ps, recorder)  # type: ignore[arg-type]
    asyncio.run(read(stream))
    assert recorder.seen == [
        ("msg", 1, b"a", b"_INBOX.x", b"hi", None),
        ("msg", 2, b"b", b"", b"", None),
        ("ping",),
        ("msg", 3, b"c", b"", b"z", None),
    ]
    assert bytes(recorder._ps.buf) == b"ab", "nats-py's parser holds the frame cut by the end of the read"
    asyncio.run(read(b"cde\r\n"))
    assert recorder.seen[-1] == ("msg", 4, b"d", b"", b"abcde", None)


def test_full_reads_that_cut_frames_keep_to_the_offsets() -> None:
    """Under load every read is full and most end within a frame: nats-py's parser gets just what
    completes the frame cut before, not the whole of the next read."""
    frames = [b"MSG catga.x.node.a 7 _INBOX.y.%d %d\r\n%s\r\n" % (n, 300, b"p" * 300) for n in range(1000)]
    stream = b"".join(frames)
    recorder = Recorder()
    read = wire._reader(recorder._ps, recorder)  # type: ignore[arg-type]

    async def run() -> None:
        for start in range(0, len(stream), 4096):
            await read(stream[start : start + 4096])

    asyncio.run(run())
    assert [call[3] for call in recorder.seen] == [b"_INBOX.y.%d" % n for n in range(1000)]
    reads = -(-len(stream) // 4096)
    assert recorder._ps.fed <= reads * len(frames[0]), "at most one frame per read through nats-py's parser"


class PaceRecorder(Recorder):
    """Writes down, with each message, whether the connection was quiet when it was taken."""

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        self.seen.append((data, wire._pace(self).quiet))  # type: ignore[arg-type]


def test_a_read_of_one_whole_message_makes_the_connection_quiet_before_it_is_taken() -> None:
    """`publish` writes one message at once after such a read, and a reply sent while the message
    is taken (an eager task, 3.12+) must find the connection quiet already. Any other read (more
    than one message, the rest of a frame, a PING) ends it."""
    recorder = PaceRecorder()
    read = wire._reader(recorder._ps, recorder)  # type: ignore[arg-type]
    pace = wire._pace(recorder)  # type: ignore[arg-type]

    async def run() -> list[tuple[bytes, bool]]:
        await read(b"MSG a 1 _INBOX.x 3\r\none\r\n")
        assert pace.quiet
        await read(b"MSG a 1 _INBOX.x 3\r\ntwo\r\nMSG a 1 5\r\nthree\r\n")
        assert not pace.quiet
        await read(b"MSG a 1 _INBOX.x 4\r\nfour\r\n")
        await read(b"PING\r\n")
        assert not pace.quiet, "the PING came after the message: its answer went out with nothing else"
        await read(b"MSG a 1 4\r\nfi")  # a frame cut by the end of the read ...
        await read(b"ve\r\n")  # ... and what completes it
        assert not pace.quiet
        await read(b"MSG a 1 3\r\nsix\r\nMSG a 1 5")
        assert not pace.quiet
        await read(b"\r\nseven\r\n")
        return recorder.seen

    seen = asyncio.run(run())
    assert seen == [
        (b"one", True),
        (b"two", False),
        (b"three", False),
        (b"four", True),
        ("ping",),
        (b"five", False),
        (b"six", False),
        (b"seven", False),
    ]
