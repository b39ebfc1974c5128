"""`CatgaSettings`: CONTRACT.md's defaults, ``CATGA_*`` parsing and errors that name the variable."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from fastapi_catga import CatgaSettings, ConfigurationError, catga_lifespan, load_settings
from fastapi_catga.core.logs import redact_url

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)


def test_defaults_match_the_contract() -> None:
    settings = CatgaSettings()
    assert settings.transport == "memory"
    assert settings.nats_url == "nats://localhost:4222"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.cluster == "catga"
    assert NAME.match(settings.node_id)
    assert settings.endpoint == ""
    assert settings.metadata == {}
    assert settings.heartbeat_interval == 5
    assert settings.node_ttl == 15
    assert settings.request_timeout == 30
    assert settings.retry_attempts == 3
    assert settings.handler_modules == []


def test_environment_variables_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CATGA_TRANSPORT": "nats",
        "CATGA_NATS_URL": "nats://a:4222,nats://b:4222",
        "CATGA_REDIS_URL": "redis://cache:6380/2",
        "CATGA_CLUSTER": "orders-prod",
        "CATGA_NODE_ID": "api-1",
        "CATGA_ENDPOINT": "http://10.0.0.7:8000",
        "CATGA_METADATA": '{"zone": "eu-1", "role": "api"}',
        "CATGA_HEARTBEAT_INTERVAL": "0.25",
        "CATGA_NODE_TTL": "1.5",
        "CATGA_REQUEST_TIMEOUT": "2.5",
        "CATGA_RETRY_ATTEMPTS": "5",
        "CATGA_HANDLER_MODULES": " app.orders , app.billing,, ",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.transport == "nats"
    assert settings.nats_url == "nats://a:4222,nats://b:4222"
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.cluster == "orders-prod"
    assert settings.node_id == "api-1"
    assert settings.endpoint == "http://10.0.0.7:8000"
    assert settings.metadata == {"zone": "eu-1", "role": "api"}
    assert settings.heartbeat_interval == 0.25
    assert settings.node_ttl == 1.5
    assert settings.request_timeout == 2.5
    assert settings.retry_attempts == 5
    assert settings.handler_modules == ["app.orders", "app.billing"]


def test_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATGA_CLUSTER", "from-env")
    assert load_settings(cluster="given").cluster == "given"
    assert CatgaSettings(handler_modules=["a", "b"]).handler_modules == ["a", "b"]


def test_a_misspelt_variable_is_warned_of_with_the_setting_it_is_close_to(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It is not read (the default stays: a node on another broker); an app's own CATGA_* names,
    close to no setting, are left alone."""
    monkeypatch.setenv("CATGA_NAT_URL", "nats://elsewhere:4222")
    monkeypatch.setenv("CATGA_REDIS_PASWORD", "s3cret-value")
    monkeypatch.setenv("CATGA_TEST_LEDGER", "/tmp/ledger")
    with caplog.at_level(logging.WARNING, logger="fastapi_catga.settings"):
        settings = load_settings()
    assert settings.nats_url == "nats://localhost:4222"
    assert (
        "CATGA_NAT_URL is no fastapi-catga setting and is not read; did you mean CATGA_NATS_URL?"
        in caplog.text
    )
    assert "did you mean CATGA_REDIS_PASSWORD?" in caplog.text and "s3cret-value" not in caplog.text
    assert "CATGA_TEST_LEDGER" not in caplog.text


def test_unknown_transport_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATGA_TRANSPORT", "kafka")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "CATGA_TRANSPORT" in message
    assert "'memory', 'nats' or 'redis'" in message
    assert "kafka" in message
    assert isinstance(info.value.__cause__, ValidationError)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CATGA_CLUSTER", "has spaces"),
        ("CATGA_HEARTBEAT_INTERVAL", "0"),
        ("CATGA_RETRY_ATTEMPTS", "0"),
        ("CATGA_REQUEST_TIMEOUT", "soon"),
        ("CATGA_REQUEST_TIMEOUT", "inf"),
        ("CATGA_REQUEST_TIMEOUT", "1e12"),  # no deadline header another node reads
        ("CATGA_NODE_TTL", "infinity"),
        ("CATGA_DRAIN_TIMEOUT", "nan"),
        ("CATGA_NODE_TTL", "1e10"),  # a TTL no broker takes
        ("CATGA_DURABLE_RETENTION", "1e300"),
        ("CATGA_DURABLE_RETENTION", "0.001"),  # JetStream refuses it at start-up
        ("CATGA_DURABLE_DEDUP_WINDOW", "0.001"),
        ("CATGA_DURABLE_BACKOFF", "1,1e300"),
        ("CATGA_NODE_ID", "a/b"),
    ],
)
def test_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=f"{name}: "):
        load_settings()


def test_bad_json_metadata_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATGA_METADATA", "{zone: eu-1")
    with pytest.raises(ConfigurationError, match="(?i)metadata") as info:
        load_settings()
    assert "JSON" in str(info.value)


@pytest.mark.parametrize("value", ["{zone: eu-1", '{"zone": 1}'])
def test_bad_metadata_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CATGA_METADATA", value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert re.search(r"\bCATGA_METADATA\b", str(info.value))
    assert "CATGA_METADATA_ZONE" not in str(info.value)


def test_metadata_must_be_a_json_object_of_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATGA_METADATA", '["eu-1"]')
    with pytest.raises(ConfigurationError, match="CATGA_METADATA: Input should be a valid dictionary"):
        load_settings()


@pytest.mark.parametrize(("heartbeat", "ttl"), [("5", "5"), ("5", "4.9"), ("0.5", "0.1")])
def test_node_ttl_must_exceed_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch, heartbeat: str, ttl: str
) -> None:
    monkeypatch.setenv("CATGA_HEARTBEAT_INTERVAL", heartbeat)
    monkeypatch.setenv("CATGA_NODE_TTL", ttl)
    with pytest.raises(
        ConfigurationError, match="CATGA_NODE_TTL .* must be longer than CATGA_HEARTBEAT_INTERVAL"
    ):
        load_settings()
    with pytest.raises(ValidationError, match="node_ttl"):
        CatgaSettings()


def test_node_ids_are_unique_per_call() -> None:
    ids = {CatgaSettings().node_id for _ in range(50)}
    assert len(ids) == 50
    assert all(NAME.match(node_id) for node_id in ids)


@pytest.mark.parametrize("hostname", ["api.example.com", "my host!", "", "h" * 100])
def test_node_ids_are_valid_for_any_hostname(monkeypatch: pytest.MonkeyPatch, hostname: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    node_id = CatgaSettings().node_id
    assert NAME.match(node_id), node_id


@pytest.mark.timeout(20)
def test_app_with_a_bad_transport_fails_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATGA_TRANSPORT", "kafka")
    app = FastAPI(lifespan=catga_lifespan)
    with pytest.raises(ConfigurationError, match="CATGA_TRANSPORT"), TestClient(app):
        pass


def test_settings_are_not_read_at_import() -> None:
    env = {**os.environ, "CATGA_TRANSPORT": "kafka", "CATGA_METADATA": "{broken"}
    code = "import fastapi_catga, fastapi_catga.web.lifespan, example_app.main"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_settings_never_show_a_broker_password() -> None:
    settings = CatgaSettings(
        nats_url="nats://app:s3cret@n1:4222,nats://app:s3cret@n2:4222", redis_url="redis://:s3cret@r/0"
    )
    for shown in (repr(settings), str(settings)):
        assert "s3cret" not in shown
        assert "nats://app:***@n1:4222,nats://app:***@n2:4222" in shown
    assert settings.nats_url.startswith("nats://app:s3cret@")  # the value itself is intact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://tok3n@h:4222", "nats://***@h:4222"),
        ("redis://default:pw@h/0?password=pw&db=1", "redis://default:***@h/0?password=***&db=1"),
        ("nats://h:4222", "nats://h:4222"),
        # The user part ends at the last @, as URL parsers read it; a password may hold @ , and /.
        ("redis://catga:p@ssw0rd@h:6379/0", "redis://catga:***@h:6379/0"),
        ("nats://catga:pass,word@h:4222", "nats://catga:***@h:4222"),
        ("rediss+sentinel://u:pa,ss/w@s1:26379,s2:26379/m", "rediss+sentinel://u:***@s1:26379,s2:26379/m"),
        ("nats://a:x@n1:4222,nats://b:y@n2:4222", "nats://a:***@n1:4222,nats://b:***@n2:4222"),
        ("tok3n@h:4222", "***@h:4222"),  # nats-py's nats:// is implied
    ],
)
def test_redact_url_hides_passwords_and_tokens(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_bad_secret_is_named_but_never_shown() -> None:
    with pytest.raises(ConfigurationError, match="CATGA_REDIS_PASSWORD") as raised:
        load_settings(redis_password=987654321)
    assert "987654321" not in str(raised.value)
    settings = load_settings(nats_token="t0k3n", redis_password="pw-0f-redis")
    shown = f"{settings!r} {settings} {settings.model_dump()} {settings.model_dump_json()}"
    assert "t0k3n" not in shown and "pw-0f-redis" not in shown
    assert settings.nats_token.get_secret_value() == "t0k3n"


def test_handler_modules_beside_handlers_given_in_code_says_it_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastapi_catga import build
    from fastapi_catga.testing import InMemoryTransport

    with caplog.at_level(logging.WARNING, logger="fastapi_catga.bootstrap"):
        build(CatgaSettings(handler_modules=["no.such.module"]), handlers=[], transport=InMemoryTransport())
    assert "CATGA_HANDLER_MODULES (no.such.module) is ignored" in caplog.text
