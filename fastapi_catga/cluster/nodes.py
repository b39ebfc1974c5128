"""Re-export of `NodeInfo`, which lives in core so the mediator can name it without reaching up."""

from fastapi_catga.core.nodes import NodeInfo, utc_now

__all__ = ["NodeInfo", "utc_now"]
