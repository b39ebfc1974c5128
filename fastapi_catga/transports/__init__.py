"""Transports: one Protocol, one implementation per broker, each loaded only when chosen.

- `base`: the `Transport` and `MembershipStore` Protocols that the cluster layer uses.
- `memory`: the default, inside this process; also the harness for whole clusters in tests.
- `nats`, `redis`: the brokers, one package each (``pip install "fastapi-catga[nats]"``, ``[redis]``).
- `_shared`: what every transport does the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi_catga.transports.base import Transport
from fastapi_catga.transports.memory import InMemoryBroker, InMemoryTransport

if TYPE_CHECKING:
    from fastapi_catga.settings import CatgaSettings

__all__ = ["TRANSPORTS", "InMemoryBroker", "InMemoryTransport", "Transport", "create_transport"]


def _memory(settings: CatgaSettings) -> Transport:
    return InMemoryTransport(cluster=settings.cluster, max_payload=settings.max_payload)


def _nats(settings: CatgaSettings) -> Transport:
    from fastapi_catga.transports.nats import NatsAuth, NatsTransport  # here: nats-py loads when chosen
    from fastapi_catga.transports.tls import TlsFiles

    auth = NatsAuth(
        user=settings.nats_user,
        password=settings.nats_password,
        token=settings.nats_token,
        nkey_seed_file=settings.nats_nkey_seed_file,
        creds_file=settings.nats_creds_file,
        tls=TlsFiles(
            settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key, setting="CATGA_NATS_TLS"
        ),
    )
    return NatsTransport(
        settings.nats_url, cluster=settings.cluster, max_payload=settings.max_payload, auth=auth
    )


def _redis(settings: CatgaSettings) -> Transport:
    from fastapi_catga.transports.redis import RedisTransport  # here, so redis-py loads only when chosen
    from fastapi_catga.transports.tls import TlsFiles

    return RedisTransport(
        settings.redis_url,
        cluster=settings.cluster,
        max_payload=settings.max_payload,
        username=settings.redis_username,
        password=settings.redis_password,
        tls=TlsFiles(
            settings.redis_tls_ca, settings.redis_tls_cert, settings.redis_tls_key, setting="CATGA_REDIS_TLS"
        ),
        sentinel_username=settings.redis_sentinel_username,
        sentinel_password=settings.redis_sentinel_password,
    )


#: ``CATGA_TRANSPORT`` value -> the factory of that transport, configured from the settings.
TRANSPORTS: dict[str, Callable[[CatgaSettings], Transport]] = {
    "memory": _memory,
    "nats": _nats,
    "redis": _redis,
}


def create_transport(settings: CatgaSettings) -> Transport:
    """The transport ``settings.transport`` names, configured from the settings."""
    return TRANSPORTS[settings.transport](settings)
