"""The legacy SSE transport's endpoint event, rewritten to a path through the gateway, and
refused whenever it would send the client anywhere else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import paths
from gateway.sse import EndpointRefused, EndpointRewriter, EndpointTarget

PREFIX = "/mcp-connect/legacy"


def rewriter(server_url: str = "http://127.0.0.1:9001", stream: str = "/sse") -> EndpointRewriter:
    base = server_url.rstrip("/")
    return EndpointRewriter(EndpointTarget(server_url, "legacy", base + stream))


@pytest.mark.parametrize(
    ("server_url", "endpoint", "expected"),
    [
        (
            "http://127.0.0.1:9001",
            "/messages/?session_id=abc",
            f"{PREFIX}/messages/?session_id=abc",
        ),
        (
            "http://127.0.0.1:9001/",
            "/messages/?session_id=abc",
            f"{PREFIX}/messages/?session_id=abc",
        ),
        ("http://127.0.0.1:9001/mcp", "/mcp/messages?sid=1", f"{PREFIX}/messages?sid=1"),
        ("http://127.0.0.1:9001/mcp", "/mcp", PREFIX),
        (
            "http://127.0.0.1:9001",
            "http://127.0.0.1:9001/messages/?session_id=x",
            f"{PREFIX}/messages/?session_id=x",
        ),
        # Resolved as the client would: relative to the stream, dot segments removed.
        ("http://127.0.0.1:9001", "messages?x=1", f"{PREFIX}/messages?x=1"),
        ("http://127.0.0.1:9001/mcp", "messages?x=1", f"{PREFIX}/messages?x=1"),
        ("http://127.0.0.1:9001/mcp", "/mcp/a/../messages", f"{PREFIX}/messages"),
        ("http://127.0.0.1:9001/mcp", "./messages", f"{PREFIX}/messages"),
        # The same origin in other spellings is still the same origin.
        ("http://127.0.0.1:9001", "HTTP://127.0.0.1:9001/m", f"{PREFIX}/m"),
        ("http://example.test", "http://EXAMPLE.test:80/m", f"{PREFIX}/m"),
        ("http://127.0.0.1:9001", "//127.0.0.1:9001/m", f"{PREFIX}/m"),
    ],
)
def test_endpoints_on_the_server_map_under_its_gateway_path(
    server_url: str, endpoint: str, expected: str
) -> None:
    assert rewriter(server_url).gateway_path(endpoint) == expected


@pytest.mark.parametrize(
    ("server_url", "endpoint"),
    [
        ("http://127.0.0.1:9001", "http://evil.example/m"),  # another origin
        ("http://127.0.0.1:9001", "//evil.example/m"),  # protocol-relative
        ("http://127.0.0.1:9001", "HTTP://evil.example/m"),  # upper-case scheme
        ("http://127.0.0.1:9001", "https://127.0.0.1:9001/m"),  # another scheme
        ("http://127.0.0.1:9001", "http://127.0.0.1:9002/m"),  # another port
        ("http://127.0.0.1:9001", "http://user:pw@127.0.0.1:9001/m"),  # user-info
        ("http://127.0.0.1:9001", "http://user@127.0.0.1:9001/m"),
        ("http://127.0.0.1:9001", "javascript:alert(1)"),
        ("http://127.0.0.1:9001", "http:/\\evil.example/m"),
        ("http://127.0.0.1:9001", "/m\r\nX: y"),
        ("http://127.0.0.1:9001", " /m"),
        ("http://127.0.0.1:9001", ""),
        ("http://127.0.0.1:9001/mcp", "/mcpx/messages"),  # outside the server's url path
        ("http://127.0.0.1:9001/mcp", "/other"),
        ("http://127.0.0.1:9001/mcp", "/mcp/../other"),  # dot segments out of it
        ("http://127.0.0.1:9001/mcp", "../other/m"),
        ("http://127.0.0.1:9001/mcp", "/mcp/%2e%2e/other"),  # encoded dots
        ("http://127.0.0.1:9001/mcp", "/mcp/a%2fb"),  # an encoded slash
        ("http://127.0.0.1:9001", "http://127.0.0.1:bad/m"),
    ],
)
def test_endpoints_anywhere_else_refuse_the_stream(server_url: str, endpoint: str) -> None:
    with pytest.raises(EndpointRefused):
        rewriter(server_url).gateway_path(endpoint)


def test_endpoint_event_is_rewritten_and_the_rest_passes() -> None:
    r = rewriter()
    stream = (
        b": ping\n\n"
        b"event: endpoint\r\ndata: /messages/?session_id=42\r\n\r\n"
        b'event: message\ndata: {"x": "/messages/", "y": "endpoint"}\n\n'
    )
    out = b"".join(r.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    out += r.flush()
    assert out == (
        b": ping\n\n"
        b"event: endpoint\r\ndata: /mcp-connect/legacy/messages/?session_id=42\r\n\r\n"
        b'event: message\ndata: {"x": "/messages/", "y": "endpoint"}\n\n'
    )
    assert r.done


def test_events_are_released_as_soon_as_complete() -> None:
    r = rewriter()
    assert r.feed(b"event: endpoint\ndata: /m") == b""  # incomplete: held
    assert r.feed(b"\n\n") == b"event: endpoint\ndata: /mcp-connect/legacy/m\n\n"
    assert r.feed(b"data: later\n") == b"data: later\n"  # after it: untouched


def test_an_endpoint_event_with_two_data_lines_is_refused() -> None:
    with pytest.raises(EndpointRefused):
        rewriter().feed(b"event: endpoint\ndata: /m\ndata: //evil.example/x\n\n")


@pytest.mark.parametrize("split", [1, 5, 9, 12, 20])
def test_a_second_endpoint_event_refuses_the_stream_before_it_ends(split: int) -> None:
    r = rewriter()
    r.feed(b"event: endpoint\ndata: /m\n\n")
    later = b"data: ok\n\nevent: endpoint\ndata: //evil.example/x\n\n"
    sent = r.feed(later[:split])
    with pytest.raises(EndpointRefused):
        sent += r.feed(later[split:])
    assert b"evil" not in sent or not sent.endswith(b"\n\n")  # never a complete event


def test_a_stream_without_endpoint_event_stops_being_rewritten_but_stays_guarded() -> None:
    r = rewriter()
    big = b"data: " + b"x" * 70_000 + b"\n\n"
    assert r.feed(big) == big
    assert r.done
    assert r.feed(b"data: endpoint is a word\n\n") == b"data: endpoint is a word\n\n"
    with pytest.raises(EndpointRefused):
        r.feed(b"event: endpoint\ndata: /m\n\n")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_whatever_the_upstream_says_the_client_stays_under_the_servers_path(endpoint: str) -> None:
    try:
        target = rewriter("http://127.0.0.1:9001/mcp").gateway_path(endpoint)
    except EndpointRefused:
        return
    assert target == PREFIX or target.startswith(PREFIX + "/") or target.startswith(PREFIX + "?")
    route = paths.route(target)
    assert route.kind == "mcp" and route.server == "legacy"
