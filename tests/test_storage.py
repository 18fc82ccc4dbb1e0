"""Storage: migrations under an advisory lock, and the embedded server keeping its data."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

from gateway.db import migrations
from gateway.embedded_pg import EmbeddedPostgres


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_process(
    database_url: str, tmp_path: Path, name: str
) -> tuple[subprocess.Popen[bytes], int]:
    gateway_port, admin_port = free_port(), free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
    )
    env = {**os.environ, "DATABASE_URL": database_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc, gateway_port


async def wait_ready(port: int, within: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        body: dict[str, object] = await resp.json()
                        return body
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            await asyncio.sleep(0.1)


async def test_two_processes_migrate_an_empty_database_at_once(
    empty_database_url: str, tmp_path: Path
) -> None:
    procs = [serve_process(empty_database_url, tmp_path, f"p{i}") for i in range(2)]
    try:
        for _, port in procs:
            assert (await wait_ready(port))["store"] is True
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        errors = [proc.communicate(timeout=30)[1].decode() for proc, _ in procs]
        codes = [proc.returncode for proc, _ in procs]
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
