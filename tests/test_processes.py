"""Real `keystile serve` processes: revocation across instances, workers, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.processes import ServeProcess, keystile_cli
from tests.support import Upstream


async def bootstrap_admin(database_url: str) -> str:
    done = await asyncio.to_thread(keystile_cli, "bootstrap", database_url=database_url)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def create_key(admin_url: str, admin_key: str, **fields: object) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{admin_url}/api/keys",
            json={"name": "k", "servers": ["*"], **fields},
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        body: dict[str, object] = await resp.json()
        return body


async def status_of(url: str, key: str, *, fresh_connection: bool = False) -> int:
    connector = aiohttp.TCPConnector(force_close=fresh_connection)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status


def upstream_toml(upstream: Upstream) -> str:
    return f'[mcp_servers.echo]\nurl = "{upstream.url}/mcp"\n'


async def test_revocation_on_one_instance_rejects_on_the_other_within_a_second(
    database_url: str, tmp_path: Path
) -> None:
    admin_key = await bootstrap_admin(database_url)
    a, b = ServeProcess(database_url, tmp_path), ServeProcess(database_url, tmp_path)
    try:
        await a.wait_ready()
        await b.wait_ready()
        created = await create_key(a.admin, admin_key)
        key = str(created["key"])
        assert await status_of(f"{b.gateway}/api/me", key) == 200  # now cached on B
        async with aiohttp.ClientSession() as http:
            async with http.delete(
                f"{a.admin}/api/keys/{created['id']}",
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as resp:
                assert resp.status == 204
            revoked_at = time.monotonic()
            while True:
                async with http.get(
                    f"{b.gateway}/api/me", headers={"Authorization": f"Bearer {key}"}
                ) as resp:
                    if resp.status == 401:
                        break
                assert time.monotonic() - revoked_at < 1.0, "B still accepts the revoked key"
                await asyncio.sleep(0.01)
    finally:
        a.close()
        b.close()


async def test_two_workers_share_the_ports_and_each_hears_revocations(
    database_url: str, tmp_path: Path
) -> None:
    admin_key = await bootstrap_admin(database_url)
    server = ServeProcess(database_url, tmp_path, workers=2)
    try:
        await server.wait_ready()
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
        assert len((await asyncio.to_thread(children.read_text)).split()) == 2
        created = await create_key(server.admin, admin_key)
        key = str(created["key"])
        me = f"{server.gateway}/api/me"
        # New connections spread over both workers; each caches the key.
        assert {await status_of(me, key, fresh_connection=True) for _ in range(20)} == {200}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{server.admin}/api/keys/{created['id']}/disable",
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as resp,
        ):
            assert resp.status == 200
        await asyncio.sleep(0.5)
        assert {await status_of(me, key, fresh_connection=True) for _ in range(20)} == {401}
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.close()


async def test_sigterm_drains_requests_ends_streams_and_flushes_last_used(
    database_url: str, tmp_path: Path, upstream: Upstream
) -> None:
    admin_key = await bootstrap_admin(database_url)
    server = ServeProcess(
        database_url,
        tmp_path,
        gateway_toml="shutdown_timeout = 2.0\n",
        extra_toml=upstream_toml(upstream) + "[usage]\nflush_interval_seconds = 3600\n",
    )
    try:
        await server.wait_ready()
        created = await create_key(server.admin, admin_key)
        key = str(created["key"])
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:

            async def slow() -> tuple[int, str]:
                url = f"{server.gateway}/mcp-connect/echo/slow?seconds=1"
                async with http.get(url, headers=headers) as resp:
                    return resp.status, await resp.text()

            async def stream() -> list[bytes]:
                url = f"{server.gateway}/mcp-connect/echo/sse?count=1000&delay=0.1"
                async with http.get(url, headers=headers) as resp:
                    return [line async for line in resp.content if line.startswith(b"data:")]

            in_flight = asyncio.gather(slow(), stream())
            await asyncio.sleep(0.5)
            server.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(aiohttp.ClientConnectorError):  # no longer accepting
                await status_of(f"{server.gateway}/healthz", key, fresh_connection=True)
            (slow_status, slow_body), events = await in_flight
        assert slow_status == 200 and "slow" in slow_body  # finished, not cut
        assert 5 < len(events) < 1000  # the stream ran, then ended cleanly at the deadline
        assert server.wait() == 0, server.stderr()
    finally:
        server.close()
    conn = await asyncpg.connect(database_url)
    try:
        used = await conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", created["id"])
    finally:
        await conn.close()
    assert used is not None  # flushed at shutdown, though the interval is an hour
