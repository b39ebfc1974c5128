"""In-process ``mediator.send`` on one node (memory transport) vs calling the handler directly.

    python -m benchmarks.bench_inprocess [--seconds N] [--runs N] [--loop asyncio|uvloop] [--each]

Every variant runs the same handler over the same pre-built messages (all distinct, so the
idempotency behavior never answers from its cache), in interleaved runs; the median run is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from benchmarks._common import DATA, LOOPS, REPLY_TEXT, Echo, echo, fmt_rate, fmt_ratio, observers, run
from fastapi_catga import (
    Catga,
    CatgaSettings,
    IdempotencyBehavior,
    LoggingBehavior,
    PipelineBehavior,
    RetryBehavior,
    TimeoutBehavior,
    build,
)
from fastapi_catga.core.idempotency import DoneRecords
from fastapi_catga.core.observe import Observer
from fastapi_catga.testing import InMemoryTransport

Send = Callable[[Echo], Awaitable[str]]
MESSAGES = 100_000  # more than IdempotencyBehavior remembers (10,000): a repeat is never a hit
CHUNK = 1_000  # calls between two looks at the clock (and two turns of the event loop)
GOAL = 0.2  # DESIGN.md; issue 12 asked for 0.40 (see benchmarks/README.md for why it is not in reach)


@dataclass
class Variant:
    label: str
    send: Send
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return sorted(self.rates)[len(self.rates) // 2]


async def timed(send: Send, messages: Sequence[Echo], seconds: float) -> float:
    """Calls per second of ``await send(message)`` over ``messages``, round and round, for ``seconds``."""
    chunks = itertools.cycle(range(0, len(messages), CHUNK))
    calls = 0
    started = time.perf_counter()
    stop = started + seconds
    while True:
        start = next(chunks)
        for message in messages[start : start + CHUNK]:
            await send(message)
        calls += CHUNK
        # Let the loop turn, as it does between requests in an app: it also clears the timer heap
        # of the cancelled timeouts that TimeoutBehavior leaves (without it the heap only grows).
        await asyncio.sleep(0)
        now = time.perf_counter()
        if now >= stop:
            return calls / (now - started)


class ProcessIdempotency(IdempotencyBehavior):
    """`IdempotencyBehavior` that keeps its ids in this process only: not shared with the cluster's
    done records (three store operations per new id: lookup, claim, commit)."""

    def share(self, records: DoneRecords, holder: str) -> None:
        pass


def builtin_behaviors(idempotency: IdempotencyBehavior | None = None) -> list[PipelineBehavior]:
    idempotency = idempotency or IdempotencyBehavior()
    return [LoggingBehavior(), idempotency, RetryBehavior(), TimeoutBehavior(5.0)]


async def start_node(behaviors: Sequence[PipelineBehavior], watchers: Sequence[Observer] = ()) -> Catga:
    catga = build(
        CatgaSettings(),
        handlers=[echo],
        behaviors=behaviors,
        transport=InMemoryTransport(),
        observers=watchers,
    )
    await catga.start()
    return catga


async def main(args: argparse.Namespace) -> int:
    print(
        f"bench_inprocess: Python {platform.python_version()}, {args.loop} loop, {os.cpu_count()} CPUs, "
        f"loadavg {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    messages = [Echo(data=DATA) for _ in range(MESSAGES)]
    plain = await start_node([])
    full = await start_node(builtin_behaviors())
    process = await start_node(builtin_behaviors(ProcessIdempotency()))
    watched = await start_node([], observers())
    alone: list[tuple[str, Catga]] = []
    if args.each:  # each built-in behavior on a node of its own
        for label, behavior in (
            ("  LoggingBehavior alone", LoggingBehavior()),
            ("  IdempotencyBehavior alone", IdempotencyBehavior()),
            ("  the same, ids in this process only", ProcessIdempotency()),
            ("  RetryBehavior alone", RetryBehavior()),
            ("  TimeoutBehavior(5 s) alone", TimeoutBehavior(5.0)),
        ):
            alone.append((label, await start_node([behavior])))
    try:
        for catga in (plain, full, process, watched):
            if await catga.mediator.send(messages[0]) != REPLY_TEXT:
                raise RuntimeError("send did not return the handler's result")
        variants = [
            Variant("direct: await handler(message)", echo),
            Variant("mediator.send, no behaviors", plain.mediator.send),
            Variant("mediator.send, 4 built-in behaviors", full.mediator.send),
            Variant("  the same, ids in this process only", process.mediator.send),
            Variant("mediator.send, tracing + metrics on", watched.mediator.send),
            *(Variant(label, catga.mediator.send) for label, catga in alone),
        ]
        for variant in variants:  # warm-up
            await timed(variant.send, messages, min(0.5, args.seconds))
        for round_no in range(1, args.runs + 1):
            for variant in variants:
                variant.rates.append(await timed(variant.send, messages, args.seconds))
            print(f"  round {round_no}/{args.runs} done", flush=True)
    finally:
        await plain.stop()
        await full.stop()
        await process.stop()
        await watched.stop()
        for _, catga in alone:
            await catga.stop()

    direct = variants[0].median
    print()
    print(
        f"== in-process send, memory transport, one node: median of {args.runs} runs x {args.seconds:g} s =="
    )
    print(f"{'':40} {'calls/s':>12} {'us/call':>8} {'vs direct':>10}   runs (calls/s)")
    for variant in variants:
        runs = " / ".join(fmt_rate(rate) for rate in variant.rates)
        print(
            f"{variant.label:40} {fmt_rate(variant.median):>12} {1e6 / variant.median:8.2f} "
            f"{fmt_ratio(variant.median, direct):>10}   {runs}"
        )
    ratio = variants[1].median / direct
    print(
        f"goal: no-behavior send >= {GOAL:g} x direct: {'met' if ratio >= GOAL else 'MISSED'} ({ratio:.2f})"
    )
    print(
        "behaviors, outermost first: LoggingBehavior (DEBUG, not enabled), IdempotencyBehavior, "
        "RetryBehavior(3), TimeoutBehavior(5 s) (IdempotencyBehavior keeps its results in the cluster's done "
        "records, on the memory transport here, unless 'in this process only'); "
        "tracing + metrics: TracingObserver (SDK provider, "
        "no exporter) and PrometheusObserver, no behaviors"
    )
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant; the median is shown")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="event loop")
    parser.add_argument("--each", action="store_true", help="also a row per built-in behavior, alone")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.runs < 1:
        parser.error("--seconds must be > 0 and --runs >= 1")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parsed = parse_args(sys.argv[1:])
    sys.exit(run(main(parsed), parsed.loop))
