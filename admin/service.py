"""What the admin plane may do, for whom: authorisation and validation around the Keyring.

Both the canonical API and the compatibility routes call these; they only translate shapes.
Rules: a workspace admin manages everything in its workspace; a key with `keys` manages its
own user's keys, never making one broader than itself (gateway.narrowing); nothing outside the
caller's reach is even acknowledged (404, not 403).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from asyncpg.exceptions import UniqueViolationError

from admin import validate
from admin.http import Caller, invalid, reject_unknown
from gateway import narrowing
from gateway.errors import ApiError, forbidden, not_found
from gateway.keyring import IssuedKey, Keyring
from gateway.models import ALL_SERVERS, ApiKey, User
from gateway.store import LastAdminError, NotFound

KEY_CREATE_FIELDS = frozenset(
    {
        "name",
        "description",
        "servers",
        "permissions",
        "valid_from",
        "expires_at",
        "user_id",
        "rate_limit",
        "allowed_cidrs",
        "allowed_origins",
        "is_active",
        "tools",
    }
)
KEY_PATCH_FIELDS = KEY_CREATE_FIELDS - {"user_id"}
ROTATE_FIELDS = frozenset({"grace_seconds"})
USER_CREATE_FIELDS = frozenset({"email", "display_name", "role", "servers", "tools"})
USER_PATCH_FIELDS = frozenset({"email", "display_name", "role", "is_active"})
KEY_STATUSES = frozenset({"active", "disabled", "expired", "pending", "revoked"})


def key_not_found() -> ApiError:
    return not_found("No such key.")


def user_not_found() -> ApiError:
    return not_found("No such user.")


def last_admin() -> ApiError:
    return ApiError(
        409, "last_admin", "The workspace would have no active admin left.", field="role"
    )


def admins_hold_every_tool() -> ApiError:
    return ApiError(
        422,
        "invalid_request",
        "tools: an admin holds every tool; limit an admin's keys instead",
        field="tools",
    )


def name_taken(name: str) -> ApiError:
    return ApiError(
        409, "conflict", f"A live key named {name!r} already exists for this user.", field="name"
    )


class KeyAdmin:
    def __init__(self, keyring: Keyring, configured_servers: Collection[str]) -> None:
        self._keyring = keyring
        self._store = keyring.store
        self._servers = frozenset(configured_servers)

    async def get(self, caller: Caller, key_id: str) -> ApiKey:
        key = await self._store.key(caller.workspace_id, key_id)
        if key is None or not (caller.is_admin or key.user_id == caller.user_id):
            raise key_not_found()
        return key

    async def listing(
        self, caller: Caller, *, everyone: bool, user_id: str | None, status: str | None
    ) -> list[ApiKey]:
        if (everyone or (user_id is not None and user_id != caller.user_id)) and not (
            caller.is_admin
        ):
            raise forbidden("Only admins can list other users' keys.")
        if status is not None and status not in KEY_STATUSES:
            raise invalid("status", f"expected one of {', '.join(sorted(KEY_STATUSES))}")
        owner = None if everyone and user_id is None else (user_id or caller.user_id)
        return await self._store.list_keys(
            caller.workspace_id,
            user_id=owner,
            statuses=[status] if status else None,
            include_revoked=status == "revoked",
        )

    async def create(self, caller: Caller, data: dict[str, Any]) -> IssuedKey:
        reject_unknown(data, KEY_CREATE_FIELDS)
        owner = await self._owner(caller, data.get("user_id"))
        if "name" not in data:
            raise invalid("name", "is required")
        if "servers" not in data:
            raise invalid("servers", 'is required: a list of server names, or ["*"]')
        fields = self._key_fields(data)
        active = validate.boolean(data, "is_active") if "is_active" in data else True
        perms = fields.get("permissions", ["mcp"])
        self._check_permissions(caller, owner, perms)
        if not caller.is_admin:
            # A bound the request leaves out is inherited, not refused: "a key like mine, for
            # this" is what a limited key asks for. An explicit null is asked for, and refused.
            for field, value in narrowing.inherited_bounds(caller.principal.key).items():
                fields.setdefault(field, value)
            proposed = narrowing.Reach(
                servers=fields["servers"],
                permissions=perms,
                expires_at=fields.get("expires_at"),
                allowed_cidrs=fields.get("allowed_cidrs"),
                rate_limit=fields.get("rate_limit"),
                tools=fields.get("tools"),
                allowed_origins=fields.get("allowed_origins"),
            )
            narrowing.require_create(caller.principal.key, proposed)
        validate.validity(fields.get("valid_from"), fields.get("expires_at"), datetime.now(UTC))
        try:
            return await self._keyring.create_key(
                caller.actor,
                user_id=owner.id,
                name=fields["name"],
                description=fields.get("description", ""),
                servers=fields["servers"],
                permissions=perms,
                valid_from=fields.get("valid_from"),
                expires_at=fields.get("expires_at"),
                rate_limit=fields.get("rate_limit"),
                allowed_cidrs=fields.get("allowed_cidrs"),
                is_active=active,
                tools=fields.get("tools"),
                allowed_origins=fields.get("allowed_origins"),
            )
        except UniqueViolationError:
            raise name_taken(fields["name"]) from None

    async def update(self, caller: Caller, key_id: str, data: dict[str, Any]) -> ApiKey:
        reject_unknown(data, KEY_PATCH_FIELDS)
        key = await self._live(caller, key_id)
        fields = self._key_fields(data)
        if key.kind == "oauth":
            _keep_consent(fields)
        if "is_active" in data:
            fields["is_active"] = validate.boolean(data, "is_active")
        if "permissions" in fields:
            owner = await self._store.user(caller.workspace_id, key.user_id)
            assert owner is not None
            self._check_permissions(caller, owner, fields["permissions"])
        self._check_window(key, fields)
        if not caller.is_admin:
            narrowing.require_update(caller.principal.key, key, fields, datetime.now(UTC))
        if not fields:
            return key
        try:
            return await self._keyring.update_key(caller.actor, key_id, fields)
        except UniqueViolationError:
            raise name_taken(fields["name"]) from None
        except NotFound:
            raise key_not_found() from None

    async def set_active(self, caller: Caller, key_id: str, active: bool) -> ApiKey:
        return await self.update(caller, key_id, {"is_active": active})

    async def revoke(self, caller: Caller, key_id: str) -> None:
        key = await self.get(caller, key_id)
        if key.revoked_at is not None:
            return  # revoking twice is not an error: the key is revoked either way
        try:
            await self._keyring.revoke_key(caller.actor, key_id)
        except NotFound:
            return  # revoked concurrently

    async def rotate(self, caller: Caller, key_id: str, data: dict[str, Any]) -> IssuedKey:
        reject_unknown(data, ROTATE_FIELDS)
        grace = 0.0
        if "grace_seconds" in data:
            grace = validate.number(
                data, "grace_seconds", minimum=0, maximum=validate.MAX_GRACE_SECONDS
            )
        key = await self._live(caller, key_id)
        if key.kind == "oauth":
            raise ApiError(
                409,
                "oauth_grant",
                "An OAuth grant has no secret to rotate; revoke it, and the client connects again.",
            )
        if not caller.is_admin:
            narrowing.require_rotate(caller.principal.key, key)
        try:
            return await self._keyring.rotate_key(caller.actor, key_id, grace_seconds=grace)
        except NotFound:
            raise key_not_found() from None

    def inherited(self, caller: Caller) -> dict[str, Any]:
        """Bounded fields for routes whose shape cannot name them (the compatibility routes).

        A non-admin caller's new key takes the calling key's own servers, allow-list and rate
        limit: anything else would be refused as broader, with no field the client could fix.
        An admin's reaches every server, as those routes always made it.
        """
        if caller.is_admin:
            return {"servers": [ALL_SERVERS]}
        key = caller.principal.key
        cidrs = key.allowed_cidrs
        return {
            # Only configured names validate; the key reaches no other server anyway.
            "servers": [s for s in key.servers if s == ALL_SERVERS or s in self._servers],
            "allowed_cidrs": list(cidrs) if cidrs is not None else None,
            "rate_limit": dict(key.rate_limit) if key.rate_limit is not None else None,
        }

    # --- helpers ---

    async def _live(self, caller: Caller, key_id: str) -> ApiKey:
        key = await self.get(caller, key_id)
        if key.revoked_at is not None:
            raise ApiError(409, "key_revoked", "The key is revoked; revoked keys cannot change.")
        return key

    async def _owner(self, caller: Caller, user_id: Any) -> User:
        if user_id is None or user_id == caller.user_id:
            return caller.principal.user
        if not isinstance(user_id, str):
            raise invalid("user_id", "expected a user id")
        if not caller.is_admin:
            raise forbidden("Only admins can create keys for other users.")
        owner = await self._store.user(caller.workspace_id, user_id)
        if owner is None or owner.deleted_at is not None:
            raise invalid("user_id", "no such user")
        return owner

    def _key_fields(self, data: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if "name" in data:
            fields["name"] = validate.name(data)
        if "description" in data:
            fields["description"] = validate.text(
                data, "description", max_length=validate.MAX_DESCRIPTION
            )
        if "servers" in data:
            fields["servers"] = validate.servers(data, "servers", self._servers)
        if "permissions" in data:
            fields["permissions"] = validate.permissions(data)
        for stamp in ("valid_from", "expires_at"):
            if stamp in data:
                fields[stamp] = validate.timestamp(data, stamp)
        if "rate_limit" in data:
            fields["rate_limit"] = validate.rate_limit(data)
        if "allowed_cidrs" in data:
            fields["allowed_cidrs"] = validate.cidrs(data)
        if "allowed_origins" in data:
            fields["allowed_origins"] = validate.origins(data)
        if "tools" in data:
            fields["tools"] = validate.tools(data, self._servers)
        return fields

    @staticmethod
    def _check_permissions(caller: Caller, owner: User, perms: list[str]) -> None:
        """`keys` is self-service for mcp, chat and keys; only an admin key grants `admin`."""
        if "admin" not in perms:
            return
        if owner.role != "admin":
            raise invalid("permissions", "'admin' is only for keys of admin users")
        if not caller.is_admin:
            raise invalid("permissions", "only an admin key can grant 'admin'")

    @staticmethod
    def _check_window(key: ApiKey, fields: dict[str, Any]) -> None:
        if "valid_from" not in fields and "expires_at" not in fields:
            return
        now = datetime.now(UTC)
        expires_at = fields.get("expires_at", key.expires_at)
        valid_from = fields.get("valid_from", key.valid_from)
        moved = "expires_at" in fields and expires_at != key.expires_at  # unchanged is fine
        if moved and expires_at is not None and expires_at <= now:
            raise invalid("expires_at", "must be in the future")
        if valid_from is not None and expires_at is not None and valid_from >= expires_at:
            raise invalid("valid_from", "must be before expires_at")


def _keep_consent(fields: dict[str, Any]) -> None:
    """An OAuth grant reaches the one server, with `mcp`, that a person approved for its
    client (SPEC §9), and its tokens are bound to that server: those fields stay. Its name,
    description, tools, expiry, limits and active state change as any key's do."""
    for field in ("servers", "permissions"):
        if field in fields:
            raise invalid(field, "an OAuth grant keeps what was approved; revoke it instead")


class UserAdmin:
    def __init__(self, keyring: Keyring, configured_servers: Collection[str]) -> None:
        self._keyring = keyring
        self._store = keyring.store
        self._servers = frozenset(configured_servers)

    async def listing(self, caller: Caller) -> list[User]:
        caller.require_admin()
        return await self._store.users(caller.workspace_id)

    async def get(self, caller: Caller, user_id: str) -> User:
        caller.require_admin()
        user = await self._store.user(caller.workspace_id, user_id)
        if user is None or user.deleted_at is not None:
            raise user_not_found()
        return user

    async def create(self, caller: Caller, data: dict[str, Any]) -> User:
        caller.require_admin()
        reject_unknown(data, USER_CREATE_FIELDS)
        if "email" not in data:
            raise invalid("email", "is required")
        email = validate.email(data)
        display = (
            validate.text(data, "display_name", max_length=validate.MAX_DISPLAY_NAME)
            if "display_name" in data
            else ""
        )
        role = validate.role(data) if "role" in data else "member"
        servers = validate.servers(data, "servers", self._servers) if "servers" in data else []
        tools = validate.tools(data, self._servers) if "tools" in data else None
        if tools is not None and role == "admin":
            raise admins_hold_every_tool()
        try:
            return await self._keyring.create_user(
                caller.actor,
                email=email,
                display_name=display,
                role=role,
                servers=servers,
                tools=tools,
            )
        except UniqueViolationError:
            raise ApiError(
                409, "conflict", f"A user with email {email!r} already exists.", field="email"
            ) from None

    async def update(self, caller: Caller, user_id: str, data: dict[str, Any]) -> User:
        user = await self.get(caller, user_id)
        reject_unknown(data, USER_PATCH_FIELDS)
        changes: dict[str, Any] = {}
        if "email" in data:
            changes["email"] = validate.email(data)
        if "display_name" in data:
            changes["display_name"] = validate.text(
                data, "display_name", max_length=validate.MAX_DISPLAY_NAME
            )
        if "role" in data:
            changes["role"] = validate.role(data)
            if changes["role"] == "admin" and user.tools is not None:
                changes["tools"] = None  # an admin holds every tool (SPEC §6)
        if "is_active" in data:
            changes["is_active"] = validate.boolean(data, "is_active")
        if not changes:
            return user
        try:
            return await self._keyring.update_user(caller.actor, user_id, changes)
        except LastAdminError:
            raise last_admin() from None
        except UniqueViolationError:
            raise ApiError(409, "conflict", "Another user has that email.", field="email") from None
        except NotFound:
            raise user_not_found() from None

    async def delete(self, caller: Caller, user_id: str) -> None:
        await self.get(caller, user_id)
        try:
            await self._keyring.delete_user(caller.actor, user_id)
        except LastAdminError:
            raise last_admin() from None
        except NotFound:
            raise user_not_found() from None

    async def set_servers(self, caller: Caller, user_id: str, data: dict[str, Any]) -> User:
        await self.get(caller, user_id)
        reject_unknown(data, frozenset({"servers"}))
        if "servers" not in data:
            raise invalid("servers", 'is required: a list of server names, or ["*"]')
        servers = validate.servers(data, "servers", self._servers)
        try:
            return await self._keyring.set_user_servers(caller.actor, user_id, servers)
        except NotFound:
            raise user_not_found() from None

    async def set_tools(self, caller: Caller, user_id: str, data: dict[str, Any]) -> User:
        user = await self.get(caller, user_id)
        reject_unknown(data, frozenset({"tools"}))
        if "tools" not in data:
            raise invalid("tools", "is required: null (every tool) or a list of patterns")
        tools = validate.tools(data, self._servers)
        if user.role == "admin" and tools is not None:
            raise admins_hold_every_tool()
        try:
            return await self._keyring.set_user_tools(caller.actor, user_id, tools)
        except NotFound:
            raise user_not_found() from None
