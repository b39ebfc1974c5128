"""`wire._reader` against nats-py's own parser: the same bytes, cut anywhere into reads, give the
same calls in the same order (no server: a recorder stands in for the client)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

from fastapi_catga.transports.nats import wire


class Recorder:
    """The client calls nats-py's parser makes, written down."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self._ps = Parser(self)

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


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["msg", "msg", "msg", "hmsg", "ping", "pong", "ok", "info", "err"]))
    sid = draw(st.integers(1, 99_999))
    if kind == "msg":
        subject, data = draw(tokens), draw(payloads)
        reply = draw(st.none() | tokens)
        middle = b" " + reply if reply is not None else b""
        return b"MSG %s %d%s %d\r\n%s\r\n" % (subject, sid, middle, len(data), data)
    if kind == "hmsg":
        subject, data = draw(tokens), draw(payloads)
        head = b"NATS/1.0\r\nX-Test: %s\r\n\r\n" % draw(tokens)
        return b"HMSG %s %d %d %d\r\n%s%s\r\n" % (subject, sid, len(head), len(head) + len(data), head, data)
    if kind == "info":
        return b"INFO %s\r\n" % json.dumps({"server_id": draw(tokens).decode()}).encode()
    if kind == "err":
        return b"-ERR 'unknown subject'\r\n"
    return {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n"}[kind]


def feed(stream: bytes, cuts: list[int], fast: bool) -> list[tuple[Any, ...]]:
    recorder = Recorder()
    parse = wire._reader(recorder._ps, recorder) if fast else recorder._ps.parse  # type: ignore[arg-type]
    points = sorted({0, *(cut % (len(stream) + 1) for cut in cuts), len(stream)})

    async def run() -> None:
        for start, end in zip(points, points[1:], strict=False):
            await parse(stream[start:end])

    asyncio.run(run())
    return recorder.seen


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=12), st.lists(st.integers(0, 10_000), max_size=6))
def test_any_stream_cut_anywhere_gives_the_calls_nats_pys_parser_gives(
    parts: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(parts)
    assert feed(stream, cuts, fast=True) == feed(stream, cuts, fast=False)


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
