"""The verified-key cache: bounded, with TTL, negative entries and invalidation.

Positive entries map a key id to its principal and the fingerprints of the secrets that have
been verified for it (an OAuth grant is a key: its entry holds its verified access tokens);
a hit costs a dict lookup and a constant-time digest comparison, no database and no argon2.
Negative entries remember fingerprints of keys that failed, briefly.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from cachetools import LRUCache, TTLCache

from gateway.models import Principal, User, Workspace


@dataclass(frozen=True, slots=True)
class VerifiedSecret:
    fingerprint: bytes
    # Set for a previous secret inside its rotation grace period, and for an OAuth access
    # token (its expiry): past it, the secret is verified again (and refused).
    valid_until: datetime | None
    # An OAuth access token's bound server: it is accepted for that server's MCP route only.
    # None for a key's secret.
    server: str | None = None


@dataclass(frozen=True, slots=True)
class CachedKey:
    principal: Principal
    # A short digest of the current argon2 hash: entries from different rotations never merge.
    hash_generation: bytes
    secrets: tuple[VerifiedSecret, ...]

    @classmethod
    def of(cls, principal: Principal, current_hash: str, secret: VerifiedSecret) -> CachedKey:
        return cls(principal, generation(current_hash), (secret,))

    def match(self, fingerprint: bytes) -> VerifiedSecret | None:
        found = None
        for secret in self.secrets:  # compare against all, so timing says nothing of position
            if hmac.compare_digest(secret.fingerprint, fingerprint):
                found = secret
        return found


def generation(current_hash: str) -> bytes:
    return hashlib.blake2b(current_hash.encode(), digest_size=8).digest()


class KeyCache:
    def __init__(
        self,
        *,
        max_entries: int,
        ttl_seconds: float,
        negative_max_entries: int,
        negative_ttl_seconds: float,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: TTLCache[str, CachedKey] = TTLCache(max_entries, ttl_seconds, timer=timer)
        self._negative: TTLCache[bytes, bool] | None = (
            TTLCache(negative_max_entries, negative_ttl_seconds, timer=timer)
            if negative_ttl_seconds > 0
            else None
        )
        # Bumped by every eviction: a lookup that started before an eviction must not store
        # what it read, since it may predate the change that caused the eviction.
        self.epoch = 0
        # False while no invalidation listener is subscribed: hits are then re-checked
        # against the store, since a change may have gone unheard.
        self.trusted = False
        self._users: LRUCache[str, User] = LRUCache(max_entries)
        self._workspaces: LRUCache[str, Workspace] = LRUCache(1024)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key_id: str) -> CachedKey | None:
        try:  # one lookup; TTLCache.get would check expiry twice (contains, then getitem)
            return self._entries[key_id]
        except KeyError:
            return None

    def put(self, key_id: str, entry: CachedKey, *, epoch: int) -> bool:
        """Store `entry` unless an eviction happened since `epoch` was read."""
        if epoch != self.epoch:
            return False
        entry = replace(entry, principal=self._shared(entry.principal))
        if key_id == entry.principal.key.id:
            key_id = entry.principal.key.id  # keep one copy of the id string, not two
        existing = self._entries.get(key_id)
        if existing is not None and existing.hash_generation == entry.hash_generation:
            known = {s.fingerprint for s in entry.secrets}
            kept = tuple(s for s in existing.secrets if s.fingerprint not in known)
            entry = CachedKey(entry.principal, entry.hash_generation, entry.secrets + kept[:3])
        self._entries[key_id] = entry
        return True

    def _shared(self, principal: Principal) -> Principal:
        """One User and one Workspace object per id across entries, while they are equal:
        a user's many keys (and a workspace's many users) then cost their fields once."""
        user = self._users.get(principal.user.id)
        if user != principal.user:
            user = self._users[principal.user.id] = principal.user
        workspace = self._workspaces.get(principal.workspace.id)
        if workspace != principal.workspace:
            workspace = self._workspaces[principal.workspace.id] = principal.workspace
        if user is principal.user and workspace is principal.workspace:
            return principal
        return Principal(principal.key, user, workspace)

    def is_known_bad(self, fingerprint: bytes) -> bool:
        return self._negative is not None and fingerprint in self._negative

    def remember_bad(self, fingerprint: bytes) -> None:
        if self._negative is not None:
            self._negative[fingerprint] = True

    def evict_key(self, key_id: str) -> None:
        self.epoch += 1
        self._entries.pop(key_id, None)

    def evict_user(self, user_id: str) -> None:
        self.epoch += 1
        self._users.pop(user_id, None)
        stale = [k for k, v in self._entries.items() if v.principal.user.id == user_id]
        for key_id in stale:
            self._entries.pop(key_id, None)

    # Negative entries are never evicted early: they hold fingerprints of full keys that were
    # unknown or wrong, and no admin change can make such a key valid (new keys and rotations
    # mint fresh secrets).

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        if self._negative is not None:
            self._negative.clear()
