"""OpenTelemetry for fastapi-catga (extra ``otel``): a span around every handler run.

    from fastapi_catga.otel import TracingBehavior
    app = FastAPI(lifespan=catga_lifespan(behaviors=[TracingBehavior()]))

Spans are named ``catga <type name>`` and carry ``messaging.message.id``, ``messaging.system``
(``catga``) and ``catga.message.type``; a handler that raises marks its span as an error. With
only the API installed (no SDK configured) spans cost next to nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi_catga.core.messages import Message
from fastapi_catga.core.pipeline import CallNext

try:
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    if "opentelemetry" not in str(exc):
        raise
    raise ImportError('tracing needs OpenTelemetry: pip install "fastapi-catga[otel]"') from exc

__all__ = ["TracingBehavior"]


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
            f"catga {message.type_name}", kind=trace.SpanKind.CONSUMER, attributes=attributes
        ):
            return await call_next()
