"""Failed-authentication throttling, and per-key rate limits. Both per process.

Failures are counted per client address and per key id in fixed windows; past the threshold
the client (or key id) gets 429 until the window ends. Only requests that would need the
store or argon2 are refused: a valid key already in the cache is never throttled, so a flood
of bad keys from one address slows neither valid keys of other clients nor cached ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from gateway.errors import ApiError


def too_many_attempts(retry_after: float) -> ApiError:
    return ApiError(
        429,
        "too_many_attempts",
        "Too many failed authentication attempts; retry later.",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


class FailureThrottle:
    def __init__(
        self,
        *,
        per_client: int,
        per_key: int,
        window_seconds: float,
        max_tracked: int,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"client": per_client, "key": per_key}
        self._window = window_seconds
        self._timer = timer
        # (kind, id) -> [window start, failures]; entries expire with their window.
        self._counts: TTLCache[tuple[str, str], list[float]] = TTLCache(
            max_tracked, window_seconds, timer=timer
        )

    def check(self, client: str, key_id: str | None) -> None:
        """Raise 429 if this client is over its failure budget, or if it has failed itself
        and asks for a key id that is over its budget.

        A client with no failures of its own is always let through to verification: the
        key's owner, from elsewhere, is not locked out by someone guessing at their key id;
        each guessing address earns its own record with its first failure.
        """
        own = self._over("client", client)
        if own is not None:
            raise too_many_attempts(own)
        if key_id is None or ("client", client) not in self._counts:
            return
        key = self._over("key", key_id)
        if key is not None:
            raise too_many_attempts(key)

    def _over(self, kind: str, ident: str) -> float | None:
        """Seconds until the window ends, if `ident` is over its budget; else None."""
        if self._limits[kind] <= 0:
            return None
        entry = self._counts.get((kind, ident))
        if entry is None or entry[1] < self._limits[kind]:
            return None
        return entry[0] + self._window - self._timer()

    def failed(self, client: str, key_id: str | None) -> None:
        for kind, ident in (("client", client), ("key", key_id)):
            if ident is None:
                continue
            entry = self._counts.get((kind, ident))
            if entry is None:
                self._counts[(kind, ident)] = [self._timer(), 1]
            else:
                entry[1] += 1


@dataclass(slots=True)
class _Window:
    started: float
    count: int


class KeyRateLimiter:
    """Fixed windows per key: `requests` per `per_seconds`, counted in this process."""

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


def rate_limited(headers: dict[str, str]) -> ApiError:
    return ApiError(
        429, "rate_limited", "The API key is over its rate limit; retry later.", headers=headers
    )
