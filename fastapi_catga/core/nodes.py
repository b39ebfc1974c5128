"""`NodeInfo`: what a node tells the cluster about itself."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from pydantic import BaseModel, Field

__all__ = ["NodeInfo", "utc_now"]


def utc_now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


class NodeInfo(BaseModel):
    """One member of the cluster, as stored in the membership store and served by ``/catga/nodes``."""

    node_id: str = Field(description="Unique per process start")
    endpoint: str = Field("", description="The URL this node advertises (its HTTP address)")
    last_seen: datetime = Field(default_factory=utc_now, description="UTC time of its last heartbeat")
    metadata: dict[str, str] = Field(default_factory=dict, description="Extra strings from CATGA_METADATA")
    started_at: datetime = Field(default_factory=utc_now, description="UTC time the node started")
    handles: list[str] = Field(default_factory=list, description="Command and query types it handles")
    events: list[str] = Field(default_factory=list, description="Event types it has handlers for")
    version: str = Field("", description="fastapi-catga version the node runs")
    app_version: str = Field("", description="The app's own version (CATGA_APP_VERSION)")
    schemas: dict[str, str] = Field(
        default_factory=dict,
        description="Per message type it handles: schema fingerprint and field shapes (rolling upgrades)",
    )
    incarnation: str = Field(
        default_factory=lambda: os.urandom(8).hex(),
        description="Random per process start: tells a restarted process from a live one with the same id",
    )
