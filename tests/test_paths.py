"""Table-driven tests for gateway.paths: hostile request targets must never change the target."""

from __future__ import annotations

import itertools
import unicodedata
from urllib.parse import unquote

import pytest

from gateway.paths import MAX_PATH_LENGTH, PathError, Route, route

# Either None (must raise PathError) or the (kind, server) the request must stay within.
Expected = tuple[str, str] | None
REJECT: Expected = None
GITHUB: Expected = ("mcp", "github")

HOSTILE: list[tuple[str, Expected]] = [
    # Plain and encoded dot-segments.
    ("/mcp-connect/github/../gitlab/x", REJECT),
    ("/mcp-connect/github/%2e%2e/gitlab", REJECT),
    ("/mcp-connect/github/%2E%2E/gitlab", REJECT),
    ("/mcp-connect/github/.%2e/gitlab", REJECT),
    ("/mcp-connect/github/%2e./gitlab", REJECT),
    ("/mcp-connect/github/%252e%252e/gitlab", REJECT),
    ("/mcp-connect/./github/x", REJECT),
    ("/mcp-connect/github/./x", REJECT),
    ("/mcp-connect/github/%2e/x", REJECT),
    ("/mcp-connect/%2e%2e/gitlab/x", REJECT),
    ("/mcp-connect/../gitlab/x", REJECT),
    ("/mcp-connect/github/.../x", REJECT),
    ("/mcp-connect/github/..%20/gitlab", REJECT),
    ("/mcp-connect/github/..", REJECT),
    ("/mcp-connect/github/../", REJECT),
    # Encoded and raw separators.
    ("/mcp-connect/github/a%2fb", REJECT),
    ("/mcp-connect/github/a%2Fb", REJECT),
    ("/mcp-connect/github%2f..%2fgitlab/x", REJECT),
    ("/mcp-connect/github/..%2f..%2fgitlab", REJECT),
    ("/mcp-connect/github/a%5cb", REJECT),
    ("/mcp-connect/github/a%5Cb", REJECT),
    ("/mcp-connect/github\\..\\gitlab", REJECT),
    ("/mcp-connect/github/..\\gitlab", REJECT),
    ("/mcp-connect/github/%255c", REJECT),
    ("/mcp-connect/github/%252f", REJECT),
    # Empty segments collapse; the server is whatever the collapsed path names.
    ("/mcp-connect/github//x", GITHUB),
    ("//mcp-connect///github//x//", GITHUB),
    ("/mcp-connect//gitlab/x", ("mcp", "gitlab")),
    # Path parameters.
    ("/mcp-connect/github/..;/gitlab", REJECT),
    ("/mcp-connect/github/..;foo=bar/gitlab", REJECT),
    ("/mcp-connect/..;/gitlab/x", REJECT),
    ("/mcp-connect/github;x=1/y", REJECT),
    ("/mcp-connect/github%3b/y", REJECT),
    ("/mcp-connect/github/%2e%2e%3b/gitlab", REJECT),
    ("/mcp-connect/github/...;/x", REJECT),
    ("/mcp-connect/github/..%EF%BC%9Bx/gitlab", REJECT),  # fullwidth semicolon
    # Case-sensitive prefixes and encoded prefixes are simply unknown.
    ("/MCP-Connect/github/x", ("unknown", "")),
    ("/MCP-CONNECT/github/x", ("unknown", "")),
    ("/mcp%2Dconnect/github/x", ("unknown", "")),
    ("/API/V1/chat", ("unknown", "")),
    # Unicode look-alikes that NFKC-normalise into dots or separators.
    ("/mcp-connect/github/%E2%80%A4%E2%80%A4/gitlab", REJECT),  # one dot leader
    ("/mcp-connect/github/%E2%80%A5/gitlab", REJECT),  # two dot leader
    ("/mcp-connect/github/%EF%BC%8E%EF%BC%8E/gitlab", REJECT),  # fullwidth full stop
    ("/mcp-connect/github/%EF%B9%92%EF%B9%92/gitlab", REJECT),  # small full stop
    ("/mcp-connect/github/%E2%80%A6/gitlab", REJECT),  # horizontal ellipsis
    ("/mcp-connect/github/%E3%80%82%E3%80%82/gitlab", REJECT),  # ideographic full stop
    ("/mcp-connect/github/a%EF%BC%8Fb", REJECT),  # fullwidth solidus
    ("/mcp-connect/github/%EF%BC%8F..%EF%BC%8Fgitlab", REJECT),
    ("/mcp-connect/github/a%EF%BC%BCb", REJECT),  # fullwidth reverse solidus
    ("/mcp-connect/github/%EF%BC%85%32%66", REJECT),  # fullwidth percent
    ("/mcp-connect/%EF%BC%8E%EF%BC%8E/gitlab", REJECT),
    # Control characters, NULs and bytes that are not UTF-8.
    ("/mcp-connect/github/%00", REJECT),
    ("/mcp-connect/github/a%00.json", REJECT),
    ("/mcp-connect/github/..%00/gitlab", REJECT),
    ("/mcp-connect/github/a\x00b", REJECT),
    ("/mcp-connect/github/%7f", REJECT),
    ("/mcp-connect/github/%0d%0aHost:%20evil", REJECT),
    ("/mcp-connect/github/x\r\nHost: evil", REJECT),
    ("/mcp-connect/github/\tx", REJECT),
    ("/mcp-connect/github/a b", REJECT),
    ("/mcp-connect/github/%C2%85", REJECT),  # C1 control (NEL)
    ("/mcp-connect/github/%c0%ae%c0%ae/gitlab", REJECT),  # overlong UTF-8 dots
    ("/mcp-connect/github/%ff", REJECT),
    ("/mcp-connect/gïthub/x", REJECT),  # raw non-ASCII
    # Malformed percent escapes.
    ("/mcp-connect/github/%", REJECT),
    ("/mcp-connect/github/%2", REJECT),
    ("/mcp-connect/github/%zz", REJECT),
    ("/mcp-connect/github/%%32%65", REJECT),
    ("/mcp-connect/github/%u002e%u002e", REJECT),
    # Invalid server names.
    ("/mcp-connect/-github/x", REJECT),
    ("/mcp-connect/" + "a" * 65 + "/x", REJECT),
    ("/mcp-connect/git%20hub/x", REJECT),
    ("/mcp-connect/git%68ub/x", GITHUB),  # decoded for comparison
    # Escaping the chat prefix or the fixed routes.
    ("/api/v1/../../mcp-connect/github", REJECT),
    ("/api/v1/%2e%2e/admin", REJECT),
    ("/api/v1%2f..%2fmcp-connect/github", REJECT),
    ("/api/v1/chat/%2e%2e%2f%2e%2e/mcp-connect", REJECT),
    ("/api/me/..", REJECT),
    ("/healthz/../mcp-connect/github", REJECT),
    # Not origin-form, or too long.
    ("mcp-connect/github/x", REJECT),
    ("http://evil.example/mcp-connect/github/x", REJECT),
    ("*", REJECT),
    ("", REJECT),
    ("/mcp-connect/github/" + "a" * MAX_PATH_LENGTH, REJECT),
    # Queries and fragments never influence routing.
    ("/mcp-connect/github/x?next=../../gitlab", GITHUB),
    ("/mcp-connect/github?/../gitlab", GITHUB),
    ("/mcp-connect/github/x?a=%2f..%2f&b=\\", GITHUB),
    ("/mcp-connect/github/x#/../../gitlab", GITHUB),
    ("/mcp-connect/github#/../gitlab?x=/../gitlab", GITHUB),
    ("/mcp-connect/github/x?a=1\r\nHost: evil", REJECT),
]


def _judged(segment: str) -> str:
    return unicodedata.normalize("NFKC", unquote(segment).split(";", 1)[0]).strip()


def _assert_safe(result: Route, expected: tuple[str, str]) -> None:
    """The invariants every non-rejected hostile target must keep."""
    assert (result.kind, result.server) == expected
    path = result.upstream_path
    assert path == "" or path.startswith("/")
    assert "\\" not in path
    assert "%2f" not in path.lower() and "%5c" not in path.lower() and "%25" not in path
    for segment in path.split("/"):
        judged = _judged(segment)
        assert not (judged and set(judged) <= {"."}), path
        assert "/" not in judged and "\\" not in judged
    if result.kind == "chat":
        assert path == "/api/v1" or path.startswith("/api/v1/")


@pytest.mark.parametrize(("target", "expected"), HOSTILE)
def test_hostile_paths(target: str, expected: Expected) -> None:
    if expected is None:
        with pytest.raises(PathError):
            route(target)
        return
    _assert_safe(route(target), expected)


# Each defence layer is checked on its own, so a later layer cannot mask a regression earlier.
REASONS: list[tuple[str, str]] = [
    ("/mcp-connect/github/a%2fb", "forbidden percent escape"),
    ("/mcp-connect/github/a%5Cb", "forbidden percent escape"),
    ("/mcp-connect/github/%252e%252e", "forbidden percent escape"),
    ("/mcp-connect/github/%0a", "forbidden percent escape"),
    ("/mcp-connect/github/a\\b", "forbidden character in path"),
    ("/mcp-connect/github/a\x7fb", "forbidden character in path"),
    ("/mcp-connect/github/%2", "malformed percent escape"),
    ("/mcp-connect/github/%ff", "not valid UTF-8"),
    ("/mcp-connect/github/a%EF%BC%8Fb", "forbidden character in decoded"),
    ("/mcp-connect/github/%E3%80%82", "dot-segment"),
    ("/mcp-connect/github/..%EF%BC%9Bx", "dot-segment"),
    ("/mcp-connect/git.hub;x/y", "invalid server name"),
    ("/x" * (MAX_PATH_LENGTH // 2 + 1), "too long"),
]


@pytest.mark.parametrize(("target", "reason"), REASONS)
def test_rejection_reason(target: str, reason: str) -> None:
    with pytest.raises(PathError, match=reason):
        route(target)


POSITIVE: list[tuple[str, Route]] = [
    ("/mcp-connect/github/mcp", Route("mcp", "github", "/mcp")),
    ("/mcp-connect/github/a/b/c", Route("mcp", "github", "/a/b/c")),
    ("/mcp-connect/github", Route("mcp", "github", "")),
    ("/mcp-connect/github/", Route("mcp", "github", "/")),
    ("/mcp-connect/github//", Route("mcp", "github", "/")),
    ("/mcp-connect/github//a/b/", Route("mcp", "github", "/a/b/")),
    ("/mcp-connect/github/mcp?session=1&x=%2F", Route("mcp", "github", "/mcp", "session=1&x=%2F")),
    ("/mcp-connect/github?a=b", Route("mcp", "github", "", "a=b")),
    ("/mcp-connect/github/x?", Route("mcp", "github", "/x", "")),
    ("/mcp-connect/github/x#frag", Route("mcp", "github", "/x")),
    ("/mcp-connect/github/x#frag?a=b", Route("mcp", "github", "/x")),  # '?' inside the fragment
    ("/mcp-connect/github/a%20b", Route("mcp", "github", "/a%20b")),
    ("/mcp-connect/github/caf%C3%A9", Route("mcp", "github", "/caf%C3%A9")),
    ("/mcp-connect/github/%2e%2efoo", Route("mcp", "github", "/%2e%2efoo")),
    ("/mcp-connect/github/.well-known/x", Route("mcp", "github", "/.well-known/x")),
    ("/mcp-connect/github/a;b=c", Route("mcp", "github", "/a;b=c")),
    ("/mcp-connect/my_server.v2-b/x", Route("mcp", "my_server.v2-b", "/x")),
    ("/mcp-connect/" + "a" * 64, Route("mcp", "a" * 64, "")),
    ("/api/v1/chat/completions", Route("chat", "", "/api/v1/chat/completions")),
    ("/api/v1//chat", Route("chat", "", "/api/v1/chat")),
    ("/api/v1", Route("chat", "", "/api/v1")),
    ("/api/v1/", Route("chat", "", "/api/v1/")),
    ("/api/v1/models?limit=10", Route("chat", "", "/api/v1/models", "limit=10")),
    ("/api/me", Route("me")),
    ("/api/me?verbose=1", Route("me", query="verbose=1")),
    ("/healthz", Route("healthz")),
    ("/readyz", Route("readyz")),
    ("/", Route("unknown")),
    ("/mcp-connect", Route("unknown")),
    ("/mcp-connect/", Route("unknown")),
    ("/api/me/", Route("unknown")),
    ("/api/me/x", Route("unknown")),
    ("/healthz/", Route("unknown")),
    ("/api/v2/chat", Route("unknown")),
    ("/favicon.ico", Route("unknown")),
]


@pytest.mark.parametrize(("target", "expected"), POSITIVE)
def test_positive_paths(target: str, expected: Route) -> None:
    assert route(target) == expected


# Building blocks for an exhaustive sweep: every combination of three is appended to a
# named prefix, and the result must raise or stay within that prefix.
PIECES = [
    "..",
    ".",
    "%2e",
    "%2E%2e",
    ".%2e",
    "..;",
    ";",
    "%3b",
    "",
    "gitlab",
    "mcp-connect",
    "%EF%BC%8E",
    "%E2%80%A5",
    "%EF%BC%8F",
    "%252e",
    "%2f",
    "a%20",
]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("/mcp-connect/github/", GITHUB), ("/api/v1/", ("chat", ""))],
)
def test_sweep_stays_within_prefix(prefix: str, expected: tuple[str, str]) -> None:
    for combo in itertools.product(PIECES, repeat=3):
        target = prefix + "/".join(combo)
        try:
            result = route(target)
        except PathError:
            continue
        _assert_safe(result, expected)


def test_query_is_verbatim_and_does_not_affect_routing() -> None:
    query = "next=../../mcp-connect/gitlab&p=%2e%2e%2F&q=%zz&r=\\ä"
    assert route("/mcp-connect/github/x?" + query) == Route("mcp", "github", "/x", query)


def test_path_error_is_value_error() -> None:
    assert issubclass(PathError, ValueError)


def test_route_is_frozen() -> None:
    result = route("/healthz")
    with pytest.raises(AttributeError):
        result.kind = "mcp"  # type: ignore[misc]
