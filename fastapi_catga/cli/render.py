"""What the CLI prints: plain padded tables, ages, and JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi_catga.core.dead_letter import DeadLetter
from fastapi_catga.core.nodes import NodeInfo

__all__ = ["age", "dead_letter_rows", "dumps", "fields", "node_rows", "stamp", "table"]

NODE_COLUMNS = ("NODE", "ENDPOINT", "VERSION", "HANDLES", "EVENTS", "LAST SEEN", "STARTED")
LETTER_COLUMNS = ("ID", "TYPE", "KIND", "REASON", "ATTEMPTS", "REPLAYS", "NODE", "AT", "ERROR")
_ERROR_WIDTH = 60  # characters of a dead letter's error text in the table


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; no trailing spaces."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """``name  value`` lines, the values aligned."""
    width = max((len(name) for name, _ in pairs), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}".rstrip() for name, value in pairs)


def stamp(moment: datetime) -> str:
    """``2025-01-31T12:00:03Z``: a UTC time to the second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(moment: datetime, now: datetime) -> str:
    """How long ago, shortest first: ``0.4s``, ``3m05s``, ``2h03m``, ``4d02h``."""
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _listed(names: Sequence[str]) -> str:
    return ",".join(names) or "-"


def _version(node: NodeInfo) -> str:
    """The app's version with fastapi-catga's: ``2.4.1/catga-0.3.0`` (or only the latter)."""
    catga = f"catga-{node.version}" if node.version else "-"
    return f"{node.app_version}/{catga}" if node.app_version else catga


def node_rows(nodes: Sequence[NodeInfo], now: datetime) -> list[list[str]]:
    """One `NODE_COLUMNS` row per node."""
    return [
        [
            node.node_id,
            node.endpoint or "-",
            _version(node),
            _listed(node.handles),
            _listed(node.events),
            f"{age(node.last_seen, now)} ago",
            stamp(node.started_at),
        ]
        for node in nodes
    ]


def _shorten(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def dead_letter_rows(letters: Sequence[DeadLetter]) -> list[list[str]]:
    """One `LETTER_COLUMNS` row per dead letter."""
    return [
        [
            letter.id,
            letter.message_type,
            letter.queue_kind,
            letter.reason,
            str(letter.attempts),
            str(letter.replays),
            letter.node_id,
            stamp(letter.at),
            _shorten(
                f"{letter.error_type}: {letter.error}" if letter.error else letter.error_type, _ERROR_WIDTH
            )
            or "-",
        ]
        for letter in letters
    ]


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """JSON as the CLI prints it (non-ASCII kept as it is)."""
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)
