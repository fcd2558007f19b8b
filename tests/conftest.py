"""Shared fixtures: throw-away databases on the machine's PostgreSQL, one run id per pytest run."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

import tests.telemetry  # noqa: F401  (installs the in-memory OTel providers first)
from outbox_relay.config import Settings
from outbox_relay.crypto import generate_key
from outbox_relay.store.migrate import migrate
from service.app import create_app
from tests.helpers import ADMIN_KEY, LiveServer

pytest_plugins = ["tests.harness.brokers", "tests.workers"]

PG_HOST = os.environ.get("OUTBOX_RELAY_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("OUTBOX_RELAY_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("OUTBOX_RELAY_TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("OUTBOX_RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = secrets.token_hex(4)


def pg_dsn(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


class DatabaseFactory:
    """Creates uniquely named databases and drops them all at the end of the run."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self._n = 0

    async def create(self, prefix: str) -> str:
        self._n += 1
        name = f"orly_{prefix}_{RUN_ID}_{self._n}"
        conn = await asyncpg.connect(pg_dsn("postgres"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return name

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(pg_dsn("postgres"))
        try:
            for name in self.created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(scope="session")
async def databases() -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory()
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="session")
async def control_dsn(databases: DatabaseFactory) -> str:
    dsn = pg_dsn(await databases.create("control"))
    await migrate(dsn)
    return dsn


@pytest.fixture(scope="session")
def settings(control_dsn: str) -> Settings:
    return Settings(
        database_url=control_dsn,
        redis_url=REDIS_URL,
        admin_api_key=ADMIN_KEY,
        secret_keys=(generate_key(),),
        allow_private_networks=True,
        queue_name=f"outbox-relay-test-{RUN_ID}",
        slice_s=5.0,
        lease_ttl_s=3.0,
        schedule_interval_s=0.5,
        connect_timeout_s=3.0,
        # the engine tests poll fast (FAST_RETRY: 50 ms); tests/api/test_limits.py checks the bound itself
        min_poll_interval_ms=10,
        # the whole run is one client address of one app: tests that send wrong keys on purpose must not
        # lock the rest out (tests/api/test_limits.py checks the limit on its own app)
        auth_failure_limit=100_000,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def run_id() -> Iterator[str]:
    yield RUN_ID


@pytest.fixture(scope="session")
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """The app in-process over the run's control DB."""
    async with AsyncTestClient(app=create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def live_api(settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()
