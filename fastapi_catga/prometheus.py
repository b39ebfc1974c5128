"""Prometheus metrics for fastapi-catga (extra ``prometheus``).

    from fastapi_catga.prometheus import PrometheusObserver
    app = FastAPI(lifespan=catga_lifespan(observers=[PrometheusObserver()]))
    app.include_router(catga_router)  # GET /catga/metrics now answers

Every metric is named ``catga_*``. Labels are message type names, node ids, outcomes (``ok`` or
an error code) and a few fixed words; never message ids, so their number stays bounded.
"""

from __future__ import annotations

from typing import Any

from fastapi_catga.core.messages import Event, Message
from fastapi_catga.core.observe import Observer, outcome_of
from fastapi_catga.exceptions import CatgaError

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    if "prometheus_client" not in str(exc):
        raise
    raise ImportError('metrics need prometheus-client: pip install "fastapi-catga[prometheus]"') from exc

__all__ = ["PrometheusObserver"]

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PrometheusObserver(Observer):
    """Counts and times what the node does, in a Prometheus registry.

    Install one per node. ``GET /catga/metrics`` on `catga_router` serves its registry in the text
    format; an app that exposes metrics itself passes its own registry and serves that instead.

    Args:
        registry: where the metrics live; a new one of its own by default (not the global one,
            so that several nodes in one process, or an app rebuilt in tests, never clash).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sent = Counter(
            "catga_messages_sent", "Sends, broadcasts and publishes by type and outcome",
            ["type", "operation", "outcome"], registry=r,
        )  # fmt: skip
        self.round_trip = Histogram(
            "catga_send_duration_seconds", "Round trip of a send, retries included, by type",
            ["type", "operation"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "catga_attempts", "Attempts of sends by type, target node and outcome",
            ["type", "node", "outcome"], registry=r,
        )  # fmt: skip
        self.failovers = Counter("catga_failovers", "Sends moved on to another node", ["type"], registry=r)
        self.handled = Counter(
            "catga_messages_handled", "Handler runs on this node by type and outcome",
            ["type", "kind", "outcome"], registry=r,
        )  # fmt: skip
        self.failed = Counter(
            "catga_messages_failed", "Handler runs on this node that failed, by type and outcome",
            ["type", "outcome"], registry=r,
        )  # fmt: skip
        self.handler_seconds = Histogram(
            "catga_handler_duration_seconds", "Handler run time on this node by type",
            ["type"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "catga_in_flight", "Sends waiting for an answer, and handler runs going on",
            ["side"], registry=r,
        )  # fmt: skip
        self.stale = Counter(
            "catga_stale_dropped", "Requests dropped unrun: deadline passed", ["type"], registry=r
        )
        self.overloads = Counter(
            "catga_overloaded", "No handler slot here: requests refused busy, events dropped",
            ["type", "outcome"], registry=r,
        )  # fmt: skip
        self.bad = Counter(
            "catga_bad_messages", "Received messages refused unrun, by reason", ["reason"], registry=r
        )
        self.size = Gauge(
            "catga_cluster_size", "Live members in this node's view, itself included", registry=r
        )
        self.joins = Counter("catga_joins", "Nodes that joined this node's view", registry=r)
        self.leaves = Counter("catga_leaves", "Nodes that left gracefully", registry=r)
        self.evictions = Counter("catga_evictions", "Nodes evicted: silent past the TTL", registry=r)
        self.connected = Gauge("catga_broker_connected", "1 while the broker connection is up", registry=r)
        self.reconnects = Counter("catga_broker_reconnects", "Broker connections lost and back", registry=r)
        self.redeliveries = Counter(
            "catga_durable_redeliveries",
            "Durable messages sent back for another delivery",
            ["type"],
            registry=r,
        )
        self.dead_letters = Counter(
            "catga_dead_letters", "Durable messages dead-lettered, by reason", ["type", "reason"], registry=r
        )
        self._children: dict[tuple[object, ...], Any] = {}
        #: Nodes that left: an attempt to one that ends after it left counts as node "gone".
        self._gone: set[str] = set()
        self._sending = self.in_flight.labels("send")
        self._handling = self.in_flight.labels("handle")
        self._lost = False

    def _of(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: prometheus-client's lookup takes a lock."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render_metrics(self) -> tuple[bytes, str]:
        """The registry in Prometheus's text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def bind(self, node_id: str) -> None:
        self.size.set(1)

    def send_started(self, message: Message, operation: str) -> object:
        self._sending.inc()
        return None

    def send_ended(
        self, token: object, message: Message, operation: str, seconds: float, error: BaseException | None
    ) -> None:
        self._sending.dec()
        self._of(self.sent, message.type_name, operation, outcome_of(error)).inc()
        self._of(self.round_trip, message.type_name, operation).observe(seconds)

    def attempt_ended(
        self, token: object, message: Message, node_id: str, attempt: int, error: BaseException | None
    ) -> None:
        node = "gone" if node_id in self._gone else node_id or "any"  # ended after it left
        self._of(self.attempts, message.type_name, node, outcome_of(error)).inc()

    def failover(self, message: Message, node_id: str, error: CatgaError) -> None:
        self._of(self.failovers, message.type_name).inc()

    def handle_started(self, message: Message, headers: object) -> object:
        self._handling.inc()
        return None

    def handle_ended(
        self, token: object, message: Message, seconds: float, error: BaseException | None
    ) -> None:
        self._handling.dec()
        outcome = outcome_of(error)
        kind = "event" if isinstance(message, Event) else "request"
        self._of(self.handled, message.type_name, kind, outcome).inc()
        if error is not None:
            self._of(self.failed, message.type_name, outcome).inc()
        self._of(self.handler_seconds, message.type_name).observe(seconds)

    def stale_dropped(self, type_name: str) -> None:
        self._of(self.stale, type_name).inc()

    def bad_message(self, kind: str) -> None:
        self._of(self.bad, kind).inc()

    def overloaded(self, type_name: str, outcome: str) -> None:
        self._of(self.overloads, type_name, outcome).inc()

    def member_joined(self, node_id: str, size: int) -> None:
        self.joins.inc()
        self.size.set(size)
        self._gone.discard(node_id)

    def member_left(self, node_id: str, size: int, *, evicted: bool) -> None:
        (self.evictions if evicted else self.leaves).inc()
        self.size.set(size)
        # Its attempt series go with it: a node id is new on each process start by default, and
        # rolling restarts would grow the series without end (Prometheus reads the drop as a reset).
        for key in [key for key in self._children if key[0] is self.attempts and key[2] == node_id]:
            del self._children[key]
            self.attempts.remove(*key[1:])
        if len(self._gone) > 10_000:  # ids that never come back: keep the set bounded too
            self._gone.clear()
        self._gone.add(node_id)

    def connection_changed(self, connected: bool) -> None:
        self.connected.set(1 if connected else 0)
        if not connected:
            self._lost = True
        elif self._lost:
            self._lost = False
            self.reconnects.inc()

    def redelivered(self, type_name: str, deliveries: int) -> None:
        self._of(self.redeliveries, type_name).inc()

    def dead_lettered(self, type_name: str, reason: str) -> None:
        self._of(self.dead_letters, type_name, reason).inc()
