"""A key never creates, changes or rotates a key into one broader than itself.

A key with `keys` manages its own user's keys (SPEC §5), but an admin may have limited that
key: to some servers, some permissions, an expiry, an address allow-list, a rate limit. Without
this rule such a key could mint (or reshape) a key without those limits and use that one
instead. The same rule bounds OAuth grants (§9): the key that approves a grant is its bound
(gateway.oauth). Admin keys are not bound by it when they manage keys; the admin service
decides who is. `valid_from` is no bound: starting later never lets a key do more.

One predicate per bounded field says whether a proposed value lies within a bound; the checks
for create, update and rotate are built on that table and nothing else. Everything here is
pure: values in, None or a 422 `invalid_request` naming the field out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.errors import ApiError, invalid
from gateway.mcp.patterns import compile_rule
from gateway.models import ALL_SERVERS, ApiKey, iso

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Reach:
    """What a key may do, as far as this rule is concerned: its bounded fields."""

    servers: Sequence[str]
    permissions: Sequence[str]
    expires_at: datetime | None = None
    allowed_cidrs: Sequence[str] | None = None
    rate_limit: Mapping[str, int] | None = None
    tools: Sequence[str] | None = None
    allowed_origins: Sequence[str] | None = None

    @classmethod
    def of(cls, key: ApiKey) -> Reach:
        return cls(
            key.servers,
            key.permissions,
            key.expires_at,
            key.allowed_cidrs,
            key.rate_limit,
            key.tools,
            key.allowed_origins,
        )

    def changed(self, changes: Mapping[str, Any]) -> Reach:
        """This reach with a change's bounded fields applied; other fields are not its concern."""
        return dataclasses.replace(self, **{f: changes[f] for f in BOUNDED if f in changes})


# --- one predicate per field: is `proposed` within `bound`? ---


def servers_within(proposed: Sequence[str], bound: Sequence[str]) -> bool:
    # ["*"] admits any names (and "*" itself); a list admits only its own names, never "*",
    # which would also reach servers configured (or granted to the user) later.
    if ALL_SERVERS in bound:
        return True
    return ALL_SERVERS not in proposed and set(proposed) <= set(bound)


def permissions_within(proposed: Sequence[str], bound: Sequence[str]) -> bool:
    return set(proposed) <= set(bound)


def expiry_within(proposed: datetime | None, bound: datetime | None) -> bool:
    # None means never: later than any date.
    if bound is None:
        return True
    return proposed is not None and proposed <= bound


def cidrs_within(proposed: Sequence[str] | None, bound: Sequence[str] | None) -> bool:
    # None means from anywhere; an empty list admits no address at all, so it is within any.
    if bound is None:
        return True
    if proposed is None:
        return False
    nets = [ipaddress.ip_network(c, strict=False) for c in bound]
    return all(
        any(_inside(ipaddress.ip_network(c, strict=False), net) for net in nets) for c in proposed
    )


def _inside(net: Network, bound: Network) -> bool:
    # IPv4 inside IPv6 (or back) never: the data plane matches an address against its own family.
    if isinstance(net, ipaddress.IPv4Network) and isinstance(bound, ipaddress.IPv4Network):
        return net.subnet_of(bound)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(bound, ipaddress.IPv6Network):
        return net.subnet_of(bound)
    return False


def rate_within(proposed: Mapping[str, int] | None, bound: Mapping[str, int] | None) -> bool:
    # No looser on average (requests per second) nor in a burst (requests at once). The ratios
    # are compared cross-multiplied: exact for integers of any size, no float rounding.
    if bound is None:
        return True
    if proposed is None:
        return False
    requests, per = proposed["requests"], proposed["per_seconds"]
    return (
        requests <= bound["requests"] and requests * bound["per_seconds"] <= bound["requests"] * per
    )


def tools_within(proposed: Sequence[str] | None, bound: Sequence[str] | None) -> bool:
    """Sound, not complete: proposed ⊆ bound whenever this says so. The proposal repeats
    every exclusion of the bound, and each of its inclusions is one of the bound's own, or a
    plain tool name (no `*`) that the bound's inclusions admit."""
    if bound is None:
        return True
    if proposed is None:
        return False
    if not proposed:
        return True  # an empty list allows no tool: within anything
    if not bound:
        return False  # the bound allows no tool
    if not {p for p in bound if p.startswith("!")} <= set(proposed):
        return False
    bound_in = [p for p in bound if not p.startswith("!")]
    if not bound_in:
        return True  # the bound is everything but its exclusions, which the proposal repeats
    proposed_in = [p for p in proposed if not p.startswith("!")]
    if not proposed_in:
        return False  # everything but some exclusions: broader than the bound's inclusions
    admits = compile_rule(tuple(bound_in))
    return all(p in bound_in or ("*" not in p and admits.allows(p)) for p in proposed_in)


@dataclass(frozen=True, slots=True)
class Rule:
    field: str
    within: Callable[[Any, Any], bool]
    requirement: str  # what the proposed value must be, relative to the bound shown after it
    show: Callable[[Any], str]


def _names(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "none"


def origins_within(proposed: Sequence[str] | None, bound: Sequence[str] | None) -> bool:
    # None means from any origin; origins are stored as browsers send them (gateway.cors).
    if bound is None:
        return True
    return proposed is not None and set(proposed) <= set(bound)


def _rate(limit: Mapping[str, int]) -> str:
    return f"{limit['requests']} requests per {limit['per_seconds']} s"


RULES = (
    Rule("servers", servers_within, "must be within the calling key's servers", _names),
    Rule("permissions", permissions_within, "must be within the calling key's permissions", _names),
    Rule(
        "expires_at",
        expiry_within,
        "must be set and no later than the calling key's expiry",
        lambda at: str(iso(at)),
    ),
    Rule(
        "allowed_cidrs",
        cidrs_within,
        "must be set, every network inside the calling key's allowed_cidrs",
        _names,
    ),
    Rule(
        "rate_limit",
        rate_within,
        "must be set and no looser (in requests, or per second) than the calling key's",
        _rate,
    ),
    Rule(
        "allowed_origins",
        origins_within,
        "must be set, every origin one of the calling key's allowed_origins",
        _names,
    ),
    Rule(
        "tools",
        tools_within,
        "must be set and within the calling key's tools (its exclusions repeated, its patterns"
        " or plain tool names they admit)",
        _names,
    ),
)
BOUNDED = tuple(rule.field for rule in RULES)
_BY_FIELD = {rule.field: rule for rule in RULES}


def within(field: str, proposed: Reach, bound: Reach) -> bool:
    return _BY_FIELD[field].within(getattr(proposed, field), getattr(bound, field))


def excess(proposed: Reach, bound: Reach) -> str | None:
    """The first field in which `proposed` reaches beyond `bound`, or None."""
    return next((f for f in BOUNDED if not within(f, proposed, bound)), None)


def _refusal(field: str, caller: ApiKey, why: str = "") -> ApiError:
    rule = _BY_FIELD[field]
    shown = rule.show(getattr(Reach.of(caller), field))
    return invalid(field, f"{rule.requirement} ({shown}){why}")


# --- the checks the admin service makes for a caller that is not a workspace admin ---


def inherited_bounds(caller: ApiKey) -> dict[str, Any]:
    """The calling key's own limits, for a new key whose request leaves them out."""
    reach = Reach.of(caller)
    inherited: dict[str, Any] = {}
    for field in ("expires_at", "allowed_cidrs", "rate_limit", "tools", "allowed_origins"):
        value = getattr(reach, field)
        if value is not None:
            inherited[field] = (
                list(value)
                if isinstance(value, tuple)
                else dict(value)
                if isinstance(value, Mapping)
                else value
            )
    return inherited


def require_create(caller: ApiKey, proposed: Reach) -> None:
    """A new key lies within the calling key, field by field."""
    field = excess(proposed, Reach.of(caller))
    if field is not None:
        raise _refusal(field, caller)


def require_update(caller: ApiKey, key: ApiKey, changes: Mapping[str, Any], now: datetime) -> None:
    """A change never widens a key beyond the calling key.

    Each bounded field the change sets must be within the calling key's, or within the key's
    own current value: narrowing is always allowed, so a key broader than the caller (made by
    an admin) can still be narrowed, renamed or disabled by it.

    Bringing a key back to life (enabling a disabled key, or moving an expired key's expiry
    into the future) needs the whole key within the calling key. Decision: enabling returns
    no secret, but it would still switch on a credential broader than the caller, perhaps one
    an admin disabled on purpose; a key may not do that, only narrow first, or ask an admin.
    A pending key going live sooner (valid_from) is not a revival: it goes live anyway.
    """
    bound, current = Reach.of(caller), Reach.of(key)
    after = current.changed(changes)
    for field in BOUNDED:
        if field in changes and not (within(field, after, bound) or within(field, after, current)):
            raise _refusal(field, caller)
    broader = excess(after, bound)
    if broader is not None and _revives(key, changes, now):
        raise _refusal(broader, caller, " for the calling key to switch this key on")


def _revives(key: ApiKey, changes: Mapping[str, Any], now: datetime) -> bool:
    state = {f: changes[f] for f in ("is_active", "expires_at", "valid_from") if f in changes}
    after = dataclasses.replace(key, **state)
    return key.status(now) in ("disabled", "expired") and after.status(now) in (
        "active",
        "pending",
    )


def require_rotate(caller: ApiKey, key: ApiKey) -> None:
    """Rotating hands out the key's new secret: only for a key within the calling key.

    Decision: this holds whatever state the key is in (disabled or expired too): the new
    secret works the moment anyone who may (an admin) switches the key back on.
    """
    field = excess(Reach.of(key), Reach.of(caller))
    if field is not None:
        raise _refusal(field, caller, " for the calling key to rotate this key")
