"""The key store as a service: mint, change and revoke keys and users, without HTTP.

Wraps `Store` with what a change needs beyond SQL: minting and hashing secrets (off the event
loop), and evicting this process's cache right after commit so its next request sees the
change. Other processes learn of it through the NOTIFY each transaction sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway import keys
from gateway.cache import KeyCache
from gateway.models import ApiKey, User, Workspace
from gateway.store import Actor, NotFound, Store


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key record plus the full key: the only object that ever holds the full key."""

    record: ApiKey
    key: str

    def __repr__(self) -> str:
        return f"IssuedKey(record={self.record!r}, key='<hidden>')"


class Keyring:
    def __init__(self, store: Store, cache: KeyCache, hasher: keys.KeyHasher) -> None:
        self.store = store
        self._cache = cache
        self._hasher = hasher

    async def _hash(self, full_key: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, full_key)

    # --- workspaces and users ---

    async def ensure_workspace(self, name: str) -> Workspace:
        existing = await self.store.workspace_by_name(name)
        if existing is not None:
            return existing
        return await self.store.create_workspace(keys.new_id(), name)

    async def create_user(
        self,
        actor: Actor,
        *,
        email: str,
        display_name: str = "",
        role: str = "member",
        servers: Sequence[str] = (),
        bootstrap: bool = False,
        tools: Sequence[str] | None = None,
    ) -> User:
        return await self.store.create_user(
            actor,
            keys.new_id(),
            email=email,
            display_name=display_name,
            role=role,
            servers=servers,
            bootstrap=bootstrap,
            tools=tools,
        )

    async def set_user_servers(self, actor: Actor, user_id: str, servers: Sequence[str]) -> User:
        user = await self.store.set_user_servers(actor, user_id, servers)
        self._cache.evict_user(user_id)
        return user

    async def set_user_tools(self, actor: Actor, user_id: str, tools: Sequence[str] | None) -> User:
        user = await self.store.set_user_tools(actor, user_id, tools)
        self._cache.evict_user(user_id)
        return user

    async def update_user(self, actor: Actor, user_id: str, changes: Mapping[str, Any]) -> User:
        user = await self.store.update_user(actor, user_id, changes)
        self._cache.evict_user(user_id)
        return user

    async def delete_user(self, actor: Actor, user_id: str) -> None:
        await self.store.delete_user(actor, user_id)
        self._cache.evict_user(user_id)

    # --- keys ---

    async def create_key(
        self,
        actor: Actor,
        *,
        user_id: str,
        name: str,
        description: str = "",
        servers: Sequence[str] = ("*",),
        permissions: Sequence[str] = ("mcp",),
        valid_from: datetime | None = None,
        expires_at: datetime | None = None,
        rate_limit: Mapping[str, int] | None = None,
        allowed_cidrs: Sequence[str] | None = None,
        is_active: bool = True,
        tools: Sequence[str] | None = None,
        allowed_origins: Sequence[str] | None = None,
    ) -> IssuedKey:
        key_id = keys.new_id()
        minted = keys.generate(user_id, key_id)
        record = await self.store.create_key(
            actor,
            key_id=key_id,
            user_id=user_id,
            name=name,
            description=description,
            servers=servers,
            permissions=permissions,
            valid_from=valid_from,
            expires_at=expires_at,
            secret_hash=await self._hash(minted.full),
            secret_prefix=minted.secret[:4],
            rate_limit=rate_limit,
            allowed_cidrs=allowed_cidrs,
            is_active=is_active,
            tools=tools,
            allowed_origins=allowed_origins,
        )
        return IssuedKey(record, minted.full)

    async def update_key(self, actor: Actor, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        record = await self.store.update_key(actor, key_id, changes)
        self._cache.evict_key(key_id)
        return record

    async def revoke_key(self, actor: Actor, key_id: str) -> ApiKey:
        record = await self.store.revoke_key(actor, key_id)
        self._cache.evict_key(key_id)
        return record

    async def rotate_key(self, actor: Actor, key_id: str, *, grace_seconds: float = 0) -> IssuedKey:
        current = await self.store.key(actor.workspace_id, key_id)
        if current is None or current.revoked_at is not None:
            raise NotFound(key_id)
        minted = keys.generate(current.user_id, key_id)
        record = await self.store.rotate_key(
            actor,
            key_id,
            secret_hash=await self._hash(minted.full),
            secret_prefix=minted.secret[:4],
            grace_seconds=grace_seconds,
        )
        self._cache.evict_key(key_id)
        return IssuedKey(record, minted.full)
