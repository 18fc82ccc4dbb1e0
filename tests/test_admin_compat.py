"""Compatibility routes: the shapes of the systems Keystile replaces, with the canonical rules.

- better-auth style: GET /api/auth/api-key/list, POST /api/auth/api-key/create ({name} -> the
  record plus the full `key`), POST /api/auth/api-key/delete ({keyId} -> {"success": true}).
- CMS style: GET|POST /{workspace}/admin/api-keys, GET|PUT|DELETE /{workspace}/admin/api-keys/{id}
  with `id, name, token` (masked), `isActive, validFrom, validTo, permissions`; POST answers
  {"result": "<full key>"}.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
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

INVALID_BEARER = 'Bearer realm="keystile", error="invalid_token"'
CMS_FIELDS = {"id", "name", "token", "isActive", "validFrom", "validTo", "permissions"}
AUTH_FIELDS = {
    "id",
    "name",
    "start",
    "userId",
    "enabled",
    "permissions",
    "expiresAt",
    "createdAt",
    "updatedAt",
    "lastRequest",
}


async def make_member(
    ks: Keystile, email: str = "member@x", *, servers: list[str] | None = None
) -> tuple[User, IssuedKey]:
    member = await ks.user(email, servers=servers if servers is not None else ["github"])
    return member, await ks.key(member, name="member key", permissions=["keys", "mcp"])


async def me(ks: Keystile, key: str) -> tuple[int, Any]:
    status, _, body = await ks.request("GET", "/api/me", key)
    return status, body


async def reach(ks: Keystile, key: str, server: str = "github") -> int:
    status, _, _ = await ks.request("GET", f"/mcp-connect/{server}/", key)
    return status


def future(days: int = 30) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0).isoformat()


def past(days: int = 1) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).replace(microsecond=0).isoformat()


def same_instant(a: str | None, b: str) -> bool:
    return a is not None and datetime.fromisoformat(a) == datetime.fromisoformat(b)


# --- /api/auth/api-key/* --------------------------------------------------------------------


async def test_auth_create_returns_the_full_key_once_and_it_works(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, {"name": "CI"})
    assert reply.status == 200, reply.text
    body = reply.body
    assert set(body) == AUTH_FIELDS | {"key"}
    full = body["key"]
    assert full.startswith(f"ks1-{admin.id}-{body['id']}-")
    assert body["start"].endswith("…") and full.startswith(body["start"][:-1])
    assert full not in body["start"]
    assert body["name"] == "CI" and body["userId"] == admin.id and body["enabled"] is True
    assert body["expiresAt"] is None and body["lastRequest"] is None
    assert datetime.fromisoformat(body["createdAt"]).tzinfo is not None
    # It works on the data plane, as the key it says it is.
    status, who = await me(keystile, full)
    assert status == 200 and who["key"]["id"] == body["id"]
    assert await reach(keystile, full) == 200
    # Listed afterwards, masked: the full key is never shown again.
    listed = await call(keystile, "GET", "/api/auth/api-key/list", admin_key.key)
    assert listed.status == 200
    assert full not in listed.text
    row = next(k for k in listed.body if k["id"] == body["id"])
    assert set(row) == AUTH_FIELDS
    assert row["start"] == body["start"]
    # ... and audited as the caller's change.
    audit = await call(keystile, "GET", "/api/audit", admin_key.key)
    event = next(e for e in audit.body["events"] if e["target_id"] == body["id"])
    assert event["action"] == "key.create"
    assert (event["actor_user_id"], event["actor_key_id"]) == (admin.id, admin_key.record.id)


async def test_auth_create_with_expiry_and_permissions(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    body = {"name": "short", "expiresIn": 3600, "permissions": ["chat"]}
    reply = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, body)
    assert reply.status == 200, reply.text
    expires = datetime.fromisoformat(reply.body["expiresAt"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    assert reply.body["permissions"] == ["chat"]
    assert await reach(keystile, reply.body["key"]) == 403  # chat only, no mcp


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": 5}, "name"),
        ({"name": "x", "servers": ["*"]}, "servers"),
        ({"name": "x", "expiresIn": 0}, "expiresIn"),
        ({"name": "x", "expiresIn": "soon"}, "expiresIn"),
        ({"name": "x", "permissions": ["root"]}, "permissions"),
    ],
)
async def test_auth_create_rejects_bad_input(
    keystile: Keystile, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, body)
    assert_422(reply, field)
    listed = await call(keystile, "GET", "/api/auth/api-key/list", admin_key.key)
    assert [k["name"] for k in listed.body] == ["admin key"]


async def test_auth_create_duplicate_name_is_409(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    path = "/api/auth/api-key/create"
    assert (await call(keystile, "POST", path, admin_key.key, {"name": "dup"})).status == 200
    assert_error(await call(keystile, "POST", path, admin_key.key, {"name": "dup"}), 409)


async def test_auth_delete_revokes_at_once(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, {"name": "d"})
    full, key_id = created.body["key"], created.body["id"]
    assert await reach(keystile, full) == 200
    reply = await call(
        keystile, "POST", "/api/auth/api-key/delete", admin_key.key, {"keyId": key_id}
    )
    assert reply.status == 200 and reply.body == {"success": True}
    status, headers, body = await keystile.request("GET", "/mcp-connect/github/", full)
    assert status == 401 and body["error"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == INVALID_BEARER
    listed = await call(keystile, "GET", "/api/auth/api-key/list", admin_key.key)
    assert key_id not in {k["id"] for k in listed.body}
    # Revoked for good: the canonical API sees it as revoked and cannot bring it back.
    got = await call(keystile, "GET", f"/api/keys/{key_id}", admin_key.key)
    assert got.body["status"] == "revoked"
    enable = await call(keystile, "POST", f"/api/keys/{key_id}/enable", admin_key.key)
    assert enable.status == 409
    assert await reach(keystile, full) == 401


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "keyId"),
        ({"keyId": ""}, 422, "keyId"),
        ({"keyId": 7}, 422, "keyId"),
        ({"id": "x"}, 422, "id"),
        ({"keyId": "nosuchkey123"}, 404, None),
    ],
)
async def test_auth_delete_rejects_bad_input(
    keystile: Keystile, body: dict[str, Any], status: int, field: str | None
) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/api/auth/api-key/delete", admin_key.key, body)
    if field is None:
        assert_error(reply, status, "not_found")
    else:
        assert_422(reply, field)
    assert await reach(keystile, admin_key.key) == 200


# --- /{workspace}/admin/api-keys ------------------------------------------------------------


async def test_cms_create_answers_result_and_the_key_works(keystile: Keystile) -> None:
    admin, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "cms"})
    assert reply.status == 200, reply.text
    assert set(reply.body) == {"result"}
    full = reply.body["result"]
    assert isinstance(full, str) and full.startswith(f"ks1-{admin.id}-")
    status, who = await me(keystile, full)
    assert status == 200 and who["key"]["name"] == "cms"
    assert await reach(keystile, full) == 200


async def test_cms_list_and_get_show_the_documented_fields_masked(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    valid_from, valid_to = past(), future()
    body: dict[str, Any] = {
        "name": "seeded",
        "isActive": True,
        "validFrom": valid_from,
        "validTo": valid_to,
        "permissions": ["mcp", "chat"],
    }
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, body)
    assert created.status == 200, created.text
    full = created.body["result"]
    key_id = full.split("-")[2]

    listed = await call(keystile, "GET", "/default/admin/api-keys", admin_key.key)
    assert listed.status == 200
    assert isinstance(listed.body, list)
    assert {k["name"] for k in listed.body} == {"admin key", "seeded"}
    for row in listed.body:
        assert set(row) == CMS_FIELDS
        assert row["token"].endswith("…")
    assert full not in listed.text and admin_key.key not in listed.text

    got = await call(keystile, "GET", f"/default/admin/api-keys/{key_id}", admin_key.key)
    assert got.status == 200
    assert got.body == next(k for k in listed.body if k["id"] == key_id)
    key = got.body
    assert key["name"] == "seeded" and key["isActive"] is True
    assert key["permissions"] == ["mcp", "chat"]
    assert same_instant(key["validFrom"], valid_from)
    assert same_instant(key["validTo"], valid_to)
    assert key["token"].endswith("…") and full.startswith(key["token"][:-1])
    assert full not in got.text
    assert len(key["token"]) < len(full)


async def test_cms_put_updates_the_documented_fields(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "a"})
    full = created.body["result"]
    path = f"/default/admin/api-keys/{full.split('-')[2]}"
    valid_to = future(10)
    body: dict[str, Any] = {
        "name": "renamed",
        "isActive": True,
        "validFrom": past(),
        "validTo": valid_to,
        "permissions": ["chat"],
    }
    reply = await call(keystile, "PUT", path, admin_key.key, body)
    assert reply.status == 200, reply.text
    assert set(reply.body) == CMS_FIELDS
    assert reply.body["name"] == "renamed" and reply.body["permissions"] == ["chat"]
    assert same_instant(reply.body["validTo"], valid_to)
    assert full not in reply.text
    assert await reach(keystile, full) == 403  # no longer mcp
    status, _, _ = await keystile.request("GET", "/api/v1/models", full)
    assert status == 200
    # validTo null: never expires.
    reply = await call(keystile, "PUT", path, admin_key.key, {"validTo": None})
    assert reply.status == 200 and reply.body["validTo"] is None


async def test_cms_put_is_active_false_disables_at_once(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "a"})
    full = created.body["result"]
    path = f"/default/admin/api-keys/{full.split('-')[2]}"
    assert await reach(keystile, full) == 200
    reply = await call(keystile, "PUT", path, admin_key.key, {"isActive": False})
    assert reply.status == 200 and reply.body["isActive"] is False
    status, headers, body = await keystile.request("GET", "/mcp-connect/github/", full)
    assert status == 401 and body["error"] == "invalid_api_key"
    assert headers["WWW-Authenticate"] == INVALID_BEARER
    got = await call(keystile, "GET", path, admin_key.key)
    assert got.body["isActive"] is False
    reply = await call(keystile, "PUT", path, admin_key.key, {"isActive": True})
    assert reply.status == 200 and reply.body["isActive"] is True
    assert await reach(keystile, full) == 200


async def test_cms_post_inactive_key_does_not_work(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    body = {"name": "off", "isActive": False}
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, body)
    assert created.status == 200
    assert await reach(keystile, created.body["result"]) == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"validTo": past()}, "validTo"),
        ({"validTo": "tomorrow"}, "validTo"),
        ({"validFrom": 5}, "validFrom"),
        ({"isActive": "yes"}, "isActive"),
        ({"permissions": ["root"]}, "permissions"),
        ({"name": ""}, "name"),
        ({"owner": "x"}, "owner"),
        ({"expires_at": future()}, "expires_at"),
    ],
)
async def test_cms_put_rejects_bad_fields_by_their_cms_names(
    keystile: Keystile, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "a"})
    full = created.body["result"]
    path = f"/default/admin/api-keys/{full.split('-')[2]}"
    before = await call(keystile, "GET", path, admin_key.key)
    reply = await call(keystile, "PUT", path, admin_key.key, body)
    assert_422(reply, field)
    if field in ("validTo", "validFrom"):
        assert "expires_at" not in reply.body["message"]
        assert "valid_from" not in reply.body["message"]
    after = await call(keystile, "GET", path, admin_key.key)
    assert after.body == before.body
    assert await reach(keystile, full) == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "validTo": past()}, "validTo"),
        ({"name": "x", "validTo": "31/12/2030"}, "validTo"),
        ({}, "name"),
        ({"name": "x", "servers": ["*"]}, "servers"),
    ],
)
async def test_cms_post_rejects_bad_fields_by_their_cms_names(
    keystile: Keystile, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, body)
    assert_422(reply, field)
    listed = await call(keystile, "GET", "/default/admin/api-keys", admin_key.key)
    assert [k["name"] for k in listed.body] == ["admin key"]


async def test_cms_window_error_names_only_cms_fields(keystile: Keystile) -> None:
    """validFrom >= validTo: the message names both fields as the client sent them."""
    _, admin_key = await make_admin(keystile)
    body = {"name": "x", "validFrom": future(20), "validTo": future(10)}
    reply = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, body)
    assert_422(reply, "validFrom")
    assert "expires_at" not in reply.body["message"]
    assert "validTo" in reply.body["message"]


async def test_cms_delete_revokes(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "a"})
    full = created.body["result"]
    key_id = full.split("-")[2]
    path = f"/default/admin/api-keys/{key_id}"
    assert await reach(keystile, full) == 200
    reply = await call(keystile, "DELETE", path, admin_key.key)
    assert reply.status == 204
    assert await reach(keystile, full) == 401
    listed = await call(keystile, "GET", "/default/admin/api-keys", admin_key.key)
    assert key_id not in {k["id"] for k in listed.body}
    got = await call(keystile, "GET", path, admin_key.key)
    assert got.status == 200 and got.body["isActive"] is False
    # Revoked is permanent: it cannot be switched back on through this shape either.
    again = await call(keystile, "PUT", path, admin_key.key, {"isActive": True})
    assert again.status == 409
    assert await reach(keystile, full) == 401
    assert (await call(keystile, "DELETE", path, admin_key.key)).status == 204


async def test_cms_unknown_key_is_404(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    path = "/default/admin/api-keys/nosuchkey123"
    for method, body in [("GET", NO_BODY), ("PUT", {"name": "x"}), ("DELETE", NO_BODY)]:
        assert_error(await call(keystile, method, path, admin_key.key, body), 404, "not_found")


async def test_cms_workspace_is_the_callers_by_name_or_id(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    default_id = keystile.actor.workspace_id
    other = await keystile.runtime.keyring.ensure_workspace("other")
    outsider = await keystile.runtime.keyring.create_user(
        Actor(other.id), email="o@x", role="admin", servers=["*"]
    )
    foreign = await keystile.runtime.keyring.create_key(
        Actor(other.id), user_id=outsider.id, name="foreign", permissions=ADMIN_PERMISSIONS
    )
    own = await keystile.key(await keystile.user("m@x", servers=["*"]), name="own")

    for workspace in ("default", default_id):
        listed = await call(keystile, "GET", f"/{workspace}/admin/api-keys", admin_key.key)
        assert listed.status == 200, (workspace, listed.text)
        assert {k["name"] for k in listed.body} == {"admin key", "own"}
        got = await call(
            keystile, "GET", f"/{workspace}/admin/api-keys/{own.record.id}", admin_key.key
        )
        assert got.status == 200 and got.body["name"] == "own"

    key_path = f"/admin/api-keys/{own.record.id}"
    for workspace in ("other", other.id, "nosuchworkspace"):
        for method, path, body in [
            ("GET", f"/{workspace}/admin/api-keys", NO_BODY),
            ("POST", f"/{workspace}/admin/api-keys", {"name": "sneaky"}),
            ("GET", f"/{workspace}{key_path}", NO_BODY),
            ("PUT", f"/{workspace}{key_path}", {"isActive": False}),
            ("DELETE", f"/{workspace}{key_path}", NO_BODY),
        ]:
            reply = await call(keystile, method, path, admin_key.key, body)
            assert_error(reply, 404, "not_found")
    # A key of another workspace is not there, even through the caller's own workspace.
    foreign_path = f"/default/admin/api-keys/{foreign.record.id}"
    for method, body in [("GET", NO_BODY), ("PUT", {"isActive": False}), ("DELETE", NO_BODY)]:
        assert_error(await call(keystile, method, foreign_path, admin_key.key, body), 404)
    delete = {"keyId": foreign.record.id}
    assert_error(
        await call(keystile, "POST", "/api/auth/api-key/delete", admin_key.key, delete), 404
    )
    # Nothing was touched.
    assert await reach(keystile, own.key) == 200
    assert await reach(keystile, foreign.key) == 200
    listed = await call(keystile, "GET", "/default/admin/api-keys", admin_key.key)
    assert "sneaky" not in {k["name"] for k in listed.body}


# --- the canonical authorisation rules, through both shapes ---------------------------------


COMPAT_ROUTES = [
    ("GET", "/api/auth/api-key/list", NO_BODY),
    ("POST", "/api/auth/api-key/create", {"name": "n"}),
    ("POST", "/api/auth/api-key/delete", {"keyId": "{id}"}),
    ("GET", "/default/admin/api-keys", NO_BODY),
    ("POST", "/default/admin/api-keys", {"name": "n"}),
    ("GET", "/default/admin/api-keys/{id}", NO_BODY),
    ("PUT", "/default/admin/api-keys/{id}", {"isActive": False}),
    ("DELETE", "/default/admin/api-keys/{id}", NO_BODY),
]


def _fill(value: Any, key_id: str) -> Any:
    if isinstance(value, dict):
        return {k: v.replace("{id}", key_id) if isinstance(v, str) else v for k, v in value.items()}
    return value


@pytest.mark.parametrize(("method", "path", "body"), COMPAT_ROUTES)
async def test_compat_routes_need_a_key(
    keystile: Keystile, method: str, path: str, body: Any
) -> None:
    _, member_key = await make_member(keystile)
    key_id = member_key.record.id
    reply = await call(keystile, method, path.replace("{id}", key_id), None, _fill(body, key_id))
    assert_error(reply, 401, "invalid_api_key")
    assert reply.headers["WWW-Authenticate"] == INVALID_BEARER
    bad = member_key.key[:-1] + ("A" if member_key.key[-1] != "A" else "B")
    reply = await call(keystile, method, path.replace("{id}", key_id), bad, _fill(body, key_id))
    assert_error(reply, 401, "invalid_api_key")
    assert await reach(keystile, member_key.key) == 200


@pytest.mark.parametrize(("method", "path", "body"), COMPAT_ROUTES)
async def test_compat_routes_need_a_management_permission(
    keystile: Keystile, method: str, path: str, body: Any
) -> None:
    member = await keystile.user("member@x", servers=["*"])
    mcp_only = await keystile.key(member, permissions=["mcp", "chat"])
    key_id = mcp_only.record.id
    reply = await call(
        keystile, method, path.replace("{id}", key_id), mcp_only.key, _fill(body, key_id)
    )
    assert_error(reply, 403, "forbidden")
    assert await reach(keystile, mcp_only.key) == 200


async def test_member_sees_and_manages_only_own_keys(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    member, member_key = await make_member(keystile, servers=["github"])
    _, other_key = await make_member(keystile, "other@x", servers=["*"])

    auth_list = await call(keystile, "GET", "/api/auth/api-key/list", member_key.key)
    assert auth_list.status == 200
    assert {k["id"] for k in auth_list.body} == {member_key.record.id}
    assert {k["userId"] for k in auth_list.body} == {member.id}
    cms_list = await call(keystile, "GET", "/default/admin/api-keys", member_key.key)
    assert cms_list.status == 200
    assert {k["id"] for k in cms_list.body} == {member_key.record.id}
    # An admin sees everyone's, in both shapes.
    everyone = {admin_key.record.id, member_key.record.id, other_key.record.id}
    auth_all = await call(keystile, "GET", "/api/auth/api-key/list", admin_key.key)
    assert {k["id"] for k in auth_all.body} == everyone
    cms_all = await call(keystile, "GET", "/default/admin/api-keys", admin_key.key)
    assert {k["id"] for k in cms_all.body} == everyone

    # Someone else's key is simply not there for a member.
    for victim in (admin_key, other_key):
        path = f"/default/admin/api-keys/{victim.record.id}"
        for method, body in [
            ("GET", NO_BODY),
            ("PUT", {"isActive": False}),
            ("PUT", {"name": "mine now"}),
            ("DELETE", NO_BODY),
        ]:
            reply = await call(keystile, method, path, member_key.key, body)
            assert_error(reply, 404, "not_found")
        body = {"keyId": victim.record.id}
        reply = await call(keystile, "POST", "/api/auth/api-key/delete", member_key.key, body)
        assert_error(reply, 404, "not_found")
    assert await reach(keystile, admin_key.key) == 200
    assert await reach(keystile, other_key.key) == 200
    got = await call(keystile, "GET", f"/api/keys/{other_key.record.id}", admin_key.key)
    assert got.body["name"] == "member key" and got.body["status"] == "active"

    # Their own keys they do manage.
    own_path = f"/default/admin/api-keys/{member_key.record.id}"
    assert (await call(keystile, "GET", own_path, member_key.key)).status == 200
    created = await call(keystile, "POST", "/default/admin/api-keys", member_key.key, {"name": "m"})
    assert created.status == 200, created.text
    mine = created.body["result"]
    assert mine.startswith(f"ks1-{member.id}-")
    # A member's new key reaches only what the member is granted.
    assert await reach(keystile, mine, "github") == 200
    assert await reach(keystile, mine, "gitlab") == 403
    created = await call(
        keystile, "POST", "/api/auth/api-key/create", member_key.key, {"name": "m2"}
    )
    assert created.status == 200, created.text
    assert created.body["userId"] == member.id
    # What such keys are for (mcp, chat), as far as the calling key holds them: it has no chat.
    assert created.body["permissions"] == ["mcp"]
    deleted = await call(
        keystile, "POST", "/api/auth/api-key/delete", member_key.key, {"keyId": created.body["id"]}
    )
    assert deleted.status == 200 and deleted.body == {"success": True}
    assert await reach(keystile, created.body["key"]) == 401


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/default/admin/api-keys", {"name": "up", "permissions": ["admin"]}),
        ("/default/admin/api-keys", {"name": "up", "permissions": ["mcp", "admin"]}),
        ("/api/auth/api-key/create", {"name": "up", "permissions": ["admin"]}),
        ("/api/auth/api-key/create", {"name": "up", "permissions": ["keys", "admin"]}),
    ],
)
async def test_member_cannot_grant_admin(
    keystile: Keystile, path: str, body: dict[str, Any]
) -> None:
    _, member_key = await make_member(keystile)
    assert_422(await call(keystile, "POST", path, member_key.key, body), "permissions")
    listed = await call(keystile, "GET", "/default/admin/api-keys", member_key.key)
    assert [k["name"] for k in listed.body] == ["member key"]


async def test_member_cannot_raise_own_key_permissions(keystile: Keystile) -> None:
    _, member_key = await make_member(keystile)
    path = f"/default/admin/api-keys/{member_key.record.id}"
    reply = await call(keystile, "PUT", path, member_key.key, {"permissions": ["admin", "keys"]})
    assert_422(reply, "permissions")
    got = await call(keystile, "GET", path, member_key.key)
    assert sorted(got.body["permissions"]) == ["keys", "mcp"]


# --- nothing half-written, through the compatibility shapes too -----------------------------


@asynccontextmanager
async def failing_audit(database_url: str, action: str) -> AsyncIterator[None]:
    """A real fault: inserting an audit row with `action` raises inside the transaction."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE FUNCTION test_fail_audit() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'forced failure writing audit row %', NEW.action; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER test_fail_audit BEFORE INSERT ON audit_events FOR EACH ROW "
            f"WHEN (NEW.action = '{action}') EXECUTE FUNCTION test_fail_audit()"
        )
        yield
        await conn.execute("DROP TRIGGER test_fail_audit ON audit_events")
        await conn.execute("DROP FUNCTION test_fail_audit()")
    finally:
        await conn.close()


def assert_internal_error(reply: Reply) -> None:
    assert_error(reply, 500, "internal_error")
    for leak in ("Traceback", "forced failure", "RaiseError", "asyncpg"):
        assert leak not in reply.text


async def test_failed_compat_changes_leave_the_key_as_it_was(
    keystile: Keystile, database_url: str
) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "a"})
    full = created.body["result"]
    key_id = full.split("-")[2]
    path = f"/default/admin/api-keys/{key_id}"
    before = await call(keystile, "GET", path, admin_key.key)
    async with failing_audit(database_url, "key.disable"):
        assert_internal_error(await call(keystile, "PUT", path, admin_key.key, {"isActive": False}))
        assert await reach(keystile, full) == 200
    async with failing_audit(database_url, "key.update"):
        body = {"name": "b", "validTo": future()}
        assert_internal_error(await call(keystile, "PUT", path, admin_key.key, body))
    async with failing_audit(database_url, "key.revoke"):
        assert_internal_error(await call(keystile, "DELETE", path, admin_key.key))
        delete = {"keyId": key_id}
        assert_internal_error(
            await call(keystile, "POST", "/api/auth/api-key/delete", admin_key.key, delete)
        )
        assert await reach(keystile, full) == 200
    assert (await call(keystile, "GET", path, admin_key.key)).body == before.body
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT revoked_at, is_active FROM api_keys WHERE id = $1", key_id
        )
    finally:
        await conn.close()
    assert row is not None and row["revoked_at"] is None and row["is_active"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/auth/api-key/create"),
        ("POST", "/api/auth/api-key/delete"),
        ("POST", "/default/admin/api-keys"),
        ("PUT", "/default/admin/api-keys/{id}"),
    ],
)
@pytest.mark.parametrize("raw", [b"{", b"[]", b"null"])
async def test_compat_routes_reject_malformed_json(
    keystile: Keystile, method: str, path: str, raw: bytes
) -> None:
    _, admin_key = await make_admin(keystile)
    headers = {"Authorization": f"Bearer {admin_key.key}", "Content-Type": "application/json"}
    url = keystile.admin + path.replace("{id}", admin_key.record.id)
    async with keystile.http.request(method, url, headers=headers, data=raw) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] == "invalid_json"
    assert await reach(keystile, admin_key.key) == 200


async def test_auth_list_shows_enabled_as_the_key_state(keystile: Keystile) -> None:
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, {"name": "e"})
    key_id = created.body["id"]

    async def enabled() -> bool:
        listed = await call(keystile, "GET", "/api/auth/api-key/list", admin_key.key)
        flag = next(k["enabled"] for k in listed.body if k["id"] == key_id)
        assert isinstance(flag, bool)
        return flag

    assert await enabled() is True
    assert (
        await call(keystile, "POST", f"/api/keys/{key_id}/disable", admin_key.key)
    ).status == 200
    assert await enabled() is False
    assert (await call(keystile, "POST", f"/api/keys/{key_id}/enable", admin_key.key)).status == 200
    assert await enabled() is True


async def test_cms_put_accepts_the_object_it_got_back(keystile: Keystile) -> None:
    """A client that GETs a key and PUTs the whole object back (id, token included) works."""
    _, admin_key = await make_admin(keystile)
    created = await call(keystile, "POST", "/default/admin/api-keys", admin_key.key, {"name": "a"})
    path = f"/default/admin/api-keys/{created.body['result'].split('-')[2]}"
    got = (await call(keystile, "GET", path, admin_key.key)).body
    reply = await call(keystile, "PUT", path, admin_key.key, {**got, "name": "renamed"})
    assert reply.status == 200, reply.text
    assert reply.body["name"] == "renamed" and reply.body["token"] == got["token"]
