"""The OAuth SQL: clients, consent requests, codes, grants and their tokens.

A grant is an api_keys row of kind 'oauth' (migration 0004), so it is read back as a key and
revoked as one. Every change that creates or ends a grant is one transaction with its audit row
(`oauth.grant`, `oauth.revoke`, `oauth.refresh_reuse`) and the NOTIFY naming the grant's key id,
so every instance drops it from its cache as for any key. Secrets (codes, tokens, the consent
page's token) are stored only as SHA-256 digests, and looked up by them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from gateway.db import Connection
from gateway.models import ApiKey, Principal, VerifiedAccess
from gateway.store import (
    KEY_COLUMNS,
    PRINCIPAL_COLUMNS,
    PRINCIPAL_FROM,
    Actor,
    audit,
    key_of,
    notify,
    principal_of,
)

# What a grant's secret_hash holds: not an argon2 hash, so no key ever verifies against it.
GRANT_SECRET_MARKER = "oauth-grant"  # noqa: S105 - a marker, deliberately no hash
# Expired rows are kept this long (a code or refresh token presented again within it is still
# recognised as reused), then pruned in batches of PRUNE_BATCH.
KEEP_EXPIRED = "1 day"
PRUNE_BATCH = 10_000

LOAD_ACCESS = f"""
SELECT {PRINCIPAL_COLUMNS}, t.expires_at AS t_expires_at, t.server AS t_server
{PRINCIPAL_FROM}
JOIN oauth_tokens t ON t.grant_id = k.id
WHERE k.id = $1 AND t.token_hash = $2 AND t.kind = 'access' AND k.kind = 'oauth'
  AND t.expires_at > now()
"""
INSERT_CLIENT = """
INSERT INTO oauth_clients (id, client_name, redirect_uris, registered_from)
VALUES ($1, $2, $3, $4)
"""
CLIENT_BY_ID = "SELECT id, client_name, redirect_uris FROM oauth_clients WHERE id = $1"
INSERT_REQUEST = """
INSERT INTO oauth_requests (id_hash, client_id, redirect_uri, state, code_challenge, server,
                            expires_at)
VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7::float8))
"""
_REQUEST_COLUMNS = """
r.client_id, c.client_name, r.redirect_uri, r.state, r.code_challenge, r.server
"""
PENDING_REQUEST = f"""
SELECT {_REQUEST_COLUMNS} FROM oauth_requests r JOIN oauth_clients c ON c.id = r.client_id
WHERE r.id_hash = $1 AND r.decided_at IS NULL AND r.expires_at > now()
"""
# Deciding is a conditional update: of two decisions racing for one page, one wins.
DECIDE_REQUEST = f"""
UPDATE oauth_requests AS r SET decided_at = now()
FROM oauth_clients c
WHERE r.id_hash = $1 AND r.decided_at IS NULL AND r.expires_at > now() AND c.id = r.client_id
RETURNING {_REQUEST_COLUMNS}
"""
INSERT_CODE = """
INSERT INTO oauth_codes (code_hash, client_id, redirect_uri, code_challenge, approving_key_id,
                         server, tools, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8::float8))
"""
CONSUME_CODE = """
UPDATE oauth_codes SET used_at = now()
WHERE code_hash = $1 AND used_at IS NULL
RETURNING client_id, redirect_uri, code_challenge, approving_key_id, server, tools,
          expires_at > now() AS live
"""
USED_CODE = "SELECT grant_id FROM oauth_codes WHERE code_hash = $1"
SET_CODE_GRANT = "UPDATE oauth_codes SET grant_id = $2 WHERE code_hash = $1"
INSERT_GRANT = f"""
INSERT INTO api_keys AS k (id, user_id, workspace_id, name, servers, permissions, expires_at,
                           secret_hash, secret_prefix, rate_limit, allowed_cidrs, tools, kind,
                           client_id, client_name, allowed_origins)
VALUES ($1, $2, $3, $4, $5, '{{mcp}}', $6, $7, '', $8, $9, $10, 'oauth', $11, $4, $12)
RETURNING {KEY_COLUMNS}
"""
INSERT_TOKEN = """
INSERT INTO oauth_tokens (token_hash, grant_id, kind, server, expires_at)
VALUES ($1, $2, $3, $4, $5)
"""  # noqa: S105 - SQL, not a secret
LOAD_REFRESH = f"""
SELECT {PRINCIPAL_COLUMNS}, t.used_at IS NOT NULL AS t_used, t.expires_at > now() AS t_live,
       t.server AS t_server
{PRINCIPAL_FROM}
JOIN oauth_tokens t ON t.grant_id = k.id
WHERE t.token_hash = $1 AND t.kind = 'refresh' AND k.kind = 'oauth'
"""
USE_REFRESH = """
UPDATE oauth_tokens SET used_at = now()
WHERE token_hash = $1 AND kind = 'refresh' AND used_at IS NULL
RETURNING grant_id
"""
GRANT_OF_TOKEN = "SELECT grant_id FROM oauth_tokens WHERE token_hash = $1"  # noqa: S105 - SQL
REVOKE_GRANT = """
UPDATE api_keys SET revoked_at = now(), is_active = false, updated_at = now()
WHERE id = $1 AND kind = 'oauth' AND revoked_at IS NULL
RETURNING workspace_id, user_id
"""
PRUNE = {
    table: f"""
DELETE FROM {table} WHERE ctid IN (
    SELECT ctid FROM {table} WHERE expires_at < now() - interval '{KEEP_EXPIRED}' LIMIT $1)
"""
    for table in ("oauth_requests", "oauth_codes", "oauth_tokens")
}


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    name: str
    redirect_uris: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A consent page's authorization request, as the server keeps it."""

    client_id: str
    client_name: str
    redirect_uri: str
    state: str | None
    code_challenge: str
    server: str


@dataclass(frozen=True, slots=True)
class Code:
    """An authorization code, consumed: what the exchange checks and builds the grant from."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    approving_key_id: str
    server: str
    tools: tuple[str, ...] | None
    live: bool  # not past its expiry


@dataclass(frozen=True, slots=True)
class CodeReused:
    """The code was exchanged before; grant_id is what that exchange obtained (if it did)."""

    grant_id: str | None


@dataclass(frozen=True, slots=True)
class RefreshState:
    """A refresh token and its grant, as the store holds them."""

    principal: Principal
    used: bool
    live: bool
    server: str


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token about to be stored: only its digest, its kind and its expiry."""

    token_hash: bytes
    kind: Literal["access", "refresh"]
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class GrantPlan:
    """A grant to create, its every bound already decided (gateway.oauth.token)."""

    grant_id: str
    approver: Principal
    client_id: str
    client_name: str
    server: str
    expires_at: datetime
    tools: Sequence[str] | None
    rate_limit: Mapping[str, int] | None
    allowed_cidrs: Sequence[str] | None
    allowed_origins: Sequence[str] | None = None


class OAuthStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- the data plane's lookup (gateway.auth.AccessTokens) ---

    async def load_access(self, grant_id: str, token_hash: bytes) -> VerifiedAccess | None:
        row = await self.pool.fetchrow(LOAD_ACCESS, grant_id, token_hash)
        if row is None:
            return None
        principal, hashes = principal_of(row)
        return VerifiedAccess(principal, hashes, row["t_expires_at"], row["t_server"])

    # --- clients ---

    async def register_client(
        self, client_id: str, name: str, redirect_uris: Sequence[str], registered_from: str
    ) -> None:
        await self.pool.execute(
            INSERT_CLIENT, client_id, name, list(redirect_uris), registered_from
        )

    async def client(self, client_id: str) -> Client | None:
        row = await self.pool.fetchrow(CLIENT_BY_ID, client_id)
        if row is None:
            return None
        return Client(row["id"], row["client_name"], tuple(row["redirect_uris"]))

    # --- consent ---

    async def open_request(
        self, id_hash: bytes, request: PendingRequest, *, ttl_seconds: float
    ) -> None:
        await self.pool.execute(
            INSERT_REQUEST,
            id_hash,
            request.client_id,
            request.redirect_uri,
            request.state,
            request.code_challenge,
            request.server,
            ttl_seconds,
        )

    async def pending(self, id_hash: bytes) -> PendingRequest | None:
        """The undecided, unexpired request of a consent page."""
        row = await self.pool.fetchrow(PENDING_REQUEST, id_hash)
        return _pending(row) if row is not None else None

    async def deny(self, id_hash: bytes) -> PendingRequest | None:
        """Decide the request (refused); None if it was decided already or has expired."""
        row = await self.pool.fetchrow(DECIDE_REQUEST, id_hash)
        return _pending(row) if row is not None else None

    async def approve(
        self,
        id_hash: bytes,
        *,
        code_hash: bytes,
        approving_key_id: str,
        tools: Sequence[str] | None,
        code_ttl_seconds: float,
    ) -> PendingRequest | None:
        """Decide the request (approved) and store its code, in one transaction; None if it
        was decided already or has expired (then no code exists)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(DECIDE_REQUEST, id_hash)
            if row is None:
                return None
            request = _pending(row)
            await conn.execute(
                INSERT_CODE,
                code_hash,
                request.client_id,
                request.redirect_uri,
                request.code_challenge,
                approving_key_id,
                request.server,
                list(tools) if tools is not None else None,
                code_ttl_seconds,
            )
            return request

    # --- the code exchange ---

    async def consume_code(self, code_hash: bytes) -> Code | CodeReused | None:
        """Mark the code used and return it; CodeReused if it was used before (and then the
        grant it obtained is revoked in the same transaction); None if there is no such code."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(CONSUME_CODE, code_hash)
            if row is not None:
                tools = row["tools"]
                return Code(
                    row["client_id"],
                    row["redirect_uri"],
                    row["code_challenge"],
                    row["approving_key_id"],
                    row["server"],
                    tuple(tools) if tools is not None else None,
                    row["live"],
                )
            used = await conn.fetchrow(USED_CODE, code_hash)
            if used is None:
                return None
            grant_id = used["grant_id"]
            if grant_id is not None:
                # RFC 6749 §4.1.2: a code used twice SHOULD revoke what it obtained. The
                # rightful client uses a code once, so a second use means it leaked.
                await _revoke(conn, grant_id, "oauth.revoke", {"reason": "code_reuse"})
            return CodeReused(grant_id)

    async def create_grant(
        self, plan: GrantPlan, code_hash: bytes, tokens: Sequence[NewToken]
    ) -> ApiKey:
        """The grant, its first tokens, the code's link to it, the audit row and the NOTIFY."""
        approver = plan.approver
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                INSERT_GRANT,
                plan.grant_id,
                approver.user.id,
                approver.workspace.id,
                plan.client_name,
                [plan.server],
                plan.expires_at,
                GRANT_SECRET_MARKER,
                json.dumps(plan.rate_limit) if plan.rate_limit is not None else None,
                list(plan.allowed_cidrs) if plan.allowed_cidrs is not None else None,
                list(plan.tools) if plan.tools is not None else None,
                plan.client_id,
                list(plan.allowed_origins) if plan.allowed_origins is not None else None,
            )
            assert row is not None
            await conn.execute(SET_CODE_GRANT, code_hash, plan.grant_id)
            await _insert_tokens(conn, plan.grant_id, plan.server, tokens)
            actor = Actor(approver.workspace.id, approver.user.id, approver.key.id)
            changes = {
                "client_id": plan.client_id,
                "client_name": plan.client_name,
                "server": plan.server,
                "tools": list(plan.tools) if plan.tools is not None else None,
                "expires_at": plan.expires_at.isoformat(),
                "approved_with": approver.key.id,
            }
            await audit(conn, actor, "oauth.grant", "key", plan.grant_id, changes)
            # No NOTIFY, as for a new key (gateway.store.create_key): a new grant is in no cache.
            return key_of(row)

    # --- refresh and revocation ---

    async def refresh_state(self, token_hash: bytes) -> RefreshState | None:
        row = await self.pool.fetchrow(LOAD_REFRESH, token_hash)
        if row is None:
            return None
        principal, _ = principal_of(row)
        return RefreshState(principal, row["t_used"], row["t_live"], row["t_server"])

    async def rotate(
        self, token_hash: bytes, grant_id: str, server: str, tokens: Sequence[NewToken]
    ) -> bool:
        """Use the refresh token and store its successors, in one transaction. False when it
        was used meanwhile (a concurrent presentation): that is reuse, and the grant is revoked.

        Routine rotation writes no audit row: it changes no one's access (the grant stays what
        it was), and a row an hour per client would bury the changes that do.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(USE_REFRESH, token_hash) is None:
                await _revoke(conn, grant_id, "oauth.refresh_reuse", {})
                return False
            await _insert_tokens(conn, grant_id, server, tokens)
            return True

    async def revoke_for_reuse(self, grant_id: str) -> None:
        """A used refresh token came back: whoever holds the chain, the grant ends."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _revoke(conn, grant_id, "oauth.refresh_reuse", {})

    async def revoke_by_token(self, token_hash: bytes) -> str | None:
        """Revoke the grant an access or refresh token belongs to (RFC 7009); its id, or None
        for a token the store does not know."""
        async with self.pool.acquire() as conn, conn.transaction():
            grant_id = await conn.fetchval(GRANT_OF_TOKEN, token_hash)
            if grant_id is None:
                return None
            await _revoke(conn, str(grant_id), "oauth.revoke", {"reason": "client"})
            return str(grant_id)

    async def prune(self) -> int:
        """Delete a batch of long-expired consent requests, codes and tokens; rows deleted."""
        deleted = 0
        async with self.pool.acquire() as conn:
            for sql in PRUNE.values():
                status = await conn.execute(sql, PRUNE_BATCH)
                deleted += int(status.rpartition(" ")[2] or 0)
        return deleted


async def _insert_tokens(
    conn: Connection, grant_id: str, server: str, tokens: Sequence[NewToken]
) -> None:
    for token in tokens:
        await conn.execute(
            INSERT_TOKEN, token.token_hash, grant_id, token.kind, server, token.expires_at
        )


async def _revoke(conn: Connection, grant_id: str, action: str, changes: dict[str, Any]) -> None:
    """Revoke a live grant with its audit row and NOTIFY; nothing for one already revoked.
    The actor is the grant itself, acting for its user: the client asked (or misbehaved)."""
    row = await conn.fetchrow(REVOKE_GRANT, grant_id)
    if row is None:
        return
    actor = Actor(row["workspace_id"], row["user_id"], grant_id)
    await audit(conn, actor, action, "key", grant_id, changes)
    await notify(conn, "key", grant_id)


def _pending(row: asyncpg.Record) -> PendingRequest:
    return PendingRequest(
        row["client_id"],
        row["client_name"],
        row["redirect_uri"],
        row["state"],
        row["code_challenge"],
        row["server"],
    )
