"""Storage: migrations under an advisory lock, and the embedded server keeping its data."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import asyncpg

from gateway.db import migrations
from gateway.embedded_pg import EmbeddedPostgres
from tests.processes import ServeProcess


async def test_two_processes_migrate_an_empty_database_at_once(
    empty_database_url: str, tmp_path: Path
) -> None:
    procs = [ServeProcess(empty_database_url, tmp_path) for _ in range(2)]
    try:
        for proc in procs:
            assert (await proc.wait_ready())["store"] is True
        for proc in procs:
            proc.signal(signal.SIGTERM)
        codes = [proc.wait() for proc in procs]
        errors = [proc.stderr() for proc in procs]
    finally:
        for proc in procs:
            proc.close()
    assert codes == [0, 0], errors
    assert all("Traceback" not in err for err in errors), errors
    conn = await asyncpg.connect(empty_database_url)
    try:
        versions = [
            r["version"] for r in await conn.fetch("SELECT version FROM keystile_migrations")
        ]
        assert versions == [m.version for m in migrations()]  # each applied exactly once
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0
    finally:
        await conn.close()


def test_embedded_postgres_keeps_data_across_restarts(tmp_path: Path) -> None:
    async def write(url: str) -> None:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        await conn.close()

    async def read(url: str) -> str:
        conn = await asyncpg.connect(url)
        try:
            return str(await conn.fetchval("SELECT v FROM kept"))
        finally:
            await conn.close()

    first = EmbeddedPostgres(tmp_path / "data", fsync=False)
    asyncio.run(write(first.start()))
    first.stop()
    second = EmbeddedPostgres(tmp_path / "data", fsync=False)
    try:
        assert asyncio.run(read(second.start())) == "still here"
        assert second.started_here
    finally:
        second.stop()


def test_embedded_postgres_is_reused_when_already_running(tmp_path: Path) -> None:
    owner = EmbeddedPostgres(tmp_path / "data", fsync=False)
    url = owner.start()
    try:
        guest = EmbeddedPostgres(tmp_path / "data")
        assert guest.start() == url
        assert not guest.started_here
        guest.stop()  # a guest never stops the owner's server
        assert asyncio.run(_select_one(url)) == 1
    finally:
        owner.stop()


async def _select_one(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


async def test_migrate_command_applies_the_schema_and_exits(empty_database_url: str) -> None:
    from tests.processes import keystile_cli

    done = await asyncio.to_thread(keystile_cli, "migrate", database_url=empty_database_url)
    assert done.returncode == 0, done.stderr
    again = await asyncio.to_thread(keystile_cli, "migrate", database_url=empty_database_url)
    assert again.returncode == 0, again.stderr
    conn = await asyncpg.connect(empty_database_url)
    try:
        versions = [
            r["version"] for r in await conn.fetch("SELECT version FROM keystile_migrations")
        ]
    finally:
        await conn.close()
    assert versions == [m.version for m in migrations()]
