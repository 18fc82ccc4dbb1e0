"""Abuse of authentication: an attacker guessing at a victim's key id cannot deny the key to its
owner, concurrent bad attempts stay within the failure budget, the two planes count failures
apart, a key's rate limit holds on the admin plane too, and what the gateway remembers of
credentials is bounded and holds no key."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import pytest

from gateway import auth, keys
from gateway.errors import ApiError
from gateway.keyring import IssuedKey
from gateway.throttle import FailureThrottle, VerifyQueue, client_identity
from tests.support import Keystile, Upstream, admin_call, make_settings, start_keystile

LOCALHOST_PROXY = (ipaddress.ip_network("127.0.0.1/32"),)
BUDGET = {"failures_per_client": 20, "failures_per_key": 10, "window_seconds": 60}


@pytest.fixture
async def proxied(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    """X-Forwarded-For from 127.0.0.1 names the client, so one test can be many addresses."""
    settings = make_settings(
        upstream, gateway={"trusted_proxies": LOCALHOST_PROXY}, throttle=BUDGET
    )
    async with start_keystile(settings, database_url) as ks:
        yield ks


async def me(ks: Keystile, key: str | None, client: str) -> int:
    status, _, _ = await ks.request("GET", "/api/me", key, headers={"X-Forwarded-For": client})
    return status


async def member_key(ks: Keystile, **fields: object) -> IssuedKey:
    user = await ks.user(f"m{keys.new_id()}@example.com", servers=["*"])
    return await ks.key(user, permissions=["mcp", "keys"], **fields)  # type: ignore[arg-type]


def wrong_secret(issued: IssuedKey) -> str:
    return keys.generate(issued.record.user_id, issued.record.id).full


def unknown_key() -> str:
    return keys.generate(keys.new_id(), keys.new_id()).full


async def test_a_spray_of_wrong_secrets_cannot_lock_the_owner_out(proxied: Keystile) -> None:
    victim = await member_key(proxied)
    attackers = [f"203.0.113.{n}" for n in range(1, 41)]
    stop = asyncio.Event()
    attack_statuses: list[int] = []

    async def spray(address: str) -> None:
        while not stop.is_set():
            replies = await asyncio.gather(
                *(me(proxied, wrong_secret(victim), address) for _ in range(5))
            )
            attack_statuses.extend(replies)

    sprayers = [asyncio.create_task(spray(a)) for a in attackers]
    try:
        owner = []
        for _ in range(15):
            proxied.runtime.cache.evict_key(victim.record.id)  # never cached: store and argon2
            owner.append(await me(proxied, victim.key, "198.51.100.77"))
            await asyncio.sleep(0)  # let the spray go on between tries
    finally:
        stop.set()
        await asyncio.gather(*sprayers)
    assert owner == [200] * 15
    assert 401 in attack_statuses and set(attack_statuses) <= {401, 429}
    # Bounded: the key id's budget, plus each attacking address's first wave (its five
    # attempts in flight), plus the owner's verifications.
    bound = BUDGET["failures_per_key"] + 5 * len(attackers) + 15
    assert proxied.runtime.metrics.count("argon2_verifications") <= bound


async def test_concurrent_attempts_stay_within_the_client_budget(proxied: Keystile) -> None:
    # Unknown key ids each need a store lookup: checked before and counted after, a burst
    # would all pass the check before the first one failed.
    statuses = await asyncio.gather(
        *(me(proxied, unknown_key(), "203.0.113.200") for _ in range(100))
    )
    assert set(statuses) == {401, 429}
    failures = statuses.count(401)
    assert failures <= BUDGET["failures_per_client"]
    while await me(proxied, unknown_key(), "203.0.113.200") == 401:
        failures += 1
    assert failures == BUDGET["failures_per_client"]


async def test_failures_on_one_plane_do_not_lock_the_client_out_of_the_other(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, throttle={"failures_per_client": 3})
    async with start_keystile(settings, database_url) as ks:
        admin = await ks.user("admin@example.com", role="admin", servers=["*"])
        issued = await ks.key(admin, permissions=["admin", "keys", "mcp"])
        statuses = [(await ks.request("GET", "/api/me", unknown_key()))[0] for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        reply = await admin_call(ks, "GET", "/api/keys", issued.key)  # not cached yet
        assert reply.status == 200
        for _ in range(3):
            await admin_call(ks, "GET", "/api/keys", unknown_key())
        assert (await admin_call(ks, "GET", "/api/keys", unknown_key())).status == 429
        ks.runtime.cache.evict_key(issued.record.id)
        # The data plane's own window is still full; a new key from this client stays refused
        # there, yet the admin plane's failures added nothing to it.
        status, _, _ = await ks.request("GET", "/mcp-connect/github/x", issued.key)
        assert status == 429


async def test_a_keys_rate_limit_holds_on_the_admin_plane(keystile: Keystile) -> None:
    user = await keystile.user(servers=["*"])
    issued = await keystile.key(user, permissions=["mcp", "keys"])
    await keystile.runtime.keyring.update_key(
        keystile.actor, issued.record.id, {"rate_limit": {"requests": 3, "per_seconds": 3600}}
    )
    assert (await admin_call(keystile, "GET", "/api/keys", issued.key)).status == 200
    status, _, _ = await keystile.request("GET", "/mcp-connect/github/x", issued.key)
    assert status == 200
    assert (await admin_call(keystile, "GET", "/api/keys", issued.key)).status == 200
    refused = await admin_call(
        keystile, "POST", "/api/keys", issued.key, {"name": "x", "servers": ["*"]}
    )
    assert refused.status == 429
    assert refused.body["error"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"
    status, _, _ = await keystile.request("GET", "/mcp-connect/github/x", issued.key)
    assert status == 429  # one budget for both planes
    assert (
        len(await keystile.runtime.store.list_keys(keystile.actor.workspace_id, user_id=user.id))
        == 1
    )


async def test_what_is_remembered_of_credentials_is_bounded_and_holds_no_key(
    keystile: Keystile,
) -> None:
    authenticator = keystile.runtime.authenticator
    seen = [unknown_key() for _ in range(auth.IDENTIFIED_MAX + 500)]
    for token in seen:
        assert authenticator._identify(token) is not None
    huge = "ks1-" + "A" * 16_000
    assert authenticator._identify(huge) is None
    assert authenticator._identify("Bearer garbage") is None
    remembered = authenticator._identified
    assert len(remembered) == auth.IDENTIFIED_MAX
    secrets = {token.rsplit("-", 1)[1] for token in seen}
    for digest, ref in remembered.items():
        assert len(digest) == 16
        assert set(ref.__slots__) <= {"user_id", "key_id", "fingerprint", "kind"}
        assert ref.user_id not in secrets and ref.key_id not in secrets


# --- the pure parts ----------------------------------------------------------------------------


def test_ipv6_clients_are_counted_per_64() -> None:
    assert client_identity("2001:db8:1:2:aaaa::1") == client_identity("2001:db8:1:2:bbbb::9")
    assert client_identity("2001:db8:1:2::1") != client_identity("2001:db8:1:3::1")
    assert client_identity("::ffff:10.1.2.3") == "10.1.2.3"
    assert client_identity("10.1.2.3") == "10.1.2.3"
    assert client_identity("not an address") == "not an address"


async def test_a_reservation_counts_until_settled_and_the_rest_wait() -> None:
    now = [0.0]
    throttle = FailureThrottle(
        per_client=3, per_key=2, window_seconds=60, max_tracked=100, timer=lambda: now[0]
    )
    held = [await throttle.reserve("a", "k") for _ in range(3)]
    assert held[0].clean and not held[1].clean
    # The budget is spoken for by three attempts in flight: a fourth waits, not refused.
    fourth = asyncio.create_task(throttle.reserve("a", "k"))
    await asyncio.sleep(0)
    assert not fourth.done()
    held[0].release()  # verified: its place goes to the one waiting
    attempt = await fourth
    # Failures, though, spend the budget: once three attempts failed, the rest are refused.
    waiting = asyncio.create_task(throttle.reserve("a", "k"))
    await asyncio.sleep(0)
    for failing in (held[1], held[2], attempt):
        failing.failed()
    with pytest.raises(ApiError, match="Too many"):
        await waiting
    with pytest.raises(ApiError, match="Too many"):
        await throttle.reserve("a", "other")
    (await throttle.reserve("b", "k")).failed()
    # b has failed, and key k is over its budget (a's two and b's one, against 2).
    with pytest.raises(ApiError, match="Too many"):
        await throttle.reserve("b", "k")
    assert (await throttle.reserve("d", "k")).clean  # no failures of its own: let through
    now[0] = 61.0
    (await throttle.reserve("a", "k")).release()  # the window ended


async def test_many_new_keys_from_one_address_all_verify(
    database_url: str, upstream: Upstream
) -> None:
    # A restart, or many users behind one proxy: more new keys at once than the failure
    # budget are slowed to its width, not refused.
    settings = make_settings(upstream, throttle={"failures_per_client": 5})
    async with start_keystile(settings, database_url) as ks:
        user = await ks.user(servers=["*"])
        issued = [await ks.key(user, name=f"k{n}") for n in range(40)]
        statuses = await asyncio.gather(*(ks.request("GET", "/api/me", i.key) for i in issued))
        assert [status for status, _, _ in statuses] == [200] * 40


async def test_the_verify_queue_serves_clean_clients_first() -> None:
    queue = VerifyQueue(1)
    await queue.acquire(clean=True)
    order: list[str] = []

    async def wait(name: str, clean: bool) -> None:
        await queue.acquire(clean)
        order.append(name)
        queue.release()

    tasks = [
        asyncio.create_task(wait("failing-1", False)),
        asyncio.create_task(wait("failing-2", False)),
        asyncio.create_task(wait("clean", True)),
    ]
    while queue.waiting < 3:  # noqa: ASYNC110 - the tasks queue up as they run
        await asyncio.sleep(0)
    cancelled = asyncio.create_task(wait("gone", True))
    while queue.waiting < 4:  # noqa: ASYNC110
        await asyncio.sleep(0)
    cancelled.cancel()
    queue.release()
    await asyncio.gather(*tasks)
    assert order == ["clean", "failing-1", "failing-2"]
    await queue.acquire(clean=False)  # the slot came back: nothing leaked
    queue.release()
