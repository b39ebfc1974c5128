"""CPU per cross-node round trip, caller and responder apart, and (with py-spy) where it goes.

    python -m benchmarks.profile_cluster [--broker nats|redis] [--kind catga|raw] [--seconds N]
        [--inflight N] [--loop asyncio|uvloop] [--spy DIR] [--eager-tasks]

Starts a fresh server, one responder process (``benchmarks._responder``) and the caller in this
process, as bench_cluster does, warms up, then runs ``--inflight`` concurrent loops for
``--seconds`` and prints the CPU time each process spent per round trip (µs): this process (the
caller), the responder, and the broker. These are sums of user + system time from the kernel, so
they hold on a busy box, where round trips per second do not.

With ``--spy DIR`` the responder runs under ``py-spy record`` (raw, collapsed stacks in
DIR/responder.txt). To sample the caller too, run this script itself under py-spy:

    py-spy record -r 250 -f raw -o DIR/caller.txt -- \\
        .venv/bin/python -m benchmarks.profile_cluster --spy DIR
    .venv/bin/python -m benchmarks.profile_steps DIR/caller.txt DIR/responder.txt

py-spy is a profiling tool, not a dependency: ``.venv/bin/pip install py-spy``. (It cannot attach
to a running process on every box; started as the parent, it always can.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

from benchmarks._common import LOOPS, REPO_ROOT, kill_all_responders, loadavg, run, run_concurrent
from benchmarks.bench_cluster import BrokerName, Call, catga_setup, raw_nats_setup, raw_redis_setup
from tests.servers import NatsServer, RedisServer, ServerProcess

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children that were waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime are fields 14 and 15 of stat(5): 11 and 12 once "pid (comm)" is cut off.
    return (int(fields[11]) + int(fields[12])) / _TICK


def python_pid(pid: int) -> int:
    """The python process: ``pid`` itself, or its child when ``pid`` is py-spy."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if not comm.startswith("py-spy"):
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("py-spy did not start the responder")


async def profile(args: argparse.Namespace, server: ServerProcess) -> None:
    broker: BrokerName = args.broker
    command = [sys.executable, "-m", "benchmarks._responder", "--broker", broker, "--url", server.url]
    command += ["--loop", args.loop, "--kind", "catga" if args.kind == "catga" else "raw"]
    if args.eager_tasks:
        command.append("--eager-tasks")
    if args.spy is not None:
        out = Path(args.spy) / "responder.txt"
        command = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "-r",
            str(args.rate),
            "-f",
            "raw",
            "-o",
            str(out),
            "--",
            *command,
        ]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    responder = proc.pid
    try:
        assert proc.stdout is not None
        while (
            line := await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        ) != b"ready\n":
            if not line:
                raise RuntimeError("the responder exited before it got ready")
        responder = python_pid(proc.pid)
        async with AsyncExitStack() as stack:
            if args.kind == "catga":
                setup = catga_setup(broker, server.url)
            elif broker == "nats":
                setup = raw_nats_setup(server.url)
            else:
                setup = raw_redis_setup(server.url, "pipelined")
            call: Call = await setup(stack)
            await run_concurrent(call, 1.0, args.inflight)  # warm-up
            marks = (time.process_time(), cpu_seconds(responder), cpu_seconds(server.pid))
            sample = await run_concurrent(call, args.seconds, args.inflight)
            after = (time.process_time(), cpu_seconds(responder), cpu_seconds(server.pid))
    finally:
        # The responder first (py-spy then writes its stacks and exits), then what is left.
        with contextlib.suppress(ProcessLookupError):
            os.kill(responder, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    per_rt = [(b - a) / sample.count * 1e6 for a, b in zip(marks, after, strict=True)]
    print(
        f"{args.kind} over {broker}, {args.loop} loop, {args.inflight} in flight, {args.seconds:g} s: "
        f"{sample.count:,} round trips, {sample.rate:,.0f}/s; loadavg {loadavg()}"
    )
    print("CPU per round trip (us):  caller {:.1f}   responder {:.1f}   broker {:.1f}".format(*per_rt))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", choices=("nats", "redis"), default="nats")
    parser.add_argument("--kind", choices=("catga", "raw"), default="catga")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--spy", metavar="DIR", help="run the responder under py-spy, stacks in DIR")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--eager-tasks", action="store_true", help="the responder on asyncio.eager_task_factory (3.12+)"
    )
    args = parser.parse_args()
    if args.spy is not None:
        Path(args.spy).mkdir(parents=True, exist_ok=True)
    server: ServerProcess = NatsServer(jetstream=True) if args.broker == "nats" else RedisServer()
    server.start()
    try:
        run(profile(args, server), args.loop)
    finally:
        kill_all_responders()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
