"""Which tools a server offers, asked with the official MCP SDK client.

The admin page offers a server's tools as checkboxes, and so does the OAuth consent page
(gateway.oauth); this is where they come from. The server is asked the way a client would ask
it, with its configured upstream headers: Streamable HTTP at its url first, then the legacy
HTTP+SSE transport (at its url, then at `<url>/sse`). Answers are kept 60 s, concurrent askers
of one server share one discovery, and a discovery is bounded by
`mcp.discovery_timeout_seconds`: both planes share one event loop, and everything here awaits,
so the data plane is never held up by a slow server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.config import UpstreamSettings

log = logging.getLogger("keystile.discovery")

CACHE_SECONDS = 60.0
FAILURE_CACHE_SECONDS = 5.0  # a server that just failed is not asked again at once
MAX_PAGES = 50


class DiscoveryFailed(Exception):
    """The server could not be reached, or did not list its tools."""


@dataclass(frozen=True, slots=True)
class ServerTools:
    server: str
    tools: tuple[dict[str, str | None], ...]
    fetched_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "tools": [dict(t) for t in self.tools],
            "fetched_at": self.fetched_at.isoformat().replace("+00:00", "Z"),
        }


Transport = Callable[[str, Mapping[str, str], float], contextlib.AbstractAsyncContextManager[Any]]


class ToolDiscovery:
    def __init__(
        self,
        servers: Mapping[str, UpstreamSettings],
        *,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._servers = servers
        self._timeout = timeout
        self._clock = clock
        self._cache: dict[str, tuple[float, ServerTools | DiscoveryFailed]] = {}
        self._inflight: dict[str, asyncio.Task[ServerTools]] = {}

    async def tools(self, server: str) -> ServerTools:
        """The server's tools, or DiscoveryFailed."""
        cached = self._cache.get(server)
        if cached is not None and cached[0] > self._clock():
            if isinstance(cached[1], DiscoveryFailed):
                raise cached[1]
            return cached[1]
        task = self._inflight.get(server)
        if task is None:
            task = asyncio.create_task(self._discover(server))
            self._inflight[server] = task
            task.add_done_callback(lambda _: self._inflight.pop(server, None))
        return await asyncio.shield(task)

    async def _discover(self, server: str) -> ServerTools:
        upstream = self._servers[server]
        try:
            async with asyncio.timeout(self._timeout):
                tools = await self._any_transport(upstream)
        except (DiscoveryFailed, TimeoutError) as exc:
            failed = exc if isinstance(exc, DiscoveryFailed) else DiscoveryFailed("timed out")
            self._cache[server] = (self._clock() + FAILURE_CACHE_SECONDS, failed)
            raise failed from None
        found = ServerTools(server, tools, datetime.now(UTC))
        self._cache[server] = (self._clock() + CACHE_SECONDS, found)
        return found

    async def _any_transport(self, upstream: UpstreamSettings) -> tuple[dict[str, str | None], ...]:
        headers = {name: str(value) for name, value in upstream.headers.items()}
        attempts: list[tuple[Transport, str]] = [
            (_streamable, upstream.url),
            (_legacy, upstream.url),
            (_legacy, upstream.url.rstrip("/") + "/sse"),
        ]
        problems = []
        for transport, url in attempts:
            try:
                return await _list_tools(transport, url, headers, self._timeout)
            except Exception as exc:
                problems.append(f"{transport.__name__.strip('_')}: {type(exc).__name__}")
        # Only the kinds of failure: messages could echo the server's headers or URL tokens.
        log.warning("tool discovery failed (%s)", "; ".join(problems))
        raise DiscoveryFailed("; ".join(problems))


async def _list_tools(
    transport: Transport, url: str, headers: Mapping[str, str], seconds: float
) -> tuple[dict[str, str | None], ...]:
    # The SDK (and pydantic under it) is imported on the first discovery, not at start-up:
    # most gateway processes never discover, and would carry ~30 MiB and a second of imports.
    from mcp import ClientSession
    from mcp.types import PaginatedRequestParams

    found: list[dict[str, str | None]] = []
    async with (
        transport(url, headers, seconds) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            params = PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            found.extend({"name": t.name, "description": t.description} for t in page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
    return tuple(found)


@contextlib.asynccontextmanager
async def _streamable(url: str, headers: Mapping[str, str], seconds: float) -> AsyncIterator[Any]:
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers=dict(headers), timeout=httpx2.Timeout(seconds)) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams[0], streams[1]


@contextlib.asynccontextmanager
async def _legacy(url: str, headers: Mapping[str, str], seconds: float) -> AsyncIterator[Any]:
    from mcp.client.sse import sse_client

    async with sse_client(
        url, headers=dict(headers), timeout=seconds, sse_read_timeout=seconds
    ) as (
        read,
        write,
    ):
        yield read, write
