"""CPU per request of a node's responder alone: no broker, no socket, no other process.

    python -m benchmarks.profile_responder [--requests N] [--batch N] [--rounds N]

Builds a node on the memory transport that handles `Echo` (as bench_cluster's responder does),
then hands its responder ``--batch`` requests at a time, as a broker client's reader does with
what one read brought: each is the frame bench_cluster's caller sends (unpacked here, as the
transport does), answered through a reply function that only counts. The event loop turns once
between batches. It prints this process's CPU time per request for each round (user + system,
``time.process_time``), then the median: the Python a cross-node request costs the answering node
on top of its broker client's read and write, measured without the noise of a shared box's
scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from benchmarks._common import DATA, Echo, echo
from fastapi_catga import CatgaSettings, build
from fastapi_catga.core.envelope import Envelope, deadline_header, encode_message, pack, unpack
from fastapi_catga.testing import InMemoryTransport
from fastapi_catga.transports.base import Delivery


async def measure(requests: int, batch: int, rounds: int) -> list[float]:
    catga = build(CatgaSettings(node_id="responder"), handlers=[echo], transport=InMemoryTransport())
    await catga.start()
    try:
        on_request = catga.node.responder._on_request  # what the transport calls per request
        request = encode_message(Echo(data=DATA), source="caller", max_payload=1 << 20)
        request.headers["catga-deadline"] = deadline_header(time.time() + 3600)
        frame = pack(request)
        answered = 0

        async def reply(envelope: Envelope) -> None:
            nonlocal answered
            answered += 1

        per_request: list[float] = []
        for _ in range(rounds + 1):  # the first round warms up
            started, done = time.process_time(), 0
            while done < requests:
                for _ in range(batch):
                    on_request(Delivery(unpack(frame), reply))
                await asyncio.sleep(0)
                done += batch
            await asyncio.sleep(0)
            per_request.append((time.process_time() - started) / done * 1e6)
        if answered != (rounds + 1) * done:
            raise RuntimeError(f"{answered} answers to {(rounds + 1) * done} requests")
        return per_request[1:]
    finally:
        await catga.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30_000, help="requests per round")
    parser.add_argument("--batch", type=int, default=100, help="requests handed over per loop turn")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.requests < 1 or args.batch < 1 or args.rounds < 1:
        parser.error("--requests, --batch and --rounds must be >= 1")
    rounds = asyncio.run(measure(args.requests, args.batch, args.rounds))
    print(
        f"responder alone, Python {sys.version.split()[0]}, batches of {args.batch}: CPU per request (us) "
        f"{' / '.join(f'{r:.1f}' for r in rounds)}; median {statistics.median(rounds):.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
