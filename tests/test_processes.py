"""Real `keystile serve` processes: revocation across instances, workers, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.processes import ServeProcess, keystile_cli
from tests.support import DEADLINE, LOOPBACK, wait_until


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


async def metric(admin_url: str, name: str) -> float:
    """One unlabelled value from a process's /metrics (admin plane)."""
    async with aiohttp.ClientSession() as http, http.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        found = re.search(rf"^keystile_{name} (\S+)$", await resp.text(), re.M)
    assert found is not None, name
    return float(found.group(1))


async def refused(url: str) -> bool:
    """True once a new connection to `url` is refused."""
    try:
        await status_of(url, "", fresh_connection=True)
    except aiohttp.ClientConnectorError:
        return True
    return False


async def test_revocation_on_one_instance_rejects_on_the_other(
    database_url: str, tmp_path: Path
) -> None:
    admin_key = await bootstrap_admin(database_url)
    a, b = ServeProcess(database_url, tmp_path), ServeProcess(database_url, tmp_path)
    try:
        await a.wait_ready()
        await b.wait_ready()  # ready: B's invalidation listener is subscribed
        heard = await metric(b.admin, "invalidations_total")
        created = await create_key(a.admin, admin_key)
        key = str(created["key"])
        assert await status_of(f"{b.gateway}/api/me", key) == 200
        hits = await metric(b.admin, "cache_hits_total")
        assert await status_of(f"{b.gateway}/api/me", key) == 200
        assert await metric(b.admin, "cache_hits_total") > hits  # cached on B
        async with (
            aiohttp.ClientSession() as http,
            http.delete(
                f"{a.admin}/api/keys/{created['id']}",
                headers={"Authorization": f"Bearer {admin_key}"},
            ) as resp,
        ):
            assert resp.status == 204

        async def rejected_on_b() -> bool:
            return await status_of(f"{b.gateway}/api/me", key) == 401

        # B's cache would keep the key for cache_ttl_seconds (300 s): only the revocation's
        # NOTIFY can stop it before the deadline. How fast it does is measured in bench/.
        await wait_until(rejected_on_b, message="B still accepts the revoked key")
        assert await metric(b.admin, "invalidations_total") > heard  # the revocation's
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

        # New connections spread over both workers: every one of a round of 20 must refuse
        # the key. The cache would keep it for 300 s; only each worker's listener can stop it.
        async def refused_everywhere() -> bool:
            statuses = {await status_of(me, key, fresh_connection=True) for _ in range(20)}
            assert statuses <= {200, 401}, statuses
            return statuses == {401}

        await wait_until(refused_everywhere, message="a worker still accepts the disabled key")
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.close()


@dataclass
class DrainUpstream:
    """An upstream on 127.0.0.1 whose /hold answers only when the test says so, and whose
    /stream sends events until the connection goes away."""

    url: str
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a /hold request arrived
    release: asyncio.Event = field(default_factory=asyncio.Event)  # let /hold answer


@asynccontextmanager
async def drain_upstream() -> AsyncIterator[DrainUpstream]:
    upstream = DrainUpstream("")

    async def hold(request: web.Request) -> web.StreamResponse:
        upstream.held.set()
        await upstream.release.wait()
        return web.json_response({"slow": True})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for n in range(1_000_000):
                await response.write(f"id: {n}\ndata: {json.dumps({'n': n})}\n\n".encode())
                await asyncio.sleep(0.05)  # a steady producer, never done on its own
        return response

    app = web.Application()
    app.router.add_get("/mcp/hold", hold)
    app.router.add_get("/mcp/stream", stream)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    upstream.url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    try:
        yield upstream
    finally:
        upstream.release.set()
        await runner.cleanup()


async def test_sigterm_drains_requests_ends_streams_and_flushes_last_used(
    database_url: str, tmp_path: Path
) -> None:
    admin_key = await bootstrap_admin(database_url)
    async with drain_upstream() as upstream:
        # Long enough for the test to see the listener closed and release the held request
        # well inside it, on any machine; the stream is ended half a second before it.
        server = ServeProcess(
            database_url,
            tmp_path,
            gateway_toml="shutdown_timeout = 10.0\n",
            extra_toml=f'[mcp_servers.echo]\nurl = "{upstream.url}/mcp"\n'
            "[usage]\nflush_interval_seconds = 3600\n",
        )
        try:
            await server.wait_ready()
            created = await create_key(server.admin, admin_key)
            headers = {"Authorization": f"Bearer {created['key']}"}
            events: list[bytes] = []
            async with aiohttp.ClientSession() as http:

                async def held() -> tuple[int, str]:
                    url = f"{server.gateway}/mcp-connect/echo/hold"
                    async with http.get(url, headers=headers) as resp:
                        return resp.status, await resp.text()

                async def stream() -> None:
                    url = f"{server.gateway}/mcp-connect/echo/stream"
                    async with http.get(url, headers=headers) as resp:
                        assert resp.status == 200
                        async for line in resp.content:  # raises if the stream is cut
                            if line.startswith(b"data:"):
                                events.append(line)

                slow = asyncio.create_task(held())
                streaming = asyncio.create_task(stream())
                await wait_until(
                    lambda: upstream.held.is_set() and len(events) >= 3,
                    message="the request and the stream never got going",
                )
                server.signal(signal.SIGTERM)
                await wait_until(
                    lambda: refused(f"{server.gateway}/healthz"),
                    message="the gateway kept accepting connections after SIGTERM",
                )
                # Draining: the process is still up, the held request still open...
                assert server.proc.poll() is None, server.stderr()
                assert not slow.done()
                # ...and the stream still flowing.
                at_term = len(events)
                await wait_until(
                    lambda: len(events) > at_term or streaming.done(),
                    message="the stream stalled during the drain",
                )
                assert len(events) > at_term, "the stream was cut at SIGTERM"
                upstream.release.set()  # the held request is answered only now
                async with asyncio.timeout(DEADLINE):
                    slow_status, slow_body = await slow
                    await streaming  # ended by the gateway, cleanly, at the deadline
            assert slow_status == 200 and "slow" in slow_body  # drained, not cut
            assert events == [
                f"data: {json.dumps({'n': n})}\n".encode() for n in range(len(events))
            ]
            assert server.wait() == 0, server.stderr()
        finally:
            server.close()
    conn = await asyncpg.connect(database_url)
    try:
        used = await conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", created["id"])
    finally:
        await conn.close()
    assert used is not None  # flushed at shutdown, though the interval is an hour


@pytest.mark.parametrize(("configured", "serving"), [("", "uvloop"), ("asyncio", "asyncio")])
async def test_serve_runs_on_the_configured_event_loop(
    database_url: str, tmp_path: Path, configured: str, serving: str
) -> None:
    """uvloop by default, asyncio's own loop when configured; either one serves."""
    gateway_toml = f'event_loop = "{configured}"\n' if configured else ""
    proc = ServeProcess(database_url, tmp_path, gateway_toml=gateway_toml)
    try:
        assert (await proc.wait_ready())["status"] == "ready"
        await wait_until(lambda: "event loop:" in proc.stderr(), message=proc.stderr)
        assert f"(event loop: {serving})" in proc.stderr()
    finally:
        proc.close()
