"""Call records, request ids and the JSON access log, end to end: every request made with a
verified key is recorded (403 and 429 included, 401 not), with the SPEC §7 fields and never an
argument; the records survive an outage, are bounded, and are written at shutdown."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from gateway.accesslog import BUFFER
from tests.support import (
    FaultyProxy,
    Keystile,
    Upstream,
    altered,
    make_settings,
    start_keystile,
    wait_until,
)

SECRET_ARGUMENT = "an-argument-that-must-never-be-stored"


def tool_call(name: str, ident: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": ident,
        "method": "tools/call",
        "params": {"name": name, "arguments": {"query": SECRET_ARGUMENT}},
    }


def lower(headers: dict[str, str]) -> dict[str, str]:
    """Header names are case-insensitive (aiohttp writes X-Request-ID)."""
    return {name.lower(): value for name, value in headers.items()}


async def calls_in(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM calls ORDER BY id")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def test_each_request_with_a_verified_key_is_recorded(
    keystile: Keystile, database_url: str
) -> None:
    user = await keystile.user(servers=["github", "gitlab"])
    issued = await keystile.key(user, servers=["github"], permissions=["mcp", "chat"])
    key = issued.key
    status, headers, _ = await keystile.request(
        "POST", "/mcp-connect/github/", key, json=tool_call("search_code")
    )
    assert status == 200
    status, _, _ = await keystile.request(
        "POST",
        "/mcp-connect/github/",
        key,
        json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        headers={"Mcp-Method": "tools/call", "Mcp-Name": "from_header"},
    )
    assert status == 200
    assert (await keystile.request("GET", "/mcp-connect/gitlab/x", key))[0] == 403
    assert (await keystile.request("GET", "/api/v1/chat", key))[0] == 200
    assert (await keystile.request("GET", "/api/me", key))[0] == 200
    assert (await keystile.request("GET", "/api/me", altered(key)))[0] == 401  # not verified
    assert (await keystile.request("GET", "/api/me", None))[0] == 401
    assert await keystile.runtime.calls.flush()  # type: ignore[union-attr]

    rows = await calls_in(database_url)
    assert [(r["route"], r["server"], r["status"]) for r in rows] == [
        ("mcp", "github", 200),
        ("mcp", "github", 200),
        ("mcp", "gitlab", 403),
        ("chat", None, 200),
        ("me", None, 200),
    ]
    first, second = rows[0], rows[1]
    assert (first["mcp_method"], first["tool"]) == ("tools/call", "search_code")
    assert (second["mcp_method"], second["tool"]) == ("tools/call", "from_header")  # headers win
    assert first["request_id"] == lower(headers)["x-request-id"]
    for row in rows:
        assert (row["workspace_id"], row["user_id"], row["key_id"]) == (
            user.workspace_id,
            user.id,
            issued.record.id,
        )
        assert row["client"] == "127.0.0.1"
        assert row["duration_ms"] >= 0 and row["bytes_out"] > 0
    assert first["bytes_in"] == len(json.dumps(tool_call("search_code")))
    # Arguments, bodies and header values are never stored: no column could hold them.
    assert SECRET_ARGUMENT not in repr(rows) and key not in repr(rows)


async def test_a_call_streamed_in_after_the_request_began_is_named_too(
    database_url: str,
) -> None:
    """A chunked body still arriving when the request is handled streams upstream; the call
    is named all the same (the forwarder keeps a copy of a small body as it passes)."""
    head_arrived = asyncio.Event()

    async def upstream_handler(request: web.Request) -> web.Response:
        head_arrived.set()  # the gateway is streaming: the body is not all there yet
        return web.json_response(
            {"jsonrpc": "2.0", "id": 1, "result": {}, "got": len(await request.read())}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = json.dumps(tool_call("search_code")).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        await asyncio.wait_for(head_arrived.wait(), 30)
        yield body[10:]

    try:
        async with start_keystile(make_settings(Upstream(runner, port)), database_url) as ks:
            user = await ks.user(servers=["*"])
            issued = await ks.key(user)
            status, _, answer = await ks.request(
                "POST", "/mcp-connect/github/", issued.key, data=chunks()
            )
            assert status == 200 and answer["got"] == len(body)
            assert await ks.runtime.calls.flush()  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
    [row] = await calls_in(database_url)
    assert (row["mcp_method"], row["tool"], row["bytes_in"]) == (
        "tools/call",
        "search_code",
        len(body),
    )


async def test_a_rate_limited_answer_is_recorded_too(keystile: Keystile, database_url: str) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    await keystile.runtime.keyring.update_key(
        keystile.actor, issued.record.id, {"rate_limit": {"requests": 1, "per_seconds": 3600}}
    )
    assert (await keystile.request("GET", "/mcp-connect/github/a", issued.key))[0] == 200
    assert (await keystile.request("GET", "/mcp-connect/github/a", issued.key))[0] == 429
    assert await keystile.runtime.calls.flush()  # type: ignore[union-attr]
    assert [r["status"] for r in await calls_in(database_url)] == [200, 429]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123", True),
        ("a.b:c_d-E", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("ünïcode", False),
    ],
)
async def test_a_request_id_is_kept_when_well_formed_and_made_otherwise(
    keystile: Keystile, upstream: Upstream, sent: str, kept: bool
) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user)
    status, headers, _ = await keystile.request(
        "GET", "/mcp-connect/github/x", issued.key, headers={"X-Request-Id": sent}
    )
    assert status == 200
    returned = lower(headers)["x-request-id"]
    assert (returned == sent) is kept
    assert 1 <= len(returned) <= 128
    # The same id upstream, once: the client's own copy never travels beside it.
    sent_up = [v for k, v in upstream.seen[-1]["header_list"] if k.lower() == "x-request-id"]
    assert sent_up == [returned]
    # Error answers carry it too, and each request gets its own.
    status, first, _ = await keystile.request("GET", "/nowhere")
    status, second, _ = await keystile.request("GET", "/api/me", "ks1-bad")
    assert lower(first)["x-request-id"] != lower(second)["x-request-id"]


async def test_the_json_access_log_names_who_called_what_and_never_a_key(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, gateway={"access_log": True, "access_log_format": "json"})
    lines = io.StringIO()
    BUFFER.redirect(lines)
    try:
        async with start_keystile(settings, database_url) as ks:
            user = await ks.user(servers=["*"])
            issued = await ks.key(user)
            status, _, _ = await ks.request(
                "POST",
                f"/mcp-connect/github/?api_key={issued.key}",
                issued.key,
                json=tool_call("search"),
                headers={"X-Request-Id": "trace-1"},
            )
            assert status == 200
            assert (await ks.request("GET", "/api/me", "ks1-bad"))[0] == 401
    finally:
        BUFFER.redirect(None)
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    call = next(e for e in entries if e["request_id"] == "trace-1")
    assert call["key_id"] == issued.record.id and call["user_id"] == user.id
    assert (call["server"], call["mcp_method"], call["tool"]) == ("github", "tools/call", "search")
    assert call["status"] == 200 and call["method"] == "POST"
    assert call["path"] == "/mcp-connect/github/?api_key=REDACTED"
    refused = next(e for e in entries if e["status"] == 401)
    assert refused["key_id"] is None and refused["request_id"]
    assert issued.key not in lines.getvalue() and SECRET_ARGUMENT not in lines.getvalue()


async def test_records_are_kept_through_an_outage_and_written_after(
    database_url: str, upstream: Upstream, db_proxy: FaultyProxy
) -> None:
    settings = make_settings(
        upstream,
        database={"connect_timeout": 1.0, "statement_timeout": 2.0},
        usage={"flush_interval_seconds": 0.2},
    )
    async with start_keystile(settings, db_proxy.url_for(database_url)) as ks:
        user = await ks.user(servers=["*"])
        issued = await ks.key(user)
        assert (await ks.request("GET", "/mcp-connect/github/before", issued.key))[0] == 200
        await wait_until(lambda: _count(database_url, 1))
        await db_proxy.cut()
        for _ in range(3):
            assert (await ks.request("GET", "/mcp-connect/github/during", issued.key))[0] == 200
        metrics = ks.runtime.metrics
        failures = metrics.count("calls_flush_failures")
        await wait_until(lambda: metrics.count("calls_flush_failures") >= failures + 2)
        assert metrics.count("calls_dropped") == 0
        await db_proxy.restore()
        await wait_until(lambda: _count(database_url, 4))
    rows = await calls_in(database_url)
    assert len(rows) == 4 and len({r["request_id"] for r in rows}) == 4  # once each


async def _count(database_url: str, expected: int) -> bool:
    return len(await calls_in(database_url)) == expected


async def test_the_buffer_is_bounded_and_written_at_shutdown(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(
        upstream, usage={"flush_interval_seconds": 3600, "max_pending_calls": 3}
    )
    async with start_keystile(settings, database_url) as ks:
        user = await ks.user(servers=["*"])
        issued = await ks.key(user)
        ids = []
        for n in range(5):
            _, headers, _ = await ks.request(
                "GET", f"/mcp-connect/github/{n}", issued.key, headers={"X-Request-Id": f"r{n}"}
            )
            ids.append(lower(headers)["x-request-id"])
        assert ks.runtime.metrics.count("calls_dropped") == 2
        assert await calls_in(database_url) == []  # nothing written yet: an hour between flushes
    # Leaving the block is a graceful shutdown: what is pending is written.
    assert [r["request_id"] for r in await calls_in(database_url)] == ids[2:]
