"""Compatibility routes: the request and response shapes of the systems Keystile replaces.

Each handler translates its shape to the canonical service (admin.service) and back; the
rules (who may see and change what, validation, audit) are the canonical ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from admin import validate
from admin.http import Caller, authenticate, invalid, json_response, read_json, reject_unknown
from admin.service import KeyAdmin
from gateway.errors import ApiError, not_found
from gateway.models import ApiKey, iso

_KEYS = web.AppKey("compat_key_admin", KeyAdmin)

# --- /api/auth/api-key/* (better-auth style: camelCase, "start" is the masked key) ---


def _auth_key_json(key: ApiKey, now: datetime) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "start": key.prefix,
        "userId": key.user_id,
        "enabled": key.status(now) == "active",
        "permissions": list(key.permissions),
        "expiresAt": iso(key.expires_at),
        "createdAt": iso(key.created_at),
        "updatedAt": iso(key.updated_at),
        "lastRequest": iso(key.last_used_at),
    }


async def auth_list(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    keys = await request.app[_KEYS].listing(
        caller, everyone=caller.is_admin, user_id=None, status=None
    )
    now = datetime.now(UTC)
    return json_response([_auth_key_json(k, now) for k in keys])


async def auth_create(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    reject_unknown(data, frozenset({"name", "expiresIn", "permissions"}))
    keys = request.app[_KEYS]
    canonical: dict[str, Any] = {
        **keys.inherited(caller),
        "name": data.get("name"),
        "permissions": data.get("permissions", _default_permissions(caller)),
    }
    if data.get("expiresIn") is not None:
        seconds = validate.number(data, "expiresIn", minimum=1, maximum=validate.MAX_EXPIRES_IN)
        canonical["expires_at"] = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    with _client_field_names(_AUTH_NAMES):
        issued = await keys.create(caller, canonical)
    body = _auth_key_json(issued.record, datetime.now(UTC))
    body["key"] = issued.key
    return json_response(body)


async def auth_delete(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    data = await read_json(request)
    reject_unknown(data, frozenset({"keyId"}))
    key_id = data.get("keyId")
    if not isinstance(key_id, str) or not key_id:
        raise invalid("keyId", "expected a key id")
    await request.app[_KEYS].revoke(caller, key_id)
    return json_response({"success": True})


def _default_permissions(caller: Caller) -> list[str]:
    """Keys made through these routes serve the chat API and MCP (what those systems' keys do),
    as far as the calling key holds them itself (a key never makes a broader one)."""
    wanted = ["mcp", "chat"]
    if caller.is_admin:
        return wanted
    held = [p for p in wanted if p in caller.principal.key.permissions]
    # Holding neither: keep the default and let the rule refuse it, naming `permissions`,
    # rather than quietly mint a key that can do nothing.
    return held or wanted


# Errors name the fields as the client sent them.
_AUTH_NAMES = {"expires_at": "expiresIn"}


# --- /{workspace}/admin/api-keys (CMS style: token masked, isActive, validFrom/validTo) ---

_CMS_FIELDS = frozenset({"name", "isActive", "validFrom", "validTo", "permissions"})
_CMS_READ_ONLY = frozenset({"id", "token"})
_CMS_TO_CANONICAL = {
    "name": "name",
    "isActive": "is_active",
    "validFrom": "valid_from",
    "validTo": "expires_at",
    "permissions": "permissions",
}
_CANONICAL_TO_CMS = {v: k for k, v in _CMS_TO_CANONICAL.items()}


def _cms_key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "token": key.prefix,
        "isActive": key.is_active and key.revoked_at is None,
        "validFrom": iso(key.valid_from),
        "validTo": iso(key.expires_at),
        "permissions": list(key.permissions),
    }


def _cms_caller_workspace(request: web.Request, caller: Caller) -> None:
    """The path names the caller's workspace (by name or id), or nothing is there."""
    named = request.match_info["workspace"]
    workspace = caller.principal.workspace
    if named not in (workspace.name, workspace.id):
        raise not_found("No such workspace.")


@contextmanager
def _client_field_names(names: Mapping[str, str]) -> Iterator[None]:
    """Errors name the field as the client sent it (validTo, not expires_at)."""
    try:
        yield
    except ApiError as err:
        if err.field is not None and err.field in names:
            err.field = names[err.field]
            for canonical, client in names.items():
                err.message = err.message.replace(canonical, client)
        raise


def _cms_to_canonical(data: dict[str, Any]) -> dict[str, Any]:
    # A client may PUT back the object it GOT: its read-only fields are ignored.
    data = {k: v for k, v in data.items() if k not in _CMS_READ_ONLY}
    reject_unknown(data, _CMS_FIELDS)
    return {_CMS_TO_CANONICAL[k]: v for k, v in data.items()}


async def cms_list(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    _cms_caller_workspace(request, caller)
    keys = await request.app[_KEYS].listing(
        caller, everyone=caller.is_admin, user_id=None, status=None
    )
    return json_response([_cms_key_json(k) for k in keys])


async def cms_create(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    _cms_caller_workspace(request, caller)
    canonical = _cms_to_canonical(await read_json(request))
    keys = request.app[_KEYS]
    canonical = {**keys.inherited(caller), **canonical}
    canonical.setdefault("permissions", _default_permissions(caller))
    with _client_field_names(_CANONICAL_TO_CMS):
        issued = await keys.create(caller, canonical)
    return json_response({"result": issued.key})


async def cms_get(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    _cms_caller_workspace(request, caller)
    key = await request.app[_KEYS].get(caller, request.match_info["id"])
    return json_response(_cms_key_json(key))


async def cms_update(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    _cms_caller_workspace(request, caller)
    canonical = _cms_to_canonical(await read_json(request))
    with _client_field_names(_CANONICAL_TO_CMS):
        key = await request.app[_KEYS].update(caller, request.match_info["id"], canonical)
    return json_response(_cms_key_json(key))


async def cms_delete(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    _cms_caller_workspace(request, caller)
    await request.app[_KEYS].revoke(caller, request.match_info["id"])
    return web.Response(status=204)


def add_routes(app: web.Application, keys: KeyAdmin) -> None:
    app[_KEYS] = keys
    r = app.router
    r.add_get("/api/auth/api-key/list", auth_list)
    r.add_post("/api/auth/api-key/create", auth_create)
    r.add_post("/api/auth/api-key/delete", auth_delete)
    r.add_get("/{workspace}/admin/api-keys", cms_list)
    r.add_post("/{workspace}/admin/api-keys", cms_create)
    r.add_get("/{workspace}/admin/api-keys/{id}", cms_get)
    r.add_put("/{workspace}/admin/api-keys/{id}", cms_update)
    r.add_delete("/{workspace}/admin/api-keys/{id}", cms_delete)
