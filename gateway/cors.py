"""CORS for browser clients (SPEC §4): which origins may read the data plane's answers.

Keystile owns it: a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
answered here, without a key, and never forwarded; every answer to an allowed origin, errors
included, carries `Access-Control-Allow-Origin` (the request's own origin, with `Vary: Origin`)
and the headers a client may read; upstream `Access-Control-*` headers give way to these. Never
`Access-Control-Allow-Credentials`: keys travel in headers, not cookies, so a browser never
sends one on its own.

Pure: the request's headers in, the headers (or the preflight's answer) out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

ANY = "*"
METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSED = ", ".join(
    (
        "Mcp-Session-Id",
        "MCP-Protocol-Version",
        "WWW-Authenticate",
        "Retry-After",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
        "X-Request-Id",
    )
)
MAX_AGE = "600"  # seconds a browser may keep a preflight's answer
_MAX_REQUESTED_HEADERS = 2048


def normalise_origin(origin: str) -> str | None:
    """`scheme://host[:port]` as browsers send it (lower case, no default port), or None for
    anything that is not such an origin (a path, user info, another scheme)."""
    if origin == "null":
        return origin  # sandboxed documents and file: pages say so; listed literally or not at all
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class CorsPolicy:
    """The configured origins (`gateway.cors_allowed_origins`); empty: no CORS at all."""

    def __init__(self, allowed: Iterable[str]) -> None:
        listed = list(allowed)
        self._any = ANY in listed
        self._allowed = frozenset(o for o in (normalise_origin(x) for x in listed) if o)

    @property
    def configured(self) -> bool:
        return self._any or bool(self._allowed)

    def allows(self, origin: str, *, open_route: bool = False) -> bool:
        """Whether `origin` may read answers (`open_route`: OAuth endpoints, open to all)."""
        if open_route or self._any:
            return True
        return normalise_origin(origin) in self._allowed

    def answer_headers(self, origin: str | None, *, open_route: bool = False) -> dict[str, str]:
        """The CORS headers of an actual answer to `origin` (none if it may not read it)."""
        if origin is None or not self.allows(origin, open_route=open_route):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED,
            "Vary": "Origin",
        }

    def preflight(
        self, headers: Mapping[str, str], *, open_route: bool = False
    ) -> tuple[int, dict[str, str]]:
        """The status and headers of a preflight's answer: 204 with the CORS headers for an
        allowed origin, 403 with none for any other."""
        origin = headers.get("Origin", "")
        if not self.allows(origin, open_route=open_route):
            return 403, {"Vary": "Origin"}
        answer = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin",
        }
        requested = headers.get("Access-Control-Request-Headers", "")
        if requested and len(requested) <= _MAX_REQUESTED_HEADERS and _tokens(requested):
            answer["Access-Control-Allow-Headers"] = requested
        return 204, answer


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return (
        method == "OPTIONS" and "Origin" in headers and ("Access-Control-Request-Method" in headers)
    )


def is_cors_header(name: str) -> bool:
    return name.lower().startswith("access-control-")


def _tokens(value: str) -> bool:
    """A comma-separated list of header names (RFC 9110 tokens): echoed back only if so."""
    allowed = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    names = [n.strip() for n in value.split(",")]
    return all(n and set(n) <= allowed for n in names)
