"""Reading what the OAuth endpoints receive: bounded bodies, forms, queries and JSON objects.

RFC 6749 §3.1 and §3.2: a parameter sent more than once is an error, and one sent without a
value is treated as omitted. Bodies are small (a registration is a few hundred bytes), read
whole up to a cap, and within the gateway's body timeout.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from gateway.oauth.errors import OAuthError, invalid_request

MAX_BODY = 64 * 1024


async def read_body(request: web.BaseRequest, *, stall_seconds: float) -> bytes:
    """The whole body, at most MAX_BODY bytes (413 past it, 408 if it stalls)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise OAuthError("invalid_request", "The request body is too large.", status=413)
    body = bytearray()
    try:
        async with asyncio.timeout(stall_seconds):
            while chunk := await request.content.read(MAX_BODY + 1 - len(body)):
                body += chunk
                if len(body) > MAX_BODY:
                    raise OAuthError(
                        "invalid_request", "The request body is too large.", status=413
                    )
    except TimeoutError:
        raise OAuthError("invalid_request", "The request body stalled.", status=408) from None
    return bytes(body)


def params(encoded: str) -> dict[str, str]:
    """`a=1&b=2` (a query, or a form body) as a dict; a repeated parameter is an error."""
    try:
        pairs = parse_qsl(encoded, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise invalid_request("The parameters are not valid UTF-8.") from None
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in found:
            raise invalid_request(f"The parameter {name!r} is repeated.")
        found[name] = value
    return {name: value for name, value in found.items() if value}


def form(request: web.BaseRequest, body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (the token and revocation endpoints')."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise invalid_request("Expected an application/x-www-form-urlencoded body.")
    try:
        return params(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid_request("The body is not valid UTF-8.") from None


def json_object(request: web.BaseRequest, body: bytes) -> dict[str, Any]:
    """A JSON object body; the content type must say JSON (a cross-site form cannot)."""
    if request.content_type != "application/json":
        raise OAuthError("invalid_request", "Expected an application/json body.", status=415)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise invalid_request("The body is not a valid JSON object.") from None
    if not isinstance(data, dict):
        raise invalid_request("The body is not a valid JSON object.")
    return data
