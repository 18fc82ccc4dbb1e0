"""One error type for both planes, rendered as the contract's JSON in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

_BEARER_INVALID = 'Bearer realm="keystile", error="invalid_token"'
_BEARER_SCOPE = 'Bearer realm="keystile", error="insufficient_scope"'


class ApiError(Exception):
    """An answer with a status, a machine code and a human sentence."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.field = field

    def response(self) -> web.Response:
        body: dict[str, str] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return web.Response(
            status=self.status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers=self.headers,
        )


def invalid_key(message: str = "The API key is missing, malformed or not valid.") -> ApiError:
    return ApiError(401, "invalid_api_key", message, headers={"WWW-Authenticate": _BEARER_INVALID})


def invalid(field: str, message: str) -> ApiError:
    """422 naming the offending field: the admin API's, and the grant rule's (gateway.narrowing)."""
    return ApiError(422, "invalid_request", f"{field}: {message}", field=field)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message, headers={"WWW-Authenticate": _BEARER_SCOPE})


def not_found(message: str = "No such route.") -> ApiError:
    return ApiError(404, "not_found", message)


def store_unavailable(retry_after: int = 5) -> ApiError:
    return ApiError(
        503,
        "store_unavailable",
        "The key store cannot be reached and this key is not cached; retry shortly.",
        headers={"Retry-After": str(retry_after)},
    )
