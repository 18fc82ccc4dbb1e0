"""Field parsers for admin requests: each returns a typed value or raises 422 naming the field."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from multidict import MultiMapping

from admin.http import invalid
from gateway.cors import normalise_origin
from gateway.mcp.patterns import PatternError, check_patterns
from gateway.models import ALL_SERVERS, PERMISSIONS

MAX_NAME = 100
MAX_DESCRIPTION = 1000
MAX_GRACE_SECONDS = 30 * 24 * 3600
MAX_EMAIL = 320
MAX_DISPLAY_NAME = 200
MAX_RATE_LIMIT = 10**9
MAX_ORIGINS = 100
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


def origins(data: dict[str, Any], field: str = "allowed_origins") -> list[str] | None:
    """null (any origin) or a list of browser origins like "https://app.example.com"."""
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(
            field, 'expected a list of origins, e.g. ["https://app.example.com"], or null'
        )
    if len(value) > MAX_ORIGINS:
        raise invalid(field, f"at most {MAX_ORIGINS} origins")
    normalised = []
    for origin in value:
        normal = normalise_origin(origin)
        if normal is None or normal == "null":
            raise invalid(field, f"{origin!r} is not an origin (scheme://host[:port], no path)")
        normalised.append(normal)
    return list(dict.fromkeys(normalised))


def validity(valid_from: datetime | None, expires_at: datetime | None, now: datetime) -> None:
    """The window must be open in the future: not already over, not inside out."""
    if expires_at is not None and expires_at <= now:
        raise invalid("expires_at", "must be in the future")
    if valid_from is not None and expires_at is not None and valid_from >= expires_at:
        raise invalid("valid_from", "must be before expires_at")


# --- query parameters (GET /api/usage, GET /api/calls) ---

MAX_FILTER = 256  # the longest text stored in a call record (gateway.usage_store.MAX_TEXT)
USAGE_DEFAULT_DAYS = 7
USAGE_MAX_DAYS = 400
CALLS_MAX_LIMIT = 500
CALLS_DEFAULT_LIMIT = 100
MAX_BEFORE = 2**62
# An unescaped "+" in a query string arrives as a space: "...T10:00:00 02:00" meant "+02:00".
_SPACED_OFFSET = re.compile(r"(T\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d(?::?\d\d)?)$")


def query(params: MultiMapping[str], allowed: Collection[str]) -> dict[str, str]:
    """Each parameter once, and only known ones: 422 naming the first that is not, as an
    unknown field of a body is."""
    out: dict[str, str] = {}
    for name, value in params.items():
        if name not in allowed:
            raise invalid(name, "unknown parameter")
        if name in out:
            raise invalid(name, "given more than once")
        out[name] = value
    return out


def query_text(
    params: Mapping[str, str], field: str, *, max_length: int = MAX_FILTER
) -> str | None:
    """A non-empty single-line value, or None when absent."""
    value = params.get(field)
    if value is None:
        return None
    if not value:
        raise invalid(field, "must not be empty (leave the parameter out instead)")
    if len(value) > max_length:
        raise invalid(field, f"at most {max_length} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise invalid(field, "control characters are not allowed")
    return value


def query_integer(
    params: Mapping[str, str], field: str, *, minimum: int, maximum: int, default: int | None
) -> int | None:
    """Decimal digits only (no sign, no spaces) within [minimum, maximum]; default if absent."""
    raw = params.get(field)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20) or not (
        minimum <= int(raw) <= maximum
    ):
        raise invalid(field, f"expected an integer between {minimum} and {maximum}")
    return int(raw)


def query_choice(
    params: Mapping[str, str], field: str, choices: Sequence[str], default: str
) -> str:
    value = params.get(field, default)
    if value not in choices:
        raise invalid(field, f"expected one of {', '.join(choices)}")
    return value


def query_timestamp(params: Mapping[str, str], field: str) -> datetime | None:
    """ISO 8601 as `timestamp` takes it, or None when absent."""
    value = params.get(field)
    if value is None:
        return None
    return timestamp({field: _SPACED_OFFSET.sub(r"\1+\2", value)}, field)


def _hour_floor(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def _hour_ceiling(moment: datetime) -> datetime:
    floor = _hour_floor(moment)
    return floor if floor == moment else floor + timedelta(hours=1)


def hour_window(
    params: Mapping[str, str], now: datetime, *, default_days: int, max_days: int
) -> tuple[datetime, datetime]:
    """`from` and `to` widened to whole UTC hours: from down to its hour's start, to up to the
    next hour's start. Defaults: to = now, from = to - default_days."""
    start = query_timestamp(params, "from")
    end = query_timestamp(params, "to")
    end = end if end is not None else now
    start = start if start is not None else end - timedelta(days=default_days)
    if start >= end:
        raise invalid("from", "must be before to")
    if end - start > timedelta(days=max_days):
        raise invalid("from", f"at most {max_days} days before to")
    return _hour_floor(start), _hour_ceiling(end)


def dimensions(
    params: Mapping[str, str], field: str, allowed: Sequence[str], *, at_most: int = 2
) -> list[str]:
    """Comma-separated names from `allowed`, each at most once, at most `at_most` of them;
    [] when absent."""
    raw = params.get(field)
    if raw is None:
        return []
    names = raw.split(",")
    for name in names:
        if name not in allowed:
            raise invalid(field, f"unknown dimension {name!r}; expected {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise invalid(field, "a dimension is named twice")
    if len(names) > at_most:
        raise invalid(field, f"at most {at_most} dimensions")
    return names
