"""Authentication: from a request's credential to a verified Principal.

parse + checksum (no I/O for garbage) -> cache -> negative cache -> Postgres by key id ->
argon2 verify in a thread, bounded -> cache. Concurrent misses for the same key share one
lookup and one verification.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import NoReturn

import asyncpg

from gateway import keys
from gateway.cache import CachedKey, KeyCache, VerifiedSecret, generation
from gateway.errors import invalid_key, store_unavailable
from gateway.metrics import Metrics
from gateway.models import KeyHashes, Principal
from gateway.store import Store
from gateway.throttle import FailureThrottle, too_many_attempts

log = logging.getLogger("keystile.auth")

_MAX_INFLIGHT_PER_KEY = 2

# What the store raises when it cannot answer: connection trouble, timeouts, a server gone.
STORE_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def credential(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    value = headers.get("Authorization")
    if value is not None:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    value = headers.get("X-API-Key")  # e.g. beside Basic auth meant for something else
    return value.strip() if value is not None else None


class Authenticator:
    def __init__(
        self,
        *,
        store: Store,
        cache: KeyCache,
        hasher: keys.KeyHasher,
        metrics: Metrics,
        verify_concurrency: int,
        throttle: FailureThrottle,
    ) -> None:
        self._throttle = throttle
        self._store = store
        self._cache = cache
        self._hasher = hasher
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(verify_concurrency, thread_name_prefix="argon2")
        self._inflight: dict[bytes, asyncio.Task[Principal | None]] = {}
        self._inflight_per_key: dict[str, int] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def authenticate(self, token: str | None, client: str) -> Principal:
        """The verified principal, or ApiError 401 (bad key), 429 (too many failures from
        this client or for this key id) or 503 (store down and key not cached).

        Whether the key may be used *now* (status, expiry, user) is policy.check_usable's call.
        """
        parsed, fingerprint = _parse(token) if token else (None, b"")
        if parsed is None:
            self._throttle.check(client, None)
            self._failed(client, None)
        entry = self._cache.get(parsed.key_id)
        if entry is not None:
            secret = entry.match(fingerprint)
            if secret is not None and _within(secret.valid_until):
                if self._cache.trusted:
                    self._metrics.cache_hits += 1
                    return entry.principal
                revalidated = await self._revalidate(parsed, entry)
                if revalidated is not None:
                    return revalidated
        self._metrics.cache_misses += 1
        self._throttle.check(client, parsed.key_id)
        if self._cache.is_known_bad(fingerprint):
            self._failed(client, parsed.key_id)
        principal = await self._single_flight(parsed, fingerprint)
        if principal is None:
            self._failed(client, parsed.key_id)
        return principal

    def _failed(self, client: str, key_id: str | None) -> NoReturn:
        self._metrics.auth_failures += 1
        self._throttle.failed(client, key_id)
        raise invalid_key()

    async def _single_flight(self, parsed: keys.ParsedKey, fingerprint: bytes) -> Principal | None:
        # The lookup runs as its own task, so a caller that goes away (client disconnect)
        # does not cancel it for the others waiting on the same key.
        task = self._inflight.get(fingerprint)
        if task is None:
            # Distinct secrets for one key id verify at most this many at once: a burst of
            # guesses cannot outrun the failure count (a rotation needs two at most).
            running = self._inflight_per_key.get(parsed.key_id, 0)
            if running >= _MAX_INFLIGHT_PER_KEY:
                raise too_many_attempts(1)
            self._inflight_per_key[parsed.key_id] = running + 1
            task = asyncio.create_task(self._load_and_verify(parsed, fingerprint))
            self._inflight[fingerprint] = task
            task.add_done_callback(lambda done: self._finished(fingerprint, parsed.key_id, done))
        return await asyncio.shield(task)

    def _finished(
        self, fingerprint: bytes, key_id: str, task: asyncio.Task[Principal | None]
    ) -> None:
        self._inflight.pop(fingerprint, None)
        left = self._inflight_per_key.pop(key_id, 1) - 1
        if left > 0:
            self._inflight_per_key[key_id] = left
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter still gets it re-raised

    async def _load_and_verify(
        self, parsed: keys.ParsedKey, fingerprint: bytes
    ) -> Principal | None:
        epoch = self._cache.epoch
        try:
            loaded = await self._store.load_principal(parsed.key_id)
        except STORE_ERRORS as exc:
            self._metrics.store_errors += 1
            log.warning("key store unreachable: %s", type(exc).__name__)
            raise store_unavailable() from None
        if loaded is None or loaded[0].key.user_id != parsed.user_id:
            self._cache.remember_bad(fingerprint)
            return None
        principal, hashes = loaded
        secret = await self._verify(hashes, parsed.full, fingerprint)
        if secret is None:
            self._cache.remember_bad(fingerprint)
            return None
        entry = CachedKey.of(principal, hashes.current, secret)
        self._cache.put(parsed.key_id, entry, epoch=epoch)
        return principal

    async def _revalidate(self, parsed: keys.ParsedKey, entry: CachedKey) -> Principal | None:
        """A hit while the cache is untrusted: re-read the record, skip argon2 if unchanged.

        If the store cannot be reached either, nobody can change access through it, so the
        cached principal stands (a partition of this process alone is the limit: README).
        None means "verify from scratch" (the key was rotated).
        """
        self._metrics.cache_revalidations += 1
        epoch = self._cache.epoch
        try:
            loaded = await self._store.load_principal(parsed.key_id)
        except STORE_ERRORS:
            self._metrics.store_errors += 1
            return entry.principal
        if loaded is None or generation(loaded[1].current) != entry.hash_generation:
            self._cache.evict_key(parsed.key_id)
            return None
        principal = loaded[0]
        self._cache.put(parsed.key_id, replace(entry, principal=principal), epoch=epoch)
        return principal

    async def _verify(
        self, hashes: KeyHashes, full_key: str, fingerprint: bytes
    ) -> VerifiedSecret | None:
        loop = asyncio.get_running_loop()
        self._metrics.argon2_verifications += 1
        if await loop.run_in_executor(
            self._executor, self._hasher.verify, hashes.current, full_key
        ):
            return VerifiedSecret(fingerprint, None)
        if hashes.previous is not None and _within(hashes.previous_expires_at):
            self._metrics.argon2_verifications += 1
            ok = await loop.run_in_executor(
                self._executor, self._hasher.verify, hashes.previous, full_key
            )
            if ok:
                return VerifiedSecret(fingerprint, hashes.previous_expires_at)
        return None


@functools.lru_cache(maxsize=16384)
def _parse(token: str) -> tuple[keys.ParsedKey | None, bytes]:
    """Parse and fingerprint a credential, remembered per distinct value: a client repeats its
    key on every request, and both are pure functions of it. Bounded, so garbage only churns."""
    parsed = keys.parse(token)
    return parsed, keys.fingerprint(parsed.full) if parsed is not None else b""


def _within(valid_until: datetime | None) -> bool:
    return valid_until is None or datetime.now(UTC) < valid_until
