"""All SQL: named statements and the transactions that use them.

Every change that can narrow access is one transaction that also writes its audit row and
publishes the affected id on the `keystile_invalidate` channel, so no instance keeps serving
a stale decision once the transaction commits.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from gateway.db import Connection
from gateway.models import ApiKey, KeyHashes, Principal, User, Workspace

INVALIDATE_CHANNEL = "keystile_invalidate"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, for the audit trail. user_id None means the system (CLI)."""

    workspace_id: str
    user_id: str | None = None
    key_id: str | None = None


class NotFound(Exception):
    """The row a change names is not there (or no longer live: deleted user, revoked key).

    Deliberately not a LookupError: callers answer 404 for this alone, so a KeyError or
    IndexError from a bug surfaces as the bug it is instead of as "no such record".
    """


KEY_COLUMNS = """
    k.id, k.user_id, k.workspace_id, k.name, k.description, k.servers, k.permissions,
    k.valid_from, k.expires_at, k.is_active, k.secret_prefix, k.created_at, k.updated_at,
    k.last_used_at, k.revoked_at, k.rate_limit, k.allowed_cidrs, k.allowed_origins, k.tools,
    k.kind, k.client_id, k.client_name
"""
_USER_COLUMNS = """
    u.id, u.workspace_id, u.email, u.display_name, u.role, u.is_active, u.created_at,
    u.deleted_at, u.tools,
    COALESCE((SELECT array_agg(g.server ORDER BY g.server) FROM server_grants g
              WHERE g.user_id = u.id), '{}') AS servers
"""

# A key with its user and workspace: what a verified request speaks for (principal_of reads
# it). The OAuth store selects the same, joined to a grant's token (gateway.oauth.store).
PRINCIPAL_COLUMNS = f"""
       {KEY_COLUMNS}, k.secret_hash, k.previous_hash, k.previous_expires_at,
       u.email AS u_email, u.display_name AS u_display_name, u.role AS u_role,
       u.is_active AS u_is_active, u.created_at AS u_created_at, u.deleted_at AS u_deleted_at,
       u.tools AS u_tools,
       COALESCE((SELECT array_agg(g.server ORDER BY g.server) FROM server_grants g
                 WHERE g.user_id = u.id), '{{}}') AS u_servers,
       w.name AS w_name, w.created_at AS w_created_at
"""
PRINCIPAL_FROM = """
FROM api_keys k
JOIN users u ON u.id = k.user_id
JOIN workspaces w ON w.id = k.workspace_id
"""
LOAD_PRINCIPAL = f"SELECT {PRINCIPAL_COLUMNS} {PRINCIPAL_FROM} WHERE k.id = $1"

TOUCH_LAST_USED = """
UPDATE api_keys AS k SET last_used_at = GREATEST(k.last_used_at, v.used_at)
FROM unnest($1::text[], $2::timestamptz[]) AS v(id, used_at)
WHERE k.id = v.id
"""

INSERT_WORKSPACE = "INSERT INTO workspaces (id, name) VALUES ($1, $2) RETURNING *"
WORKSPACE_BY_NAME = "SELECT * FROM workspaces WHERE name = $1"
WORKSPACE_BY_ID = "SELECT * FROM workspaces WHERE id = $1"

INSERT_USER = """
INSERT INTO users (id, workspace_id, email, display_name, role, is_bootstrap, tools)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
USER_BY_ID = f"SELECT {_USER_COLUMNS} FROM users u WHERE u.id = $1 AND u.workspace_id = $2"
USERS_IN_WORKSPACE = f"""
SELECT {_USER_COLUMNS} FROM users u
WHERE u.workspace_id = $1 AND (u.deleted_at IS NULL OR $2) ORDER BY u.created_at, u.id
"""
BOOTSTRAP_ADMIN = """
SELECT u.id FROM users u
WHERE u.workspace_id = $1 AND u.is_bootstrap AND u.deleted_at IS NULL
"""
SET_USER_TOOLS = """
UPDATE users SET tools = $3::text[], updated_at = now() WHERE id = $1 AND workspace_id = $2
"""
DELETE_GRANTS = "DELETE FROM server_grants WHERE user_id = $1"
INSERT_GRANTS = "INSERT INTO server_grants (user_id, server) SELECT $1, unnest($2::text[])"

INSERT_KEY = f"""
INSERT INTO api_keys AS k (id, user_id, workspace_id, name, description, servers, permissions,
                           valid_from, expires_at, secret_hash, secret_prefix, rate_limit,
                           allowed_cidrs, is_active, tools, allowed_origins)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
RETURNING {KEY_COLUMNS}
"""
KEY_BY_ID = f"SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1 AND k.workspace_id = $2"
REVOKE_KEY = f"""
UPDATE api_keys AS k SET revoked_at = now(), is_active = false, updated_at = now(),
       previous_hash = NULL, previous_expires_at = NULL
WHERE k.id = $1 AND k.workspace_id = $2 AND k.revoked_at IS NULL
RETURNING {KEY_COLUMNS}
"""
ROTATE_KEY = f"""
UPDATE api_keys AS k
SET previous_hash = CASE WHEN $3::float8 > 0 THEN k.secret_hash END,
    previous_expires_at = CASE WHEN $3::float8 > 0
                               THEN now() + make_interval(secs => $3::float8) END,
    secret_hash = $4, secret_prefix = $5, updated_at = now()
WHERE k.id = $1 AND k.workspace_id = $2 AND k.revoked_at IS NULL
RETURNING {KEY_COLUMNS}
"""
INSERT_AUDIT = """
INSERT INTO audit_events (workspace_id, actor_user_id, actor_key_id, action, target_type,
                          target_id, changes)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
"""
NOTIFY = "SELECT pg_notify($1, $2)"
AUDIT_PAGE = """
SELECT id, action, target_type, target_id, actor_user_id, actor_key_id, changes, created_at
FROM audit_events WHERE workspace_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3
"""

# Columns a PATCH may change, with their SQL casts; the values are bound, never interpolated.
KEY_UPDATABLE = {
    "name": "text",
    "description": "text",
    "servers": "text[]",
    "permissions": "text[]",
    "valid_from": "timestamptz",
    "expires_at": "timestamptz",
    "is_active": "boolean",
    "rate_limit": "jsonb",
    "allowed_cidrs": "text[]",
    "allowed_origins": "text[]",
    "tools": "text[]",
}
USER_UPDATABLE = {
    "display_name": "text",
    "role": "text",
    "is_active": "boolean",
    "email": "text",
    "tools": "text[]",
}


class Store:
    """Typed access to the Keystile schema over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- the data plane's only reads and writes ---

    async def load_principal(self, key_id: str) -> tuple[Principal, KeyHashes] | None:
        row = await self.pool.fetchrow(LOAD_PRINCIPAL, key_id)
        return principal_of(row) if row is not None else None

    async def touch_last_used(self, used: Mapping[str, datetime]) -> None:
        await self.pool.execute(TOUCH_LAST_USED, list(used), list(used.values()))

    # --- workspaces and users ---

    async def create_workspace(self, workspace_id: str, name: str) -> Workspace:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(INSERT_WORKSPACE, workspace_id, name)
            assert row is not None
            await audit(conn, Actor(workspace_id), "workspace.create", "workspace", row["id"], {})
            return _workspace(row)

    async def workspace_by_name(self, name: str) -> Workspace | None:
        row = await self.pool.fetchrow(WORKSPACE_BY_NAME, name)
        return _workspace(row) if row is not None else None

    async def workspace(self, workspace_id: str) -> Workspace | None:
        row = await self.pool.fetchrow(WORKSPACE_BY_ID, workspace_id)
        return _workspace(row) if row is not None else None

    async def create_user(
        self,
        actor: Actor,
        user_id: str,
        *,
        email: str,
        display_name: str = "",
        role: str = "member",
        servers: Sequence[str] = (),
        bootstrap: bool = False,
        tools: Sequence[str] | None = None,
    ) -> User:
        tool_list = list(tools) if tools is not None else None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                INSERT_USER,
                user_id,
                actor.workspace_id,
                email,
                display_name,
                role,
                bootstrap,
                tool_list,
            )
            await conn.execute(INSERT_GRANTS, user_id, list(servers))
            changes = {"email": email, "role": role, "servers": list(servers), "tools": tool_list}
            await audit(conn, actor, "user.create", "user", user_id, changes)
            user = await _fetch_user(conn, user_id, actor.workspace_id)
            assert user is not None
            return user

    async def user(self, workspace_id: str, user_id: str) -> User | None:
        async with self.pool.acquire() as conn:
            return await _fetch_user(conn, user_id, workspace_id)

    async def users(self, workspace_id: str, *, include_deleted: bool = False) -> list[User]:
        rows = await self.pool.fetch(USERS_IN_WORKSPACE, workspace_id, include_deleted)
        return [_user(r) for r in rows]

    async def bootstrap_admin_id(self, workspace_id: str) -> str | None:
        value = await self.pool.fetchval(BOOTSTRAP_ADMIN, workspace_id)
        return str(value) if value is not None else None

    async def set_user_servers(self, actor: Actor, user_id: str, servers: Sequence[str]) -> User:
        async with self.pool.acquire() as conn, conn.transaction():
            before = await _fetch_user(conn, user_id, actor.workspace_id, lock=True)
            if before is None:
                raise NotFound(user_id)
            await conn.execute(DELETE_GRANTS, user_id)
            await conn.execute(INSERT_GRANTS, user_id, sorted(set(servers)))
            changes = {"servers": {"from": list(before.servers), "to": sorted(set(servers))}}
            await audit(conn, actor, "user.servers", "user", user_id, changes)
            await notify(conn, "user", user_id)
            after = await _fetch_user(conn, user_id, actor.workspace_id)
            assert after is not None
            return after

    async def set_user_tools(self, actor: Actor, user_id: str, tools: Sequence[str] | None) -> User:
        async with self.pool.acquire() as conn, conn.transaction():
            before = await _fetch_user(conn, user_id, actor.workspace_id, lock=True)
            if before is None or before.deleted_at is not None:
                raise NotFound(user_id)
            value = list(tools) if tools is not None else None
            await conn.execute(SET_USER_TOOLS, user_id, actor.workspace_id, value)
            changes = {"tools": {"from": _jsonable(before.tools), "to": value}}
            await audit(conn, actor, "user.tools", "user", user_id, changes)
            await notify(conn, "user", user_id)
            after = await _fetch_user(conn, user_id, actor.workspace_id)
            assert after is not None
            return after

    async def update_user(self, actor: Actor, user_id: str, changes: Mapping[str, Any]) -> User:
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_admins(conn, actor.workspace_id)
            before = await _fetch_user(conn, user_id, actor.workspace_id, lock=True)
            if before is None or before.deleted_at is not None:
                raise NotFound(user_id)
            leaves = changes.get("role") == "member" or changes.get("is_active") is False
            if leaves:
                await _keep_an_admin(conn, before)
            sql, args = _update_sql("users", USER_UPDATABLE, changes, user_id, actor.workspace_id)
            await conn.execute(sql, *args)
            diff = _diff(before.to_json(), changes)
            await audit(conn, actor, "user.update", "user", user_id, diff)
            await notify(conn, "user", user_id)
            after = await _fetch_user(conn, user_id, actor.workspace_id)
            assert after is not None
            return after

    async def delete_user(self, actor: Actor, user_id: str) -> None:
        """Soft-delete: the row stays for the audit trail, every key of the user stops."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _lock_admins(conn, actor.workspace_id)
            before = await _fetch_user(conn, user_id, actor.workspace_id)
            if before is not None and before.deleted_at is None:
                await _keep_an_admin(conn, before)
            done = await conn.fetchval(
                "UPDATE users SET deleted_at = now(), is_active = false, updated_at = now() "
                "WHERE id = $1 AND workspace_id = $2 AND deleted_at IS NULL RETURNING id",
                user_id,
                actor.workspace_id,
            )
            if done is None:
                raise NotFound(user_id)
            revoked = await conn.fetch(
                "UPDATE api_keys SET revoked_at = now(), is_active = false, updated_at = now() "
                "WHERE user_id = $1 AND revoked_at IS NULL RETURNING id",
                user_id,
            )
            for row in revoked:
                await audit(conn, actor, "key.revoke", "key", row["id"], {"reason": "user.delete"})
            await audit(conn, actor, "user.delete", "user", user_id, {})
            await notify(conn, "user", user_id)

    # --- keys ---

    async def create_key(
        self,
        actor: Actor,
        *,
        key_id: str,
        user_id: str,
        name: str,
        description: str,
        servers: Sequence[str],
        permissions: Sequence[str],
        valid_from: datetime | None,
        expires_at: datetime | None,
        secret_hash: str,
        secret_prefix: str,
        rate_limit: Mapping[str, int] | None = None,
        allowed_cidrs: Sequence[str] | None = None,
        is_active: bool = True,
        tools: Sequence[str] | None = None,
        allowed_origins: Sequence[str] | None = None,
    ) -> ApiKey:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                INSERT_KEY,
                key_id,
                user_id,
                actor.workspace_id,
                name,
                description,
                list(servers),
                list(permissions),
                valid_from,
                expires_at,
                secret_hash,
                secret_prefix,
                json.dumps(rate_limit) if rate_limit is not None else None,
                list(allowed_cidrs) if allowed_cidrs is not None else None,
                is_active,
                list(tools) if tools is not None else None,
                list(allowed_origins) if allowed_origins is not None else None,
            )
            assert row is not None
            key = key_of(row)
            await audit(conn, actor, "key.create", "key", key_id, _key_audit(key))
            # No NOTIFY: nothing anywhere can hold a verdict on a key minted just now (its id
            # and secret are new; bad-key verdicts are kept by the full key's digest). A
            # notice would only evict the key from caches that had just verified it.
            return key

    async def key(self, workspace_id: str, key_id: str) -> ApiKey | None:
        row = await self.pool.fetchrow(KEY_BY_ID, key_id, workspace_id)
        return key_of(row) if row is not None else None

    async def list_keys(
        self,
        workspace_id: str,
        *,
        user_id: str | None = None,
        statuses: Iterable[str] | None = None,
        include_revoked: bool = False,
    ) -> list[ApiKey]:
        clauses = ["k.workspace_id = $1"]
        args: list[Any] = [workspace_id]
        if user_id is not None:
            args.append(user_id)
            clauses.append(f"k.user_id = ${len(args)}")
        if not include_revoked:
            clauses.append("k.revoked_at IS NULL")
        sql = (
            f"SELECT {KEY_COLUMNS} FROM api_keys k WHERE {' AND '.join(clauses)} "
            "ORDER BY k.created_at DESC, k.id"
        )
        keys = [key_of(r) for r in await self.pool.fetch(sql, *args)]
        if statuses is not None:
            wanted = set(statuses)
            now = await self.now()
            keys = [k for k in keys if k.status(now) in wanted]
        return keys

    async def update_key(self, actor: Actor, key_id: str, changes: Mapping[str, Any]) -> ApiKey:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(KEY_BY_ID + " FOR UPDATE", key_id, actor.workspace_id)
            if row is None or row["revoked_at"] is not None:
                raise NotFound(key_id)
            before = key_of(row)
            values = {
                k: json.dumps(v) if k == "rate_limit" and v is not None else v
                for k, v in changes.items()
            }
            sql, args = _update_sql("api_keys", KEY_UPDATABLE, values, key_id, actor.workspace_id)
            await conn.execute(sql, *args)
            action = _key_action(changes)
            diff = _diff(before.to_json(before.updated_at), changes)
            await audit(conn, actor, action, "key", key_id, diff)
            await notify(conn, "key", key_id)
            after = await conn.fetchrow(KEY_BY_ID, key_id, actor.workspace_id)
            assert after is not None
            return key_of(after)

    async def revoke_key(self, actor: Actor, key_id: str) -> ApiKey:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(REVOKE_KEY, key_id, actor.workspace_id)
            if row is None:
                raise NotFound(key_id)
            await audit(conn, actor, "key.revoke", "key", key_id, {})
            await notify(conn, "key", key_id)
            return key_of(row)

    async def rotate_key(
        self,
        actor: Actor,
        key_id: str,
        *,
        secret_hash: str,
        secret_prefix: str,
        grace_seconds: float,
    ) -> ApiKey:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                ROTATE_KEY, key_id, actor.workspace_id, grace_seconds, secret_hash, secret_prefix
            )
            if row is None:
                raise NotFound(key_id)
            changes = {"grace_seconds": grace_seconds}
            await audit(conn, actor, "key.rotate", "key", key_id, changes)
            await notify(conn, "key", key_id)
            return key_of(row)

    async def audit_events(
        self, workspace_id: str, *, before: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Newest first; `before` is the id of the last event of the previous page."""
        rows = await self.pool.fetch(
            AUDIT_PAGE, workspace_id, before if before is not None else 2**62, limit
        )
        return [
            {
                "id": r["id"],
                "action": r["action"],
                "target_type": r["target_type"],
                "target_id": r["target_id"],
                "actor_user_id": r["actor_user_id"],
                "actor_key_id": r["actor_key_id"],
                "changes": json.loads(r["changes"]),
                "created_at": r["created_at"],
            }
            for r in rows
        ]

    async def now(self) -> datetime:
        value = await self.pool.fetchval("SELECT now()")
        assert isinstance(value, datetime)
        return value


class LastAdminError(Exception):
    """The change would leave the workspace without an active admin."""


# --- helpers ---


async def _lock_admins(conn: Connection, workspace_id: str) -> None:
    # Serialises changes that can remove an admin: two concurrent demotions would otherwise
    # each see the other admin and both commit, leaving none.
    await conn.execute(
        "SELECT 1 FROM users WHERE workspace_id = $1 AND role = 'admin' "
        "AND deleted_at IS NULL FOR UPDATE",
        workspace_id,
    )


async def _keep_an_admin(conn: Connection, leaving: User) -> None:
    if leaving.role != "admin" or not leaving.is_active:
        return
    others = await conn.fetchval(
        "SELECT count(*) FROM users WHERE workspace_id = $1 AND role = 'admin' "
        "AND is_active AND deleted_at IS NULL AND id <> $2",
        leaving.workspace_id,
        leaving.id,
    )
    if not others:
        raise LastAdminError(leaving.id)


async def _fetch_user(
    conn: Connection, user_id: str, workspace_id: str, *, lock: bool = False
) -> User | None:
    if lock:
        await conn.execute(
            "SELECT 1 FROM users WHERE id = $1 AND workspace_id = $2 FOR UPDATE",
            user_id,
            workspace_id,
        )
    row = await conn.fetchrow(USER_BY_ID, user_id, workspace_id)
    return _user(row) if row is not None else None


async def audit(
    conn: Connection,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str,
    changes: Mapping[str, Any],
) -> None:
    await conn.execute(
        INSERT_AUDIT,
        actor.workspace_id,
        actor.user_id,
        actor.key_id,
        action,
        target_type,
        target_id,
        json.dumps(changes, default=str),
    )


async def notify(conn: Connection, kind: str, target_id: str) -> None:
    # Delivered only if the transaction commits: exactly the changes that happened.
    await conn.execute(NOTIFY, INVALIDATE_CHANNEL, f"{kind}:{target_id}")


def _update_sql(
    table: str, allowed: Mapping[str, str], changes: Mapping[str, Any], row_id: str, ws: str
) -> tuple[str, list[Any]]:
    unknown = set(changes) - set(allowed)
    if unknown:
        raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
    args: list[Any] = [row_id, ws]
    sets = ["updated_at = now()"]
    for column, value in changes.items():
        args.append(list(value) if isinstance(value, tuple) else value)
        sets.append(f"{column} = ${len(args)}::{allowed[column]}")
    return f"UPDATE {table} SET {', '.join(sets)} WHERE id = $1 AND workspace_id = $2", args


def _diff(before: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: {"from": before.get(name), "to": _jsonable(value)} for name, value in changes.items()
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    return value


def _key_action(changes: Mapping[str, Any]) -> str:
    if set(changes) == {"is_active"}:
        return "key.enable" if changes["is_active"] else "key.disable"
    return "key.update"


def _key_audit(key: ApiKey) -> dict[str, Any]:
    return {
        "is_active": key.is_active,
        "name": key.name,
        "user_id": key.user_id,
        "servers": list(key.servers),
        "permissions": list(key.permissions),
        "valid_from": _jsonable(key.valid_from),
        "expires_at": _jsonable(key.expires_at),
        "tools": _jsonable(key.tools),
    }


@functools.lru_cache(maxsize=4096)
def _shared_tuple(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sys.intern(v) for v in values)


def _shared(values: Sequence[str]) -> tuple[str, ...]:
    """One tuple object per distinct list of names (servers, permissions)."""
    return _shared_tuple(tuple(values))


def principal_of(row: asyncpg.Record) -> tuple[Principal, KeyHashes]:
    """A row selected with PRINCIPAL_COLUMNS as the principal and the hashes verifying it."""
    user = _user(row, id_column="user_id", prefix="u_")
    workspace = Workspace(row["workspace_id"], row["w_name"], row["w_created_at"])
    hashes = KeyHashes(row["secret_hash"], row["previous_hash"], row["previous_expires_at"])
    return Principal(key=key_of(row), user=user, workspace=workspace), hashes


def _workspace(row: asyncpg.Record) -> Workspace:
    return Workspace(row["id"], row["name"], row["created_at"])


def _user(row: asyncpg.Record, *, id_column: str = "id", prefix: str = "") -> User:
    """A users row; in a joined row (PRINCIPAL_COLUMNS) its columns carry `prefix`."""
    return User(
        id=row[id_column],
        workspace_id=row["workspace_id"],
        email=row[prefix + "email"],
        display_name=row[prefix + "display_name"],
        role=row[prefix + "role"],
        is_active=row[prefix + "is_active"],
        created_at=row[prefix + "created_at"],
        servers=tuple(row[prefix + "servers"]),
        deleted_at=row[prefix + "deleted_at"],
        tools=_tools(row[prefix + "tools"]),
    )


def key_of(row: asyncpg.Record) -> ApiKey:
    rate_limit = row["rate_limit"]
    cidrs = row["allowed_cidrs"]
    return ApiKey(
        id=row["id"],
        # Shared across records: cached keys repeat these values many times over.
        user_id=sys.intern(row["user_id"]),
        workspace_id=sys.intern(row["workspace_id"]),
        name=row["name"],
        description=row["description"],
        servers=_shared(row["servers"]),
        permissions=_shared(row["permissions"]),
        valid_from=row["valid_from"],
        expires_at=row["expires_at"],
        is_active=row["is_active"],
        secret_prefix=row["secret_prefix"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        rate_limit=json.loads(rate_limit) if rate_limit is not None else None,
        allowed_cidrs=tuple(cidrs) if cidrs is not None else None,
        allowed_origins=_optional_tuple(row["allowed_origins"]),
        tools=_tools(row["tools"]),
        kind=row["kind"],
        client_id=row["client_id"],
        client_name=row["client_name"],
    )


def _tools(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return _shared(values) if values is not None else None


def _optional_tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values is not None else None
