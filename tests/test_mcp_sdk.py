"""Real MCP clients and servers (the official SDK) talking through the gateway, on loopback.

Upstreams: an SDK server over Streamable HTTP (session-based and 2026-07-28 stateless on one
endpoint), an SDK server over the legacy HTTP+SSE transport, and the bundled sample server.
Both ends of every exchange are recorded: the client side with httpx2 event hooks, the server
side with an ASGI recorder (tests/mcp_servers.py), so the tests compare the wire itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace

import aiohttp
import anyio
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent
from sse_starlette import EventSourceResponse

from gateway.config import UpstreamSettings
from gateway.keyring import IssuedKey
from gateway.sample_mcp import start_sample_server
from tests.mcp_servers import (
    LOOPBACK,
    LOOPBACK_ONLY,
    Exchange,
    McpApp,
    RunningServer,
    serve,
    sse_app,
    streamable_app,
)
from tests.support import DEADLINE, Keystile, make_settings, start_keystile, wait_until

INVALID_BEARER = 'Bearer realm="keystile", error="invalid_token"'
SCOPE_BEARER = 'Bearer realm="keystile", error="insufficient_scope"'
CREDENTIALS = frozenset({"authorization", "x-api-key"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
GATEWAY_OWNED = ("x-keystile-", "x-forwarded-", "x-request-id")
# Framing, and the headers any HTTP server stamps (uvicorn's date/server sit below the ASGI
# recorder): what may differ between the two sides of the gateway besides the rules above.
FRAMING = frozenset({"date", "server", "content-length", *HOP_BY_HOP})
SEQ = "x-test-seq"  # numbers each client request, to pair it with what the server saw
TOOLS = {"echo", "add", "region", "count", "wait", "whoami"}


# --- plumbing --------------------------------------------------------------------------------


@dataclass
class Wire:
    """Every request an httpx2 client sent and every response head it got."""

    sent: list[httpx2.Request] = field(default_factory=list)
    got: list[httpx2.Response] = field(default_factory=list)
    _seq: Iterator[int] = field(default_factory=itertools.count)

    def client(
        self, headers: Mapping[str, str] | None = None, timeout: httpx2.Timeout | None = None
    ) -> httpx2.AsyncClient:
        async def on_request(request: httpx2.Request) -> None:
            request.headers[SEQ] = str(next(self._seq))
            self.sent.append(request)

        async def on_response(response: httpx2.Response) -> None:
            self.got.append(response)

        return httpx2.AsyncClient(
            headers=dict(headers or {}),
            timeout=timeout or httpx2.Timeout(10.0, read=30.0),
            event_hooks={"request": [on_request], "response": [on_response]},
        )

    def factory(self) -> Callable[..., httpx2.AsyncClient]:
        """An `httpx_client_factory` for `sse_client`."""

        def make(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            assert auth is None
            return self.client(headers, timeout)

        return make

    def methods(self) -> list[str]:
        return [r.method for r in self.sent]


@dataclass
class Stack:
    """Keystile in front of three real MCP servers."""

    ks: Keystile
    sdk: RunningServer  # Streamable HTTP, official SDK
    legacy: RunningServer  # HTTP+SSE, official SDK
    sample_port: int  # gateway.sample_mcp
    _emails: Iterator[int] = field(default_factory=itertools.count)

    def url(self, server: str, rest: str = "") -> str:
        return f"{self.ks.gateway}/mcp-connect/{server}{rest}"

    async def issue(self, servers: Sequence[str], *, grants: Sequence[str] = ("*",)) -> IssuedKey:
        """A fresh member granted `grants`, and an `mcp` key of theirs limited to `servers`."""
        user = await self.ks.user(f"user{next(self._emails)}@example.com", servers=grants)
        return await self.ks.key(user, servers=servers)


@pytest.fixture
async def stack(database_url: str) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exit_stack:
        sdk, legacy = await exit_stack.enter_async_context(serve(streamable_app(), sse_app()))
        runner, sample_port = await start_sample_server(LOOPBACK, 0)
        exit_stack.push_async_callback(runner.cleanup)
        # A short drain on stop keeps teardown quick if a test leaves a stream open.
        settings = replace(
            make_settings(gateway={"shutdown_timeout": 1.0}),
            mcp_servers={
                "sdk": UpstreamSettings(url=f"{sdk.origin}/mcp"),
                "legacy": UpstreamSettings(url=legacy.origin),
                "sample": UpstreamSettings(url=f"http://{LOOPBACK}:{sample_port}/mcp"),
            },
        )
        ks = await exit_stack.enter_async_context(start_keystile(settings, database_url))
        yield Stack(ks, sdk, legacy, sample_port)


def bearer(issued: IssuedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {issued.key}"}


def text(result: CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def seen_by_seq(server: RunningServer) -> dict[str, Exchange]:
    return {seq: e for e in server.exchanges if (seq := e.header(SEQ)) is not None}


def identity_of(issued: IssuedKey) -> dict[str, str]:
    return {
        "x-keystile-user-id": issued.record.user_id,
        "x-keystile-key-id": issued.record.id,
        "x-keystile-workspace-id": issued.record.workspace_id,
    }


def assert_forwarded_unchanged(
    wire: Wire, server: RunningServer, issued: IssuedKey, *, gateway: str
) -> None:
    """Each request reached the server with exactly the client's headers (credentials and
    hop-by-hop out, Host the upstream's, X-Keystile-*/X-Forwarded-* in), and each response
    reached the client with exactly the server's end-to-end headers."""
    seen = seen_by_seq(server)
    answers = {r.request.headers[SEQ]: r for r in wire.got}
    assert wire.sent and set(seen) == {r.headers[SEQ] for r in wire.sent}
    for sent in wire.sent:
        exchange = seen[sent.headers[SEQ]]
        assert exchange.method == sent.method
        client_headers = [(k.lower(), v) for k, v in sent.headers.multi_items()]
        expected = Counter(
            (k, v) for k, v in client_headers if k not in CREDENTIALS | FRAMING | {"host"}
        )
        arrived = Counter(
            (k, v)
            for k, v in exchange.request_headers
            if k not in FRAMING | {"host"} and not k.startswith(GATEWAY_OWNED)
        )
        assert arrived == expected, (sent.method, sent.url)
        # Framing may be re-spelt (aiohttp states "Content-Length: 0" on a bodiless DELETE),
        # but a body's length is the client's.
        if "content-length" in sent.headers:
            assert exchange.header("content-length") == sent.headers["content-length"]
        assert exchange.header("host") == f"{LOOPBACK}:{server.port}"
        owned = {k: v for k, v in exchange.request_headers if k.startswith(GATEWAY_OWNED)}
        answer = answers[sent.headers[SEQ]]
        assert owned == {
            **identity_of(issued),
            "x-forwarded-for": LOOPBACK,
            "x-forwarded-proto": "http",
            "x-forwarded-host": gateway.removeprefix("http://"),
            # The client sent none: one was made, sent upstream and returned with the answer.
            "x-request-id": answer.headers["x-request-id"],
        }

        assert answer.status_code == exchange.status
        server_sent = Counter((k, v) for k, v in exchange.response_headers if k not in HOP_BY_HOP)
        client_got = Counter((k.lower(), v) for k, v in answer.headers.multi_items())
        assert not server_sent - client_got, "the gateway dropped or changed a response header"
        invented = {k for k, _ in client_got - server_sent}
        assert invented <= FRAMING | {"x-request-id"}, f"the gateway added headers {invented}"


# --- 1. Streamable HTTP, session-based -------------------------------------------------------


async def test_streamable_http_session_through_gateway(stack: Stack) -> None:
    issued = await stack.issue(["sdk"])
    wire = Wire()
    async with (
        wire.client(bearer(issued)) as http,
        streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.protocol_version == "2025-11-25"
        assert init.server_info.name == "sdk-tools"
        assert init.server_info.version == "2.0.0"
        assert {t.name for t in (await session.list_tools()).tools} == TOOLS
        # two calls in one session
        assert text(await session.call_tool("echo", {"text": "via keystile"})) == "via keystile"
        assert text(await session.call_tool("add", {"a": 2, "b": 40})) == "42.0"
        # the SDK opens the session's GET stream in the background: it reaches the server
        await wait_until(lambda: stack.sdk.requests("GET"))

    # The id the server minted is the one the client got, and every later request, the GET
    # stream and the closing DELETE carried it back through the gateway.
    first = stack.sdk.exchanges[0]
    session_id = first.response_header("mcp-session-id")
    assert session_id and first.header("mcp-session-id") is None
    assert wire.got[0].headers["mcp-session-id"] == session_id
    assert all(r.headers.get("mcp-session-id") == session_id for r in wire.sent[1:])
    assert all(e.header("mcp-session-id") == session_id for e in stack.sdk.exchanges[1:])
    assert [e.method for e in stack.sdk.exchanges].count("POST") == 5  # init, note, list, 2 calls
    (get,) = stack.sdk.requests("GET")
    assert get.status == 200 and get.response_header("content-type") == "text/event-stream"
    (delete,) = stack.sdk.requests("DELETE")
    assert delete.status == 200
    assert [r.status_code for r in wire.got if r.request.method == "DELETE"] == [200]

    # The server's session manager forgot the session: its id is now a 404, through the gateway.
    ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
    headers = {
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": "2025-11-25",
        "Accept": "application/json, text/event-stream",
    }
    status, _, body = await stack.ks.request(
        "POST", "/mcp-connect/sdk", issued.key, headers=headers, json=ping
    )
    assert status == 404
    assert body["error"]["message"] == "Session not found"
    assert stack.sdk.exchanges[-1].status == 404


def paced_app(delivered: asyncio.Queue[float], reported: list[float]) -> McpApp:
    """An SDK server over Streamable HTTP whose `count` tool reports progress step n+1 only
    once the test has received step n (through `delivered`)."""
    mcp = MCPServer("sdk-paced", version="2.0.0", log_level="WARNING")

    @mcp.tool()
    async def count(steps: int, ctx: Context) -> str:
        """Report progress `steps` times, each after the client got the previous one."""
        for n in range(1, steps + 1):
            if n > 1:
                assert await delivered.get() == n - 1
            reported.append(n)
            await ctx.report_progress(n, steps, f"step {n}")
        return f"counted {steps}"

    return McpApp(mcp.streamable_http_app(transport_security=LOOPBACK_ONLY))


async def test_progress_notifications_arrive_as_they_happen(database_url: str) -> None:
    """A gateway that held the tools/call's event stream back until the result would
    deadlock this handshake (and fail at the deadline)."""
    delivered: asyncio.Queue[float] = asyncio.Queue()  # the client tells the tool: got step n
    reported: list[float] = []
    arrivals: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        assert total == 5
        # Here before the tool could report the next step.
        assert reported == list(range(1, int(progress) + 1)), (progress, reported)
        arrivals.append((progress, message))
        delivered.put_nowait(progress)

    async with serve(paced_app(delivered, reported)) as (paced,):
        settings = replace(
            make_settings(gateway={"shutdown_timeout": 1.0}),
            mcp_servers={"paced": UpstreamSettings(url=f"{paced.origin}/mcp")},
        )
        async with start_keystile(settings, database_url) as ks:
            user = await ks.user(servers=["*"])
            issued = await ks.key(user)
            with anyio.fail_after(DEADLINE):
                async with (
                    httpx2.AsyncClient(headers=bearer(issued)) as http,
                    streamable_http_client(f"{ks.gateway}/mcp-connect/paced", http_client=http) as (
                        read,
                        write,
                    ),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    result = await session.call_tool(
                        "count", {"steps": 5}, progress_callback=on_progress
                    )
    assert text(result) == "counted 5"
    assert arrivals == [(n, f"step {n}") for n in range(1, 6)]
    call = paced.requests("POST")[-1]  # the tools/call: answered as an event stream
    assert call.status == 200 and call.response_header("content-type") == "text/event-stream"


# --- 2. Protocol versions: headers pass both ways, unchanged ---------------------------------


async def test_session_protocol_headers_pass_unchanged(stack: Stack) -> None:
    issued = await stack.issue(["sdk"])
    wire = Wire()
    async with (
        wire.client(bearer(issued)) as http,
        streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        await session.list_tools()
        assert text(await session.call_tool("region", {"code": "eu-1"})) == "region=eu-1"
        await wait_until(lambda: stack.sdk.requests("GET"))
    await wait_until(lambda: all(e.ended.is_set() for e in stack.sdk.exchanges))

    assert sorted(set(wire.methods())) == ["DELETE", "GET", "POST"]
    assert_forwarded_unchanged(wire, stack.sdk, issued, gateway=stack.ks.gateway)
    later = stack.sdk.exchanges[1:]
    assert all(e.header("mcp-protocol-version") == "2025-11-25" for e in later)
    assert all(e.header("mcp-session-id") for e in later)


async def test_stateless_2026_revision_passes_unchanged(stack: Stack) -> None:
    issued = await stack.issue(["sdk"])
    wire = Wire()
    async with (
        wire.client(bearer(issued)) as http,
        Client(
            streamable_http_client(stack.url("sdk"), http_client=http), mode="2026-07-28"
        ) as client,
    ):
        assert client.protocol_version == "2026-07-28"
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        assert text(await client.call_tool("region", {"code": "ap-2"})) == "region=ap-2"
        assert text(await client.call_tool("echo", {"text": "stateless"})) == "stateless"

    # no initialize, no session id, no GET stream, no DELETE: three self-contained POSTs
    assert wire.methods() == ["POST", "POST", "POST"]
    exchanges = stack.sdk.exchanges
    assert [e.header("mcp-method") for e in exchanges] == ["tools/list", "tools/call", "tools/call"]
    assert [e.header("mcp-name") for e in exchanges] == [None, "region", "echo"]
    assert exchanges[1].header("mcp-param-region") == "ap-2"
    assert all(e.header("mcp-protocol-version") == "2026-07-28" for e in exchanges)
    assert all(e.header("mcp-session-id") is None for e in exchanges)
    assert all(e.response_header("mcp-session-id") is None for e in exchanges)
    assert all(e.status == 200 for e in exchanges)
    assert_forwarded_unchanged(wire, stack.sdk, issued, gateway=stack.ks.gateway)


# --- 3. Legacy HTTP+SSE transport ------------------------------------------------------------


async def test_legacy_sse_transport_through_gateway(stack: Stack) -> None:
    issued = await stack.issue(["legacy"])
    wire = Wire()
    sessions: list[str] = []
    async with (
        sse_client(
            stack.url("legacy", "/sse"),
            headers=bearer(issued),
            httpx_client_factory=wire.factory(),
            on_session_created=sessions.append,
        ) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.server_info.name == "sdk-legacy"
        assert {t.name for t in (await session.list_tools()).tools} == TOOLS
        assert text(await session.call_tool("add", {"a": 1.5, "b": 2})) == "3.5"
        who = json.loads(text(await session.call_tool("whoami", {})))
    assert who == {**identity_of(issued), "authorization": None, "x-api-key": None}

    # The server named /messages/?session_id=...; the client posted to the gateway's path for
    # it, query kept, and every message reached the server through the gateway.
    (session_id,) = sessions
    posts = [r for r in wire.sent if r.method == "POST"]
    assert len(posts) == 5  # initialize, initialized, tools/list, two calls
    for post in posts:
        assert str(post.url) == stack.url("legacy", f"/messages/?session_id={session_id}")
    (get,) = stack.legacy.requests("GET", "/sse")
    assert get.header("x-keystile-key-id") == issued.record.id
    arrived = stack.legacy.requests("POST", "/messages/")
    assert len(arrived) == len(posts)
    for exchange in arrived:
        assert exchange.query == f"session_id={session_id}"
        assert exchange.status == 202
        assert exchange.header("x-keystile-key-id") == issued.record.id
        assert not CREDENTIALS & {k for k, _ in exchange.request_headers}


async def _next_event(stream: aiohttp.StreamReader) -> bytes:
    """The raw bytes of the next SSE event, up to and including the blank line that ends it."""
    raw = b""
    while not raw.endswith((b"\r\n\r\n", b"\n\n")):
        line = await stream.readline()
        assert line, "the stream ended"
        raw += line
    return raw


async def test_legacy_endpoint_event_is_rewritten_on_the_wire(stack: Stack) -> None:
    issued = await stack.issue(["legacy"])
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.legacy.origin}/sse") as direct:
            direct_event = await _next_event(direct.content)
        async with http.get(stack.url("legacy", "/sse"), headers=bearer(issued)) as via:
            assert via.status == 200
            assert via.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            via_event = await _next_event(via.content)
            # Only the path changed: same event, same line endings, the query kept.
            match = re.fullmatch(
                rb"event: endpoint\r\n"
                rb"data: /mcp-connect/legacy/messages/\?session_id=([0-9a-f]{32})\r\n\r\n",
                via_event,
            )
            assert match, via_event
            assert re.fullmatch(
                rb"event: endpoint\r\ndata: /messages/\?session_id=[0-9a-f]{32}\r\n\r\n",
                direct_event,
            ), direct_event
            # Posting to the rewritten path reaches the server's session; the answer comes
            # back on the stream, byte for byte as the server wrote it.
            path = via_event.split(b"data: ")[1].strip().decode()
            async with http.post(
                stack.ks.gateway + path, json=init, headers=bearer(issued)
            ) as posted:
                assert posted.status == 202
            answer = await _next_event(via.content)
    assert answer.startswith(b"event: message\r\ndata: ")
    message = json.loads(answer.split(b"data: ", 1)[1])
    assert message["id"] == 1 and message["result"]["serverInfo"]["name"] == "sdk-legacy"
    (post,) = stack.legacy.requests("POST", "/messages/")
    assert post.query == f"session_id={match.group(1).decode()}"
    assert post.header("x-keystile-key-id") == issued.record.id


# --- the client leaving must reach the server ------------------------------------------------

VIA = ["direct", "gateway"]


@pytest.mark.parametrize("via", VIA)
async def test_leaving_a_legacy_sse_stream_ends_the_server_session(
    stack: Stack, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no keep-alive ping while the test runs, only the client's leaving, passed on
    # through the gateway, can end the server's stream.
    monkeypatch.setattr(EventSourceResponse, "DEFAULT_PING_INTERVAL", 3600)
    issued = await stack.issue(["legacy"])
    url = f"{stack.legacy.origin}/sse" if via == "direct" else stack.url("legacy", "/sse")
    async with (
        sse_client(url, headers=bearer(issued)) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
    (get,) = stack.legacy.requests("GET", "/sse")
    async with asyncio.timeout(DEADLINE):
        await get.ended.wait()


@pytest.mark.parametrize("via", VIA)
async def test_2026_cancel_by_closing_the_stream_reaches_the_server(stack: Stack, via: str) -> None:
    # At 2026-07-28 a client cancels a request by closing its response stream; the SDK server
    # then cancels the handler.
    issued = await stack.issue(["sdk"])
    url = f"{stack.sdk.origin}/mcp" if via == "direct" else stack.url("sdk")
    async with (
        httpx2.AsyncClient(headers=bearer(issued)) as http,
        Client(streamable_http_client(url, http_client=http), mode="2026-07-28") as client,
    ):
        await client.list_tools()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_once_started() -> None:
                    await wait_until(lambda: "wait started" in stack.sdk.notes)
                    scope.cancel()

                group.start_soon(cancel_once_started)
                # An hour: only the cancellation can end it while the test runs.
                await client.call_tool("wait", {"seconds": 3600})
        assert scope.cancelled_caught
    await wait_until(
        lambda: len(stack.sdk.notes) > 1, message="the server never heard of the cancellation"
    )
    assert stack.sdk.notes == ["wait started", "wait cancelled"]


# --- 4. Auth as MCP clients see it -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["malformed", "revoked"])
async def test_bad_key_fails_the_sdk_client_with_one_401(stack: Stack, kind: str) -> None:
    if kind == "malformed":
        bad = {"Authorization": "Bearer ks1-nobody-nothing-notavalidsecret"}
    else:
        issued = await stack.issue(["*"])
        await stack.ks.runtime.keyring.revoke_key(stack.ks.actor, issued.record.id)
        bad = bearer(issued)
    wire = Wire()
    # The deadline only turns a hang (a client retrying or waiting on) into a failure.
    async with (
        asyncio.timeout(DEADLINE),
        wire.client(bad) as http,
        streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        with pytest.raises(MCPError) as excinfo:
            await session.initialize()
    # The SDK turns a non-JSON-RPC error body into its generic stand-in (no status in it);
    # the 401 is on the wire.
    assert excinfo.value.code == -32603
    assert excinfo.value.error.message == "Server returned an error response"
    (response,) = wire.got
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == INVALID_BEARER
    assert json.loads(await response.aread())["error"] == "invalid_api_key"
    assert stack.sdk.exchanges == []

    # The legacy SSE client raises on the 401 itself.
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(httpx2.HTTPStatusError) as sse_excinfo:
            async with sse_client(stack.url("legacy", "/sse"), headers=bad) as (read, write):
                pass
    assert sse_excinfo.value.response.status_code == 401
    assert sse_excinfo.value.response.headers["www-authenticate"] == INVALID_BEARER
    assert stack.legacy.exchanges == []


async def test_key_without_the_server_gets_403(stack: Stack) -> None:
    scoped = await stack.issue(["legacy"])  # the key does not name sdk
    ungranted = await stack.issue(["*"], grants=["legacy"])  # the user was not granted sdk
    for issued in (scoped, ungranted):
        wire = Wire()
        async with (
            asyncio.timeout(DEADLINE),
            wire.client(bearer(issued)) as http,
            streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            with pytest.raises(MCPError) as excinfo:
                await session.initialize()
        assert excinfo.value.code == -32603
        (response,) = wire.got
        assert response.status_code == 403
        assert response.headers["www-authenticate"] == SCOPE_BEARER
    assert stack.sdk.exchanges == []


async def test_upstream_sees_identity_never_the_key(stack: Stack) -> None:
    issued = await stack.issue(["sdk"])
    async with (
        httpx2.AsyncClient(headers=bearer(issued)) as http,
        streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        who = json.loads(text(await session.call_tool("whoami", {})))
    assert who == {**identity_of(issued), "authorization": None, "x-api-key": None}
    assert stack.sdk.exchanges
    for exchange in stack.sdk.exchanges:
        names = {k for k, _ in exchange.request_headers}
        assert not names & CREDENTIALS
        assert issued.key not in repr(exchange)
        assert {k: exchange.header(k) for k in identity_of(issued)} == identity_of(issued)


# --- 5. X-API-Key instead of Authorization ---------------------------------------------------


async def test_x_api_key_header_works_and_is_stripped(stack: Stack) -> None:
    issued = await stack.issue(["sdk"])
    wire = Wire()
    async with (
        wire.client({"X-API-Key": issued.key}) as http,
        streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        assert text(await session.call_tool("echo", {"text": "keyed"})) == "keyed"
        who = json.loads(text(await session.call_tool("whoami", {})))
    assert who == {**identity_of(issued), "authorization": None, "x-api-key": None}
    assert all(r.headers["x-api-key"] == issued.key for r in wire.sent)
    for exchange in stack.sdk.exchanges:
        assert exchange.header("x-api-key") is None
        assert issued.key not in repr(exchange)
    assert_forwarded_unchanged(wire, stack.sdk, issued, gateway=stack.ks.gateway)


# --- 6. The bundled sample server behind the gateway -----------------------------------------


async def test_sample_server_behind_gateway(stack: Stack) -> None:
    issued = await stack.issue(["sample"])
    async with (
        httpx2.AsyncClient(headers=bearer(issued)) as http,
        streamable_http_client(stack.url("sample"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.protocol_version == "2025-11-25"
        assert init.server_info.name == "keystile-sample"
        assert [t.name for t in (await session.list_tools()).tools] == ["echo", "add", "whoami"]
        assert text(await session.call_tool("echo", {"text": "demo"})) == "demo"
        assert text(await session.call_tool("add", {"a": 2, "b": 3.5})) == "5.5"
        who = json.loads(text(await session.call_tool("whoami", {})))
    assert who == {
        "X-Keystile-User-Id": issued.record.user_id,
        "X-Keystile-Key-Id": issued.record.id,
        "X-Keystile-Workspace-Id": issued.record.workspace_id,
    }
