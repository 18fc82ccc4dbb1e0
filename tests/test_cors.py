"""CORS (SPEC §4): preflights answered by Keystile, headers on every answer to an allowed
origin, per-key allowed_origins, and a browser on another origin calling the gateway."""

from __future__ import annotations

import pytest

from gateway.cors import EXPOSED, CorsPolicy, is_preflight, normalise_origin


@pytest.mark.parametrize(
    ("origin", "normal"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("null", "null"),
        ("https://app.example.com/", None),
        ("https://app.example.com/path", None),
        ("https://user@app.example.com", None),
        ("ftp://app.example.com", None),
        ("app.example.com", None),
        ("https://app.example.com:99999", None),
        ("", None),
    ],
)
def test_origins_are_compared_as_browsers_send_them(origin: str, normal: str | None) -> None:
    assert normalise_origin(origin) == normal


def test_answers_to_allowed_origins_only() -> None:
    policy = CorsPolicy(["https://app.example.com", "http://127.0.0.1:3000"])
    assert policy.configured
    headers = policy.answer_headers("https://app.example.com")
    assert headers == {
        "Access-Control-Allow-Origin": "https://app.example.com",
        "Access-Control-Expose-Headers": EXPOSED,
        "Vary": "Origin",
    }
    assert "X-Request-Id" in EXPOSED and "WWW-Authenticate" in EXPOSED
    assert policy.answer_headers("https://evil.example.com") == {}
    assert policy.answer_headers("https://app.example.com.evil.example") == {}
    assert policy.answer_headers(None) == {}
    assert "Access-Control-Allow-Credentials" not in headers
    # OAuth endpoints are open to every origin, configured or not.
    assert CorsPolicy([]).answer_headers("https://x.example", open_route=True)
    assert not CorsPolicy([]).configured
    assert CorsPolicy(["*"]).allows("https://anything.example")


def test_a_preflight_is_answered_without_forwarding() -> None:
    policy = CorsPolicy(["https://app.example.com"])
    status, headers = policy.preflight(
        {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-session-id",
        }
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type, mcp-session-id"
    assert headers["Access-Control-Max-Age"] and headers["Vary"] == "Origin"
    refused, none = policy.preflight(
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert refused == 403 and not any(h.startswith("Access-Control") for h in none)
    # Requested headers that are not header names are not echoed back.
    _, odd = policy.preflight(
        {
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-ok, bad\r\nInjected: 1",
        }
    )
    assert "Access-Control-Allow-Headers" not in odd


def test_what_counts_as_a_preflight() -> None:
    assert is_preflight("OPTIONS", {"Origin": "x", "Access-Control-Request-Method": "POST"})
    assert not is_preflight("OPTIONS", {"Origin": "x"})
    assert not is_preflight("POST", {"Origin": "x", "Access-Control-Request-Method": "POST"})
