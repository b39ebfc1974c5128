"""Transports: one Protocol (`base`), one module per broker, loaded only when chosen."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastapi_catga.transports.base import Transport
from fastapi_catga.transports.memory import InMemoryBroker, InMemoryTransport

if TYPE_CHECKING:
    from fastapi_catga.settings import CatgaSettings

__all__ = ["TRANSPORTS", "InMemoryBroker", "InMemoryTransport", "Transport", "create_transport"]

#: ``CATGA_TRANSPORT`` value -> "module:Class"; a backend's module is imported only when chosen.
TRANSPORTS = {
    "memory": "fastapi_catga.transports.memory:InMemoryTransport",
    "nats": "fastapi_catga.transports.nats:NatsTransport",
    "redis": "fastapi_catga.transports.redis:RedisTransport",
}


def create_transport(settings: CatgaSettings) -> Transport:
    """The transport ``settings.transport`` names, configured from the settings."""
    module_name, _, class_name = TRANSPORTS[settings.transport].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    common = {"cluster": settings.cluster, "max_payload": settings.max_payload}
    if settings.transport == "nats":
        return cls(settings.nats_url, **common)  # type: ignore[no-any-return]
    if settings.transport == "redis":
        return cls(settings.redis_url, **common)  # type: ignore[no-any-return]
    return cls(**common)  # type: ignore[no-any-return]
