"""HTTP plumbing of the admin plane: errors as JSON, who is calling, and reading JSON bodies."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import policy
from gateway.auth import credential
from gateway.db import STORE_UNAVAILABLE
from gateway.errors import ApiError, forbidden, not_found
from gateway.errors import invalid as invalid  # the admin modules' 422, one definition
from gateway.headers import TrustedProxies
from gateway.models import Principal
from gateway.runtime import Runtime
from gateway.store import Actor
from gateway.throttle import rate_limited

log = logging.getLogger("keystile.admin")

RUNTIME = web.AppKey("admin_runtime", Runtime)
TRUSTED = web.AppKey("admin_trusted_proxies", TrustedProxies)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified principal behind an admin request, and what it may do."""

    principal: Principal

    @property
    def user_id(self) -> str:
        return self.principal.user.id

    @property
    def workspace_id(self) -> str:
        return self.principal.workspace.id

    @property
    def is_admin(self) -> bool:
        """Workspace admin: a key with `admin` whose user is (still) an admin."""
        p = self.principal
        return "admin" in p.key.permissions and p.user.role == "admin"

    @property
    def actor(self) -> Actor:
        p = self.principal
        return Actor(p.workspace.id, p.user.id, p.key.id)

    def require_admin(self) -> None:
        if not self.is_admin:
            raise forbidden("This needs an admin key (permission 'admin', user role admin).")


async def authenticate(request: web.Request) -> Caller:
    """Verify the request's key as the data plane does, then require `keys` or `admin`."""
    runtime = request.app[RUNTIME]
    client = request.app[TRUSTED].client(
        request.remote, request.headers.getall("X-Forwarded-For", ())
    )
    principal = await runtime.authenticator.authenticate(
        credential(request.headers), client, runtime.admin_throttle
    )
    policy.check_usable(principal, datetime.now(UTC))
    key = principal.key
    if key.allowed_cidrs is not None:
        policy.require_address(principal, client)  # or the key could mint an unbound one
    if key.rate_limit is not None:  # the same budget as on the data plane
        allowed, limit_headers = runtime.rate_limiter.take(
            key.id, key.rate_limit["requests"], key.rate_limit["per_seconds"]
        )
        if not allowed:
            raise rate_limited(limit_headers)
    runtime.usage.record(key.id)
    caller = Caller(principal)
    if not caller.is_admin and "keys" not in principal.key.permissions:
        raise forbidden("This needs a key with the 'keys' or 'admin' permission.")
    return caller


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or 400 naming what is wrong with it."""
    if not request.body_exists:
        return {}
    try:
        async with asyncio.timeout(request.app[RUNTIME].settings.gateway.body_timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "request_timeout", "The request body stalled.") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "The request body is not valid UTF-8.") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "The request body is nested too deeply.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return data


def reject_unknown(data: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise invalid(unknown[0], "unknown field")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the contract's JSON; unexpected ones get an id, not a trace."""
    try:
        return await handler(request)
    except ApiError as err:
        return err.response()
    except STORE_UNAVAILABLE as exc:
        # The store went away mid-change: the transaction rolled back, nothing was written.
        log.warning("admin request failed, store unavailable: %s", type(exc).__name__)
        return ApiError(
            503,
            "store_unavailable",
            "The key store is unavailable; nothing was changed. Retry shortly.",
            headers={"Retry-After": "5"},
        ).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = str(exc.reason).lower().replace(" ", "_")
        error = not_found() if exc.status == 404 else ApiError(exc.status, code, str(exc.reason))
        response = error.response()
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception("admin request failed (incident %s)", incident)
        return ApiError(500, "internal_error", f"Internal error (incident {incident}).").response()
