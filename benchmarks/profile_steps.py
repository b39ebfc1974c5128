"""Sort py-spy's collapsed stacks (``-f raw``) into the steps of a round trip, in % of the samples.

    python -m benchmarks.profile_steps DIR/caller.txt DIR/responder.txt [--cpu-us 43.1 28.3]

Each sample goes to the first step below whose pattern is in one of its frames; the patterns run
from the innermost work (a socket write, an encode) to the outermost (the event loop), so a step
gets what is not already in a more specific one. Start-up (imports, connecting) is left out.
With ``--cpu-us`` (one figure per file, from ``benchmarks.profile_cluster``) the shares are
turned into µs of CPU per round trip.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

STARTUP = ("<module>", "_find_and_load", "setup (", "wait_ready", "_worker (", "serve_catga", "start (")
STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("socket writes (asyncio transport)", ("_SelectorSocketTransport.write", "writelines")),
    ("build the message (pydantic, id)", ("BaseModel.__init__", "new_message_id")),
    ("encode: envelope, headers, JSON", ("encode_", "pack (", "deadline_header", "envelope (", "frame (",
                                         "dump_json")),
    ("decode: envelope, JSON, validate", ("unpack (", "decode_", "validate_json", "validate_python")),
    ("timers (deadline per call)", ("call_at", "call_later", "timeouts.py", "Timeout.", "TimerHandle")),
    ("reply futures (pending replies)", ("PendingReplies", "create_future")),
    ("broker client: publish", ("Client.publish", "_send_publish", "pub_cmd", "_validate_subject",
                                "_send_command", "Transport._send", "execute_command", "PublishWriter")),
    ("broker client: read, parse", ("_read_loop", "Parser.parse", "_process_msg", "_wait_for_msgs",
                                    "_build_message", "on_msg", "_on_reply", "read_response", "listen")),
    ("handler run (dispatch)", ("run_request", "_run_handler", "echo (", "check (")),
    ("tasks", ("create_task", "Task.")),
    ("routing, retries, bookkeeping", ("Sender.", "Attempts.", "Responder.", "choose_node", "View.",
                                       "Mediator.", "ClusterNode.", "Transport.request", "bench_cluster.py")),
    ("event loop (select, callbacks)", ("select", "_run_once", "Handle._run", "_call_soon", "call_soon")),
)  # fmt: skip


def steps(path: str) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter()
    total = 0
    with open(path) as lines:
        for line in lines:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            # frames[:3] are runpy's and the script's own <module>: every sample has them.
            if any(pattern in frame for frame in frames[3:] for pattern in STARTUP):
                continue
            total += int(n)
            name = next(
                (name for name, patterns in STEPS if any(p in f for f in frames for p in patterns)), "other"
            )
            counts[name] += int(n)
    return counts, total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+")
    parser.add_argument("--cpu-us", type=float, nargs="*", default=[])
    args = parser.parse_args()
    for index, path in enumerate(args.files):
        counts, total = steps(path)
        cpu = args.cpu_us[index] if index < len(args.cpu_us) else None
        print(
            f"== {path}: {total} samples after start-up" + (f", {cpu:g} us CPU per round trip" if cpu else "")
        )
        for name, _ in STEPS + (("other", ()),):
            share = counts[name] / total if total else 0.0
            us = f"{share * cpu:6.1f} us" if cpu else ""
            print(f"  {name:38} {share * 100:5.1f} %  {us}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
