"""With the key store unreachable: cached keys keep working, uncached keys get 503, not 401."""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.support import FaultyProxy, Upstream, make_settings, start_keystile, wait_until


async def test_cached_key_works_and_uncached_gets_503_while_store_is_down(
    database_url: str, upstream: Upstream, db_proxy: FaultyProxy
) -> None:
    settings = make_settings(upstream, database={"connect_timeout": 1.0, "statement_timeout": 2.0})
    async with start_keystile(settings, db_proxy.url_for(database_url)) as ks:
        user = await ks.user(servers=["*"])
        cached = await ks.key(user, name="cached")
        uncached = await ks.key(user, name="uncached")
        assert (await ks.request("GET", "/mcp-connect/github/", cached.key))[0] == 200

        await db_proxy.cut()
        status, _, _ = await ks.request("GET", "/mcp-connect/github/", cached.key)
        assert status == 200
        status, headers, body = await ks.request("GET", "/api/me", uncached.key)
        assert status == 503
        assert body["error"] == "store_unavailable"
        assert int(headers["Retry-After"]) > 0
        status, _, body = await ks.request("GET", "/readyz")
        assert status == 503 and body["store"] is False

        await db_proxy.restore()
        status, _, _ = await ks.request("GET", "/api/me", uncached.key)
        assert status == 200


async def test_last_used_survives_an_outage_and_is_written_after(
    database_url: str, upstream: Upstream, db_proxy: FaultyProxy
) -> None:
    settings = make_settings(
        upstream,
        database={"connect_timeout": 1.0, "statement_timeout": 2.0},
        usage={"flush_interval_seconds": 0.2},
    )
    async with start_keystile(settings, db_proxy.url_for(database_url)) as ks:
        user = await ks.user(servers=["*"])
        issued = await ks.key(user)
        assert (await ks.request("GET", "/api/me", issued.key))[0] == 200
        # The first use written (the buffer empties before its write commits: ask the table).
        first = await wait_until(lambda: last_used_at(database_url, issued.record.id))

        await db_proxy.cut()
        assert (await ks.request("GET", "/api/me", issued.key))[0] == 200  # cached: still works
        metrics = ks.runtime.metrics
        failures = metrics.count("last_used_flush_failures")
        await wait_until(lambda: metrics.count("last_used_flush_failures") >= failures + 2)
        # Kept, not lost: back in the buffer after each failed write (a write in flight holds
        # it out of the buffer for a moment, so wait for a moment between attempts).
        await wait_until(lambda: ks.runtime.usage.pending == 1)
        assert metrics.count("last_used_dropped") == 0

        await db_proxy.restore()

        async def written_after_outage() -> bool:
            return bool(await last_used_at(database_url, issued.record.id) > first)

        await wait_until(written_after_outage, message="the kept use was never written")
        # Recovered without a restart: a key never seen before verifies again.
        fresh = await ks.key(user, name="fresh")
        assert (await ks.request("GET", "/api/me", fresh.key))[0] == 200


async def test_last_used_buffer_drops_oldest_past_its_bound_and_counts(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, usage={"flush_interval_seconds": 3600, "max_pending": 2})
    async with start_keystile(settings, database_url) as ks:
        user = await ks.user(servers=["*"])
        issued = [await ks.key(user, name=f"k{i}") for i in range(3)]
        for key in issued:
            assert (await ks.request("GET", "/api/me", key.key))[0] == 200
        assert ks.runtime.usage.pending == 2
        assert ks.runtime.metrics.count("last_used_dropped") == 1
        async with ks.http.get(f"{ks.admin}/metrics") as resp:
            assert "keystile_last_used_dropped_total 1" in await resp.text()
    assert await last_used_at(database_url, issued[0].record.id) is None  # the dropped one
    assert await last_used_at(database_url, issued[2].record.id) is not None


async def last_used_at(database_url: str, key_id: str) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1", key_id)
    finally:
        await conn.close()
