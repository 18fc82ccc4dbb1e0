"""Test helpers: a real echo upstream, and Keystile started on ephemeral loopback ports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from admin.api import create_admin_app
from gateway.app import admin_plane, bound_port, data_plane
from gateway.config import Address, Secret, Settings, UpstreamSettings, load_settings
from gateway.keyring import IssuedKey
from gateway.models import User
from gateway.runtime import Runtime, open_runtime
from gateway.store import Actor

LOOPBACK = "127.0.0.1"


@dataclass
class Upstream:
    """An HTTP server on 127.0.0.1 that records every request it sees."""

    runner: web.AppRunner
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


def _record(request: web.Request, seen: list[dict[str, Any]], body: bytes) -> dict[str, Any]:
    entry = {
        "method": request.method,
        "path": request.raw_path.partition("?")[0],
        "query": request.raw_path.partition("?")[2],
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "header_list": [[k, v] for k, v in request.headers.items()],
        "body": body.decode("utf-8", "replace"),
    }
    seen.append(entry)
    return entry


async def start_upstream() -> Upstream:
    seen: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        entry = _record(request, seen, await request.read())
        headers = {
            "Mcp-Session-Id": request.headers.get("Mcp-Session-Id", "upstream-session"),
            "X-Upstream": "yes",
        }
        return web.json_response(entry, headers=headers)

    async def sse(request: web.Request) -> web.StreamResponse:
        _record(request, seen, b"")
        count = int(request.query.get("count", "5"))
        delay = float(request.query.get("delay", "0.2"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(count):
            await response.write(f"id: {n}\ndata: {json.dumps({'n': n})}\n\n".encode())
            await asyncio.sleep(delay)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.StreamResponse:
        _record(request, seen, b"")
        await asyncio.sleep(float(request.query.get("seconds", "5")))
        return web.json_response({"slow": True})

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("bytes", str(10 * 1024 * 1024)))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < size:
                piece = chunk[: size - sent]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
        except ConnectionError:  # the gateway abandoned the answer (its client left)
            pass
        return response

    async def upload(request: web.Request) -> web.StreamResponse:
        total = 0
        try:
            async for chunk in request.content.iter_any():
                total += len(chunk)
        except ConnectionError:  # the gateway dropped the upload: nothing to answer
            return web.Response(status=499)
        _record(request, seen, b"")
        return web.json_response({"received": total})

    async def hop(request: web.Request) -> web.StreamResponse:
        _record(request, seen, b"")
        return web.Response(
            text="ok",
            headers={"X-Private-Hop": "secret", "Connection": "X-Private-Hop", "X-End": "kept"},
        )

    async def reset(request: web.Request) -> web.StreamResponse:
        _record(request, seen, b"")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(0.1)
        assert request.transport is not None
        request.transport.abort()
        return response

    # Special behaviours are picked by the last path segment, so they work under any prefix
    # (e.g. /mcp-connect/gitlab/sse reaches /gitlab/sse here).
    special = {"sse": sse, "slow": slow, "big": big, "upload": upload, "hop": hop, "reset": reset}

    async def dispatch(request: web.Request) -> web.StreamResponse:
        handler = special.get(request.path.rsplit("/", 1)[-1], echo)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    return Upstream(runner, bound_port(runner), seen)


def make_settings(upstream: Upstream | None = None, **sections: Any) -> Settings:
    """Defaults for tests: loopback listeners on port 0, servers pointing at the upstream."""
    settings = load_settings(None, env={})
    servers: dict[str, UpstreamSettings] = {}
    chat = None
    if upstream is not None:
        servers = {
            "github": UpstreamSettings(url=f"{upstream.url}/github/mcp"),
            "gitlab": UpstreamSettings(url=f"{upstream.url}/gitlab"),
            "tokened": UpstreamSettings(
                url=f"{upstream.url}/tokened",
                headers={
                    "Authorization": Secret("Bearer upstream-token"),
                    "X-Team": Secret("platform"),
                    "X-Request-Id": Secret("configured-id"),
                },
            ),
        }
        chat = UpstreamSettings(url=upstream.url)
    settings = replace(
        settings,
        gateway=replace(settings.gateway, listen=Address(LOOPBACK, 0), access_log=False),
        admin=replace(settings.admin, listen=Address(LOOPBACK, 0)),
        mcp_servers=servers,
        chat=chat,
    )
    for name, changes in sections.items():
        settings = replace(settings, **{name: replace(getattr(settings, name), **changes)})
    return settings


@dataclass
class Keystile:
    """A running Keystile process-in-the-test: both planes, plus shortcuts into the key store."""

    runtime: Runtime
    gateway_port: int
    admin_port: int
    http: aiohttp.ClientSession
    actor: Actor

    @property
    def gateway(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def admin(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    async def user(
        self, email: str = "member@example.com", *, role: str = "member", servers: Sequence[str]
    ) -> User:
        return await self.runtime.keyring.create_user(
            self.actor, email=email, role=role, servers=servers
        )

    async def key(
        self,
        user: User,
        *,
        name: str = "test key",
        servers: Sequence[str] = ("*",),
        permissions: Sequence[str] = ("mcp",),
        valid_from: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> IssuedKey:
        return await self.runtime.keyring.create_key(
            self.actor,
            user_id=user.id,
            name=name,
            servers=servers,
            permissions=permissions,
            valid_from=valid_from,
            expires_at=expires_at,
        )

    async def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, dict[str, str], Any]:
        """One request to the data plane; returns status, headers and the decoded JSON body."""
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        url = URL(self.gateway + path, encoded=True)  # send the path exactly as written
        async with self.http.request(method, url, headers=all_headers, **kwargs) as resp:
            raw = await resp.read()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            return resp.status, dict(resp.headers), body


@asynccontextmanager
async def start_keystile(settings: Settings, database_url: str) -> AsyncIterator[Keystile]:
    async with (
        open_runtime(settings, database_url) as runtime,
        data_plane(runtime) as gateway,
        admin_plane(create_admin_app(runtime), settings) as admin,
    ):
        workspace = await runtime.keyring.ensure_workspace("default")
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            yield Keystile(runtime, gateway.port, admin.port, http, Actor(workspace.id))


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 that can cut the path to its target on demand.

    `cut()` closes the listening socket and every open connection, so new connections are
    refused at once; `restore()` listens again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    def url_for(self, database_url: str) -> str:
        """The same database URL, routed through this proxy."""
        head, _, tail = database_url.partition("@")
        _, _, path = tail.partition("/")
        return f"{head}@{LOOPBACK}:{self.port}/{path}"


ADMIN_PERMISSIONS = ["admin", "keys", "mcp", "chat"]
NO_BODY = object()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    text: str


async def admin_call(
    ks: Keystile,
    method: str,
    path: str,
    key: str | None = None,
    body: Any = NO_BODY,
    *,
    raw: bytes | None = None,
) -> Reply:
    """One request to the ADMIN plane; JSON in, JSON (or text) out."""
    headers: dict[str, str] = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data: bytes | None = raw
    if body is not NO_BODY:
        data = json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with ks.http.request(method, ks.admin + path, headers=headers, data=data) as resp:
        text = await resp.text()
        try:
            decoded: Any = json.loads(text)
        except ValueError:
            decoded = text
        return Reply(resp.status, dict(resp.headers), decoded, text)


async def make_admin(ks: Keystile, email: str = "admin@x") -> tuple[User, IssuedKey]:
    """An admin user with a key holding every permission."""
    admin = await ks.user(email, role="admin", servers=["*"])
    return admin, await ks.key(admin, name="admin key", permissions=ADMIN_PERMISSIONS)


def assert_error(reply: Reply, status: int, code: str | None = None) -> None:
    """The contract's JSON error shape, with this status (and code, if given)."""
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    assert isinstance(reply.body, dict)
    assert set(reply.body) >= {"error", "message"}
    if code is not None:
        assert reply.body["error"] == code


def assert_422(reply: Reply, field: str) -> None:
    assert_error(reply, 422)
    assert reply.body.get("field") == field, reply.body
    assert field in reply.body["message"]


# Long enough that only a hang trips it: tests wait for events, they never time them.
DEADLINE = 30.0


def altered(key: str) -> str:
    """`key` with its last character changed: a well-formed key that is not the key."""
    return key[:-1] + ("y" if key.endswith("x") else "x")


async def wait_until(
    predicate: Callable[[], object],
    *,
    within: float = DEADLINE,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition never held",
) -> Any:
    """Poll `predicate` (a function, or one returning an awaitable) until it gives something
    truthy, and return that. `within` only turns a hang into a failure; it is never a speed
    requirement (speed is measured in bench/), so keep it generous."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (still not so after {within:g} s)")
        await asyncio.sleep(interval)
