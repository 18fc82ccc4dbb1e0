"""last_used_at: written behind the request path, in batches, and at shutdown."""

from __future__ import annotations

import asyncpg

from tests.support import Upstream, make_settings, start_keystile, wait_until


async def last_used(database_url: str, key_id: str) -> object:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
    finally:
        await conn.close()


async def test_last_used_is_set_by_the_periodic_flush(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, usage={"flush_interval_seconds": 0.2})
    async with start_keystile(settings, database_url) as ks:
        user = await ks.user(servers=["*"])
        issued = await ks.key(user)
        unused = await ks.key(user, name="unused")
        assert await last_used(database_url, issued.record.id) is None
        assert (await ks.request("GET", "/api/me", issued.key))[0] == 200

        async def written() -> bool:
            return await last_used(database_url, issued.record.id) is not None

        # Still running (no shutdown flush): only the periodic flush can write it.
        await wait_until(written, message="the periodic flush never wrote last_used_at")
        assert await last_used(database_url, unused.record.id) is None
        assert ks.runtime.metrics.count("last_used_flushes") >= 1


async def test_last_used_is_flushed_at_shutdown(database_url: str, upstream: Upstream) -> None:
    settings = make_settings(upstream, usage={"flush_interval_seconds": 3600})
    async with start_keystile(settings, database_url) as ks:
        user = await ks.user(servers=["*"])
        issued = await ks.key(user)
        assert (await ks.request("GET", "/mcp-connect/github/", issued.key))[0] == 200
        assert ks.runtime.usage.pending == 1
        assert await last_used(database_url, issued.record.id) is None  # not on the request path
    assert await last_used(database_url, issued.record.id) is not None


async def test_failed_auth_does_not_touch_last_used(database_url: str, upstream: Upstream) -> None:
    settings = make_settings(upstream, usage={"flush_interval_seconds": 3600})
    async with start_keystile(settings, database_url) as ks:
        user = await ks.user(servers=["*"])
        issued = await ks.key(user)
        await ks.runtime.keyring.update_key(ks.actor, issued.record.id, {"is_active": False})
        assert (await ks.request("GET", "/api/me", issued.key))[0] == 401
        assert ks.runtime.usage.pending == 0
