"""End to end: the example app's ``POST /orders`` over HTTP on 2 nodes vs the same route on raw nats-py.

    python -m benchmarks.bench_http [--seconds N] [--runs N] [--connections N] [--loop asyncio|uvloop]

Starts a nats-server (``tests.servers``), then two uvicorn processes per contender, each a node:

- catga: ``example_app.main:app`` (``CATGA_TRANSPORT=nats``): the route does ``mediator.send(PlaceOrder)``,
  routed by order id to one of the two nodes, then ``mediator.publish(OrderPlaced)`` to both;
- raw:   ``benchmarks._http_raw:app``, the same route with ``nc.request`` to a queue group both
  processes join, then ``nc.publish`` of the event to both.

The load comes from ``wrk`` in its own process (Debian: ``apt-get install wrk``), ``--connections``
keep-alive connections to the first node, the same body every time (``{"sku": ..., "quantity": 1}``:
each order gets a fresh id). Runs are interleaved (raw, catga, raw, catga, ...); the median run is
shown with its p50/p99 latency and the median CPU time the two nodes spent per request (user + system,
from the kernel: the figure that holds on a shared box), and the ratios catga / raw. Every process
started is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks._common import LOOPS, REPO_ROOT, fmt_rate, fmt_ratio, loadavg
from benchmarks.profile_cluster import cpu_seconds
from tests.servers import NatsServer

BODY = '{"sku": "sku-1", "quantity": 1}'
WRK_SCRIPT = f'wrk.method = "POST"\nwrk.body = \'{BODY}\'\nwrk.headers["Content-Type"] = "application/json"\n'


@dataclass
class Run:
    rate: float
    p50_us: float
    p99_us: float
    errors: int
    cpu_us: float = 0.0  # the nodes' CPU time (user + system, all of them) per request


@dataclass
class Contender:
    key: str
    label: str
    app: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    def median(self) -> Run:
        return sorted(self.runs, key=lambda r: r.rate)[len(self.runs) // 2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(contender: Contender, loop: str, nodes: int = 2) -> None:
    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    for index in range(nodes):
        port = free_port()
        env = {**os.environ, **contender.env, "CATGA_NODE_ID": f"http-{contender.key}-{index}"}
        command = [uvicorn, contender.app, "--port", str(port), "--loop", loop]
        command += ["--log-level", "warning", "--no-access-log"]
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        contender.procs.append(proc)
        contender.ports.append(port)


def wait_ready(contender: Contender, timeout: float = 30.0) -> None:
    """Every node answers ``POST /orders`` with 201; catga's nodes also see each other."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        for port in contender.ports:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    ok = client.post(f"http://127.0.0.1:{port}/orders", content=BODY, headers=_JSON)
                    nodes = len(contender.ports)
                    if ok.status_code == 201 and (
                        contender.key != "catga"
                        or len(client.get(f"http://127.0.0.1:{port}/catga/nodes").json()) == nodes
                    ):
                        break
                if time.monotonic() > deadline or any(p.poll() is not None for p in contender.procs):
                    raise RuntimeError(f"{contender.label}: the app on port {port} did not get ready")
                time.sleep(0.2)


_JSON = {"Content-Type": "application/json"}
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def wrk(port: int, seconds: float, connections: int, script: str) -> Run:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", script]
    out = subprocess.run(
        [*command, f"http://127.0.0.1:{port}/orders"], capture_output=True, text=True, check=True
    ).stdout

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)$", out, re.M)
        if match is None:
            raise RuntimeError(f"no {percent}% latency in wrk's output:\n{out}")
        return float(match[1]) * _UNITS[match[2]]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rate is None:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    return Run(float(rate[1]), latency("50"), latency("99"), int(errors[1]) if errors else 0)


def measure(contender: Contender, seconds: float, connections: int, script: str) -> Run:
    """A wrk run, with the CPU time the contender's nodes spent per request (from the kernel: it
    holds on a shared box, where requests per second do not)."""
    before = sum(cpu_seconds(proc.pid) for proc in contender.procs)
    run = wrk(contender.ports[0], seconds, connections, script)
    after = sum(cpu_seconds(proc.pid) for proc in contender.procs)
    run.cpu_us = (after - before) / max(1.0, run.rate * seconds) * 1e6
    return run


def stop(contender: Contender) -> None:
    for proc in contender.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in contender.procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one timed run (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per contender; the median is shown")
    parser.add_argument(
        "--connections", type=int, default=50, help="wrk's keep-alive connections (default 50)"
    )
    parser.add_argument(
        "--loop", choices=LOOPS, default="uvloop", help="uvicorn's event loop (default uvloop)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("needs wrk on PATH (Debian: apt-get install wrk)")
    if args.seconds <= 0 or args.runs < 1 or args.connections < 1:
        parser.error("--seconds must be > 0, --runs and --connections >= 1")
    print(
        f"bench_http: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, loadavg {loadavg()}", flush=True
    )
    server = NatsServer(jetstream=True).start()
    contenders = [
        Contender(
            "raw", "raw nats-py request + publish", "benchmarks._http_raw:app", {"BENCH_NATS_URL": server.url}
        ),
        Contender(
            "catga",
            "catga mediator.send + publish",
            "example_app.main:app",
            {"CATGA_TRANSPORT": "nats", "CATGA_NATS_URL": server.url, "CATGA_CLUSTER": "bench-http"},
        ),
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        for contender in contenders:
            start(contender, args.loop)
        for contender in contenders:
            wait_ready(contender)
            wrk(contender.ports[0], min(1.0, args.seconds), args.connections, script.name)  # warm-up
        for round_no in range(1, args.runs + 1):
            for contender in contenders:
                contender.runs.append(measure(contender, args.seconds, args.connections, script.name))
            print(f"  round {round_no}/{args.runs} done", flush=True)
    finally:
        for contender in contenders:
            stop(contender)
        server.close()
        os.unlink(script.name)
    print_table(contenders, args)
    return 0


def print_table(contenders: list[Contender], args: argparse.Namespace) -> None:
    raw, catga = contenders
    print()
    print(
        f"== POST /orders over HTTP, 2 uvicorn nodes each ({args.loop}), nats-server, "
        f"wrk -c{args.connections}: median of {args.runs} runs x {args.seconds:g} s =="
    )
    print(f"{'':34} {'req/s':>10} {'p50 us':>9} {'p99 us':>9} {'errors':>7} {'CPU us':>7}   runs (req/s)")
    for contender in contenders:
        run = contender.median()
        runs = " / ".join(fmt_rate(r.rate) for r in contender.runs)
        errors = sum(r.errors for r in contender.runs)
        latency = f"{run.p50_us:9,.0f} {run.p99_us:9,.0f}"
        cpu = sorted(r.cpu_us for r in contender.runs)[len(contender.runs) // 2]
        print(f"{contender.label:34} {fmt_rate(run.rate):>10} {latency} {errors:7} {cpu:7,.0f}   {runs}")
    per_round = " / ".join(fmt_ratio(c.rate, r.rate) for c, r in zip(catga.runs, raw.runs, strict=True))
    print(
        f"{'catga / raw':34} {fmt_ratio(catga.median().rate, raw.median().rate):>10}   per round {per_round}"
    )
    cpu_ratios = " / ".join(fmt_ratio(r.cpu_us, c.cpu_us) for c, r in zip(catga.runs, raw.runs, strict=True))
    print(f"{'raw CPU / catga CPU per request':34} {'':>10}   per round {cpu_ratios}")
    print(f"  loadavg at the end {loadavg()}")


if __name__ == "__main__":
    sys.exit(main())
