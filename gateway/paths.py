"""Turn the raw request target of a data-plane request into a routing decision.

Pure code (no I/O, no aiohttp) so the security-critical rules can be tested exhaustively.
The invariant: a path never reaches a server other than the one named, never escapes
``/mcp-connect/{server}/`` upstream and never escapes ``/api/v1/``.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

Kind = Literal["mcp", "chat", "me", "healthz", "readyz", "oauth", "unknown"]

MAX_PATH_LENGTH = 8192
MCP_PREFIX = "mcp-connect"
CHAT_PREFIX = ("api", "v1")
FIXED_ROUTES: dict[tuple[str, ...], Kind] = {
    ("api", "me"): "me",
    ("healthz",): "healthz",
    ("readyz",): "readyz",
}
# The OAuth flow's own routes (SPEC §9), answered by gateway.oauth before any key is looked
# at (and 404 while gateway.public_url is unset): the endpoint each names.
OAUTH_ROUTES: dict[tuple[str, ...], str] = {
    (".well-known", "oauth-authorization-server"): "authorization-server",
    ("oauth", "authorize"): "authorize",
    ("oauth", "token"): "token",
    ("oauth", "register"): "register",
    ("oauth", "revoke"): "revoke",
}
PROTECTED_RESOURCE = (".well-known", "oauth-protected-resource", MCP_PREFIX)
OAUTH_STATIC = ("oauth", "static")
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The common case: unreserved characters only, nothing to decode or normalise. Such a path
# needs only the dot-segment check; anything else goes through the full judgement.
PLAIN_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")
# A '%' must introduce exactly two hex digits; group 1 is None for a malformed escape.
PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})?")
# Encoded separators and '%' would be decoded into structure by some hop further on
# (double decoding, Windows-style backslashes); encoded controls smuggle line breaks and NULs.
FORBIDDEN_ESCAPES = frozenset({0x2F, 0x5C, 0x25, 0x7F, *range(0x20)})
# What a segment may never contain once decoded and NFKC-normalised: U+FF0F, U+FF3C and
# U+FF05 normalise to '/', '\\' and '%', so an upstream that normalises would see structure.
FORBIDDEN_JUDGED = frozenset("/\\%")
# U+3002 IDEOGRAPHIC FULL STOP survives NFKC but is treated as a dot by some software.
DOT_LIKE = frozenset(".\u3002")


class PathError(ValueError):
    """The request path is hostile or malformed; answered with 400 by the caller."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where a data-plane request goes; raw percent-encoding is preserved in upstream_path."""

    kind: Kind
    server: str = ""
    upstream_path: str = ""
    query: str = ""
    endpoint: str = ""  # an OAuth route's: "token", "protected-resource", "static/<file>", ...


def _check_raw_path(path: str) -> None:
    """Reject raw characters and percent escapes that have no business in a path."""
    if len(path) > MAX_PATH_LENGTH:
        raise PathError("path too long")
    if not path.startswith("/"):
        raise PathError("path must start with '/'")
    # A conforming client percent-encodes everything outside printable ASCII.
    if any(not "\x21" <= c <= "\x7e" or c == "\\" for c in path):
        raise PathError("forbidden character in path")
    for match in PERCENT_ESCAPE.finditer(path):
        if match.group(1) is None:
            raise PathError("malformed percent escape")
        if int(match.group(1), 16) in FORBIDDEN_ESCAPES:
            raise PathError("forbidden percent escape")


def _decode(segment: str) -> str:
    """Percent-decode one segment as strict UTF-8 (overlong forms are errors)."""
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PathError("path segment is not valid UTF-8") from exc


def _is_dot_segment(text: str) -> bool:
    # Whitespace is stripped because some servers (IIS, some file APIs) trim it: "..%20" is "..".
    core = text.strip()
    return bool(core) and set(core) <= DOT_LIKE


def _judge(segment: str) -> None:
    """Raise PathError if any hop could read this segment as a dot-segment or a separator."""
    decoded = _decode(segment)
    normalised = unicodedata.normalize("NFKC", decoded)
    if any(c in FORBIDDEN_JUDGED or unicodedata.category(c) == "Cc" for c in normalised):
        raise PathError("forbidden character in decoded path segment")
    # Judge both orders of "cut path parameters" and NFKC: U+FF1B normalises to ';'.
    cut_first = unicodedata.normalize("NFKC", decoded.split(";", 1)[0])
    if _is_dot_segment(cut_first) or _is_dot_segment(normalised.split(";", 1)[0]):
        raise PathError("dot-segment in path")


def _join(segments: list[str], trailing: bool) -> str:
    if not segments:
        return "/" if trailing else ""
    return "/" + "/".join(segments) + ("/" if trailing else "")


def _split_target(raw_target: str) -> tuple[str, str]:
    path, _, query = raw_target.partition("?")
    if "#" in path:
        # The fragment started before the '?', so the "query" was part of the fragment.
        path, query = path.partition("#")[0], ""
    # Raw CR/LF/NUL in the query could split the upstream request line; encoded ones are fine.
    if any(c < "\x20" or c == "\x7f" for c in query):
        raise PathError("control character in query")
    return path, query


# Judging a path costs microseconds and the same few targets come again and again, so
# decisions for short targets are remembered (refusals are not: they raise). Bounded in
# count and in key length, so unique hostile paths only churn it.
_REMEMBERED_TARGETS = 4096
_REMEMBERED_LENGTH = 512


def route(raw_target: str) -> Route:
    """Validate and normalise raw_target (path and query) and decide where it goes."""
    if len(raw_target) <= _REMEMBERED_LENGTH:
        return _remembered_route(raw_target)
    return _route(raw_target)


def _route(raw_target: str) -> Route:
    path, query = _split_target(raw_target)
    segments = [s for s in path.split("/") if s]
    if PLAIN_PATH.fullmatch(path) is None or len(path) > MAX_PATH_LENGTH:
        _check_raw_path(path)
        for segment in segments:
            _judge(segment)
    elif any(not s.strip(".") for s in segments):
        raise PathError("dot-segment in path")
    trailing = path.endswith("/") and bool(segments)

    # Prefixes are compared in raw spelling and case-sensitively: "/mcp%2Dconnect" is unknown.
    if len(segments) >= 2 and segments[0] == MCP_PREFIX:
        server = _decode(segments[1])
        if not SERVER_NAME.fullmatch(server):
            raise PathError("invalid server name")
        return Route("mcp", server, _join(segments[2:], trailing), query)
    if tuple(segments[:2]) == CHAT_PREFIX:
        return Route("chat", "", _join(segments, trailing), query)
    kind = FIXED_ROUTES.get(tuple(segments))
    if kind is not None and not trailing:
        return Route(kind, query=query)
    return _oauth_route(segments, trailing, query)


def _oauth_route(segments: list[str], trailing: bool, query: str) -> Route:
    """The OAuth routes, or "unknown". The protected-resource document is served for a
    server and for any path under it (clients ask for the one of the URL they were given)."""
    endpoint = OAUTH_ROUTES.get(tuple(segments))
    if endpoint is not None and not trailing:
        return Route("oauth", query=query, endpoint=endpoint)
    if len(segments) >= 4 and tuple(segments[:3]) == PROTECTED_RESOURCE:
        server = _decode(segments[3])
        if not SERVER_NAME.fullmatch(server):
            raise PathError("invalid server name")
        return Route("oauth", server, query=query, endpoint="protected-resource")
    if len(segments) == 3 and tuple(segments[:2]) == OAUTH_STATIC and not trailing:
        return Route("oauth", query=query, endpoint=f"static/{segments[2]}")
    return Route("unknown", query=query)


_remembered_route = functools.lru_cache(maxsize=_REMEMBERED_TARGETS)(_route)
