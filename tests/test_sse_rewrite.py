"""The legacy SSE transport's endpoint event, rewritten to a path through the gateway."""

from __future__ import annotations

import pytest

from gateway.sse import EndpointRewriter

PREFIX = "/mcp-connect/legacy"


@pytest.mark.parametrize(
    ("upstream_url", "endpoint", "expected"),
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
        # Not ours to map: another origin, or outside the server's url path, or relative.
        ("http://127.0.0.1:9001", "http://evil.example/m", "http://evil.example/m"),
        ("http://127.0.0.1:9001/mcp", "/mcpx/messages", "/mcpx/messages"),
        ("http://127.0.0.1:9001/mcp", "/other", "/other"),
        ("http://127.0.0.1:9001", "messages?x=1", "messages?x=1"),
    ],
)
def test_gateway_path_mapping(upstream_url: str, endpoint: str, expected: str) -> None:
    assert EndpointRewriter(upstream_url, PREFIX).gateway_path(endpoint) == expected


def test_endpoint_event_is_rewritten_and_the_rest_passes() -> None:
    rewriter = EndpointRewriter("http://127.0.0.1:9001", PREFIX)
    stream = (
        b": ping\n\n"
        b"event: endpoint\r\ndata: /messages/?session_id=42\r\n\r\n"
        b'event: message\ndata: {"x": "/messages/"}\n\n'
    )
    out = b"".join(rewriter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    out += rewriter.flush()
    assert out == (
        b": ping\n\n"
        b"event: endpoint\r\ndata: /mcp-connect/legacy/messages/?session_id=42\r\n\r\n"
        b'event: message\ndata: {"x": "/messages/"}\n\n'
    )
    assert rewriter.done


def test_events_are_released_as_soon_as_complete() -> None:
    rewriter = EndpointRewriter("http://127.0.0.1:9001", PREFIX)
    assert rewriter.feed(b"event: endpoint\ndata: /m") == b""  # incomplete: held
    assert rewriter.feed(b"\n\n") == b"event: endpoint\ndata: /mcp-connect/legacy/m\n\n"
    assert rewriter.feed(b"data: later\n") == b"data: later\n"  # after it: untouched


def test_a_stream_without_endpoint_event_stops_being_inspected() -> None:
    rewriter = EndpointRewriter("http://127.0.0.1:9001", PREFIX)
    big = b"data: " + b"x" * 70_000 + b"\n\n"
    assert rewriter.feed(big) == big
    assert rewriter.done
    assert rewriter.feed(b"event: endpoint\ndata: /m\n\n") == b"event: endpoint\ndata: /m\n\n"
