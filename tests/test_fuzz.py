"""Property tests for the pure core: key parsing, path judgement and the scope decision."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from urllib.parse import unquote

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import keys, paths, policy
from gateway.models import ApiKey, Principal, User, Workspace

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

# --- keys -------------------------------------------------------------------------------------

ids = st.text(alphabet=keys.ALPHABET, min_size=1, max_size=20)
key_like = st.builds(
    lambda prefix, parts: "-".join([prefix, *parts]),
    st.sampled_from(["ks1", "KS1", "ks2", "ks", "", "ks1 "]),
    st.lists(st.text(alphabet=keys.ALPHABET + "-_. \x00é", max_size=60), max_size=4),
)
well_shaped = st.builds(
    lambda user_id, key_id, tail: f"{keys.PREFIX}-{user_id}-{key_id}-{tail}",
    ids,
    ids,
    st.text(alphabet=keys.ALPHABET, min_size=48, max_size=50),
)
any_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=100),  # surrogates too
    st.text(alphabet=keys.ALPHABET + "-"),
    key_like,
    well_shaped,
)


@FUZZ
@given(any_text)
def test_key_parser_never_raises_and_accepts_only_checksummed_keys(text: str) -> None:
    parsed = keys.parse(text)
    if parsed is not None:
        assert parsed.full == text
        assert text.startswith(f"{keys.PREFIX}-{parsed.user_id}-{parsed.key_id}-")
        assert keys.checksum(text[: -keys.CHECKSUM_LENGTH]) == text[-keys.CHECKSUM_LENGTH :]


@FUZZ
@given(
    ids,
    ids,
    st.integers(min_value=0),
    st.one_of(st.sampled_from(keys.ALPHABET + "-_+/=. "), st.characters()),
)
def test_a_key_with_one_character_changed_is_refused(
    user_id: str, key_id: str, where: int, replacement: str
) -> None:
    original = keys.generate(user_id, key_id).full
    assert keys.parse(original) is not None
    at = where % len(original)
    mutated = original[:at] + replacement + original[at + 1 :]
    accepted = keys.parse(mutated)
    assert accepted is None or mutated == original


@FUZZ
@given(ids, ids, st.integers(min_value=0))
def test_a_key_with_two_neighbours_swapped_is_refused(user_id: str, key_id: str, at: int) -> None:
    original = keys.generate(user_id, key_id).full
    i = at % (len(original) - 1)
    swapped = original[:i] + original[i + 1] + original[i] + original[i + 2 :]
    assert keys.parse(swapped) is None or swapped == original


@FUZZ
@given(ids, ids, st.integers(min_value=1, max_value=8))
def test_a_truncated_or_extended_key_is_refused(user_id: str, key_id: str, n: int) -> None:
    original = keys.generate(user_id, key_id).full
    assert keys.parse(original[:-n]) is None
    assert keys.parse(original + keys.ALPHABET[:n]) is None


# --- paths ------------------------------------------------------------------------------------

MCP_BASE = "/mcp-connect/github/"
HOSTILE_FRAGMENTS = [
    ".",
    "..",
    "...",
    "/",
    "//",
    "%2e",
    "%2E",
    "%2e%2e",
    "%2E%2e",
    ".%2e",
    "%252e",
    "%25252e",
    "%2f",
    "%2F",
    "%252f",
    "\\",
    "%5c",
    "%5C",
    ";",
    ";x",
    ";..",
    "..;",
    ".;x",
    "%3b",
    "%E2%80%A4",  # U+2024 ONE DOT LEADER
    "%E2%80%A5",  # U+2025 TWO DOT LEADER
    "%EF%BC%8E",  # U+FF0E FULLWIDTH FULL STOP
    "%EF%BC%8F",  # U+FF0F FULLWIDTH SOLIDUS
    "%EF%BC%BC",  # U+FF3C FULLWIDTH REVERSE SOLIDUS
    "%EF%BC%85",  # U+FF05 FULLWIDTH PERCENT SIGN
    "%EF%BD%A1",  # U+FF61 HALFWIDTH IDEOGRAPHIC FULL STOP
    "%E3%80%82",  # U+3002 IDEOGRAPHIC FULL STOP
    "%EF%B9%92",  # U+FE52 SMALL FULL STOP
    "\uff0f",  # raw fullwidth solidus
    "\u2024",
    "%20",
    "%C2%A0",
    "%09",
    "%00",
    "%0a",
    "%",
    "%%",
    "%e",
    "%C0%AE",  # overlong '.'
    "gitlab",
    "mcp-connect",
    "tools",
    "tools",
    "a",
    "a",
    "/",
    "/x",
    ".x",
    "..a",
    "a..",
    "v1.2",
    "?",
    "#",
    "&",
    "=",
    "~",
]
hostile_suffix = st.lists(st.sampled_from(HOSTILE_FRAGMENTS), max_size=12).map("".join)


def judged_forms(segment: str) -> set[str]:
    """What some hop on the way could make of one path segment: decoded, NFKC-normalised,
    with whitespace trimmed and ';parameters' cut, in either order."""
    decoded = unquote(segment, errors="strict")
    forms = set()
    for text in (decoded, unicodedata.normalize("NFKC", decoded)):
        for cut in (text, text.split(";", 1)[0]):
            for form in (cut, unicodedata.normalize("NFKC", cut)):
                forms.add(form.strip())
    return forms


@FUZZ
@given(hostile_suffix)
def test_mcp_paths_stay_under_their_server(suffix: str) -> None:
    try:
        route = paths.route(MCP_BASE + suffix)
    except paths.PathError:
        return
    assert route.kind == "mcp"
    assert route.server == "github"
    upstream = route.upstream_path
    assert upstream == "" or upstream.startswith("/")
    assert "\\" not in upstream and "//" not in upstream
    for segment in upstream.split("/"):
        forms = judged_forms(segment)
        assert not forms & {".", "..", "\u3002", "\u3002\u3002"}, (suffix, segment)
        assert not any(c in form for form in forms for c in "/\\%"), (suffix, segment)
    assert "#" not in upstream and "?" not in upstream
    path, mark, query = (MCP_BASE + suffix).partition("?")
    assert route.query == ("" if "#" in path or not mark else query)


@FUZZ
@given(st.lists(st.sampled_from([*HOSTILE_FRAGMENTS, "github", "mcp-connect"]), max_size=10))
def test_no_path_reaches_a_server_it_does_not_name_first(fragments: list[str]) -> None:
    target = "/" + "".join(fragments)
    try:
        route = paths.route(target)
    except paths.PathError:
        return
    if route.kind == "mcp":
        path = target.split("?", 1)[0].split("#", 1)[0]
        segments = [s for s in path.split("/") if s]
        assert segments[0] == paths.MCP_PREFIX
        assert route.server == unquote(segments[1])


@FUZZ
@given(st.one_of(st.text(max_size=200), st.text(max_size=100).map(lambda t: "/" + t)))
@example("/oauth/revoke")
@example("/.well-known/oauth-protected-resource/mcp-connect/srv/x")
@example("/oauth/static/consent.css")
def test_arbitrary_targets_raise_nothing_but_path_error(target: str) -> None:
    try:
        route = paths.route(target)
    except paths.PathError:
        return
    assert route.kind in ("mcp", "chat", "me", "healthz", "readyz", "oauth", "unknown")
    if route.kind in ("mcp", "oauth") and route.server:
        assert paths.SERVER_NAME.fullmatch(route.server)
    if route.kind == "oauth":
        # Only the flow's own endpoints, the protected-resource document and one static file.
        assert (
            route.endpoint in paths.OAUTH_ROUTES.values()
            or route.endpoint == "protected-resource"
            or (route.endpoint.startswith("static/") and "/" not in route.endpoint[7:])
        )


# --- the scope decision -----------------------------------------------------------------------

NAMES = ["github", "gitlab", "jira", "slack", "a.b", "x-1"]
server_lists = st.one_of(
    st.just(("*",)),
    st.lists(st.sampled_from(NAMES), unique=True).map(tuple),
    st.lists(st.sampled_from(NAMES), unique=True).map(lambda names: ("*", *names)),
)


def principal(key_servers: tuple[str, ...], grants: tuple[str, ...], role: str) -> Principal:
    user = User(
        id="u1",
        workspace_id="w1",
        email="u@example.com",
        display_name="",
        role="admin" if role == "admin" else "member",
        is_active=True,
        created_at=EPOCH,
        servers=grants,
    )
    key = ApiKey(
        id="k1",
        user_id="u1",
        workspace_id="w1",
        name="k",
        description="",
        servers=key_servers,
        permissions=("mcp",),
        valid_from=None,
        expires_at=None,
        is_active=True,
        secret_prefix="abcd",
        created_at=EPOCH,
        updated_at=EPOCH,
        last_used_at=None,
        revoked_at=None,
    )
    return Principal(key, user, Workspace("w1", "default", EPOCH))


def expected_servers(
    key_servers: tuple[str, ...], grants: tuple[str, ...], role: str, configured: frozenset[str]
) -> frozenset[str]:
    """SPEC §3, written out independently: key ∩ user grants ∩ configured."""
    key_side = configured if "*" in key_servers else frozenset(key_servers)
    user_side = configured if role == "admin" or "*" in grants else frozenset(grants)
    return key_side & user_side & configured


@FUZZ
@given(
    server_lists,
    server_lists,
    st.sampled_from(["admin", "member"]),
    st.frozensets(st.sampled_from(NAMES)),
)
def test_effective_servers_is_key_and_user_and_configured(
    key_servers: tuple[str, ...], grants: tuple[str, ...], role: str, configured: frozenset[str]
) -> None:
    who = principal(key_servers, grants, role)
    effective = policy.effective_servers(who, configured)
    assert effective <= configured
    if "*" not in key_servers:
        assert effective <= set(key_servers)
    if role != "admin" and "*" not in grants:
        assert effective <= set(grants)
    assert effective == expected_servers(key_servers, grants, role, configured)
    for name in configured:
        assert policy.may_reach(who, name, configured) == (name in effective), name
    for name in [*NAMES, "*", "", "GitHub", "github ", "unknown"]:
        if name not in configured:
            assert not policy.may_reach(who, name, configured), name
