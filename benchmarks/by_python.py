"""The headline ratios on each supported Python, in one table.

    python -m benchmarks.by_python [--versions 3.11 3.12 3.13] [--seconds N] [--runs N] [--loop L]

Runs ``bench_cluster --broker all`` and ``bench_inprocess`` with each version's venv (``.venv``
for the one it runs on, ``.venv-3.X`` for the others: ``scripts/pythons`` makes them), one version
after the other, keeps their whole output in ``benchmarks/by_python/<version>.txt`` and prints the
ratios side by side: catga / raw at 1 and 100 in flight on NATS and on Redis, catga / FastStream at
100 in flight, and the in-process send against a direct call.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from pathlib import Path

from benchmarks._common import LOOPS, REPO_ROOT

OUT = REPO_ROOT / "benchmarks" / "by_python"
RATIO = r"(\d+\.\d+|-)"


def venv_python(version: str) -> Path:
    own = ".".join(platform.python_version_tuple()[:2])
    path = REPO_ROOT / (".venv" if version == own else f".venv-{version}") / "bin" / "python"
    if not path.exists():
        raise SystemExit(
            f"no venv for Python {version} at {path.parent.parent}: run scripts/pythons {version}"
        )
    return path


def run(python: Path, args: list[str]) -> str:
    done = subprocess.run(
        [str(python), "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(args)} failed on {python}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def ratios(cluster: str, inprocess: str) -> dict[str, str]:
    """The headline figures out of the two scripts' printed tables."""
    found: dict[str, str] = {}
    for broker, section in re.findall(r"^== (NATS|REDIS)[^\n]*\n(.*?)(?=^== |\Z)", cluster, re.M | re.S):
        raw = re.search(rf"^catga / raw\s+{RATIO}\s+{RATIO}", section, re.M)
        fs = re.search(rf"^catga / FastStream\s+{RATIO}\s+{RATIO}", section, re.M)
        name = broker.capitalize() if broker == "REDIS" else broker
        if raw:
            found[f"{name} 1 in flight / raw"], found[f"{name} 100 in flight / raw"] = raw.groups()
        if fs:
            found[f"{name} 100 in flight / FastStream"] = fs.group(2)
    for label, key in (
        ("mediator.send, no behaviors", "in-process send / direct"),
        ("mediator.send, 4 built-in behaviors", "in-process, 4 behaviors (calls/s)"),
    ):
        row = re.search(rf"^{re.escape(label)}\s+([\d,]+)\s+[\d.]+\s+{RATIO}", inprocess, re.M)
        if row:
            found[key] = row.group(2) if "direct" in key else row.group(1)
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", nargs="+", default=["3.11", "3.12", "3.13"])
    parser.add_argument("--seconds", default="2")
    parser.add_argument("--runs", default="3")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    args = parser.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    timing = ["--seconds", args.seconds, "--runs", args.runs, "--loop", args.loop]
    table: dict[str, dict[str, str]] = {}
    for version in args.versions:
        python = venv_python(version)
        version_of = [str(python), "-c", "import platform; print(platform.python_version())"]
        exact = subprocess.run(version_of, capture_output=True, text=True, check=True).stdout.strip()
        print(f"== Python {exact}: bench_cluster --broker all, then bench_inprocess", flush=True)
        cluster = run(python, ["benchmarks.bench_cluster", "--broker", "all", *timing])
        inprocess = run(python, ["benchmarks.bench_inprocess", *timing])
        (OUT / f"{exact}.txt").write_text(cluster + "\n" + inprocess)
        table[exact] = ratios(cluster, inprocess)
    rows = list(dict.fromkeys(key for found in table.values() for key in found))
    print()
    print(f"== ratios by Python ({args.loop} loop, median of {args.runs} runs x {args.seconds} s) ==")
    print(f"{'':40}" + "".join(f"{version:>12}" for version in table))
    for row in rows:
        print(f"{row:40}" + "".join(f"{table[version].get(row, '-'):>12}" for version in table))
    print(f"whole outputs in {OUT.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
