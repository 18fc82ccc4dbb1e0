"""The admin plane: health and metrics; the key-management API builds on this application."""

from __future__ import annotations

from aiohttp import web

from gateway.runtime import Runtime

RUNTIME = web.AppKey("admin_runtime", Runtime)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.metrics.cached_keys = len(runtime.cache)
    runtime.metrics.last_used_pending = runtime.usage.pending
    return web.Response(text=runtime.metrics.render(), content_type="text/plain")


def create_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
