"""The answering side of the cluster benchmark, one process per responder.

    python -m benchmarks._responder --kind catga|catga-observed|catga-durable|raw|raw-awaited|faststream \
        --broker nats|redis --url URL

Prints ``ready`` once it serves, and serves until SIGTERM (or SIGINT). FastStream runs with
``logger=None`` (no log line per message), as catga runs without its LoggingBehavior.

``catga-observed`` is ``catga`` with tracing and metrics on (`observers`), in a cluster of its own.
``catga-durable`` (for ``bench_durable``) is a catga node handling the plain `Echo` and the durable
`DurableEcho`: its durable worker fetches ``DurableEcho`` commands from the broker's queue. Nothing
handles `DurableJob` or `DurableNoted`: they are only stored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import ClassVar

from pydantic import BaseModel

from benchmarks import _raw
from benchmarks._common import (
    CATGA_CLUSTER,
    CATGA_OBSERVED_CLUSTER,
    FS_REPLY,
    LOOPS,
    RAW_REPLY,
    REPLY_TEXT,
    echo,
    observers,
    run,
)
from fastapi_catga import Command, Durable, Event

FS_SUBJECT = "bench.fs.echo"


class FsEcho(BaseModel):
    """FastStream's request body: the same fields as the catga `Echo` command."""

    message_id: str
    data: str


class DurableEcho(Command[str]):
    """`Echo` made durable: stored on the broker, run by a worker of a node that handles it."""

    type_name = "bench.DurableEcho"
    durable: ClassVar[Durable | bool] = True

    data: str


class DurableJob(Command[str]):
    """A durable command no node handles: ``enqueue`` only stores it."""

    type_name = "bench.DurableJob"
    durable: ClassVar[Durable | bool] = True

    data: str


class DurableNoted(Event):
    """A durable event no node handles: ``publish`` only stores it."""

    type_name = "bench.DurableNoted"
    durable: ClassVar[Durable | bool] = True

    data: str


async def durable_echo(command: DurableEcho) -> str:
    """The durable handler: returns a constant, as `echo` does."""
    return REPLY_TEXT


async def serve_catga(
    stack: AsyncExitStack, broker: str, url: str, *, durable: bool = False, observed: bool = False
) -> None:
    from fastapi_catga import CatgaSettings, build

    cluster = CATGA_OBSERVED_CLUSTER if observed else CATGA_CLUSTER
    if broker == "nats":
        settings = CatgaSettings(transport="nats", nats_url=url, cluster=cluster, node_id=_node_id())
    else:
        settings = CatgaSettings(transport="redis", redis_url=url, cluster=cluster, node_id=_node_id())
    catga = build(
        settings,
        handlers=[echo, durable_echo] if durable else [echo],
        observers=observers() if observed else (),
    )
    await catga.start()
    stack.push_async_callback(catga.stop)


def _node_id() -> str:
    return f"bench-responder-{os.getpid()}"


async def serve_raw_nats(stack: AsyncExitStack, url: str) -> None:
    import nats
    from nats.aio.msg import Msg

    nc = await nats.connect(url)
    stack.push_async_callback(nc.close)

    async def on_request(msg: Msg) -> None:
        await msg.respond(RAW_REPLY)

    await nc.subscribe(_raw.NATS_SUBJECT, cb=on_request)
    await nc.flush()


async def serve_raw_redis(stack: AsyncExitStack, url: str, variant: _raw.RedisVariant) -> None:
    client = _raw.redis_client(url)
    stack.push_async_callback(client.aclose)
    pubsub = client.pubsub()
    await pubsub.subscribe(_raw.REDIS_CHANNELS[variant])
    stack.push_async_callback(pubsub.aclose)
    send: Callable[[bytes, bytes], None]
    if variant == "pipelined":
        batcher = _raw.Batcher(client)
        stack.push_async_callback(batcher.aclose)
        send = batcher.publish
    else:
        # One task per reply, each an awaited PUBLISH on a pooled connection: awaiting it in the
        # read loop instead would allow one reply per Redis round trip.
        tasks: set[asyncio.Task[None]] = set()

        async def publish(channel: bytes, data: bytes) -> None:
            await client.publish(channel, data)

        def send(channel: bytes, data: bytes) -> None:
            task = asyncio.get_running_loop().create_task(publish(channel, data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def answer() -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            reply_channel, corr, _ = message["data"].split(b"|", 2)
            send(reply_channel, corr + b"|" + RAW_REPLY)

    task = asyncio.get_running_loop().create_task(answer())
    stack.callback(task.cancel)


async def serve_faststream(stack: AsyncExitStack, broker: str, url: str) -> None:
    if broker == "nats":
        from faststream.nats import NatsBroker

        nats_broker = NatsBroker(url, logger=None)

        @nats_broker.subscriber(FS_SUBJECT)
        async def nats_echo(body: FsEcho) -> str:
            return FS_REPLY

        await nats_broker.start()
        stack.push_async_callback(nats_broker.stop)
    else:
        from faststream.redis import RedisBroker

        # logger=None works (as for NatsBroker) though RedisBroker's TypedDict does not list None.
        redis_broker = RedisBroker(url, logger=None)  # type: ignore[arg-type]

        @redis_broker.subscriber(FS_SUBJECT)
        async def redis_echo(body: FsEcho) -> str:
            return FS_REPLY

        await redis_broker.start()
        stack.push_async_callback(redis_broker.stop)


async def main(kind: str, broker: str, url: str, eager_tasks: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if eager_tasks:
        # Python 3.12+: a task runs its first step when it is created, and one that ends in it
        # is never scheduled (catga's responder starts a task per request).
        loop.set_task_factory(getattr(asyncio, "eager_task_factory"))  # noqa: B009 (3.12+ only)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        if kind in ("catga", "catga-durable", "catga-observed"):
            await serve_catga(
                stack, broker, url, durable=kind == "catga-durable", observed=kind == "catga-observed"
            )
        elif kind == "faststream":
            await serve_faststream(stack, broker, url)
        elif broker == "nats":
            await serve_raw_nats(stack, url)
        else:
            await serve_raw_redis(stack, url, "awaited" if kind == "raw-awaited" else "pipelined")
        print("ready", flush=True)
        # Nobody reads stdout after "ready": anything printed later goes to stderr (the log file)
        # instead of filling the pipe and blocking this process.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        await stop.wait()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--kind",
        choices=("catga", "catga-observed", "catga-durable", "raw", "raw-awaited", "faststream"),
        required=True,
    )
    parser.add_argument("--broker", choices=("nats", "redis"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--eager-tasks", action="store_true", help="asyncio.eager_task_factory (3.12+)")
    args = parser.parse_args(argv)
    if args.eager_tasks and sys.version_info < (3, 12):
        parser.error("--eager-tasks needs Python 3.12 or later")
    return args


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    run(main(args.kind, args.broker, args.url, args.eager_tasks), args.loop)
