"""Faults lose nothing: a database backend killed mid-change, a gateway killed mid-traffic."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import asyncpg

from tests.processes import ServeProcess, keystile_cli
from tests.support import Keystile


async def admin_key(ks: Keystile) -> str:
    admin = await ks.user("admin@example.com", role="admin", servers=["*"])
    issued = await ks.key(admin, name="admin", permissions=["admin", "keys", "mcp", "chat"])
    return issued.key


async def test_database_backend_killed_mid_change_leaves_nothing_half_written(
    keystile: Keystile, database_url: str
) -> None:
    key = await admin_key(keystile)
    member = await keystile.user(servers=["*"])
    target = await keystile.key(member, name="before")
    conn = await asyncpg.connect(database_url)
    try:
        # Hold the change inside its transaction (after the UPDATE, at the audit insert) so
        # the backend running it can be killed there.
        await conn.execute(
            """
            CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$;
            CREATE TRIGGER hold BEFORE INSERT ON audit_events FOR EACH ROW
            WHEN (NEW.action = 'key.update') EXECUTE FUNCTION hold();
            """
        )
        before = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", target.record.id)
        audit_before = await conn.fetchval("SELECT count(*) FROM audit_events")
        patch = asyncio.create_task(
            keystile.http.patch(
                f"{keystile.admin}/api/keys/{target.record.id}",
                json={"name": "after"},
                headers={"Authorization": f"Bearer {key}"},
            )
        )
        pid = None
        for _ in range(200):
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%INSERT INTO audit_events%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            )
            if pid is not None:
                break
            await asyncio.sleep(0.05)
        assert pid is not None, "the change never reached its audit insert"
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        response = await patch
        body = await response.json()
        response.release()
        assert response.status == 503 and body["error"] == "store_unavailable"
        after = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", target.record.id)
        assert after is not None and before is not None
        assert dict(after) == dict(before)  # the UPDATE rolled back with the transaction
        assert await conn.fetchval("SELECT count(*) FROM audit_events") == audit_before
        await conn.execute("DROP TRIGGER hold ON audit_events")
    finally:
        await conn.close()
    # The pool recovers: the same change now goes through.
    async with keystile.http.patch(
        f"{keystile.admin}/api/keys/{target.record.id}",
        json={"name": "after"},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 200


async def test_gateway_killed_mid_traffic_loses_no_key_or_audit_row(
    database_url: str, tmp_path: Path
) -> None:
    booted = await asyncio.to_thread(keystile_cli, "bootstrap", database_url=database_url)
    admin = booted.stdout.strip()
    auth = {"Authorization": f"Bearer {admin}"}
    server = ServeProcess(
        database_url, tmp_path, extra_toml="[usage]\nflush_interval_seconds = 0.5\n"
    )
    created: list[str] = []
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession() as http:
            for i in range(10):
                async with http.post(
                    f"{server.admin}/api/keys",
                    json={"name": f"k{i}", "servers": ["*"]},
                    headers=auth,
                ) as resp:
                    assert resp.status == 201
                    body = await resp.json()
                    created.append(body["id"])
                    key = body["key"]
                async with http.get(
                    f"{server.gateway}/api/me", headers={"Authorization": f"Bearer {key}"}
                ) as resp:
                    assert resp.status == 200
            await asyncio.sleep(1.5)  # three flush intervals: these uses are on disk

            async def traffic() -> None:
                while True:
                    try:
                        async with http.get(f"{server.gateway}/api/me", headers=auth) as resp:
                            await resp.read()
                    except aiohttp.ClientError:
                        return

            load = asyncio.create_task(traffic())
            await asyncio.sleep(0.3)
            server.signal(signal.SIGKILL)
            await asyncio.wait_for(load, 10)
        assert server.wait() == -signal.SIGKILL
    finally:
        server.close()

    restarted = ServeProcess(database_url, tmp_path)
    try:
        await restarted.wait_ready()
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT id, last_used_at FROM api_keys WHERE id = ANY($1::text[])", created
            )
            creates = await conn.fetchval(
                "SELECT count(*) FROM audit_events WHERE action = 'key.create' "
                "AND target_id = ANY($1::text[])",
                created,
            )
        finally:
            await conn.close()
        assert len(rows) == 10 and creates == 10  # every acknowledged change survived
        assert all(r["last_used_at"] is not None for r in rows)  # used > interval before kill
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{restarted.gateway}/api/me", headers=auth) as resp,
        ):
            assert resp.status == 200
    finally:
        restarted.close()
