"""A key never creates, changes or rotates a key into one broader than itself (gateway.narrowing).

First the rule alone, table by table, without HTTP; then through the admin API: a member key
an admin limited (one server, some permissions, an expiry, an allow-list, a rate limit) tries
to widen each field by creating, patching (its own key and a sibling), enabling and rotating,
through the canonical and the compatibility routes. Every refusal is a 422 naming the field and
leaves the database as it was; admin keys keep every power.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway import narrowing
from gateway.errors import ApiError
from gateway.keyring import IssuedKey
from gateway.models import ApiKey, User
from gateway.narrowing import Reach
from tests.support import NO_BODY, Keystile, Reply, assert_422, make_admin
from tests.support import admin_call as call

NOW = datetime(2030, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def rate(requests: int, per_seconds: int) -> dict[str, int]:
    return {"requests": requests, "per_seconds": per_seconds}


def api_key(**fields: Any) -> ApiKey:
    record: dict[str, Any] = {
        "id": "key",
        "user_id": "user",
        "workspace_id": "ws",
        "name": "k",
        "description": "",
        "servers": ("*",),
        "permissions": ("keys", "mcp"),
        "valid_from": None,
        "expires_at": None,
        "is_active": True,
        "secret_prefix": "abcd",
        "created_at": NOW - DAY,
        "updated_at": NOW - DAY,
        "last_used_at": None,
        "revoked_at": None,
        "rate_limit": None,
        "allowed_cidrs": None,
    }
    record.update(fields)
    return ApiKey(**record)


# The limited member key of the pure tests, and keys around it.
LIMITED = api_key(
    id="caller",
    servers=("github",),
    permissions=("keys", "mcp"),
    expires_at=NOW + 10 * DAY,
    allowed_cidrs=("10.0.0.0/8",),
    rate_limit=rate(100, 60),
)
NARROW_SIBLING = api_key(
    id="narrow",
    servers=("github",),
    permissions=("mcp",),
    expires_at=NOW + 5 * DAY,
    allowed_cidrs=("10.1.0.0/16",),
    rate_limit=rate(10, 60),
)
BROAD_SIBLING = api_key(id="broad", servers=("*",), permissions=("mcp", "chat"))


# --- the rule, field by field -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("proposed", "bound", "within"),
    [
        (["github"], ["*"], True),
        (["*"], ["*"], True),
        ([], ["github"], True),
        (["github"], ["github", "gitlab"], True),
        (["github", "gitlab"], ["github", "gitlab"], True),
        (["github", "gitlab"], ["github"], False),
        (["*"], ["github"], False),  # "*" also reaches servers added later
        (["*"], [], False),
        (["github"], [], False),
    ],
)
def test_servers_within(proposed: list[str], bound: list[str], within: bool) -> None:
    assert narrowing.servers_within(proposed, bound) is within


@pytest.mark.parametrize(
    ("proposed", "bound", "within"),
    [
        (["mcp"], ["keys", "mcp"], True),
        (["keys", "mcp"], ["keys", "mcp"], True),
        ([], ["keys"], True),
        (["mcp", "chat"], ["keys", "mcp"], False),
        (["admin"], ["keys", "mcp"], False),
        (["mcp"], ["keys"], False),
    ],
)
def test_permissions_within(proposed: list[str], bound: list[str], within: bool) -> None:
    assert narrowing.permissions_within(proposed, bound) is within


@pytest.mark.parametrize(
    ("proposed", "bound", "within"),
    [
        (None, None, True),
        (NOW, None, True),
        (NOW - DAY, NOW, True),
        (NOW, NOW, True),
        (NOW + timedelta(seconds=1), NOW, False),
        (None, NOW, False),  # never is later than any date
    ],
)
def test_expiry_within(proposed: datetime | None, bound: datetime | None, within: bool) -> None:
    assert narrowing.expiry_within(proposed, bound) is within


@pytest.mark.parametrize(
    ("proposed", "bound", "within"),
    [
        (None, None, True),
        (["10.0.0.0/8"], None, True),
        ([], ["10.0.0.0/8"], True),  # no address at all
        (["10.0.0.0/8"], ["10.0.0.0/8"], True),
        (["10.1.0.0/16"], ["10.0.0.0/8"], True),
        (["10.1.2.3/32", "192.168.1.0/24"], ["10.0.0.0/8", "192.168.0.0/16"], True),
        (["2001:db8:1::/48"], ["2001:db8::/32"], True),
        (None, ["10.0.0.0/8"], False),  # from anywhere
        (["0.0.0.0/0"], ["10.0.0.0/8"], False),
        (["10.0.0.0/8"], ["10.0.0.0/16"], False),
        (["10.1.0.0/16", "11.0.0.0/8"], ["10.0.0.0/8"], False),
        (["::/0"], ["0.0.0.0/0"], False),
        (["10.0.0.0/8"], ["::/0"], False),
    ],
)
def test_cidrs_within(proposed: list[str] | None, bound: list[str] | None, within: bool) -> None:
    assert narrowing.cidrs_within(proposed, bound) is within


@pytest.mark.parametrize(
    ("proposed", "bound", "within"),
    [
        (None, None, True),
        (rate(10, 60), None, True),
        (rate(10, 60), rate(10, 60), True),
        (rate(5, 60), rate(10, 60), True),
        (rate(5, 30), rate(10, 60), True),  # the same ratio, a smaller burst
        (rate(10, 120), rate(10, 60), True),
        (None, rate(10, 60), False),  # unlimited
        (rate(20, 120), rate(10, 60), False),  # the same ratio, a bigger burst
        (rate(10, 30), rate(10, 60), False),  # twice as fast
        (rate(1, 1), rate(10, 60), False),
        (rate(10**9, 10**9), rate(10**9 - 1, 10**9 - 1), False),
    ],
)
def test_rate_within(
    proposed: dict[str, int] | None, bound: dict[str, int] | None, within: bool
) -> None:
    assert narrowing.rate_within(proposed, bound) is within


# --- create, update, rotate -------------------------------------------------------------------


def refused(error: pytest.ExceptionInfo[ApiError], field: str) -> None:
    err = error.value
    assert (err.status, err.code, err.field) == (422, "invalid_request", field)
    assert err.message.startswith(f"{field}: "), err.message


def test_creating_within_the_calling_key_is_allowed() -> None:
    narrowing.require_create(LIMITED, Reach.of(NARROW_SIBLING))
    narrowing.require_create(LIMITED, Reach.of(LIMITED))  # its equal, too
    narrowing.require_create(BROAD_SIBLING, Reach.of(NARROW_SIBLING))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"servers": ["*"]}, "servers"),
        ({"servers": ["github", "gitlab"]}, "servers"),
        ({"permissions": ["mcp", "chat"]}, "permissions"),
        ({"expires_at": None}, "expires_at"),
        ({"expires_at": NOW + 11 * DAY}, "expires_at"),
        ({"allowed_cidrs": None}, "allowed_cidrs"),
        ({"allowed_cidrs": ["0.0.0.0/0"]}, "allowed_cidrs"),
        ({"rate_limit": None}, "rate_limit"),
        ({"rate_limit": rate(100, 30)}, "rate_limit"),
        ({"servers": ["*"], "rate_limit": None}, "servers"),  # the first field, in a fixed order
    ],
)
def test_creating_beyond_the_calling_key_names_the_field(
    changes: dict[str, Any], field: str
) -> None:
    proposed = Reach.of(NARROW_SIBLING).changed(changes)
    assert narrowing.excess(proposed, Reach.of(LIMITED)) == field
    with pytest.raises(ApiError) as error:
        narrowing.require_create(LIMITED, proposed)
    refused(error, field)


def test_a_refusal_shows_the_calling_keys_bound() -> None:
    with pytest.raises(ApiError) as error:
        narrowing.require_create(LIMITED, Reach.of(LIMITED).changed({"rate_limit": None}))
    assert "100 requests per 60 s" in error.value.message
    with pytest.raises(ApiError) as error:
        narrowing.require_create(LIMITED, Reach.of(LIMITED).changed({"expires_at": None}))
    assert "2030-01-11T00:00:00Z" in error.value.message


DISABLED_BROAD = api_key(id="off", servers=("*",), is_active=False)
EXPIRED_BROAD = api_key(id="old", servers=("*",), expires_at=NOW - DAY)
PENDING_BROAD = api_key(id="later", servers=("*",), valid_from=NOW + DAY)
DISABLED_NARROW = api_key(
    id="off-narrow",
    servers=("github",),
    permissions=("mcp",),
    expires_at=NOW + DAY,
    allowed_cidrs=("10.0.0.0/8",),
    rate_limit=rate(1, 60),
    is_active=False,
)
WITHIN_LIMITED = {
    "servers": ["github"],
    "permissions": ["mcp"],
    "expires_at": NOW + DAY,
    "allowed_cidrs": ["10.0.0.0/8"],
    "rate_limit": rate(100, 60),
}


@pytest.mark.parametrize(
    ("key", "changes", "field"),
    [
        # Its own key: narrowing is fine, widening never.
        (LIMITED, {"servers": []}, None),
        (LIMITED, {"permissions": ["keys"], "rate_limit": rate(10, 60)}, None),
        (LIMITED, {"expires_at": NOW + DAY, "allowed_cidrs": ["10.9.0.0/16"]}, None),
        (LIMITED, {"servers": ["*"]}, "servers"),
        (LIMITED, {"permissions": ["keys", "mcp", "chat"]}, "permissions"),
        (LIMITED, {"expires_at": None}, "expires_at"),
        (LIMITED, {"allowed_cidrs": None}, "allowed_cidrs"),
        (LIMITED, {"rate_limit": None}, "rate_limit"),
        (LIMITED, {"name": "renamed", "description": "d", "valid_from": NOW}, None),
        # A sibling within the caller: up to the caller's bounds, no further.
        (NARROW_SIBLING, {"permissions": ["keys", "mcp"], "rate_limit": rate(100, 60)}, None),
        (NARROW_SIBLING, {"servers": ["github", "gitlab"]}, "servers"),
        (NARROW_SIBLING, {"rate_limit": rate(101, 60)}, "rate_limit"),
        # A broader sibling (an admin made it): narrowed, renamed or disabled, never widened.
        (BROAD_SIBLING, {"name": "renamed"}, None),
        (BROAD_SIBLING, {"servers": ["*"], "permissions": ["mcp", "chat"]}, None),  # unchanged
        (BROAD_SIBLING, {"servers": ["github", "gitlab"]}, None),
        (BROAD_SIBLING, {"permissions": ["chat"]}, None),
        (BROAD_SIBLING, {"is_active": False}, None),
        (BROAD_SIBLING, {"permissions": ["mcp", "chat", "keys"]}, "permissions"),
        # Switching a key back on needs all of it within the caller.
        (DISABLED_BROAD, {"is_active": True}, "servers"),
        (DISABLED_BROAD, {"is_active": True, "servers": ["github"]}, "expires_at"),
        (DISABLED_BROAD, {"is_active": True, **WITHIN_LIMITED}, None),
        (DISABLED_BROAD, {"name": "still off"}, None),
        (DISABLED_NARROW, {"is_active": True}, None),
        (EXPIRED_BROAD, {"expires_at": NOW + DAY}, "servers"),
        (EXPIRED_BROAD, {"expires_at": NOW - 2 * DAY}, None),  # still expired
        (PENDING_BROAD, {"valid_from": NOW}, None),  # valid_from bounds nothing
    ],
)
def test_update(key: ApiKey, changes: dict[str, Any], field: str | None) -> None:
    if field is None:
        narrowing.require_update(LIMITED, key, changes, NOW)
        return
    with pytest.raises(ApiError) as error:
        narrowing.require_update(LIMITED, key, changes, NOW)
    refused(error, field)


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (LIMITED, None),
        (NARROW_SIBLING, None),
        (DISABLED_NARROW, None),
        (BROAD_SIBLING, "servers"),
        (DISABLED_BROAD, "servers"),  # its new secret works once anyone switches it on
        (api_key(**{**WITHIN_LIMITED, "rate_limit": None}), "rate_limit"),
    ],
)
def test_rotate(key: ApiKey, field: str | None) -> None:
    if field is None:
        narrowing.require_rotate(LIMITED, key)
        return
    with pytest.raises(ApiError) as error:
        narrowing.require_rotate(LIMITED, key)
    refused(error, field)


def test_an_unlimited_key_bounds_only_servers_and_permissions() -> None:
    anything = Reach(servers=["github", "gitlab"], permissions=["mcp"], rate_limit=rate(5, 1))
    narrowing.require_create(BROAD_SIBLING, anything)
    with pytest.raises(ApiError) as error:
        narrowing.require_create(BROAD_SIBLING, Reach(servers=["*"], permissions=["keys"]))
    refused(error, "permissions")


# --- through the admin API --------------------------------------------------------------------

OMIT = object()  # the field left out of the request: its default applies


def in_days(days: float) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


# What the admin allowed the member key; the echo gateway's clients come from 127.0.0.1.
MEMBER_LIMITS: dict[str, Any] = {
    "servers": ["github"],
    "permissions": ["keys", "mcp"],
    "allowed_cidrs": ["127.0.0.0/8"],
    "rate_limit": rate(1000, 60),
    "tools": ["github/search_*", "!github/search_secrets"],
}
MEMBER_DAYS = 10


def narrow_fields() -> dict[str, Any]:
    """Within the member key on every field."""
    return {
        "servers": ["github"],
        "permissions": ["mcp"],
        "expires_at": in_days(5),
        "allowed_cidrs": ["127.0.0.1/32"],
        "rate_limit": rate(100, 60),
        "tools": ["github/search_issues", "!github/search_secrets"],
    }


WIDER: list[tuple[str, Any]] = [
    ("servers", ["*"]),
    ("servers", ["github", "gitlab"]),
    ("permissions", ["mcp", "chat"]),
    ("permissions", ["keys", "mcp", "chat"]),
    ("expires_at", None),
    ("expires_at", in_days(MEMBER_DAYS + 10)),
    ("allowed_cidrs", None),
    ("allowed_cidrs", ["0.0.0.0/0"]),
    ("allowed_cidrs", ["127.0.0.1/32", "10.0.0.0/8"]),
    ("rate_limit", None),
    ("rate_limit", rate(2000, 120)),  # the same ratio, a bigger burst
    ("rate_limit", rate(1000, 30)),  # twice as fast
    ("tools", None),
    ("tools", ["github/*"]),
    ("tools", ["github/search_*"]),  # the exclusion dropped
    ("tools", ["github/search_issues", "github/delete_repo", "!github/search_secrets"]),
]
OMITTED = ["expires_at", "allowed_cidrs", "rate_limit", "tools"]


def with_field(fields: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    changed = dict(fields)
    if value is OMIT:
        del changed[field]
    else:
        changed[field] = value
    return changed


async def limited_member(ks: Keystile, role: str = "member") -> tuple[User, IssuedKey]:
    """A user who may reach every server, holding a key an admin limited on every field."""
    user = await ks.user(f"{role}@limited", role=role, servers=["*"])
    issued = await ks.runtime.keyring.create_key(
        ks.actor,
        user_id=user.id,
        name="limited",
        expires_at=datetime.now(UTC) + timedelta(days=MEMBER_DAYS),
        **MEMBER_LIMITS,
    )
    return user, issued


async def snapshot(database_url: str) -> tuple[list[dict[str, Any]], int]:
    """Every key row and the number of audit events. last_used_at is left out: it is
    written behind, off the request path, whatever the request's answer."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM api_keys ORDER BY id")
        events = await conn.fetchval("SELECT count(*) FROM audit_events")
    finally:
        await conn.close()
    return [{k: v for k, v in dict(r).items() if k != "last_used_at"} for r in rows], events


async def refused_and_unchanged(
    ks: Keystile, database_url: str, field: str, method: str, path: str, key: str, body: Any
) -> Reply:
    before = await snapshot(database_url)
    reply = await call(ks, method, path, key, body)
    assert_422(reply, field)
    assert reply.body["error"] == "invalid_request"
    assert await snapshot(database_url) == before
    return reply


async def me(ks: Keystile, key: str) -> int:
    status, _, _ = await ks.request("GET", "/api/me", key)
    return status


@pytest.mark.parametrize("field", OMITTED)
async def test_a_bound_left_out_of_a_create_is_inherited(keystile: Keystile, field: str) -> None:
    _, limited = await limited_member(keystile)
    body = {"name": "child", **with_field(narrow_fields(), field, OMIT)}
    made = await call(keystile, "POST", "/api/keys", limited.key, body)
    assert made.status == 201, made.text
    assert made.body[field] == (await call_key(keystile, limited))[field]


@pytest.mark.parametrize(("field", "value"), WIDER)
async def test_a_limited_key_cannot_create_a_wider_key_but_an_admin_can(
    keystile: Keystile, database_url: str, field: str, value: Any
) -> None:
    member, limited = await limited_member(keystile)
    body = {"name": "child", **with_field(narrow_fields(), field, value)}
    await refused_and_unchanged(
        keystile, database_url, field, "POST", "/api/keys", limited.key, body
    )
    _, admin_key = await make_admin(keystile)
    made = await call(keystile, "POST", "/api/keys", admin_key.key, {**body, "user_id": member.id})
    assert made.status == 201, made.text


async def test_a_limited_key_creates_within_itself(keystile: Keystile, database_url: str) -> None:
    _, limited = await limited_member(keystile)
    fields = narrow_fields()
    made = await call(keystile, "POST", "/api/keys", limited.key, {"name": "child", **fields})
    assert made.status == 201, made.text
    for field in ("servers", "permissions", "allowed_cidrs", "rate_limit"):
        assert made.body[field] == fields[field], field
    assert await me(keystile, made.body["key"]) == 200
    # Its own limits exactly are within it, too.
    equal = {**MEMBER_LIMITS, "expires_at": (await call_key(keystile, limited))["expires_at"]}
    same = await call(keystile, "POST", "/api/keys", limited.key, {"name": "twin", **equal})
    assert same.status == 201, same.text
    # ... and one step further is not.
    wider = {**equal, "name": "wider", "servers": ["*"]}
    await refused_and_unchanged(
        keystile, database_url, "servers", "POST", "/api/keys", limited.key, wider
    )


async def call_key(ks: Keystile, issued: IssuedKey) -> dict[str, Any]:
    got = await call(ks, "GET", f"/api/keys/{issued.record.id}", issued.key)
    assert got.status == 200, got.text
    assert isinstance(got.body, dict)
    return got.body


@pytest.mark.parametrize(("field", "value"), WIDER)
async def test_a_limited_key_cannot_widen_itself_but_an_admin_can(
    keystile: Keystile, database_url: str, field: str, value: Any
) -> None:
    _, limited = await limited_member(keystile)
    path = f"/api/keys/{limited.record.id}"
    await refused_and_unchanged(
        keystile, database_url, field, "PATCH", path, limited.key, {field: value}
    )
    _, admin_key = await make_admin(keystile)
    reply = await call(keystile, "PATCH", path, admin_key.key, {field: value})
    assert reply.status == 200, reply.text


@pytest.mark.parametrize(("field", "value"), WIDER)
async def test_a_limited_key_cannot_widen_a_sibling(
    keystile: Keystile, database_url: str, field: str, value: Any
) -> None:
    _, limited = await limited_member(keystile)
    made = await call(keystile, "POST", "/api/keys", limited.key, {"name": "s", **narrow_fields()})
    assert made.status == 201, made.text
    path = f"/api/keys/{made.body['id']}"
    await refused_and_unchanged(
        keystile, database_url, field, "PATCH", path, limited.key, {field: value}
    )


async def test_a_limited_key_narrows_itself_and_cannot_widen_back(
    keystile: Keystile, database_url: str
) -> None:
    _, limited = await limited_member(keystile)
    path = f"/api/keys/{limited.record.id}"
    narrower = {
        "servers": [],
        "permissions": ["keys"],
        "expires_at": in_days(5),
        "allowed_cidrs": ["127.0.0.1/32"],
        "rate_limit": rate(500, 60),
        "tools": ["github/search_issues", "!github/search_secrets"],
    }
    reply = await call(keystile, "PATCH", path, limited.key, narrower)
    assert reply.status == 200, reply.text
    assert (reply.body["servers"], reply.body["permissions"]) == ([], ["keys"])
    assert reply.body["rate_limit"] == rate(500, 60)
    for field, value in MEMBER_LIMITS.items():
        await refused_and_unchanged(
            keystile, database_url, field, "PATCH", path, limited.key, {field: value}
        )


async def test_a_broader_sibling_can_be_narrowed_and_disabled_but_not_switched_on(
    keystile: Keystile, database_url: str
) -> None:
    member, limited = await limited_member(keystile)
    _, admin_key = await make_admin(keystile)
    broad = await keystile.runtime.keyring.create_key(
        keystile.actor, user_id=member.id, name="broad", permissions=["mcp", "chat"]
    )
    path = f"/api/keys/{broad.record.id}"
    for change in ({"name": "renamed"}, {"servers": ["github", "gitlab"]}, {"is_active": False}):
        reply = await call(keystile, "PATCH", path, limited.key, change)
        assert reply.status == 200, (change, reply.text)
    # Decision: switching it back on is refused even though it returns no secret; it would
    # make a credential broader than the caller work again.
    for method, sub, body in [("POST", "/enable", NO_BODY), ("PATCH", "", {"is_active": True})]:
        reply = await refused_and_unchanged(
            keystile, database_url, "servers", method, path + sub, limited.key, body
        )
        assert "switch this key on" in reply.body["message"]
    # Narrowed to within the caller, it may be switched on.
    assert (await call(keystile, "PATCH", path, limited.key, narrow_fields())).status == 200
    reply = await call(keystile, "POST", f"{path}/enable", limited.key)
    assert reply.status == 200 and reply.body["status"] == "active", reply.text
    # An admin switches on anything.
    assert (await call(keystile, "PATCH", path, admin_key.key, {"servers": ["*"]})).status == 200
    assert (await call(keystile, "POST", f"{path}/disable", admin_key.key)).status == 200
    assert (await call(keystile, "POST", f"{path}/enable", admin_key.key)).status == 200


async def test_an_expired_broader_sibling_is_not_brought_back(
    keystile: Keystile, database_url: str
) -> None:
    member, limited = await limited_member(keystile)
    past = datetime.now(UTC) - timedelta(days=1)
    old = await keystile.runtime.keyring.create_key(
        keystile.actor, user_id=member.id, name="old", expires_at=past
    )
    path = f"/api/keys/{old.record.id}"
    await refused_and_unchanged(
        keystile, database_url, "servers", "PATCH", path, limited.key, {"expires_at": in_days(1)}
    )


async def test_a_limited_key_rotates_only_keys_within_itself(
    keystile: Keystile, database_url: str
) -> None:
    member, limited = await limited_member(keystile)
    _, admin_key = await make_admin(keystile)
    broad = await keystile.runtime.keyring.create_key(
        keystile.actor, user_id=member.id, name="broad", servers=["github"]
    )
    path = f"/api/keys/{broad.record.id}/rotate"
    reply = await refused_and_unchanged(
        keystile, database_url, "expires_at", "POST", path, limited.key, {"grace_seconds": 0}
    )
    assert "key" not in reply.body
    assert await me(keystile, broad.key) == 200  # its secret is the same
    # Its own key it may rotate; an admin rotates anything.
    own = await call(keystile, "POST", f"/api/keys/{limited.record.id}/rotate", limited.key)
    assert own.status == 200, own.text
    rotated = await call(keystile, "POST", path, admin_key.key)
    assert rotated.status == 200 and rotated.body["key"] != broad.key


async def test_only_an_admin_key_is_unbound_however_limited_it_is(
    keystile: Keystile, database_url: str
) -> None:
    """An admin user's key without `admin` is bound like any other; an admin key (permission
    admin, role admin) keeps every power, however limited it is itself."""
    admin, keys_only = await limited_member(keystile, role="admin")
    body: dict[str, Any] = {"name": "wide", "servers": ["*"]}
    await refused_and_unchanged(
        keystile, database_url, "servers", "POST", "/api/keys", keys_only.key, body
    )
    body["permissions"] = ["mcp", "chat", "keys", "admin"]
    limited_admin = await keystile.runtime.keyring.create_key(
        keystile.actor,
        user_id=admin.id,
        name="limited admin",
        expires_at=datetime.now(UTC) + timedelta(days=1),
        **{**MEMBER_LIMITS, "permissions": ["admin", "keys"]},
    )
    made = await call(keystile, "POST", "/api/keys", limited_admin.key, body)
    assert made.status == 201, made.text
    assert made.body["expires_at"] is None and made.body["rate_limit"] is None
    unbound = {"expires_at": None, "allowed_cidrs": None, "rate_limit": None, "servers": ["*"]}
    path = f"/api/keys/{keys_only.record.id}"
    assert (await call(keystile, "PATCH", path, limited_admin.key, unbound)).status == 200
    rotate = f"/api/keys/{made.body['id']}/rotate"
    assert (await call(keystile, "POST", rotate, limited_admin.key)).status == 200


# --- through the compatibility routes ---------------------------------------------------------


async def test_compat_create_gives_the_new_key_the_calling_keys_limits(
    keystile: Keystile,
) -> None:
    _, limited = await limited_member(keystile)
    _, admin_key = await make_admin(keystile)
    auth = await call(
        keystile, "POST", "/api/auth/api-key/create", limited.key, {"name": "a", "expiresIn": 60}
    )
    assert auth.status == 200, auth.text
    cms = await call(
        keystile,
        "POST",
        "/default/admin/api-keys",
        limited.key,
        {"name": "c", "validTo": in_days(1)},
    )
    assert cms.status == 200, cms.text
    for key_id in (auth.body["id"], cms.body["result"].split("-")[2]):
        got = await call(keystile, "GET", f"/api/keys/{key_id}", admin_key.key)
        assert got.body["servers"] == ["github"]
        assert got.body["permissions"] == ["mcp"]  # mcp and chat, as far as it holds them
        assert got.body["allowed_cidrs"] == ["127.0.0.0/8"]
        assert got.body["rate_limit"] == rate(1000, 60)
    # An admin's compatibility keys are as before: every server, mcp and chat, no limits.
    made = await call(keystile, "POST", "/api/auth/api-key/create", admin_key.key, {"name": "x"})
    got = await call(keystile, "GET", f"/api/keys/{made.body['id']}", admin_key.key)
    assert (got.body["servers"], got.body["permissions"]) == (["*"], ["mcp", "chat"])
    assert got.body["allowed_cidrs"] is None and got.body["rate_limit"] is None


@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/auth/api-key/create", {"name": "a"}), ("/default/admin/api-keys", {"name": "c"})],
)
async def test_compat_create_without_an_expiry_inherits_the_calling_keys(
    keystile: Keystile, path: str, body: dict[str, Any]
) -> None:
    _, limited = await limited_member(keystile)
    made = await call(keystile, "POST", path, limited.key, body)
    assert made.status in (200, 201), made.text
    keys = await keystile.runtime.store.list_keys(keystile.actor.workspace_id, user_id=None)
    child = next(k for k in keys if k.name == body["name"])
    assert child.expires_at == limited.record.expires_at
    assert child.tools == limited.record.tools


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/auth/api-key/create", {"name": "a", "expiresIn": 30 * 86400}, "expiresIn"),
        (
            "/api/auth/api-key/create",
            {"name": "a", "expiresIn": 60, "permissions": ["mcp", "chat"]},
            "permissions",
        ),
        ("/default/admin/api-keys", {"name": "c", "validTo": in_days(30)}, "validTo"),
        (
            "/default/admin/api-keys",
            {"name": "c", "validTo": in_days(1), "permissions": ["chat"]},
            "permissions",
        ),
    ],
)
async def test_compat_create_refuses_a_wider_key(
    keystile: Keystile, database_url: str, path: str, body: dict[str, Any], field: str
) -> None:
    _, limited = await limited_member(keystile)
    await refused_and_unchanged(keystile, database_url, field, "POST", path, limited.key, body)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"validTo": None}, "validTo"),
        ({"validTo": in_days(MEMBER_DAYS + 10)}, "validTo"),
        ({"permissions": ["keys", "mcp", "chat"]}, "permissions"),
    ],
)
async def test_compat_put_cannot_widen_the_calling_key(
    keystile: Keystile, database_url: str, body: dict[str, Any], field: str
) -> None:
    _, limited = await limited_member(keystile)
    path = f"/default/admin/api-keys/{limited.record.id}"
    await refused_and_unchanged(keystile, database_url, field, "PUT", path, limited.key, body)


async def test_compat_put_cannot_switch_on_a_broader_key(
    keystile: Keystile, database_url: str
) -> None:
    member, limited = await limited_member(keystile)
    off = await keystile.runtime.keyring.create_key(
        keystile.actor, user_id=member.id, name="off", is_active=False
    )
    path = f"/default/admin/api-keys/{off.record.id}"
    await refused_and_unchanged(
        keystile, database_url, "servers", "PUT", path, limited.key, {"isActive": True}
    )
