"""`CatgaSettings`: every knob, from ``CATGA_*`` environment variables (or passed in)."""

from __future__ import annotations

import difflib
import logging
import os
import re
import secrets
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from fastapi_catga.core.envelope import DEFAULT_MAX_PAYLOAD, MAX_TIMEOUT
from fastapi_catga.core.logs import redact_url
from fastapi_catga.exceptions import ConfigurationError

__all__ = ["CatgaSettings", "load_settings", "new_node_id"]

logger = logging.getLogger(__name__)

_NAME = r"^[A-Za-z0-9_-]{1,64}$"
_URLS = frozenset({"nats_url", "redis_url"})  # may hold a password: never shown as they are
_SECRETS = frozenset(
    {"nats_password", "nats_token", "redis_password", "redis_sentinel_password"}
)  # never shown at all


def new_node_id() -> str:
    """``<host>-<8 hex>``: readable, and unique per process start."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "node"
    return f"{host}-{secrets.token_hex(4)}"


class CatgaSettings(BaseSettings):
    """fastapi-catga's settings. Each field reads ``CATGA_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="CATGA_", extra="ignore", validate_default=True, allow_inf_nan=False
    )

    transport: Literal["memory", "nats", "redis"] = Field("memory", description="memory, nats or redis")
    nats_url: str = Field(
        "nats://localhost:4222", description="NATS server URL; comma-separated for a cluster"
    )
    redis_url: str = Field("redis://localhost:6379/0", description="Redis URL")
    # Broker credentials and TLS (docs/production.md). Paths are PEM or NATS files; empty: not used.
    nats_user: str = Field("", description="NATS user name, with CATGA_NATS_PASSWORD")
    nats_password: SecretStr = Field(SecretStr(""), description="NATS password of CATGA_NATS_USER")
    nats_token: SecretStr = Field(SecretStr(""), description="NATS authentication token")
    nats_nkey_seed_file: str = Field("", description="File holding a NATS nkey user seed (SU...)")
    nats_creds_file: str = Field("", description="NATS .creds file (user JWT and seed), for operator mode")
    nats_tls_ca: str = Field("", description="CA certificate file that signed the NATS servers' certificates")
    nats_tls_cert: str = Field("", description="Client certificate file for NATS (mutual TLS)")
    nats_tls_key: str = Field("", description="Private key file of CATGA_NATS_TLS_CERT")
    redis_username: str = Field("", description="Redis ACL user (empty: the default user)")
    redis_password: SecretStr = Field(SecretStr(""), description="Redis password (ACL user or requirepass)")
    redis_tls_ca: str = Field(
        "", description="CA certificate file that signed the Redis server's certificate"
    )
    redis_tls_cert: str = Field("", description="Client certificate file for Redis (mutual TLS)")
    redis_tls_key: str = Field("", description="Private key file of CATGA_REDIS_TLS_CERT")
    redis_sentinel_username: str = Field(
        "", description="ACL user of the Sentinels of a redis(s)+sentinel:// URL (empty: the default user)"
    )
    redis_sentinel_password: SecretStr = Field(
        SecretStr(""),
        description="Password of the Sentinels of a redis(s)+sentinel:// URL (their requirepass)",
    )
    cluster: str = Field("catga", pattern=_NAME, description="Isolates clusters that share one broker")
    node_id: str = Field(default_factory=new_node_id, pattern=_NAME, description="Unique per process start")
    endpoint: str = Field("", description="The URL this node advertises (its HTTP address)")
    metadata: dict[str, str] = Field(
        default_factory=dict, description="JSON object of extra metadata strings"
    )
    app_version: str = Field(
        "",
        max_length=64,
        description="Your app's version, shown in /catga/nodes and in logs (rolling upgrades)",
    )
    heartbeat_interval: float = Field(5.0, gt=0, le=MAX_TIMEOUT, description="Seconds between heartbeats")
    node_ttl: float = Field(
        15.0, gt=0, le=MAX_TIMEOUT, description="Seconds without a heartbeat after which a node is dead"
    )
    request_timeout: float = Field(
        30.0, gt=0, le=MAX_TIMEOUT, description="Total deadline of one send, seconds"
    )
    retry_attempts: int = Field(
        3, ge=1, le=20, description="Attempts in all, each on another node if one exists"
    )
    routing: Literal["round_robin", "random", "local_first"] = Field(
        "round_robin", description="How send picks among capable nodes (messages with a routing key hash)"
    )
    max_payload: int = Field(DEFAULT_MAX_PAYLOAD, ge=1024, description="Largest encoded message, bytes")
    drain_timeout: float = Field(
        10.0, ge=0, le=MAX_TIMEOUT, description="Seconds a stopping node waits for work in flight"
    )
    expose_errors: bool = Field(
        False,
        description="Put a failing handler's exception text in the error callers get (development only)",
    )
    durable_attempts: int = Field(
        5, ge=1, le=1000, description="Deliveries of a durable message before it is dead-lettered"
    )
    durable_backoff: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0],
        description="Comma-separated seconds between durable attempts, the last repeated",
    )
    durable_lease: float = Field(
        30.0,
        gt=0,
        le=MAX_TIMEOUT,
        description="Seconds a durable handler's node may go silent before another takes over",
    )
    durable_dedup_window: float = Field(
        86400.0,
        ge=1,  # JetStream refuses a duplicate window under 100 ms
        le=MAX_TIMEOUT,
        description="Seconds a durable message id that succeeded is not run again",
    )
    durable_retention: float = Field(
        14 * 86400.0, ge=1, le=MAX_TIMEOUT, description="Seconds dead letters and durable events are kept"
    )
    durable_concurrency: int = Field(
        8, ge=1, le=10_000, description="Durable handlers of one type running at once per node"
    )
    handler_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated modules whose @handler functions to register"
    )
    max_in_flight: int = Field(
        1000, ge=0, description="Handler runs at once on this node; beyond it requests get busy (0: no limit)"
    )
    max_in_flight_per_type: int = Field(
        0, ge=0, description="Handler runs of one message type at once on this node (0: the node's limit)"
    )
    max_queued_events: int = Field(
        10_000, ge=0, description="Received events waiting for a handler slot; more are dropped and counted"
    )

    @field_validator("durable_backoff", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("durable_backoff")
    @classmethod
    def _some_delays(cls, value: list[float]) -> list[float]:
        if not value or min(value) < 0 or max(value) > MAX_TIMEOUT:
            raise ValueError(f"give one or more delays of 0 to {MAX_TIMEOUT:g} s, e.g. 1,5,30,120")
        return value

    @field_validator("handler_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in _URLS and isinstance(value, str) else value

    @model_validator(mode="after")
    def _ttl_covers_heartbeats(self) -> Self:
        if self.node_ttl <= self.heartbeat_interval:
            raise ValueError(
                f"CATGA_NODE_TTL ({self.node_ttl:g} s) must be longer than CATGA_HEARTBEAT_INTERVAL "
                f"({self.heartbeat_interval:g} s); three heartbeats per TTL is the usual choice"
            )
        return self


def load_settings(**overrides: Any) -> CatgaSettings:
    """Read `CatgaSettings` from the environment, turning bad values into one clear error.

    Raises:
        ConfigurationError: names each bad ``CATGA_*`` variable and what it should be.
    """
    for name, meant in _misspelt(os.environ):
        logger.warning("%s is no fastapi-catga setting and is not read; did you mean %s?", name, meant)
    try:
        return CatgaSettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigurationError(f"invalid fastapi-catga settings: {problems}") from exc
    except SettingsError as exc:
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"CATGA_{field.group(1).upper()}" if field else "a CATGA_* variable"
        raise ConfigurationError(
            f"invalid fastapi-catga settings: {name} is not valid JSON "
            "(complex values such as CATGA_METADATA are JSON objects)"
        ) from exc


def _misspelt(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(name, the setting it is close to)`` of each ``CATGA_*`` variable that is no setting but
    nearly one (``CATGA_NAT_URL``): a typo that would leave the default in place, unsaid. An app's
    own ``CATGA_*`` variables, close to no setting, are left alone."""
    known = {f"CATGA_{name.upper()}" for name in CatgaSettings.model_fields}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("CATGA_") and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.85)
            if close:
                found.append((name, close[0]))
    return found


def _describe(error: ErrorDetails) -> str:
    loc = error["loc"]
    where = f"CATGA_{str(loc[0]).upper()}" if loc else "settings"
    if len(loc) > 1:  # inside a JSON value: CATGA_METADATA (at zone), not CATGA_METADATA_ZONE
        where += f" (at {'.'.join(str(part) for part in loc[1:])})"
    value = error["input"]
    if loc and loc[0] in _URLS and isinstance(value, str):
        value = redact_url(value)
    hidden = isinstance(value, dict) or bool(loc and loc[0] in _SECRETS)
    got = "" if hidden else f" (got {value!r})"
    return f"{where}: {error['msg']}{got}"
