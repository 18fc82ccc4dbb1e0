"""Who may reach what. Pure functions: the scope decision is made here and nowhere else."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection
from datetime import datetime

from gateway.errors import forbidden, invalid_key
from gateway.models import ALL_SERVERS, Principal, User

_STATUS_MESSAGES = {
    "disabled": "The API key is disabled.",
    "expired": "The API key has expired.",
    "pending": "The API key is not valid yet.",
    "revoked": "The API key has been revoked.",
}


def user_servers(user: User, configured: Collection[str]) -> frozenset[str]:
    """The configured servers a user may reach at all: admins every one, members their grants."""
    if user.role == "admin" or ALL_SERVERS in user.servers:
        return frozenset(configured)
    return frozenset(configured).intersection(user.servers)


def effective_servers(principal: Principal, configured: Collection[str]) -> frozenset[str]:
    """key servers ∩ user grants ∩ configured servers; admins hold a grant to every server."""
    user = principal.user
    return reachable(principal.key.servers, user.servers, user.role, configured)


def reachable(
    key_servers: Collection[str],
    user_grants: Collection[str],
    role: str,
    configured: Collection[str],
) -> frozenset[str]:
    """effective_servers from its parts (hashable, so callers may cache on them)."""
    servers = set(configured)
    if role != "admin" and ALL_SERVERS not in user_grants:
        servers.intersection_update(user_grants)
    if ALL_SERVERS not in key_servers:
        servers.intersection_update(key_servers)
    return frozenset(servers)


def may_reach(principal: Principal, server: str, configured: Collection[str]) -> bool:
    if server not in configured:
        return False
    user = principal.user
    if user.role != "admin" and ALL_SERVERS not in user.servers and server not in user.servers:
        return False
    key_servers = principal.key.servers
    return ALL_SERVERS in key_servers or server in key_servers


def check_usable(principal: Principal, now: datetime) -> None:
    """Raise 401 unless the key and its user may be used now. Only called after verification,
    so saying *why* (expired, disabled, ...) reveals nothing to someone without the secret."""
    status = principal.key.status(now)
    if status != "active":
        raise invalid_key(_STATUS_MESSAGES[status])
    if not principal.user.usable:
        raise invalid_key("The API key's user is disabled.")


def require_address(principal: Principal, client: str) -> None:
    """A key with allowed_cidrs works only from those networks."""
    cidrs = principal.key.allowed_cidrs
    if cidrs is None:
        return
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.1.2.3 is 10.1.2.3
    if address is None or not any(address in net for net in _networks(cidrs)):
        raise forbidden("The API key may not be used from this address.")


@functools.lru_cache(maxsize=4096)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def require_permission(principal: Principal, permission: str) -> None:
    if permission not in principal.key.permissions:
        raise forbidden(f"The API key lacks the '{permission}' permission.")


def require_server(principal: Principal, server: str, configured: Collection[str]) -> None:
    require_permission(principal, "mcp")
    if not may_reach(principal, server, configured):
        if principal.key.kind == "oauth":
            # A grant reaches its one server or nothing (SPEC §9): its user lost the server.
            # 401, not 403: a 403 sends an OAuth client back through consent, which cannot
            # give the user the server back.
            raise invalid_key("The grant's user may no longer reach this server.")
        # Unknown and forbidden servers answer alike, so server names do not leak.
        raise forbidden("The API key may not reach this server.")
