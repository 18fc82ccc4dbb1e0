"""Field parsers for admin requests: each returns a typed value or raises 422 naming the field."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from admin.http import invalid
from gateway.mcp.patterns import PatternError, check_patterns
from gateway.models import ALL_SERVERS, PERMISSIONS

MAX_NAME = 100
MAX_DESCRIPTION = 1000
MAX_GRACE_SECONDS = 30 * 24 * 3600
MAX_EMAIL = 320
MAX_DISPLAY_NAME = 200
MAX_RATE_LIMIT = 10**9
MAX_EXPIRES_IN = 10 * 365 * 86400  # seconds, for the better-auth style create route
AUDIT_MAX_LIMIT = 500
AUDIT_DEFAULT_LIMIT = 100
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def text(data: dict[str, Any], field: str, *, max_length: int, required: bool = False) -> str:
    value = data.get(field)
    if not isinstance(value, str):
        raise invalid(field, "expected a string")
    value = value.strip()
    if required and not value:
        raise invalid(field, "must not be empty")
    if len(value) > max_length:
        raise invalid(field, f"at most {max_length} characters")
    if any(ord(c) < 32 and c not in "\n\t" for c in value):
        raise invalid(field, "control characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. "\ud800" in the JSON
        raise invalid(field, "not valid Unicode") from None
    return value


def name(data: dict[str, Any], field: str = "name") -> str:
    value = text(data, field, max_length=MAX_NAME, required=True)
    if "\n" in value or "\t" in value:
        raise invalid(field, "must be a single line")
    return value


def boolean(data: dict[str, Any], field: str) -> bool:
    value = data.get(field)
    if not isinstance(value, bool):
        raise invalid(field, "expected true or false")
    return value


def number(data: dict[str, Any], field: str, *, minimum: float, maximum: float) -> float:
    value = data.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(field, "expected a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(field, "expected a finite number")
    if not minimum <= value <= maximum:  # exact for ints of any size, no float overflow
        raise invalid(field, f"expected a number between {minimum:g} and {maximum:g}")
    return float(value)


def timestamp(data: dict[str, Any], field: str) -> datetime | None:
    """ISO 8601 (a trailing Z is fine; no offset means UTC), or null."""
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(field, "expected an ISO 8601 timestamp or null")
    try:
        parsed = datetime.fromisoformat(value)
        parsed = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
        parsed = parsed.astimezone(UTC)  # overflows here, not in the driver, for year 1 / 9999
    except ValueError:
        raise invalid(field, "expected an ISO 8601 timestamp, e.g. 2030-01-31T12:00:00Z") from None
    except OverflowError:
        raise invalid(field, "timestamp out of range") from None
    if not 1970 <= parsed.year <= 9998:
        raise invalid(field, "timestamp out of range (years 1970-9998)")
    return parsed


def servers(data: dict[str, Any], field: str, configured: Collection[str]) -> list[str]:
    """`["*"]` or a list of configured server names (no duplicates)."""
    value = data.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(field, 'expected a list of server names, or ["*"]')
    if ALL_SERVERS in value:
        if value != [ALL_SERVERS]:
            raise invalid(field, '"*" stands alone: every server')
        return [ALL_SERVERS]
    unknown = sorted(set(value) - set(configured))
    if unknown:
        raise invalid(field, f"unknown server {unknown[0]!r}")
    return sorted(set(value))


def permissions(data: dict[str, Any], field: str = "permissions") -> list[str]:
    value = data.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(field, f"expected a list drawn from {', '.join(PERMISSIONS)}")
    unknown = sorted(set(value) - set(PERMISSIONS))
    if unknown:
        raise invalid(field, f"unknown permission {unknown[0]!r}")
    return [p for p in PERMISSIONS if p in value]  # canonical order, no duplicates


def email(data: dict[str, Any], field: str = "email") -> str:
    value = text(data, field, max_length=MAX_EMAIL, required=True)
    if not _EMAIL.fullmatch(value):
        raise invalid(field, "expected an email address")
    return value


def role(data: dict[str, Any], field: str = "role") -> str:
    value = data.get(field)
    if value not in ("admin", "member"):
        raise invalid(field, 'expected "admin" or "member"')
    return str(value)


def rate_limit(data: dict[str, Any], field: str = "rate_limit") -> dict[str, int] | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"requests", "per_seconds"}:
        raise invalid(field, 'expected {"requests": N, "per_seconds": S} or null')
    out: dict[str, int] = {}
    for part in ("requests", "per_seconds"):
        item = value[part]
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_RATE_LIMIT:
            raise invalid(f"{field}.{part}", "expected a positive integer")
        out[part] = item
    return out


def cidrs(data: dict[str, Any], field: str = "allowed_cidrs") -> list[str] | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(field, 'expected a list of CIDRs, e.g. ["10.0.0.0/8"], or null')
    try:
        return [str(ipaddress.ip_network(v, strict=False)) for v in value]
    except ValueError as exc:
        raise invalid(field, f"not a CIDR: {exc}") from None


def tools(
    data: dict[str, Any], configured: Collection[str], field: str = "tools"
) -> list[str] | None:
    """null (every tool) or a list of tool patterns like "github/search_*" or "!github/delete_*"."""
    try:
        checked = check_patterns(data.get(field), configured)
    except PatternError as exc:
        raise invalid(field, str(exc)) from None
    return list(checked) if checked is not None else None


def validity(valid_from: datetime | None, expires_at: datetime | None, now: datetime) -> None:
    """The window must be open in the future: not already over, not inside out."""
    if expires_at is not None and expires_at <= now:
        raise invalid("expires_at", "must be in the future")
    if valid_from is not None and expires_at is not None and valid_from >= expires_at:
        raise invalid("valid_from", "must be before expires_at")
