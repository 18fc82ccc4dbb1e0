"""Faults lose nothing: a database backend killed mid-change, a gateway killed mid-traffic,
a process killed in the middle of a stream of concurrent admin changes."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.processes import ServeProcess, keystile_cli
from tests.support import (
    DEADLINE,
    Keystile,
    Upstream,
    make_settings,
    start_keystile,
    wait_until,
)


async def admin_key(ks: Keystile) -> str:
    admin = await ks.user("admin@example.com", role="admin", servers=["*"])
    issued = await ks.key(admin, name="admin", permissions=["admin", "keys", "mcp", "chat"])
    return issued.key


@pytest.fixture
async def patient_keystile(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    """Keystile whose statements may wait as long as a test holds them: only the test, never
    statement_timeout, ends a change it holds."""
    settings = make_settings(upstream, database={"statement_timeout": 600.0})
    async with start_keystile(settings, database_url) as ks:
        yield ks


async def test_database_backend_killed_mid_change_leaves_nothing_half_written(
    patient_keystile: Keystile, database_url: str
) -> None:
    keystile = patient_keystile
    key = await admin_key(keystile)
    member = await keystile.user(servers=["*"])
    target = await keystile.key(member, name="before")
    conn = await asyncpg.connect(database_url)
    try:
        # Hold the change inside its transaction (after the UPDATE, at the audit insert) so
        # the backend running it can be killed there; nothing else ends the hold.
        await conn.execute(
            """
            CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(600); RETURN NEW; END $$;
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
        pid = await wait_until(
            lambda: conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%INSERT INTO audit_events%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ),
            message="the change never reached its audit insert",
        )
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

            # The process keeps running: only its periodic flush can put these uses on disk.
            async def uses_on_disk() -> bool:
                conn = await asyncpg.connect(database_url)
                try:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) = $2 FROM api_keys "
                            "WHERE id = ANY($1::text[]) AND last_used_at IS NOT NULL",
                            created,
                            len(created),
                        )
                    )
                finally:
                    await conn.close()

            await wait_until(uses_on_disk, message="the periodic flush never wrote the uses")

            answered = 0

            async def traffic() -> None:
                nonlocal answered
                while True:
                    try:
                        async with http.get(f"{server.gateway}/api/me", headers=auth) as resp:
                            await resp.read()
                            answered += 1
                    except aiohttp.ClientError:
                        return

            load = asyncio.create_task(traffic())
            await wait_until(lambda: answered >= 20 or load.done(), message="no traffic")
            assert not load.done(), "the traffic stopped before the kill"
            server.signal(signal.SIGKILL)
            async with asyncio.timeout(DEADLINE):
                await load
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
        assert all(r["last_used_at"] is not None for r in rows)  # written before the kill, kept
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{restarted.gateway}/api/me", headers=auth) as resp,
        ):
            assert resp.status == 200
    finally:
        restarted.close()


# --- SIGKILL in the middle of a stream of concurrent admin changes --------------------------

CLIENTS = 8
ACKS_BEFORE_KILL = 40
PATCHED_EXPIRY = datetime(2099, 1, 1, tzinfo=UTC)
PATCHED: dict[str, Any] = {
    "description": "patched",
    "permissions": ["mcp", "chat"],
    "expires_at": PATCHED_EXPIRY.isoformat(),
}


@dataclass
class Change:
    """One admin request a client sent, and the answer it got, if it got one."""

    kind: str  # "create", "patch" or "revoke"
    name: str  # the key's name as created
    key_id: str | None = None  # for a create, known once acknowledged
    status: int | None = None  # the 2xx received in full; None: never acknowledged
    secret: str | None = None  # the full key, from an acknowledged create


async def send(
    http: aiohttp.ClientSession, admin: str, auth: dict[str, str], change: Change
) -> None:
    """Send one change; set its status (and id, secret) only once the whole answer is in."""
    body: dict[str, Any] | None = None
    if change.kind == "create":
        method, url = "POST", f"{admin}/api/keys"
        body = {"name": change.name, "description": "created", "servers": ["*"]}
        body["permissions"] = ["mcp"]
    elif change.kind == "patch":
        method, url = "PATCH", f"{admin}/api/keys/{change.key_id}"
        body = {"name": f"{change.name}-p", **PATCHED}
    else:
        method, url = "DELETE", f"{admin}/api/keys/{change.key_id}"
    async with http.request(method, url, json=body, headers=auth) as resp:
        raw = await resp.read()
        assert 200 <= resp.status < 300, (change, resp.status, raw)
        if change.kind == "create":
            created = json.loads(raw)
            change.key_id, change.secret = created["id"], created["key"]
        change.status = resp.status


async def change_keys(
    http: aiohttp.ClientSession,
    admin: str,
    auth: dict[str, str],
    client: int,
    changes: list[Change],
    acknowledged: Callable[[], None],
) -> None:
    """One client: create a key, patch it, revoke every other one; again, until the process
    is gone. One change in flight at a time."""
    for n in itertools.count():
        name = f"c{client}-{n}"
        key_id = None
        for kind in ("create", "patch", "revoke") if n % 2 == 0 else ("create", "patch"):
            change = Change(kind, name, key_id)
            changes.append(change)
            try:
                await send(http, admin, auth, change)
            except aiohttp.ClientError:
                return  # the process is gone; this change was never acknowledged
            key_id = change.key_id
            acknowledged()


def patched(row: asyncpg.Record) -> bool:
    """Whether a key row carries the PATCH; a row with only part of it fails here."""
    applied = [
        row["name"].endswith("-p"),
        row["description"] == PATCHED["description"],
        list(row["permissions"]) == PATCHED["permissions"],
        row["expires_at"] == PATCHED_EXPIRY,
    ]
    assert all(applied) or not any(applied), f"a PATCH half applied: {dict(row)}"
    return all(applied)


@pytest.mark.parametrize("moment", ["held_mid_transaction", "between_answers"])
async def test_sigkill_amid_concurrent_admin_changes_keeps_each_change_whole(
    database_url: str, tmp_path: Path, moment: str
) -> None:
    """Eight clients create, patch and revoke keys through a real `keystile serve`; it is
    SIGKILLed while changes are in flight. Every acknowledged change is in the database with
    its audit row; every other one is there whole (with its audit row) or not at all.

    held_mid_transaction: the test locks audit_events, so each client's next change stops
    inside its transaction with its key row written and its audit row not; the kill comes
    once all eight are stopped there. between_answers: the kill comes straight after the
    40th acknowledgement while the other clients' requests are outstanding."""
    booted = await asyncio.to_thread(keystile_cli, "bootstrap", database_url=database_url)
    assert booted.returncode == 0, booted.stderr
    auth = {"Authorization": f"Bearer {booted.stdout.strip()}"}
    # Changes held on the lock must not give up on their own before the kill.
    server = ServeProcess(
        database_url, tmp_path, extra_toml="[database]\nstatement_timeout = 600\n"
    )
    changes: list[Change] = []
    acks = 0
    enough = asyncio.Event()
    in_flight_at_kill: list[Change] = []

    def acknowledged() -> None:
        nonlocal acks
        acks += 1
        if acks < ACKS_BEFORE_KILL or enough.is_set():
            return
        outstanding = [c for c in changes if c.status is None]
        if moment == "between_answers" and outstanding:
            # No await between seeing the outstanding requests and the kill.
            server.signal(signal.SIGKILL)
            in_flight_at_kill.extend(outstanding)
        enough.set()

    conn = await asyncpg.connect(database_url)
    try:
        await server.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.gateway}/api/me", headers=auth) as resp:
                assert resp.status == 200
                bootstrap_key = (await resp.json())["key"]["id"]
            clients = [
                asyncio.create_task(change_keys(http, server.admin, auth, n, changes, acknowledged))
                for n in range(CLIENTS)
            ]
            try:
                async with asyncio.timeout(DEADLINE):
                    await enough.wait()
                if moment == "held_mid_transaction":
                    async with conn.transaction():
                        await conn.execute("LOCK TABLE audit_events IN EXCLUSIVE MODE")

                        async def all_held() -> bool:
                            waiting = await conn.fetchval(
                                "SELECT count(*) FROM pg_locks "
                                "WHERE relation = 'audit_events'::regclass AND NOT granted"
                            )
                            return bool(waiting >= CLIENTS)

                        await wait_until(all_held, message="the changes never reached the lock")
                        in_flight_at_kill.extend(c for c in changes if c.status is None)
                        server.signal(signal.SIGKILL)
                        await asyncio.to_thread(server.wait)
                    # The lock is released with nobody left to commit what it held.
                async with asyncio.timeout(DEADLINE):
                    await asyncio.gather(*clients)
            finally:
                for task in clients:
                    task.cancel()
        assert await asyncio.to_thread(server.wait) == -signal.SIGKILL
        assert acks >= ACKS_BEFORE_KILL
        assert in_flight_at_kill, "nothing was in flight at the kill"
        if moment == "held_mid_transaction":
            assert len(in_flight_at_kill) == CLIENTS  # one each, all held in the database

        # Every backend of the killed process gone: its open transactions are rolled back,
        # nothing it had sent can still commit behind the checks.
        async def backends_gone() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) = 0 FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

        await wait_until(backends_gone, message="the killed process's backends linger")

        rows = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, name, description, permissions, expires_at, revoked_at "
                "FROM api_keys WHERE id <> $1",
                bootstrap_key,
            )
        }
        audit = Counter(
            (r["action"], r["target_id"])
            for r in await conn.fetch(
                "SELECT action, target_id FROM audit_events "
                "WHERE target_type = 'key' AND target_id <> $1",
                bootstrap_key,
            )
        )
    finally:
        await conn.close()
        server.close()

    # No audit row without its change, no change without its audit row, nothing half done.
    assert {target for _, target in audit} <= set(rows), "audit rows for keys that do not exist"
    assert {action for action, _ in audit} <= {"key.create", "key.update", "key.revoke"}
    created_names = {c.name for c in changes if c.kind == "create"}
    for key_id, row in rows.items():
        assert row["name"].removesuffix("-p") in created_names, dict(row)
        assert audit["key.create", key_id] == 1, dict(row)
        assert audit["key.update", key_id] == (1 if patched(row) else 0), dict(row)
        assert audit["key.revoke", key_id] == (1 if row["revoked_at"] else 0), dict(row)

    # Every acknowledged change is there.
    acked = [c for c in changes if c.status is not None]
    assert len(acked) >= ACKS_BEFORE_KILL
    for change in acked:
        found = rows.get(str(change.key_id))
        assert found is not None, f"an acknowledged change lost: {change}"
        assert found["name"].removesuffix("-p") == change.name
        if change.kind == "patch":
            assert patched(found), f"an acknowledged PATCH lost: {change}"
        if change.kind == "revoke":
            assert found["revoked_at"] is not None, f"an acknowledged revocation lost: {change}"

    if moment == "held_mid_transaction":
        # Each change in flight had written its key change but not its audit row when the
        # process died: none of it may remain.
        by_name = {row["name"].removesuffix("-p"): row for row in rows.values()}
        for change in in_flight_at_kill:
            held = by_name.get(change.name)
            if change.kind == "create":
                assert held is None, f"a create died mid-transaction yet stayed: {change}"
            elif change.kind == "patch":
                assert held is not None and not patched(held), change
            else:
                assert held is not None and held["revoked_at"] is None, change

    # A restarted process serves exactly what the database holds.
    live = next(c for c in acked if c.kind == "create" and not rows[str(c.key_id)]["revoked_at"])
    gone = next(
        (c for c in acked if c.kind == "create" and rows[str(c.key_id)]["revoked_at"]), None
    )
    restarted = ServeProcess(database_url, tmp_path)
    try:
        await restarted.wait_ready()
        async with aiohttp.ClientSession() as http:
            for probe, expected in ((live, 200), (gone, 401)):
                if probe is None:
                    continue
                headers = {"Authorization": f"Bearer {probe.secret}"}
                async with http.get(f"{restarted.gateway}/api/me", headers=headers) as resp:
                    assert resp.status == expected, probe
    finally:
        restarted.close()
