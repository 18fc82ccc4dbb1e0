"""Errors of the OAuth endpoints, as RFC 6749 §5.2 has them: JSON `{"error", "error_description"}`.

The body also carries `message` (the same sentence) so it has the contract's error shape too
(SPEC §4). Never cached: an error may answer a request that carried a secret.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from aiohttp import web

# Token and error answers carry or answer secrets: no cache may keep them (RFC 6749 §5.1).
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    def __init__(
        self,
        error: str,
        description: str,
        *,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        body["message"] = self.description
        return json_answer(body, status=self.status, headers=self.headers)


def json_answer(
    body: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def invalid_grant(description: str) -> OAuthError:
    return OAuthError("invalid_grant", description)


def invalid_client(description: str) -> OAuthError:
    # RFC 6749 §5.2: 401 for a client that cannot be authenticated (here: unknown).
    return OAuthError("invalid_client", description, status=401)


def invalid_target(description: str) -> OAuthError:
    # RFC 8707 §2: the `resource` is not one this server can issue a token for.
    return OAuthError("invalid_target", description)


def too_many_requests(retry_after: float) -> OAuthError:
    return OAuthError(
        "too_many_requests",
        "Too many requests from this address; retry later.",
        status=429,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )
