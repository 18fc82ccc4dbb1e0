"""With the key store unreachable: cached keys keep working, uncached keys get 503, not 401."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from tests.support import FaultyProxy, Upstream, make_settings, start_keystile


@pytest.fixture
async def db_proxy(database_url: str) -> AsyncIterator[FaultyProxy]:
    port = urlsplit(database_url).port
    assert port is not None
    proxy = FaultyProxy(port)
    await proxy.start()
    yield proxy
    await proxy.cut()


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
