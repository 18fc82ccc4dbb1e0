"""MCP servers built with the official SDK, run in-process by uvicorn on 127.0.0.1.

Every server records what reached it and what it answered (method, path, query, request
headers, status, response headers) at the ASGI layer, so tests can compare the wire on both
sides of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import JSONRPCMessage, ListToolsResult, PaginatedRequestParams
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK = "127.0.0.1"
IDENTITY = ("x-keystile-user-id", "x-keystile-key-id", "x-keystile-workspace-id")
# The SDK's own default for a server bound to loopback: a request with a foreign Host is refused,
# so every exchange that succeeds proves the gateway sent the upstream's own Host.
LOOPBACK_ONLY = TransportSecuritySettings(
    enable_dns_rebinding_protection=True,
    allowed_hosts=[f"{LOOPBACK}:*", "localhost:*"],
    allowed_origins=[f"http://{LOOPBACK}:*", "http://localhost:*"],
)


@dataclass
class Exchange:
    """One HTTP request as the server saw it, and the head of its answer."""

    method: str
    path: str
    query: str
    request_headers: list[tuple[str, str]]
    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the app returned
    body: bytearray = field(default_factory=bytearray, repr=False)  # the request body so far
    response_body: bytearray = field(default_factory=bytearray, repr=False)  # the answer so far

    def header(self, name: str) -> str | None:
        """A request header's value (the first, if repeated)."""
        return next((v for k, v in self.request_headers if k == name.lower()), None)

    def response_header(self, name: str) -> str | None:
        return next((v for k, v in self.response_headers if k == name.lower()), None)

    def jsonrpc(self) -> Any:
        """The request body decoded as JSON, or None when it is empty or not JSON."""
        try:
            return json.loads(bytes(self.body)) if self.body else None
        except ValueError:
            return None


def _decode(headers: Any) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


class Recorder:
    """ASGI middleware: appends an Exchange per HTTP request, filled in as it is answered."""

    def __init__(self, app: ASGIApp, exchanges: list[Exchange]) -> None:
        self.app = app
        self.exchanges = exchanges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            request_headers=_decode(scope["headers"]),
        )
        self.exchanges.append(exchange)

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.body.extend(message.get("body", b""))
            return message

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.response_headers = _decode(message.get("headers", []))
            elif message["type"] == "http.response.body":
                exchange.response_body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, recording_receive, recording_send)
        finally:
            exchange.ended.set()


@dataclass
class McpApp:
    """An ASGI app wrapped in a Recorder, with the records it fills."""

    app: ASGIApp
    exchanges: list[Exchange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the tools did, e.g. "wait cancelled"

    def __post_init__(self) -> None:
        self.app = Recorder(self.app, self.exchanges)


@dataclass
class RunningServer:
    port: int
    exchanges: list[Exchange]
    notes: list[str]

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def requests(self, method: str | None = None, path: str | None = None) -> list[Exchange]:
        return [
            e
            for e in self.exchanges
            if (method is None or e.method == method) and (path is None or e.path == path)
        ]


class _InProcessServer(uvicorn.Server):
    """uvicorn without signal handlers: the test process keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> int:
    while not server.started:
        if task.done():
            task.result()  # raises why it could not start
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    port: int = server.servers[0].sockets[0].getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def serve(*apps: McpApp) -> AsyncIterator[list[RunningServer]]:
    """Serve each app with uvicorn on its own ephemeral 127.0.0.1 port for the block; after it,
    all are stopped together and awaited."""
    servers: list[uvicorn.Server] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for app in apps:
            config = uvicorn.Config(
                app.app,
                host=LOOPBACK,
                port=0,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=3,
            )
            servers.append(_InProcessServer(config))
            tasks.append(asyncio.create_task(servers[-1].serve()))
        ports = [await _started(server, task) for server, task in zip(servers, tasks, strict=True)]
        yield [
            RunningServer(port, app.exchanges, app.notes)
            for port, app in zip(ports, apps, strict=True)
        ]
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks)


def tools_server(name: str, notes: list[str]) -> MCPServer:
    """An SDK server with a few tools: plain ones, a progress reporter, a slow one that notes
    whether it finished or was cancelled, and an identity probe."""
    mcp = MCPServer(name, version="2.0.0", log_level="WARNING")

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text."""
        return text

    @mcp.tool()
    def add(a: float, b: float) -> str:
        """Add two numbers."""
        return str(a + b)

    @mcp.tool()
    def region(
        code: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
    ) -> str:
        """Echo a region code; 2026-07-28 clients mirror it in an Mcp-Param-Region header."""
        return f"region={code}"

    @mcp.tool()
    async def count(steps: int, delay: float, ctx: Context) -> str:
        """Report progress `steps` times, `delay` seconds apart."""
        for n in range(1, steps + 1):
            await asyncio.sleep(delay)
            await ctx.report_progress(n, steps, f"step {n}")
        return f"counted {steps}"

    @mcp.tool()
    async def wait(seconds: float) -> str:
        """Sleep, noting whether the sleep finished or was cancelled."""
        notes.append("wait started")
        try:
            await asyncio.sleep(seconds)
        except BaseException:
            notes.append("wait cancelled")
            raise
        notes.append("wait finished")
        return "waited"

    @mcp.tool()
    def whoami(ctx: Context) -> str:
        """The identity and credential headers this server received with the call."""
        request = ctx.request_context.request
        assert isinstance(request, Request)
        names = (*IDENTITY, "authorization", "x-api-key")
        return json.dumps({name: request.headers.get(name) for name in names})

    return mcp


def streamable_app() -> McpApp:
    """tools_server() over Streamable HTTP at /mcp: session-based for 2025 clients, stateless
    for 2026-07-28 ones (the SDK routes on MCP-Protocol-Version)."""
    notes: list[str] = []
    mcp = tools_server("sdk-tools", notes)
    app = mcp.streamable_http_app(transport_security=LOOPBACK_ONLY, session_idle_timeout=60)
    return McpApp(app, notes=notes)


def sse_app() -> McpApp:
    """tools_server() over the legacy HTTP+SSE transport, wired as the SDK's SseServerTransport
    docs show: GET /sse opens the stream, POST /messages/?session_id=... carries messages."""
    notes: list[str] = []
    lowlevel = tools_server("sdk-legacy", notes)._lowlevel_server
    transport = SseServerTransport("/messages/", security_settings=LOOPBACK_ONLY)

    async def handle_sse(request: Request) -> Response:
        async with transport.connect_sse(request.scope, request.receive, request._send) as streams:
            await lowlevel.run(streams[0], streams[1], lowlevel.create_initialization_options())
        return Response()

    app = Starlette(
        routes=[
            Route("/sse", endpoint=handle_sse, methods=["GET"]),
            Mount("/messages/", app=transport.handle_post_message),
        ]
    )
    return McpApp(app, notes=notes)


# --- a tool catalog for tool policies --------------------------------------------------------

CATALOG = ("search_repos", "search_issues", "get_issue", "delete_repo", "announce")


class MemoryEventStore(EventStore):
    """The SDK's resumability interface, in memory: every event a stream carried, numbered,
    so a client that lost a POST's stream gets the rest of it on a GET with Last-Event-ID."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, JSONRPCMessage | None]] = []  # id, stream, message

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = str(len(self._events) + 1)
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: str, send_callback: EventCallback
    ) -> str | None:
        index = next((i for i, e in enumerate(self._events) if e[0] == last_event_id), None)
        if index is None:
            return None
        stream_id = self._events[index][1]
        for event_id, stream, message in self._events[index + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


class CatalogServer(MCPServer):
    """An SDK server whose tools/list can be paged (`pages`: the tool names of each page, the
    cursor a page's index) and can answer chosen pages only after closing the POST's event
    stream (`replayed`), so a resuming client gets them on a GET stream (needs an event store)."""

    def __init__(
        self,
        name: str,
        *,
        pages: tuple[tuple[str, ...], ...] | None = None,
        replayed: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(name, version="2.0.0", log_level="WARNING")
        self.pages = pages
        self.replayed = replayed

    async def _handle_list_tools(
        self, ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        tools = await self.list_tools()
        if self.pages is None:
            return ListToolsResult(tools=tools)
        index = int(params.cursor) if params is not None and params.cursor else 0
        by_name = {t.name: t for t in tools}
        page = [by_name[name] for name in self.pages[index]]
        if index in self.replayed and ctx.close_sse_stream is not None:
            await ctx.close_sse_stream()  # the answer is stored, and replayed on a GET
        more = index + 1 < len(self.pages)
        return ListToolsResult(tools=page, next_cursor=str(index + 1) if more else None)


def catalog_server(
    name: str,
    calls: list[str],
    *,
    pages: tuple[tuple[str, ...], ...] | None = None,
    replayed: frozenset[int] = frozenset(),
) -> CatalogServer:
    """CATALOG's tools; every tool run is appended to `calls` by name, so a test can tell
    which calls reached the server. `announce` tells the session its tool list changed
    (outside any request: on the session's GET stream)."""
    mcp = CatalogServer(name, pages=pages, replayed=replayed)

    @mcp.tool()
    def search_repos(query: str) -> str:
        """Search repositories."""
        calls.append("search_repos")
        return f"repos matching {query}"

    @mcp.tool()
    def search_issues(query: str) -> str:
        """Search issues."""
        calls.append("search_issues")
        return f"issues matching {query}"

    @mcp.tool()
    def get_issue(number: int) -> str:
        """Fetch one issue."""
        calls.append("get_issue")
        return f"issue {number}"

    @mcp.tool()
    def delete_repo(repo: str) -> str:
        """Delete a repository."""
        calls.append("delete_repo")
        return f"deleted {repo}"

    @mcp.tool()
    async def announce(ctx: Context) -> str:
        """Tell the client that the tool list changed."""
        calls.append("announce")
        await ctx.session.send_tool_list_changed()
        return "announced"

    return mcp


def catalog_app(
    *,
    pages: tuple[tuple[str, ...], ...] | None = None,
    replayed: frozenset[int] = frozenset(),
) -> McpApp:
    """catalog_server() over Streamable HTTP at /mcp (sessions for 2025 clients, stateless for
    2026-07-28 ones); with `replayed` pages, an event store makes the session resumable."""
    notes: list[str] = []
    mcp = catalog_server("catalog", notes, pages=pages, replayed=replayed)
    app = mcp.streamable_http_app(
        transport_security=LOOPBACK_ONLY,
        session_idle_timeout=60,
        event_store=MemoryEventStore() if replayed else None,
        retry_interval=20 if replayed else None,  # ms the client waits before resuming
    )
    return McpApp(app, notes=notes)


def catalog_sse_app() -> McpApp:
    """catalog_server() over the legacy HTTP+SSE transport (GET /sse, POST /messages/)."""
    notes: list[str] = []
    lowlevel = catalog_server("catalog-legacy", notes)._lowlevel_server
    transport = SseServerTransport("/messages/", security_settings=LOOPBACK_ONLY)

    async def handle_sse(request: Request) -> Response:
        async with transport.connect_sse(request.scope, request.receive, request._send) as streams:
            await lowlevel.run(streams[0], streams[1], lowlevel.create_initialization_options())
        return Response()

    app = Starlette(
        routes=[
            Route("/sse", endpoint=handle_sse, methods=["GET"]),
            Mount("/messages/", app=transport.handle_post_message),
        ]
    )
    return McpApp(app, notes=notes)


# --- an upstream whose answers the test writes byte for byte ---------------------------------


@dataclass
class Scripted:
    """One answer to a POST: its Content-Type and body parts; with a `gate`, the first part is
    sent, then the answer waits for the gate before sending the rest (a stream held open)."""

    content_type: str
    parts: tuple[bytes, ...]
    gate: asyncio.Event | None = None


def scripted_app(answers: list[Scripted]) -> McpApp:
    """An HTTP server that answers each POST with the next of `answers` (queued by the test),
    exactly as written: for the framings a real server may choose and the SDK's never does."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        answer = answers.pop(0)
        headers = [(b"content-type", answer.content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first, *rest = answer.parts
        await send({"type": "http.response.body", "body": first, "more_body": True})
        if answer.gate is not None:
            await answer.gate.wait()
        for part in rest:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return McpApp(app)
