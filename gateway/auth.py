"""Authentication: from a request's credential to a verified Principal.

identify (shape + checksum, no I/O for garbage) -> cache -> throttle reservation -> negative
cache -> Postgres by key id -> argon2 verify in a thread, queued fairly -> cache. Concurrent
misses for the same key share one lookup and one verification.

An OAuth access token (SPEC §9) takes the same path: its format names its grant, which is a
key record, so it finds the grant's cache entry; on a miss the store recognises it by its
SHA-256 (no argon2), and the entry remembers it with its expiry and its bound server. A token
is accepted only for the server it is bound to (`resource`); everywhere else it is refused as
a bad key would be.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import NoReturn, Protocol, TypeVar

import asyncpg

from gateway import keys
from gateway.cache import CachedKey, KeyCache, VerifiedSecret, generation
from gateway.errors import invalid_key, store_unavailable
from gateway.metrics import Metrics
from gateway.models import KeyHashes, Principal, VerifiedAccess
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
    key_id: str  # a key's id, or an access token's grant's
    fingerprint: bytes
    kind: keys.Kind  # "key" or "oauth" (an access token); refresh tokens are never bearers


class AccessTokens(Protocol):
    """Where access tokens are recognised (gateway.oauth.store): by their grant and digest,
    unexpired. None in an Authenticator means OAuth is off: tokens are refused unread."""

    async def load_access(self, grant_id: str, token_hash: bytes) -> VerifiedAccess | None: ...


# A verified credential: whom it speaks for, and the secret as the cache remembers it.
Verified = tuple[Principal, VerifiedSecret]
T = TypeVar("T")


class Authenticator:
    def __init__(
        self,
        *,
        store: Store,
        cache: KeyCache,
        hasher: keys.KeyHasher,
        metrics: Metrics,
        verify_concurrency: int,
        tokens: AccessTokens | None = None,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._cache = cache
        self._hasher = hasher
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(verify_concurrency, thread_name_prefix="argon2")
        self._queue = VerifyQueue(verify_concurrency)
        self._inflight: dict[bytes, asyncio.Task[Verified | None]] = {}
        # digest of a credential -> its parse: a client repeats its key on every request, and
        # checking the checksum costs several microseconds. Keyed by digest and holding ids
        # only, so no key lives here; bounded, and only well-formed keys get in.
        self._identified: dict[bytes, KeyRef] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def authenticate(
        self,
        token: str | None,
        client: str,
        throttle: FailureThrottle,
        *,
        resource: str | None = None,
    ) -> Principal:
        """The verified principal, or ApiError 401 (bad key), 429 (too many failures from
        this client or for this key id) or 503 (store down and key not cached). `throttle`
        is the calling plane's: failures on one plane do not lock a client out of the other.

        `resource` is the server whose MCP route the request is for (None on every other
        route, and on the admin plane): an OAuth access token is accepted there only.
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
                self._require_bound(secret, resource)
                if self._cache.trusted:
                    self._metrics.cache_hit()
                    return entry.principal
                revalidated = await self._revalidate(ref, entry)
                if revalidated is not None:
                    return revalidated
        self._metrics.cache_misses.inc()
        assert token is not None
        shared = self._inflight.get(ref.fingerprint)
        if shared is not None:  # the same credential is being verified: share that answer
            verified = await asyncio.shield(shared)
        else:
            verified = await self._verify_once(ref, token, client, throttle)
        if verified is None:
            self._refuse()
        principal, secret = verified
        self._require_bound(secret, resource)
        return principal

    def _require_bound(self, secret: VerifiedSecret, resource: str | None) -> None:
        """An access token is for its one server's MCP route; a key's secret is bound to none.
        A refusal is a 401 like any bad credential: the token is not valid *here*, and a 403
        would send an OAuth client back through consent for nothing."""
        if secret.server is not None and secret.server != resource:
            self._refuse("The access token is not valid for this resource.")

    async def _verify_once(
        self, ref: KeyRef, token: str, client: str, throttle: FailureThrottle
    ) -> Verified | None:
        """Verify within the client's budget: the attempt counts as a failure if it fails."""
        attempt = await throttle.reserve(client, ref.key_id)
        try:
            verified = None
            if not self._cache.is_known_bad(ref.fingerprint):
                verified = await self._single_flight(ref, token, attempt.clean)
        except BaseException:
            attempt.release()  # neither a success nor a failure: the store was down, or cancelled
            raise
        if verified is None:
            attempt.failed()
        else:
            attempt.release()
        return verified

    def _identify(self, token: str) -> KeyRef | None:
        if len(token) > keys.MAX_KEY_LENGTH or not token.isascii():
            return None
        digest = keys.fingerprint(token)
        ref = self._identified.get(digest)
        if ref is not None:
            return ref
        parsed = keys.parse(token)
        if parsed is None or not self._bearer(parsed.kind):
            return None
        identified = self._identified
        if len(identified) >= IDENTIFIED_MAX:
            del identified[next(iter(identified))]  # the oldest
        kind: keys.Kind = "oauth" if parsed.kind == "oauth" else "key"
        ref = identified[digest] = KeyRef(parsed.user_id, parsed.key_id, digest, kind)
        return ref

    def _bearer(self, kind: keys.Kind) -> bool:
        """Keys always; access tokens while OAuth is on; refresh tokens never (they go to the
        token endpoint only)."""
        return kind == "key" or (kind == "oauth" and self._tokens is not None)

    def _refuse(self, message: str | None = None) -> NoReturn:
        self._metrics.auth_failures.inc()
        raise invalid_key(message) if message is not None else invalid_key()

    async def _single_flight(self, ref: KeyRef, token: str, clean: bool) -> Verified | None:
        # The lookup runs as its own task, so a caller that goes away (client disconnect)
        # does not cancel it for the others waiting on the same key.
        task = self._inflight.get(ref.fingerprint)
        if task is None:
            task = asyncio.create_task(self._load_and_verify(ref, token, clean))
            self._inflight[ref.fingerprint] = task
            task.add_done_callback(lambda done: self._finished(ref.fingerprint, done))
        return await asyncio.shield(task)

    def _finished(self, fingerprint: bytes, task: asyncio.Task[Verified | None]) -> None:
        self._inflight.pop(fingerprint, None)
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter still gets it re-raised

    async def _load_and_verify(self, ref: KeyRef, token: str, clean: bool) -> Verified | None:
        epoch = self._cache.epoch
        if ref.kind == "oauth":
            verified, current_hash = await self._verify_access(ref, token)
        else:
            verified, current_hash = await self._verify_key(ref, token, clean)
        if verified is None:
            self._cache.remember_bad(ref.fingerprint)
            return None
        principal, secret = verified
        self._cache.put(ref.key_id, CachedKey.of(principal, current_hash, secret), epoch=epoch)
        return verified

    async def _verify_key(
        self, ref: KeyRef, token: str, clean: bool
    ) -> tuple[Verified | None, str]:
        """A key: its record by id, then argon2 against its hashes."""
        loaded = await self._load(self._store.load_principal(ref.key_id))
        if loaded is None or not _named(loaded[0], ref):
            return None, ""
        principal, hashes = loaded
        secret = await self._verify(hashes, token, ref.fingerprint, clean)
        return ((principal, secret) if secret is not None else None), hashes.current

    async def _verify_access(self, ref: KeyRef, token: str) -> tuple[Verified | None, str]:
        """An access token: its grant and its digest, in one lookup; no argon2."""
        assert self._tokens is not None  # _identify admits tokens only while OAuth is on
        found = await self._load(self._tokens.load_access(ref.key_id, keys.token_hash(token)))
        if found is None or not _named(found.principal, ref):
            return None, ""
        secret = VerifiedSecret(ref.fingerprint, found.expires_at, found.server)
        return (found.principal, secret), found.hashes.current

    async def _load(self, lookup: Awaitable[T]) -> T:
        try:
            return await lookup
        except STORE_ERRORS as exc:
            self._metrics.store_errors.inc()
            log.warning("key store unreachable: %s", type(exc).__name__)
            raise store_unavailable() from None

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


def _named(principal: Principal, ref: KeyRef) -> bool:
    """The record is the one the credential names: its user, and its kind (a key's format
    never reaches a grant, nor a token's a key)."""
    return principal.key.user_id == ref.user_id and principal.key.kind == ref.kind


def _within(valid_until: datetime | None) -> bool:
    return valid_until is None or datetime.now(UTC) < valid_until
