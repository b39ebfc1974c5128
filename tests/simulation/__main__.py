"""Run or replay simulations: ``python -m tests.simulation --seed 123 --steps 2000``.

``--seeds 500`` runs seeds 0..499 (from ``--seed``); ``--trace`` prints every event of one run.
Exits 1 when any run broke an invariant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tests.simulation.run import Options, simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the seed to run (the first one, with --seeds)")
    parser.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds to run")
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument("--keep-going", action="store_true", help="go on after a violation, report them all")
    parser.add_argument("--trace", action="store_true", help="print the trace of every event")
    parser.add_argument("--log", default="CRITICAL", help="log level for fastapi_catga (default: quiet)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log.upper(), format="%(name)s %(levelname)s %(message)s")
    failed = 0
    for seed in range(args.seed, args.seed + args.seeds):
        report = simulate(Options(seed, args.steps, keep_going=args.keep_going))
        if args.trace:
            print("\n".join(report.trace))
        print(report.summary(), flush=True)
        failed += not report.ok
    if args.seeds > 1:
        print(f"{failed} of {args.seeds} seed(s) broke an invariant")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
