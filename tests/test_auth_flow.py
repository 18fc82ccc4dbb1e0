"""Who gets in: every kind of bad key is a 401 with the contract's body, scope errors are 403."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway import keys
from tests.support import Keystile

INVALID_BEARER = 'Bearer realm="keystile", error="invalid_token"'
SCOPE_BEARER = 'Bearer realm="keystile", error="insufficient_scope"'


def assert_401(status: int, headers: dict[str, str], body: object, *, says: str = "") -> None:
    assert status == 401
    assert headers["WWW-Authenticate"] == INVALID_BEARER
    assert isinstance(body, dict)
    assert body["error"] == "invalid_api_key"
    assert says.lower() in body["message"].lower()


def assert_403(status: int, headers: dict[str, str], body: object) -> None:
    assert status == 403
    assert headers["WWW-Authenticate"] == SCOPE_BEARER
    assert isinstance(body, dict) and body["error"] == "forbidden"


async def test_valid_key_reaches_the_server(keystile: Keystile) -> None:
    user = await keystile.user(servers=["github"])
    issued = await keystile.key(user, servers=["github"])
    status, _, body = await keystile.request("POST", "/mcp-connect/github/x", issued.key, json={})
    assert status == 200
    assert body["path"] == "/github/mcp/x"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "Bearer",
        "ks1-abc-def-tooshort",
        "ok1-123-456-abcdefghijklmnopqrstuvwxyz",
    ],
)
async def test_malformed_keys_are_401(keystile: Keystile, token: str) -> None:
    status, headers, body = await keystile.request("GET", "/api/me", token or None)
    assert_401(status, headers, body)
    assert keystile.runtime.metrics.count("argon2_verifications") == 0


async def test_missing_header_is_401(keystile: Keystile) -> None:
    status, headers, body = await keystile.request("GET", "/mcp-connect/github/")
    assert_401(status, headers, body)


async def test_unknown_key_is_401(keystile: Keystile) -> None:
    minted = keys.generate(keys.new_id(), keys.new_id())
    status, headers, body = await keystile.request("GET", "/api/me", minted.full)
    assert_401(status, headers, body)


async def test_wrong_secret_is_401_and_says_nothing_more(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    forged = keys.generate(
        user.id, issued.record.id
    ).full  # right ids, valid checksum, wrong secret
    status, headers, body = await keystile.request("GET", "/api/me", forged)
    assert_401(status, headers, body)
    assert "expired" not in body["message"] and "disabled" not in body["message"]


async def test_wrong_user_id_with_real_key_id_is_401(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    forged = keys.generate(keys.new_id(), issued.record.id).full
    status, headers, body = await keystile.request("GET", "/api/me", forged)
    assert_401(status, headers, body)


async def test_expired_key_is_401_saying_expired(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    status, headers, body = await keystile.request("GET", "/api/me", issued.key)
    assert_401(status, headers, body, says="expired")


async def test_pending_key_is_401_until_valid_from(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user, valid_from=datetime.now(UTC) + timedelta(hours=1))
    status, headers, body = await keystile.request("GET", "/api/me", issued.key)
    assert_401(status, headers, body, says="not valid yet")


async def test_disabled_key_is_401_at_once_and_enable_restores(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200  # now cached
    await keystile.runtime.keyring.update_key(
        keystile.actor, issued.record.id, {"is_active": False}
    )
    status, headers, body = await keystile.request("GET", "/api/me", issued.key)
    assert_401(status, headers, body, says="disabled")
    await keystile.runtime.keyring.update_key(keystile.actor, issued.record.id, {"is_active": True})
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200


async def test_revoked_key_is_401_at_once(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    await keystile.runtime.keyring.revoke_key(keystile.actor, issued.record.id)
    status, headers, body = await keystile.request("GET", "/api/me", issued.key)
    assert_401(status, headers, body, says="revoked")


async def test_disabled_user_stops_all_their_keys(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    first = await keystile.key(user, name="one")
    second = await keystile.key(user, name="two")
    for issued in (first, second):
        assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    await keystile.runtime.keyring.update_user(keystile.actor, user.id, {"is_active": False})
    for issued in (first, second):
        status, headers, body = await keystile.request("GET", "/api/me", issued.key)
        assert_401(status, headers, body)


async def test_x_api_key_header_is_accepted(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    status, _, body = await keystile.request("GET", "/api/me", headers={"X-API-Key": issued.key})
    assert status == 200 and body["key"]["id"] == issued.record.id


async def test_out_of_scope_server_is_403(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user, servers=["github"])
    status, headers, body = await keystile.request("GET", "/mcp-connect/gitlab/x", issued.key)
    assert_403(status, headers, body)


async def test_unknown_server_is_403_like_a_forbidden_one(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    status, headers, body = await keystile.request("GET", "/mcp-connect/nosuch/x", issued.key)
    assert_403(status, headers, body)


async def test_missing_mcp_permission_is_403(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user, permissions=["chat"])
    status, headers, body = await keystile.request("GET", "/mcp-connect/github/x", issued.key)
    assert_403(status, headers, body)


async def test_missing_chat_permission_is_403_and_present_one_forwards(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    mcp_only = await keystile.key(user, name="mcp", permissions=["mcp"])
    chat = await keystile.key(user, name="chat", permissions=["chat"])
    assert_403(*await keystile.request("POST", "/api/v1/chat", mcp_only.key, json={}))
    status, _, body = await keystile.request("POST", "/api/v1/chat?x=1", chat.key, json={})
    assert status == 200
    assert (body["path"], body["query"]) == ("/api/v1/chat", "x=1")


async def test_member_reaches_only_granted_servers(keystile: Keystile) -> None:
    user = await keystile.user(servers=["github"])
    issued = await keystile.key(user, servers=["github", "gitlab"])
    assert (await keystile.request("GET", "/mcp-connect/github/", issued.key))[0] == 200
    assert_403(*await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))


async def test_admin_reaches_every_server_without_grants(keystile: Keystile) -> None:
    admin = await keystile.user("admin@example.com", role="admin", servers=[])
    issued = await keystile.key(admin)
    for server in ("github", "gitlab"):
        assert (await keystile.request("GET", f"/mcp-connect/{server}/", issued.key))[0] == 200


async def test_removing_a_grant_blocks_a_star_key_at_once(keystile: Keystile) -> None:
    user = await keystile.user(servers=["github", "gitlab"])
    issued = await keystile.key(user, servers=["*"])
    assert (await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))[0] == 200
    await keystile.runtime.keyring.set_user_servers(keystile.actor, user.id, ["github"])
    assert_403(*await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))
    assert (await keystile.request("GET", "/mcp-connect/github/", issued.key))[0] == 200


async def test_removing_a_grant_blocks_a_key_that_names_the_server(keystile: Keystile) -> None:
    user = await keystile.user(servers=["gitlab"])
    issued = await keystile.key(user, servers=["gitlab"])
    assert (await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))[0] == 200
    await keystile.runtime.keyring.set_user_servers(keystile.actor, user.id, [])
    assert_403(*await keystile.request("GET", "/mcp-connect/gitlab/", issued.key))


async def test_api_me_describes_key_user_and_workspace(keystile: Keystile) -> None:
    user = await keystile.user("me@example.com", servers=["github", "gitlab"])
    issued = await keystile.key(user, name="mine", servers=["github"], permissions=["mcp", "chat"])
    status, _, body = await keystile.request("GET", "/api/me", issued.key)
    assert status == 200
    assert body["user"]["email"] == "me@example.com"
    assert body["workspace"]["name"] == "default"
    key = body["key"]
    assert key["id"] == issued.record.id and key["name"] == "mine"
    assert key["prefix"] == issued.record.prefix
    assert key["prefix"].endswith("…") and issued.key not in str(body)
    assert key["servers"] == ["github"] and key["permissions"] == ["mcp", "chat"]
    assert key["expires_at"] is None


async def test_rotation_grace_keeps_old_secret_then_refuses_it(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    old = await keystile.key(user)
    assert (await keystile.request("GET", "/api/me", old.key))[0] == 200
    new = await keystile.runtime.keyring.rotate_key(keystile.actor, old.record.id, grace_seconds=0)
    assert (await keystile.request("GET", "/api/me", new.key))[0] == 200
    assert_401(*await keystile.request("GET", "/api/me", old.key))


async def test_rotation_with_grace_accepts_both_secrets(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    old = await keystile.key(user)
    ring = keystile.runtime.keyring
    new = await ring.rotate_key(keystile.actor, old.record.id, grace_seconds=60)
    for _ in range(2):
        assert (await keystile.request("GET", "/api/me", old.key))[0] == 200
        assert (await keystile.request("GET", "/api/me", new.key))[0] == 200


async def test_cache_hit_needs_no_argon2_and_no_database(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    metrics = keystile.runtime.metrics
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    verifications = metrics.count("argon2_verifications")
    misses = metrics.count("cache_misses")
    for _ in range(20):
        assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    assert metrics.count("argon2_verifications") == verifications
    assert metrics.count("cache_misses") == misses


async def test_concurrent_misses_share_one_verification(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    responses = await asyncio.gather(
        *(keystile.request("GET", "/api/me", issued.key) for _ in range(30))
    )
    assert [status for status, _, _ in responses] == [200] * 30
    assert keystile.runtime.metrics.count("argon2_verifications") == 1


async def test_repeated_wrong_secret_costs_one_verification(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    forged = keys.generate(user.id, issued.record.id).full
    for _ in range(5):  # below the throttle's thresholds
        assert (await keystile.request("GET", "/api/me", forged))[0] == 401
    assert keystile.runtime.metrics.count("argon2_verifications") == 1
    # ...and the real key still works.
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
