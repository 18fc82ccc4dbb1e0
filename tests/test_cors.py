"""CORS (SPEC §4): preflights answered by Keystile, headers on every answer to an allowed
origin, per-key allowed_origins, and a browser on another origin calling the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from aiohttp import web

from gateway.app import bound_port
from gateway.config import UpstreamSettings
from gateway.cors import EXPOSED, CorsPolicy, is_preflight, normalise_origin
from tests.support import (
    LOOPBACK,
    Keystile,
    Upstream,
    admin_call,
    make_settings,
    start_keystile,
)


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("null", "null"),
        ("https://app.example.com/", None),
        ("https://app.example.com/path", None),
        ("https://user@app.example.com", None),
        ("ftp://app.example.com", None),
        ("app.example.com", None),
        ("https://app.example.com:99999", None),
        ("", None),
    ],
)
def test_origins_are_compared_as_browsers_send_them(origin: str, normal: str | None) -> None:
    assert normalise_origin(origin) == normal


def test_answers_to_allowed_origins_only() -> None:
    policy = CorsPolicy(["https://app.example.com", "http://127.0.0.1:3000"])
    assert policy.configured
    headers = policy.answer_headers("https://app.example.com")
    assert headers == {
        "Access-Control-Allow-Origin": "https://app.example.com",
        "Access-Control-Expose-Headers": EXPOSED,
        "Vary": "Origin",
    }
    assert "X-Request-Id" in EXPOSED and "WWW-Authenticate" in EXPOSED
    assert policy.answer_headers("https://evil.example.com") == {}
    assert policy.answer_headers("https://app.example.com.evil.example") == {}
    assert policy.answer_headers(None) == {}
    assert "Access-Control-Allow-Credentials" not in headers
    # OAuth endpoints are open to every origin, configured or not.
    assert CorsPolicy([]).answer_headers("https://x.example", open_route=True)
    assert not CorsPolicy([]).configured
    assert CorsPolicy(["*"]).allows("https://anything.example")


def test_a_preflight_is_answered_without_forwarding() -> None:
    policy = CorsPolicy(["https://app.example.com"])
    status, headers = policy.preflight(
        {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id",
        }
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type, mcp-session-id"
    assert headers["Access-Control-Max-Age"] and headers["Vary"] == "Origin"
    refused, none = policy.preflight(
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert refused == 403 and not any(h.startswith("Access-Control") for h in none)
    # Requested headers that are not header names are not echoed back.
    _, odd = policy.preflight(
        {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-ok, bad\r\nInjected: 1",
        }
    )
    assert "Access-Control-Allow-Headers" not in odd


def test_what_counts_as_a_preflight() -> None:
    assert is_preflight("OPTIONS", {"Origin": "x", "Access-Control-Request-Method": "POST"})
    assert not is_preflight("OPTIONS", {"Origin": "x"})
    assert not is_preflight("POST", {"Origin": "x", "Access-Control-Request-Method": "POST"})


# --- end to end ---------------------------------------------------------------------------------

APP = "http://127.0.0.1:3000"


@pytest.fixture
async def with_cors(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    settings = make_settings(upstream, gateway={"cors_allowed_origins": (APP,)})
    async with start_keystile(settings, database_url) as ks:
        yield ks


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


async def test_a_preflight_is_answered_by_the_gateway_without_a_key(
    with_cors: Keystile, upstream: Upstream
) -> None:
    ask = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version",
    }
    for path in ("/mcp-connect/github/", "/api/v1/chat", "/mcp-connect/nowhere/x", "/api/me"):
        status, headers, _ = await with_cors.request("OPTIONS", path, headers=ask)
        got = lower(headers)
        assert status == 204, path
        assert got["access-control-allow-origin"] == APP
        assert "POST" in got["access-control-allow-methods"]
        assert got["access-control-allow-headers"] == ask["Access-Control-Request-Headers"]
        assert got["vary"] == "Origin" and int(got["access-control-max-age"]) > 0
        assert "access-control-allow-credentials" not in got
    status, headers, _ = await with_cors.request(
        "OPTIONS", "/mcp-connect/github/", headers={**ask, "Origin": "http://127.0.0.1:4000"}
    )
    assert status == 403
    assert not [h for h in lower(headers) if h.startswith("access-control-")]
    assert upstream.seen == []  # never forwarded


async def test_answers_to_an_allowed_origin_carry_cors_headers_errors_included(
    with_cors: Keystile, upstream: Upstream
) -> None:
    user = await with_cors.user(servers=["*"])
    issued = await with_cors.key(user)
    for key, path, expected in (
        (issued.key, "/mcp-connect/github/x", 200),
        (None, "/mcp-connect/github/x", 401),
        (issued.key, "/nowhere", 404),
    ):
        status, headers, _ = await with_cors.request("GET", path, key, headers={"Origin": APP})
        got = lower(headers)
        assert status == expected
        assert got["access-control-allow-origin"] == APP, path
        exposed = got["access-control-expose-headers"]
        for name in ("Mcp-Session-Id", "WWW-Authenticate", "X-Request-Id", "Retry-After"):
            assert name in exposed
        assert "access-control-allow-credentials" not in got
    status, headers, _ = await with_cors.request(
        "GET", "/mcp-connect/github/x", issued.key, headers={"Origin": "http://127.0.0.1:4000"}
    )
    assert status == 200  # served: it is the browser that keeps the answer from the page
    assert "access-control-allow-origin" not in lower(headers)
    status, headers, _ = await with_cors.request("GET", "/mcp-connect/github/x", issued.key)
    assert "access-control-allow-origin" not in lower(headers)


async def test_the_upstreams_cors_headers_give_way_to_the_gateways(
    database_url: str,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {},
            headers={
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "X-Secret",
            },
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    try:
        url = f"http://{LOOPBACK}:{bound_port(runner)}/mcp"
        settings = replace(
            make_settings(None, gateway={"cors_allowed_origins": (APP,)}),
            mcp_servers={"loose": UpstreamSettings(url=url)},
        )
        async with start_keystile(settings, database_url) as ks:
            user = await ks.user(servers=["*"])
            issued = await ks.key(user)
            status, headers, _ = await ks.request(
                "GET", "/mcp-connect/loose/x", issued.key, headers={"Origin": APP}
            )
            got = lower(headers)
            assert status == 200
            assert got["access-control-allow-origin"] == APP
            assert "access-control-allow-credentials" not in got
            assert "X-Secret" not in got["access-control-expose-headers"]
    finally:
        await runner.cleanup()


async def test_a_key_with_allowed_origins_is_refused_from_any_other(
    with_cors: Keystile, upstream: Upstream
) -> None:
    admin = await with_cors.user("admin@example.com", role="admin", servers=["*"])
    admin_key = await with_cors.key(admin, name="admin", permissions=["admin", "keys", "mcp"])
    made = await admin_call(
        with_cors,
        "POST",
        "/api/keys",
        admin_key.key,
        {"name": "widget", "servers": ["*"], "allowed_origins": ["HTTP://127.0.0.1:3000"]},
    )
    assert made.status == 201, made.text
    assert made.body["allowed_origins"] == [APP]  # kept as browsers send it
    widget = made.body["key"]
    assert (
        await with_cors.request("GET", "/mcp-connect/github/x", widget, headers={"Origin": APP})
    )[0] == 200
    assert (await with_cors.request("GET", "/mcp-connect/github/x", widget))[0] == 200  # no Origin
    seen = len(upstream.seen)
    status, _, body = await with_cors.request(
        "GET", "/mcp-connect/github/x", widget, headers={"Origin": "https://copied.example"}
    )
    assert status == 403 and body["error"] == "origin_not_allowed"
    assert len(upstream.seen) == seen
    bad = await admin_call(
        with_cors,
        "PATCH",
        f"/api/keys/{made.body['id']}",
        admin_key.key,
        {"allowed_origins": ["https://x.example/path"]},
    )
    assert bad.status == 422 and bad.body["field"] == "allowed_origins"


async def test_a_limited_key_cannot_widen_its_origins(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.runtime.keyring.create_key(
        keystile.actor,
        user_id=user.id,
        name="limited",
        permissions=["keys", "mcp"],
        allowed_origins=[APP],
    )
    wider = await admin_call(
        keystile,
        "POST",
        "/api/keys",
        issued.key,
        {"name": "w", "servers": ["*"], "allowed_origins": None},
    )
    assert wider.status == 422 and wider.body["field"] == "allowed_origins"
    child = await admin_call(
        keystile, "POST", "/api/keys", issued.key, {"name": "c", "servers": ["*"]}
    )
    assert child.status == 201 and child.body["allowed_origins"] == [APP]  # inherited


async def test_the_oauth_endpoints_are_open_to_every_origin(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream)  # no cors_allowed_origins at all
    async with start_keystile(settings, database_url) as probe:
        public = probe.gateway
    settings = make_settings(upstream, gateway={"public_url": public})
    async with start_keystile(settings, database_url) as ks:
        anywhere = "https://client.example"
        ask = {"Origin": anywhere, "Access-Control-Request-Method": "POST"}
        for path in ("/oauth/token", "/oauth/register", "/oauth/revoke"):
            status, headers, _ = await ks.request("OPTIONS", path, headers=ask)
            assert status == 204 and lower(headers)["access-control-allow-origin"] == anywhere
        status, headers, _ = await ks.request(
            "GET", "/.well-known/oauth-authorization-server", headers={"Origin": anywhere}
        )
        assert status == 200 and lower(headers)["access-control-allow-origin"] == anywhere
        # The MCP routes stay closed to origins nobody configured.
        status, _, _ = await ks.request("OPTIONS", "/mcp-connect/github/", headers=ask)
        assert status == 403


async def test_a_dead_key_from_another_origin_is_still_401(with_cors: Keystile) -> None:
    user = await with_cors.user(servers=["*"])
    issued = await with_cors.runtime.keyring.create_key(
        with_cors.actor, user_id=user.id, name="w", allowed_origins=[APP]
    )
    await with_cors.runtime.keyring.update_key(
        with_cors.actor, issued.record.id, {"is_active": False}
    )
    status, _, body = await with_cors.request(
        "GET", "/mcp-connect/github/x", issued.key, headers={"Origin": "https://other.example"}
    )
    assert status == 401 and body["error"] == "invalid_api_key"  # the key's state comes first
