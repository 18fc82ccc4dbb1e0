"""Wiring: build the data-plane application and run both planes in one process."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.accesslog import AccessLogger, flush_access_log
from gateway.config import Address, Settings
from gateway.dataplane import DataPlane
from gateway.proxy import Forwarder
from gateway.runtime import Runtime

log = logging.getLogger("keystile")

RUNTIME = web.AppKey("runtime", Runtime)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BaseHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The one handler of an application that routes by itself (see DirectRunner).
DIRECT_HANDLER: web.AppKey[Handler] = web.AppKey("direct_handler")


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


def create_gateway_app(runtime: Runtime) -> web.Application:
    """The data plane: one catch-all route, since paths are judged by gateway.paths."""
    settings = runtime.settings
    app = web.Application(handler_args={"max_field_size": 16384})
    app[RUNTIME] = runtime
    forwarder = Forwarder(settings.gateway, runtime.metrics)
    plane = DataPlane(
        servers=settings.mcp_servers,
        chat=settings.chat,
        authenticator=runtime.authenticator,
        forwarder=forwarder,
        usage=runtime.usage,
        metrics=runtime.metrics,
        readiness=runtime.readiness,
        throttle=runtime.data_throttle,
        rate_limiter=runtime.rate_limiter,
    )

    async def upstream_session(_: web.Application) -> AsyncIterator[None]:
        await forwarder.open()
        yield
        await forwarder.close()

    deadline: list[asyncio.Task[None]] = []

    async def end_streams_at_deadline(_: web.Application) -> None:
        # on_shutdown runs when the listeners are closed and in-flight requests get
        # shutdown_timeout to finish; streams (SSE) would never finish, so end them cleanly
        # just before the deadline, when aiohttp would cancel them mid-event instead.
        timeout = settings.gateway.shutdown_timeout
        delay = max(0.0, timeout - min(0.5, timeout / 2))

        async def later() -> None:
            await asyncio.sleep(delay)
            forwarder.end_streams()

        deadline.append(asyncio.create_task(later()))

    async def cancel_deadline(_: web.Application) -> AsyncIterator[None]:
        yield
        for task in deadline:
            task.cancel()

    async def access_log_flusher(_: web.Application) -> AsyncIterator[None]:
        async def flush_every_second() -> None:
            while True:
                await asyncio.sleep(1.0)
                flush_access_log()

        task = asyncio.create_task(flush_every_second())
        yield
        task.cancel()
        flush_access_log()

    app.cleanup_ctx.append(upstream_session)
    app.cleanup_ctx.append(cancel_deadline)
    app.cleanup_ctx.append(access_log_flusher)
    app.on_shutdown.append(end_streams_at_deadline)
    app.router.add_route("*", "/{tail:.*}", plane.handle)
    app[DIRECT_HANDLER] = plane.handle
    return app


class DirectRunner(web.AppRunner):
    """Hands every request straight to the application's DIRECT_HANDLER, past aiohttp's
    router (a regex match and match-info objects per request): the data plane judges raw
    paths itself, and its one route would match everything anyway."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The application's request factory still makes the requests: web.Request objects.
        handler = cast(BaseHandler, self.app[DIRECT_HANDLER])
        server.request_handler = handler
        return server


AppFactory = Callable[[Runtime], web.Application]
# Called once both planes listen, with the runtime and the bound gateway and admin ports.
ReadyHook = Callable[[Runtime, int, int], Awaitable[None]]


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner's first site listens on (useful when configured as port 0)."""
    address = runner.addresses[0]
    return int(address[1])


async def start_site(
    app: web.Application,
    address: Address,
    *,
    settings: Settings,
    reuse_port: bool = False,
) -> web.AppRunner:
    _install_log_hygiene()
    runner_class = DirectRunner if DIRECT_HANDLER in app else web.AppRunner
    runner = runner_class(
        app,
        access_log_class=AccessLogger,
        # aiohttp wants a logger to enable access logging; AccessLogger writes its own buffer.
        access_log=logging.getLogger("keystile.access") if settings.gateway.access_log else None,
        shutdown_timeout=settings.gateway.shutdown_timeout,
        # Also the deadline for a request head: aiohttp closes a connection whose head is
        # still incomplete when it expires, which is what stops slowloris clients.
        keepalive_timeout=settings.gateway.keepalive_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_port=reuse_port or None)
    await site.start()
    return runner


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
    async with runtime_cm as runtime:
        settings = runtime.settings
        runners = [
            await start_site(
                create_gateway_app(runtime),
                settings.gateway.listen,
                settings=settings,
                reuse_port=reuse_port,
            ),
            await start_site(
                admin_factory(runtime),
                settings.admin.listen,
                settings=settings,
                reuse_port=reuse_port,
            ),
        ]
        log.info("gateway on %s, admin on %s", settings.gateway.listen, settings.admin.listen)
        # What exists now lives as long as the process: keep the cyclic collector from
        # walking it on every full collection, and let it run less often under load.
        gc.freeze()
        gc.set_threshold(10_000, 50, 100)
        if ready is not None:
            await ready(runtime, bound_port(runners[0]), bound_port(runners[1]))
        try:
            await stop.wait()
        finally:
            log.info("shutting down: draining for up to %ss", settings.gateway.shutdown_timeout)
            await asyncio.gather(*(runner.cleanup() for runner in runners))
    log.info("stopped")
