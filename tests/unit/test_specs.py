"""outbox_relay.specs: what a tenant may write into a connection string, and the caps the types leave out."""

from __future__ import annotations

import msgspec
import pytest

from outbox_relay.domain import Database, KafkaTarget, RabbitMQTarget, RedisStreamsTarget
from outbox_relay.errors import InvalidSpec, OutboxRelayError
from outbox_relay.specs import (
    AMQPS_PARAMS,
    DSN_PARAMS,
    REDIS_TLS_PARAMS,
    check_amqp_url,
    check_bootstrap_servers,
    check_dsn,
    check_redis_url,
    check_target,
)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@db.example.com:5432/orders",
        "postgres://app@db/orders",
        "postgresql://app%40corp@db:5432/orders?sslmode=verify-full&sslnegotiation=direct",
        "postgresql://app@h1:5432,h2:5433,[2001:db8::1]:5434/orders?target_session_attrs=read-write",
        "postgresql://app@db_container/orders?application_name=shop%20api&ssl_min_protocol_version=TLSv1.3",
        "postgresql://app@db:1/orders",
    ],
)
def test_dsns_a_tenant_needs_are_taken(dsn: str) -> None:
    check_dsn(dsn)


@pytest.mark.parametrize(
    ("dsn", "words"),
    [
        ("mysql://app@db/x", "postgresql://"),
        ("postgresql://app:pw@db/x", "`password` field"),
        ("postgresql://app@db/x?password=pw", "`password` field"),
        ("postgresql://app@db/x?PassWord=pw", "`password` field"),
        ("postgresql://app@db/x?pass%77ord=pw", "`password` field"),
        ("postgresql://db/x", "must name a user"),
        ("postgresql://app@db", "must name a database"),
        ("postgresql://app@/x", "must name a host"),
        ("postgresql://app@db/x?passfile=/etc/pgpass", "'passfile' is not allowed"),
        ("postgresql://app@db/x?service=prod", "'service' is not allowed"),
        ("postgresql://app@db/x?servicefile=/x", "'servicefile'"),
        ("postgresql://app@db/x?sslrootcert=/x", "'sslrootcert'"),
        ("postgresql://app@db/x?sslcert=/x", "'sslcert'"),
        ("postgresql://app@db/x?krbsrvname=postgres", "'krbsrvname'"),
        ("postgresql://app@db/x?user=postgres", "'user'"),
        ("postgresql://app@db/x?dbname=postgres", "'dbname'"),
        ("postgresql://app@db/x?port=1", "'port'"),
        ("postgresql://app@db/x?statement_timeout=0", "'statement_timeout'"),
        ("postgresql://app@db/x?connect_timeout=5", "own connect timeout"),
        ("postgresql://app@db/x?pass%66ile=/etc/pgpass", "'passfile'"),
        ("postgresql://app@db/x?sslmode=require&sslmode=disable", "more than once"),
        ("postgresql://app@db/x?sslmode=verify", "must be one of"),
        ("postgresql://app@db/x?sslmode=", "must be one of"),
        ("postgresql://app@db/x?target_session_attrs=standby", "must be one of"),
        ("postgresql://app@db/x?application_name=a%0Ab", "printable"),
        ("postgresql://app@db/x?sslmode", "malformed query"),
        ("postgresql://app@db/x?&", "malformed query"),
        ("postgresql://app@db/x#frag", "fragment"),
        ("postgresql://app@db:0/x", "invalid port"),
        ("postgresql://app@db:65536/x", "invalid port"),
        ("postgresql://app@db:+5432/x", "invalid port"),
        ("postgresql://app@db:\uff15\uff14\uff13\uff12/x", "invalid port"),
        ("postgresql://app@db:5432,db2:99999/x", "invalid port"),
        ("postgresql://app@db,,db2/x", "not a host name"),
        ("postgresql://app@%2Ftmp/x", "not a host name"),
        ("postgresql://app@d b/x", "not a host name"),
        ("postgresql://app@[::1/x", "not a URL"),
        ("postgresql://app@[::1]x/x", "IPv6"),
        ("postgresql://app@::1/x", "IPv6"),
        ("postgresql://a@b@db/x", "more than one '@'"),
        ("postgresql://app%00@db/x", "control characters"),
        ("postgresql://app@db/x%00y", "control characters"),
    ],
)
def test_dsns_that_must_not_reach_asyncpg_are_refused(dsn: str, words: str) -> None:
    with pytest.raises(InvalidSpec, match=r"^invalid dsn: ") as caught:
        check_dsn(dsn)
    assert words in str(caught.value)
    assert caught.value.field == "dsn" and isinstance(caught.value, ValueError | OutboxRelayError)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://cache",
        "redis://cache/",
        "redis://user@cache:6380/15",
        "redis://[::1]:6379/0",
        "rediss://cache:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false",
    ],
)
def test_redis_urls_a_tenant_needs_are_taken(url: str) -> None:
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("unix:///tmp/redis.sock", "redis://"),
        ("redis://:pw@cache/0", "`password` field"),
        ("redis://u:pw@cache/0", "`password` field"),
        ("redis://cache/0?password=pw", "`password` field"),
        ("redis://cache/0?path=/tmp/x", "'path' is not allowed (allowed: none)"),
        ("redis://cache/0?connection_class=x", "'connection_class'"),
        ("redis://cache/0?ssl_cert_reqs=none", "'ssl_cert_reqs' is not allowed"),
        ("rediss://cache/0?ssl_ca_certs=/etc/ssl/ca.pem", "'ssl_ca_certs'"),
        ("rediss://cache/0?ssl_cert_reqs=maybe", "must be one of"),
        ("redis://cache/0?db=1", "'db'"),
        ("redis://cache/0?socket_timeout=1", "own (`timeout_ms`)"),
        ("redis://cache/0?username=admin", "'username'"),
        ("redis://cache/0?path=", "'path'"),
        ("redis://cache:0/0", "invalid port"),
        ("redis://cache:99999/0", "invalid port"),
        ("redis://cache/zero", "path"),
        ("redis://cache/1/2", "path"),
        ("redis://cache/99999999999", "path"),
        ("redis://a:1,b:2/0", "exactly one host"),
        ("redis:///0", "must name a host"),
    ],
)
def test_redis_urls_that_must_not_reach_redis_py_are_refused(url: str, words: str) -> None:
    with pytest.raises(InvalidSpec, match=r"^invalid url: ") as caught:
        check_redis_url(url)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest@127.0.0.1:5672/",
        "amqp://u@rabbit",
        "amqp://u@rabbit/%2F?heartbeat=30",
        "amqps://u@r/v?no_verify_ssl=1",
    ],
)
def test_amqp_urls_a_tenant_needs_are_taken(url: str) -> None:
    check_amqp_url(url)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://rabbit/", "amqp://"),
        ("amqp://u:pw@rabbit/", "`password` field"),
        ("amqp://u@rabbit/?password=pw", "`password` field"),
        ("amqp://u@rabbit/?certfile=/c", "'certfile'"),
        ("amqp://u@rabbit/?keyfile=/k", "'keyfile'"),
        ("amqp://u@rabbit/?cafile=/c", "'cafile'"),
        ("amqp://u@rabbit/?auth=external", "'auth'"),
        ("amqp://u@rabbit/?no_verify_ssl=1", "'no_verify_ssl' is not allowed"),
        ("amqp://u@rabbit/?heartbeat=-1", "integer from 0"),
        ("amqp://u@rabbit/?heartbeat=65535", "integer from 0"),
        ("amqp://u@rabbit/?timeout=1", "own (`timeout_ms`)"),
        ("amqp://u@rabbit:0/", "invalid port"),
        ("amqp://u@rabbit:65536/", "invalid port"),
        ("amqp://u@rabbit/v%0A", "control characters"),
        ("amqp://u@r1,r2/", "exactly one host"),
    ],
)
def test_amqp_urls_that_must_not_reach_aiormq_are_refused(url: str, words: str) -> None:
    with pytest.raises(InvalidSpec, match=r"^invalid url: ") as caught:
        check_amqp_url(url)
    assert words in str(caught.value)


def test_bootstrap_servers() -> None:
    check_bootstrap_servers(["k1:9092", "k2", "10.0.0.1:9093", "[::1]:9092", "[2001:db8::1]"])
    check_bootstrap_servers([f"k{i}:9092" for i in range(32)])
    cases = {
        "[::1:9092": "bootstrap_servers[0]",
        "::1:9092": "IPv6",
        "k:0": "invalid port",
        "k:65536": "invalid port",
        "k:": "invalid port",
        "user@k:9092": "not a host name",
        "k/x:9092": "not a host name",
        "[::1]9092": "IPv6",
        "[k]:9092": "IPv6",
        "": "not a host name",
    }
    for server, words in cases.items():
        with pytest.raises(InvalidSpec) as caught:
            check_bootstrap_servers(["ok:9092", server] if server != "[::1:9092" else [server])
        assert words in str(caught.value), (server, caught.value)
    with pytest.raises(InvalidSpec, match="at most 32"):
        check_bootstrap_servers([f"k{i}" for i in range(33)])
    with pytest.raises(InvalidSpec, match="at least one"):
        check_bootstrap_servers([])


def test_caps_the_types_leave_out() -> None:
    check_target(RedisStreamsTarget(url="redis://r", maxlen=2**63 - 1))
    with pytest.raises(InvalidSpec, match=r"invalid maxlen: .*XADD"):
        check_target(RedisStreamsTarget(url="redis://r", maxlen=2**63))
    # a spec stored before the cap still decodes: it reads back and can be fixed
    stored = msgspec.json.decode(
        b'{"url": "redis://r", "maxlen": 1000000000000000000000000000000}', type=RedisStreamsTarget
    )
    with pytest.raises(InvalidSpec, match="maxlen"):
        check_target(stored)
    check_target(RabbitMQTarget(url="amqp://u@r", exchange="é" * 127))
    with pytest.raises(InvalidSpec, match=r"invalid exchange: .*255 bytes"):
        check_target(RabbitMQTarget(url="amqp://u@r", exchange="é" * 128))
    with pytest.raises(InvalidSpec, match=r"bootstrap_servers\[0\]"):
        check_target(KafkaTarget(bootstrap_servers=["[::1:9092"]))


def test_the_schema_documents_the_allow_lists() -> None:
    """The field descriptions name exactly the parameters the checks take."""
    _, components = msgspec.json.schema_components([Database, RabbitMQTarget, RedisStreamsTarget])
    described = {
        "Database": components["Database"]["properties"]["dsn"]["description"],
        "RabbitMQTarget": components["RabbitMQTarget"]["properties"]["url"]["description"],
        "RedisStreamsTarget": components["RedisStreamsTarget"]["properties"]["url"]["description"],
    }
    for name, params in (
        ("Database", DSN_PARAMS),
        ("RabbitMQTarget", AMQPS_PARAMS),
        ("RedisStreamsTarget", REDIS_TLS_PARAMS),
    ):
        for param in params:
            assert param in described[name], (name, param)


def test_the_allowed_parameters_are_ones_the_drivers_understand() -> None:
    """None of them becomes a server setting (asyncpg sends unknown DSN parameters to the server) or
    a keyword argument a redis-py connection does not take (the TypeError of ``?path=``)."""
    from asyncpg import connect_utils
    from redis.asyncio.connection import ConnectionPool, parse_url

    dsn = (
        "postgresql://app@db:5432,db2/orders?sslmode=require&sslnegotiation=direct&ssl_min_protocol_version=TLSv1.3"
        "&target_session_attrs=read-write&application_name=shop"
    )
    check_dsn(dsn)
    # widening an allow-list means adding the parameter to the DSN or URL above
    assert set(DSN_PARAMS) == {p.partition("=")[0] for p in dsn.partition("?")[2].split("&")}
    _, params = connect_utils._parse_connect_dsn_and_args(
        dsn=dsn,
        host=None,
        port=None,
        user=None,
        password="x",
        passfile=None,
        database=None,
        ssl=None,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings={"application_name": "outbox-relay"},  # what outbox_relay.tenant.db passes
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )
    assert params.server_settings == {"application_name": "outbox-relay"}
    assert (params.database, params.sslmode.name, params.target_session_attrs.value) == (
        "orders",
        "require",
        "read-write",
    )
    url = "rediss://cache:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false"
    check_redis_url(url)
    assert set(REDIS_TLS_PARAMS) == {p.partition("=")[0] for p in url.partition("?")[2].split("&")}
    ConnectionPool(**parse_url(url)).make_connection()  # builds the connection object: every keyword is taken
    with pytest.raises(TypeError):  # what the allow-list keeps away
        ConnectionPool(**parse_url("redis://cache/0?path=/tmp/x")).make_connection()
