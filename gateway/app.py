"""Wiring: build the data-plane application and run both planes in one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import event_loop
from gateway.accesslog import access_logger_class, flush_access_log
from gateway.config import Settings
from gateway.cors import CorsPolicy
from gateway.dataplane import DataPlane
from gateway.listen import (
    Listening,
    connection_budget,
    install_repeat_filter,
    listen,
    raise_open_files_limit,
)
from gateway.mcp.discovery import ToolDiscovery
from gateway.mcp.guard import ToolGuard
from gateway.oauth.endpoints import KeyUse, OAuthEndpoints
from gateway.proxy import Forwarder
from gateway.runtime import Runtime

log = logging.getLogger("keystile")


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request its parser refused with the offending raw line attached, and
    that line may be a credential header (a key with a stray CR): keep only the error's kind."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused a malformed request: %s"
            record.args = (type(exc).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _install_log_hygiene() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    # Lines an outside event can repeat thousands of times a second.
    install_repeat_filter("asyncio", "aiohttp.server", "keystile.proxy", "keystile.auth")


@asynccontextmanager
async def data_plane(
    runtime: Runtime, *, reuse_port: bool = False, max_connections: int | None = None
) -> AsyncIterator[Listening]:
    """The data plane, listening: aiohttp's low-level server handing every request to the
    DataPlane (paths are judged by gateway.paths, so there is no router to run), with the
    forwarder, the access-log flusher and the shutdown deadline for open streams."""
    settings = runtime.settings
    gateway = settings.gateway
    forwarder = Forwarder(gateway, runtime.metrics)
    plane = DataPlane(
        servers=settings.mcp_servers,
        chat=settings.chat,
        authenticator=runtime.authenticator,
        forwarder=forwarder,
        usage=runtime.usage,
        calls=runtime.calls,
        metrics=runtime.metrics,
        readiness=runtime.readiness,
        throttle=runtime.data_throttle,
        rate_limiter=runtime.rate_limiter,
        tools=ToolGuard(settings.mcp_servers, settings.mcp.max_inspect_bytes),
        oauth=_oauth_endpoints(runtime),
        cors=CorsPolicy(gateway.cors_allowed_origins),
        name_calls=runtime.calls is not None
        or (gateway.access_log and gateway.access_log_format == "json"),
    )
    # auto_decompress off: a compressed request body is forwarded as it came, with its own
    # Content-Encoding, never decompressed and passed on still labelled compressed.
    server = web.Server(
        plane.handle, max_field_size=16384, auto_decompress=False, **_handler_args(settings)
    )
    runner = web.ServerRunner(server, shutdown_timeout=gateway.shutdown_timeout)
    await forwarder.open()
    flusher = asyncio.create_task(_flush_access_log_every_second())
    try:
        listening = await listen(
            runner,
            gateway.listen,
            max_connections=max_connections or gateway.max_connections,
            reuse_port=reuse_port,
        )
        # Draining gives in-flight requests shutdown_timeout; streams (SSE) would never
        # finish, so they are ended cleanly just before aiohttp would cancel them.
        listening.on_drain = lambda: asyncio.create_task(
            _end_streams_before(gateway.shutdown_timeout, forwarder)
        )
        try:
            yield listening
        finally:
            await listening.close()
    finally:
        await forwarder.close()
        flusher.cancel()
        flush_access_log()


def _oauth_endpoints(runtime: Runtime) -> OAuthEndpoints | None:
    """The OAuth routes (SPEC §9), when gateway.public_url turns them on."""
    settings = runtime.settings
    if runtime.oauth is None:
        return None
    return OAuthEndpoints(
        public_url=settings.gateway.public_url,
        settings=settings.oauth,
        max_tracked=settings.throttle.max_tracked,
        body_timeout=settings.gateway.body_timeout,
        store=runtime.oauth,
        keys_store=runtime.store,
        key_use=KeyUse(
            runtime.authenticator,
            runtime.data_throttle,
            runtime.rate_limiter,
            runtime.usage,
            runtime.cache,
        ),
        discovery=ToolDiscovery(
            settings.mcp_servers, timeout=settings.mcp.discovery_timeout_seconds
        ),
        configured=settings.mcp_servers,
    )


@asynccontextmanager
async def admin_plane(
    app: web.Application, settings: Settings, *, reuse_port: bool = False
) -> AsyncIterator[Listening]:
    runner = web.AppRunner(
        app, shutdown_timeout=settings.gateway.shutdown_timeout, **_handler_args(settings)
    )
    listening = await listen(
        runner,
        settings.admin.listen,
        max_connections=settings.admin.max_connections,
        reuse_port=reuse_port,
    )
    try:
        yield listening
    finally:
        await listening.close()


def _handler_args(settings: Settings) -> dict[str, Any]:
    """aiohttp's per-connection settings, the same on both planes."""
    _install_log_hygiene()
    return {
        "access_log_class": access_logger_class(settings.gateway.access_log_format),
        # aiohttp wants a logger to enable access logging; AccessLogger writes its own buffer.
        "access_log": logging.getLogger("keystile.access") if settings.gateway.access_log else None,
        # Also the deadline for a request head: aiohttp closes a connection whose head is
        # still incomplete when it expires, which is what stops slowloris clients.
        "keepalive_timeout": settings.gateway.keepalive_timeout,
    }


async def _flush_access_log_every_second() -> None:
    while True:
        await asyncio.sleep(1.0)
        flush_access_log()


async def _end_streams_before(drain_seconds: float, forwarder: Forwarder) -> None:
    await asyncio.sleep(max(0.0, drain_seconds - min(0.5, drain_seconds / 2)))
    forwarder.end_streams()


AppFactory = Callable[[Runtime], web.Application]
# Called once both planes listen, with the runtime and the bound gateway and admin ports.
ReadyHook = Callable[[Runtime, int, int], Awaitable[None]]


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner's first site listens on (useful when configured as port 0)."""
    address = runner.addresses[0]
    return int(address[1])


async def serve_until_signalled(
    runtime_cm: AbstractAsyncContextManager[Runtime],
    admin_factory: AppFactory,
    *,
    reuse_port: bool = False,
    ready: ReadyHook | None = None,
) -> None:
    """Run both planes until SIGINT/SIGTERM, then drain and close everything."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with runtime_cm as runtime, contextlib.AsyncExitStack() as planes:
        settings = runtime.settings
        admin_connections = settings.admin.max_connections
        data_connections = connection_budget(
            settings.gateway.max_connections,
            admin_connections + settings.database.pool_max_size,
            raise_open_files_limit(),
        )
        if data_connections < settings.gateway.max_connections:
            log.warning(
                "gateway.max_connections lowered to %d to fit the open-files limit",
                data_connections,
            )
        gateway = await planes.enter_async_context(
            data_plane(runtime, reuse_port=reuse_port, max_connections=data_connections)
        )
        admin = await planes.enter_async_context(
            admin_plane(admin_factory(runtime), settings, reuse_port=reuse_port)
        )
        log.info(
            "gateway on %s, admin on %s (event loop: %s)",
            settings.gateway.listen,
            settings.admin.listen,
            event_loop.running_loop_name(),
        )
        # What exists now lives as long as the process: keep the cyclic collector from
        # walking it on every full collection, and let it run less often under load.
        gc.freeze()
        gc.set_threshold(10_000, 50, 100)
        if ready is not None:
            await ready(runtime, gateway.port, admin.port)
        await stop.wait()
        log.info("shutting down: draining for up to %ss", settings.gateway.shutdown_timeout)
        # Both planes stop accepting at once and drain side by side.
        await asyncio.gather(gateway.close(), admin.close())
    log.info("stopped")
