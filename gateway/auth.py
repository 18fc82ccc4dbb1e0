"""Authentication: from a request's credential to a verified Principal.

identify (shape + checksum, no I/O for garbage) -> cache -> throttle reservation -> negative
cache -> Postgres by key id -> argon2 verify in a thread, queued fairly -> cache. Concurrent
misses for the same key share one lookup and one verification.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import NoReturn

import asyncpg

from gateway import keys
from gateway.cache import CachedKey, KeyCache, VerifiedSecret, generation
from gateway.errors import invalid_key, store_unavailable
from gateway.metrics import Metrics
from gateway.models import KeyHashes, Principal
from gateway.store import Store
from gateway.throttle import FailureThrottle, VerifyQueue

log = logging.getLogger("keystile.auth")

# Distinct well-formed credentials remembered with their parse (see Authenticator._identify).
IDENTIFIED_MAX = 16384

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


@dataclass(frozen=True, slots=True)
class KeyRef:
    """What a well-formed credential names, and its in-memory digest; never the key itself."""

    user_id: str
    key_id: str
    fingerprint: bytes


class Authenticator:
    def __init__(
        self,
        *,
        store: Store,
        cache: KeyCache,
        hasher: keys.KeyHasher,
        metrics: Metrics,
        verify_concurrency: int,
    ) -> None:
        self._store = store
        self._cache = cache
        self._hasher = hasher
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(verify_concurrency, thread_name_prefix="argon2")
        self._queue = VerifyQueue(verify_concurrency)
        self._inflight: dict[bytes, asyncio.Task[Principal | None]] = {}
        # digest of a credential -> its parse: a client repeats its key on every request, and
        # checking the checksum costs several microseconds. Keyed by digest and holding ids
        # only, so no key lives here; bounded, and only well-formed keys get in.
        self._identified: dict[bytes, KeyRef] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def authenticate(
        self, token: str | None, client: str, throttle: FailureThrottle
    ) -> Principal:
        """The verified principal, or ApiError 401 (bad key), 429 (too many failures from
        this client or for this key id) or 503 (store down and key not cached). `throttle`
        is the calling plane's: failures on one plane do not lock a client out of the other.

        Whether the key may be used *now* (status, expiry, user) is policy.check_usable's call.
        """
        ref = self._identify(token) if token else None
        if ref is None:
            throttle.failed(client)
            self._refuse()
        entry = self._cache.get(ref.key_id)
        if entry is not None:
            secret = entry.match(ref.fingerprint)
            if secret is not None and _within(secret.valid_until):
                if self._cache.trusted:
                    self._metrics.cache_hits.inc()
                    return entry.principal
                revalidated = await self._revalidate(ref, entry)
                if revalidated is not None:
                    return revalidated
        self._metrics.cache_misses.inc()
        assert token is not None
        shared = self._inflight.get(ref.fingerprint)
        if shared is not None:  # the same credential is being verified: share that answer
            principal = await asyncio.shield(shared)
        else:
            principal = await self._verify_once(ref, token, client, throttle)
        if principal is None:
            self._refuse()
        return principal

    async def _verify_once(
        self, ref: KeyRef, token: str, client: str, throttle: FailureThrottle
    ) -> Principal | None:
        """Verify within the client's budget: the attempt counts as a failure if it fails."""
        attempt = throttle.reserve(client, ref.key_id)
        try:
            principal = None
            if not self._cache.is_known_bad(ref.fingerprint):
                principal = await self._single_flight(ref, token, attempt.clean)
        except BaseException:
            attempt.release()  # neither a success nor a failure: the store was down, or cancelled
            raise
        if principal is None:
            attempt.failed()
        else:
            attempt.release()
        return principal

    def _identify(self, token: str) -> KeyRef | None:
        if len(token) > keys.MAX_KEY_LENGTH or not token.isascii():
            return None
        digest = keys.fingerprint(token)
        ref = self._identified.get(digest)
        if ref is not None:
            return ref
        parsed = keys.parse(token)
        if parsed is None:
            return None
        identified = self._identified
        if len(identified) >= IDENTIFIED_MAX:
            del identified[next(iter(identified))]  # the oldest
        ref = identified[digest] = KeyRef(parsed.user_id, parsed.key_id, digest)
        return ref

    def _refuse(self) -> NoReturn:
        self._metrics.auth_failures.inc()
        raise invalid_key()

    async def _single_flight(self, ref: KeyRef, token: str, clean: bool) -> Principal | None:
        # The lookup runs as its own task, so a caller that goes away (client disconnect)
        # does not cancel it for the others waiting on the same key.
        task = self._inflight.get(ref.fingerprint)
        if task is None:
            task = asyncio.create_task(self._load_and_verify(ref, token, clean))
            self._inflight[ref.fingerprint] = task
            task.add_done_callback(lambda done: self._finished(ref.fingerprint, done))
        return await asyncio.shield(task)

    def _finished(self, fingerprint: bytes, task: asyncio.Task[Principal | None]) -> None:
        self._inflight.pop(fingerprint, None)
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter still gets it re-raised

    async def _load_and_verify(self, ref: KeyRef, token: str, clean: bool) -> Principal | None:
        epoch = self._cache.epoch
        try:
            loaded = await self._store.load_principal(ref.key_id)
        except STORE_ERRORS as exc:
            self._metrics.store_errors.inc()
            log.warning("key store unreachable: %s", type(exc).__name__)
            raise store_unavailable() from None
        if loaded is None or loaded[0].key.user_id != ref.user_id:
            self._cache.remember_bad(ref.fingerprint)
            return None
        principal, hashes = loaded
        secret = await self._verify(hashes, token, ref.fingerprint, clean)
        if secret is None:
            self._cache.remember_bad(ref.fingerprint)
            return None
        entry = CachedKey.of(principal, hashes.current, secret)
        self._cache.put(ref.key_id, entry, epoch=epoch)
        return principal

    async def _revalidate(self, ref: KeyRef, entry: CachedKey) -> Principal | None:
        """A hit while the cache is untrusted: re-read the record, skip argon2 if unchanged.

        If the store cannot be reached either, nobody can change access through it, so the
        cached principal stands (a partition of this process alone is the limit: README).
        None means "verify from scratch" (the key was rotated).
        """
        self._metrics.cache_revalidations.inc()
        epoch = self._cache.epoch
        try:
            loaded = await self._store.load_principal(ref.key_id)
        except STORE_ERRORS:
            self._metrics.store_errors.inc()
            return entry.principal
        if loaded is None or generation(loaded[1].current) != entry.hash_generation:
            self._cache.evict_key(ref.key_id)
            return None
        principal = loaded[0]
        self._cache.put(ref.key_id, replace(entry, principal=principal), epoch=epoch)
        return principal

    async def _verify(
        self, hashes: KeyHashes, full_key: str, fingerprint: bytes, clean: bool
    ) -> VerifiedSecret | None:
        if await self._argon2(hashes.current, full_key, clean):
            return VerifiedSecret(fingerprint, None)
        in_grace = hashes.previous is not None and _within(hashes.previous_expires_at)
        if in_grace and await self._argon2(hashes.previous or "", full_key, clean):
            return VerifiedSecret(fingerprint, hashes.previous_expires_at)
        return None

    async def _argon2(self, stored_hash: str, full_key: str, clean: bool) -> bool:
        """One verification in the bounded thread pool, waiting its turn in the fair queue."""
        await self._queue.acquire(clean)
        try:
            self._metrics.argon2_verifications.inc()
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            verified = await loop.run_in_executor(
                self._executor, self._hasher.verify, stored_hash, full_key
            )
            self._metrics.argon2_seconds.observe(time.perf_counter() - started)
            return verified
        finally:
            self._queue.release()


def _within(valid_until: datetime | None) -> bool:
    return valid_until is None or datetime.now(UTC) < valid_until
