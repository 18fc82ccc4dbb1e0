"""Secrets stay secret: a full scenario with the access log on and every logger at DEBUG, then
a scan of logs, error bodies, admin answers, metrics and every database row for full keys,
argon2 hashes and the upstream's credential. Plus a structural check of constant-time compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import pytest
from yarl import URL

from gateway import cache, keys
from gateway.accesslog import BUFFER
from gateway.config import Secret, UpstreamSettings
from tests.support import LOOPBACK, Keystile, Upstream, altered, make_settings, start_keystile

UPSTREAM_TOKEN = "upstream-token"
ARGON2 = "$argon2id$"
HASH_COLUMNS = {("api_keys", "secret_hash"), ("api_keys", "previous_hash")}


@dataclass
class Transcript:
    """Everything the scenario saw that must be free of secrets."""

    keys: set[str] = field(default_factory=set)  # every full key issued or sent
    error_bodies: list[str] = field(default_factory=list)
    admin_bodies: list[str] = field(default_factory=list)  # minus the one-time "key" field
    statuses: set[int] = field(default_factory=set)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


async def gateway_call(
    ks: Keystile, log: Transcript, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    url = URL(ks.gateway + path, encoded=True)  # the path exactly as written
    async with ks.http.request(method, url, **kwargs) as resp:
        text = (await resp.read()).decode("utf-8", "replace")
    log.statuses.add(resp.status)
    if resp.status >= 400:
        log.error_bodies.append(text)
    return resp.status, text


async def admin_call(
    ks: Keystile, log: Transcript, method: str, path: str, key: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with ks.http.request(method, ks.admin + path, headers=headers, json=body) as resp:
        raw = await resp.read()
        data = await resp.json(content_type=None) if raw else None
    log.statuses.add(resp.status)
    if resp.status >= 400:
        log.error_bodies.append(raw.decode("utf-8", "replace"))
        return resp.status, data
    if isinstance(data, dict) and "key" in data:
        log.keys.add(data["key"])
        shown = {k: v for k, v in data.items() if k != "key"}
        log.admin_bodies.append(repr(shown))
    else:
        log.admin_bodies.append(raw.decode("utf-8", "replace"))
    return resp.status, data


def leaks(text: str, log: Transcript) -> list[str]:
    """Which secrets `text` contains."""
    found = [f"key {k[:24]}…" for k in log.keys if k in text]
    found += [s for s in (ARGON2, UPSTREAM_TOKEN) if s in text]
    return found


def formatted(records: Iterable[logging.LogRecord]) -> list[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    out = []
    for record in records:
        out.append(formatter.format(record))  # message, args and any traceback
        out.append(repr(record.msg) + repr(record.args))
    return out


async def database_rows(database_url: str) -> list[tuple[str, str, Any]]:
    """(table, column, value) for every value in every table of the public schema."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        cells: list[tuple[str, str, Any]] = []
        for row in tables:
            table = row["table_name"]
            for record in await conn.fetch(f'SELECT * FROM "{table}"'):
                cells.extend((table, column, value) for column, value in record.items())
        return cells
    finally:
        await conn.close()


async def run_scenario(ks: Keystile, upstream: Upstream, log: Transcript) -> None:
    admin_user = await ks.user("admin@example.com", role="admin", servers=["*"])
    boot = await ks.runtime.keyring.create_key(
        ks.actor, user_id=admin_user.id, name="boot", permissions=["admin", "keys", "mcp", "chat"]
    )
    admin = boot.key
    log.keys.add(admin)

    # Users and keys through the admin API.
    _, member = await admin_call(
        ks, log, "POST", "/api/users", admin, {"email": "m@example.com", "servers": ["github"]}
    )
    await admin_call(
        ks,
        log,
        "PUT",
        f"/api/users/{member['id']}/servers",
        admin,
        {"servers": ["github", "tokened"]},
    )
    _, mine = await admin_call(
        ks,
        log,
        "POST",
        "/api/keys",
        admin,
        {"name": "mine", "servers": ["*"], "permissions": ["mcp", "chat"]},
    )
    _, theirs = await admin_call(
        ks,
        log,
        "POST",
        "/api/keys",
        admin,
        {
            "name": "theirs",
            "servers": ["github", "tokened"],
            "user_id": member["id"],
            "rate_limit": {"requests": 100, "per_seconds": 60},
            "allowed_cidrs": ["127.0.0.0/8"],
        },
    )
    assert mine["key"] and theirs["key"]

    # Good requests, both ways of presenting a key.
    bearer = {"Authorization": f"Bearer {mine['key']}"}
    api_key = {"X-API-Key": theirs["key"]}
    assert (await gateway_call(ks, log, "GET", "/api/me", headers=bearer))[0] == 200
    assert (await gateway_call(ks, log, "GET", "/api/me", headers=api_key))[0] == 200
    assert (await gateway_call(ks, log, "POST", "/mcp-connect/tokened/x", headers=api_key))[
        0
    ] == 200
    assert (await gateway_call(ks, log, "GET", "/mcp-connect/github/y", headers=bearer))[0] == 200
    assert (await gateway_call(ks, log, "GET", "/api/v1/chat", headers=bearer))[0] == 200
    # A careless client puts its key in the URL too: it must not reach the access log.
    me_with_key_in_url = f"/api/me?api_key={mine['key']}&page=1"
    assert (await gateway_call(ks, log, "GET", me_with_key_in_url, headers=bearer))[0] == 200

    # Bad ones: wrong secret, garbage, no key, wrong scope, unknown route, too big, dead upstream.
    forged = keys.generate(mine["user_id"], mine["id"]).full
    log.keys.add(forged)
    for headers in (
        {"Authorization": f"Bearer {forged}"},
        {"X-API-Key": forged},
        {"Authorization": f"Bearer {altered(mine['key'])}"},
        {"X-API-Key": "ks1-garbage"},
        {"Authorization": f"Basic {mine['key']}"},
        {},
    ):
        assert (await gateway_call(ks, log, "GET", "/api/me", headers=headers))[0] == 401
    assert (await gateway_call(ks, log, "GET", "/mcp-connect/gitlab/", headers=api_key))[0] == 403
    assert (await gateway_call(ks, log, "GET", "/api/v1/chat", headers=api_key))[0] == 403
    assert (await gateway_call(ks, log, "GET", "/nowhere", headers=bearer))[0] == 404
    status, _ = await gateway_call(
        ks, log, "POST", "/mcp-connect/github/", headers=bearer, data=io.BytesIO(b"x" * 5000)
    )
    assert status == 413
    assert (await gateway_call(ks, log, "GET", "/mcp-connect/dead/", headers=bearer))[0] == 502
    assert (await gateway_call(ks, log, "GET", "/mcp-connect/%2e%2e/", headers=bearer))[0] == 400
    status, _ = await admin_call(
        ks, log, "POST", "/api/keys", admin, {"name": "bad", "servers": ["nope"]}
    )
    assert status == 422
    assert (await admin_call(ks, log, "GET", "/api/keys/nokey", admin))[0] == 404
    assert (await admin_call(ks, log, "GET", "/api/keys", forged))[0] == 401
    assert (await admin_call(ks, log, "GET", "/api/users", theirs["key"]))[0] == 403

    # Rotate (with grace), disable, enable, revoke; use each outcome.
    _, rotated = await admin_call(
        ks, log, "POST", f"/api/keys/{mine['id']}/rotate", admin, {"grace_seconds": 600}
    )
    for key in (mine["key"], rotated["key"]):
        headers = {"Authorization": f"Bearer {key}"}
        assert (await gateway_call(ks, log, "GET", "/api/me", headers=headers))[0] == 200
    await admin_call(ks, log, "POST", f"/api/keys/{theirs['id']}/disable", admin)
    assert (await gateway_call(ks, log, "GET", "/api/me", headers=api_key))[0] == 401
    await admin_call(ks, log, "POST", f"/api/keys/{theirs['id']}/enable", admin)
    assert (await gateway_call(ks, log, "GET", "/api/me", headers=api_key))[0] == 200
    await admin_call(ks, log, "DELETE", f"/api/keys/{theirs['id']}", admin)
    assert (await gateway_call(ks, log, "GET", "/api/me", headers=api_key))[0] == 401
    await admin_call(ks, log, "GET", "/api/keys?all=true", admin)
    await admin_call(ks, log, "GET", "/api/keys?status=revoked&all=true", admin)
    await admin_call(ks, log, "GET", f"/api/keys/{mine['id']}", admin)
    await admin_call(ks, log, "GET", "/api/audit", admin)
    await admin_call(ks, log, "GET", "/api/users", admin)
    await ks.runtime.usage.flush()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_reaches_logs_errors_metrics_or_the_database(
    database_url: str, upstream: Upstream, caplog: pytest.LogCaptureFixture, log_format: str
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(
        upstream,
        gateway={"access_log": True, "access_log_format": log_format, "max_body_bytes": 4096},
    )
    dead = UpstreamSettings(url=f"http://{LOOPBACK}:{closed_port()}/mcp")
    settings = replace(settings, mcp_servers={**settings.mcp_servers, "dead": dead})
    log = Transcript()
    access_lines = io.StringIO()
    BUFFER.redirect(access_lines)
    try:
        async with start_keystile(settings, database_url) as ks:
            await run_scenario(ks, upstream, log)
            async with ks.http.get(ks.admin + "/metrics") as resp:
                metrics = await resp.text()
    finally:
        BUFFER.redirect(None)
    assert {401, 403, 404, 413, 422, 502} <= log.statuses
    assert len(log.keys) >= 5

    # The upstream credential went upstream (expected), the clients' keys never did.
    tokened = [s for s in upstream.seen if s["path"].startswith("/tokened")]
    assert tokened and tokened[0]["headers"]["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    for seen in upstream.seen:
        assert not [k for k in log.keys if k in repr(seen)], seen["path"]

    access = access_lines.getvalue().splitlines()
    if log_format == "json":
        entries = [json.loads(line) for line in access]  # every line one JSON object
        assert any(e["path"] == "/api/me" and e["key_id"] for e in entries)
        access = [json.dumps(e) for e in entries]  # searched below as written, decoded
    assert any("/api/me" in line for line in access)  # the access log was on
    assert any("/api/me?api_key=REDACTED&page=1" in line for line in access)
    for line in access:
        assert not leaks(line, log), line
    records = caplog.records
    for line in formatted(records):
        assert not leaks(line, log), line
    for body in log.error_bodies:
        assert not leaks(body, log), body
    for body in log.admin_bodies:
        assert not leaks(body, log), body
    assert "keystile_argon2_verifications_total" in metrics
    assert not leaks(metrics, log)

    hashes = 0
    for table, column, value in await database_rows(database_url):
        text = str(value)
        if (table, column) in HASH_COLUMNS:
            hashes += text.startswith(ARGON2)
            assert not [k for k in log.keys if k in text]
        else:
            assert not leaks(text, log), (table, column)
    assert hashes == 4  # boot, mine, theirs, and mine's previous secret (in its grace period)


async def test_audit_trail_records_changes_without_secrets(
    database_url: str, upstream: Upstream
) -> None:
    log = Transcript()
    async with start_keystile(make_settings(upstream), database_url) as ks:
        admin_user = await ks.user("admin@example.com", role="admin", servers=["*"])
        boot = await ks.runtime.keyring.create_key(
            ks.actor, user_id=admin_user.id, name="boot", permissions=["admin", "keys"]
        )
        log.keys.add(boot.key)
        _, made = await admin_call(
            ks, log, "POST", "/api/keys", boot.key, {"name": "n", "servers": ["*"]}
        )
        _, rotated = await admin_call(ks, log, "POST", f"/api/keys/{made['id']}/rotate", boot.key)
        _, audit = await admin_call(ks, log, "GET", "/api/audit", boot.key)
    actions = [event["action"] for event in audit["events"]]
    assert "key.create" in actions and "key.rotate" in actions
    assert rotated["key"] != made["key"]
    assert not leaks(repr(audit), log)


async def test_a_key_in_a_malformed_header_is_not_logged(
    keystile: Keystile, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    log = Transcript(keys={issued.key})
    for line in (b"X-API-Key: %s\r", b"X-API-Key: %s\x00", b"Authorization: Bearer %s\r"):
        reader, writer = await asyncio.open_connection(LOOPBACK, keystile.gateway_port)
        writer.write(b"GET /api/me HTTP/1.1\r\nHost: gw\r\n" + line % issued.key.encode())
        writer.write(b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    for text in formatted(caplog.records):
        assert not leaks(text, log), text


async def test_secrets_do_not_show_in_reprs(keystile: Keystile) -> None:
    minted = keys.generate(keys.new_id(), keys.new_id())
    assert minted.secret not in repr(minted)
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    assert issued.key not in repr(issued)
    loaded = await keystile.runtime.store.load_principal(issued.record.id)
    assert loaded is not None and ARGON2 not in repr(loaded)
    tokened = UpstreamSettings(
        url="http://x", headers={"Authorization": Secret(f"Bearer {UPSTREAM_TOKEN}")}
    )
    settings = replace(make_settings(), mcp_servers={"s": tokened})
    assert UPSTREAM_TOKEN not in repr(settings) and UPSTREAM_TOKEN not in str(settings)


def test_key_comparisons_are_constant_time() -> None:
    match = inspect.getsource(cache.CachedKey.match)
    assert "hmac.compare_digest(" in match
    assert "==" not in match
    parse = inspect.getsource(keys.parse)
    assert "hmac.compare_digest(checksum(" in parse
    assert "checksum(text[: -CHECKSUM_LENGTH]) ==" not in parse
    assert "checksum(text[:-CHECKSUM_LENGTH]) ==" not in parse
