"""What reaches the upstream and what comes back: headers, bodies, streams, failures."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from gateway.config import Settings, UpstreamSettings
from gateway.keyring import IssuedKey
from tests.support import DEADLINE, Keystile, Upstream, altered, make_settings, start_keystile


def only_server(name: str, url: str, **sections: Any) -> Settings:
    """Test settings whose one MCP server is `name`, at `url`."""
    return replace(make_settings(**sections), mcp_servers={name: UpstreamSettings(url=url)})


@asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An upstream on 127.0.0.1 answering every request with `handler`; yields its origin."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def never_answered() -> AsyncIterator[asyncio.Event]:
    """An event an upstream handler can wait on for as long as the test runs: only the
    gateway's own timer can end such an exchange, however slow the machine."""
    release = asyncio.Event()
    try:
        yield release
    finally:
        release.set()


async def a_key(keystile: Keystile, permissions: tuple[str, ...] = ("mcp", "chat")) -> IssuedKey:
    user = await keystile.user(servers=["*"])
    return await keystile.key(user, permissions=permissions)


async def test_upstream_never_sees_client_credentials(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    headers = {"X-API-Key": issued.key, "Proxy-Authorization": "Basic eA=="}
    status, _, body = await keystile.request(
        "POST", "/mcp-connect/github/", issued.key, headers=headers, json={"a": 1}
    )
    assert status == 200
    assert body["body"] == '{"a": 1}'
    seen = upstream.seen[-1]
    assert "authorization" not in seen["headers"]
    assert "x-api-key" not in seen["headers"]
    assert "proxy-authorization" not in seen["headers"]
    assert issued.key not in str(seen)


async def test_configured_upstream_headers_replace_client_auth(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    sent = {"X-Team": "forged", "x-request-id": "the-clients-id"}
    status, _, _ = await keystile.request("GET", "/mcp-connect/tokened/x", issued.key, headers=sent)
    assert status == 200
    arrived = upstream.seen[-1]["header_list"]
    # A configured header arrives once, with its configured value, whoever else set one.
    for name, value in [
        ("authorization", "Bearer upstream-token"),
        ("x-team", "platform"),
        ("x-request-id", "configured-id"),
    ]:
        assert [v for k, v in arrived if k.lower() == name] == [value]


async def test_identity_headers_are_set_and_forged_copies_removed(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    forged = {
        "X-Keystile-User-Id": "someone-else",
        "X-Keystile-Key-Id": "forged",
        "X-Keystile-Workspace-Id": "other",
    }
    await keystile.request("GET", "/mcp-connect/github/", issued.key, headers=forged)
    seen = upstream.seen[-1]
    assert seen["headers"]["x-keystile-user-id"] == issued.record.user_id
    assert seen["headers"]["x-keystile-key-id"] == issued.record.id
    assert seen["headers"]["x-keystile-workspace-id"] == issued.record.workspace_id
    names = [name.lower() for name, _ in seen["header_list"]]
    assert names.count("x-keystile-user-id") == 1


async def test_forwarded_headers_replace_client_values(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    spoofed = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil", "Forwarded": "for=6"}
    await keystile.request("GET", "/mcp-connect/github/", issued.key, headers=spoofed)
    seen = upstream.seen[-1]["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{keystile.gateway_port}"
    assert "forwarded" not in seen


async def test_trusted_proxy_values_are_kept_and_appended(
    database_url: str, upstream: Upstream
) -> None:
    import ipaddress

    settings = make_settings(
        upstream, gateway={"trusted_proxies": (ipaddress.ip_network("127.0.0.0/8"),)}
    )
    async with start_keystile(settings, database_url) as ks:
        issued = await a_key(ks)
        headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
        await ks.request("GET", "/mcp-connect/github/", issued.key, headers=headers)
    seen = upstream.seen[-1]["headers"]
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"


async def test_host_sent_upstream_is_the_upstream_own(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    await keystile.request(
        "GET", "/mcp-connect/github/", issued.key, headers={"Host": "evil.example"}
    )
    assert upstream.seen[-1]["headers"]["host"] == f"127.0.0.1:{upstream.port}"


async def test_mcp_headers_pass_both_ways(keystile: Keystile, upstream: Upstream) -> None:
    issued = await a_key(keystile)
    mcp = {
        "Mcp-Session-Id": "abc123",
        "MCP-Protocol-Version": "2025-11-25",
        "Last-Event-ID": "41",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
        "Mcp-Param-Text": "hi",
        "X-Custom": "kept",
    }
    status, headers, _ = await keystile.request(
        "POST", "/mcp-connect/github/", issued.key, headers=mcp, json={}
    )
    assert status == 200
    seen = upstream.seen[-1]["headers"]
    for name, value in mcp.items():
        assert seen[name.lower()] == value
    assert headers["Mcp-Session-Id"] == "abc123"
    assert headers["X-Upstream"] == "yes"


async def test_hop_by_hop_headers_are_dropped_both_ways(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    request_headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "private", "TE": "trailers"}
    status, headers, _ = await keystile.request(
        "GET", "/mcp-connect/gitlab/hop", issued.key, headers=request_headers
    )
    assert status == 200
    seen = upstream.seen[-1]["headers"]
    assert "x-hop" not in seen and "te" not in seen
    assert "X-Private-Hop" not in headers
    assert headers["X-End"] == "kept"


async def test_query_string_is_kept(keystile: Keystile, upstream: Upstream) -> None:
    issued = await a_key(keystile)
    await keystile.request("GET", "/mcp-connect/github/tools?sessionId=a%20b&x=1", issued.key)
    seen = upstream.seen[-1]
    assert (seen["path"], seen["query"]) == ("/github/mcp/tools", "sessionId=a%20b&x=1")


async def test_bare_server_path_forwards_to_the_url_itself(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    await keystile.request("POST", "/mcp-connect/github", issued.key, json={})
    assert upstream.seen[-1]["path"] == "/github/mcp"


async def test_request_body_reaches_upstream(keystile: Keystile, upstream: Upstream) -> None:
    issued = await a_key(keystile)
    payload = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    status, _, body = await keystile.request(
        "POST", "/mcp-connect/github/", issued.key, json=payload
    )
    assert status == 200
    assert body["body"] == '{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'


async def test_a_compressed_request_body_is_forwarded_as_it_came(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    original = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'
    compressed = gzip.compress(original)
    status, _, body = await keystile.request(
        "POST",
        "/mcp-connect/github/",
        issued.key,
        data=compressed,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert status == 200, body
    seen = upstream.seen[-1]
    assert seen["headers"]["content-encoding"] == "gzip"
    assert seen["headers"]["content-length"] == str(len(compressed))  # the bytes as sent
    assert body["body"] == original.decode()  # the upstream itself decompressed them


async def test_large_chunked_upload_streams_through(keystile: Keystile) -> None:
    issued = await a_key(keystile)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * 65536

    status, _, body = await keystile.request(
        "POST", "/mcp-connect/gitlab/upload", issued.key, data=chunks()
    )
    assert status == 200
    assert body["received"] == 64 * 65536


async def test_body_over_limit_is_413(database_url: str, upstream: Upstream) -> None:
    settings = make_settings(upstream, gateway={"max_body_bytes": 1000})
    async with start_keystile(settings, database_url) as ks:
        issued = await a_key(ks)
        status, _, body = await ks.request(
            "POST", "/mcp-connect/github/", issued.key, data=b"x" * 1001
        )
        assert status == 413 and body["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"z" * 500

        status, _, body = await ks.request(
            "POST", "/mcp-connect/github/", issued.key, data=chunks()
        )
        assert status == 413
    assert all(seen["body"] != "x" * 1001 for seen in upstream.seen)


async def test_unreachable_upstream_is_502(database_url: str) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = only_server("down", f"http://127.0.0.1:{port}/mcp")
    async with start_keystile(settings, database_url) as ks:
        issued = await a_key(ks)
        status, _, body = await ks.request("GET", "/mcp-connect/down/", issued.key)
    assert status == 502 and body["error"] == "bad_gateway"
    assert set(body) == {"error", "message"}


async def test_upstream_slower_than_response_timeout_is_504(database_url: str) -> None:
    async with never_answered() as release:
        arrived = asyncio.Event()

        async def silent(request: web.Request) -> web.StreamResponse:
            arrived.set()
            await release.wait()
            return web.json_response({"late": True})

        async with serving(silent) as origin:
            settings = replace(
                make_settings(gateway={"response_timeout": 0.3}), chat=UpstreamSettings(url=origin)
            )
            async with start_keystile(settings, database_url) as ks:
                issued = await a_key(ks)
                status, _, body = await ks.request("GET", "/api/v1/slow", issued.key)
                assert status == 504 and body["error"] == "upstream_timeout"
                assert arrived.is_set()  # it reached the upstream, which never answered


async def test_sse_events_arrive_as_they_are_produced_not_buffered(database_url: str) -> None:
    """The upstream writes event n+1 only once the test has read event n through the gateway:
    a gateway that held events back would deadlock here (and fail at the deadline)."""
    count = 5
    delivered: asyncio.Queue[int] = asyncio.Queue()  # the test tells the upstream: got n
    produced: list[int] = []

    async def handshake(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(count):
            if n:
                await delivered.get()
            await response.write(f"id: {n}\ndata: {json.dumps({'n': n})}\n\n".encode())
            produced.append(n)
        await response.write_eof()
        return response

    received: list[int] = []
    async with serving(handshake) as origin:
        settings = only_server("events", f"{origin}/mcp")
        async with start_keystile(settings, database_url) as ks:
            issued = await a_key(ks)
            url = ks.gateway + "/mcp-connect/events/sse"
            headers = {"Authorization": f"Bearer {issued.key}", "Accept": "text/event-stream"}
            async with asyncio.timeout(DEADLINE), ks.http.get(url, headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/event-stream"
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        n = json.loads(line.removeprefix(b"data:"))["n"]
                        # Here before the upstream could write the next event.
                        assert produced == list(range(n + 1)), (n, produced)
                        received.append(n)
                        delivered.put_nowait(n)
    assert received == list(range(count))


async def test_ten_mib_response_streams_through(keystile: Keystile) -> None:
    issued = await a_key(keystile)
    url = keystile.gateway + "/mcp-connect/gitlab/big"
    total = 0
    async with keystile.http.get(url, headers={"Authorization": f"Bearer {issued.key}"}) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            total += len(chunk)
    assert total == 10 * 1024 * 1024


async def test_upstream_reset_mid_stream_cuts_the_client(keystile: Keystile) -> None:
    issued = await a_key(keystile)
    url = keystile.gateway + "/mcp-connect/gitlab/reset"
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with keystile.http.get(
            url, headers={"Authorization": f"Bearer {issued.key}"}
        ) as resp:
            assert resp.status == 200
            async with asyncio.timeout(DEADLINE):
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert received.startswith(b"data: first")


async def test_unknown_route_is_404_json(keystile: Keystile) -> None:
    status, _, body = await keystile.request("GET", "/nothing/here")
    assert status == 404 and body["error"] == "not_found"


async def test_hostile_path_is_400_and_reaches_nobody(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)
    user = await keystile.user("narrow@example.com", servers=["*"])
    narrow = await keystile.key(user, servers=["github"])
    for path in ("/mcp-connect/github/%2e%2e/%2e%2e/gitlab/x", "/mcp-connect/github/..%2fgitlab"):
        status, _, body = await keystile.request("GET", path, narrow.key)
        assert status == 400 and body["error"] == "bad_path"
    assert upstream.seen == []
    assert (await keystile.request("GET", "/mcp-connect/github/x", issued.key))[0] == 200


async def test_health_endpoints(keystile: Keystile) -> None:
    assert (await keystile.request("GET", "/healthz"))[:1] == (200,)
    status, _, body = await keystile.request("GET", "/readyz")
    assert status == 200 and body["store"] is True


async def test_a_stream_silent_past_stream_idle_timeout_is_cut(database_url: str) -> None:
    async with never_answered() as release:

        async def falls_silent(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"id: 0\ndata: first\n\n")
            await release.wait()  # then silence, for as long as the test runs
            return response

        async with serving(falls_silent) as origin:
            settings = only_server("quiet", f"{origin}/mcp", gateway={"stream_idle_timeout": 0.5})
            async with start_keystile(settings, database_url) as ks:
                issued = await a_key(ks)
                url = ks.gateway + "/mcp-connect/quiet/sse"
                received = b""
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with ks.http.get(
                        url, headers={"Authorization": f"Bearer {issued.key}"}
                    ) as resp:
                        assert resp.status == 200
                        async with asyncio.timeout(DEADLINE):
                            async for chunk in resp.content.iter_any():
                                received += chunk
                assert received == b"id: 0\ndata: first\n\n"  # the event came, then the cut
                assert ks.runtime.metrics.count("upstream_errors") == 1


async def test_upstream_that_stalls_its_announced_body_is_504(database_url: str) -> None:
    async with never_answered() as release:

        async def stall(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 100
            await response.prepare(request)
            await response.write(b'{"partial":')
            await release.wait()  # the rest never comes while the test runs
            return response

        async with serving(stall) as origin:
            settings = only_server("stall", f"{origin}/mcp", gateway={"response_timeout": 0.5})
            async with start_keystile(settings, database_url) as ks:
                issued = await a_key(ks)
                status, _, body = await ks.request(
                    "POST", "/mcp-connect/stall/", issued.key, json={}
                )
            assert status == 504 and body["error"] == "upstream_timeout"


async def test_client_leaving_before_the_answer_closes_the_upstream_exchange(
    database_url: str,
) -> None:
    """Nobody waits for an answer no one will read: the upstream connection is closed."""
    upstream_closed = asyncio.Event()
    request_arrived = asyncio.Event()

    async def thinking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        request_arrived.set()
        if await reader.read() == b"":  # no answer is ever sent; wait for the gateway's EOF
            upstream_closed.set()
        writer.close()

    server = await asyncio.start_server(thinking, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = only_server("slow", f"http://127.0.0.1:{port}/mcp")
    try:
        async with start_keystile(settings, database_url) as ks:
            issued = await a_key(ks)
            _, writer = await asyncio.open_connection("127.0.0.1", ks.gateway_port)
            writer.write(
                b"GET /mcp-connect/slow/ HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + issued.key.encode() + b"\r\n\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(DEADLINE):
                await request_arrived.wait()  # the request is upstream
            writer.close()
            async with asyncio.timeout(DEADLINE):
                await upstream_closed.wait()
            assert (
                ks.runtime.metrics.count("upstream_errors") == 0
            )  # the client left: not a failure
    finally:
        server.close()
        await server.wait_closed()


async def test_expect_100_continue_is_answered_only_once_the_key_is_good(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await a_key(keystile)

    async def post_holding_back_the_body(
        key: str,
    ) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", keystile.gateway_port)
        writer.write(
            b"POST /mcp-connect/github/ HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n"
            b"Expect: 100-continue\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n"
        )
        async with asyncio.timeout(DEADLINE):
            first = await reader.readuntil(b"\r\n\r\n")
        return first, reader, writer

    refused, _, writer = await post_holding_back_the_body(altered(issued.key))
    assert refused.startswith(b"HTTP/1.1 401 ")  # no invitation to send the body
    writer.close()

    interim, reader, writer = await post_holding_back_the_body(issued.key)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b'{"a":1}')
    async with asyncio.timeout(DEADLINE):
        final = await reader.readuntil(b"\r\n\r\n")
    assert final.startswith(b"HTTP/1.1 200 ")
    assert upstream.seen[-1]["body"] == '{"a":1}'
    writer.close()


@pytest.fixture
def upstream_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A test CA that Keystile's upstream TLS trusts (through OpenSSL's SSL_CERT_FILE)."""
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return ca


async def https_upstream(cert: trustme.LeafCert) -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"tls": request.secure, "body": await request.text()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_https_upstream_is_verified_and_reached(
    database_url: str, upstream_ca: trustme.CA
) -> None:
    runner, port = await https_upstream(upstream_ca.issue_cert("127.0.0.1"))
    settings = only_server("tls", f"https://127.0.0.1:{port}/mcp")
    try:
        async with start_keystile(settings, database_url) as ks:
            issued = await a_key(ks)
            for n in range(2):  # the second request reuses the kept-alive TLS connection
                status, _, body = await ks.request(
                    "POST", "/mcp-connect/tls/", issued.key, json={"n": n}
                )
                assert status == 200
                assert body == {"tls": True, "body": f'{{"n": {n}}}'}
    finally:
        await runner.cleanup()


async def test_https_upstream_with_an_untrusted_certificate_is_502(
    database_url: str, upstream_ca: trustme.CA
) -> None:
    stranger = trustme.CA()  # not the CA Keystile trusts
    runner, port = await https_upstream(stranger.issue_cert("127.0.0.1"))
    settings = only_server("tls", f"https://127.0.0.1:{port}/mcp")
    try:
        async with start_keystile(settings, database_url) as ks:
            issued = await a_key(ks)
            status, _, body = await ks.request("POST", "/mcp-connect/tls/", issued.key, json={})
            assert status == 502 and body["error"] == "bad_gateway"
    finally:
        await runner.cleanup()
