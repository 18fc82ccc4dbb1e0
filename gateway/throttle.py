"""Failed-authentication throttling, the argon2 queue, and per-key rate limits. Per process.

Failures are counted per client and per key id in fixed windows. An attempt that needs the
store or argon2 first *reserves* a place in its client's budget, so a burst of concurrent
attempts cannot all pass the check before the first of them fails: a client never verifies
more keys at once than it has failures left (the others wait their turn). Past the budget
the client (or a key id it has been guessing) gets 429 until the window ends.

Only requests that would need the store or argon2 are refused: a valid key already in the
cache is never throttled. A client with no failures of its own is never refused because of
a key id's count, so whoever guesses at a key id cannot lock its owner out; and a clean
client's verification is queued ahead of those of clients that have failed (VerifyQueue),
so the owner is not starved of argon2 either.

IPv6 clients are counted per /64: one host usually holds a whole /64, and counting single
addresses would give it 2**64 budgets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import TTLCache

from gateway.errors import ApiError


def too_many_attempts(retry_after: float) -> ApiError:
    return ApiError(
        429,
        "too_many_attempts",
        "Too many failed authentication attempts; retry later.",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def client_identity(address: str) -> str:
    """Whom a failure is counted against: the address, or its /64 for IPv6."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


@dataclass(slots=True)
class _Count:
    started: float
    failures: int = 0
    inflight: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class Attempt:
    """A reserved place in a client's budget, for one verification. Settle it exactly once."""

    __slots__ = ("_count", "_throttle", "clean", "key_id")

    def __init__(
        self, throttle: FailureThrottle, count: _Count, key_id: str | None, clean: bool
    ) -> None:
        self._throttle = throttle
        self._count = count  # held, not looked up again: the window may expire meanwhile
        self.key_id = key_id
        # No failures of its own and nothing else in flight: first in the argon2 queue.
        self.clean = clean

    def release(self) -> None:
        """The attempt did not fail (it verified, or could not be decided): no count."""
        self._throttle._settle(self._count, self.key_id, failed=False)

    def failed(self) -> None:
        self._throttle._settle(self._count, self.key_id, failed=True)


class FailureThrottle:
    def __init__(
        self,
        *,
        per_client: int,
        per_key: int,
        window_seconds: float,
        max_tracked: int,
        max_waiting: int = 1024,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"client": per_client, "key": per_key}
        self._window = window_seconds
        self._max_waiting = max_waiting
        self._timer = timer
        # (kind, id) -> its window; entries expire with their window.
        self._counts: TTLCache[tuple[str, str], _Count] = TTLCache(
            max_tracked, window_seconds, timer=timer
        )

    async def reserve(self, client: str, key_id: str | None) -> Attempt:
        """A place for one verification, or 429 if this client has spent its budget, or has
        failed itself and asks for a key id over budget.

        While the client's remaining budget is spoken for by its attempts in flight, the
        attempt waits for one of them to settle instead of being refused: a client
        verifying many new keys at once (a restart, many users behind one address) is slowed
        to its budget's width, never turned away for it, and a burst of guesses still cannot
        outrun the failure count.
        """
        own = self._count("client", client_identity(client))
        limit = self._limits["client"]
        woken = False
        while True:
            try:
                self._refuse_spent(own, key_id)
            except ApiError:
                if woken:
                    _wake_one(own)  # refused on its turn: the next one waiting is told too
                raise
            if limit <= 0 or own.failures + own.inflight < limit:
                break
            if len(own.waiters) >= self._max_waiting:
                raise too_many_attempts(1)
            await self._wait(own)
            woken = True
        clean = own.failures == 0 and own.inflight == 0
        own.inflight += 1
        return Attempt(self, own, key_id, clean)

    def failed(self, client: str) -> None:
        """A failure that needed no verification (a malformed key): count it, or 429 if the
        client has spent its budget already."""
        own = self._count("client", client_identity(client))
        self._refuse_spent(own, None)
        own.failures += 1

    def _refuse_spent(self, own: _Count, key_id: str | None) -> None:
        limit = self._limits["client"]
        if limit > 0 and own.failures >= limit:
            raise too_many_attempts(self._retry_after(own))
        if key_id is not None and own.failures > 0:
            self._refuse_key(key_id)

    def _refuse_key(self, key_id: str) -> None:
        limit = self._limits["key"]
        entry = self._counts.get(("key", key_id))
        if limit > 0 and entry is not None and entry.failures >= limit:
            raise too_many_attempts(self._retry_after(entry))

    def _retry_after(self, entry: _Count) -> float:
        return entry.started + self._window - self._timer()

    def _count(self, kind: str, ident: str) -> _Count:
        entry = self._counts.get((kind, ident))
        if entry is None:
            entry = self._counts[(kind, ident)] = _Count(self._timer())
        return entry

    @staticmethod
    async def _wait(own: _Count) -> None:
        turn = asyncio.get_running_loop().create_future()
        own.waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                _wake_one(own)  # woken just as it was cancelled: pass the turn on
            else:
                own.waiters.remove(turn)
            raise

    def _settle(self, own: _Count, key_id: str | None, *, failed: bool) -> None:
        own.inflight = max(0, own.inflight - 1)
        if failed:
            own.failures += 1
            if key_id is not None:
                self._count("key", key_id).failures += 1
        _wake_one(own)


def _wake_one(own: _Count) -> None:
    while own.waiters:
        turn = own.waiters.popleft()
        if not turn.done():
            turn.set_result(None)
            return


class VerifyQueue:
    """At most `concurrency` verifications run at once; waiting ones are served clean
    clients first (see FailureThrottle), then the others, each lane in arrival order."""

    def __init__(self, concurrency: int) -> None:
        self._free = concurrency
        self._lanes: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),
            deque(),
        )

    @property
    def waiting(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    async def acquire(self, clean: bool) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        lane = self._lanes[0 if clean else 1]
        lane.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a turn just as it was cancelled: pass it on
            else:
                lane.remove(turn)
            raise

    def release(self) -> None:
        for lane in self._lanes:
            while lane:
                turn = lane.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._free += 1


@dataclass(slots=True)
class _Window:
    started: float
    count: int


class KeyRateLimiter:
    """Fixed windows per key: `requests` per `per_seconds`, counted in this process across
    both planes (a key's admin requests spend the same budget as its data-plane ones)."""

    def __init__(self, timer: Callable[[], float] = time.monotonic) -> None:
        self._timer = timer
        self._windows: dict[str, _Window] = {}

    def take(self, key_id: str, requests: int, per_seconds: int) -> tuple[bool, dict[str, str]]:
        """Count one request; return whether it is allowed and the RateLimit-* headers."""
        now = self._timer()
        window = self._windows.get(key_id)
        if window is None or now - window.started >= per_seconds:
            window = self._windows[key_id] = _Window(now, 0)
        reset = max(1, math.ceil(window.started + per_seconds - now))
        allowed = window.count < requests
        if allowed:
            window.count += 1
        headers = {
            "RateLimit-Limit": str(requests),
            "RateLimit-Remaining": str(max(0, requests - window.count)),
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(reset)
        return allowed, headers


class AddressThrottle:
    """Requests per client address (IPv6: per /64) in fixed windows: for endpoints anyone may
    call without a key (OAuth registration, consent, token), whose every request costs a
    database write or lookup. Bounded: the oldest addresses are forgotten first."""

    def __init__(
        self,
        *,
        limit: int,
        window_seconds: float,
        max_tracked: int,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window_seconds
        self._timer = timer
        self._windows: TTLCache[str, _Window] = TTLCache(max_tracked, window_seconds, timer=timer)

    def take(self, client: str) -> float | None:
        """Count one request; None if allowed, else the seconds until the window ends."""
        who = client_identity(client)
        now = self._timer()
        window = self._windows.get(who)
        if window is None:
            window = self._windows[who] = _Window(now, 0)
        if window.count >= self._limit:
            return max(0.0, window.started + self._window - now)
        window.count += 1
        return None


def rate_limited(headers: dict[str, str]) -> ApiError:
    return ApiError(
        429, "rate_limited", "The API key is over its rate limit; retry later.", headers=headers
    )
