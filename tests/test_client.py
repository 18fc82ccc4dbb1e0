"""admin.client.KeystileAdmin against a running admin plane (real PostgreSQL, real HTTP): every
method, the API's errors as KeystileError, an unreachable plane, and the key kept out of
reprs, messages and logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from admin.client import KeystileAdmin, KeystileError, KeystileUnreachable
from gateway.calls import CallRecord
from gateway.config import UpstreamSettings
from gateway.keyring import IssuedKey
from gateway.keys import parse
from gateway.usage_store import write_calls
from tests.mcp_servers import serve, streamable_app
from tests.processes import free_port
from tests.support import Keystile, make_admin, make_settings, start_keystile


@pytest.fixture
async def admin(keystile: Keystile) -> AsyncIterator[KeystileAdmin]:
    _, issued = await make_admin(keystile)
    async with KeystileAdmin(keystile.admin, issued.key) as client:
        yield client


def call_records(issued: IssuedKey, count: int) -> list[CallRecord]:
    """`count` requests of this key over the last two days: tools, statuses and sizes vary."""
    key = issued.record
    start = datetime.now(UTC) - timedelta(days=2)
    return [
        CallRecord(
            time=(start + timedelta(minutes=30 * n)).timestamp(),
            request_id=f"r{n}",
            workspace_id=key.workspace_id,
            user_id=key.user_id,
            key_id=key.id,
            route="mcp",
            server="github",
            mcp_method="tools/call" if n % 3 else None,
            tool=("search", "get_issue")[n % 2] if n % 3 else None,
            status=502 if n % 3 == 0 else 200,  # the calls of no tool fail
            duration_ms=5.0 * (n + 1),
            bytes_in=100 + n,
            bytes_out=1000 + n,
            client="127.0.0.1",
        )
        for n in range(count)
    ]


def later(days: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(days=days)


async def test_keys_every_method(keystile: Keystile, admin: KeystileAdmin) -> None:
    member = await admin.users.create("dev@example.com", servers=["github"])
    expires = later(30)
    created = await admin.keys.create(
        "ci",
        ["gitlab", "github"],
        user_id=member["id"],
        permissions=["chat", "mcp"],
        description="deploys",
        expires_at=expires,
        rate_limit={"requests": 10, "per_seconds": 60},
        allowed_cidrs=["10.1.2.3/8"],
        allowed_origins=("HTTPS://Widget.Example.com:443", "http://127.0.0.1:3000"),
        tools=["github/search_*"],
    )
    parsed = parse(created["key"])
    assert parsed is not None and parsed.key_id == created["id"]
    assert created["servers"] == ["github", "gitlab"]  # canonicalised by the API
    assert created["permissions"] == ["mcp", "chat"]
    assert created["allowed_cidrs"] == ["10.0.0.0/8"]
    # A tuple is sent as a list; origins come back as browsers send them.
    assert created["allowed_origins"] == ["https://widget.example.com", "http://127.0.0.1:3000"]
    assert created["expires_at"] == expires.isoformat().replace("+00:00", "Z")
    assert created["user"]["email"] == "dev@example.com"
    key_id = created["id"]

    fetched = await admin.keys.fetch(key_id)
    assert "key" not in fetched and fetched["prefix"].endswith("…")
    assert {k["id"] for k in await admin.keys.fetch_all()} == {admin.key_id}  # own keys
    assert key_id in {k["id"] for k in await admin.keys.fetch_all(all=True)}
    assert [k["id"] for k in await admin.keys.fetch_all(user_id=member["id"])] == [key_id]

    updated = await admin.keys.update(
        key_id, expires_at=None, tools=None, allowed_cidrs=None, allowed_origins=None, name="ci-2"
    )
    assert (updated["expires_at"], updated["tools"], updated["name"]) == (None, None, "ci-2")
    assert updated["allowed_cidrs"] is None and updated["allowed_origins"] is None
    assert (await admin.keys.disable(key_id))["status"] == "disabled"
    assert [k["id"] for k in await admin.keys.fetch_all(all=True, status="disabled")] == [key_id]
    assert (await admin.keys.enable(key_id))["status"] == "active"

    rotated = await admin.keys.rotate(key_id, grace_seconds=60)
    assert rotated["id"] == key_id and rotated["key"] != created["key"]
    old, new = created["key"], rotated["key"]
    for secret in (old, new):  # the old one within its grace period
        status, _, _ = await keystile.request("GET", "/api/me", secret)
        assert status == 200

    await admin.keys.delete(key_id)
    assert (await admin.keys.fetch(key_id))["status"] == "revoked"
    assert key_id not in {k["id"] for k in await admin.keys.fetch_all(all=True)}
    assert [k["id"] for k in await admin.keys.fetch_all(all=True, status="revoked")] == [key_id]
    status, _, _ = await keystile.request("GET", "/api/me", new)
    assert status == 401


async def test_users_every_method(admin: KeystileAdmin) -> None:
    user = await admin.users.create(
        "Ann@Example.com", display_name="Ann", servers=["github"], tools=["github/*"]
    )
    assert (user["role"], user["servers"], user["tools"]) == ("member", ["github"], ["github/*"])
    assert await admin.users.fetch(user["id"]) == user
    assert user["id"] in {u["id"] for u in await admin.users.fetch_all()}
    found = await admin.users.find("ann@example.COM")  # emails compare without case
    assert found is not None and found["id"] == user["id"]
    assert await admin.users.find("nobody@example.com") is None

    changed = await admin.users.update(user["id"], display_name="Ann B", role="admin")
    assert (changed["display_name"], changed["role"], changed["tools"]) == ("Ann B", "admin", None)
    changed = await admin.users.update(user["id"], role="member", is_active=False)
    assert (changed["role"], changed["is_active"]) == ("member", False)
    assert (await admin.users.grant_servers(user["id"], ["*"]))["servers"] == ["*"]
    granted = await admin.users.grant_tools(user["id"], ["gitlab/*", "!gitlab/drop_*"])
    assert granted["tools"] == ["gitlab/*", "!gitlab/drop_*"]
    assert (await admin.users.grant_tools(user["id"], None))["tools"] is None

    await admin.users.delete(user["id"])
    with pytest.raises(KeystileError) as caught:
        await admin.users.fetch(user["id"])
    assert (caught.value.status, caught.value.error) == (404, "not_found")


async def test_servers_usage_calls_and_audit(keystile: Keystile, admin: KeystileAdmin) -> None:
    servers = await admin.servers()
    assert servers == [{"name": name, "granted": True} for name in ("github", "gitlab", "tokened")]
    member = await keystile.user("m@example.com", servers=["github"])
    issued = await keystile.key(member)
    records = call_records(issued, 30)
    await write_calls(keystile.runtime.pool, records)

    start, end = datetime.now(UTC) - timedelta(days=5), datetime.now(UTC)
    total = await admin.usage(from_=start, to=end)
    assert total["rows"][0]["requests"] == 30
    by_tool = await admin.usage(from_=start, to=end, group_by=["tool"], user_id=member.id)
    assert sum(r["requests"] for r in by_tool["rows"]) == 30
    assert {r.get("tool") for r in by_tool["rows"]} <= {"search", "get_issue", None}
    searched = await admin.usage(from_=start, to=end, tool="search", key_id=issued.record.id)
    assert searched["rows"][0]["requests"] == sum(1 for r in records if r.tool == "search")
    text = await admin.usage_csv(from_=start, to=end, group_by="tool")
    lines = text.split("\r\n")
    assert lines[0] == "tool,requests,errors,p50_ms,p95_ms,bytes_in,bytes_out"
    assert len([line for line in lines[1:] if line]) == len(by_tool["rows"])

    page = await admin.calls(user_id=member.id, limit=7)
    assert len(page["calls"]) == 7 and page["next_before"] is not None
    every = [c async for c in admin.iter_calls(user_id=member.id, page_size=7)]
    assert len(every) == 30 and every[:7] == page["calls"]
    assert [c["id"] for c in every] == sorted((c["id"] for c in every), reverse=True)
    errors = await admin.calls(key_id=issued.record.id, status=502)
    assert all(c["status"] == 502 for c in errors["calls"])

    events = await admin.audit(limit=2)
    assert [e["action"] for e in events["events"]] == ["key.create", "user.create"]
    older = await admin.audit(before=events["next_before"])
    assert older["events"] and older["events"][0]["id"] < events["events"][-1]["id"]


async def test_server_tools(database_url: str) -> None:
    async with serve(streamable_app()) as (server,):
        settings = replace(
            make_settings(),
            mcp_servers={
                "sdk": UpstreamSettings(url=f"{server.origin}/mcp"),
                "down": UpstreamSettings(url=f"http://127.0.0.1:{free_port()}/mcp"),
            },
        )
        async with start_keystile(settings, database_url) as ks:
            _, issued = await make_admin(ks)
            async with KeystileAdmin(ks.admin, issued.key) as client:
                found = await client.server_tools("sdk")
                assert found["server"] == "sdk" and found["fetched_at"].endswith("Z")
                assert "echo" in {t["name"] for t in found["tools"]}
                with pytest.raises(KeystileError) as down:
                    await client.server_tools("down")
                assert (down.value.status, down.value.error) == (502, "bad_gateway")
                with pytest.raises(KeystileError) as unknown:
                    await client.server_tools("nowhere/../sdk")  # one escaped path segment
                assert unknown.value.status == 404


async def test_errors_carry_the_apis_json(keystile: Keystile, admin: KeystileAdmin) -> None:
    with pytest.raises(KeystileError) as invalid:
        await admin.keys.create("x", ["nowhere"])
    error = invalid.value
    assert (error.status, error.error, error.field) == (422, "invalid_request", "servers")
    assert error.message == "servers: unknown server 'nowhere'" == str(error)

    await admin.keys.create("dup", ["*"])
    with pytest.raises(KeystileError) as conflict:
        await admin.keys.create("dup", ["*"])
    assert (conflict.value.status, conflict.value.error) == (409, "conflict")

    member = await keystile.user("k@example.com", servers=["github"])
    limited = await keystile.key(member, permissions=["keys"])
    async with KeystileAdmin(keystile.admin, limited.key) as client:
        assert [k["id"] for k in await client.keys.fetch_all()] == [limited.record.id]
        with pytest.raises(KeystileError) as forbidden:
            await client.users.fetch_all()
        assert (forbidden.value.status, forbidden.value.error) == (403, "forbidden")

    wrong = limited.key[:-8] + ("A" if limited.key[-8] != "A" else "B") + limited.key[-7:]
    async with KeystileAdmin(keystile.admin, wrong) as client:
        with pytest.raises(KeystileError) as refused:
            await client.servers()
        assert (refused.value.status, refused.value.error) == (401, "invalid_api_key")
        assert not isinstance(refused.value, KeystileUnreachable)


async def test_an_unreachable_admin_plane(keystile: Keystile) -> None:
    _, issued = await make_admin(keystile)
    closed = f"http://127.0.0.1:{free_port()}"
    client = KeystileAdmin(closed, issued.key)
    try:
        with pytest.raises(KeystileUnreachable) as caught:
            await client.keys.fetch_all()
    finally:
        await client.close()  # usable without `async with`
    message = str(caught.value)
    assert message == f"cannot reach the admin plane at {closed}: Connection refused"
    assert "\n" not in message and caught.value.status == 0
    assert isinstance(caught.value, KeystileError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_the_key_stays_out_of_reprs_messages_and_logs(
    keystile: Keystile, caplog: pytest.LogCaptureFixture
) -> None:
    _, issued = await make_admin(keystile)
    caplog.set_level(logging.DEBUG)
    client = KeystileAdmin(keystile.admin, issued.key)
    async with client:
        await client.keys.fetch_all()
        with pytest.raises(KeystileError) as caught:
            await client.keys.fetch("nope")
    closed = KeystileAdmin(f"http://127.0.0.1:{free_port()}", issued.key)
    with pytest.raises(KeystileUnreachable) as unreachable:
        await closed.servers()
    await closed.close()
    texts = [repr(client), str(client), repr(vars(client)), caplog.text]
    for error in (caught.value, unreachable.value):
        texts += [repr(error), str(error), repr(error.args)]
    secret = issued.key.split("-")[3]
    assert not [t for t in texts if secret in t]
    assert client.key_id == issued.record.id  # the public part is fine to show


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="http"):
        KeystileAdmin("ftp://example.com", "ks1-a-b-c")
    with pytest.raises(ValueError) as caught:
        KeystileAdmin("http://127.0.0.1:8081", "ks1-a-b-secret\nInjected: yes")
    assert "secret" not in str(caught.value)
