"""CPU instructions per cross-node round trip, caller and responder both counted.

    python -m benchmarks.wire_instructions [--calls N] [--inflight K] [VARIANT ...]

`profile_cluster` measures CPU time per round trip with the caller and the responder in separate
processes, as in production; on a shared box that figure moves by a third between runs of the
same code. Here both ends run in one process on one event loop (two client connections, or two
catga nodes: the caller handles nothing, so every send crosses the broker), under ``valgrind
--tool=callgrind``, with ``--inflight`` loops making N and then 2N round trips; the difference is
what N round trips cost, in instructions, whatever else the machine does (repeatable to about
0.1 %). The broker runs outside valgrind, one per run. About a minute per variant (two runs at once).

- ``nats-raw``: ``nc.request`` against a subscription whose callback does ``msg.respond``
  (bench_cluster's raw nats-py baseline);
- ``nats-catga``: ``mediator.send(Echo(...))`` from one node to the other over NATS;
- ``redis-raw``: redis-py pub/sub request/reply, auto-pipelined on both sides (bench_cluster's raw
  redis-py baseline);
- ``redis-catga``: ``mediator.send`` over Redis.

Kernel work (system calls) is not counted: a variant that makes more of them costs more in
wall-clock time than its count shows.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from benchmarks import _raw
from benchmarks._common import DATA, RAW_REPLY, REPLY_TEXT, Echo, echo, payload_size
from benchmarks._responder import serve_raw_nats, serve_raw_redis
from benchmarks.instructions import callgrind, per_unit
from tests.servers import NatsServer, RedisServer, ServerProcess

VARIANTS = {
    "nats-raw": "raw nats-py: nc.request, callback msg.respond",
    "nats-catga": "catga: mediator.send to a node over NATS",
    "redis-raw": "raw redis-py: pub/sub, auto-pipelined",
    "redis-catga": "catga: mediator.send to a node over Redis",
}


Call = Callable[[], Awaitable[object]]


async def nats_raw(stack: AsyncExitStack, url: str) -> Call:
    await serve_raw_nats(stack, url)
    requester = _raw.RawNatsRequester(url, b"p" * payload_size())
    await requester.connect()
    stack.push_async_callback(requester.aclose)
    return requester.request


async def redis_raw(stack: AsyncExitStack, url: str) -> Call:
    await serve_raw_redis(stack, url, "pipelined")
    requester = _raw.RawRedisRequester(url, b"p" * payload_size(), "pipelined")
    await requester.connect()
    stack.push_async_callback(requester.aclose)
    return requester.request


async def catga(stack: AsyncExitStack, broker: str, url: str) -> Call:
    from fastapi_catga import CatgaSettings, build

    nodes = []
    for node_id, handlers in (("wire-responder", [echo]), ("wire-caller", [])):
        settings = CatgaSettings(
            transport=broker, nats_url=url, redis_url=url, cluster="wire", node_id=node_id
        )
        catga = build(settings, handlers=handlers)
        await catga.start()
        stack.push_async_callback(catga.stop)
        nodes.append(catga)
    caller = nodes[1]
    async with asyncio.timeout(60):  # membership runs at valgrind's pace
        while not caller.node.view.capable(Echo.type_name):
            await asyncio.sleep(0.05)
    send = caller.mediator.send

    async def call() -> str:
        return await send(Echo(data=DATA))

    return call


async def child(variant: str, url: str, count: int, inflight: int) -> None:
    async with AsyncExitStack() as stack:
        broker, kind = variant.split("-")
        if kind == "catga":
            call = await catga(stack, broker, url)
        else:
            call = await (nats_raw if broker == "nats" else redis_raw)(stack, url)
        if await call() not in (RAW_REPLY, REPLY_TEXT):
            raise RuntimeError(f"{variant} answered something else")
        each, extra = divmod(count, inflight)

        async def loop(calls: int) -> None:
            for _ in range(calls):
                await call()

        await asyncio.gather(*(loop(each + (i < extra)) for i in range(inflight)))


def per_round_trip(variant: str, count: int, inflight: int) -> float:
    def instructions(calls: int) -> int:  # its own broker, outside valgrind
        server: ServerProcess = (
            NatsServer(extra_args=["-js"]) if variant.startswith("nats") else RedisServer()
        )
        with server:
            args = ["benchmarks.wire_instructions", "--child", variant, "--url", server.url]
            return callgrind([*args, "--calls", str(calls), "--inflight", str(inflight)], variant)

    return per_unit(count, instructions)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", choices=[[], *VARIANTS], help="default: all")
    parser.add_argument("--calls", type=int, default=2_000, help="N (default 2,000)")
    parser.add_argument("--inflight", type=int, default=100, help="concurrent loops (default 100)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(child(args.child, args.url, args.calls, args.inflight))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is missing (Debian: apt-get install valgrind)")
    print(
        f"wire_instructions: Python {platform.python_version()}, {args.inflight} in flight, "
        f"{args.calls:,} and {2 * args.calls:,} round trips each"
    )
    results: dict[str, float] = {}
    for variant in args.variants or list(VARIANTS):
        results[variant] = per_round_trip(variant, args.calls, args.inflight)
        print(f"{VARIANTS[variant]:50} {results[variant]:10,.0f} instructions per round trip", flush=True)
    for broker in ("nats", "redis"):
        if f"{broker}-raw" in results and f"{broker}-catga" in results:
            print(f"{broker}: raw / catga {results[f'{broker}-raw'] / results[f'{broker}-catga']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
