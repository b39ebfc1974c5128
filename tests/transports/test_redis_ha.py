"""The Redis transport behind Sentinel and on a Redis Cluster: the URL forms, then the transport and
durable contracts over three Sentinels and over a 3-primary Redis Cluster (Debian's 7.0, sharded
pub/sub; pip's 6.2, plain pub/sub), all real processes on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import MovedError, ReadOnlyError, ResponseError

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports.base import Transport
from fastapi_catga.transports.durable import DurableStore
from fastapi_catga.transports.redis import RedisTransport
from fastapi_catga.transports.redis.errors import moved_away
from fastapi_catga.transports.redis.locate import LocatedConnection, Locator, SentinelLocator, outdated
from fastapi_catga.transports.redis.shard import ShardLocator
from fastapi_catga.transports.redis.urls import target
from tests.redis_ha import SentinelSetup, redis_cluster, sentinel_setup
from tests.servers import RedisServer, debian_redis_7_binary, find_binary, free_port
from tests.transports.contract import Connect, TransportContract, echo
from tests.transports.durable_contract import DurableContract, MakeStore

pytestmark = pytest.mark.redis

Open = Callable[..., Awaitable[RedisTransport]]


# -- the URL forms -------------------------------------------------------------------------------


def test_a_plain_url_needs_no_locator() -> None:
    found = target("redis://:pw@h:1/2", cluster="c", timeout=1)
    assert (found.url, found.locator) == ("redis://:pw@h:1/2", None)
    for url in ("redis://h:1/0?client_name=a@b", "redis://[::1]/0?client_name=a@b"):  # an @ of no password
        assert target(url, cluster="c", timeout=1).url == url


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    found = target("redis+sentinel://u:pw@a:1,b,[::1]:3/my%20master/4?x=1", cluster="c", timeout=1)
    assert found.url == "redis://u:pw@a:1/4?x=1"  # credentials and database for the master
    assert isinstance(found.locator, SentinelLocator)
    assert found.locator.service == "my master"
    assert target("redis+sentinel://a/m", cluster="c", timeout=1).url == "redis://a:26379/0"


def test_a_cluster_url_locates_the_slot_of_the_cluster_name() -> None:
    found = target("redis+cluster://:pw@a:7000,b", cluster="orders", timeout=1)
    assert found.url == "redis://:pw@a:7000/0"
    assert isinstance(found.locator, ShardLocator)
    assert found.locator.slot == key_slot(b"catga:{orders}:members") == key_slot(b"orders")


def test_rediss_ha_urls_keep_tls_for_the_servers_located() -> None:
    assert target("rediss+cluster://:pw@a:7000,b", cluster="c", timeout=1).url == "rediss://:pw@a:7000/0"
    found = target("rediss+sentinel://u:pw@a,b/m/2?x=1", cluster="c", timeout=1)
    assert found.url == "rediss://u:pw@a:26379/2?x=1"
    assert isinstance(found.locator, SentinelLocator)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://:secret@a:26379", "names the master"),
        ("redis+sentinel://:secret@a:26379/m/x", "names the master"),
        ("redis+sentinel://:secret@a:port/m", "bad host:port"),
        ("redis+cluster://:secret@a,:7000", "bad host:port"),
        ("redis+cluster://:secret@a/3", "only database 0"),
        ("rediss+cluster://:secret@a?ssl_cert_reqs=none", "turns off TLS verification"),
        ("redis+shard://:secret@a/m", "must specify one of the following schemes"),
        ("redis+cluster://:secret@a?max_connections=-1", "invalid CATGA_REDIS_URL"),
        ("redis://:secret@a/0?max_connections=-1", "invalid CATGA_REDIS_URL"),
        ("redis://user:secret#x@a:6379/0", "written %2F, %3F or %23"),  # a # in the password
        ("redis+sentinel://user:secret/x@a:26379/m", "written %2F, %3F or %23"),
        ("redis://user:secret?x@a:6379/0", "written %2F, %3F or %23"),  # was "Port could not be cast"
        ("redis+cluster://user:se,cret@a:7000,b:7000?max_connections=-1", "invalid CATGA_REDIS_URL"),
        ("redis://:secret@[::1", "is no IPv6 address"),  # urllib's ValueError
        ("redis://:secret@[zz]:6379/0", "is no IPv6 address"),
        ("redis://:secret@a:6379/abc", "is a database number"),  # redis-py: db 0
        ("redis://:secret@a:6379/1/2", "is a database number"),  # redis-py: db 12
        ("redis://:secret@a:6379/3,redis://b:6379/5", "is a database number"),  # a NATS-like list
        ("redis://:secret@a:6379,b:6379/0", "names one server"),
        ("redis://:x#secret@a:6379/0", "written %2F, %3F or %23"),
        ("redis://:x/secret@a:6379/0", "written %2F, %3F or %23"),
    ],
)
def test_a_bad_ha_url_is_a_clear_error_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as caught:
        RedisTransport(url)
    shown = "".join(traceback.format_exception(caught.value))  # what a crash prints, causes included
    assert "secret" not in shown and "cret" not in shown, shown


def test_a_connection_made_before_the_answer_changed_is_outdated() -> None:
    locator = Locator()
    locator.noted(("a", 1))
    before = LocatedConnection(locator=locator)
    locator.noted(("a", 1))  # the same answer again
    assert not before.outdated and not before.should_reconnect()
    locator.noted(("b", 2))
    after = LocatedConnection(locator=locator)
    assert before.outdated and before.should_reconnect() and outdated(before)
    assert not after.outdated and not outdated(object())


@pytest.mark.parametrize(
    ("error", "moved"),
    [
        (MovedError("12682 127.0.0.1:7001"), True),
        (ReadOnlyError("You can't write against a read only replica."), True),
        (
            ResponseError("Error running script (call to f_1): @user_script:6: -READONLY You can't write"),
            True,
        ),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (OSError("connection refused"), False),
        (None, False),
    ],
)
def test_moved_away_knows_a_moved_slot_and_a_demoted_master(error: BaseException | None, moved: bool) -> None:
    assert moved_away(error) is moved


# -- Sentinel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSetup]:
    setup = sentinel_setup()
    yield setup
    setup.close()


class TestRedisSentinelTransport(TransportContract):
    @pytest.fixture
    async def connect(self, sentinels: SentinelSetup, cluster: str) -> AsyncIterator[Connect]:
        made: list[RedisTransport] = []

        async def connect() -> Transport:
            transport = RedisTransport(sentinels.url, cluster=cluster, max_payload=64 * 1024)
            await transport.connect()
            made.append(transport)
            return transport

        yield connect
        for transport in made:
            await transport.aclose()


async def test_no_sentinel_answering_is_a_transport_error_within_the_timeout() -> None:
    transport = RedisTransport("redis+sentinel://:secret@127.0.0.1:1/m", connect_timeout=1)
    with pytest.raises(
        Exception, match="cannot connect to Redis at redis\\+sentinel://:\\*\\*\\*@"
    ) as caught:
        await transport.connect()
    assert "secret" not in str(caught.value) and "cret" not in str(caught.value)
    await transport.aclose()


@pytest.fixture
def frozen() -> Iterator[str]:
    """``127.0.0.1:<port>`` of a socket that accepts connections and never answers: a frozen server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"127.0.0.1:{listener.getsockname()[1]}"


async def test_a_frozen_sentinel_first_in_line_leaves_time_to_ask_the_others(
    sentinels: SentinelSetup, frozen: str
) -> None:
    url = sentinels.url.replace("redis+sentinel://", f"redis+sentinel://{frozen},")
    transport = RedisTransport(url, connect_timeout=2)
    started = time.monotonic()
    await transport.connect()  # the frozen one gets half a second of the two
    assert time.monotonic() - started < 2
    await transport.aclose()


# -- Redis Cluster -------------------------------------------------------------------------------

VERSIONS = {"pip": (6, 2), "debian": (7, 0)}


@pytest.fixture(scope="module", params=list(VERSIONS))
def cluster_nodes(request: pytest.FixtureRequest) -> Iterator[list[RedisServer]]:
    """Three primaries, every slot assigned: on pip's 6.2 (plain pub/sub), then Debian's 7.0 (sharded)."""
    binary = (
        find_binary("redis-server", "REDIS_SERVER_BIN") if request.param == "pip" else debian_redis_7_binary()
    )
    nodes = redis_cluster(binary)
    assert nodes[0].version_info[:2] == VERSIONS[request.param], nodes[0].version
    yield nodes
    for node in nodes:
        node.close()


def cluster_url(nodes: list[RedisServer]) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes[:2])


@pytest.fixture
async def open_cluster(cluster_nodes: list[RedisServer], cluster: str) -> AsyncIterator[Open]:
    made: list[RedisTransport] = []

    async def open_cluster(**options: Any) -> RedisTransport:
        transport = RedisTransport(cluster_url(cluster_nodes), **{"cluster": cluster, **options})
        await transport.connect()
        made.append(transport)
        return transport

    yield open_cluster
    for transport in made:
        await transport.aclose()


class TestRedisClusterTransport(TransportContract):
    @pytest.fixture
    async def connect(self, open_cluster: Open) -> Connect:
        async def connect() -> Transport:
            return await open_cluster(max_payload=64 * 1024)

        return connect


async def test_dead_and_frozen_seeds_are_skipped(
    cluster_nodes: list[RedisServer], frozen: str, cluster: str
) -> None:
    url = cluster_url(cluster_nodes).replace(
        "redis+cluster://", f"redis+cluster://{frozen},127.0.0.1:{free_port()},"
    )
    transport = RedisTransport(url, cluster=cluster, connect_timeout=2)
    started = time.monotonic()
    await transport.connect()
    assert time.monotonic() - started < 2
    await transport.members.put("a", b"{}", ttl=10)
    await transport.aclose()


class TestRedisClusterDurable(DurableContract):
    @pytest.fixture
    def make_store(self, open_cluster: Open) -> MakeStore:
        async def make() -> DurableStore:
            return (await open_cluster()).durable

        return make


async def owner(nodes: list[RedisServer], cluster: str) -> aioredis.Redis:
    """A client of the primary that owns the catga cluster's slot: the others answer MOVED."""
    for node in nodes:
        client = aioredis.Redis(port=node.port)
        try:
            await client.get(f"catga:{{{cluster}}}:probe")
        except MovedError:
            await client.aclose()
        else:
            return client
    raise AssertionError(f"no node owns the slot of {cluster}")


@pytest.mark.parametrize("cluster", ["orders", "billing", "t-1"])  # slots on different shards
async def test_every_key_and_channel_lives_on_the_shard_of_the_cluster_slot(
    cluster_nodes: list[RedisServer], open_cluster: Open, cluster: str
) -> None:
    a, b = await open_cluster(), await open_cluster()
    await b.subscribe("node.b", echo("b"))
    await a.members.put("a", b"{}", ttl=10)
    await a.durable.append("cmd", "Work", Envelope({"catga-id": uuid.uuid4().hex}, b"{}"), dedup_id="1")
    client = await owner(cluster_nodes, cluster)
    try:
        keys = {_text(key) for key in await client.keys("catga:*")}
        assert {f"catga:{{{cluster}}}:node:a", f"catga:{{{cluster}}}:dur:cmd:Work"} <= keys
        sharded = cluster_nodes[0].version_info >= (7,)
        listing = client.pubsub_shardchannels if sharded else client.pubsub_channels
        channels = {_text(channel) for channel in await listing("catga:*")}
        assert f"catga:{{{cluster}}}:node.b" in channels
        assert f"catga:{{{cluster}}}:members:events" in channels
        if sharded:  # nothing left on the plain channels, which a Redis Cluster copies to every node
            assert await client.pubsub_channels("catga:*") == []
    finally:
        await client.aclose()
    assert await a.members.list() == {"a": b"{}"}


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


async def test_an_idle_subscriber_pings_and_stays_connected(open_cluster: Open) -> None:
    transport = await open_cluster(health_check_interval=0.2)
    lost: list[bool] = []
    transport.add_connection_listener(lost.append)
    # Nothing may happen for five idle periods: a PING refused in (sharded) subscribed mode would
    # end the connection. Absence takes waiting; no event to poll for.
    await asyncio.sleep(1.0)
    assert lost == [] and transport.connected
