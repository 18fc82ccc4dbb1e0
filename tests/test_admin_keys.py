"""The admin plane's key API (SPEC §2, §3, §5): who may do what to which key, and what it does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway import store as store_module
from gateway.models import User
from gateway.store import Actor
from tests.support import Keystile, wait_until

INVALID_BEARER = 'Bearer realm="keystile", error="invalid_token"'
SCOPE_BEARER = 'Bearer realm="keystile", error="insufficient_scope"'
SELF_SERVICE = ("keys", "mcp")


async def call(
    ks: Keystile,
    method: str,
    path: str,
    key: str | None,
    json_body: Any = None,
    *,
    data: bytes | None = None,
) -> tuple[int, Any]:
    """One admin-plane request; returns the status and the decoded JSON body (None if empty)."""
    status, _, body = await call_with_headers(ks, method, path, key, json_body, data=data)
    return status, body


async def call_with_headers(
    ks: Keystile,
    method: str,
    path: str,
    key: str | None,
    json_body: Any = None,
    *,
    data: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
        kwargs: dict[str, Any] = {"data": data}
    else:
        kwargs = {"json": json_body} if json_body is not None else {}
    async with ks.http.request(method, ks.admin + path, headers=headers, **kwargs) as resp:
        raw = await resp.read()
        return resp.status, dict(resp.headers), json.loads(raw) if raw else None


async def admin_actor(ks: Keystile, email: str = "admin@x") -> tuple[User, str]:
    admin = await ks.user(email, role="admin", servers=["*"])
    issued = await ks.key(admin, name="admin key", permissions=["admin", "keys", "mcp", "chat"])
    return admin, issued.key


async def member_actor(
    ks: Keystile,
    email: str = "member@x",
    *,
    permissions: Sequence[str] = SELF_SERVICE,
    servers: Sequence[str] = ("*",),
) -> tuple[User, str]:
    member = await ks.user(email, role="member", servers=servers)
    issued = await ks.key(member, name="self-service", permissions=permissions)
    return member, issued.key


async def create(ks: Keystile, key: str, **fields: Any) -> dict[str, Any]:
    """POST /api/keys that must succeed; `servers` defaults to every server."""
    fields.setdefault("servers", ["*"])
    status, body = await call(ks, "POST", "/api/keys", key, fields)
    assert status == 201, body
    assert isinstance(body, dict)
    return body


async def me_status(ks: Keystile, key: str) -> tuple[int, Any]:
    status, _, body = await ks.request("GET", "/api/me", key)
    return status, body


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["id"] for row in rows]


def assert_invalid(status: int, body: Any, field: str) -> None:
    assert status == 422, body
    assert body["error"] == "invalid_request"
    assert body["field"] == field
    assert body["message"]


def future(days: float = 1) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


# --- 1. authentication on the admin plane -----------------------------------------------------


async def test_no_key_is_401_with_the_contract_body(keystile: Keystile) -> None:
    status, headers, body = await call_with_headers(keystile, "GET", "/api/keys", None)
    assert status == 401
    assert headers["WWW-Authenticate"] == INVALID_BEARER
    assert body["error"] == "invalid_api_key" and body["message"]


async def test_garbage_key_is_401(keystile: Keystile) -> None:
    status, body = await call(keystile, "GET", "/api/keys", "ks1-nope-nope-nope")
    assert status == 401 and body["error"] == "invalid_api_key"


async def test_mcp_only_key_is_403(keystile: Keystile) -> None:
    _, key = await member_actor(keystile, permissions=["mcp"])
    status, headers, body = await call_with_headers(keystile, "GET", "/api/keys", key)
    assert status == 403
    assert headers["WWW-Authenticate"] == SCOPE_BEARER
    assert body["error"] == "forbidden"
    status, body = await call(keystile, "POST", "/api/keys", key, {"name": "x", "servers": ["*"]})
    assert status == 403


async def test_keys_permission_manages_own_keys(keystile: Keystile) -> None:
    member, key = await member_actor(keystile)
    made = await create(keystile, key, name="mine")
    assert made["user_id"] == member.id
    status, rows = await call(keystile, "GET", "/api/keys", key)
    assert status == 200
    assert made["id"] in ids(rows)


async def test_admin_permission_on_a_member_key_is_not_admin(keystile: Keystile) -> None:
    member = await keystile.user("member@x", servers=["*"])
    other, _ = await member_actor(keystile, "other@x")
    key = (await keystile.key(member, permissions=["admin", "keys", "mcp"])).key
    status, rows = await call(keystile, "GET", "/api/keys", key)
    assert status == 200  # `keys` still manages its own keys
    assert {row["user_id"] for row in rows} == {member.id}
    assert (await call(keystile, "GET", "/api/keys?all=true", key))[0] == 403
    assert (await call(keystile, "GET", f"/api/keys?user_id={other.id}", key))[0] == 403
    assert (await call(keystile, "GET", "/api/users", key))[0] == 403
    admin_only = (await keystile.key(member, name="a", permissions=["admin"])).key
    assert (await call(keystile, "GET", "/api/keys", admin_only))[0] == 403


async def test_admin_user_needs_the_admin_permission_to_see_everyone(keystile: Keystile) -> None:
    admin = await keystile.user("admin@x", role="admin", servers=["*"])
    keys_only = (await keystile.key(admin, permissions=["keys"])).key
    assert (await call(keystile, "GET", "/api/keys?all=true", keys_only))[0] == 403
    full = (await keystile.key(admin, name="full", permissions=["admin", "keys"])).key
    assert (await call(keystile, "GET", "/api/keys?all=true", full))[0] == 200


# --- 2. create, and the full key shown once ---------------------------------------------------


async def test_create_returns_the_record_and_a_working_full_key(keystile: Keystile) -> None:
    member, key = await member_actor(keystile)
    made = await create(
        keystile, key, name="ci", description="for CI", servers=["github"], permissions=["mcp"]
    )
    record_fields = {
        "id", "user_id", "workspace_id", "name", "description", "prefix", "servers",
        "permissions", "valid_from", "expires_at", "is_active", "status", "created_at",
        "last_used_at", "user", "key",
    }  # fmt: skip
    assert record_fields <= set(made)
    assert made["user_id"] == member.id
    assert made["workspace_id"] == keystile.actor.workspace_id
    assert (made["name"], made["description"]) == ("ci", "for CI")
    assert made["servers"] == ["github"] and made["permissions"] == ["mcp"]
    assert made["valid_from"] is None and made["expires_at"] is None
    assert made["is_active"] is True and made["status"] == "active"
    assert made["created_at"] and made["last_used_at"] is None
    assert made["user"]["id"] == member.id and made["user"]["email"] == "member@x"
    full = made["key"]
    assert full.startswith(f"ks1-{member.id}-{made['id']}-")
    assert made["prefix"] == f"ks1-{member.id}-{made['id']}-{full.split('-')[3][:4]}…"
    status, me = await me_status(keystile, full)
    assert status == 200
    assert me["key"]["id"] == made["id"] and me["user"]["id"] == member.id


async def test_default_permissions_are_mcp(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    assert (await create(keystile, key, name="plain"))["permissions"] == ["mcp"]


async def test_full_key_is_never_shown_or_stored_again(
    keystile: Keystile, database_url: str
) -> None:
    _, admin_key = await admin_actor(keystile)
    made = await create(keystile, admin_key, name="secretive")
    full, key_id = made["key"], made["id"]
    secret_tail = full.split("-")[3][4:]  # everything after the 4 characters the prefix shows
    assert (await me_status(keystile, full))[0] == 200
    seen: list[Any] = [
        await call(keystile, "GET", f"/api/keys/{key_id}", admin_key),
        await call(keystile, "GET", "/api/keys?all=true", admin_key),
        await call(keystile, "PATCH", f"/api/keys/{key_id}", admin_key, {"description": "d"}),
        await call(keystile, "POST", f"/api/keys/{key_id}/disable", admin_key),
        await call(keystile, "POST", f"/api/keys/{key_id}/enable", admin_key),
        await call(keystile, "GET", "/api/audit", admin_key),
    ]
    rotated = await call(keystile, "POST", f"/api/keys/{key_id}/rotate", admin_key)
    assert rotated[0] == 200 and rotated[1]["key"] != full
    seen.append(rotated)
    seen.append(await call(keystile, "GET", "/api/audit", admin_key))
    for status, body in seen:
        assert status == 200, body
        text = json.dumps(body)
        assert secret_tail not in text
    audit = seen[-1][1]["events"]
    assert {"key.create", "key.update", "key.disable", "key.enable", "key.rotate"} <= {
        e["action"] for e in audit
    }

    conn = await asyncpg.connect(database_url)
    try:
        audit_rows = await conn.fetch("SELECT * FROM audit_events")
        key_row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", key_id)
    finally:
        await conn.close()
    assert audit_rows and key_row is not None
    for row in audit_rows:
        assert secret_tail not in str(dict(row))
    new_tail = rotated[1]["key"].split("-")[3][4:]
    for column, value in dict(key_row).items():
        assert secret_tail not in str(value), column
        assert new_tail not in str(value), column
    assert key_row["secret_hash"].startswith("$argon2id$")


# --- 3. list ----------------------------------------------------------------------------------


async def test_member_lists_only_own_keys(keystile: Keystile) -> None:
    alice, alice_key = await member_actor(keystile, "alice@x")
    bob, bob_key = await member_actor(keystile, "bob@x")
    mine = await create(keystile, alice_key, name="a1")
    theirs = await create(keystile, bob_key, name="b1")
    status, rows = await call(keystile, "GET", "/api/keys", alice_key)
    assert status == 200
    assert mine["id"] in ids(rows) and theirs["id"] not in ids(rows)
    assert {row["user_id"] for row in rows} == {alice.id}
    assert all(row["user"]["id"] == alice.id for row in rows)
    assert (await call(keystile, "GET", f"/api/keys?user_id={alice.id}", alice_key))[0] == 200
    _, bob_rows = await call(keystile, "GET", "/api/keys", bob_key)
    assert {row["user_id"] for row in bob_rows} == {bob.id}


async def test_member_cannot_list_all_or_another_users_keys(keystile: Keystile) -> None:
    _, alice_key = await member_actor(keystile, "alice@x")
    bob, _ = await member_actor(keystile, "bob@x")
    for query in ("all=true", f"user_id={bob.id}"):
        status, body = await call(keystile, "GET", f"/api/keys?{query}", alice_key)
        assert status == 403 and body["error"] == "forbidden", query


async def test_admin_lists_own_by_default_and_everyone_with_all(keystile: Keystile) -> None:
    admin, admin_key = await admin_actor(keystile)
    alice, alice_key = await member_actor(keystile, "alice@x")
    bob, _ = await member_actor(keystile, "bob@x")
    made = await create(keystile, alice_key, name="a1")
    _, own = await call(keystile, "GET", "/api/keys", admin_key)
    assert {row["user_id"] for row in own} == {admin.id}
    status, rows = await call(keystile, "GET", "/api/keys?all=true", admin_key)
    assert status == 200
    assert {row["user_id"] for row in rows} == {admin.id, alice.id, bob.id}
    assert made["id"] in ids(rows)
    emails = {u.id: u.email for u in (admin, alice, bob)}
    for row in rows:
        assert row["user"]["id"] == row["user_id"]
        assert row["user"]["email"] == emails[row["user_id"]]


async def test_admin_filters_by_user_id(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    alice, alice_key = await member_actor(keystile, "alice@x")
    await member_actor(keystile, "bob@x")
    await create(keystile, alice_key, name="a1")
    status, rows = await call(keystile, "GET", f"/api/keys?user_id={alice.id}", admin_key)
    assert status == 200
    assert len(rows) == 2 and {row["user_id"] for row in rows} == {alice.id}


async def test_list_is_newest_first(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = [(await create(keystile, key, name=f"k{n}"))["id"] for n in range(3)]
    _, rows = await call(keystile, "GET", "/api/keys", key)
    listed = [i for i in ids(rows) if i in made]
    assert listed == made[::-1]
    assert rows[-1]["name"] == "self-service"  # the oldest, made before the three


async def test_revoked_keys_are_hidden_unless_asked_for(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    kept = await create(keystile, key, name="kept")
    gone = await create(keystile, key, name="gone")
    assert (await call(keystile, "DELETE", f"/api/keys/{gone['id']}", key))[0] == 204
    _, rows = await call(keystile, "GET", "/api/keys", key)
    assert kept["id"] in ids(rows) and gone["id"] not in ids(rows)
    _, revoked = await call(keystile, "GET", "/api/keys?status=revoked", key)
    assert ids(revoked) == [gone["id"]]
    assert revoked[0]["status"] == "revoked"


async def test_status_filter_disabled_and_active(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    off = await create(keystile, key, name="off")
    on = await create(keystile, key, name="on")
    assert (await call(keystile, "POST", f"/api/keys/{off['id']}/disable", key))[0] == 200
    _, disabled = await call(keystile, "GET", "/api/keys?status=disabled", key)
    assert ids(disabled) == [off["id"]]
    _, active = await call(keystile, "GET", "/api/keys?status=active", key)
    assert on["id"] in ids(active) and off["id"] not in ids(active)
    assert all(row["status"] == "active" for row in active)


async def test_bad_status_filter_is_422_naming_status(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    status, body = await call(keystile, "GET", "/api/keys?status=bogus", key)
    assert_invalid(status, body, "status")


# --- 4. get one, and what is out of reach -----------------------------------------------------


async def test_get_own_key(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="mine")
    status, body = await call(keystile, "GET", f"/api/keys/{made['id']}", key)
    assert status == 200
    assert body["id"] == made["id"] and body["name"] == "mine" and "key" not in body


async def test_another_users_key_is_404_for_a_member(keystile: Keystile) -> None:
    _, alice_key = await member_actor(keystile, "alice@x")
    _, bob_key = await member_actor(keystile, "bob@x")
    theirs = await create(keystile, bob_key, name="b1")
    base = f"/api/keys/{theirs['id']}"
    for method, path, body in [
        ("GET", base, None),
        ("PATCH", base, {"name": "stolen"}),
        ("DELETE", base, None),
        ("POST", f"{base}/disable", None),
        ("POST", f"{base}/rotate", None),
    ]:
        status, answer = await call(keystile, method, path, alice_key, body)
        assert status == 404 and answer["error"] == "not_found", (method, path)
    status, body = await call(keystile, "GET", base, bob_key)
    assert (status, body["name"], body["status"]) == (200, "b1", "active")
    assert (await me_status(keystile, theirs["key"]))[0] == 200


async def test_admin_gets_any_key_in_the_workspace(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    alice, alice_key = await member_actor(keystile, "alice@x")
    made = await create(keystile, alice_key, name="a1")
    status, body = await call(keystile, "GET", f"/api/keys/{made['id']}", admin_key)
    assert status == 200
    assert body["user"]["email"] == "alice@x" and body["user_id"] == alice.id


async def test_unknown_key_id_is_404(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    status, body = await call(keystile, "GET", "/api/keys/NoSuchKeyId12345", admin_key)
    assert status == 404 and body["error"] == "not_found"
    assert (await call(keystile, "DELETE", "/api/keys/NoSuchKeyId12345", admin_key))[0] == 404


async def test_other_workspace_is_invisible_to_an_admin(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    keyring = keystile.runtime.keyring
    other = await keyring.ensure_workspace("other")
    stranger = await keyring.create_user(
        Actor(other.id), email="stranger@y", role="admin", servers=["*"]
    )
    theirs = await keyring.create_key(Actor(other.id), user_id=stranger.id, name="theirs")
    base = f"/api/keys/{theirs.record.id}"
    for method, path, body in [
        ("GET", base, None),
        ("PATCH", base, {"is_active": False}),
        ("POST", f"{base}/disable", None),
        ("POST", f"{base}/enable", None),
        ("POST", f"{base}/rotate", None),
        ("DELETE", base, None),
    ]:
        status, answer = await call(keystile, method, path, admin_key, body)
        assert status == 404 and answer["error"] == "not_found", (method, path)
    _, rows = await call(keystile, "GET", "/api/keys?all=true&status=active", admin_key)
    assert theirs.record.id not in ids(rows)
    _, rows = await call(keystile, "GET", f"/api/keys?user_id={stranger.id}", admin_key)
    assert rows == []
    status, body = await call(
        keystile,
        "POST",
        "/api/keys",
        admin_key,
        {"name": "x", "servers": [], "user_id": stranger.id},
    )
    assert_invalid(status, body, "user_id")
    assert (await me_status(keystile, theirs.key))[0] == 200  # untouched by all of the above


# --- 5. PATCH ---------------------------------------------------------------------------------


async def test_patch_changes_every_field(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    made = await create(keystile, admin_key, name="before", permissions=["mcp"])
    start = datetime.now(UTC) - timedelta(hours=1)
    end = datetime.now(UTC) + timedelta(days=3)
    changes = {
        "name": "after",
        "description": "now described",
        "servers": ["gitlab", "github"],
        "permissions": ["chat", "mcp"],
        "valid_from": start.isoformat(),
        "expires_at": end.isoformat(),
        "is_active": False,
    }
    status, body = await call(keystile, "PATCH", f"/api/keys/{made['id']}", admin_key, changes)
    assert status == 200, body
    _, fetched = await call(keystile, "GET", f"/api/keys/{made['id']}", admin_key)
    for record in (body, fetched):
        assert record["name"] == "after" and record["description"] == "now described"
        assert record["servers"] == ["github", "gitlab"]
        assert record["permissions"] == ["mcp", "chat"]
        assert datetime.fromisoformat(record["valid_from"]) == start
        assert datetime.fromisoformat(record["expires_at"]) == end
        assert record["is_active"] is False and record["status"] == "disabled"
    status, body = await call(
        keystile, "PATCH", f"/api/keys/{made['id']}", admin_key, {"expires_at": None}
    )
    assert status == 200 and body["expires_at"] is None


async def test_patch_narrowing_servers_applies_at_once(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="scoped", servers=["github", "gitlab"])
    assert (await keystile.request("GET", "/mcp-connect/github/x", made["key"]))[0] == 200
    status, _ = await call(
        keystile, "PATCH", f"/api/keys/{made['id']}", key, {"servers": ["gitlab"]}
    )
    assert status == 200
    assert (await keystile.request("GET", "/mcp-connect/github/x", made["key"]))[0] == 403
    assert (await keystile.request("GET", "/mcp-connect/gitlab/x", made["key"]))[0] == 200


async def test_patch_permissions_applies_at_once(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    made = await create(keystile, admin_key, name="both", permissions=["mcp", "chat"])
    assert (await keystile.request("GET", "/api/v1/models", made["key"]))[0] == 200
    path = f"/api/keys/{made['id']}"
    assert (await call(keystile, "PATCH", path, admin_key, {"permissions": ["mcp"]}))[0] == 200
    assert (await keystile.request("GET", "/api/v1/models", made["key"]))[0] == 403
    assert (await keystile.request("GET", "/mcp-connect/github/x", made["key"]))[0] == 200


async def test_patch_is_active_false_stops_the_key_at_once(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="victim")
    assert (await me_status(keystile, made["key"]))[0] == 200
    path = f"/api/keys/{made['id']}"
    assert (await call(keystile, "PATCH", path, key, {"is_active": False}))[0] == 200
    status, body = await me_status(keystile, made["key"])
    assert status == 401 and body["error"] == "invalid_api_key"
    assert (await call(keystile, "PATCH", path, key, {"is_active": True}))[0] == 200
    assert (await me_status(keystile, made["key"]))[0] == 200


async def test_patch_valid_from_in_the_future_makes_the_key_pending(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="later")
    assert (await me_status(keystile, made["key"]))[0] == 200
    path = f"/api/keys/{made['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"valid_from": future()})
    assert status == 200 and body["status"] == "pending"
    assert (await me_status(keystile, made["key"]))[0] == 401


async def test_patch_unknown_field_is_422(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    status, body = await call(keystile, "PATCH", f"/api/keys/{made['id']}", key, {"colour": "red"})
    assert_invalid(status, body, "colour")
    status, body = await call(keystile, "PATCH", f"/api/keys/{made['id']}", key, {"user_id": "x"})
    assert_invalid(status, body, "user_id")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 5),
        ("name", ""),
        ("name", None),
        ("description", ["x"]),
        ("servers", "github"),
        ("servers", [1]),
        ("servers", ["*", "github"]),
        ("permissions", "mcp"),
        ("permissions", ["root"]),
        ("valid_from", 12),
        ("expires_at", "tomorrow"),
        ("is_active", "false"),
        ("is_active", 0),
    ],
)
async def test_patch_wrong_types_are_422(keystile: Keystile, field: str, value: Any) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    status, body = await call(keystile, "PATCH", f"/api/keys/{made['id']}", key, {field: value})
    assert_invalid(status, body, field)


async def test_unknown_server_is_422(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    status, body = await call(keystile, "POST", "/api/keys", key, {"name": "k", "servers": ["x"]})
    assert_invalid(status, body, "servers")
    made = await create(keystile, key, name="k", servers=["github"])
    path = f"/api/keys/{made['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"servers": ["github", "nope"]})
    assert_invalid(status, body, "servers")


async def test_expires_at_in_the_past_is_422(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    status, body = await call(
        keystile, "POST", "/api/keys", key, {"name": "k", "servers": ["*"], "expires_at": past}
    )
    assert_invalid(status, body, "expires_at")
    made = await create(keystile, key, name="k", expires_at=future())
    path = f"/api/keys/{made['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"expires_at": past})
    assert_invalid(status, body, "expires_at")
    assert (await call(keystile, "PATCH", path, key, {"expires_at": future(2)}))[0] == 200


async def test_valid_from_after_expires_at_is_422(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    window = {"valid_from": future(2), "expires_at": future(1)}
    status, body = await call(
        keystile, "POST", "/api/keys", key, {"name": "k", "servers": ["*"], **window}
    )
    assert_invalid(status, body, "valid_from")
    made = await create(keystile, key, name="k", expires_at=future(1))
    path = f"/api/keys/{made['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"valid_from": future(2)})
    assert_invalid(status, body, "valid_from")
    status, body = await call(keystile, "PATCH", path, key, {"valid_from": future(0.5)})
    assert status == 200 and body["status"] == "pending"


async def test_member_cannot_hold_the_admin_permission(keystile: Keystile) -> None:
    _, key = await member_actor(keystile, permissions=["admin", "keys", "mcp"])
    status, body = await call(
        keystile,
        "POST",
        "/api/keys",
        key,
        {"name": "k", "servers": ["*"], "permissions": ["admin"]},
    )
    assert_invalid(status, body, "permissions")
    made = await create(keystile, key, name="k")
    path = f"/api/keys/{made['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"permissions": ["admin", "mcp"]})
    assert_invalid(status, body, "permissions")


async def test_admin_grants_admin_only_to_admin_users(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    member, _ = await member_actor(keystile)
    own = await create(keystile, admin_key, name="second admin", permissions=["admin", "keys"])
    assert own["permissions"] == ["keys", "admin"]
    status, body = await call(
        keystile,
        "POST",
        "/api/keys",
        admin_key,
        {"name": "k", "servers": ["*"], "permissions": ["admin"], "user_id": member.id},
    )
    assert_invalid(status, body, "permissions")
    theirs = await create(keystile, admin_key, name="k", user_id=member.id, permissions=["chat"])
    assert theirs["user_id"] == member.id and theirs["permissions"] == ["chat"]
    assert theirs["user"]["id"] == member.id


async def test_self_service_key_grants_what_it_holds_but_never_admin(keystile: Keystile) -> None:
    # `keys` is self-service: a key that manages keys mints the user's working keys, within
    # what it holds itself (tests/test_key_narrowing.py has the rule field by field).
    _, key = await member_actor(keystile, permissions=["keys", "mcp", "chat"])
    made = await create(keystile, key, name="k", permissions=["mcp", "chat"])
    assert made["permissions"] == ["mcp", "chat"]
    path = f"/api/keys/{made['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"permissions": ["mcp", "admin"]})
    assert_invalid(status, body, "permissions")
    assert (await call(keystile, "GET", path, key))[1]["permissions"] == ["mcp", "chat"]


async def test_admin_users_keys_only_key_cannot_mint_admin_keys(keystile: Keystile) -> None:
    admin = await keystile.user("boss@x", role="admin", servers=["*"])
    keys_only = (await keystile.key(admin, name="self-service", permissions=["keys"])).key
    status, body = await call(
        keystile,
        "POST",
        "/api/keys",
        keys_only,
        {"name": "k", "servers": ["*"], "permissions": ["admin"]},
    )
    assert_invalid(status, body, "permissions")


async def test_member_cannot_create_keys_for_others(keystile: Keystile) -> None:
    _, alice_key = await member_actor(keystile, "alice@x")
    bob, _ = await member_actor(keystile, "bob@x")
    status, _ = await call(
        keystile, "POST", "/api/keys", alice_key, {"name": "k", "servers": ["*"], "user_id": bob.id}
    )
    assert status == 403
    _, rows = await call(keystile, "GET", "/api/keys?status=active", alice_key)
    assert [row["name"] for row in rows] == ["self-service"]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("raw", [b"{not json", b'["name", "k"]', b"null", b"\xff\xfe"])
async def test_bad_json_body_is_400(keystile: Keystile, method: str, raw: bytes) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    path = "/api/keys" if method == "POST" else f"/api/keys/{made['id']}"
    status, body = await call(keystile, method, path, key, data=raw)
    assert status == 400
    assert body["error"] == "invalid_json" and body["message"]


async def test_create_requires_name_and_servers(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    status, body = await call(keystile, "POST", "/api/keys", key, {"servers": ["*"]})
    assert_invalid(status, body, "name")
    status, body = await call(keystile, "POST", "/api/keys", key, {"name": "k"})
    assert_invalid(status, body, "servers")
    status, body = await call(
        keystile, "POST", "/api/keys", key, {"name": "k", "servers": ["*"], "x": 1}
    )
    assert_invalid(status, body, "x")


async def test_a_refused_patch_changes_nothing(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="same", servers=["github"])
    path = f"/api/keys/{made['id']}"
    status, body = await call(
        keystile, "PATCH", path, key, {"name": "renamed", "servers": ["nowhere"]}
    )
    assert_invalid(status, body, "servers")
    _, after = await call(keystile, "GET", path, key)
    assert (after["name"], after["servers"]) == ("same", ["github"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("valid_from", "0001-01-01T00:00:00+01:00"), ("expires_at", "9999-12-31T23:59:59-01:00")],
)
async def test_timestamp_beyond_the_storable_range_is_422(
    keystile: Keystile, field: str, value: str
) -> None:
    _, key = await member_actor(keystile)
    status, body = await call(
        keystile, "POST", "/api/keys", key, {"name": "k", "servers": ["*"], field: value}
    )
    assert_invalid(status, body, field)


@pytest.mark.parametrize("field", ["name", "description"])
async def test_text_that_is_not_valid_unicode_is_422(keystile: Keystile, field: str) -> None:
    _, key = await member_actor(keystile)
    fields = {"name": "k", "servers": ["*"], field: "bad \ud800 text"}
    status, body = await call(keystile, "POST", "/api/keys", key, fields)
    assert_invalid(status, body, field)


async def test_deeply_nested_json_is_400(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    status, body = await call(
        keystile, "POST", "/api/keys", key, data=b"[" * 100_000 + b"]" * 100_000
    )
    assert status == 400 and body["error"] == "invalid_json"


# --- 6. name uniqueness -----------------------------------------------------------------------


async def test_duplicate_live_name_is_409(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    await create(keystile, key, name="deploy")
    status, body = await call(keystile, "POST", "/api/keys", key, {"name": "deploy", "servers": []})
    assert status == 409 and body["error"] == "conflict" and body["field"] == "name"
    other = await create(keystile, key, name="other")
    path = f"/api/keys/{other['id']}"
    status, body = await call(keystile, "PATCH", path, key, {"name": "deploy"})
    assert status == 409 and body["field"] == "name"


async def test_name_is_reusable_after_revoking(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    first = await create(keystile, key, name="deploy")
    assert (await call(keystile, "DELETE", f"/api/keys/{first['id']}", key))[0] == 204
    second = await create(keystile, key, name="deploy")
    assert second["id"] != first["id"]


async def test_two_users_may_share_a_name(keystile: Keystile) -> None:
    _, alice_key = await member_actor(keystile, "alice@x")
    _, bob_key = await member_actor(keystile, "bob@x")
    a = await create(keystile, alice_key, name="laptop")
    b = await create(keystile, bob_key, name="laptop")
    assert a["user_id"] != b["user_id"]


# --- 7. enable / disable ----------------------------------------------------------------------


async def test_disable_and_enable_toggle_the_key(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="toggled")
    base = f"/api/keys/{made['id']}"
    assert (await me_status(keystile, made["key"]))[0] == 200
    status, body = await call(keystile, "POST", f"{base}/disable", key)
    assert status == 200 and body["status"] == "disabled" and body["is_active"] is False
    status, answer = await me_status(keystile, made["key"])
    assert status == 401 and "disabled" in answer["message"]
    status, body = await call(keystile, "POST", f"{base}/enable", key)
    assert status == 200 and body["status"] == "active" and body["is_active"] is True
    assert (await me_status(keystile, made["key"]))[0] == 200


# --- 8. rotate --------------------------------------------------------------------------------


async def test_rotate_issues_a_new_key_and_the_old_stops_at_once(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="rotating")
    old = made["key"]
    assert (await me_status(keystile, old))[0] == 200  # cached before the rotation
    status, body = await call(keystile, "POST", f"/api/keys/{made['id']}/rotate", key)
    assert status == 200
    new = body["key"]
    assert body["id"] == made["id"] and new != old
    assert new.startswith(f"ks1-{made['user_id']}-{made['id']}-")
    assert body["prefix"] == f"ks1-{made['user_id']}-{made['id']}-{new.split('-')[3][:4]}…"
    assert body["name"] == "rotating" and body["status"] == "active"
    assert (await me_status(keystile, old))[0] == 401
    assert (await me_status(keystile, new))[0] == 200


async def test_rotate_grace_keeps_the_old_key_until_it_ends(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="graceful")
    old = made["key"]
    path = f"/api/keys/{made['id']}/rotate"
    # Long enough that the two checks just after rotating fall inside it on a loaded machine.
    status, body = await call(keystile, "POST", path, key, {"grace_seconds": 5})
    assert status == 200
    new = body["key"]
    assert (await me_status(keystile, old))[0] == 200
    assert (await me_status(keystile, new))[0] == 200

    async def old_key_refused() -> int | None:
        status = (await me_status(keystile, old))[0]
        return None if status == 200 else status

    # Wait for the grace period to end as the gateway sees it.
    status = await wait_until(old_key_refused, interval=0.1, message="the old key outlived grace")
    assert status == 401
    assert (await me_status(keystile, new))[0] == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"grace_seconds": -1}, "grace_seconds"),
        ({"grace_seconds": "5"}, "grace_seconds"),
        ({"grace_seconds": True}, "grace_seconds"),
        ({"grace": 5}, "grace"),
    ],
)
async def test_rotate_bad_grace_is_422(keystile: Keystile, body: Any, field: str) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    status, answer = await call(keystile, "POST", f"/api/keys/{made['id']}/rotate", key, body)
    assert_invalid(status, answer, field)
    assert (await me_status(keystile, made["key"]))[0] == 200  # not rotated


async def test_rotate_huge_integer_grace_is_422(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    raw = b'{"grace_seconds": 1' + b"0" * 400 + b"}"
    status, body = await call(keystile, "POST", f"/api/keys/{made['id']}/rotate", key, data=raw)
    assert_invalid(status, body, "grace_seconds")


async def test_rotating_a_revoked_key_is_409(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    assert (await call(keystile, "DELETE", f"/api/keys/{made['id']}", key))[0] == 204
    status, body = await call(keystile, "POST", f"/api/keys/{made['id']}/rotate", key)
    assert status == 409 and body["error"]
    assert (await me_status(keystile, made["key"]))[0] == 401


# --- 9. revoke --------------------------------------------------------------------------------


async def test_revoke_is_immediate_and_permanent(keystile: Keystile) -> None:
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="doomed")
    path = f"/api/keys/{made['id']}"
    assert (await me_status(keystile, made["key"]))[0] == 200
    assert await call(keystile, "DELETE", path, key) == (204, None)
    assert (await me_status(keystile, made["key"]))[0] == 401
    status, body = await call(keystile, "GET", path, key)
    assert status == 200 and body["status"] == "revoked" and body["revoked_at"]
    assert made["id"] not in ids((await call(keystile, "GET", "/api/keys", key))[1])
    revoked = (await call(keystile, "GET", "/api/keys?status=revoked", key))[1]
    assert made["id"] in ids(revoked)
    for method, sub, payload in [
        ("PATCH", "", {"name": "back"}),
        ("PATCH", "", {"is_active": True}),
        ("POST", "/enable", None),
        ("POST", "/disable", None),
    ]:
        status, body = await call(keystile, method, path + sub, key, payload)
        assert status == 409, (method, sub, body)
    assert (await call(keystile, "DELETE", path, key))[0] == 204
    assert (await me_status(keystile, made["key"]))[0] == 401


async def test_admin_revokes_a_members_key(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    _, member_key = await member_actor(keystile)
    made = await create(keystile, member_key, name="m")
    assert (await call(keystile, "DELETE", f"/api/keys/{made['id']}", admin_key))[0] == 204
    assert (await me_status(keystile, made["key"]))[0] == 401


# --- 10. users --------------------------------------------------------------------------------


async def test_deleting_a_user_stops_all_their_keys(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    member, member_key = await member_actor(keystile)
    extra = await create(keystile, member_key, name="extra")
    for k in (member_key, extra["key"]):
        assert (await me_status(keystile, k))[0] == 200
    assert (await call(keystile, "DELETE", f"/api/users/{member.id}", member_key))[0] == 403
    assert (await call(keystile, "DELETE", f"/api/users/{member.id}", admin_key))[0] == 204
    for k in (member_key, extra["key"]):
        assert (await me_status(keystile, k))[0] == 401
    assert (await me_status(keystile, admin_key))[0] == 200


async def test_disabling_a_user_stops_their_keys_until_enabled(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    member, member_key = await member_actor(keystile)
    assert (await me_status(keystile, member_key))[0] == 200
    path = f"/api/users/{member.id}"
    status, body = await call(keystile, "PATCH", path, admin_key, {"is_active": False})
    assert status == 200 and body["is_active"] is False
    assert (await me_status(keystile, member_key))[0] == 401
    assert (await call(keystile, "GET", "/api/keys", member_key))[0] == 401
    assert (await call(keystile, "PATCH", path, admin_key, {"is_active": True}))[0] == 200
    assert (await me_status(keystile, member_key))[0] == 200


async def test_a_deleted_users_revoked_keys_still_name_the_user(keystile: Keystile) -> None:
    _, admin_key = await admin_actor(keystile)
    member, _ = await member_actor(keystile)
    assert (await call(keystile, "DELETE", f"/api/users/{member.id}", admin_key))[0] == 204
    _, rows = await call(keystile, "GET", "/api/keys?all=true&status=revoked", admin_key)
    assert [row["user_id"] for row in rows] == [member.id]
    assert rows[0]["user"]["email"] == "member@x"


# --- 11. a bug is an internal error, not a missing key ----------------------------------------


@pytest.mark.parametrize(
    ("method", "sub", "body", "action"),
    [
        ("PATCH", "", {"name": "renamed"}, "key.update"),
        ("POST", "/disable", None, "key.disable"),
        ("POST", "/rotate", None, "key.rotate"),
        ("DELETE", "", None, "key.revoke"),
    ],
)
async def test_a_key_error_inside_a_change_is_500_not_404(
    keystile: Keystile,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    sub: str,
    body: Any,
    action: str,
) -> None:
    """Only a missing row answers 404: a KeyError raised by a bug mid-change is a 500."""
    _, key = await member_actor(keystile)
    made = await create(keystile, key, name="k")
    real_audit = store_module.audit

    async def buggy_audit(conn: Any, actor: Actor, act: str, *rest: Any) -> None:
        if act == action:  # inside the change's transaction, as a real bug would be
            raise KeyError("a bug, not a missing row")
        await real_audit(conn, actor, act, *rest)

    monkeypatch.setattr(store_module, "audit", buggy_audit)
    status, answer = await call(keystile, method, f"/api/keys/{made['id']}{sub}", key, body)
    monkeypatch.undo()
    assert status == 500 and answer["error"] == "internal_error", answer
    assert "a bug" not in answer["message"]
    # The change failed as a whole: the key is as it was and still works with its secret.
    status, after = await call(keystile, "GET", f"/api/keys/{made['id']}", key)
    assert (status, after["name"], after["status"]) == (200, "k", "active")
    assert (await me_status(keystile, made["key"]))[0] == 200
