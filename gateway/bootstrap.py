"""First-run setup: a workspace, its bootstrap admin and an admin key."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.config import Settings
from gateway.keyring import IssuedKey, Keyring
from gateway.runtime import open_runtime
from gateway.store import Actor

ADMIN_PERMISSIONS = ("admin", "keys", "mcp", "chat")


class BootstrapRefused(Exception):
    pass


async def issue_admin_key(
    keyring: Keyring, *, workspace: str, email: str, force: bool, key_name: str | None = None
) -> IssuedKey:
    """Create (or, with force, reuse) the bootstrap admin of `workspace` and mint a key for it."""
    ws = await keyring.ensure_workspace(workspace)
    system = Actor(ws.id)
    admin_id = await keyring.store.bootstrap_admin_id(ws.id)
    if admin_id is not None and not force:
        raise BootstrapRefused(
            f"workspace {workspace!r} already has a bootstrap admin; "
            "pass --force to issue another admin key"
        )
    if admin_id is None:
        user = await keyring.create_user(
            system,
            email=email,
            display_name="Administrator",
            role="admin",
            servers=["*"],
            bootstrap=True,
        )
        admin_id = user.id
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return await keyring.create_key(
        system,
        user_id=admin_id,
        name=key_name or f"bootstrap-{stamp}",
        description="Created by keystile bootstrap",
        servers=["*"],
        permissions=ADMIN_PERMISSIONS,
    )


async def bootstrap(
    settings: Settings, database_url: str, *, email: str, workspace: str, force: bool
) -> str:
    async with open_runtime(settings, database_url) as runtime:
        issued = await issue_admin_key(
            runtime.keyring, workspace=workspace, email=email, force=force
        )
        return issued.key
