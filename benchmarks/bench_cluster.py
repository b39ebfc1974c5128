"""Cross-node ``mediator.send`` vs the raw client and FastStream, on one real broker, side by side.

    python -m benchmarks.bench_cluster [--broker nats|redis|all] [--seconds N] [--loop asyncio|uvloop]
        [--plot PNG]

For each broker it starts a fresh server (``tests.servers``), then one responder process per
contender (``benchmarks._responder``), and measures from this process, over the same server:

- raw:        nats-py ``nc.request`` / hand-rolled redis-py pub/sub request/reply;
- catga:      ``mediator.send(Echo(...))`` from a node with no handlers (every send crosses the
              broker) to a node in another process;
- catga, tracing + metrics: the same with `TracingObserver` (an SDK provider recording every span,
              exporting none) and `PrometheusObserver` on both nodes (a cluster of their own);
- FastStream: ``broker.request(...)`` to a FastStream subscriber in another process.

Each at 1 in flight (rt/s, p50/p99 latency) and at 100 in flight (rt/s), after a warm-up, in
3 interleaved rounds; the table shows the median round. Every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from benchmarks import _raw
from benchmarks._common import (
    CATGA_CLUSTER,
    CATGA_OBSERVED_CLUSTER,
    DATA,
    FS_REPLY,
    RAW_REPLY,
    REPLY_TEXT,
    Echo,
    LoopName,
    Responder,
    Sample,
    bench_cli,
    fmt_rate,
    fmt_ratio,
    median_sample,
    observers,
    payload_size,
    run_concurrent,
    run_sequential,
)
from benchmarks._plot import PLOT_LEVELS, write_plot
from benchmarks._responder import FS_SUBJECT, FsEcho
from fastapi_catga import CatgaSettings, build, new_message_id
from tests.servers import NatsServer, RedisServer, ServerProcess

BrokerName = Literal["nats", "redis"]
Call = Callable[[], Awaitable[object]]
Setup = Callable[[AsyncExitStack], Awaitable[Call]]

SEQUENTIAL = 1
FS_REDIS_CONNECTIONS = 1024  # a pub/sub connection per request in flight (--plot goes to 500)
GOAL_RAW = 0.8


@dataclass
class Contender:
    key: str
    label: str
    responder_kind: str
    setup: Setup
    call: Call | None = None
    error: str | None = None
    failed_at: set[int] = field(default_factory=set)
    samples: dict[int, list[Sample]] = field(default_factory=dict)

    def median(self, inflight: int) -> Sample | None:
        runs = self.samples.get(inflight)
        return median_sample(runs) if runs else None


# -- the callers ---------------------------------------------------------------------------------


def catga_setup(broker: BrokerName, url: str, *, observed: bool = False) -> Setup:
    async def setup(stack: AsyncExitStack) -> Call:
        node_id = f"bench-caller-{os.getpid()}{'-observed' if observed else ''}"
        cluster = CATGA_OBSERVED_CLUSTER if observed else CATGA_CLUSTER
        if broker == "nats":
            settings = CatgaSettings(transport="nats", nats_url=url, cluster=cluster, node_id=node_id)
        else:
            settings = CatgaSettings(transport="redis", redis_url=url, cluster=cluster, node_id=node_id)
        # Handles nothing: every send crosses the broker.
        catga = build(settings, handlers=[], observers=observers() if observed else ())
        await catga.start()
        stack.push_async_callback(catga.stop)
        async with asyncio.timeout(10):
            while not catga.node.view.capable(Echo.type_name):
                await asyncio.sleep(0.05)
        mediator = catga.mediator

        async def call() -> str:
            return await mediator.send(Echo(data=DATA))

        if await call() != REPLY_TEXT:
            raise RuntimeError("catga answered something else than the handler's result")
        return call

    return setup


def raw_nats_setup(url: str) -> Setup:
    async def setup(stack: AsyncExitStack) -> Call:
        requester = _raw.RawNatsRequester(url, b"p" * payload_size())
        await requester.connect()
        stack.push_async_callback(requester.aclose)
        if await requester.request() != RAW_REPLY:
            raise RuntimeError("the raw responder answered something else")
        return requester.request

    return setup


def raw_redis_setup(url: str, variant: _raw.RedisVariant) -> Setup:
    async def setup(stack: AsyncExitStack) -> Call:
        requester = _raw.RawRedisRequester(url, b"p" * payload_size(), variant)
        await requester.connect()
        stack.push_async_callback(requester.aclose)
        if await requester.request() != RAW_REPLY:
            raise RuntimeError("the raw responder answered something else")
        return requester.request

    return setup


def faststream_setup(broker: BrokerName, url: str) -> Setup:
    async def setup(stack: AsyncExitStack) -> Call:
        if broker == "nats":
            from faststream.nats import NatsBroker

            nats_broker = NatsBroker(url, logger=None)
            await nats_broker.connect()
            stack.push_async_callback(nats_broker.stop)

            async def call() -> object:
                body = FsEcho(message_id=new_message_id(), data=DATA)
                response = await nats_broker.request(body, FS_SUBJECT, timeout=5)
                return await response.decode()

        else:
            from faststream.redis import RedisBroker

            # Each request takes a pub/sub connection of its own, on a pool that raises when full:
            # the default 100 connections fail at 100 in flight (MaxConnectionsError).
            redis_broker = RedisBroker(url, logger=None, max_connections=FS_REDIS_CONNECTIONS)  # type: ignore[arg-type]
            await redis_broker.connect()
            stack.push_async_callback(redis_broker.stop)

            async def call() -> object:
                body = FsEcho(message_id=new_message_id(), data=DATA)
                response = await redis_broker.request(body, FS_SUBJECT, timeout=5)
                return await response.decode()

        if (answer := await call()) != FS_REPLY:
            raise RuntimeError(f"FastStream answered {answer!r}, not {FS_REPLY!r}")
        return call

    return setup


def contenders(broker: BrokerName, url: str) -> list[Contender]:
    if broker == "nats":
        raws = [Contender("raw", "raw nats-py request/reply", "raw", raw_nats_setup(url))]
    else:
        raws = [
            Contender(
                "raw-awaited", "raw redis-py, awaited PUBLISH", "raw-awaited", raw_redis_setup(url, "awaited")
            ),
            Contender("raw", "raw redis-py, auto-pipelined", "raw", raw_redis_setup(url, "pipelined")),
        ]
    return [
        *raws,
        Contender("catga", "catga mediator.send", "catga", catga_setup(broker, url)),
        Contender(
            "catga-observed",
            "catga, tracing + metrics on",
            "catga-observed",
            catga_setup(broker, url, observed=True),
        ),
        Contender("faststream", "FastStream broker.request", "faststream", faststream_setup(broker, url)),
    ]


# -- the run -------------------------------------------------------------------------------------


async def prepare(
    contender: Contender, broker: BrokerName, url: str, loop: LoopName, stack: AsyncExitStack
) -> None:
    """Start the contender's responder process and connect its caller; on failure note why."""
    responder = Responder(
        "--kind", contender.responder_kind, "--broker", broker, "--url", url, "--loop", loop
    )
    stack.callback(responder.stop)
    try:
        responder.start()
        await responder.wait_ready()
        async with asyncio.timeout(30):
            contender.call = await contender.setup(stack)
    except Exception as exc:  # report it in the table and go on with the others
        contender.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        if responder.proc is not None and responder.proc.poll() is not None:
            contender.error += f" | responder log: {responder.log_tail(3)}"


async def measure(contender: Contender, inflight: int, seconds: float) -> None:
    call = contender.call
    if call is None or inflight in contender.failed_at:
        return
    try:
        async with asyncio.timeout(seconds + 30):
            if inflight == SEQUENTIAL:
                sample = await run_sequential(call, seconds)
            else:
                sample = await run_concurrent(call, seconds, inflight)
    except Exception as exc:  # this number in flight is out; the others go on
        contender.failed_at.add(inflight)
        contender.error = f"failed at {inflight} in flight: {type(exc).__name__}: {exc}"[:300]
        return
    contender.samples.setdefault(inflight, []).append(sample)


async def bench_broker(
    broker: BrokerName,
    server: ServerProcess,
    seconds: float,
    runs: int,
    inflight: int,
    loop: LoopName,
    plot: bool = False,
) -> list[Contender]:
    url = server.url
    entries = contenders(broker, url)
    async with AsyncExitStack() as stack:
        for contender in entries:
            await prepare(contender, broker, url, loop, stack)
        modes = tuple(sorted({SEQUENTIAL, inflight, *(PLOT_LEVELS if plot else ())}))
        warmup = min(1.0, seconds)
        for contender in entries:  # warm-up: connections, caches, the JIT-less interpreter's dicts
            for mode in modes:
                await measure(contender, mode, warmup)
            contender.samples.clear()
        for round_no in range(1, runs + 1):
            started = time.perf_counter()
            for mode in modes:
                for contender in entries:
                    await measure(contender, mode, seconds)
            print(f"  round {round_no}/{runs} done in {time.perf_counter() - started:.0f} s", flush=True)
    return entries


# -- the table -----------------------------------------------------------------------------------


def print_table(
    broker: BrokerName, server: ServerProcess, entries: list[Contender], args: argparse.Namespace
) -> None:
    inflight = args.inflight
    by_key = {c.key: c for c in entries}
    server_desc = (
        f"nats-server {server.version} (-js)" if broker == "nats" else f"redis-server {server.version}"
    )
    print()
    print(
        f"== {broker.upper()}: {server_desc}, {args.loop} loop, request body {payload_size()} B, reply 16 B, "
        f"median of {args.runs} runs x {args.seconds:g} s =="
    )
    head = f"{'':36} {'1 in flight':>30}   {f'{inflight} in flight':>14}"
    print(head)
    print(f"{'':36} {'rt/s':>10} {'p50 us':>9} {'p99 us':>9}   {'rt/s':>14}   runs at {inflight} in flight")
    for c in entries:
        seq, con = c.median(SEQUENTIAL), c.median(inflight)
        runs = " / ".join(fmt_rate(s.rate) for s in c.samples.get(inflight, []))
        print(
            f"{c.label:36} {fmt_rate(seq.rate if seq else None):>10} "
            f"{fmt_rate(seq.p50_us if seq else None):>9} {fmt_rate(seq.p99_us if seq else None):>9}   "
            f"{fmt_rate(con.rate if con else None):>14}   {runs}"
        )
        if c.error:
            print(f"{'':4}!! {c.label}: {c.error}")

    def rate(key: str, mode: int) -> float | None:
        contender = by_key.get(key)
        sample = contender.median(mode) if contender else None
        return sample.rate if sample else None

    catga = (rate("catga", SEQUENTIAL), rate("catga", inflight))
    raw_seq_key = "raw" if broker == "nats" else "raw-awaited"
    raw = (rate(raw_seq_key, SEQUENTIAL), rate("raw", inflight))
    fs = (rate("faststream", SEQUENTIAL), rate("faststream", inflight))

    def per_round(key: str) -> str:
        # Rounds are interleaved, so the ratio within one round compares runs taken seconds apart.
        mine, theirs = by_key["catga"].samples.get(inflight, []), by_key[key].samples.get(inflight, [])
        return " / ".join(fmt_ratio(a.rate, b.rate) for a, b in zip(mine, theirs, strict=False))

    def verdict(ok: bool | None) -> str:
        return "" if ok is None else "met" if ok else "MISSED"

    ok_raw = catga[1] / raw[1] >= GOAL_RAW if catga[1] and raw[1] else None
    ok_fs = catga[1] > fs[1] if catga[1] and fs[1] else None
    print(
        f"{'catga / raw':36} {fmt_ratio(catga[0], raw[0]):>10} {'':9} {'':9}   "
        f"{fmt_ratio(catga[1], raw[1]):>14}   per round {per_round('raw')}; "
        f"goal >= {GOAL_RAW}: {verdict(ok_raw)}"
    )
    print(
        f"{'catga / FastStream':36} {fmt_ratio(catga[0], fs[0]):>10} {'':9} {'':9}   "
        f"{fmt_ratio(catga[1], fs[1]):>14}   per round {per_round('faststream')}; goal > 1: {verdict(ok_fs)}"
    )
    observed = (rate("catga-observed", SEQUENTIAL), rate("catga-observed", inflight))
    print(
        f"{'catga tracing + metrics / catga':36} {fmt_ratio(observed[0], catga[0]):>10} {'':9} {'':9}   "
        f"{fmt_ratio(observed[1], catga[1]):>14}   the cost of TracingObserver + PrometheusObserver"
    )
    print("  FastStream runs with logger=None (no log line per message; catga has no LoggingBehavior here)")
    if broker == "redis":
        print(
            f"  FastStream's RedisBroker has max_connections={FS_REDIS_CONNECTIONS} (the default 100 fails)"
        )
        print(
            "  raw baseline for the ratios: 1 in flight = awaited PUBLISH per request (responder: a task "
            f"per reply);\n  {inflight} in flight = auto-pipelined PUBLISH on both sides "
            "(one writer task per process batches every PUBLISH queued while a batch is in flight)"
        )
    print(flush=True)


# -- main ----------------------------------------------------------------------------------------


def start_server(broker: BrokerName) -> ServerProcess:
    server: ServerProcess = NatsServer(jetstream=True) if broker == "nats" else RedisServer()
    return server.start()


def plot_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plot",
        metavar="PNG",
        type=Path,
        help=f"also measure at {', '.join(map(str, PLOT_LEVELS))} in flight and draw rt/s, p50 and p99 there",
    )


def write_png(results: dict[BrokerName, list[Contender]], args: argparse.Namespace) -> None:
    if args.plot is None:
        return
    title = (
        f"bench_cluster: {platform.python_version()}, {args.loop} loop, {os.cpu_count()} CPUs, "
        f"median of {args.runs} x {args.seconds:g} s"
    )
    write_plot(args.plot, dict(results.items()), title)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    bench_cli(
        "bench_cluster",
        __doc__,
        start_server=start_server,
        bench_broker=lambda broker, server, args: bench_broker(
            broker, server, args.seconds, args.runs, args.inflight, args.loop, args.plot is not None
        ),
        print_table=print_table,
        options=plot_option,
        finish=write_png,
    )
