"""The admin plane's canonical JSON API (snake_case), plus health, metrics and OpenAPI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from admin import compat, page, usage, validate
from admin.http import (
    RUNTIME,
    TRUSTED,
    authenticate,
    error_middleware,
    invalid,
    json_response,
    read_json,
)
from admin.openapi import openapi_document
from admin.service import KeyAdmin, UserAdmin
from gateway import policy
from gateway.errors import ApiError, not_found
from gateway.headers import TrustedProxies
from gateway.mcp.discovery import DiscoveryFailed, ToolDiscovery
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.models import ApiKey, User, iso
from gateway.runtime import Runtime

KEYS = web.AppKey("key_admin", KeyAdmin)
DISCOVERY = web.AppKey("tool_discovery", ToolDiscovery)
USERS = web.AppKey("user_admin", UserAdmin)
ADMIN_BODY_LIMIT = 1024 * 1024


def key_json(key: ApiKey, users: dict[str, User], now: datetime) -> dict[str, Any]:
    body = key.to_json(now)
    owner = users.get(key.user_id)
    body["user"] = (
        {"id": owner.id, "email": owner.email, "display_name": owner.display_name}
        if owner is not None
        else {"id": key.user_id}
    )
    return body


async def _users_by_id(request: web.Request, workspace_id: str) -> dict[str, User]:
    # Deleted users too: their revoked keys stay listable for the audit trail.
    users = await request.app[RUNTIME].store.users(workspace_id, include_deleted=True)
    return {u.id: u for u in users}


async def _one_key(request: web.Request, key: ApiKey, workspace_id: str) -> dict[str, Any]:
    return key_json(key, await _users_by_id(request, workspace_id), datetime.now(UTC))


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", ""):
        raise invalid(name, "expected true or false")
    return value in ("true", "1", "")


# --- keys ---


async def list_keys(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    keys = await request.app[KEYS].listing(
        caller,
        everyone=_flag(request, "all"),
        user_id=request.query.get("user_id"),
        status=request.query.get("status"),
    )
    users = await _users_by_id(request, caller.workspace_id)
    now = datetime.now(UTC)
    return json_response([key_json(k, users, now) for k in keys])


async def create_key(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    issued = await request.app[KEYS].create(caller, await read_json(request))
    body = await _one_key(request, issued.record, caller.workspace_id)
    body["key"] = issued.key
    return json_response(body, status=201)


async def get_key(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    key = await request.app[KEYS].get(caller, request.match_info["id"])
    return json_response(await _one_key(request, key, caller.workspace_id))


async def patch_key(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    key = await request.app[KEYS].update(caller, request.match_info["id"], data)
    return json_response(await _one_key(request, key, caller.workspace_id))


async def delete_key(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    await request.app[KEYS].revoke(caller, request.match_info["id"])
    return web.Response(status=204)


async def enable_key(request: web.Request) -> web.Response:
    return await _toggle(request, True)


async def disable_key(request: web.Request) -> web.Response:
    return await _toggle(request, False)


async def _toggle(request: web.Request, active: bool) -> web.Response:
    caller = await authenticate(request)
    key = await request.app[KEYS].set_active(caller, request.match_info["id"], active)
    return json_response(await _one_key(request, key, caller.workspace_id))


async def rotate_key(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    issued = await request.app[KEYS].rotate(caller, request.match_info["id"], data)
    body = await _one_key(request, issued.record, caller.workspace_id)
    body["key"] = issued.key
    return json_response(body)


# --- users, servers, audit ---


async def list_users(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    return json_response([u.to_json() for u in await request.app[USERS].listing(caller)])


async def create_user(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    user = await request.app[USERS].create(caller, await read_json(request))
    return json_response(user.to_json(), status=201)


async def get_user(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    user = await request.app[USERS].get(caller, request.match_info["id"])
    return json_response(user.to_json())


async def patch_user(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    user = await request.app[USERS].update(caller, request.match_info["id"], data)
    return json_response(user.to_json())


async def delete_user(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    await request.app[USERS].delete(caller, request.match_info["id"])
    return web.Response(status=204)


async def put_user_servers(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    user = await request.app[USERS].set_servers(caller, request.match_info["id"], data)
    return json_response(user.to_json())


async def put_user_tools(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    user = await request.app[USERS].set_tools(caller, request.match_info["id"], data)
    return json_response(user.to_json())


async def list_servers(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    configured = request.app[RUNTIME].settings.mcp_servers
    reachable = policy.user_servers(caller.principal.user, configured)
    return json_response(
        [{"name": name, "granted": name in reachable} for name in sorted(configured)]
    )


async def list_server_tools(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    name = request.match_info["name"]
    configured = request.app[RUNTIME].settings.mcp_servers
    if name not in policy.user_servers(caller.principal.user, configured):
        raise not_found("No such server.")  # unknown and unreachable alike: names do not leak
    try:
        found = await request.app[DISCOVERY].tools(name)
    except DiscoveryFailed:
        raise ApiError(502, "bad_gateway", "The server could not be reached.") from None
    return json_response(found.to_json())


async def list_audit(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    caller.require_admin()
    limit = _int_query(
        request, "limit", default=validate.AUDIT_DEFAULT_LIMIT, maximum=validate.AUDIT_MAX_LIMIT
    )
    before = _int_query(request, "before", default=None, maximum=2**62)
    events = await request.app[RUNTIME].store.audit_events(
        caller.workspace_id, before=before, limit=limit
    )
    for event in events:
        event["created_at"] = iso(event["created_at"])
    next_before = events[-1]["id"] if len(events) == limit else None
    return json_response({"events": events, "next_before": next_before})


def _int_query(request: web.Request, name: str, *, default: int | None, maximum: int) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise invalid(name, f"expected an integer between 1 and {maximum}")
    return int(raw)


# --- plumbing ---


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    runtime.refresh_gauges()
    return web.Response(
        body=runtime.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE}
    )


async def openapi(_: web.Request) -> web.Response:
    return json_response(openapi_document())


def create_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=ADMIN_BODY_LIMIT)
    app[RUNTIME] = runtime
    app[TRUSTED] = TrustedProxies(runtime.settings.gateway.trusted_proxies)
    servers = runtime.settings.mcp_servers
    app[KEYS] = KeyAdmin(runtime.keyring, servers)
    app[USERS] = UserAdmin(runtime.keyring, servers)
    app[DISCOVERY] = ToolDiscovery(servers, timeout=runtime.settings.mcp.discovery_timeout_seconds)
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    r.add_get("/api/keys", list_keys)
    r.add_post("/api/keys", create_key)
    r.add_get("/api/keys/{id}", get_key)
    r.add_patch("/api/keys/{id}", patch_key)
    r.add_delete("/api/keys/{id}", delete_key)
    r.add_post("/api/keys/{id}/enable", enable_key)
    r.add_post("/api/keys/{id}/disable", disable_key)
    r.add_post("/api/keys/{id}/rotate", rotate_key)
    r.add_get("/api/users", list_users)
    r.add_post("/api/users", create_user)
    r.add_get("/api/users/{id}", get_user)
    r.add_patch("/api/users/{id}", patch_user)
    r.add_delete("/api/users/{id}", delete_user)
    r.add_put("/api/users/{id}/servers", put_user_servers)
    r.add_put("/api/users/{id}/tools", put_user_tools)
    r.add_get("/api/servers", list_servers)
    r.add_get("/api/servers/{name}/tools", list_server_tools)
    r.add_get("/api/audit", list_audit)
    r.add_get("/api/usage", usage.get_usage)
    r.add_get("/api/calls", usage.list_calls)
    compat.add_routes(app, app[KEYS])
    page.add_routes(app)
    return app
