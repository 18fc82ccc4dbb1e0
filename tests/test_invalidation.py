"""Revocation everywhere at once, and a listener whose loss never lets a stale key through."""

from __future__ import annotations

from dataclasses import replace

import asyncpg

from gateway.config import Secret
from tests.support import (
    FaultyProxy,
    Keystile,
    Upstream,
    make_settings,
    start_keystile,
    wait_until,
)


async def sql(database_url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def revoke_elsewhere(database_url: str, key_id: str) -> None:
    """What another instance's revocation looks like to this one: the row and a NOTIFY."""
    await sql(
        database_url,
        "WITH r AS (UPDATE api_keys SET revoked_at = now() WHERE id = $1 RETURNING id) "
        "SELECT pg_notify('keystile_invalidate', 'key:' || id) FROM r",
        key_id,
    )


async def cached_key(ks: Keystile, email: str = "member@example.com") -> tuple[str, str]:
    # Startup waits for the listener's first subscription only up to connect_timeout; its
    # subscribing later would clear the cache under the test.
    listener = ks.runtime.listener
    await wait_until(lambda: listener.connected, message="the listener never subscribed")
    user = await ks.user(email, servers=["*"])
    issued = await ks.key(user)
    assert (await ks.request("GET", "/api/me", issued.key))[0] == 200
    assert ks.runtime.cache.get(issued.record.id) is not None
    return issued.record.id, issued.key


async def test_notify_from_another_instance_evicts(keystile: Keystile, database_url: str) -> None:
    key_id, key = await cached_key(keystile)
    invalidations = keystile.runtime.metrics.count("invalidations")
    await revoke_elsewhere(database_url, key_id)

    async def rejected() -> bool:
        return (await keystile.request("GET", "/api/me", key))[0] == 401

    # The cache would keep the key for cache_ttl_seconds (300 s): only the NOTIFY can evict it
    # before the deadline. How fast it does is measured in bench/.
    assert keystile.runtime.settings.keys.cache_ttl_seconds > 60
    await wait_until(rejected, message="the revoked key is still accepted")
    assert keystile.runtime.metrics.count("invalidations") > invalidations


async def test_grant_change_elsewhere_evicts_the_users_keys(
    keystile: Keystile, database_url: str
) -> None:
    user = await keystile.user(servers=["github", "gitlab"])
    issued = await keystile.key(user)
    assert (await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))[0] == 200
    await sql(
        database_url,
        "DELETE FROM server_grants WHERE user_id = $1 AND server = 'gitlab';"
        " SELECT pg_notify('keystile_invalidate', 'user:' || $1)".replace("$1", f"'{user.id}'"),
    )

    async def forbidden() -> bool:
        return (await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))[0] == 403

    # Only the NOTIFY can end the cached grant before the deadline (the cache TTL is 300 s).
    await wait_until(forbidden, message="the withdrawn grant still reaches gitlab")
    assert (await keystile.request("GET", "/mcp-connect/github/", issued.key))[0] == 200


async def test_terminated_listener_reconnects_and_clears_the_cache(
    keystile: Keystile, database_url: str
) -> None:
    key_id, key = await cached_key(keystile)
    listener = keystile.runtime.listener
    old_pid = listener.connection_pid
    connects = keystile.runtime.metrics.count("listener_connects")
    await sql(database_url, "SELECT pg_terminate_backend($1)", old_pid)

    async def resubscribed() -> bool:
        return keystile.runtime.metrics.count("listener_connects") > connects and listener.connected

    await wait_until(resubscribed, message="the listener never resubscribed")
    assert listener.connection_pid != old_pid
    assert keystile.runtime.cache.get(key_id) is None  # cleared on resubscription
    assert (await keystile.request("GET", "/api/me", key))[0] == 200


async def test_listener_gap_is_fail_safe_and_readyz_says_so(
    database_url: str, upstream: Upstream, db_proxy: FaultyProxy
) -> None:
    settings = make_settings(upstream, database={"connect_timeout": 1.0})
    listen_url = Secret(db_proxy.url_for(database_url))
    settings = replace(settings, database=replace(settings.database, listen_url=listen_url))
    async with start_keystile(settings, database_url) as ks:
        key_id, key = await cached_key(ks)
        _, survivor = await cached_key(ks, "survivor@example.com")
        await db_proxy.cut()

        async def not_ready() -> bool:
            status, _, body = await ks.request("GET", "/readyz")
            return status == 503 and body["listener"] is False and body["store"] is True

        await wait_until(not_ready, message="readyz never reported the listener down")
        # A change this process cannot hear about: it must still never serve the stale key.
        await revoke_elsewhere(database_url, key_id)
        assert (await ks.request("GET", "/api/me", key))[0] == 401
        assert (await ks.request("GET", "/api/me", survivor))[0] == 200
        assert ks.runtime.metrics.count("cache_revalidations") >= 2

        await db_proxy.restore()

        async def ready() -> bool:
            return (await ks.request("GET", "/readyz"))[0] == 200

        await wait_until(ready, message="readyz never recovered")
        assert ks.runtime.cache.trusted
        assert (await ks.request("GET", "/api/me", survivor))[0] == 200


async def test_creating_a_key_evicts_nothing(keystile: Keystile, database_url: str) -> None:
    """A new key sends no invalidation notice: one heard after the key was first verified would
    evict it, and the next request would need a lookup (or, from a client the throttle holds
    back, be refused)."""
    listener = keystile.runtime.listener
    await wait_until(lambda: listener.connected, message="the listener never subscribed")
    user = await keystile.user(servers=["*"])
    await all_notices_heard(keystile, database_url)  # the user's own, if any
    heard = keystile.runtime.metrics.count("invalidations")
    issued = await keystile.key(user)
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    await all_notices_heard(keystile, database_url)
    assert keystile.runtime.metrics.count("invalidations") == heard + 1  # the marker alone
    assert keystile.runtime.cache.get(issued.record.id) is not None


async def all_notices_heard(ks: Keystile, database_url: str) -> None:
    """Send a marker notice and wait until it is heard: notices arrive in commit order, so
    every notice committed before it has been heard too."""
    heard = ks.runtime.metrics.count("invalidations")
    await sql(database_url, "SELECT pg_notify('keystile_invalidate', 'user:no-such-user')")
    await wait_until(
        lambda: ks.runtime.metrics.count("invalidations") > heard,
        message="the marker notice was never heard",
    )
