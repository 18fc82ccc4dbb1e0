"""Admin plane: users and roles, server grants, the server list, the audit trail, transactions.

Everything goes through the real admin HTTP API; the database is read (and, for the fault
tests, given a failing trigger) with asyncpg on the same database the running Keystile uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from gateway.keyring import IssuedKey
from gateway.models import User
from gateway.store import Actor
from tests.support import (
    ADMIN_PERMISSIONS,
    NO_BODY,
    Keystile,
    Reply,
    assert_422,
    assert_error,
    make_admin,
)
from tests.support import admin_call as call

SERVERS = ["github", "gitlab", "tokened"]
SCOPE_BEARER = 'Bearer realm="keystile", error="insufficient_scope"'
INVALID_BEARER = 'Bearer realm="keystile", error="invalid_token"'


async def make_member(
    ks: Keystile, email: str = "member@x", *, servers: list[str] | None = None
) -> tuple[User, IssuedKey]:
    member = await ks.user(email, servers=servers if servers is not None else [])
    return member, await ks.key(member, name="member key", permissions=["keys", "mcp"])


async def reach(ks: Keystile, key: str, server: str) -> int:
    status, _, _ = await ks.request("GET", f"/mcp-connect/{server}/", key)
    return status


async def reachable(ks: Keystile, key: str) -> dict[str, int]:
    return {server: await reach(ks, key, server) for server in SERVERS}


@asynccontextmanager
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def failing_audit(database_url: str, action: str) -> AsyncIterator[None]:
    """A real fault: inserting an audit row with `action` raises inside the transaction."""
    async with db(database_url) as conn:
        await conn.execute(
            "CREATE FUNCTION test_fail_audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'forced failure writing audit row %', NEW.action; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER test_fail_audit BEFORE INSERT ON audit_events FOR EACH ROW "
            f"WHEN (NEW.action = '{action}') EXECUTE FUNCTION test_fail_audit()"
        )
        try:
            yield
        finally:
            await conn.execute("DROP TRIGGER test_fail_audit ON audit_events")
            await conn.execute("DROP FUNCTION test_fail_audit()")


def assert_internal_error(reply: Reply) -> None:
    assert_error(reply, 500, "internal_error")
    for leak in ("Traceback", "forced failure", "RaiseError", "asyncpg", 'File "'):
        assert leak not in reply.text


# --- who may use the users API ---------------------------------------------------------------


USER_ROUTES = [
    ("GET", "/api/users", NO_BODY),
    ("POST", "/api/users", {"email": "new@x"}),
    ("GET", "/api/users/{id}", NO_BODY),
    ("PATCH", "/api/users/{id}", {"role": "admin"}),
    ("DELETE", "/api/users/{id}", NO_BODY),
    ("PUT", "/api/users/{id}/servers", {"servers": ["*"]}),
    ("GET", "/api/audit", NO_BODY),
]


@pytest.mark.parametrize(("method", "path", "body"), USER_ROUTES)
async def test_users_api_refuses_a_member_keys_key(
    keystile: Keystile, method: str, path: str, body: Any
) -> None:
    await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    reply = await call(keystile, method, path.format(id=member.id), member_key.key, body)
    assert_error(reply, 403, "forbidden")
    assert reply.headers["WWW-Authenticate"] == SCOPE_BEARER
    # Nothing happened: the member is unchanged and no user was created.
    after = await keystile.runtime.store.user(keystile.actor.workspace_id, member.id)
    assert after == member
    users = await keystile.runtime.store.users(keystile.actor.workspace_id)
    assert sorted(u.email for u in users) == ["admin@x", "member@x"]


@pytest.mark.parametrize(("method", "path", "body"), USER_ROUTES)
async def test_users_api_needs_a_key(keystile: Keystile, method: str, path: str, body: Any) -> None:
    member, _ = await make_member(keystile)
    reply = await call(keystile, method, path.format(id=member.id), None, body)
    assert_error(reply, 401, "invalid_api_key")
    assert reply.headers["WWW-Authenticate"] == INVALID_BEARER


async def test_admin_needs_both_the_admin_permission_and_the_admin_role(
    keystile: Keystile,
) -> None:
    admin, admin_key = await make_admin(keystile)
    # An admin user's key without the `admin` permission manages only its own keys.
    keys_only = await keystile.key(admin, name="keys only", permissions=["keys", "mcp"])
    # A member's key that carries `admin` (minted past the API's checks) is still no admin.
    member = await keystile.user("member@x", servers=[])
    member_admin_key = await keystile.key(member, permissions=["admin", "keys"])
    for key in (keys_only.key, member_admin_key.key):
        assert_error(await call(keystile, "GET", "/api/users", key), 403, "forbidden")
        assert_error(await call(keystile, "GET", "/api/audit", key), 403, "forbidden")
    reply = await call(keystile, "GET", "/api/users", admin_key.key)
    assert reply.status == 200
    assert {u["email"] for u in reply.body} == {"admin@x", "member@x"}


# --- create --------------------------------------------------------------------------------


USER_FIELDS = {
    "id",
    "email",
    "display_name",
    "role",
    "is_active",
    "servers",
    "created_at",
}


async def test_create_user_with_defaults(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/api/users", admin_key.key, {"email": "new@x"})
    assert reply.status == 201, reply.text
    user = reply.body
    assert set(user) >= USER_FIELDS
    assert user["email"] == "new@x"
    assert user["display_name"] == ""
    assert user["role"] == "member"
    assert user["is_active"] is True
    assert user["servers"] == []
    assert isinstance(user["id"], str) and user["id"] and "-" not in user["id"]
    assert datetime.fromisoformat(user["created_at"]).tzinfo is not None
    got = await call(keystile, "GET", f"/api/users/{user['id']}", admin_key.key)
    assert got.status == 200 and got.body == user
    listed = await call(keystile, "GET", "/api/users", admin_key.key)
    assert listed.status == 200
    assert user in listed.body
    assert {u["email"] for u in listed.body} == {"admin@x", "new@x"}


async def test_create_user_with_every_field(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    body = {"email": "Dev@Example.com", "display_name": "Dev", "role": "admin", "servers": []}
    reply = await call(keystile, "POST", "/api/users", admin_key.key, body)
    assert reply.status == 201, reply.text
    assert reply.body["email"] == "Dev@Example.com"
    assert reply.body["display_name"] == "Dev"
    assert reply.body["role"] == "admin"
    body = {"email": "m@x", "servers": ["gitlab", "github", "github"]}
    reply = await call(keystile, "POST", "/api/users", admin_key.key, body)
    assert reply.status == 201, reply.text
    assert reply.body["servers"] == ["github", "gitlab"]
    body = {"email": "all@x", "servers": ["*"]}
    reply = await call(keystile, "POST", "/api/users", admin_key.key, body)
    assert reply.status == 201 and reply.body["servers"] == ["*"]


async def test_duplicate_email_is_409(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    first = await call(keystile, "POST", "/api/users", admin_key.key, {"email": "dup@x"})
    assert first.status == 201
    for email in ("dup@x", "DUP@X"):
        reply = await call(keystile, "POST", "/api/users", admin_key.key, {"email": email})
        assert_error(reply, 409, "conflict")
        assert reply.body.get("field") == "email"
    users = await keystile.runtime.store.users(keystile.actor.workspace_id)
    assert [u.email for u in users].count("dup@x") == 1


async def test_an_email_is_unique_per_workspace_among_live_users(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    other = await keystile.runtime.keyring.ensure_workspace("other")
    await keystile.runtime.keyring.create_user(Actor(other.id), email="shared@x")
    reply = await call(keystile, "POST", "/api/users", admin_key.key, {"email": "shared@x"})
    assert reply.status == 201, reply.text
    # A deleted user's email is free again.
    deleted = await call(keystile, "DELETE", f"/api/users/{reply.body['id']}", admin_key.key)
    assert deleted.status == 204
    again = await call(keystile, "POST", "/api/users", admin_key.key, {"email": "shared@x"})
    assert again.status == 201, again.text
    assert again.body["id"] != reply.body["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "email"),
        ({"email": ""}, "email"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@b@c"}, "email"),
        ({"email": "white space@x"}, "email"),
        ({"email": 42}, "email"),
        ({"email": "n@x", "role": "owner"}, "role"),
        ({"email": "n@x", "role": None}, "role"),
        ({"email": "n@x", "password": "hunter2"}, "password"),
        ({"email": "n@x", "servers": ["nope"]}, "servers"),
        ({"email": "n@x", "servers": ["*", "github"]}, "servers"),
        ({"email": "n@x", "servers": "github"}, "servers"),
        ({"email": "n@x", "display_name": 5}, "display_name"),
    ],
)
async def test_create_user_rejects_bad_fields(
    keystile: Keystile, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/api/users", admin_key.key, body)
    assert_422(reply, field)
    users = await keystile.runtime.store.users(keystile.actor.workspace_id)
    assert [u.email for u in users] == ["admin@x"]


@pytest.mark.parametrize("raw", [b"{", b"not json", b"[1, 2]", b'"email"', b"\xff\xfe"])
async def test_create_user_rejects_malformed_json(keystile: Keystile, raw: bytes) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/api/users", admin_key.key, raw=raw)
    assert_error(reply, 400, "invalid_json")
    users = await keystile.runtime.store.users(keystile.actor.workspace_id)
    assert [u.email for u in users] == ["admin@x"]


# --- not found, and other workspaces -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", NO_BODY),
        ("PATCH", "", {"display_name": "x"}),
        ("DELETE", "", NO_BODY),
        ("PUT", "/servers", {"servers": ["*"]}),
    ],
)
async def test_unknown_or_foreign_user_is_404(
    keystile: Keystile, method: str, suffix: str, body: Any
) -> None:
    _, admin_key = await make_admin(keystile)
    keyring = keystile.runtime.keyring
    other = await keyring.ensure_workspace("other")
    foreign = await keyring.create_user(Actor(other.id), email="foreign@x", role="admin")
    for user_id in ("nosuchuser123", foreign.id):
        reply = await call(keystile, method, f"/api/users/{user_id}{suffix}", admin_key.key, body)
        assert_error(reply, 404, "not_found")
    assert await keystile.runtime.store.user(other.id, foreign.id) == foreign
    listed = await call(keystile, "GET", "/api/users", admin_key.key)
    assert foreign.id not in {u["id"] for u in listed.body}


async def test_deleted_user_is_gone(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    assert await reach(keystile, member_key.key, "github") == 200
    reply = await call(keystile, "DELETE", f"/api/users/{member.id}", admin_key.key)
    assert reply.status == 204
    assert reply.text == ""
    # Every key of the user stops at once, on both planes.
    status, headers, _ = await keystile.request("GET", "/mcp-connect/github/", member_key.key)
    assert status == 401 and headers["WWW-Authenticate"] == INVALID_BEARER
    assert_error(await call(keystile, "GET", "/api/keys", member_key.key), 401)
    for method, suffix, body in [
        ("GET", "", NO_BODY),
        ("PATCH", "", {"display_name": "x"}),
        ("DELETE", "", NO_BODY),
        ("PUT", "/servers", {"servers": ["*"]}),
    ]:
        again = await call(keystile, method, f"/api/users/{member.id}{suffix}", admin_key.key, body)
        assert_error(again, 404, "not_found")
    listed = await call(keystile, "GET", "/api/users", admin_key.key)
    assert member.id not in {u["id"] for u in listed.body}
    keys = await call(keystile, "GET", "/api/keys?all=true", admin_key.key)
    assert member_key.record.id not in {k["id"] for k in keys.body}


async def test_disabling_a_user_stops_their_keys_and_enabling_restores_them(
    keystile: Keystile,
) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    assert await reach(keystile, member_key.key, "github") == 200
    reply = await call(
        keystile, "PATCH", f"/api/users/{member.id}", admin_key.key, {"is_active": False}
    )
    assert reply.status == 200 and reply.body["is_active"] is False
    assert await reach(keystile, member_key.key, "github") == 401
    assert_error(await call(keystile, "GET", "/api/servers", member_key.key), 401)
    reply = await call(
        keystile, "PATCH", f"/api/users/{member.id}", admin_key.key, {"is_active": True}
    )
    assert reply.status == 200 and reply.body["is_active"] is True
    assert await reach(keystile, member_key.key, "github") == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "owner"}, "role"),
        ({"is_active": "no"}, "is_active"),
        ({"email": "nope"}, "email"),
        ({"servers": ["*"]}, "servers"),
        ({"id": "other"}, "id"),
    ],
)
async def test_patch_user_rejects_bad_fields(
    keystile: Keystile, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await make_admin(keystile)
    member, _ = await make_member(keystile)
    reply = await call(keystile, "PATCH", f"/api/users/{member.id}", admin_key.key, body)
    assert_422(reply, field)
    assert await keystile.runtime.store.user(keystile.actor.workspace_id, member.id) == member


async def test_patch_user_email_conflict_is_409(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member, _ = await make_member(keystile)
    reply = await call(
        keystile, "PATCH", f"/api/users/{member.id}", admin_key.key, {"email": "ADMIN@x"}
    )
    assert_error(reply, 409, "conflict")
    reply = await call(
        keystile,
        "PATCH",
        f"/api/users/{member.id}",
        admin_key.key,
        {"email": "renamed@x", "display_name": "Renamed"},
    )
    assert reply.status == 200
    assert (reply.body["email"], reply.body["display_name"]) == ("renamed@x", "Renamed")


# --- roles and the last admin --------------------------------------------------------------


async def test_promote_and_demote(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member = await keystile.user("member@x", servers=[])
    path = f"/api/users/{member.id}"
    # A member cannot hold an admin key.
    body = {"name": "m admin", "servers": ["*"], "user_id": member.id, "permissions": ["admin"]}
    assert_422(await call(keystile, "POST", "/api/keys", admin_key.key, body), "permissions")

    promoted = await call(keystile, "PATCH", path, admin_key.key, {"role": "admin"})
    assert promoted.status == 200 and promoted.body["role"] == "admin"
    body["permissions"] = ["admin", "keys", "mcp"]
    created = await call(keystile, "POST", "/api/keys", admin_key.key, body)
    assert created.status == 201, created.text
    their_key = created.body["key"]
    assert (await call(keystile, "GET", "/api/keys?all=true", their_key)).status == 200
    assert (await call(keystile, "GET", "/api/users", their_key)).status == 200
    # As an admin they reach every server, grants or not.
    assert await reachable(keystile, their_key) == dict.fromkeys(SERVERS, 200)

    demoted = await call(keystile, "PATCH", path, admin_key.key, {"role": "member"})
    assert demoted.status == 200 and demoted.body["role"] == "member"
    # The key still says `admin`, but its user no longer is one: at once.
    assert_error(await call(keystile, "GET", "/api/keys?all=true", their_key), 403, "forbidden")
    assert_error(await call(keystile, "GET", "/api/users", their_key), 403, "forbidden")
    assert_error(await call(keystile, "GET", "/api/audit", their_key), 403, "forbidden")
    assert (await call(keystile, "GET", "/api/keys", their_key)).status == 200
    # And as a member with no grants they reach nothing.
    assert await reachable(keystile, their_key) == dict.fromkeys(SERVERS, 403)


async def test_an_admin_may_step_down_while_another_remains(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    other = await keystile.user("other-admin@x", role="admin", servers=["*"])
    path = f"/api/users/{admin.id}"
    reply = await call(keystile, "PATCH", path, admin_key.key, {"role": "member"})
    assert reply.status == 200 and reply.body["role"] == "member"
    assert_error(await call(keystile, "GET", "/api/users", admin_key.key), 403, "forbidden")
    # Still a working self-service key for its own keys.
    assert (await call(keystile, "GET", "/api/keys", admin_key.key)).status == 200
    users = await keystile.runtime.store.users(keystile.actor.workspace_id)
    assert [u.id for u in users if u.role == "admin"] == [other.id]


async def test_the_last_active_admin_stays(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    path = f"/api/users/{admin.id}"
    for method, body in [
        ("PATCH", {"role": "member"}),
        ("PATCH", {"is_active": False}),
        ("PATCH", {"role": "member", "display_name": "x"}),
        ("DELETE", NO_BODY),
    ]:
        reply = await call(keystile, method, path, admin_key.key, body)
        assert_error(reply, 409, "last_admin")
    assert await keystile.runtime.store.user(keystile.actor.workspace_id, admin.id) == admin
    # Harmless changes to the last admin still work.
    ok = await call(keystile, "PATCH", path, admin_key.key, {"display_name": "Boss"})
    assert ok.status == 200 and ok.body["role"] == "admin"
    ok = await call(keystile, "PATCH", path, admin_key.key, {"role": "admin", "is_active": True})
    assert ok.status == 200


async def test_a_disabled_admin_does_not_count(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    other = await keystile.user("other-admin@x", role="admin", servers=[])
    path = f"/api/users/{other.id}"
    assert (await call(keystile, "PATCH", path, admin_key.key, {"is_active": False})).status == 200
    reply = await call(
        keystile, "PATCH", f"/api/users/{admin.id}", admin_key.key, {"role": "member"}
    )
    assert_error(reply, 409, "last_admin")
    # The disabled admin itself may be demoted or deleted: it is not the last active one.
    assert (await call(keystile, "PATCH", path, admin_key.key, {"role": "member"})).status == 200
    assert (await call(keystile, "DELETE", path, admin_key.key)).status == 204


@pytest.mark.parametrize(
    ("method", "body"),
    [("PATCH", {"role": "member"}), ("PATCH", {"is_active": False}), ("DELETE", NO_BODY)],
)
async def test_with_two_admins_one_may_go(keystile: Keystile, method: str, body: Any) -> None:
    admin, admin_key = await make_admin(keystile)
    second = await keystile.user("second@x", role="admin", servers=["*"])
    second_key = await keystile.key(second, permissions=ADMIN_PERMISSIONS)
    # The second admin removes the first (the caller itself), then may not remove itself.
    reply = await call(keystile, method, f"/api/users/{admin.id}", second_key.key, body)
    assert reply.status in (200, 204), reply.text
    reply = await call(keystile, method, f"/api/users/{second.id}", second_key.key, body)
    assert_error(reply, 409, "last_admin")
    # The first admin's key lost its power at once.
    assert (await call(keystile, "GET", "/api/users", admin_key.key)).status in (401, 403)


async def test_concurrent_demotions_leave_an_admin(keystile: Keystile, database_url: str) -> None:
    """Two admins demoted at once: one change must wait for the other and then be refused.

    A check made before the change's transaction (each request seeing the other admin still
    there) would let both commit and leave the workspace with no admin.
    """
    first, admin_key = await make_admin(keystile)
    second = await keystile.user("second@x", role="admin", servers=["*"])
    assert (await call(keystile, "GET", "/api/users", admin_key.key)).status == 200
    async with db(database_url) as conn:
        # Slow every users UPDATE down, so the two requests overlap deterministically.
        await conn.execute(
            "CREATE FUNCTION test_slow_update() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER test_slow_update BEFORE UPDATE ON users FOR EACH ROW "
            "EXECUTE FUNCTION test_slow_update()"
        )
        replies = await asyncio.gather(
            *(
                call(keystile, "PATCH", f"/api/users/{u.id}", admin_key.key, {"role": "member"})
                for u in (first, second)
            )
        )
        admins = await conn.fetchval(
            "SELECT count(*) FROM users WHERE role = 'admin' AND is_active AND deleted_at IS NULL"
        )
    assert sorted(r.status for r in replies) == [200, 409]
    assert admins == 1


# --- server grants -------------------------------------------------------------------------


async def test_grants_govern_what_a_star_key_reaches(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile)
    path = f"/api/users/{member.id}/servers"
    assert await reachable(keystile, member_key.key) == dict.fromkeys(SERVERS, 403)

    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": ["github"]})
    assert reply.status == 200, reply.text
    assert reply.body["id"] == member.id and reply.body["servers"] == ["github"]
    assert await reachable(keystile, member_key.key) == {
        "github": 200,
        "gitlab": 403,
        "tokened": 403,
    }

    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": ["gitlab", "tokened"]})
    assert reply.status == 200 and reply.body["servers"] == ["gitlab", "tokened"]
    assert await reachable(keystile, member_key.key) == {
        "github": 403,
        "gitlab": 200,
        "tokened": 200,
    }

    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": ["*"]})
    assert reply.status == 200 and reply.body["servers"] == ["*"]
    assert await reachable(keystile, member_key.key) == dict.fromkeys(SERVERS, 200)

    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": []})
    assert reply.status == 200 and reply.body["servers"] == []
    assert await reachable(keystile, member_key.key) == dict.fromkeys(SERVERS, 403)
    got = await call(keystile, "GET", f"/api/users/{member.id}", admin_key.key)
    assert got.body["servers"] == []


async def test_taking_a_grant_away_blocks_even_a_key_that_names_the_server(
    keystile: Keystile,
) -> None:
    _, admin_key = await make_admin(keystile)
    member = await keystile.user("member@x", servers=["github", "gitlab"])
    explicit = await keystile.key(member, name="explicit", servers=["github"])
    star = await keystile.key(member, name="star", servers=["*"])
    assert await reach(keystile, explicit.key, "github") == 200
    assert await reach(keystile, explicit.key, "gitlab") == 403  # not on the key
    assert await reach(keystile, star.key, "gitlab") == 200
    path = f"/api/users/{member.id}/servers"
    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": ["gitlab"]})
    assert reply.status == 200
    assert await reach(keystile, explicit.key, "github") == 403
    assert await reach(keystile, star.key, "github") == 403
    assert await reach(keystile, star.key, "gitlab") == 200
    # Giving it back works at once too.
    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": ["github", "gitlab"]})
    assert reply.status == 200
    assert await reach(keystile, explicit.key, "github") == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"servers": ["*", "github"]}, "servers"),
        ({"servers": ["github", "*"]}, "servers"),
        ({"servers": ["nope"]}, "servers"),
        ({"servers": ["github", "nope"]}, "servers"),
        ({"servers": "github"}, "servers"),
        ({"servers": "*"}, "servers"),
        ({"servers": [1]}, "servers"),
        ({"servers": None}, "servers"),
        ({}, "servers"),
        ({"servers": ["github"], "role": "admin"}, "role"),
    ],
)
async def test_put_servers_rejects_bad_lists(
    keystile: Keystile, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    path = f"/api/users/{member.id}/servers"
    assert_422(await call(keystile, "PUT", path, admin_key.key, body), field)
    assert await keystile.runtime.store.user(keystile.actor.workspace_id, member.id) == member
    assert await reachable(keystile, member_key.key) == {
        "github": 200,
        "gitlab": 403,
        "tokened": 403,
    }


async def test_put_servers_rejects_malformed_json(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member, _ = await make_member(keystile, servers=["github"])
    reply = await call(
        keystile, "PUT", f"/api/users/{member.id}/servers", admin_key.key, raw=b'{"servers": ['
    )
    assert_error(reply, 400, "invalid_json")


# --- GET /api/servers ----------------------------------------------------------------------


async def test_servers_list_says_what_the_caller_is_granted(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["gitlab"])
    reply = await call(keystile, "GET", "/api/servers", member_key.key)
    assert reply.status == 200, reply.text
    assert reply.body == [
        {"name": "github", "granted": False},
        {"name": "gitlab", "granted": True},
        {"name": "tokened", "granted": False},
    ]
    reply = await call(keystile, "GET", "/api/servers", admin_key.key)
    assert reply.status == 200
    assert reply.body == [{"name": s, "granted": True} for s in SERVERS]

    path = f"/api/users/{member.id}/servers"
    assert (await call(keystile, "PUT", path, admin_key.key, {"servers": ["*"]})).status == 200
    reply = await call(keystile, "GET", "/api/servers", member_key.key)
    assert reply.body == [{"name": s, "granted": True} for s in SERVERS]
    assert (await call(keystile, "PUT", path, admin_key.key, {"servers": []})).status == 200
    reply = await call(keystile, "GET", "/api/servers", member_key.key)
    assert reply.body == [{"name": s, "granted": False} for s in SERVERS]


async def test_servers_list_needs_a_management_key(keystile: Keystile) -> None:
    member = await keystile.user("member@x", servers=["*"])
    mcp_only = await keystile.key(member, permissions=["mcp"])
    assert_error(await call(keystile, "GET", "/api/servers", mcp_only.key), 403, "forbidden")
    assert_error(await call(keystile, "GET", "/api/servers"), 401, "invalid_api_key")


# --- audit ---------------------------------------------------------------------------------


async def _every_kind_of_change(ks: Keystile, admin_key: str) -> list[tuple[str, str]]:
    """Make one change of every audited kind through the API; (action, target id) in order."""
    done: list[tuple[str, str]] = []

    async def ok(method: str, path: str, body: Any = NO_BODY) -> Any:
        reply = await call(ks, method, path, admin_key, body)
        assert reply.status in (200, 201, 204), (method, path, reply.text)
        return reply.body

    user = await ok("POST", "/api/users", {"email": "audited@x", "servers": ["github"]})
    done.append(("user.create", user["id"]))
    await ok("PATCH", f"/api/users/{user['id']}", {"display_name": "Audited"})
    done.append(("user.update", user["id"]))
    await ok("PUT", f"/api/users/{user['id']}/servers", {"servers": ["github", "gitlab"]})
    done.append(("user.servers", user["id"]))
    body = {"name": "audited key", "servers": ["github"], "user_id": user["id"]}
    key = await ok("POST", "/api/keys", body)
    done.append(("key.create", key["id"]))
    await ok("PATCH", f"/api/keys/{key['id']}", {"name": "renamed key"})
    done.append(("key.update", key["id"]))
    await ok("POST", f"/api/keys/{key['id']}/disable")
    done.append(("key.disable", key["id"]))
    await ok("POST", f"/api/keys/{key['id']}/enable")
    done.append(("key.enable", key["id"]))
    await ok("POST", f"/api/keys/{key['id']}/rotate", {"grace_seconds": 0})
    done.append(("key.rotate", key["id"]))
    await ok("DELETE", f"/api/keys/{key['id']}")
    done.append(("key.revoke", key["id"]))
    await ok("DELETE", f"/api/users/{user['id']}")
    done.append(("user.delete", user["id"]))
    return done


async def test_every_admin_change_is_audited(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    done = await _every_kind_of_change(keystile, admin_key.key)
    reply = await call(keystile, "GET", "/api/audit", admin_key.key)
    assert reply.status == 200, reply.text
    assert reply.body["next_before"] is None
    events = reply.body["events"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    by_admin = [e for e in events if e["actor_key_id"] == admin_key.record.id]
    assert [(e["action"], e["target_id"]) for e in by_admin] == done[::-1]
    for event in by_admin:
        assert event["actor_user_id"] == admin.id
        assert event["target_type"] == event["action"].split(".")[0]
        assert isinstance(event["changes"], dict)
        assert datetime.fromisoformat(event["created_at"]).tzinfo is not None
    changes = {e["action"]: e["changes"] for e in by_admin}
    assert changes["user.create"]["email"] == "audited@x"
    assert changes["user.update"]["display_name"] == {"from": "", "to": "Audited"}
    assert changes["user.servers"]["servers"] == {"from": ["github"], "to": ["github", "gitlab"]}
    assert changes["key.update"]["name"] == {"from": "audited key", "to": "renamed key"}
    assert changes["key.disable"]["is_active"] == {"from": True, "to": False}
    assert changes["key.enable"]["is_active"] == {"from": False, "to": True}
    assert changes["key.create"]["name"] == "audited key"
    # The setup itself (no API caller) is audited as the system.
    system = [e for e in events if e["actor_key_id"] is None]
    assert {e["action"] for e in system} >= {"user.create", "key.create"}
    assert all(e["actor_user_id"] is None for e in system)


async def test_refused_changes_leave_no_audit_row(keystile: Keystile, database_url: str) -> None:
    admin, admin_key = await make_admin(keystile)
    async with db(database_url) as conn:
        before = await conn.fetchval("SELECT count(*) FROM audit_events")
        for method, path, body in [
            ("POST", "/api/users", {"email": "bad"}),
            ("PATCH", f"/api/users/{admin.id}", {"role": "member"}),
            ("PUT", f"/api/users/{admin.id}/servers", {"servers": ["nope"]}),
            ("POST", "/api/users", {"email": "admin@x"}),
        ]:
            assert (await call(keystile, method, path, admin_key.key, body)).status >= 400
        assert await conn.fetchval("SELECT count(*) FROM audit_events") == before


async def test_audit_pages_walk_every_row_once(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    await _every_kind_of_change(keystile, admin_key.key)
    everything = await call(keystile, "GET", "/api/audit?limit=500", admin_key.key)
    all_ids = [e["id"] for e in everything.body["events"]]
    assert len(all_ids) > 10
    seen: list[int] = []
    path = "/api/audit?limit=2"
    pages = 0
    while True:
        reply = await call(keystile, "GET", path, admin_key.key)
        assert reply.status == 200, reply.text
        page = reply.body["events"]
        assert len(page) <= 2
        seen.extend(e["id"] for e in page)
        pages += 1
        if reply.body["next_before"] is None:
            break
        assert reply.body["next_before"] == page[-1]["id"]
        path = f"/api/audit?limit=2&before={reply.body['next_before']}"
        assert pages < 100
    assert seen == all_ids
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=-1", "limit=abc", "limit=501", "limit=1.5", "limit=", "before=x"],
)
async def test_audit_rejects_bad_paging(keystile: Keystile, query: str) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "GET", f"/api/audit?{query}", admin_key.key)
    assert_422(reply, query.partition("=")[0])


async def test_audit_shows_only_the_callers_workspace(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    other = await keystile.runtime.keyring.ensure_workspace("other")
    foreign = await keystile.runtime.keyring.create_user(Actor(other.id), email="foreign@x")
    reply = await call(keystile, "GET", "/api/audit?limit=500", admin_key.key)
    assert reply.status == 200
    assert foreign.id not in {e["target_id"] for e in reply.body["events"]}
    assert other.id not in {e["target_id"] for e in reply.body["events"]}


async def test_no_audit_row_holds_a_full_key(keystile: Keystile, database_url: str) -> None:
    _, admin_key = await make_admin(keystile)
    issued = [admin_key.key]
    created = await call(
        keystile, "POST", "/api/keys", admin_key.key, {"name": "k1", "servers": ["*"]}
    )
    assert created.status == 201
    issued.append(created.body["key"])
    key_id = created.body["id"]
    rotated = await call(
        keystile, "POST", f"/api/keys/{key_id}/rotate", admin_key.key, {"grace_seconds": 60}
    )
    assert rotated.status == 200
    issued.append(rotated.body["key"])
    await call(keystile, "PATCH", f"/api/keys/{key_id}", admin_key.key, {"description": "d"})
    compat = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, {"name": "c"})
    assert compat.status == 200
    issued.append(compat.body["key"])
    cms = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "cms"})
    assert cms.status == 200
    issued.append(cms.body["result"])
    await call(keystile, "DELETE", f"/api/keys/{key_id}", admin_key.key)
    async with db(database_url) as conn:
        rows = [r[0] for r in await conn.fetch("SELECT row_to_json(a)::text FROM audit_events a")]
        hashes = [r[0] for r in await conn.fetch("SELECT secret_hash FROM api_keys")]
    assert len(rows) >= 8
    dump = "\n".join(rows)
    for full in issued:
        secret = full.split("-")[3]
        assert full not in dump
        assert secret[4:20] not in dump  # the prefix's 4 characters may show, no more
    for hashed in hashes:
        assert hashed not in dump
    assert "$argon2" not in dump


# --- nothing half-written -------------------------------------------------------------------


async def test_failed_key_update_changes_nothing(keystile: Keystile, database_url: str) -> None:
    admin, admin_key = await make_admin(keystile)
    user_key = await keystile.key(admin, name="old name", servers=["github"])
    key_id = user_key.record.id
    assert await reach(keystile, user_key.key, "github") == 200
    async with db(database_url) as conn:
        before = await conn.fetchrow(
            "SELECT name, is_active, servers, updated_at FROM api_keys WHERE id = $1", key_id
        )
        audit_before = await conn.fetchval("SELECT count(*) FROM audit_events")
    async with failing_audit(database_url, "key.update"):
        reply = await call(
            keystile,
            "PATCH",
            f"/api/keys/{key_id}",
            admin_key.key,
            {"name": "new name", "is_active": False, "servers": ["gitlab"]},
        )
        assert_internal_error(reply)
        async with db(database_url) as conn:
            after = await conn.fetchrow(
                "SELECT name, is_active, servers, updated_at FROM api_keys WHERE id = $1", key_id
            )
            assert after is not None and after == before
            assert after["name"] == "old name"
            assert await conn.fetchval("SELECT count(*) FROM audit_events") == audit_before
        # Neither this process's cache nor the data plane saw a change.
        assert await reach(keystile, user_key.key, "github") == 200
        assert await reach(keystile, user_key.key, "gitlab") == 403
        got = await call(keystile, "GET", f"/api/keys/{key_id}", admin_key.key)
        assert got.body["name"] == "old name" and got.body["status"] == "active"
        # Other kinds of change are untouched by the fault.
        disabled = await call(keystile, "POST", f"/api/keys/{key_id}/disable", admin_key.key)
        assert disabled.status == 200
        enabled = await call(keystile, "POST", f"/api/keys/{key_id}/enable", admin_key.key)
        assert enabled.status == 200
    reply = await call(keystile, "PATCH", f"/api/keys/{key_id}", admin_key.key, {"name": "new"})
    assert reply.status == 200 and reply.body["name"] == "new"


async def test_failed_grant_change_changes_nothing(keystile: Keystile, database_url: str) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    path = f"/api/users/{member.id}/servers"
    async with failing_audit(database_url, "user.servers"):
        for servers in (["gitlab"], [], ["*"]):
            reply = await call(keystile, "PUT", path, admin_key.key, {"servers": servers})
            assert_internal_error(reply)
        async with db(database_url) as conn:
            grants = await conn.fetch(
                "SELECT server FROM server_grants WHERE user_id = $1", member.id
            )
        assert [g["server"] for g in grants] == ["github"]
        assert await reachable(keystile, member_key.key) == {
            "github": 200,
            "gitlab": 403,
            "tokened": 403,
        }
        got = await call(keystile, "GET", f"/api/users/{member.id}", admin_key.key)
        assert got.body["servers"] == ["github"]
    reply = await call(keystile, "PUT", path, admin_key.key, {"servers": ["gitlab"]})
    assert reply.status == 200 and reply.body["servers"] == ["gitlab"]


async def test_failed_key_create_leaves_no_key(keystile: Keystile, database_url: str) -> None:
    _, admin_key = await make_admin(keystile)
    async with db(database_url) as conn:
        keys_before = await conn.fetchval("SELECT count(*) FROM api_keys")
    body = {"name": "doomed", "servers": ["*"]}
    async with failing_audit(database_url, "key.create"):
        assert_internal_error(await call(keystile, "POST", "/api/keys", admin_key.key, body))
        assert_internal_error(
            await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, {"name": "x"})
        )
        async with db(database_url) as conn:
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == keys_before
            assert await conn.fetchval("SELECT count(*) FROM api_keys WHERE name = 'doomed'") == 0
        listed = await call(keystile, "GET", "/api/keys", admin_key.key)
        assert "doomed" not in {k["name"] for k in listed.body}
    # The name is free: nothing was left behind to collide with.
    created = await call(keystile, "POST", "/api/keys", admin_key.key, body)
    assert created.status == 201, created.text


async def test_failed_user_delete_keeps_user_and_keys(
    keystile: Keystile, database_url: str
) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    async with failing_audit(database_url, "user.delete"):
        reply = await call(keystile, "DELETE", f"/api/users/{member.id}", admin_key.key)
        assert_internal_error(reply)
        async with db(database_url) as conn:
            user = await conn.fetchrow(
                "SELECT deleted_at, is_active FROM users WHERE id = $1", member.id
            )
            revoked = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NOT NULL",
                member.id,
            )
        assert user is not None
        assert user["deleted_at"] is None and user["is_active"] is True
        assert revoked == 0
        assert await reach(keystile, member_key.key, "github") == 200


async def test_failed_user_create_leaves_no_user(keystile: Keystile, database_url: str) -> None:
    _, admin_key = await make_admin(keystile)
    body = {"email": "doomed@x", "servers": ["github"]}
    async with failing_audit(database_url, "user.create"):
        assert_internal_error(await call(keystile, "POST", "/api/users", admin_key.key, body))
        async with db(database_url) as conn:
            assert await conn.fetchval("SELECT count(*) FROM users WHERE email = 'doomed@x'") == 0
            assert await conn.fetchval("SELECT count(*) FROM server_grants") == 1  # the admin's
    created = await call(keystile, "POST", "/api/users", admin_key.key, body)
    assert created.status == 201, created.text


# --- metrics -------------------------------------------------------------------------------


async def test_metrics_are_prometheus_text_without_key_material(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    assert await reach(keystile, member_key.key, "github") == 200
    assert await reach(keystile, member_key.key, "gitlab") == 403
    assert await reach(keystile, member_key.key + "x", "github") == 401
    async with keystile.http.get(keystile.admin + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    assert "# TYPE keystile_requests_total counter" in text
    assert "keystile_requests_total{" in text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_and_labels, _, value = line.rpartition(" ")
            assert name_and_labels.startswith("keystile_")
            float(value)
    for issued in (admin_key, member_key):
        assert issued.key not in text
        assert issued.key.split("-")[3][:8] not in text
        assert issued.record.id not in text
    assert "ks1-" not in text
    assert member.id not in text and admin.id not in text
