"""Hostile clients: failed-auth throttling, per-key rate limits and IP allow-lists, and raw HTTP
that tries to smuggle, inject, exhaust or stall. Every attack gets a clear 4xx or a closed
connection, nothing it should not reach gets to the upstream, and the gateway stays healthy."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gateway import keys
from gateway.keyring import IssuedKey
from tests.support import LOOPBACK, Keystile, Upstream, make_settings, start_keystile

LOCALHOST_PROXY = (ipaddress.ip_network("127.0.0.1/32"),)
ADMIN_PERMISSIONS = ["admin", "keys", "mcp", "chat"]


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Reply:
    """What came back on a raw connection: a status, or None if the server just closed it."""

    status: int | None
    headers: dict[str, str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader, deadline: float = 10.0) -> Reply:
    """One HTTP response from `reader`, or Reply(None) if the connection ends first."""
    async with asyncio.timeout(deadline):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return Reply(None, {}, b"")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        try:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            body = getattr(exc, "partial", b"")
        return Reply(status, headers, body)


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(port: int, data: bytes) -> Reply:
    """Send raw bytes on a fresh connection and read the answer."""
    async with connection(port) as (reader, writer):
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return await read_reply(reader)


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def me(ks: Keystile, key: str | None, client: str | None = None) -> int:
    """The status of GET /api/me with `key`, as seen from `client` (an X-Forwarded-For)."""
    headers = forwarded(client) if client else None
    return (await ks.request("GET", "/api/me", key, headers=headers))[0]


def wrong_secret(issued: IssuedKey) -> str:
    """A well-formed key with a valid checksum for a real key id, but the wrong secret."""
    return keys.generate(issued.record.user_id, issued.record.id).full


def malformed() -> str:
    return "ks1-" + keys.random_string(30)


async def admin_key(ks: Keystile) -> str:
    admin = await ks.user("admin@example.com", role="admin", servers=["*"])
    issued = await ks.runtime.keyring.create_key(
        ks.actor, user_id=admin.id, name="admin", permissions=ADMIN_PERMISSIONS
    )
    return issued.key


async def admin_call(
    ks: Keystile, method: str, path: str, key: str, **kwargs: Any
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    async with ks.http.request(method, ks.admin + path, headers=headers, **kwargs) as resp:
        body = await resp.json(content_type=None) if await resp.read() else None
        return resp.status, dict(resp.headers), body


async def member_key(ks: Keystile, **fields: Any) -> IssuedKey:
    """A member's key with all servers, created through the key store with extra fields."""
    user = await ks.user(f"m{keys.new_id()}@example.com", servers=["*"])
    return await ks.runtime.keyring.create_key(
        ks.actor, user_id=user.id, name="k", permissions=["mcp", "chat"], **fields
    )


async def assert_healthy(ks: Keystile) -> None:
    """A normal authenticated request still works end to end."""
    issued = await member_key(ks)
    status, _, body = await ks.request("GET", "/mcp-connect/github/after", issued.key)
    assert status == 200, body
    assert body["path"] == "/github/mcp/after"


# --- 1. failed-authentication throttling ------------------------------------------------------

THROTTLE = {"failures_per_client": 5, "failures_per_key": 3, "window_seconds": 60}


@pytest.fixture
async def throttled(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    """Small failure budgets; X-Forwarded-For from 127.0.0.1 names distinct clients."""
    settings = make_settings(
        upstream, gateway={"trusted_proxies": LOCALHOST_PROXY}, throttle=THROTTLE
    )
    async with start_keystile(settings, database_url) as ks:
        yield ks


async def test_bad_keys_from_one_client_get_429_with_retry_after(throttled: Keystile) -> None:
    attacker = forwarded("203.0.113.5")
    for _ in range(THROTTLE["failures_per_client"]):
        status, _, _ = await throttled.request("GET", "/api/me", malformed(), headers=attacker)
        assert status == 401
    status, headers, body = await throttled.request("GET", "/api/me", malformed(), headers=attacker)
    assert status == 429
    assert body["error"] == "too_many_attempts"
    assert 1 <= int(headers["Retry-After"]) <= THROTTLE["window_seconds"]
    assert throttled.runtime.metrics.count("argon2_verifications") == 0


async def test_missing_credentials_count_as_failures(throttled: Keystile) -> None:
    statuses = [await me(throttled, None, "203.0.113.6") for _ in range(8)]
    assert statuses == [401] * 5 + [429] * 3


async def test_wrong_secrets_for_one_key_id_get_429_after_failures_per_key(
    throttled: Keystile,
) -> None:
    victim = await member_key(throttled)
    statuses = [await me(throttled, wrong_secret(victim), "203.0.113.7") for _ in range(4)]
    # 3 failures keep the client itself under its budget of 5: the key id's budget refused it.
    assert statuses == [401, 401, 401, 429]
    assert throttled.runtime.metrics.count("argon2_verifications") == THROTTLE["failures_per_key"]


async def test_cached_valid_key_from_a_blocked_client_still_gets_200(throttled: Keystile) -> None:
    issued = await member_key(throttled)
    assert await me(throttled, issued.key, "203.0.113.8") == 200  # now cached
    for _ in range(THROTTLE["failures_per_client"] + 2):
        await me(throttled, malformed(), "203.0.113.8")
    assert await me(throttled, malformed(), "203.0.113.8") == 429
    status, _, body = await throttled.request(
        "GET", "/api/me", issued.key, headers=forwarded("203.0.113.8")
    )
    assert status == 200
    assert body["key"]["id"] == issued.record.id


async def test_valid_key_of_another_client_is_not_slowed(throttled: Keystile) -> None:
    for _ in range(THROTTLE["failures_per_client"] + 2):
        await me(throttled, malformed(), "203.0.113.9")
    assert await me(throttled, malformed(), "203.0.113.9") == 429
    issued = await member_key(throttled)  # never used: not cached, needs store and argon2
    status, _, _ = await throttled.request(
        "GET", "/mcp-connect/github/x", issued.key, headers=forwarded("198.51.100.20")
    )
    assert status == 200


async def test_owner_of_an_attacked_key_id_still_verifies_from_a_clean_address(
    throttled: Keystile,
) -> None:
    victim = await member_key(throttled)
    for _ in range(THROTTLE["failures_per_key"]):
        await me(throttled, wrong_secret(victim), "203.0.113.10")
    assert await me(throttled, wrong_secret(victim), "203.0.113.10") == 429
    status, _, body = await throttled.request(
        "GET", "/api/me", victim.key, headers=forwarded("198.51.100.21")
    )
    assert status == 200
    assert body["key"]["id"] == victim.record.id


async def test_argon2_work_stays_bounded_over_200_bad_requests(throttled: Keystile) -> None:
    victim = await member_key(throttled)
    metrics = throttled.runtime.metrics
    statuses = [await me(throttled, malformed(), f"10.0.0.{n}") for n in range(100)]
    assert set(statuses) == {401}  # one failure per address: nobody is over budget
    assert metrics.count("argon2_verifications") == 0  # malformed keys cost no argon2 at all
    statuses = [await me(throttled, wrong_secret(victim), "203.0.113.11") for _ in range(100)]
    assert statuses.count(401) == THROTTLE["failures_per_key"]
    assert metrics.count("argon2_verifications") <= THROTTLE["failures_per_key"]


async def test_a_repeated_wrong_key_is_verified_once_across_clients(throttled: Keystile) -> None:
    victim = await member_key(throttled)
    forged = wrong_secret(victim)
    statuses = {await me(throttled, forged, f"10.1.0.{n}") for n in range(50)}
    assert statuses == {401}  # every address is new, so each gets its answer...
    assert (
        throttled.runtime.metrics.count("argon2_verifications") == 1
    )  # the negative cache remembers


async def test_concurrent_burst_of_wrong_secrets_is_bounded_too(throttled: Keystile) -> None:
    victim = await member_key(throttled)
    attacker = forwarded("203.0.113.12")
    replies = await asyncio.gather(
        *(
            throttled.request("GET", "/api/me", wrong_secret(victim), headers=attacker)
            for _ in range(60)
        )
    )
    assert {status for status, _, _ in replies} <= {401, 429}
    assert (
        throttled.runtime.metrics.count("argon2_verifications") <= THROTTLE["failures_per_key"] + 2
    )


async def test_client_may_try_again_once_the_window_ends(
    database_url: str, upstream: Upstream
) -> None:
    window = {"failures_per_client": 3, "failures_per_key": 3, "window_seconds": 1.0}
    settings = make_settings(upstream, throttle=window)
    async with start_keystile(settings, database_url) as ks:
        assert [await me(ks, malformed()) for _ in range(4)] == [401, 401, 401, 429]
        status = 429
        async with asyncio.timeout(10):  # generous: the window is 1 s
            while status == 429:  # a refused attempt does not extend the window
                await asyncio.sleep(0.2)
                status = await me(ks, malformed())
        assert status == 401
        issued = await member_key(ks)
        assert await me(ks, issued.key) == 200


# --- 2. per-key rate limits -------------------------------------------------------------------

LIMIT = {"requests": 3, "per_seconds": 60}


async def test_rate_limited_key_counts_down_then_gets_429(
    keystile: Keystile, upstream: Upstream
) -> None:
    admin = await admin_key(keystile)
    status, _, made = await admin_call(
        keystile,
        "POST",
        "/api/keys",
        admin,
        json={"name": "limited", "servers": ["*"], "rate_limit": LIMIT},
    )
    assert status == 201 and made["rate_limit"] == LIMIT
    remaining = []
    for _ in range(3):
        status, headers, body = await keystile.request(
            "POST", "/mcp-connect/github/tools", made["key"], json={}
        )
        assert status == 200
        assert headers["X-Upstream"] == "yes"  # the upstream's own response, passed through
        assert headers["RateLimit-Limit"] == "3"
        assert 1 <= int(headers["RateLimit-Reset"]) <= 60
        remaining.append(headers["RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    forwarded_before = len(upstream.seen)
    status, headers, body = await keystile.request(
        "POST", "/mcp-connect/github/tools", made["key"], json={}
    )
    assert status == 429
    assert body["error"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["RateLimit-Limit"] == "3" and headers["RateLimit-Remaining"] == "0"
    assert "RateLimit-Reset" in headers
    assert len(upstream.seen) == forwarded_before  # refused before forwarding


async def test_rate_limit_of_one_key_leaves_another_key_alone(keystile: Keystile) -> None:
    limited = await member_key(keystile, rate_limit=LIMIT)
    other = await member_key(keystile, rate_limit=LIMIT)
    unlimited = await member_key(keystile)
    for _ in range(4):
        await keystile.request("GET", "/api/me", limited.key)
    assert (await keystile.request("GET", "/api/me", limited.key))[0] == 429
    status, headers, _ = await keystile.request("GET", "/api/me", other.key)
    assert status == 200 and headers["RateLimit-Remaining"] == "2"
    for _ in range(5):
        status, headers, _ = await keystile.request("GET", "/mcp-connect/gitlab/x", unlimited.key)
        assert status == 200
        assert "RateLimit-Limit" not in headers


async def test_api_me_carries_rate_limit_headers(keystile: Keystile) -> None:
    limited = await member_key(keystile, rate_limit={"requests": 5, "per_seconds": 30})
    status, headers, body = await keystile.request("GET", "/api/me", limited.key)
    assert status == 200 and body["key"]["id"] == limited.record.id
    assert headers["RateLimit-Limit"] == "5"
    assert headers["RateLimit-Remaining"] == "4"
    assert 1 <= int(headers["RateLimit-Reset"]) <= 30


async def test_rate_limit_is_shared_by_every_route_of_the_key(keystile: Keystile) -> None:
    limited = await member_key(keystile, rate_limit=LIMIT)
    assert (await keystile.request("GET", "/api/me", limited.key))[0] == 200
    assert (await keystile.request("GET", "/mcp-connect/github/", limited.key))[0] == 200
    assert (await keystile.request("GET", "/api/v1/models", limited.key))[0] == 200
    status, _, body = await keystile.request("GET", "/mcp-connect/gitlab/", limited.key)
    assert status == 429 and body["error"] == "rate_limited"


# --- 3. per-key IP allow-lists ----------------------------------------------------------------


async def test_loopback_cidr_lets_a_loopback_client_in(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(keystile, allowed_cidrs=["127.0.0.0/8"])
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    status, _, body = await keystile.request("GET", "/mcp-connect/github/x", issued.key)
    assert status == 200 and body["path"] == "/github/mcp/x"


async def test_other_network_is_403_and_nothing_is_forwarded(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(keystile, allowed_cidrs=["10.0.0.0/8"])
    status, headers, body = await keystile.request("GET", "/mcp-connect/github/x", issued.key)
    assert status == 403 and body["error"] == "forbidden"
    assert "insufficient_scope" in headers["WWW-Authenticate"]
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 403
    assert upstream.seen == []


async def test_spoofed_forwarded_for_from_an_untrusted_client_is_not_honoured(
    keystile: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(keystile, allowed_cidrs=["10.0.0.0/8"])
    for spoof in ("10.1.2.3", "10.1.2.3, 10.9.9.9"):
        status, _, body = await keystile.request(
            "GET", "/mcp-connect/github/x", issued.key, headers=forwarded(spoof)
        )
        assert status == 403 and body["error"] == "forbidden"
    assert upstream.seen == []


async def test_forwarded_for_decides_behind_a_trusted_proxy(
    throttled: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(throttled, allowed_cidrs=["10.0.0.0/8"])
    assert await me(throttled, issued.key, "10.1.2.3") == 200
    assert await me(throttled, issued.key, "192.0.2.1") == 403
    # The rightmost untrusted hop counts; what the client wrote further left proves nothing.
    status, _, _ = await throttled.request(
        "GET", "/api/me", issued.key, headers=forwarded("10.1.2.3, 192.0.2.7")
    )
    assert status == 403
    assert (await throttled.request("GET", "/api/me", issued.key))[0] == 403  # 127.0.0.1 itself


async def test_ipv6_cidr_does_not_match_an_ipv4_client(keystile: Keystile) -> None:
    for cidrs in (["::/0"], ["::1/128"], ["::ffff:0:0/96"]):
        issued = await member_key(keystile, allowed_cidrs=cidrs)
        status, _, body = await keystile.request("GET", "/api/me", issued.key)
        assert status == 403 and body["error"] == "forbidden", cidrs


async def test_allow_list_also_binds_the_admin_plane(keystile: Keystile) -> None:
    user = await keystile.user("self@example.com", servers=["*"])
    issued = await keystile.runtime.keyring.create_key(
        keystile.actor,
        user_id=user.id,
        name="office only",
        permissions=["mcp", "keys"],
        allowed_cidrs=["10.0.0.0/8"],
    )
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 403  # data plane: refused
    status, _, _ = await admin_call(
        keystile,
        "POST",
        "/api/keys",
        issued.key,
        json={"name": "escape", "servers": ["*"], "permissions": ["mcp"]},
    )
    assert status == 403


# --- 4. hostile HTTP --------------------------------------------------------------------------

MAX_BODY = 4096
HARDENED = {"max_body_bytes": MAX_BODY, "keepalive_timeout": 1.5, "body_timeout": 1.0}


@pytest.fixture
async def hardened(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    settings = make_settings(upstream, gateway=HARDENED)
    async with start_keystile(settings, database_url) as ks:
        yield ks


def head(key: str, method: str = "GET", target: str = "/mcp-connect/github/x") -> bytes:
    """A request head, unterminated, that would be forwarded if the parser accepted it."""
    return f"{method} {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n".encode()


HOSTILE: dict[str, Callable[[str], bytes]] = {
    "bare CR in a value": lambda k: head(k) + b"X-A: a\rX-Keystile-User-Id: evil\r\n\r\n",
    "bare LF in a value": lambda k: head(k) + b"X-A: a\nX-Keystile-User-Id: evil\r\n\r\n",
    "LF-only line ends": lambda k: head(k).replace(b"\r\n", b"\n") + b"\n",
    "obs-fold": lambda k: head(k) + b"X-A: a\r\n folded\r\n\r\n",
    "NUL in a value": lambda k: head(k) + b"X-A: a\x00b\r\n\r\n",
    "space before colon": lambda k: head(k) + b"Host : other\r\n\r\n",
    "field over 16 KiB": lambda k: head(k) + b"X-Big: " + b"a" * 17_000 + b"\r\n\r\n",
    "200 headers": lambda k: head(k) + b"".join(b"X-H%d: v\r\n" % n for n in range(200)) + b"\r\n",
    "100 KB query": lambda k: head(k, target="/mcp-connect/github/x?q=" + "a" * 100_000) + b"\r\n",
    "100 KB path": lambda k: head(k, target="/mcp-connect/github/" + "a" * 100_000) + b"\r\n",
    "CL with TE chunked": lambda k: (
        head(k, "POST")
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n"
    ),
    "TE chunked with CL": lambda k: (
        head(k, "POST") + b"Transfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\n"
    ),
    "duplicated CL": lambda k: (
        head(k, "POST") + b"Content-Length: 4\r\nContent-Length: 9\r\n\r\nabcdefghi"
    ),
    "CL list": lambda k: head(k, "POST") + b"Content-Length: 4, 9\r\n\r\nabcdefghi",
    "TE xchunked": lambda k: (
        head(k, "POST") + b"Transfer-Encoding: xchunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    ),
    "TE chunked, identity": lambda k: (
        head(k, "POST") + b"Transfer-Encoding: chunked, identity\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    ),
    "absolute-form target": lambda k: (
        head(k, target="http://169.254.169.254/latest/meta-data") + b"\r\n"
    ),
    "asterisk-form target": lambda k: head(k, "OPTIONS", target="*") + b"\r\n",
    "bad chunk size": lambda k: (
        head(k, "POST") + b"Transfer-Encoding: chunked\r\n\r\n4;\x00\r\nabcd\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("shape", list(HOSTILE))
async def test_hostile_request_is_refused_and_never_forwarded(
    hardened: Keystile, upstream: Upstream, shape: str
) -> None:
    issued = await member_key(hardened)
    reply = await exchange(hardened.gateway_port, HOSTILE[shape](issued.key))
    assert reply.status is None or 400 <= reply.status < 500, (reply.status, reply.body[:200])
    assert upstream.seen == []
    await assert_healthy(hardened)
    assert all(seen["path"] == "/github/mcp/after" for seen in upstream.seen)


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_max_body_bytes_is_413_and_not_forwarded(
    hardened: Keystile, upstream: Upstream, chunked: bool
) -> None:
    issued = await member_key(hardened)
    body = b"x" * (MAX_BODY + 1)
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        framing = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    reply = await exchange(hardened.gateway_port, head(issued.key, "POST") + framing)
    assert reply.status == 413
    assert b'"body_too_large"' in reply.body
    assert all(seen["body"] != body.decode() for seen in upstream.seen)
    await assert_healthy(hardened)


async def test_slowloris_head_is_cut_off_by_keepalive_timeout(
    hardened: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(hardened)
    closed = False
    answer = b""
    async with connection(hardened.gateway_port) as (reader, writer):
        writer.write(head(issued.key))
        async with asyncio.timeout(10):  # generous: keepalive_timeout is 1.5 s
            for n in range(40):  # one header every 0.5 s: 20 s if never cut
                try:
                    writer.write(b"X-Trickle-%d: v\r\n" % n)
                    await writer.drain()
                    answer = await asyncio.wait_for(reader.read(1024), 0.5)
                except TimeoutError:
                    continue
                except ConnectionError:
                    closed = True
                    break
                closed = answer == b""
                break
    assert closed, answer
    assert upstream.seen == []
    await assert_healthy(hardened)


async def test_slow_small_body_is_408_and_not_forwarded(
    hardened: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(hardened)
    async with connection(hardened.gateway_port) as (reader, writer):
        writer.write(head(issued.key, "POST") + b"Content-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        reply = await read_reply(reader)
    assert reply.status == 408 and b'"request_timeout"' in reply.body
    assert upstream.seen == []
    await assert_healthy(hardened)


async def test_slow_large_body_is_408_not_an_upstream_timeout(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, gateway={"keepalive_timeout": 1.5, "body_timeout": 1.0})
    async with start_keystile(settings, database_url) as ks:
        issued = await member_key(ks)
        async with connection(ks.gateway_port) as (reader, writer):
            writer.write(head(issued.key, "POST") + b"Content-Length: 100000\r\n\r\n0123456789")
            await writer.drain()
            reply = await read_reply(reader)
        assert reply.status in (None, 408), reply
        assert ks.runtime.metrics.count("upstream_errors") == 0
        assert upstream.seen == []  # the upstream never got a complete request
        await assert_healthy(ks)


async def test_steady_upload_longer_than_response_timeout_is_not_cut(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, gateway={"response_timeout": 1.0, "body_timeout": 5.0})
    async with start_keystile(settings, database_url) as ks:
        issued = await member_key(ks)

        async def steady() -> AsyncIterator[bytes]:
            for _ in range(8):  # ~2.4 s in all, never silent for more than 0.3 s
                yield b"y" * 1000
                await asyncio.sleep(0.3)

        status, _, body = await ks.request(
            "POST", "/mcp-connect/gitlab/upload", issued.key, data=steady()
        )
        assert status == 200, body
        assert body["received"] == 8000


@pytest.mark.parametrize(
    "value",
    [b"\x00", b"\r", b"\n", b"\rX-Injected: 1", b"\x0b", b"\x1b[0m", b"\x7f", b"\xff\xfe"],
    ids=["NUL", "CR", "LF", "CR-injection", "VT", "ESC", "DEL", "non-UTF-8"],
)
async def test_key_with_control_bytes_is_400_or_401_never_500(
    hardened: Keystile, upstream: Upstream, value: bytes
) -> None:
    issued = await member_key(hardened)
    full = issued.key.encode()
    for header in (b"Authorization: Bearer ", b"X-API-Key: "):
        for key in (full + value, value + full, full[:40] + value + full[40:]):
            request = b"GET /mcp-connect/github/x HTTP/1.1\r\nHost: gw\r\n"
            reply = await exchange(hardened.gateway_port, request + header + key + b"\r\n\r\n")
            assert reply.status in (None, 400, 401), (header, key, reply.status, reply.body[:200])
    assert upstream.seen == []
    await assert_healthy(hardened)


async def test_key_with_encoded_control_characters_is_401(keystile: Keystile) -> None:
    issued = await member_key(keystile)
    for suffix in ("%00", "%0d%0a", "\\r\\n", "\\x00"):
        status, _, body = await keystile.request(
            "GET", "/api/me", headers={"X-API-Key": issued.key + suffix}
        )
        assert status == 401 and body["error"] == "invalid_api_key", suffix


async def test_admin_plane_refuses_invalid_utf8_with_400(keystile: Keystile) -> None:
    admin = await admin_key(keystile)
    status, _, body = await admin_call(
        keystile,
        "POST",
        "/api/keys",
        admin,
        data=b'{"name": "\xff\xfe", "servers": ["*"]}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and body["error"] == "invalid_json"


async def test_admin_plane_refuses_a_2_mib_body_with_413(keystile: Keystile) -> None:
    admin = await admin_key(keystile)
    huge = b'{"name": "big", "servers": ["*"], "description": "' + b"d" * (2 << 20) + b'"}'
    status, _, body = await admin_call(
        keystile,
        "POST",
        "/api/keys",
        admin,
        data=io.BytesIO(huge),
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    assert set(body) >= {"error", "message"}
    status, _, listing = await admin_call(keystile, "GET", "/api/keys?all=true", admin)
    assert status == 200 and [k["name"] for k in listing] == ["admin"]


@pytest.mark.parametrize("depth", [100_000, 400_000])
async def test_admin_plane_refuses_deeply_nested_json_with_400(
    keystile: Keystile, depth: int
) -> None:
    admin = await admin_key(keystile)
    nested = b'{"name": "n", "servers": ["*"], "description": ' + b"[" * depth + b"]" * depth
    status, _, body = await admin_call(
        keystile,
        "POST",
        "/api/keys",
        admin,
        data=nested + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert status in (400, 413), body
    assert body["error"] in ("invalid_json", "request_entity_too_large")
    status, _, _ = await admin_call(keystile, "GET", "/api/keys", admin)
    assert status == 200


async def test_admin_plane_slow_body_is_408(database_url: str, upstream: Upstream) -> None:
    settings = make_settings(upstream, gateway=HARDENED)
    async with start_keystile(settings, database_url) as ks:
        admin = await admin_key(ks)
        async with connection(ks.admin_port) as (reader, writer):
            writer.write(
                f"POST /api/keys HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {admin}\r\n"
                "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{".encode()
            )
            await writer.drain()
            reply = await read_reply(reader)
        assert reply.status in (None, 408), reply
        assert (await admin_call(ks, "GET", "/api/keys", admin))[0] == 200


async def test_admin_plane_survives_hostile_heads(keystile: Keystile) -> None:
    admin = await admin_key(keystile)
    for shape in ("bare CR in a value", "CL with TE chunked", "field over 16 KiB", "TE xchunked"):
        raw = HOSTILE[shape](admin).replace(b"/mcp-connect/github/x", b"/api/keys")
        reply = await exchange(keystile.admin_port, raw)
        assert reply.status is None or 400 <= reply.status < 500, shape
    status, _, body = await admin_call(keystile, "GET", "/api/keys", admin)
    assert status == 200 and [k["name"] for k in body] == ["admin"]


async def test_pipelined_request_rides_on_no_one_elses_key(
    hardened: Keystile, upstream: Upstream
) -> None:
    issued = await member_key(hardened)
    smuggled = b"GET /mcp-connect/gitlab/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
    async with connection(hardened.gateway_port) as (reader, writer):
        writer.write(head(issued.key, "POST") + b"Content-Length: 2\r\n\r\nab" + smuggled)
        await writer.drain()
        first = await read_reply(reader)
        second = await read_reply(reader)
    assert first.status == 200
    assert second.status == 401 and b'"invalid_api_key"' in second.body
    assert [seen["path"] for seen in upstream.seen] == ["/github/mcp/x"]
