"""Who may approve a grant, and how far the grant may reach: never beyond the approving key.

The person on the consent page pastes a key. It is verified and used exactly as on any route
(status, allowed address, rate limit, last-used), and must hold `keys` (the self-service
permission: approving a grant is minting a credential) and reach the server. The grant is
then bounded by the same rule as a key minting a key (gateway.narrowing): one server within
the key's, the `mcp` permission within its permissions, tools within its tools, an expiry no
later than its own, its allowed networks and rate limit inherited (and allowed origins, once
keys carry them). The rule is checked when the person decides, and again when the code is
exchanged, against the approving key as it is then.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway import keys, narrowing, policy
from gateway.auth import Authenticator
from gateway.config import OAuthSettings
from gateway.errors import forbidden, invalid
from gateway.mcp.discovery import DiscoveryFailed, ToolDiscovery
from gateway.mcp.patterns import PatternError, check_pattern, policy_for
from gateway.models import ApiKey, Principal
from gateway.oauth.store import Client, Code, GrantPlan
from gateway.throttle import FailureThrottle, KeyRateLimiter, rate_limited
from gateway.usage import LastUsedRecorder

MAX_TOOLS = 200


@dataclass(frozen=True, slots=True)
class OfferedTool:
    name: str
    description: str | None


class Approvals:
    def __init__(
        self,
        *,
        authenticator: Authenticator,
        throttle: FailureThrottle,
        limiter: KeyRateLimiter,
        usage: LastUsedRecorder,
        discovery: ToolDiscovery,
        configured: Collection[str],
    ) -> None:
        self._auth = authenticator
        self._throttle = throttle
        self._limiter = limiter
        self._usage = usage
        self._discovery = discovery
        self._configured = frozenset(configured)

    async def approver(self, key: object, client: str, server: str) -> Principal:
        """The pasted key's principal, if it may approve a grant to `server`; else ApiError.
        Failures count against the client as on any route (429 past the budget)."""
        token = key.strip() if isinstance(key, str) else None
        # No `resource`: an access token cannot approve anything, only keys can.
        principal = await self._auth.authenticate(token, client, self._throttle)
        policy.check_usable(principal, datetime.now(UTC))
        policy.require_address(principal, client)
        limit = principal.key.rate_limit
        if limit is not None:
            allowed, headers = self._limiter.take(
                principal.key.id, limit["requests"], limit["per_seconds"]
            )
            if not allowed:
                raise rate_limited(headers)
        self._usage.record(principal.key.id)
        require_approver(principal, server, self._configured)
        return principal

    async def offered_tools(self, approver: Principal, server: str) -> list[OfferedTool] | None:
        """The server's tools the approver may call (its key's and user's policy), to choose
        from; None when the server cannot list them now."""
        try:
            found = await self._discovery.tools(server)
        except DiscoveryFailed:
            return None
        allows = tool_check(approver, server, self._configured)
        return [
            OfferedTool(str(t["name"]), t.get("description"))
            for t in found.tools
            if allows(str(t["name"]))
        ]


def require_approver(principal: Principal, server: str, configured: Collection[str]) -> None:
    key = principal.key
    if "keys" not in key.permissions:
        raise forbidden("Approving an application needs an API key with the 'keys' permission.")
    if "mcp" not in key.permissions or not policy.may_reach(principal, server, configured):
        # Unknown and unreachable servers answer alike, so names do not leak.
        raise forbidden("This API key may not reach this server.")


def tool_check(
    approver: Principal, server: str, configured: Collection[str]
) -> Callable[[str], bool]:
    """Whether the approver may call a tool of `server`, by name (its key's and user's tools)."""
    user = approver.user
    reach = policy.reachable(approver.key.servers, user.servers, user.role, configured)
    user_tools = None if user.role == "admin" else user.tools
    rule = policy_for(approver.key.tools, user_tools, reach)
    if rule is None:
        return lambda _name: True
    return lambda name: rule.allows(server, name)


def grant_tools(
    approver: ApiKey, server: str, chosen: object, configured: Collection[str]
) -> tuple[str, ...] | None:
    """The grant's `tools` from the person's choice: null is "every tool this key allows" (the
    key's own patterns, inherited); a list of tool names becomes `<server>/<name>` patterns,
    plus the key's exclusions (so the list is provably within the key's: gateway.narrowing)."""
    if chosen is None:
        return approver.tools
    if not isinstance(chosen, list) or not chosen or len(chosen) > MAX_TOOLS:
        raise invalid("tools", f"null, or a list of 1 to {MAX_TOOLS} tool names")
    patterns = [_tool_pattern(server, name, configured) for name in chosen]
    exclusions = [p for p in approver.tools or () if p.startswith("!")]
    proposed = tuple(dict.fromkeys([*patterns, *exclusions]))
    if not narrowing.tools_within(proposed, approver.tools):
        outside = next(
            (n for n in chosen if not narrowing.tools_within((f"{server}/{n}",), approver.tools)),
            chosen[0],
        )
        raise invalid("tools", f"this API key does not allow the tool {outside!r}")
    return proposed


def _tool_pattern(server: str, name: object, configured: Collection[str]) -> str:
    """A plain tool name as a pattern: no wildcard, no exclusion, nothing unprintable."""
    if not isinstance(name, str) or not name or "*" in name or name.startswith("!"):
        raise invalid("tools", "each tool is a plain tool name")
    try:
        return check_pattern(f"{server}/{name}", configured)
    except PatternError as exc:
        raise invalid("tools", str(exc)) from None


def plan_grant(
    approver: Principal,
    client: Client,
    code: Code,
    settings: OAuthSettings,
    configured: Collection[str],
    now: datetime,
) -> GrantPlan:
    """The grant a code obtains, bounded by its approving key as that key is now; ApiError
    (401, 403 or 422) when the key may no longer approve it."""
    policy.check_usable(approver, now)
    require_approver(approver, code.server, configured)
    key = approver.key
    expires_at = now + timedelta(seconds=settings.refresh_token_ttl_seconds)
    if key.expires_at is not None:
        expires_at = min(expires_at, key.expires_at)
    tools = code.tools if code.tools is not None else key.tools
    reach = narrowing.Reach(
        servers=(code.server,),
        permissions=("mcp",),
        expires_at=expires_at,
        allowed_cidrs=key.allowed_cidrs,
        rate_limit=key.rate_limit,
        tools=tools,
        allowed_origins=key.allowed_origins,
    )
    narrowing.require_create(key, reach)
    return GrantPlan(
        grant_id=keys.new_id(),
        approver=approver,
        client_id=client.id,
        client_name=client.name,
        server=code.server,
        expires_at=expires_at,
        tools=tools,
        rate_limit=key.rate_limit,
        allowed_cidrs=key.allowed_cidrs,
        allowed_origins=key.allowed_origins,
    )


def tools_json(tools: Sequence[OfferedTool]) -> list[dict[str, str | None]]:
    return [{"name": t.name, "description": t.description} for t in tools]
