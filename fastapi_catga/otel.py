"""OpenTelemetry for fastapi-catga (extra ``otel``): traces across nodes, or a span per handler run.

    from fastapi_catga.otel import TracingObserver
    app = FastAPI(lifespan=catga_lifespan(observers=[TracingObserver()]))

`TracingObserver` follows a message across the cluster: a ``send <type>`` span on the caller (a
child of the current span, such as the one FastAPI's instrumentation opens for the HTTP request),
one child span per attempt, and a ``process <type>`` span on the node that ran the handler whose
parent is that attempt: the W3C trace context travels in the envelope headers. Attributes follow
OpenTelemetry's messaging conventions (``messaging.system`` ``catga``,
``messaging.destination.name``, ``messaging.message.id``, ``messaging.operation.type``) plus
``catga.node.id`` and ``catga.attempt``.

`TracingBehavior` is the older, local-only piece: a span around each handler run on its node.

Spans are named ``catga <type name>`` and carry ``messaging.message.id``, ``messaging.system``
(``catga``) and ``catga.message.type``; a handler that raises marks its span as an error. With
only the API installed (no SDK configured) spans cost next to nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi_catga.core.logs import bounded_trace, cut, text_of
from fastapi_catga.core.messages import Event, Message
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.pipeline import CallNext

try:
    from opentelemetry import context, propagate, trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    if "opentelemetry" not in str(exc):
        raise
    raise ImportError('tracing needs OpenTelemetry: pip install "fastapi-catga[otel]"') from exc

__all__ = ["TracingBehavior", "TracingObserver"]


class TracingBehavior:
    """A pipeline behavior that runs each handler inside an OpenTelemetry span.

    Args:
        tracer_provider: defaults to the global one (``opentelemetry.trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("fastapi_catga", tracer_provider=tracer_provider)

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        attributes = {
            "messaging.system": "catga",
            "messaging.message.id": message.message_id,
            "catga.message.type": message.type_name,
        }
        with self._tracer.start_as_current_span(
            f"catga {message.type_name}",
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,  # recorded bounded, below
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next()
            except Exception as exc:  # as OpenTelemetry's own: a cancellation is no error
                _record(span, exc, chain=True)  # this node's own span: the cause may be read here
                raise


_Token = tuple[trace.Span, object]
_KINDS = {
    "publish": trace.SpanKind.PRODUCER,
    "enqueue": trace.SpanKind.PRODUCER,
    "broadcast": trace.SpanKind.CLIENT,
    "send": trace.SpanKind.CLIENT,
}


class TracingObserver(Observer):
    """Spans for sends, attempts and handler runs, linked across nodes into one trace.

    Install one per node: ``build(..., observers=[TracingObserver()])``. Trace context is written
    to and read from the envelope headers by OpenTelemetry's global propagator (W3C
    ``traceparent``/``tracestate`` unless configured otherwise).

    Args:
        tracer_provider: defaults to the global one (``opentelemetry.trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("fastapi_catga", tracer_provider=tracer_provider)
        self._node_id = ""

    def bind(self, node_id: str) -> None:
        self._node_id = node_id

    def _start(
        self, name: str, kind: trace.SpanKind, message: Message, operation: str, parent: Any = None
    ) -> _Token:
        attributes = {
            "messaging.system": "catga",
            "messaging.destination.name": message.type_name,
            "messaging.message.id": message.message_id,
            "messaging.operation.type": operation,
            "catga.node.id": self._node_id,
        }
        span = self._tracer.start_span(name, parent, kind=kind, attributes=attributes)
        return span, context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def _end(token: object, error: BaseException | None) -> None:
        assert isinstance(token, tuple)
        span: trace.Span = token[0]
        attached = token[1]
        if error is not None:
            _record(span, error)
        span.end()
        context.detach(attached)

    def send_started(self, message: Message, operation: str) -> object:
        name = f"{'publish' if isinstance(message, Event) else operation} {message.type_name}"
        return self._start(name, _KINDS.get(operation, trace.SpanKind.CLIENT), message, "send")

    def send_ended(
        self, token: object, message: Message, operation: str, seconds: float, error: BaseException | None
    ) -> None:
        self._end(token, error)

    def attempt_started(self, message: Message, node_id: str, attempt: int) -> object:
        token = self._start(
            f"send {message.type_name} attempt {attempt}", trace.SpanKind.CLIENT, message, "send"
        )
        token[0].set_attribute("catga.attempt", attempt)
        token[0].set_attribute("catga.target.node.id", node_id)
        return token

    def attempt_ended(
        self, token: object, message: Message, node_id: str, attempt: int, error: BaseException | None
    ) -> None:
        self._end(token, error)

    def inject(self, headers: dict[str, str]) -> None:
        propagate.inject(headers)

    def extract(self, headers: Mapping[str, str]) -> context.Context | None:
        """The trace context in a received envelope's headers; None when it carries none."""
        if "traceparent" not in headers:
            return None
        return propagate.extract(headers)

    def handle_started(self, message: Message, headers: Mapping[str, str]) -> object:
        # No context in the headers: an attempt routed to this node runs in the sender's context.
        parent = self.extract(headers)
        return self._start(
            f"process {message.type_name}", trace.SpanKind.CONSUMER, message, "process", parent
        )

    def handle_ended(
        self, token: object, message: Message, seconds: float, error: BaseException | None
    ) -> None:
        self._end(token, error)


def _record(span: trace.Span, error: BaseException, *, chain: bool = False) -> None:
    """The span's exception event and error status, bounded: a handler's error text may be
    megabytes, over what a collector takes in one batch. Without the error's cause unless
    ``chain``: a handler's own exception, which caused the error its caller gets here, does not
    travel to a caller on another node either (its text stays in the node's log unless
    ``CATGA_EXPOSE_ERRORS``)."""
    if not span.is_recording():  # no SDK: nothing to format
        return
    text = cut(text_of(error))
    span.add_event(
        "exception",
        {
            "exception.type": f"{type(error).__module__}.{type(error).__qualname__}",
            "exception.message": text,
            "exception.stacktrace": bounded_trace(error, chain=chain),
            "exception.escaped": "False",
        },
    )
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {text}"))
