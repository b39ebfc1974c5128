"""bench_cluster's ``--plot``: throughput and p50/p99 latency vs calls in flight, one PNG.

matplotlib is a benchmark-only dependency (in the dev extra); it is imported only here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from benchmarks._common import Sample

__all__ = ["PLOT_LEVELS", "Curve", "write_plot"]

#: Calls in flight that ``--plot`` measures.
PLOT_LEVELS = (1, 10, 100, 500)


class Curve(Protocol):
    """One contender of one broker: its label and its median sample per number in flight."""

    label: str

    def median(self, inflight: int) -> Sample | None: ...


def write_plot(path: Path, curves: Mapping[str, Sequence[Curve]], title: str) -> None:
    """One row per broker: round trips/s, p50 and p99 latency (log scales) against calls in flight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    brokers = list(curves)
    fig, axes = plt.subplots(len(brokers), 3, figsize=(15, 4.2 * len(brokers)), squeeze=False)
    for row, broker in enumerate(brokers):
        for curve in curves[broker]:
            points = [(n, s) for n in PLOT_LEVELS if (s := curve.median(n)) is not None]
            if not points:
                continue
            levels = [n for n, _ in points]
            columns = (
                [s.rate for _, s in points],
                [s.p50_us / 1e3 if s.p50_us else None for _, s in points],
                [s.p99_us / 1e3 if s.p99_us else None for _, s in points],
            )
            color, style = _look(curve.label)
            for ax, values in zip(axes[row], columns, strict=True):
                ax.plot(levels, values, marker="o", color=color, linestyle=style, label=curve.label)
        names = ("round trips / s", "p50 latency (ms)", "p99 latency (ms)")
        for ax, name in zip(axes[row], names, strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(PLOT_LEVELS, [str(n) for n in PLOT_LEVELS])
            ax.set_xlabel("calls in flight")
            ax.set_title(f"{broker.upper()}: {name}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _look(label: str) -> tuple[str, str]:
    """The same colour for a contender on every broker's row."""
    if "FastStream" in label:
        return "tab:red", "-"
    if "tracing" in label:
        return "tab:green", "-"
    if "catga" in label:
        return "tab:orange", "-"
    if "awaited" in label:
        return "tab:gray", "--"
    return "tab:blue", "-"
