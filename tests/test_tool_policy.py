"""Tool policies end to end (SPEC §6): real MCP SDK clients and servers through the gateway.

Upstreams: the tool catalog of tests/mcp_servers.py over Streamable HTTP (sessions for 2025
clients, stateless for 2026-07-28 ones), over the legacy HTTP+SSE transport, and paginated
(one page answered only after the server closed the POST's event stream, so the client gets
it on a GET stream resumed with Last-Event-ID); plus the echo upstream of tests/support.py
for raw edge cases. Every server records the bodies it received and sent, and which tools
ran, so "the upstream never saw it" is checked on the server's side of the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import encode_header_value
from mcp.types import (
    CallToolResult,
    PaginatedRequestParams,
    TextContent,
    ToolListChangedNotification,
)

from gateway.config import Secret, UpstreamSettings
from gateway.keyring import IssuedKey
from tests.mcp_servers import (
    CATALOG,
    LOOPBACK,
    RunningServer,
    Scripted,
    catalog_app,
    catalog_sse_app,
    scripted_app,
    serve,
)
from tests.processes import ServeProcess, free_port
from tests.support import (
    DEADLINE,
    NO_BODY,
    Keystile,
    Reply,
    Upstream,
    admin_call,
    assert_error,
    make_admin,
    make_settings,
    start_keystile,
    start_upstream,
    wait_until,
)

DENIED = -32602
MAX_INSPECT = 16 * 1024  # mcp.max_inspect_bytes in these tests
UPSTREAM_TOKEN = "catalog-upstream-token"  # the github server's configured upstream header
STREAMABLE = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
# The paginated catalog: page 1 (all of it denied below) is answered on a resumed GET stream.
PAGES = (("search_repos", "delete_repo"), ("get_issue",), ("search_issues", "announce"))


MODERN = {"MCP-Protocol-Version": "2026-07-28"}
META = {  # the envelope a 2026-07-28 request carries
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def denial(tool: str) -> str:
    return f"Tool '{tool}' is not available with this API key."


# --- plumbing --------------------------------------------------------------------------------


@dataclass
class Member:
    """A member user and one key of theirs, made through the admin API."""

    user_id: str
    key_id: str
    key: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Stack:
    """Keystile in front of the catalog (Streamable HTTP, legacy SSE, paginated) and the echo
    upstream, with an admin key for the admin API."""

    ks: Keystile
    github: RunningServer
    legacy: RunningServer
    pages: RunningServer
    echo: Upstream
    admin: IssuedKey
    script: list[Scripted]  # the scripted server's next answers
    _emails: Iterator[int] = field(default_factory=itertools.count)

    def url(self, server: str, rest: str = "") -> str:
        return f"{self.ks.gateway}/mcp-connect/{server}{rest}"

    async def api(self, method: str, path: str, body: Any = NO_BODY, key: str = "") -> Reply:
        return await admin_call(self.ks, method, path, key or self.admin.key, body)

    async def member(
        self,
        *,
        tools: Sequence[str] | None = None,
        servers: Sequence[str] = ("*",),
        user_tools: Sequence[str] | None = None,
        grants: Sequence[str] = ("*",),
        permissions: Sequence[str] = ("mcp",),
    ) -> Member:
        user = await self.ks.user(f"member{next(self._emails)}@example.com", servers=grants)
        if user_tools is not None:
            reply = await self.api("PUT", f"/api/users/{user.id}/tools", {"tools": user_tools})
            assert reply.status == 200, reply.text
            assert reply.body["tools"] == list(user_tools)
        fields = {
            "name": "policy key",
            "user_id": user.id,
            "servers": list(servers),
            "permissions": list(permissions),
            "tools": None if tools is None else list(tools),
        }
        reply = await self.api("POST", "/api/keys", fields)
        assert reply.status == 201, reply.text
        assert reply.body["tools"] == fields["tools"]
        return Member(user.id, reply.body["id"], reply.body["key"])

    async def post(
        self,
        server: str,
        key: str,
        body: bytes | AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        method: str = "POST",
    ) -> tuple[int, dict[str, str], Any]:
        """One raw request to an MCP route (an async iterator body goes chunked)."""
        all_headers = {**STREAMABLE, **(headers or {}), "Authorization": f"Bearer {key}"}
        async with self.ks.http.request(
            method, self.url(server), data=body, headers=all_headers
        ) as resp:
            raw = await resp.read()
            try:
                decoded: Any = json.loads(raw)
            except ValueError:
                decoded = raw
            return resp.status, dict(resp.headers), decoded


@pytest.fixture
async def stack(database_url: str) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exit_stack:
        script: list[Scripted] = []
        github, legacy, pages, scripted = await exit_stack.enter_async_context(
            serve(
                catalog_app(),
                catalog_sse_app(),
                catalog_app(pages=PAGES, replayed=frozenset({1})),
                scripted_app(script),
            )
        )
        echo = await start_upstream()
        exit_stack.push_async_callback(echo.close)
        settings = replace(
            make_settings(
                gateway={"shutdown_timeout": 1.0}, mcp={"max_inspect_bytes": MAX_INSPECT}
            ),
            mcp_servers={
                "github": UpstreamSettings(
                    url=f"{github.origin}/mcp",
                    headers={"X-Upstream-Token": Secret(UPSTREAM_TOKEN)},
                ),
                "legacy": UpstreamSettings(url=legacy.origin),
                "pages": UpstreamSettings(url=f"{pages.origin}/mcp"),
                "echo": UpstreamSettings(url=f"{echo.url}/echo/mcp"),
                "scripted": UpstreamSettings(url=f"{scripted.origin}/mcp"),
                # Nothing listens here: discovery's 502.
                "down": UpstreamSettings(url=f"http://{LOOPBACK}:{free_port()}/mcp"),
            },
        )
        ks = await exit_stack.enter_async_context(start_keystile(settings, database_url))
        _, admin = await make_admin(ks)
        yield Stack(ks, github, legacy, pages, echo, admin, script)


@dataclass
class Wire:
    """Every response head an httpx2 client got, with the body of the request it answered."""

    got: list[tuple[bytes, httpx2.Response]] = field(default_factory=list)

    def client(
        self, headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None
    ) -> httpx2.AsyncClient:
        async def on_response(response: httpx2.Response) -> None:
            self.got.append((response.request.content, response))

        return httpx2.AsyncClient(
            headers=headers,
            timeout=timeout or httpx2.Timeout(10.0, read=30.0),
            event_hooks={"response": [on_response]},
        )

    def answer_to(self, needle: bytes) -> httpx2.Response:
        (response,) = [r for sent, r in self.got if needle in sent]
        return response


@asynccontextmanager
async def session(
    url: str, member: Member, wire: Wire | None = None, **options: Any
) -> AsyncIterator[ClientSession]:
    """An initialized session-based (2025-11-25) SDK client session through the gateway."""
    http = wire.client(member.bearer) if wire else httpx2.AsyncClient(headers=member.bearer)
    async with (
        http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write, **options) as client,
    ):
        init = await client.initialize()
        assert init.protocol_version == "2025-11-25"
        yield client


@asynccontextmanager
async def stateless(url: str, member: Member) -> AsyncIterator[Client]:
    """A 2026-07-28 SDK client (no session: every request one self-contained POST)."""
    async with (
        httpx2.AsyncClient(headers=member.bearer) as http,
        Client(streamable_http_client(url, http_client=http), mode="2026-07-28") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        yield client


@asynccontextmanager
async def raw_session(stack: Stack, server: str, member: Member) -> AsyncIterator[dict[str, str]]:
    """A 2025-11-25 session opened by hand through the gateway; yields the headers for its
    requests, and ends it with DELETE."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    url = stack.url(server)
    headers = {**member.bearer, **STREAMABLE}
    async with stack.ks.http.post(url, json=init, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
        await resp.read()
    headers["MCP-Protocol-Version"] = "2025-11-25"
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with stack.ks.http.post(url, json=initialized, headers=headers) as resp:
        assert resp.status == 202
    yield headers
    async with stack.ks.http.delete(url, headers=headers) as resp:
        assert resp.status == 200


def text(result: CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def assert_denied(error: MCPError, tool: str) -> None:
    assert error.error.code == DENIED, error.error
    assert error.error.message == denial(tool)


def names(tools: Sequence[Any]) -> list[str]:
    return [t.name if not isinstance(t, dict) else t["name"] for t in tools]


def calls_received(server: RunningServer) -> list[str]:
    """The tools named by every tools/call whose body reached the server."""
    found = []
    for exchange in server.exchanges:
        decoded = exchange.jsonrpc()
        for message in decoded if isinstance(decoded, list) else [decoded]:
            if isinstance(message, dict) and message.get("method") == "tools/call":
                found.append(message["params"]["name"])
    return found


def sse_messages(raw: bytes) -> list[Any]:
    """The JSON-RPC messages in an event stream's data lines."""
    messages = []
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if data and data[0].startswith(b"{"):
            messages.append(json.loads(b"\n".join(data)))
    return messages


def tool_lists(messages: Sequence[Any]) -> list[Any]:
    return [m for m in messages if isinstance(m.get("result"), dict) and "tools" in m["result"]]


def without(message: dict[str, Any], denied: set[str]) -> dict[str, Any]:
    """A tools/list answer with the denied tools taken out, all else as it was."""
    result = dict(message["result"])
    result["tools"] = [t for t in result["tools"] if t["name"] not in denied]
    return {**message, "result": result}


# --- 1. Enforcement on every transport -------------------------------------------------------


async def test_session_transport_enforces_key_patterns(stack: Stack) -> None:
    member = await stack.member(tools=["github/*", "!github/delete_*"])
    wire = Wire()
    changed: list[object] = []

    async def on_message(message: object) -> None:
        if isinstance(message, ToolListChangedNotification):
            changed.append(message)

    async with session(stack.url("github"), member, wire, message_handler=on_message) as client:
        listed = await client.list_tools()
        assert names(listed.tools) == ["search_repos", "search_issues", "get_issue", "announce"]
        assert (
            text(await client.call_tool("search_repos", {"query": "mcp"})) == "repos matching mcp"
        )
        with pytest.raises(MCPError) as excinfo:
            await client.call_tool("delete_repo", {"repo": "keystile"})
        assert_denied(excinfo.value, "delete_repo")
        # The session goes on after a denial.
        assert text(await client.call_tool("get_issue", {"number": 7})) == "issue 7"

        # A notification on the session's GET stream reaches the client through a policy key
        # (announced again until heard: the server drops one sent before it has wired up the
        # GET stream the client opened in the background).
        async def announced() -> bool:
            assert text(await client.call_tool("announce", {})) == "announced"
            return bool(changed)

        await wait_until(announced, interval=0.1, message="tools/list_changed never arrived")

    # The upstream never saw the denied call: no body named it, the tool never ran.
    ran = ["search_repos", "get_issue"]
    assert [n for n in stack.github.notes if n != "announce"] == ran
    assert [n for n in calls_received(stack.github) if n != "announce"] == ran
    # On the wire: HTTP 200, JSON, the request's own id.
    answer = wire.answer_to(b'"delete_repo"')
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    request_id = json.loads(answer.request.content)["id"]
    assert json.loads(await answer.aread()) == {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": DENIED, "message": denial("delete_repo")},
    }
    # The tools/list answer was an event stream on the POST: the server listed everything,
    # the client got only the allowed tools (above).
    (listing,) = [e for e in stack.github.requests("POST") if b"tools/list" in e.body]
    assert listing.response_header("content-type") == "text/event-stream"
    (sent,) = tool_lists(sse_messages(bytes(listing.response_body)))
    assert names(sent["result"]["tools"]) == list(CATALOG)
    # tools/list_changed went out on the GET stream, not on the announcing call's answer.
    (stream,) = stack.github.requests("GET")
    assert b"notifications/tools/list_changed" in stream.response_body
    announcing = next(e for e in stack.github.requests("POST") if b'"announce"' in e.body)
    assert b"list_changed" not in announcing.response_body


async def test_stateless_2026_enforces_user_patterns(stack: Stack) -> None:
    member = await stack.member(user_tools=["github/search_*"])  # the key itself: tools null
    async with stateless(stack.url("github"), member) as client:
        listed = await client.list_tools()
        assert names(listed.tools) == ["search_repos", "search_issues"]
        assert text(await client.call_tool("search_issues", {"query": "bug"})) == (
            "issues matching bug"
        )
        for tool, arguments in (("delete_repo", {"repo": "x"}), ("get_issue", {"number": 1})):
            with pytest.raises(MCPError) as excinfo:
                await client.call_tool(tool, arguments)
            assert_denied(excinfo.value, tool)
    assert stack.github.notes == ["search_issues"]
    assert calls_received(stack.github) == ["search_issues"]
    # No session: only self-contained POSTs reached the server, each with agreeing headers.
    assert {e.method for e in stack.github.exchanges} == {"POST"}
    assert all(e.header("mcp-session-id") is None for e in stack.github.exchanges)
    # The tools/list answer was JSON: the server listed everything.
    listing = next(e for e in stack.github.exchanges if e.header("mcp-method") == "tools/list")
    assert listing.response_header("content-type") == "application/json"
    assert names(json.loads(listing.response_body)["result"]["tools"]) == list(CATALOG)


async def test_legacy_transport_enforces_key_and_user_patterns(stack: Stack) -> None:
    # The key allows legacy/* but no delete_*; the user allows search_* and delete_*: together
    # only search_* (delete_repo: the key says no; get_issue: the user says no).
    member = await stack.member(
        tools=["legacy/*", "!legacy/delete_*"], user_tools=["legacy/search_*", "legacy/delete_*"]
    )
    wire = Wire()
    sessions: list[str] = []

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return wire.client(headers, timeout)

    async with (
        sse_client(
            stack.url("legacy", "/sse"),
            headers=member.bearer,
            httpx_client_factory=factory,
            on_session_created=sessions.append,
        ) as (read, write),
        ClientSession(read, write) as client,
    ):
        await client.initialize()
        # The tools/list answer came on the GET /sse stream: filtered there.
        assert names((await client.list_tools()).tools) == ["search_repos", "search_issues"]
        assert text(await client.call_tool("search_repos", {"query": "a"})) == "repos matching a"
        (session_id,) = sessions
        endpoint = stack.url("legacy", f"/messages/?session_id={session_id}")
        for number, tool in enumerate(("delete_repo", "get_issue"), start=100):
            call = {"jsonrpc": "2.0", "id": number, "method": "tools/call"}
            call["params"] = {"name": tool, "arguments": {}}
            async with stack.ks.http.post(endpoint, json=call, headers=member.bearer) as resp:
                assert resp.status == 403
                assert await resp.json() == {"error": "tool_not_allowed", "message": denial(tool)}
        # The session is unharmed by the refused posts.
        assert text(await client.call_tool("search_issues", {"query": "b"})) == "issues matching b"

        # The SDK client's own post of a denied call gets the 403 (the SDK then drops the
        # request; nothing answers it on the stream, so the test ends the wait).
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_once_refused() -> None:
                    await wait_until(lambda: any(r.status_code == 403 for _, r in wire.got))
                    scope.cancel()

                group.start_soon(cancel_once_refused)
                await client.call_tool("delete_repo", {"repo": "x"})
        assert scope.cancelled_caught
    refused = wire.answer_to(b'"delete_repo"')
    assert refused.status_code == 403
    assert json.loads(await refused.aread())["error"] == "tool_not_allowed"

    assert stack.legacy.notes == ["search_repos", "search_issues"]
    assert calls_received(stack.legacy) == ["search_repos", "search_issues"]
    # The server sent its whole list on the stream; the client's view is above.
    (stream,) = stack.legacy.requests("GET", "/sse")
    (sent,) = tool_lists(sse_messages(bytes(stream.response_body)))
    assert names(sent["result"]["tools"]) == list(CATALOG)


async def test_server_scope_bounds_the_patterns(stack: Stack) -> None:
    # Patterns naming github do not reach it when the key's servers exclude it, nor when the
    # user's grants do: effective = key ∩ user ∩ server scope.
    scoped = await stack.member(tools=["github/*", "legacy/search_*"], servers=["legacy"])
    ungranted = await stack.member(tools=["*/search_*"], grants=["legacy"])
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repos"}}
    for member in (scoped, ungranted):
        status, headers, body = await stack.post("github", member.key, json.dumps(call).encode())
        assert status == 403 and body["error"] == "forbidden"
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
        _, _, me = await stack.ks.request("GET", "/api/me", member.key)
        assert me["key"]["effective_servers"] == ["legacy"]
        assert me["key"]["effective_tools"] == ["legacy/search_*"]
    assert stack.github.exchanges == []

    # Granting the user github brings its search tools in at once, and only those.
    reply = await stack.api(
        "PUT", f"/api/users/{ungranted.user_id}/servers", {"servers": ["legacy", "github"]}
    )
    assert reply.status == 200, reply.text
    async with stateless(stack.url("github"), ungranted) as client:
        assert names((await client.list_tools()).tools) == ["search_repos", "search_issues"]
        assert text(await client.call_tool("search_repos", {"query": "q"})) == "repos matching q"
        with pytest.raises(MCPError) as excinfo:
            await client.call_tool("get_issue", {"number": 3})
        assert_denied(excinfo.value, "get_issue")
    assert calls_received(stack.github) == ["search_repos"]


async def test_admins_hold_every_tool_and_their_keys_can_be_limited(stack: Stack) -> None:
    admin_id = stack.admin.record.user_id
    reply = await stack.api("PUT", f"/api/users/{admin_id}/tools", {"tools": ["github/*"]})
    assert_error(reply, 422, "invalid_request")
    assert reply.body["field"] == "tools"
    reply = await stack.api("PUT", f"/api/users/{admin_id}/tools", {"tools": None})
    assert reply.status == 200 and reply.body["tools"] is None
    # A member promoted to admin loses their own tools.
    member = await stack.member(user_tools=["github/search_*"])
    reply = await stack.api("PATCH", f"/api/users/{member.user_id}", {"role": "admin"})
    assert reply.status == 200 and reply.body["tools"] is None, reply.text
    _, _, me = await stack.ks.request("GET", "/api/me", member.key)
    assert me["user"]["tools"] is None and me["key"]["effective_tools"] is None

    # An admin's key is limited by its own tools, even though the admin holds every tool.
    reply = await stack.api(
        "POST", "/api/keys", {"name": "limited", "servers": ["*"], "tools": ["github/get_*"]}
    )
    assert reply.status == 201, reply.text
    limited = Member(admin_id, reply.body["id"], reply.body["key"])
    async with stateless(stack.url("github"), limited) as client:
        assert names((await client.list_tools()).tools) == ["get_issue"]
        assert text(await client.call_tool("get_issue", {"number": 5})) == "issue 5"
        with pytest.raises(MCPError) as excinfo:
            await client.call_tool("delete_repo", {"repo": "x"})
        assert_denied(excinfo.value, "delete_repo")
    assert stack.github.notes == ["get_issue"]


# --- 2. tools/list filtered on every stream --------------------------------------------------


async def test_paginated_lists_keep_their_cursors_and_each_page_is_filtered(stack: Stack) -> None:
    member = await stack.member(tools=["pages/search_*"])
    expected = [(["search_repos"], "1"), ([], "2"), (["search_issues"], None)]

    # Session-based: pages 0 and 2 come as event streams on their POSTs; page 1 the server
    # answers only after closing the POST's stream, so it reaches the client on a GET stream
    # resumed with Last-Event-ID.
    async with session(stack.url("pages"), member) as client:
        seen = []
        cursor: str | None = None
        for _ in PAGES:
            params = PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await client.list_tools(params=params)
            seen.append((names(page.tools), page.next_cursor))
            cursor = page.next_cursor
    assert seen == expected
    (resumed,) = [e for e in stack.pages.requests("GET") if e.header("last-event-id")]
    assert resumed.response_header("content-type") == "text/event-stream"
    (replayed,) = tool_lists(sse_messages(bytes(resumed.response_body)))
    assert names(replayed["result"]["tools"]) == ["get_issue"]  # what the server sent
    assert replayed["result"]["nextCursor"] == "2"

    # Stateless 2026-07-28: every page a JSON answer.
    async with stateless(stack.url("pages"), member) as stateless_client:
        seen = []
        cursor = None
        for _ in PAGES:
            listed = await stateless_client.list_tools(cursor=cursor, cache_mode="refresh")
            seen.append((names(listed.tools), listed.next_cursor))
            cursor = listed.next_cursor
    assert seen == expected


async def test_list_answers_keep_every_other_field(stack: Stack) -> None:
    """The filtered answer is the server's own answer less the denied tools, field for field:
    in a JSON body (2026-07-28, a page with nextCursor) and in an event stream (a session)."""
    member = await stack.member(tools=["pages/*", "github/*", "!*/delete_*"])
    body = {"jsonrpc": "2.0", "id": "list-1", "method": "tools/list", "params": {"_meta": META}}
    headers = {**member.bearer, **STREAMABLE, **MODERN, "Mcp-Method": "tools/list"}
    async with stack.ks.http.post(stack.url("pages"), json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
        got = await resp.json()
    (listing,) = stack.pages.requests("POST")
    sent = json.loads(listing.response_body)
    assert names(sent["result"]["tools"]) == ["search_repos", "delete_repo"]
    assert sent["result"]["nextCursor"] == "1"
    assert got == without(sent, {"delete_repo"})

    async with raw_session(stack, "github", member) as headers:
        listing_call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        url = stack.url("github")
        async with stack.ks.http.post(url, json=listing_call, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            (got,) = sse_messages(await resp.read())
    listing = next(e for e in stack.github.requests("POST") if b"tools/list" in e.body)
    (sent,) = sse_messages(bytes(listing.response_body))
    assert names(sent["result"]["tools"]) == list(CATALOG)
    assert got == without(sent, {"delete_repo"})


async def test_get_stream_notifications_pass_untouched(stack: Stack) -> None:
    """On a policy key's GET stream, what the server writes reaches the client byte for byte
    (here: notifications/tools/list_changed, sent when the tool list changes)."""
    member = await stack.member(tools=["github/announce"])
    async with raw_session(stack, "github", member) as headers:
        stream_headers = {**headers, "Accept": "text/event-stream"}
        async with stack.ks.http.get(stack.url("github"), headers=stream_headers) as stream:
            assert stream.status == 200
            received = bytearray()

            async def read() -> None:
                async for chunk in stream.content.iter_any():
                    received.extend(chunk)

            async def announced() -> bool:
                # Announced again until heard: the server drops a notification sent before
                # it has wired the GET stream up, which it does beside answering it.
                call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call"}
                call["params"] = {"name": "announce", "arguments": {}}
                url = stack.url("github")
                async with stack.ks.http.post(url, json=call, headers=headers) as resp:
                    assert resp.status == 200
                    await resp.read()
                return bool(events(bytes(received)))

            reader = asyncio.create_task(read())
            try:
                await wait_until(announced, interval=0.1, message="list_changed never arrived")
            finally:
                reader.cancel()
    (get,) = stack.github.requests("GET")
    assert bytes(get.response_body).startswith(received)
    assert {m["method"] for m in events(bytes(received))} == {"notifications/tools/list_changed"}


LISTED = {
    "jsonrpc": "2.0",
    "id": 7,
    "result": {
        "tools": [{"name": "search_repos", "inputSchema": {}}, {"name": "delete_repo"}],
        "nextCursor": "next",
    },
}
NOTE = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x"}}
# Line terminators of the data lines, and of the blank line ending the event: the SSE format
# allows CRLF, LF or CR for each line, mixed as a server likes.
ENDINGS = [
    (b"\n", b"\n"),
    (b"\r\n", b"\r\n"),
    (b"\r", b"\r"),
    (b"\n", b"\r\n"),
    (b"\r\n", b"\n"),
    (b"\r\n", b"\r"),
    (b"\n", b"\r"),
]


def event(message: object, line: bytes = b"\n", blank: bytes = b"\n") -> bytes:
    return b"event: message" + line + b"data: " + encoded(message) + line + blank


def events(raw: bytes) -> list[Any]:
    """The data of each complete event in a stream, read as the SSE format says (any line
    ending, an event ended by a blank line)."""
    found: list[Any] = []
    data: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        content = line.rstrip(b"\r\n")
        if not content:
            if data:
                found.append(json.loads(b"\n".join(data)))
            data = []
        elif content.startswith(b"data:"):
            data.append(content[5:].removeprefix(b" "))
    return found


async def test_list_events_are_filtered_whatever_their_line_endings(stack: Stack) -> None:
    member = await stack.member(tools=["scripted/*", "!scripted/delete_*"])
    request = encoded({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
    for line, blank in ENDINGS:
        note = event(NOTE, line, blank)
        stack.script.append(Scripted("text/event-stream", (event(LISTED, line, blank) + note,)))
        status, headers, answer = await stack.post("scripted", member.key, request)
        assert status == 200 and headers["Content-Type"] == "text/event-stream"
        assert events(answer) == [without(LISTED, {"delete_repo"}), NOTE], (line, blank)
        assert answer.endswith(note), (line, blank)  # other events: untouched


async def test_a_list_event_is_passed_as_soon_as_it_is_complete(stack: Stack) -> None:
    """An event ended by a lone CR after a CRLF line is complete: it reaches the client while
    the server holds the stream open (the server goes on only once the client has it)."""
    member = await stack.member(tools=["scripted/search_*"])
    gate = asyncio.Event()
    parts = (event(LISTED, b"\r\n", b"\r"), event(NOTE, b"\r\n", b"\r\n"))
    stack.script.append(Scripted("text/event-stream", parts, gate))
    request = encoded({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
    headers = {**member.bearer, **STREAMABLE}
    async with stack.ks.http.post(stack.url("scripted"), data=request, headers=headers) as resp:
        assert resp.status == 200
        received = b""
        async with asyncio.timeout(DEADLINE):  # only turns a hang into a failure
            while not events(received):
                chunk = await resp.content.readany()
                assert chunk, "the stream ended"
                received += chunk
        assert events(received) == [without(LISTED, {"delete_repo"})]
        gate.set()
        received += await resp.content.read()
    assert events(received) == [without(LISTED, {"delete_repo"}), NOTE]


async def test_list_answers_are_filtered_whatever_the_case_of_their_media_type(
    stack: Stack,
) -> None:
    member = await stack.member(tools=["scripted/search_*"])
    request = encoded({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
    answers = [
        Scripted("Text/Event-Stream", (event(LISTED),)),
        Scripted("Application/JSON; charset=UTF-8", (encoded(LISTED),)),
    ]
    for answer in answers:
        stack.script.append(answer)
        status, _, body = await stack.post("scripted", member.key, request)
        assert status == 200
        got = events(body) if b"data:" in body else [body]
        assert got == [without(LISTED, {"delete_repo"})], answer.content_type


# --- 3. Raw HTTP edge cases ------------------------------------------------------------------


def tool_call(name: object, ident: object = 1, **extra: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": ident,
        "method": "tools/call",
        "params": {"name": name},
        **extra,
    }


def encoded(message: object) -> bytes:
    return json.dumps(message).encode()


async def chunked(body: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    """`body` sent with Transfer-Encoding: chunked, `size` bytes a chunk."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


BIG = encoded(tool_call("search_repos", arguments={"query": "x" * MAX_INSPECT}))


@dataclass(frozen=True)
class Case:
    """One raw request by a key with a tool policy, and what the gateway must do with it:
    `status`/`code` for an answer of its own (the upstream sees nothing), or `passes`."""

    label: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    code: str | None = None  # the JSON error code of a refusal
    passes: bool = False
    chunked: bool = False


CASES = [
    # Read whole before judging, however it is framed.
    Case("chunked denied call", encoded(tool_call("delete_repo")), chunked=True, code="-32602"),
    Case("chunked allowed call", encoded(tool_call("search_repos")), chunked=True, passes=True),
    # The gateway cannot read a compressed body as sent, so it does not pass it, allowed
    # call or not (aiohttp would decode it on the way in, but the upstream would get the
    # gzip header with the decoded bytes).
    Case(
        "gzip-encoded denied call",
        gzip.compress(encoded(tool_call("delete_repo"))),
        {"Content-Encoding": "gzip"},
        400,
        "invalid_jsonrpc",
    ),
    Case(
        "gzip-encoded allowed call",
        gzip.compress(encoded(tool_call("search_repos"))),
        {"Content-Encoding": "gzip"},
        400,
        "invalid_jsonrpc",
    ),
    Case(
        "Content-Encoding: identity",
        encoded(tool_call("search_repos")),
        {"Content-Encoding": "identity"},
        passes=True,
    ),
    Case(
        "duplicate name keys",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"search_repos","name":"delete_repo"}}',
        status=400,
        code="invalid_jsonrpc",
    ),
    Case(
        "byte order mark",
        b"\xef\xbb\xbf" + encoded(tool_call("search_repos")),
        {},
        400,
        "invalid_jsonrpc",
    ),
    Case("not JSON", b"{not json", {}, 400, "invalid_jsonrpc"),
    Case("empty body", b"", {}, 400, "invalid_jsonrpc"),
    Case(
        "batch with a denied call",
        encoded([tool_call("search_repos", 1), tool_call("delete_repo", 2)]),
        status=403,
        code="tool_not_allowed",
    ),
    Case(
        "batch of allowed calls",
        encoded([tool_call("search_repos", 1), tool_call("search_issues", 2)]),
        passes=True,
    ),
    Case(
        "tools/call notification",
        encoded({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_repo"}}),
        status=400,
        code="invalid_jsonrpc",
    ),
    Case("tool name not a string", encoded(tool_call(["delete_repo"])), {}, 400, "invalid_jsonrpc"),
    Case(
        "look-alike tool name", encoded(tool_call("\uff44elete_repo")), {}, 400, "invalid_jsonrpc"
    ),
    Case(
        "Mcp-Name disagrees",
        encoded(tool_call("delete_repo")),
        {"Mcp-Method": "tools/call", "Mcp-Name": "search_repos"},
        400,
        "header_mismatch",
    ),
    Case(
        "Mcp-Method disagrees",
        encoded(tool_call("search_repos")),
        {"Mcp-Method": "tools/list"},
        400,
        "header_mismatch",
    ),
    Case(
        "headers agree",
        encoded(tool_call("search_repos")),
        {"Mcp-Method": "tools/call", "Mcp-Name": "search_repos"},
        passes=True,
    ),
    Case(
        "headers agree on a denied call",
        encoded(tool_call("delete_repo")),
        {"Mcp-Method": "tools/call", "Mcp-Name": "delete_repo"},
        code="-32602",
    ),
    # 2026-07-28 clients send a name that is not plain printable ASCII base64-wrapped
    # ("=?base64?...?="): the header agrees when its decoded value does.
    Case(
        "Mcp-Name base64-wrapped, agreeing",
        encoded(tool_call("search_\u00fcber")),
        {"Mcp-Method": "tools/call", "Mcp-Name": encode_header_value("search_\u00fcber")},
        passes=True,
    ),
    Case(
        "Mcp-Name base64-wrapped, agreeing, denied",
        encoded(tool_call("l\u00f6schen")),
        {"Mcp-Method": "tools/call", "Mcp-Name": encode_header_value("l\u00f6schen")},
        code="-32602",
    ),
    Case(
        "Mcp-Name base64-wrapped, disagreeing",
        encoded(tool_call("l\u00f6schen")),
        {"Mcp-Method": "tools/call", "Mcp-Name": encode_header_value("search_\u00fcber")},
        status=400,
        code="header_mismatch",
    ),
    Case(
        "Mcp-Name not valid base64",
        encoded(tool_call("search_\u00fcber")),
        {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?not*base64?="},
        status=400,
        code="header_mismatch",
    ),
    Case(
        "Mcp-Name base64-wrapped plain name",  # what a client never sends, decoded all the same
        encoded(tool_call("delete_repo")),
        {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?ZGVsZXRlX3JlcG8=?="},
        code="-32602",
    ),
    Case("over max_inspect_bytes", BIG, {}, 413, "body_too_large"),
    Case("over max_inspect_bytes, chunked", BIG, {}, 413, "body_too_large", chunked=True),
    Case(
        "a client's result",
        encoded({"jsonrpc": "2.0", "id": "s-1", "result": {"action": "accept"}}),
        passes=True,
    ),
    Case(
        "a client's error",
        encoded({"jsonrpc": "2.0", "id": "s-2", "error": {"code": -1, "message": "no"}}),
        passes=True,
    ),
    # Not a JSON-RPC stream: the legacy transport's POST (no SSE in Accept) gets a 403.
    Case(
        "denied call without SSE in Accept",
        encoded(tool_call("delete_repo")),
        {"Accept": "application/json"},
        403,
        "tool_not_allowed",
    ),
]


async def test_raw_edge_cases_with_a_policy_key(stack: Stack) -> None:
    member = await stack.member(tools=["echo/search_*"])
    for case in CASES:
        stack.echo.seen.clear()
        body = chunked(case.body) if case.chunked else case.body
        status, headers, answer = await stack.post("echo", member.key, body, case.headers)
        if case.passes:
            assert status == 200, (case.label, answer)
            (seen,) = stack.echo.seen
            assert seen["method"] == "POST" and seen["body"] == case.body.decode(), case.label
            assert answer["body"] == case.body.decode(), case.label  # the echo's own answer
            continue
        assert stack.echo.seen == [], f"{case.label}: reached the upstream"
        assert status == case.status, (case.label, answer)
        if case.code == "-32602":
            assert headers["Content-Type"] == "application/json"
            sent = json.loads(case.body)
            tool = sent["params"]["name"]
            assert answer == {
                "jsonrpc": "2.0",
                "id": sent["id"],
                "error": {"code": DENIED, "message": denial(tool)},
            }, case.label
        else:
            assert answer["error"] == case.code, (case.label, answer)
            assert answer["message"], case.label

    # GET and DELETE are never inspected, whatever they carry.
    for method, body in (("GET", b""), ("DELETE", b"{not json")):
        stack.echo.seen.clear()
        status, _, answer = await stack.post("echo", member.key, body, method=method)
        assert status == 200, (method, answer)
        (seen,) = stack.echo.seen
        assert seen["method"] == method and seen["body"] == body.decode()


async def test_a_key_without_a_policy_is_never_inspected(stack: Stack) -> None:
    plain = await stack.member()
    limited = await stack.member(tools=["echo/*"])
    for body in (b"{not json", encoded(tool_call("\uff44elete_repo")), BIG):
        stack.echo.seen.clear()
        status, _, answer = await stack.post("echo", plain.key, body)
        assert status == 200 and answer["body"] == body.decode()
        (seen,) = stack.echo.seen
        assert seen["body"] == body.decode()
        stack.echo.seen.clear()
        status, _, _ = await stack.post("echo", limited.key, body)
        assert status in (400, 413) and stack.echo.seen == []
    # Mcp-* headers that disagree with the body are the upstream's business without a policy.
    headers = {"Mcp-Method": "tools/list", "Mcp-Name": "other"}
    status, _, _ = await stack.post("echo", plain.key, encoded(tool_call("delete_repo")), headers)
    assert status == 200


# --- 4. Changes take effect at once ----------------------------------------------------------


async def denied_now(client: Client, tool: str, arguments: dict[str, Any]) -> bool:
    """Call `tool`: False if it ran, True if the gateway denied it."""
    try:
        text(await client.call_tool(tool, arguments))
    except MCPError as exc:
        assert_denied(exc, tool)
        return True
    return False


async def test_narrowing_takes_effect_on_the_next_request_and_is_audited(stack: Stack) -> None:
    member = await stack.member(tools=["github/*"])
    async with stateless(stack.url("github"), member) as client:
        assert not await denied_now(client, "get_issue", {"number": 1})
        narrowed = {"tools": ["github/search_*"]}
        reply = await stack.api("PATCH", f"/api/keys/{member.key_id}", narrowed)
        assert reply.status == 200 and reply.body["tools"] == narrowed["tools"], reply.text
        assert await denied_now(client, "get_issue", {"number": 2})  # the very next request
        assert not await denied_now(client, "search_repos", {"query": "a"})

        user_tools = ["github/*", "!github/search_repos"]
        reply = await stack.api("PUT", f"/api/users/{member.user_id}/tools", {"tools": user_tools})
        assert reply.status == 200 and reply.body["tools"] == user_tools, reply.text
        assert await denied_now(client, "search_repos", {"query": "b"})
        assert not await denied_now(client, "search_issues", {"query": "c"})
        listed = await client.list_tools(cache_mode="refresh")
        assert names(listed.tools) == ["search_issues"]
    assert stack.github.notes == ["get_issue", "search_repos", "search_issues"]

    reply = await stack.api("GET", "/api/audit")
    assert reply.status == 200
    events = {(e["action"], e["target_id"]): e for e in reply.body["events"]}
    key_change = events["key.update", member.key_id]
    assert key_change["changes"] == {"tools": {"from": ["github/*"], "to": ["github/search_*"]}}
    user_change = events["user.tools", member.user_id]
    assert user_change["changes"] == {"tools": {"from": None, "to": user_tools}}
    for event in (key_change, user_change):
        assert event["actor_key_id"] == stack.admin.record.id
        assert event["actor_user_id"] == stack.admin.record.user_id


async def invalidations(admin_url: str) -> float:
    """A process's count of invalidations heard (its admin /metrics)."""
    async with aiohttp.ClientSession() as http, http.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        found = re.search(r"^keystile_invalidations_total (\S+)$", await resp.text(), re.M)
    assert found is not None
    return float(found.group(1))


async def test_narrowing_reaches_another_instance(
    stack: Stack, database_url: str, tmp_path: Path
) -> None:
    member = await stack.member(tools=["github/*"])
    # Started after the key was made, so no NOTIFY of its making is still on the way there:
    # once it has the key cached (for keys.cache_ttl_seconds, 300 s), only the NOTIFY of a
    # change can make it see that change before the deadline.
    other = ServeProcess(
        database_url,
        tmp_path,
        extra_toml=f'[mcp_servers.github]\nurl = "{stack.github.origin}/mcp"\n',
    )
    try:
        await other.wait_ready()
        async with stateless(f"{other.gateway}/mcp-connect/github", member) as client:
            assert not await denied_now(client, "get_issue", {"number": 1})
            assert not await denied_now(client, "search_repos", {"query": "a"})
            heard = await invalidations(other.admin)

            reply = await stack.api(
                "PATCH", f"/api/keys/{member.key_id}", {"tools": ["github/search_*"]}
            )
            assert reply.status == 200, reply.text
            await wait_until(
                lambda: denied_now(client, "get_issue", {"number": 2}),
                interval=0.1,
                message="the other instance still allows the narrowed key's tool",
            )
            assert await invalidations(other.admin) > heard
            assert not await denied_now(client, "search_repos", {"query": "b"})

            reply = await stack.api(
                "PUT", f"/api/users/{member.user_id}/tools", {"tools": ["github/get_*"]}
            )
            assert reply.status == 200, reply.text
            await wait_until(
                lambda: denied_now(client, "search_repos", {"query": "c"}),
                interval=0.1,
                message="the other instance still allows the user's withdrawn tool",
            )
    finally:
        other.close()
    assert "get_issue" not in stack.github.notes[2:]  # after the narrowing, never again


# --- 5. /api/me ------------------------------------------------------------------------------


async def test_api_me_shows_the_tools(stack: Stack) -> None:
    async def me(member: Member) -> dict[str, Any]:
        status, _, body = await stack.ks.request("GET", "/api/me", member.key)
        assert status == 200
        return {
            "key": body["key"]["tools"],
            "user": body["user"]["tools"],
            "effective": body["key"]["effective_tools"],
        }

    plain = await stack.member()
    assert await me(plain) == {"key": None, "user": None, "effective": None}

    both = await stack.member(
        tools=["github/*", "!github/delete_*"],
        user_tools=["github/search_*", "legacy/*"],
        servers=["github", "legacy"],
    )
    assert await me(both) == {
        "key": ["github/*", "!github/delete_*"],
        "user": ["github/search_*", "legacy/*"],
        "effective": ["github/search_*", "!github/delete_*"],
    }

    # Only exclusions, on the user: every tool of every server in scope but those.
    excluding = await stack.member(user_tools=["!*/delete_*"], servers=["github", "pages"])
    assert await me(excluding) == {
        "key": None,
        "user": ["!*/delete_*"],
        "effective": ["github/*", "pages/*", "!*/delete_*"],
    }


# --- 6. Discovery: GET /api/servers/{name}/tools ---------------------------------------------


async def test_discovery_lists_a_servers_tools(stack: Stack) -> None:
    descriptions = {
        "search_repos": "Search repositories.",
        "search_issues": "Search issues.",
        "get_issue": "Fetch one issue.",
        "delete_repo": "Delete a repository.",
        "announce": "Tell the client that the tool list changed.",
    }
    reply = await stack.api("GET", "/api/servers/github/tools")
    assert reply.status == 200, reply.text
    assert reply.body["server"] == "github"
    assert reply.body["tools"] == [{"name": n, "description": descriptions[n]} for n in CATALOG]
    assert reply.body["fetched_at"].endswith("Z")
    # Asked as a client would, with the server's configured upstream headers (and no key).
    asked = list(stack.github.exchanges)
    assert asked and {e.method for e in asked} >= {"POST"}
    for exchange in asked:
        assert exchange.header("x-upstream-token") == UPSTREAM_TOKEN
        assert exchange.header("authorization") is None
        assert stack.admin.key not in repr(exchange.request_headers)

    # Cached: asked again at once, the server is not asked again (counted by the session
    # openings and listings reaching it; the first session's background GET may still land).
    def asked_for_tools() -> int:
        wanted = (b'"initialize"', b'"tools/list"')
        return sum(1 for e in stack.github.exchanges if any(w in e.body for w in wanted))

    before = asked_for_tools()
    assert before == 2  # one session: initialize, then one tools/list
    again = await stack.api("GET", "/api/servers/github/tools")
    assert again.status == 200 and again.body == reply.body
    assert asked_for_tools() == before

    # The legacy transport, and a paginated list (every page, one resumed on a GET).
    legacy = await stack.api("GET", "/api/servers/legacy/tools")
    assert legacy.status == 200, legacy.text
    assert names(legacy.body["tools"]) == list(CATALOG)
    assert stack.legacy.requests("GET", "/sse")
    paged = await stack.api("GET", "/api/servers/pages/tools")
    assert paged.status == 200, paged.text
    assert names(paged.body["tools"]) == [name for page in PAGES for name in page]

    # A server that cannot be reached; an unknown one.
    assert_error(await stack.api("GET", "/api/servers/down/tools"), 502, "bad_gateway")
    assert_error(await stack.api("GET", "/api/servers/nowhere/tools"), 404)


async def test_discovery_for_a_member_covers_only_their_servers(stack: Stack) -> None:
    member = await stack.member(grants=["github"], permissions=["keys"])
    reply = await stack.api("GET", "/api/servers/github/tools", key=member.key)
    assert reply.status == 200, reply.text
    assert names(reply.body["tools"]) == list(CATALOG)
    # A configured server the member's user was not granted: as unknown as a made-up name.
    hidden = await stack.api("GET", "/api/servers/legacy/tools", key=member.key)
    unknown = await stack.api("GET", "/api/servers/nowhere/tools", key=member.key)
    for refused in (hidden, unknown):
        assert_error(refused, 404)
    assert hidden.body == unknown.body
    assert stack.legacy.exchanges == []
    # An mcp-only key may not ask at all.
    mcp_only = await stack.member(grants=["github"])
    assert_error(await stack.api("GET", "/api/servers/github/tools", key=mcp_only.key), 403)
