"""Shared fixtures: one PostgreSQL per run, a fresh database per test, real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from gateway.db import migrate
from gateway.embedded_pg import EmbeddedPostgres
from tests.support import (
    FaultyProxy,
    Keystile,
    Upstream,
    make_settings,
    start_keystile,
    start_upstream,
)

TEMPLATE = f"keystile_template_{os.getpid()}"


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL server for the whole run: DATABASE_URL's, or an embedded one."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    with tempfile.TemporaryDirectory(prefix="keystile-pg-") as data_dir:
        embedded = EmbeddedPostgres(data_dir, fsync=False)
        url = embedded.start()
        try:
            yield url
        finally:
            embedded.stop(mode="immediate")


@pytest.fixture(scope="session")
def template_db(pg_url: str) -> Iterator[str]:
    """A migrated template; every test's database is a cheap copy of it."""

    async def create() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
            await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_database(pg_url, TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    yield TEMPLATE
    asyncio.run(drop())


async def _fresh_database(pg_url: str, template: str | None) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(pg_url)
    try:
        suffix = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{suffix}')
    finally:
        await conn.close()
    return name, _with_database(pg_url, name)


async def _drop_database(pg_url: str, name: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def database_url(pg_url: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name, url = await _fresh_database(pg_url, template_db)
    yield url
    await _drop_database(pg_url, name)


@pytest.fixture
async def empty_database_url(pg_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name, url = await _fresh_database(pg_url, None)
    yield url
    await _drop_database(pg_url, name)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await start_upstream()
    yield server
    await server.close()


@pytest.fixture
async def keystile(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    """Keystile (both planes) on ephemeral ports, in front of the echo upstream."""
    settings = make_settings(upstream)
    async with start_keystile(settings, database_url) as ks:
        yield ks


@pytest.fixture
async def db_proxy(database_url: str) -> AsyncIterator[FaultyProxy]:
    """A fault-injecting TCP proxy in front of the test's PostgreSQL (see FaultyProxy)."""
    port = urlsplit(database_url).port
    assert port is not None
    proxy = FaultyProxy(port)
    await proxy.start()
    yield proxy
    await proxy.cut()
