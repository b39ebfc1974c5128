"""Print the traces in span files as trees: ``python -m example_app.spans spans-*.jsonl``.

The files are what the example app writes with ``ORDERS_OBSERVE=1 ORDERS_SPANS_FILE=...`` (one
JSON object per span and line, OpenTelemetry's console format). Each trace prints as its spans,
children under their parents, with the node that made each one::

    trace 4bf92f3577b34da6a3ce929d0e0e4736 (nodes a, b)
      POST /orders  SERVER  a
        send PlaceOrder  CLIENT  a
          send PlaceOrder attempt 1  CLIENT  a -> b
            process PlaceOrder  CONSUMER  b

``--trace ID`` prints only that trace, ``--message ID`` only the trace that carried a message id.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_trace", "load", "main", "traces"]

Span = dict[str, Any]


def load(paths: Iterable[Path]) -> list[Span]:
    """Every span in the files (a line cut short by a process still writing is left out)."""
    spans = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                spans.append(json.loads(line))
            except ValueError:
                continue
    return spans


def trace_id(span: Span) -> str:
    return str(span["context"]["trace_id"]).removeprefix("0x")


def node_of(span: Span) -> str:
    """The node that made the span: its ``catga.node.id``, else its resource's ``service.instance.id``."""
    node = span.get("attributes", {}).get("catga.node.id")
    return str(node or span.get("resource", {}).get("attributes", {}).get("service.instance.id", "?"))


def traces(spans: Iterable[Span]) -> dict[str, list[Span]]:
    """Spans by trace id, each trace's in start order."""
    found: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        found[trace_id(span)].append(span)
    return {tid: sorted(group, key=lambda s: str(s["start_time"])) for tid, group in found.items()}


def format_trace(spans: Sequence[Span]) -> str:
    """One trace as an indented tree; a span whose parent is not among them starts a tree."""
    ids = {span["context"]["span_id"] for span in spans}
    children: dict[str | None, list[Span]] = defaultdict(list)
    for span in spans:
        parent = span.get("parent_id")
        children[parent if parent in ids else None].append(span)
    nodes = sorted({node_of(span) for span in spans})
    lines = [f"trace {trace_id(spans[0])} (nodes {', '.join(nodes)})"]

    def walk(span: Span, depth: int) -> None:
        kind = str(span.get("kind", "")).removeprefix("SpanKind.")
        where = node_of(span)
        target = span.get("attributes", {}).get("catga.target.node.id")
        if target:
            where += f" -> {target}"
        failed = " ERROR" if span.get("status", {}).get("status_code") == "ERROR" else ""
        lines.append(f"{'  ' * depth}{span['name']}  {kind}  {where}{failed}")
        for child in children.get(span["context"]["span_id"], []):
            walk(child, depth + 1)

    for root in children[None]:
        walk(root, 1)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app.spans", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="span files (ORDERS_SPANS_FILE of each node)")
    parser.add_argument("--trace", help="print only this trace id")
    parser.add_argument("--message", help="print only the trace that carried this message id")
    args = parser.parse_args(argv)
    found = traces(load(args.files))
    for tid, spans in found.items():
        if args.trace and tid != args.trace.removeprefix("0x"):
            continue
        ids = {span.get("attributes", {}).get("messaging.message.id") for span in spans}
        if args.message and args.message not in ids:
            continue
        print(format_trace(spans), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
