"""Durable delivery (JetStream / Redis Streams) vs the raw broker's store, side by side.

    python -m benchmarks.bench_durable [--broker nats|redis|all] [--seconds N] [--loop asyncio|uvloop]

For each broker it starts a fresh, persistent server (``tests.servers``: nats-server with ``-js``
and its file store; redis-server with ``--appendonly yes --appendfsync everysec``), one catga node
in another process (``benchmarks._responder --kind catga-durable``: it handles the plain `Echo` and
the durable `DurableEcho`), and measures from this process, over the same server:

- raw store:   NATS ``js.publish`` awaiting its PubAck on a file-storage stream of its own (plain,
               and with the headers catga sets); Redis ``XADD`` awaited, and auto-pipelined;
- catga:       ``mediator.publish`` of a durable event and ``mediator.enqueue`` of a durable command
               (each returns once stored; no node handles those types: nothing consumes them);
               ``mediator.send`` of the plain `Echo` (request/reply, no broker store) and of the
               durable `DurableEcho` (store, fetch by the other node's worker, run, done record,
               result back), from a node with no handlers.

Each at 1 in flight (ops/s, p50/p99 latency) and at 100 in flight (ops/s), after a warm-up, in
3 interleaved rounds; the table shows the median round. Every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Literal

import nats
from nats.js import api
from redis.asyncio import Redis
from redis.utils import HIREDIS_AVAILABLE

from benchmarks import _raw
from benchmarks._common import (
    CATGA_CLUSTER,
    DATA,
    REPLY_TEXT,
    Echo,
    LoopName,
    Responder,
    Sample,
    bench_cli,
    echo,
    fmt_rate,
    fmt_ratio,
    loadavg,
    median_sample,
    payload_size,
    run_concurrent,
    run_sequential,
)
from benchmarks._responder import DurableEcho, DurableJob, DurableNoted
from fastapi_catga import Catga, CatgaSettings, IdempotencyBehavior, Mediator, build
from tests.servers import NatsServer, RedisServer, ServerProcess

BrokerName = Literal["nats", "redis"]
Call = Callable[[], Awaitable[object]]
Setup = Callable[[AsyncExitStack], Awaitable[Call]]

SEQUENTIAL = 1
RESPONDER_KIND = "catga-durable"
REDIS_PERSISTENCE = ("--appendonly", "yes", "--appendfsync", "everysec")
RAW_NATS_STREAMS = {False: ("BENCH_RAW", "bench.raw.store"), True: ("BENCH_RAW_IDS", "bench.raw.ids")}
RAW_REDIS_KEYS = {False: "bench:raw:store", True: "bench:raw:store:pipelined"}


@dataclass
class Row:
    key: str
    label: str
    setup: Setup
    catga: bool  # needs the catga-durable responder (its failure is this row's)
    call: Call | None = None
    error: str | None = None
    samples: dict[int, list[Sample]] = field(default_factory=dict)

    def median(self, inflight: int) -> Sample | None:
        runs = self.samples.get(inflight)
        return median_sample(runs) if runs else None


# -- raw store -----------------------------------------------------------------------------------


def raw_nats_setup(url: str, *, catga_headers: bool) -> Setup:
    """``js.publish`` awaiting its PubAck, on a file-storage stream of its own; with
    ``catga_headers``, the headers catga's append sets: a fresh ``Nats-Msg-Id`` (the server's
    duplicate window tracks it) and ``Nats-Expected-Stream``."""

    async def setup(stack: AsyncExitStack) -> Call:
        nc = await nats.connect(url)
        stack.push_async_callback(nc.close)
        js = nc.jetstream()
        stream, prefix = RAW_NATS_STREAMS[catga_headers]
        await js.add_stream(name=stream, subjects=[f"{prefix}.>"], storage=api.StorageType.FILE)
        subject, body = f"{prefix}.x", b"p" * payload_size()
        if not catga_headers:

            async def call() -> object:
                return await js.publish(subject, body)

        else:
            ids, run_id = itertools.count(), uuid.uuid4().hex

            async def call() -> object:
                headers = {"Nats-Msg-Id": f"{run_id}.{next(ids)}", "Nats-Expected-Stream": stream}
                return await js.publish(subject, body, headers=headers)

        ack = await call()
        if not isinstance(ack, api.PubAck) or ack.stream != stream:
            raise RuntimeError(f"expected a PubAck from stream {stream!r}, got {ack!r}")
        return call

    return setup


class XaddBatcher:
    """Auto-pipeline for ``XADD``: every call queued while a batch is in flight goes in the next one
    (one writer task, one round trip per batch), as `_raw.Batcher` does for ``PUBLISH``."""

    def __init__(self, client: Redis, key: str) -> None:
        self._client = client
        self._key = key
        self._pending: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def xadd(self, body: bytes) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending.append((body, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for body, _ in batch:
                        pipe.xadd(self._key, {"m": body})
                    ids = await pipe.execute()
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), entry_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(entry_id)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def raw_redis_setup(url: str, *, pipelined: bool) -> Setup:
    """``XADD key * m <body>`` (redis-py asyncio with hiredis): each call awaited on a pooled
    connection, or auto-pipelined (`XaddBatcher`)."""

    async def setup(stack: AsyncExitStack) -> Call:
        client = _raw.redis_client(url)
        stack.push_async_callback(client.aclose)
        key, body = RAW_REDIS_KEYS[pipelined], b"p" * payload_size()
        if pipelined:
            batcher = XaddBatcher(client, key)
            stack.push_async_callback(batcher.aclose)

            async def call() -> object:
                return await batcher.xadd(body)

        else:

            async def call() -> object:
                return await client.xadd(key, {"m": body})

        await call()
        return call

    return setup


def raw_run_once_setup(broker: BrokerName, url: str) -> Setup:
    """A hand-rolled at-most-once run per message id on the raw client, what catga's shared
    `IdempotencyBehavior` does: take a lease on the id (the done record is read only when that
    fails, never here: every id is new), call the handler, write the done record and drop the
    lease. NATS: ``kv.create`` of the lease, ``kv.create`` of the record, ``kv.delete`` of the lease
    (3 round trips; no fencing of the record by the lease). Redis: ``SET NX PX`` of the lease, then
    ``SET PX`` of the record and ``DEL`` of the lease in one MULTI (2 round trips)."""

    async def setup(stack: AsyncExitStack) -> Call:
        ids, run_id, body = itertools.count(), uuid.uuid4().hex, Echo(data=DATA)
        if broker == "nats":
            nc = await nats.connect(url)
            stack.push_async_callback(nc.close)
            kv = await nc.jetstream().create_key_value(bucket="BENCH_RAW_ONCE", history=1, ttl=120)

            async def call() -> object:
                key = f"{run_id}-{next(ids)}"
                await kv.create(f"lease.{key}", b"holder")
                result = (await echo(body)).encode()
                await kv.create(f"done.{key}", result)
                await kv.delete(f"lease.{key}")
                return result

        else:
            client = _raw.redis_client(url)
            stack.push_async_callback(client.aclose)

            async def call() -> object:
                key = f"bench:raw:once:{run_id}:{next(ids)}"
                if not await client.set(f"{key}:lease", b"holder", nx=True, px=30_000):
                    raise RuntimeError("a new id's lease was taken")
                result = (await echo(body)).encode()
                async with client.pipeline(transaction=True) as pipe:
                    pipe.set(f"{key}:done", result, px=120_000)
                    pipe.delete(f"{key}:lease")
                    await pipe.execute()
                return result

        await call()
        return call

    return setup


# -- catga ---------------------------------------------------------------------------------------


class CallerNode:
    """The one catga node of this process, built with ``handlers=[]``: every send crosses the
    broker, and nothing here consumes a durable queue."""

    def __init__(self, broker: BrokerName, url: str) -> None:
        self._broker = broker
        self._url = url
        self._catga: Catga | None = None

    async def get(self, stack: AsyncExitStack) -> Catga:
        if self._catga is None:
            node_id = f"bench-caller-{os.getpid()}"
            if self._broker == "nats":
                settings = CatgaSettings(
                    transport="nats", nats_url=self._url, cluster=CATGA_CLUSTER, node_id=node_id
                )
            else:
                settings = CatgaSettings(
                    transport="redis", redis_url=self._url, cluster=CATGA_CLUSTER, node_id=node_id
                )
            catga = build(settings, handlers=[])
            await catga.start()
            stack.push_async_callback(catga.stop)
            self._catga = catga
        return self._catga


def idempotent_setup(broker: BrokerName, url: str) -> Setup:
    """``mediator.send(Echo(...))`` on a node of a cluster of its own (``bench-once``) that
    handles `Echo` itself, behind a shared `IdempotencyBehavior`: each send takes the id's lease
    and writes its done record on the broker, as every node of a cluster with that behavior does."""

    async def setup(stack: AsyncExitStack) -> Call:
        if broker == "nats":
            settings = CatgaSettings(transport="nats", nats_url=url, cluster="bench-once")
        else:
            settings = CatgaSettings(transport="redis", redis_url=url, cluster="bench-once")
        catga = build(settings, handlers=[echo], behaviors=[IdempotencyBehavior()])
        await catga.start()
        stack.push_async_callback(catga.stop)
        mediator = catga.mediator

        async def call() -> object:
            return await mediator.send(Echo(data=DATA))

        if await call() != REPLY_TEXT:
            raise RuntimeError("catga answered something else than the handler's result")
        return call

    return setup


def catga_setup(caller: CallerNode, key: str) -> Setup:
    async def setup(stack: AsyncExitStack) -> Call:
        catga = await caller.get(stack)
        mediator: Mediator = catga.mediator
        if key == "publish":

            async def call() -> object:
                await mediator.publish(DurableNoted(data=DATA))
                return None

        elif key == "enqueue":

            async def call() -> object:
                return await mediator.enqueue(DurableJob(data=DATA))

        elif key == "send":
            async with asyncio.timeout(10):
                while not catga.node.view.capable(Echo.type_name):
                    await asyncio.sleep(0.05)

            async def call() -> object:
                return await mediator.send(Echo(data=DATA))

        else:

            async def call() -> object:
                return await mediator.send(DurableEcho(data=DATA))

        answer = await call()
        if key in ("send", "durable-send") and answer != REPLY_TEXT:
            raise RuntimeError(f"catga answered {answer!r}, not the handler's result")
        return call

    return setup


def rows(broker: BrokerName, url: str) -> list[Row]:
    if broker == "nats":
        raws = [
            Row("raw", "raw js.publish + PubAck", raw_nats_setup(url, catga_headers=False), False),
            Row(
                "raw-headers",
                "raw js.publish, catga's headers",
                raw_nats_setup(url, catga_headers=True),
                False,
            ),
        ]
    else:
        raws = [
            Row("raw", "raw XADD, awaited", raw_redis_setup(url, pipelined=False), False),
            Row("raw-pipelined", "raw XADD, auto-pipelined", raw_redis_setup(url, pipelined=True), False),
        ]
    caller = CallerNode(broker, url)
    return [
        *raws,
        Row("publish", "catga durable publish (stored)", catga_setup(caller, "publish"), True),
        Row("enqueue", "catga enqueue (stored)", catga_setup(caller, "enqueue"), True),
        Row("send", "catga send, plain (request/reply)", catga_setup(caller, "send"), True),
        Row("durable-send", "catga send, durable (round trip)", catga_setup(caller, "durable-send"), True),
        Row("raw-once", "raw run-once (lease, record, release)", raw_run_once_setup(broker, url), False),
        Row("once", "catga send, IdempotencyBehavior", idempotent_setup(broker, url), False),
    ]


# -- the run -------------------------------------------------------------------------------------


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


async def prepare(row: Row, stack: AsyncExitStack, responder_error: str | None) -> None:
    """Connect the row's caller; on failure note why (the responder's failure for catga rows)."""
    if row.catga and responder_error is not None:
        row.error = responder_error
        return
    try:
        async with asyncio.timeout(30):
            row.call = await row.setup(stack)
    except Exception as exc:  # report it in the table and go on with the others
        row.error = short_error(exc)


async def measure(row: Row, inflight: int, seconds: float) -> None:
    call = row.call
    if call is None or row.error is not None:
        return
    try:
        async with asyncio.timeout(seconds + 30):
            if inflight == SEQUENTIAL:
                sample = await run_sequential(call, seconds)
            else:
                sample = await run_concurrent(call, seconds, inflight)
    except Exception as exc:
        row.error = f"failed at {inflight} in flight: {short_error(exc)}"[:300]
        return
    row.samples.setdefault(inflight, []).append(sample)


async def bench_broker(
    broker: BrokerName, server: ServerProcess, seconds: float, runs: int, inflight: int, loop: LoopName
) -> list[Row]:
    url = server.url
    entries = rows(broker, url)
    async with AsyncExitStack() as stack:
        responder = Responder("--kind", RESPONDER_KIND, "--broker", broker, "--url", url, "--loop", loop)
        stack.callback(responder.stop)
        responder_error: str | None = None
        try:
            responder.start()
            await responder.wait_ready()
        except Exception as exc:
            responder_error = f"the {RESPONDER_KIND} responder: {short_error(exc)}"
        for row in entries:
            await prepare(row, stack, responder_error)
        modes = (SEQUENTIAL, inflight)
        warmup = min(1.0, seconds)
        for row in entries:  # warm-up: connections, caches, the JIT-less interpreter's dicts
            for mode in modes:
                await measure(row, mode, warmup)
            row.samples.clear()
        for round_no in range(1, runs + 1):
            started = time.perf_counter()
            for mode in modes:
                for row in entries:
                    await measure(row, mode, seconds)
            took = time.perf_counter() - started
            print(f"  round {round_no}/{runs} done in {took:.0f} s; loadavg {loadavg()}", flush=True)
        if responder.proc is not None and responder.proc.poll() is not None:
            print(f"  !! the responder exited early: {responder.log_tail(5)}", flush=True)
    return entries


# -- the table -----------------------------------------------------------------------------------


def print_table(
    broker: BrokerName, server: ServerProcess, entries: list[Row], args: argparse.Namespace
) -> None:
    inflight = args.inflight
    by_key = {row.key: row for row in entries}
    if broker == "nats":
        server_desc = f"nats-server {server.version} (-js, file store)"
    else:
        server_desc = f"redis-server {server.version} (appendonly yes, appendfsync everysec)"
    print()
    print(
        f"== {broker.upper()}: {server_desc}, {args.loop} loop, body {payload_size()} B, "
        f"median of {args.runs} runs x {args.seconds:g} s =="
    )
    print(f"{'':36} {'1 in flight':>30}   {f'{inflight} in flight':>14}")
    print(f"{'':36} {'ops/s':>10} {'p50 us':>9} {'p99 us':>9}   {'ops/s':>14}   runs at {inflight} in flight")
    for row in entries:
        seq, con = row.median(SEQUENTIAL), row.median(inflight)
        runs = " / ".join(fmt_rate(s.rate) for s in row.samples.get(inflight, []))
        print(
            f"{row.label:36} {fmt_rate(seq.rate if seq else None):>10} "
            f"{fmt_rate(seq.p50_us if seq else None):>9} {fmt_rate(seq.p99_us if seq else None):>9}   "
            f"{fmt_rate(con.rate if con else None):>14}   {runs}"
        )
        if row.error:
            print(f"{'':4}!! {row.label}: {row.error}")

    def rate(key: str, mode: int) -> float | None:
        row = by_key.get(key)
        sample = row.median(mode) if row else None
        return sample.rate if sample else None

    def per_round(mine: str, theirs: str) -> str:
        # Rounds are interleaved, so the ratio within one round compares runs taken seconds apart.
        a, b = by_key[mine].samples.get(inflight, []), by_key[theirs].samples.get(inflight, [])
        return " / ".join(fmt_ratio(x.rate, y.rate) for x, y in zip(a, b, strict=False))

    ratios = [
        ("durable publish / raw store", "publish", "raw"),
        ("enqueue / raw store", "enqueue", "raw"),
        ("durable send / raw store", "durable-send", "raw"),
        ("durable send / plain send", "durable-send", "send"),
        ("IdempotencyBehavior / raw run-once", "once", "raw-once"),
    ]
    if broker == "redis":
        ratios.insert(2, ("enqueue / raw auto-pipelined", "enqueue", "raw-pipelined"))
    for label, mine, theirs in ratios:
        sequential = fmt_ratio(rate(mine, SEQUENTIAL), rate(theirs, SEQUENTIAL))
        concurrent = fmt_ratio(rate(mine, inflight), rate(theirs, inflight))
        print(f"{label:36} {sequential:>10} {'':19}   {concurrent:>14}   per round {per_round(mine, theirs)}")
    raw_desc = (
        "js.publish awaiting its PubAck on a file-storage stream of its own"
        if broker == "nats"
        else "one awaited XADD per message on a pool of connections, as catga does"
    )
    print(f"  raw store (the ratios' baseline): {raw_desc}")
    print(
        f"  consumers: the worker node (another process, CATGA_DURABLE_CONCURRENCY="
        f"{CatgaSettings().durable_concurrency}) runs all along but handles only Echo and DurableEcho:\n"
        "  nothing consumes the published events and enqueued jobs (their rows measure the store alone)"
    )
    print(flush=True)


# -- main ----------------------------------------------------------------------------------------


def start_server(broker: BrokerName) -> ServerProcess:
    if broker == "nats":
        return NatsServer(jetstream=True).start()
    return RedisServer(extra_args=REDIS_PERSISTENCE).start()


if __name__ == "__main__":
    bench_cli(
        "bench_durable",
        __doc__,
        start_server=start_server,
        bench_broker=lambda broker, server, args: bench_broker(
            broker, server, args.seconds, args.runs, args.inflight, args.loop
        ),
        print_table=print_table,
        header=f"hiredis {'on' if HIREDIS_AVAILABLE else 'off'}, ",
    )
