"""CPU instructions per in-process ``mediator.send``, counted by valgrind: the same on a busy box.

    python -m benchmarks.instructions [--calls N] [VARIANT ...]

Wall-clock rates on a shared 2-core box move by a factor of two from run to run; the number of
instructions a call executes does not. Each variant runs under ``valgrind --tool=callgrind``
(Debian: ``apt-get install valgrind``) twice, with N and 2N calls over all-distinct messages (2N
made in both runs), and the difference is what N calls cost. Printed: instructions per call, and
direct / variant, which is the calls-per-second ratio ``bench_inprocess`` prints when a CPU runs
every instruction at the same pace (no cache misses, no frequency change).
About a minute per variant (two run at once).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from benchmarks._common import DATA, REPO_ROOT, Echo, echo
from benchmarks.bench_inprocess import ProcessIdempotency, builtin_behaviors, start_node
from fastapi_catga import (
    IdempotencyBehavior,
    LoggingBehavior,
    PipelineBehavior,
    RetryBehavior,
    TimeoutBehavior,
)

VARIANTS: dict[str, str] = {
    "direct": "await echo(message), the handler called directly",
    "send": "mediator.send, no behaviors",
    "4-behaviors": "mediator.send, 4 built-in behaviors (idempotency shared: build()'s default)",
    "4-behaviors-process": "the same, ids in this process only",
    "logging": "mediator.send + LoggingBehavior",
    "idempotency-process": "mediator.send + IdempotencyBehavior, ids in this process",
    "retry": "mediator.send + RetryBehavior",
    "timeout": "mediator.send + TimeoutBehavior(5 s)",
}


def behaviors_of(variant: str) -> list[PipelineBehavior]:
    chosen: dict[str, list[PipelineBehavior]] = {
        "send": [],
        "4-behaviors": builtin_behaviors(IdempotencyBehavior()),
        "4-behaviors-process": builtin_behaviors(ProcessIdempotency()),
        "logging": [LoggingBehavior()],
        "idempotency-process": [ProcessIdempotency()],
        "retry": [RetryBehavior()],
        "timeout": [TimeoutBehavior(5.0)],
    }
    return chosen[variant]


async def calls(variant: str, count: int, pool: int) -> None:
    """The measured run (in the valgrind child): ``count`` calls of ``variant``, over the first of
    ``pool`` messages (the same number made in both runs, so making them cancels out)."""
    messages = [Echo(data=DATA) for _ in range(pool)][:count]
    if variant == "direct":
        for message in messages:
            await echo(message)
        return
    catga = await start_node(behaviors_of(variant))
    try:
        send = catga.mediator.send
        for message in messages:
            await send(message)
    finally:
        await catga.stop()


def callgrind(args: list[str], what: str) -> int:
    """Instructions ``python -m <args>`` executed in all, counted by callgrind (a fixed hash seed:
    the same dict probes in every run)."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m", *args]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of {what} failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def per_unit(count: int, instructions: Callable[[int], int]) -> float:
    """Instructions per unit of work: runs of ``count`` and ``2 * count`` units, at once, and their
    difference (start-up and set-up cancel out)."""
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(instructions, (count, 2 * count))
    return (large - small) / count


def per_call(variant: str, count: int) -> float:
    """Instructions per call of ``variant``, message creation and start-up taken out."""
    args = ["benchmarks.instructions", "--child", variant, "--pool", str(2 * count), "--calls"]
    return per_unit(count, lambda n: callgrind([*args, str(n)], variant))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", choices=[[], *VARIANTS], help="default: all")
    parser.add_argument("--calls", type=int, default=10_000, help="N (default 10,000)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(calls(args.child, args.calls, args.pool or args.calls))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is missing (Debian: apt-get install valgrind)")
    print(
        f"instructions: Python {platform.python_version()}, {args.calls:,} and {2 * args.calls:,} calls each"
    )
    direct = per_call("direct", args.calls)
    print(f"{'':62} {'instr/call':>10} {'direct / it':>11}")
    print(f"{VARIANTS['direct']:62} {direct:10,.0f} {1.0:11.2f}", flush=True)
    for variant in args.variants or [v for v in VARIANTS if v != "direct"]:
        cost = per_call(variant, args.calls)
        print(f"{VARIANTS[variant]:62} {cost:10,.0f} {direct / cost:11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
