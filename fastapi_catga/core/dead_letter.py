"""`DeadLetter`: a durable message that will not run until someone replays it."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["DeadLetter", "QueueKind"]

#: Durable queues hold commands (``cmd``) or events (``evt``).
QueueKind = Literal["cmd", "evt"]


class DeadLetter(BaseModel):
    """A message that will not run until someone replays it; its original envelope is kept beside."""

    id: str = Field(description="<group>:<message id>: one dead letter per message and group")
    queue_kind: QueueKind
    message_type: str
    message_id: str
    group: str = Field(description="workers (commands) or the event handler")
    reason: Literal["attempts", "rejected", "invalid"] = Field(
        description="attempts: it failed (or its node died) on every allowed delivery; rejected: the "
        "handler raised Reject; invalid: it could not be decoded or validated, or its result could not "
        "be (over the payload limit, or no JSON)"
    )
    error_type: str = ""
    error: str = Field("", description="the last error's text, at most 1 KiB")
    attempts: int = Field(description="deliveries the broker counted")
    node_id: str = Field(description="the node that dead-lettered it")
    at: datetime
    replays: int = 0
