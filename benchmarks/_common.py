"""Shared pieces: the benchmark message, the timing loops, event loops and responder processes."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi_catga import Command
from fastapi_catga.core.observe import Observer

__all__ = [
    "CATGA_CLUSTER",
    "CATGA_OBSERVED_CLUSTER",
    "DATA",
    "FS_REPLY",
    "LOOPS",
    "RAW_REPLY",
    "REPLY_TEXT",
    "REPO_ROOT",
    "Echo",
    "LoopName",
    "Responder",
    "Sample",
    "echo",
    "fmt_rate",
    "bench_cli",
    "fmt_ratio",
    "kill_all_responders",
    "loadavg",
    "median_sample",
    "observers",
    "payload_size",
    "run",
    "run_concurrent",
    "run_sequential",
]

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
LoopName = Literal["asyncio", "uvloop"]
LOOPS: tuple[LoopName, ...] = ("asyncio", "uvloop")

CATGA_CLUSTER = "bench"
CATGA_OBSERVED_CLUSTER = "bench-observed"  # its own cluster: plain callers never reach observed nodes
DATA = "d" * 40  # the command's one field; every client sends a body of the same size
REPLY_TEXT = "r" * 14  # catga's reply body is its JSON: '"rrrrrrrrrrrrrr"', 16 bytes
RAW_REPLY = b"r" * 16  # the raw responders echo 16 bytes
FS_REPLY = "r" * 16  # FastStream sends a str reply as its UTF-8 bytes: 16 bytes


def observers() -> list[Observer]:
    """Tracing (an SDK tracer provider that records every span, exporting none) and metrics."""
    from opentelemetry.sdk.trace import TracerProvider

    from fastapi_catga.otel import TracingObserver
    from fastapi_catga.prometheus import PrometheusObserver

    return [TracingObserver(TracerProvider()), PrometheusObserver()]


class Echo(Command[str]):
    """The small command every cross-node send carries."""

    type_name = "bench.Echo"

    data: str


async def echo(command: Echo) -> str:
    """The handler: returns a constant, so only the messaging is measured."""
    return REPLY_TEXT


def payload_size() -> int:
    """Bytes of catga's request body (the JSON of an `Echo`); the raw clients send as many."""
    return len(Echo(data=DATA).model_dump_json())


# -- timing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run: round trips per second and, for sequential runs, latency percentiles."""

    rate: float
    count: int
    p50_us: float | None = None
    p99_us: float | None = None


async def run_sequential(call: Callable[[], Awaitable[object]], seconds: float) -> Sample:
    """Call ``call`` one at a time for ``seconds``; rt/s and p50/p99 latency."""
    clock = time.perf_counter_ns
    latencies: list[int] = []
    started = clock()
    stop = started + int(seconds * 1e9)
    now = started
    while now < stop:
        before = clock()
        await call()
        now = clock()
        latencies.append(now - before)
    elapsed = (now - started) / 1e9
    latencies.sort()
    n = len(latencies)
    return Sample(n / elapsed, n, latencies[n // 2] / 1e3, latencies[min(n - 1, int(n * 0.99))] / 1e3)


async def run_concurrent(call: Callable[[], Awaitable[object]], seconds: float, inflight: int) -> Sample:
    """``inflight`` loops, each calling ``call`` one after another, for ``seconds``; total rt/s and
    the p50/p99 latency of all their calls."""
    clock = time.perf_counter_ns
    latencies: list[int] = []
    stop = clock() + int(seconds * 1e9)

    async def loop() -> None:
        now = clock()
        while now < stop:
            before = now
            await call()
            now = clock()
            latencies.append(now - before)

    started = clock()
    await asyncio.gather(*(loop() for _ in range(inflight)))
    elapsed = (clock() - started) / 1e9
    latencies.sort()
    n = len(latencies)
    if n == 0:
        return Sample(0.0, 0)
    return Sample(n / elapsed, n, latencies[n // 2] / 1e3, latencies[min(n - 1, int(n * 0.99))] / 1e3)


def median_sample(samples: Sequence[Sample]) -> Sample:
    """The run with the median rate (its latencies come with it)."""
    ordered = sorted(samples, key=lambda s: s.rate)
    return ordered[len(ordered) // 2]


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}"


# -- event loops --------------------------------------------------------------------------------


def run(main: Coroutine[Any, Any, T], loop: LoopName = "asyncio") -> T:
    """``asyncio.run`` on the named event loop (uvicorn[standard] runs apps on uvloop)."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    with asyncio.Runner() as runner:
        return runner.run(main)


# -- responder processes ------------------------------------------------------------------------

_started: dict[int, subprocess.Popen[bytes]] = {}


class Responder:
    """One ``python -m benchmarks._responder`` process; ready once it printed ``ready``.

    Its stderr goes to a temporary log whose tail is shown when it fails to start.
    """

    def __init__(self, *args: str) -> None:
        self.args = list(args)
        self.log_path = Path(tempfile.mkstemp(prefix="catga-bench-responder-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        return " ".join(self.args)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks._responder", *self.args],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        _started[self.proc.pid] = self.proc

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the ``ready`` line. Raises RuntimeError with the log tail when it never comes."""
        proc = self.proc
        if proc is None or proc.stdout is None:
            raise RuntimeError("start() the responder first")
        stdout = proc.stdout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await loop.run_in_executor(None, stdout.readline)
                    if line.strip() == b"ready":
                        return
                    if not line:  # EOF: the process exited
                        break
        except TimeoutError:
            pass
        tail = self.log_tail()  # before stop(), which deletes the log
        self.stop()
        raise RuntimeError(f"responder `{self.label}` did not get ready (exit code {proc.poll()}):\n{tail}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.strip().splitlines()[-lines:]) or "<empty log>"

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM (the catga node deregisters), then SIGKILL after ``grace`` seconds."""
        proc = self.proc
        if proc is None:
            return
        _stop(proc, grace)
        _started.pop(proc.pid, None)
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: it and anything it started
            proc.wait()


def kill_all_responders() -> None:
    """Safety net: kill every responder process still running (by the pids started here)."""
    for proc in list(_started.values()):
        with contextlib.suppress(Exception):
            _stop(proc, 1.0)
    _started.clear()


# -- the command line every cross-node benchmark shares ----------------------------------------------

BrokerName = Literal["nats", "redis"]
#: How one broker is measured, ``(broker, server, args) -> entries``, and how its table is printed.
BenchBroker = Callable[[BrokerName, Any, argparse.Namespace], Awaitable[Any]]
PrintTable = Callable[[BrokerName, Any, Any, argparse.Namespace], None]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: a busy box makes every ratio noisier."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_cli(
    name: str,
    doc: str | None,
    *,
    start_server: Callable[[BrokerName], Any],
    bench_broker: BenchBroker,
    print_table: PrintTable,
    header: str = "",
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    finish: Callable[[dict[BrokerName, Any], argparse.Namespace], None] | None = None,
) -> None:
    """Parse ``--broker/--seconds/--runs/--inflight/--loop`` (and what ``options`` adds), measure
    each broker on a server of its own, print its table, and stop every server and responder, on
    Ctrl-C and SIGTERM too; then ``finish`` gets every broker's entries."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if options is not None:
        options(parser)
    parser.add_argument("--broker", choices=("nats", "redis", "all"), default="all")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed run (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement; the median is shown")
    parser.add_argument("--inflight", type=int, default=100, help="calls in flight for the concurrent column")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="event loop, here and in responders")
    args = parser.parse_args()
    if args.seconds <= 0 or args.runs < 1 or args.inflight < 2:
        parser.error("--seconds must be > 0, --runs >= 1, --inflight >= 2")

    async def main() -> int:
        brokers: list[BrokerName] = ["nats", "redis"] if args.broker == "all" else [args.broker]
        results: dict[BrokerName, Any] = {}
        print(
            f"{name}: Python {platform.python_version()}, {os.cpu_count()} CPUs, {header}loadavg {loadavg()}",
            flush=True,
        )
        for broker in brokers:
            server = start_server(broker)
            try:
                print(f"{broker}: server on {server.url} (pid {server.pid}); measuring...", flush=True)
                started = time.perf_counter()
                entries = await bench_broker(broker, server, args)
                print(f"  {broker} took {time.perf_counter() - started:.0f} s; loadavg now {loadavg()}")
                print_table(broker, server, entries, args)
                results[broker] = entries
            finally:
                kill_all_responders()
                server.close()
        if finish is not None:
            finish(results, args)
        return 0

    atexit.register(kill_all_responders)  # a safety net; main() stops what it started itself
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        sys.exit(run(main(), args.loop))
    except KeyboardInterrupt:
        print("interrupted: the servers and responder processes started here are stopped", file=sys.stderr)
        sys.exit(130)
