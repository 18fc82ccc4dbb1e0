"""Records as values: what the store returns and the data plane decides on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway.keys import PREFIXES

Role = Literal["admin", "member"]
KeyStatus = Literal["active", "disabled", "expired", "pending", "revoked"]
# "key": an API key; "oauth": a grant an MCP client holds through the OAuth flow (SPEC §9),
# used only through its access tokens, bound to its one server.
KeyKind = Literal["key", "oauth"]
PERMISSIONS = ("mcp", "chat", "keys", "admin")
ALL_SERVERS = "*"


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": iso(self.created_at)}


@dataclass(frozen=True, slots=True)
class User:
    id: str
    workspace_id: str
    email: str
    display_name: str
    role: Role
    is_active: bool
    created_at: datetime
    servers: tuple[str, ...]  # the user's grants; ("*",) = every configured server
    deleted_at: datetime | None = None
    tools: tuple[str, ...] | None = None  # tool patterns (SPEC §6); None = every tool

    @property
    def usable(self) -> bool:
        return self.is_active and self.deleted_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "workspace_id": self.workspace_id,
            "email": self.email,
            "display_name": self.display_name,
            "role": self.role,
            "is_active": self.is_active,
            "servers": list(self.servers),
            "tools": list(self.tools) if self.tools is not None else None,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's record, without its hashes."""

    id: str
    user_id: str
    workspace_id: str
    name: str
    description: str
    servers: tuple[str, ...]
    permissions: tuple[str, ...]
    valid_from: datetime | None
    expires_at: datetime | None
    is_active: bool
    secret_prefix: str
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rate_limit: dict[str, int] | None = None
    allowed_cidrs: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] | None = None  # browser origins (SPEC §4); None = any
    tools: tuple[str, ...] | None = None  # tool patterns (SPEC §6); None = every tool
    kind: KeyKind = "key"
    client_id: str | None = None  # an OAuth grant's client, and its name when approved
    client_name: str | None = None

    @property
    def prefix(self) -> str:
        return f"{PREFIXES[self.kind]}-{self.user_id}-{self.id}-{self.secret_prefix}…"

    def status(self, now: datetime) -> KeyStatus:
        if self.revoked_at is not None:
            return "revoked"
        if not self.is_active:
            return "disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if self.valid_from is not None and now < self.valid_from:
            return "pending"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "workspace_id": self.workspace_id,
            "name": self.name,
            "description": self.description,
            "prefix": self.prefix,
            "servers": list(self.servers),
            "permissions": list(self.permissions),
            "valid_from": iso(self.valid_from),
            "expires_at": iso(self.expires_at),
            "is_active": self.is_active,
            "status": self.status(now),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
            "rate_limit": self.rate_limit,
            "allowed_cidrs": list(self.allowed_cidrs) if self.allowed_cidrs is not None else None,
            "allowed_origins": _listed(self.allowed_origins),
            "tools": list(self.tools) if self.tools is not None else None,
            "kind": self.kind,
            "client_id": self.client_id,
            "client_name": self.client_name,
        }


@dataclass(frozen=True, slots=True)
class KeyHashes:
    """The argon2 hashes that can verify a key; kept apart so records never carry them."""

    current: str
    previous: str | None
    previous_expires_at: datetime | None

    def __repr__(self) -> str:
        return "KeyHashes(<hidden>)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified key speaks for: the key, its user and their workspace."""

    key: ApiKey
    user: User
    workspace: Workspace


@dataclass(frozen=True, slots=True)
class VerifiedAccess:
    """An OAuth access token the store recognised: its grant as a principal, and its bounds."""

    principal: Principal
    hashes: KeyHashes  # the grant's (a marker no key verifies against): its cache generation
    expires_at: datetime
    server: str  # the one server the token is for


def _listed(values: tuple[str, ...] | None) -> list[str] | None:
    return list(values) if values is not None else None


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
