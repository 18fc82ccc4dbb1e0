"""The pure parts of tool policies: patterns, the JSON-RPC inspector and the tools/list filter,
table-driven and with hypothesis (no input crashes them; a denied tool never passes)."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.calls import Exchange
from gateway.mcp import inspect as inspector
from gateway.mcp.guard import ServerGuard
from gateway.mcp.inspect import InspectError, inspect
from gateway.mcp.listing import JsonListFilter, SseListFilter, filter_message
from gateway.mcp.patterns import (
    PatternError,
    check_patterns,
    compile_rule,
    covers,
    effective_patterns,
    policy_for,
)
from gateway.narrowing import tools_within
from gateway.transform import StreamRefused

SERVERS = frozenset({"github", "gitlab", "docs"})


# --- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "allowed", "denied"),
    [
        (["github/*"], ["github/search", "github/a/b"], ["gitlab/search"]),
        (
            ["github/*", "!github/delete_*"],
            ["github/search", "github/deletex"],
            ["github/delete_repo", "gitlab/x"],
        ),
        (["!github/delete_*"], ["github/search", "gitlab/delete_x"], ["github/delete_repo"]),
        (["*/search"], ["github/search", "docs/search"], ["github/searches"]),
        (["github/search_*", "gitlab/*"], ["github/search_code", "gitlab/x"], ["github/get"]),
        (["*"], ["github/x", "anything"], []),
        (["github/get.file"], ["github/get.file"], ["github/getXfile"]),  # "." is literal
        (["github/a*b*c"], ["github/abc", "github/aXbYc"], ["github/acb"]),
        ([], [], ["github/x"]),  # an empty list allows nothing
    ],
)
def test_rules(patterns: list[str], allowed: list[str], denied: list[str]) -> None:
    rule = compile_rule(tuple(patterns))
    for name in allowed:
        assert rule.allows(name), name
    for name in denied:
        assert not rule.allows(name), name


def test_a_tool_needs_its_server_in_scope_and_both_lists() -> None:
    policy = policy_for(("github/*",), ("!github/delete_*",), frozenset({"github"}))
    assert policy is not None
    assert policy.allows("github", "search")
    assert not policy.allows("github", "delete_repo")  # the user's list denies it
    assert not policy.allows("gitlab", "search")  # not in the key's effective servers
    assert policy_for(None, None, SERVERS) is None


@pytest.mark.parametrize(
    "bad",
    [
        "github",
        "/search",
        "github/",
        "!",
        "",
        "nope/search",  # an unknown server
        "github/has space",
        "github/\u0000",
        "github/ｓearch",  # fullwidth: not in normal form
        "git hub*/x",
        42,
        None,
    ],
)
def test_bad_patterns_are_refused(bad: Any) -> None:
    with pytest.raises(PatternError):
        check_patterns([bad], SERVERS)


def test_patterns_are_kept_in_order_without_duplicates() -> None:
    assert check_patterns(["github/*", "!github/x", "github/*"], SERVERS) == (
        "github/*",
        "!github/x",
    )
    assert check_patterns(None, SERVERS) is None
    assert check_patterns(["git*/x", "*/y"], SERVERS) == ("git*/x", "*/y")
    with pytest.raises(PatternError):
        check_patterns("github/*", SERVERS)


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("github/*", "github/search_*", True),
        ("github/search_*", "github/*", False),
        ("github/*", "github/x", True),
        ("*", "anything*", True),
        ("a*c", "abc", True),
        ("a*c", "a*c", True),
        ("a*c", "a*", False),
        ("abc", "a*c", False),
        ("*b*", "a*b*c", True),
    ],
)
def test_covers(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected


def test_effective_patterns_meet_key_and_user() -> None:
    servers = frozenset({"github", "gitlab"})
    assert effective_patterns(None, None, servers) is None
    assert effective_patterns(("github/search_*",), None, servers) == ["github/search_*"]
    assert effective_patterns(("github/*",), ("github/search_*", "gitlab/x"), servers) == [
        "github/search_*"
    ]
    assert effective_patterns(("github/*",), ("*/search",), servers) == ["github/search"]
    assert effective_patterns(("github/*",), (), servers) == []
    assert effective_patterns(("!github/delete_*",), None, servers) == [
        "github/*",
        "gitlab/*",
        "!github/delete_*",
    ]


@pytest.mark.parametrize(
    ("proposed", "bound", "expected"),
    [
        (None, None, True),
        (["github/x"], None, True),
        (None, ["github/*"], False),
        (["github/*"], ["github/*"], True),
        (["github/search"], ["github/*"], True),
        (["github/sea*"], ["github/*"], False),  # sound, not complete: only plain names
        (["gitlab/x"], ["github/*"], False),
        (["github/x", "!github/d"], ["github/*", "!github/d"], True),
        (["github/x"], ["github/*", "!github/d"], False),  # the exclusion dropped
        (["github/x", "!github/d"], ["!github/d"], True),
        (["!github/d"], ["!github/d"], True),
        (["!github/d"], ["github/*"], False),
        ([], [], True),
        (["github/x"], [], False),
        (["!github/x"], [], False),
        ([], ["github/*"], True),
    ],
)
def test_tools_within(proposed: list[str] | None, bound: list[str] | None, expected: bool) -> None:
    assert tools_within(proposed, bound) is expected


name_text = st.text(alphabet="abgithu_*/!-.", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(name_text, max_size=5), st.text(alphabet="abgithu_/-.x", max_size=14))
def test_the_matcher_agrees_with_a_reference_and_never_crashes(
    patterns: list[str], name: str
) -> None:
    rule = compile_rule(tuple(patterns))
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]

    def matches(pattern: str) -> bool:
        return (
            re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), name, re.S)
            is not None
        )

    opened = not include and bool(exclude)
    expected = (opened or any(map(matches, include))) and not any(map(matches, exclude))
    assert rule.allows(name) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab*", max_size=6),
    st.text(alphabet="ab*", max_size=6),
    st.text(alphabet="ab", max_size=6),
)
def test_covers_is_sound(outer: str, inner: str, name: str) -> None:
    if covers(outer, inner) and compile_rule((inner,)).allows(name):
        assert compile_rule((outer,)).allows(name)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.lists(name_text, max_size=4)),
    st.one_of(st.none(), st.lists(name_text, max_size=4)),
    st.text(alphabet="abgithu_/-.x", max_size=14),
)
def test_tools_within_is_sound(
    proposed: list[str] | None, bound: list[str] | None, name: str
) -> None:
    if not tools_within(proposed, bound):
        return

    def allowed_by(patterns: list[str] | None) -> bool:
        return patterns is None or compile_rule(tuple(patterns)).allows(name)

    if allowed_by(proposed):
        assert allowed_by(bound)


# --- the inspector ---------------------------------------------------------------------------

LIMIT = 1024 * 1024


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def call(name: Any, ident: Any = 1, **extra: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": ident,
        "method": "tools/call",
        "params": {"name": name},
        **extra,
    }


def test_a_tool_call_is_named() -> None:
    inspection = inspect(body(call("search")), limit=LIMIT)
    assert not inspection.batch
    [message] = inspection.tool_calls()
    assert (message.kind, message.id, message.name) == ("request", 1, "search")


def test_other_messages_pass_and_are_named() -> None:
    messages = [
        {"jsonrpc": "2.0", "id": "a", "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 7, "result": {}},  # a client's answer to a server's request
        {"jsonrpc": "2.0", "id": 8, "error": {"code": 1, "message": "no"}},
        {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "file:///x"}},
    ]
    inspection = inspect(body(messages), limit=LIMIT)
    assert inspection.batch and not inspection.tool_calls()
    assert [m.kind for m in inspection.messages] == [
        "request",
        "notification",
        "response",
        "response",
        "request",
    ]
    assert inspection.messages[-1].name == "file:///x"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xef\xbb\xbf" + body(call("x")),  # a byte order mark
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call",'
        b' "params": {"name": "a", "name": "b"}}',
        b'{"jsonrpc": "2.0", "jsonrpc": "2.0", "id": 1, "method": "ping"}',
        b'{"jsonrpc": "2.0", "id": NaN, "method": "ping"}',
        b"\xff\xfe",
        b"[]",
        b"42",
        b"[1]",
        b"[" * 100_000 + b"]" * 100_000,
        body({"jsonrpc": "1.0", "id": 1, "method": "ping"}),
        body({"id": 1, "method": "ping"}),
        body({"jsonrpc": "2.0", "id": None, "method": "ping"}),
        body({"jsonrpc": "2.0", "id": True, "method": "ping"}),
        body({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}),
        body({"jsonrpc": "2.0", "id": 1, "method": ""}),
        body({"jsonrpc": "2.0", "id": 1, "method": 5}),
        body({"jsonrpc": "2.0", "id": 1, "method": "x", "params": "s"}),
        body({"jsonrpc": "2.0", "id": 1}),
        body({"jsonrpc": "2.0", "id": 1, "result": 1, "error": {}}),
        body({"jsonrpc": "2.0", "result": 1}),
        body(call(5)),
        body(call(None)),
        body(call("")),
        body(call("x" * 300)),
        body(call("ｄelete_repo")),  # a fullwidth look-alike
        body(call("delete\u200brepo")),  # a zero-width space
        body(call("delete\nrepo")),
        body({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}}),  # no id
        body({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["x"]}),
        body({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}),
    ],
)
def test_what_cannot_be_read_one_way_only_is_refused(raw: bytes) -> None:
    with pytest.raises(InspectError) as error:
        inspect(raw, limit=LIMIT)
    assert (error.value.status, error.value.code) == (400, "invalid_jsonrpc")


def test_size_is_checked_first() -> None:
    with pytest.raises(InspectError) as error:
        inspect(b"x" * 2000, limit=1024)
    assert (error.value.status, error.value.code) == (413, "body_too_large")


@pytest.mark.parametrize(
    ("raw", "method", "name", "ok"),
    [
        (body(call("search")), ["tools/call"], ["search"], True),
        (body(call("search")), ["tools/call"], [], True),
        (body(call("search")), [], ["search"], True),
        (body(call("search")), ["tools/list"], [], False),
        (body(call("search")), ["tools/call"], ["delete"], False),
        (body(call("search")), ["tools/call", "tools/call"], [], False),
        (body([call("search")]), ["tools/call"], [], False),  # headers describe one message
        (body({"jsonrpc": "2.0", "id": 1, "result": {}}), ["tools/call"], [], False),
        (body({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}), [], ["x"], False),
    ],
)
def test_headers_must_agree_with_the_body(
    raw: bytes, method: list[str], name: list[str], ok: bool
) -> None:
    if ok:
        inspect(raw, limit=LIMIT, mcp_method=method, mcp_name=name)
        return
    with pytest.raises(InspectError) as error:
        inspect(raw, limit=LIMIT, mcp_method=method, mcp_name=name)
    assert (error.value.status, error.value.code) == (400, "header_mismatch")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["jsonrpc", "id", "method", "params", "name", "result"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=64), json_values.map(body)))
def test_no_input_crashes_the_inspector(raw: bytes) -> None:
    with contextlib.suppress(InspectError):
        inspect(raw, limit=LIMIT)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "jsonrpc": st.just("2.0"),
                "id": st.integers(0, 9),
                "method": st.sampled_from(["tools/call", "tools/list", "ping"]),
                "params": st.fixed_dictionaries(
                    {"name": st.sampled_from(["search", "delete_repo"])}
                ),
            }
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_a_denied_tool_is_always_seen(messages: list[dict[str, Any]], batch: bool) -> None:
    raw = body(messages if batch else messages[0])
    seen = inspect(raw, limit=LIMIT)
    named = {m.name for m in seen.tool_calls()}
    sent = {
        m["params"]["name"]
        for m in (messages if batch else messages[:1])
        if m["method"] == "tools/call"
    }
    assert named == sent


# --- the tools/list filter ---------------------------------------------------------------------


def allows(name: str) -> bool:
    return not name.startswith("delete")


def listing(ident: int = 1, cursor: str | None = "next") -> dict[str, Any]:
    result: dict[str, Any] = {
        "tools": [{"name": "search", "inputSchema": {}}, {"name": "delete_repo"}, {"no": "name"}]
    }
    if cursor is not None:
        result["nextCursor"] = cursor
    return {"jsonrpc": "2.0", "id": ident, "result": result}


def test_a_tool_list_keeps_only_allowed_tools_and_everything_else() -> None:
    message = listing()
    assert filter_message(message, allows)
    assert message["result"] == {
        "tools": [{"name": "search", "inputSchema": {}}],
        "nextCursor": "next",
    }
    untouched = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    assert not filter_message(untouched, allows)
    request = {"jsonrpc": "2.0", "id": 1, "method": "x", "result": {"tools": [{"name": "delete"}]}}
    assert not filter_message(request, allows)  # requests are not answers


def test_json_bodies_are_filtered_whole() -> None:
    filt = JsonListFilter(allows)
    raw = body([listing(1), listing(2, None)])
    out = b"".join(filt.feed(raw[i : i + 10]) for i in range(0, len(raw), 10)) + filt.flush()
    decoded = json.loads(out)
    assert [m["result"]["tools"] for m in decoded] == [[{"name": "search", "inputSchema": {}}]] * 2
    plain = JsonListFilter(allows)
    assert plain.feed(b'{"a": 1}') == b"" and plain.flush() == b'{"a": 1}'


def test_sse_events_are_filtered_one_at_a_time() -> None:
    filt = SseListFilter(allows)
    first = b"event: message\r\nid: 1\r\ndata: " + body(listing()) + b"\r\n\r\n"
    other = b'data: {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}\n\n'
    stream = other + first + b": comment\n\n"
    out = b""
    for i in range(0, len(stream), 13):
        out += filt.feed(stream[i : i + 13])
    out += filt.flush()
    events = out.split(b"\n\n")
    assert events[0] == other[:-2]
    assert b"delete_repo" not in out
    assert b"event: message\r\nid: 1\r\ndata: " in out
    data = out.split(b"data: ", 2)[2].split(b"\r\n")[0]
    assert json.loads(data)["result"]["tools"] == [{"name": "search", "inputSchema": {}}]
    assert out.endswith(b": comment\n\n")


def test_multi_line_data_is_joined_before_filtering() -> None:
    text = json.dumps(listing(), indent=1).encode().split(b"\n")
    event = b"".join(b"data: " + line + b"\n" for line in text) + b"\n"
    out = SseListFilter(allows).feed(event)
    assert b"delete_repo" not in out
    assert out.count(b"data:") == 1


def test_an_event_too_large_to_hold_refuses_the_stream() -> None:
    with pytest.raises(StreamRefused):
        SseListFilter(allows, max_held=100).feed(b"data: " + b"x" * 200)
    with pytest.raises(StreamRefused):
        JsonListFilter(allows, max_held=100).feed(b"x" * 200)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_no_stream_crashes_the_sse_filter(raw: bytes, step: int) -> None:
    filt = SseListFilter(allows)
    for i in range(0, len(raw), step):
        filt.feed(raw[i : i + step])
    filt.flush()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["search", "delete_repo", "delete_x", "get"]), max_size=6),
    st.integers(1, 40),
)
def test_a_denied_tool_never_leaves_the_sse_filter(names: list[str], step: int) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": n} for n in names]}}
    stream = b"data: " + body(message) + b"\n\n"
    filt = SseListFilter(allows)
    out = b"".join(filt.feed(stream[i : i + step]) for i in range(0, len(stream), step))
    out += filt.flush()
    assert b"delete" not in out


def test_a_list_with_a_huge_integer_is_still_filtered() -> None:
    raw = (
        b'{"jsonrpc": "2.0", "id": 123456789012345678901234567890, "result": '
        b'{"tools": [{"name": "search"}, {"name": "delete_repo"}]}}'
    )
    out = JsonListFilter(allows)
    filtered = out.feed(raw) + out.flush()
    assert b"delete_repo" not in filtered and b"search" in filtered


# The inspector reads a body with orjson when the body is exactly what orjson writes for what it
# read (so no key can be repeated: orjson would drop one silently); any other body goes to the
# standard library's strict decoder. Both readings must agree on every document.
key_text = st.text(alphabet='ab":\\\u00e9 ', max_size=3)
json_text = st.recursive(
    st.sampled_from(
        ["1", "-2.5e3", "1.5", "null", "true", '"x"', '":"', '"\\"a"', "18446744073709551616"]
    ),
    lambda children: (
        st.lists(children, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(
            st.tuples(
                key_text.map(json.dumps) | st.just('"\\u0061"'),
                st.sampled_from(["", " ", "\n\t"]),
                children,
            ),
            max_size=4,
        ).map(lambda pairs: "{" + ",".join(f"{k}{ws}:{ws}{v}" for k, ws, v in pairs) + "}")
    ),
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(json_text)
def test_the_fast_reading_agrees_with_the_strict_one(text: str) -> None:
    raw = text.encode()

    def reading(decode: Any) -> tuple[str, Any]:
        try:
            return "ok", decode(raw)
        except InspectError as exc:
            return "refused", exc.code

    assert reading(inspector._decode) == reading(inspector._decode_strictly)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "\\u0061": 2}',  # the same key, spelt two ways
        b'{"x": {"k": 1, "k" : 2}}',  # repeated deeper down
        b'[{"a": 1}, {"b": {"c": [1, {"d": 1, "d": 1}]}}]',
        b'{"s": "\\"k\\": 1", "k": 1, "k": 2}',  # a quoted colon inside a string value
        b'{"a":1,"a":2}',  # compact: what orjson alone would read as {"a": 2}
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}',
    ],
)
def test_a_repeated_key_anywhere_is_refused(raw: bytes) -> None:
    with pytest.raises(InspectError) as error:
        inspector._decode(raw)
    assert "repeated key" in error.value.message


def _guard() -> ServerGuard:
    policy = policy_for(("s/search",), None, frozenset({"s"}))
    assert policy is not None
    return ServerGuard(policy, "s", LIMIT)


STREAMABLE = CIMultiDictProxy(CIMultiDict({"Accept": "application/json, text/event-stream"}))


def test_a_body_names_its_call_for_the_record_as_it_is_checked() -> None:
    guard = _guard()
    allowed, denied = Exchange("r1", 0.0), Exchange("r2", 0.0)
    assert guard.check(allowed, STREAMABLE, body(call("search"))) is None
    assert (allowed.named, allowed.mcp_method, allowed.tool) == (True, "tools/call", "search")
    assert guard.check(denied, STREAMABLE, body(call("delete_repo"))) is not None
    assert (denied.mcp_method, denied.tool) == ("tools/call", "delete_repo")


@pytest.mark.parametrize(
    ("sent", "filtered"),
    [
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, True),
        ([call("search"), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}], True),
        (call("search"), False),
        ({"jsonrpc": "2.0", "method": "notifications/initialized"}, False),
    ],
)
def test_a_posts_answer_is_filtered_when_the_post_asked_for_tools(
    sent: Any, filtered: bool
) -> None:
    guard, seen = _guard(), Exchange("r", 0.0)
    assert guard.check(seen, STREAMABLE, body(sent)) is None
    json_answer = CIMultiDict({"Content-Type": "application/json"})
    answer_filter = guard.answers_to_post(seen, 200, json_answer)
    assert (answer_filter is not None) == filtered
    # A GET's stream is always filtered: the server sends what it likes there.
    sse = CIMultiDict({"Content-Type": "text/event-stream"})
    assert guard.answers(200, sse) is not None
