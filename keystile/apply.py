"""`keystile apply -f FILE`: users and keys declared in a TOML file, made so through the API.

    [[users]]
    email = "alice@example.com"
    servers = ["github"]

    [[keys]]
    user = "alice@example.com"
    name = "ci"
    servers = ["github"]

Four steps, the first three pure (no I/O) and the last through KeystileAdmin:

1. `locate` and `parse`: the TOML, and the line of every table and field (tomllib gives none).
2. `check`: every entry against the API's own field rules (admin.validate, so the values are
   canonicalised exactly as the API stores them) and against the workspace's state (configured
   servers, existing users). Every problem is collected, each with its line; a file with any
   problem is refused as a whole and nothing is changed.
3. `make_plan`: per user and key, create / update (field by field) / unchanged, and with
   `prune` the live keys of the users the file names that it does not list, to revoke.
4. `execute`: users first (their grants with them), then keys, revocations last; each step is
   one API call, so one transaction. A failed step is reported and the run goes on with what
   does not depend on it (the keys of a user whose step failed are skipped).

A field left out of an entry means its default (permissions ["mcp"], no expiry, no tools
policy, any browser origin, ...), not "leave as is": the file is the whole truth about what it
lists, so taking a line out takes the setting away. Keys' `valid_from` and `is_active` are not
the file's to say and are left alone. apply never deletes users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

from admin import validate
from admin.client import ApiKey, KeystileAdmin, KeystileError, KeystileUnreachable, User
from gateway.cors import normalise_origin
from gateway.errors import ApiError

USER_FIELDS = ("email", "role", "servers", "tools", "display_name")
KEY_FIELDS = (
    "user",
    "name",
    "servers",
    "permissions",
    "tools",
    "description",
    "expires_at",
    "rate_limit",
    "allowed_cidrs",
    "allowed_origins",
)
SECTIONS = ("users", "keys")
DEFAULT_PERMISSIONS = ("mcp",)
EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
T = TypeVar("T")


# --- 1. where things are in the text ---


@dataclass
class Locations:
    """Line numbers (1-based) of the file's tables and fields."""

    tables: dict[tuple[str, int], int] = field(default_factory=dict)
    fields: dict[tuple[str, int, str], int] = field(default_factory=dict)
    top: dict[str, int] = field(default_factory=dict)

    def of(self, section: str, index: int, name: str | None = None) -> int:
        """A field's line, else its table's, else the section's first mention, else 1."""
        if name is not None and (section, index, name) in self.fields:
            return self.fields[(section, index, name)]
        return self.tables.get((section, index), self.top.get(section, 1))


_ARRAY_HEADER = re.compile(r"\s*\[\[\s*([^\[\]]+?)\s*\]\]\s*(?:#.*)?")
_TABLE_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?")
_KEY = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]""")


def _unquote(key: str) -> str:
    return key[1:-1] if key[:1] in "\"'" else key


def _scan_value(text: str, delimiter: str | None) -> tuple[int, str | None]:
    """Open minus closed brackets in a line's value, outside strings and comments, and the
    delimiter of a multi-line string still open at its end (given one open at its start)."""
    depth, i = 0, 0
    while i < len(text):
        if delimiter is not None:
            end = text.find(delimiter, i)
            if end < 0:
                return depth, delimiter
            i, delimiter = end + 3, None
            continue
        char = text[i]
        if text.startswith(('"""', "'''"), i):
            delimiter, i = text[i : i + 3], i + 3
        elif char in "\"'":
            closing = re.compile(r'"(?:[^"\\]|\\.)*"' if char == '"' else r"'[^']*'")
            found = closing.match(text, i)
            i = found.end() if found else len(text)
        elif char == "#":
            break
        else:
            depth += (char == "[") - (char == "]")
            i += 1
    return depth, delimiter


def locate(text: str) -> Locations:
    """Find each `[[users]]`/`[[keys]]` table and the first line of each of its fields.

    Lines inside multi-line arrays and strings are skipped, so a value cannot pass for a
    field. Anything not found falls back to its table's line (Locations.of)."""
    found = Locations()
    counts: dict[str, int] = {}
    current: tuple[str, int] | None = None
    in_subtable = False  # under [users.rate_limit]: keys there belong to that field
    depth, delimiter = 0, None
    for number, line in enumerate(text.splitlines(), 1):
        if delimiter is not None or depth > 0:
            delta, delimiter = _scan_value(line, delimiter)
            depth = max(0, depth + delta)
            continue
        if header := _ARRAY_HEADER.fullmatch(line):
            name = header.group(1)
            section, _, sub = name.partition(".")
            if sub and current is not None and current[0] == section:
                found.fields.setdefault((*current, sub.split(".")[0]), number)
                in_subtable = True
                continue
            counts[name] = counts.get(name, -1) + 1
            current, in_subtable = (name, counts[name]), False
            found.tables[current] = number
            found.top.setdefault(name, number)
            continue
        if header := _TABLE_HEADER.fullmatch(line):
            section, _, sub = header.group(1).partition(".")
            if sub and current is not None and current[0] == section:
                found.fields.setdefault((*current, sub.split(".")[0]), number)
            else:
                found.top.setdefault(section, number)
                current = None
            in_subtable = True
            continue
        if key := _KEY.match(line):
            name = _unquote(key.group(1))
            if current is None and not in_subtable:
                found.top.setdefault(name, number)
            elif current is not None and not in_subtable:
                found.fields.setdefault((*current, name), number)
            delta, delimiter = _scan_value(line[key.end() :], None)
            depth = max(0, delta)
    return found


# --- 2. what the file asks for, checked ---


@dataclass(frozen=True)
class Problem:
    line: int
    message: str


@dataclass(frozen=True)
class UserSpec:
    email: str
    role: str
    servers: tuple[str, ...]
    tools: tuple[str, ...] | None
    display_name: str
    line: int
    lines: Mapping[str, int]

    @property
    def ident(self) -> str:
        return self.email.casefold()  # emails are unique without case, as the API has them


@dataclass(frozen=True)
class KeySpec:
    user: str
    name: str
    servers: tuple[str, ...]
    permissions: tuple[str, ...]
    tools: tuple[str, ...] | None
    description: str
    expires_at: datetime | None
    rate_limit: dict[str, int] | None
    allowed_cidrs: tuple[str, ...] | None
    allowed_origins: tuple[str, ...] | None  # as browsers send them (gateway.cors)
    line: int
    lines: Mapping[str, int]

    @property
    def ident(self) -> tuple[str, str]:
        return self.user.casefold(), self.name


@dataclass(frozen=True)
class Desired:
    users: tuple[UserSpec, ...]
    keys: tuple[KeySpec, ...]


@dataclass(frozen=True)
class State:
    """The workspace as the admin API shows it to the calling key."""

    servers: frozenset[str]
    users: Sequence[User]
    keys: Sequence[ApiKey]  # live ones (the API's listing leaves revoked keys out)
    caller_key_id: str | None
    caller_user_id: str | None
    now: datetime

    def user_by_email(self) -> dict[str, User]:
        return {u["email"].casefold(): u for u in self.users}


def parse(text: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The TOML document, or the syntax error at its line."""
    try:
        return tomllib.loads(text), []
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"at line (\d+)", str(exc))
        line = int(where.group(1)) if where else max(1, len(text.splitlines()))  # at the end
        return None, [Problem(line, f"not valid TOML: {exc}")]


class _Checker:
    """Collects problems while turning entries into specs."""

    def __init__(self, found: Locations, state: State) -> None:
        self.found = found
        self.state = state
        self.problems: list[Problem] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(line, message))

    def api_rule(
        self, section: str, index: int, subject: str, rule: Callable[[], T]
    ) -> tuple[T | None, bool]:
        """Run one of the API's field rules; on failure note the problem at the field's line."""
        try:
            return rule(), True
        except ApiError as err:
            name = (err.field or "").split(".")[0] or None
            self.problem(self.found.of(section, index, name), f"{subject}: {err.message}")
            return None, False

    def entries(self, data: Mapping[str, Any], section: str) -> list[Mapping[str, Any]]:
        value = data.get(section, [])
        if not isinstance(value, list):
            self.problem(
                self.found.top.get(section, 1), f"{section}: expected [[{section}]] tables"
            )
            return []
        out: list[Mapping[str, Any]] = []
        for index, entry in enumerate(value):
            if isinstance(entry, dict):
                out.append(entry)
            else:
                line = self.found.of(section, index)
                self.problem(line, f"{section}[{index}]: expected a table")
                out.append({})
        return out

    def unknown(
        self,
        section: str,
        index: int,
        subject: str,
        entry: Mapping[str, Any],
        allowed: Sequence[str],
    ) -> bool:
        extra = [name for name in entry if name not in allowed]
        for name in extra:
            self.problem(
                self.found.of(section, index, name),
                f"{subject}: unknown field {name!r} (expected {', '.join(allowed)})",
            )
        return not extra

    def required(
        self, section: str, index: int, subject: str, entry: Mapping[str, Any], names: Sequence[str]
    ) -> bool:
        missing = [name for name in names if name not in entry]
        for name in missing:
            self.problem(self.found.of(section, index), f"{subject}: {name} is required")
        return not missing


def _subject_user(entry: Mapping[str, Any], index: int) -> str:
    email = entry.get("email")
    return f"user {email}" if isinstance(email, str) else f"users[{index}]"


def _subject_key(entry: Mapping[str, Any], index: int) -> str:
    name, user = entry.get("name"), entry.get("user")
    if isinstance(name, str) and isinstance(user, str):
        return f"key {name.strip()!r} of {user}"
    return f"keys[{index}]"


def _fields_of(found: Locations, section: str, index: int, names: Sequence[str]) -> dict[str, int]:
    return {name: found.of(section, index, name) for name in names}


def _check_user(c: _Checker, index: int, entry: Mapping[str, Any]) -> UserSpec | None:
    subject = _subject_user(entry, index)
    ok = c.unknown("users", index, subject, entry, USER_FIELDS)
    ok = c.required("users", index, subject, entry, ["email"]) and ok
    data = dict(entry)
    servers = c.state.servers

    def rule(check: Callable[[], T], default: T, name: str) -> T | None:
        nonlocal ok
        if name not in data:
            return default
        value, good = c.api_rule("users", index, subject, check)
        ok = ok and good
        return value

    email = rule(lambda: validate.email(data), "", "email")
    role = rule(lambda: validate.role(data), "member", "role")
    none: list[str] = []
    granted = rule(lambda: validate.servers(data, "servers", servers), none, "servers")
    tools = rule(lambda: validate.tools(data, servers), None, "tools")
    display = rule(
        lambda: validate.text(data, "display_name", max_length=validate.MAX_DISPLAY_NAME),
        "",
        "display_name",
    )
    if role == "admin" and tools is not None:
        c.problem(
            c.found.of("users", index, "tools"),
            f"{subject}: tools: an admin holds every tool; leave tools out or make the user a "
            "member",
        )
        ok = False
    if not ok or email is None or role is None or granted is None or display is None:
        return None
    return UserSpec(
        email=email,
        role=role,
        servers=tuple(granted),
        tools=tuple(tools) if tools is not None else None,
        display_name=display,
        line=c.found.of("users", index),
        lines=_fields_of(c.found, "users", index, USER_FIELDS),
    )


def _expiry(value: Any) -> Any:
    """TOML's own dates and times as the ISO text the API's rule reads; others unchanged."""
    if isinstance(value, datetime):
        return value.isoformat()  # no offset (a TOML local date-time): the rule takes UTC
    if isinstance(value, date):
        return datetime.combine(value, time(0), UTC).isoformat()
    if isinstance(value, time):
        return 0  # a time of day alone is no expiry: refused as a wrong type
    return value


_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def _rate(value: Any) -> Any:
    """Also "100/60" beside {requests = 100, per_seconds = 60}, as the CLI takes it."""
    if isinstance(value, str) and (found := _RATE.fullmatch(value)):
        return {"requests": int(found.group(1)), "per_seconds": int(found.group(2))}
    return value


def _check_key(c: _Checker, index: int, entry: Mapping[str, Any]) -> KeySpec | None:
    subject = _subject_key(entry, index)
    ok = c.unknown("keys", index, subject, entry, KEY_FIELDS)
    ok = c.required("keys", index, subject, entry, ["user", "name", "servers"]) and ok
    data = dict(entry)
    if "expires_at" in data:
        data["expires_at"] = _expiry(data["expires_at"])
    if "rate_limit" in data:
        data["rate_limit"] = _rate(data["rate_limit"])
    servers = c.state.servers

    def rule(check: Callable[[], T], default: T, name: str) -> T | None:
        nonlocal ok
        if name not in data:
            return default
        value, good = c.api_rule("keys", index, subject, check)
        ok = ok and good
        return value

    user = rule(lambda: validate.email(data, "user"), "", "user")
    name = rule(lambda: validate.name(data), "", "name")
    none: list[str] = []
    scope = rule(lambda: validate.servers(data, "servers", servers), none, "servers")
    perms = rule(lambda: validate.permissions(data), list(DEFAULT_PERMISSIONS), "permissions")
    tools = rule(lambda: validate.tools(data, servers), None, "tools")
    description = rule(
        lambda: validate.text(data, "description", max_length=validate.MAX_DESCRIPTION),
        "",
        "description",
    )
    expires = rule(lambda: validate.timestamp(data, "expires_at"), None, "expires_at")
    rate = rule(lambda: validate.rate_limit(data), None, "rate_limit")
    cidrs = rule(lambda: validate.cidrs(data), None, "allowed_cidrs")
    origins = rule(lambda: validate.origins(data), None, "allowed_origins")
    if not ok or user is None or name is None or scope is None or perms is None:
        return None
    if description is None:
        return None
    return KeySpec(
        user=user,
        name=name,
        servers=tuple(scope),
        permissions=tuple(perms),
        tools=tuple(tools) if tools is not None else None,
        description=description,
        expires_at=expires,
        rate_limit=rate,
        allowed_cidrs=tuple(cidrs) if cidrs is not None else None,
        allowed_origins=tuple(origins) if origins is not None else None,
        line=c.found.of("keys", index),
        lines=_fields_of(c.found, "keys", index, KEY_FIELDS),
    )


def _text(entry: Mapping[str, Any], name: str) -> str | None:
    value = entry.get(name)
    return value.strip() if isinstance(value, str) else None


def _check_relations(
    c: _Checker, users: Sequence[Mapping[str, Any]], keys: Sequence[Mapping[str, Any]]
) -> None:
    """Duplicates, keys of unknown users, and `admin` only for keys of admin users: on the
    entries as written, so an entry with a problem of its own is still compared."""
    roles: dict[str, object] = {k: u["role"] for k, u in c.state.user_by_email().items()}
    seen_users: dict[str, int] = {}  # -> the index of its first entry
    for index, entry in enumerate(users):
        if (email := _text(entry, "email")) is None:
            continue
        if (first := seen_users.setdefault(email.casefold(), index)) != index:
            c.problem(
                c.found.of("users", index),
                f"user {email}: listed twice (first at line {c.found.of('users', first)})",
            )
        roles[email.casefold()] = entry.get("role", "member")
    seen_keys: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(keys):
        user, name = _text(entry, "user"), _text(entry, "name")
        if user is None or name is None:
            continue
        subject, line = f"key {name!r} of {user}", c.found.of("keys", index)
        if (first := seen_keys.setdefault((user.casefold(), name), index)) != index:
            where = c.found.of("keys", first)
            c.problem(line, f"{subject}: listed twice (first at line {where})")
        permissions = entry.get("permissions")
        wants_admin = isinstance(permissions, list) and "admin" in permissions
        if user.casefold() not in roles:
            c.problem(
                c.found.of("keys", index, "user"),
                f"{subject}: no user {user} in the workspace or the file (add a [[users]] entry)",
            )
        elif wants_admin and roles[user.casefold()] != "admin":
            c.problem(
                c.found.of("keys", index, "permissions"),
                f"{subject}: permissions: 'admin' is only for keys of admin users",
            )


def check(data: Mapping[str, Any], found: Locations, state: State) -> tuple[Desired, list[Problem]]:
    """Every entry checked as the API would check it, plus what only the whole file can tell.
    The specs are only meaningful when there are no problems."""
    c = _Checker(found, state)
    for name in data:
        if name not in SECTIONS:
            c.problem(
                found.top.get(name, 1),
                f"unknown table or field {name!r} (expected [[users]] and [[keys]])",
            )
    user_entries, key_entries = c.entries(data, "users"), c.entries(data, "keys")
    users = [_check_user(c, i, e) for i, e in enumerate(user_entries)]
    keys = [_check_key(c, i, e) for i, e in enumerate(key_entries)]
    desired = Desired(
        tuple(u for u in users if u is not None), tuple(k for k in keys if k is not None)
    )
    _check_relations(c, user_entries, key_entries)
    return desired, c.problems


# --- 3. the plan ---

Verb = Literal["create", "update", "unchanged", "revoke"]
Operation = Literal[
    "create_user", "update_user", "grant_servers", "grant_tools", "create_key", "update_key",
    "revoke_key",
]  # fmt: skip


@dataclass(frozen=True)
class Change:
    field: str
    old: Any  # as JSON (None: null); unused for a create
    new: Any


@dataclass(frozen=True)
class Call:
    """One API call, so one transaction: it happens entirely or not at all."""

    operation: Operation
    body: Mapping[str, Any]
    fields: tuple[str, ...]


@dataclass(frozen=True)
class Item:
    kind: Literal["user", "key"]
    verb: Verb
    email: str
    name: str | None = None  # a key's
    target_id: str | None = None  # the existing record's
    changes: tuple[Change, ...] = ()
    calls: tuple[Call, ...] = ()
    prefix: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "user":
            return f"user {self.email}"
        return f"key {self.name!r} of {self.email}"


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    notes: tuple[str, ...] = ()

    def count(self, verb: Verb) -> int:
        return sum(1 for item in self.items if item.verb == verb)

    @property
    def changes_anything(self) -> bool:
        return any(item.verb != "unchanged" for item in self.items)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value).astimezone(UTC) if value else None


# Order carries no meaning in these (the API sorts servers and permissions itself).
_SETS = frozenset({"servers", "permissions", "tools", "allowed_cidrs", "allowed_origins"})


def _canonical(name: str, value: Any) -> Any:
    """A field's JSON value in the form two equal settings share, as the API canonicalises:
    lists that are sets as sets, timestamps as instants (any offset, any precision), origins
    as browsers send them (HTTPS://App.example:443 is https://app.example)."""
    if value is None:
        return None
    if name == "allowed_origins":
        return frozenset(normalise_origin(origin) or origin for origin in value)
    if name in _SETS:
        return frozenset(value)
    if name == "expires_at":
        return _when(value)
    return value


def _changes(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> tuple[Change, ...]:
    return tuple(
        Change(name, current[name], value)
        for name, value in wanted.items()
        if _canonical(name, current[name]) != _canonical(name, value)
    )


def _listed(value: tuple[str, ...] | None) -> list[str] | None:
    return list(value) if value is not None else None


def _user_wanted(spec: UserSpec) -> dict[str, Any]:
    """The user's fields as the API's JSON shows them."""
    return {
        "role": spec.role,
        "display_name": spec.display_name,
        "servers": list(spec.servers),
        "tools": _listed(spec.tools),
    }


def _user_calls(changes: Sequence[Change]) -> tuple[Call, ...]:
    """The role and name in one PATCH first (a demoted admin can then take a tools policy),
    then the server grants, then the tools."""
    by_field = {c.field: c.new for c in changes}
    calls: list[Call] = []
    patch: dict[str, Any] = {f: by_field[f] for f in ("role", "display_name") if f in by_field}
    if patch:
        calls.append(Call("update_user", patch, tuple(patch)))
    if "servers" in by_field:
        calls.append(Call("grant_servers", {"servers": by_field["servers"]}, ("servers",)))
    if "tools" in by_field:
        calls.append(Call("grant_tools", {"tools": by_field["tools"]}, ("tools",)))
    return tuple(calls)


def _user_item(spec: UserSpec, user: User | None) -> Item:
    wanted = _user_wanted(spec)
    if user is None:
        # Defaults left out of the request, as a person would leave them out.
        body = {"email": spec.email} | {k: v for k, v in wanted.items() if v not in ("", None)}
        created = tuple(Change(k, None, v) for k, v in body.items() if k != "email")
        call = Call("create_user", body, tuple(body))
        return Item("user", "create", spec.email, changes=created, calls=(call,))
    changes = _changes(user, wanted)
    return Item(
        "user",
        "update" if changes else "unchanged",
        user["email"],
        target_id=user["id"],
        changes=changes,
        calls=_user_calls(changes),
    )


def _key_wanted(spec: KeySpec) -> dict[str, Any]:
    """The key's fields as the API's JSON shows them."""
    return {
        "servers": list(spec.servers),
        "permissions": list(spec.permissions),
        "tools": _listed(spec.tools),
        "description": spec.description,
        "expires_at": _iso(spec.expires_at),
        "rate_limit": spec.rate_limit,
        "allowed_cidrs": _listed(spec.allowed_cidrs),
        "allowed_origins": _listed(spec.allowed_origins),
    }


def _key_item(spec: KeySpec, key: ApiKey | None, email: str) -> Item:
    wanted = _key_wanted(spec)
    if key is None:
        body = {"name": spec.name, "servers": wanted["servers"]}
        body |= {k: v for k, v in wanted.items() if v not in ("", None)}
        created = tuple(Change(k, None, v) for k, v in body.items() if k != "name")
        call = Call("create_key", body, tuple(body))
        return Item("key", "create", email, spec.name, changes=created, calls=(call,))
    changes = _changes(key, wanted)
    calls = (
        Call("update_key", {c.field: c.new for c in changes}, tuple(c.field for c in changes)),
    )
    return Item(
        "key",
        "update" if changes else "unchanged",
        email,
        spec.name,
        target_id=key["id"],
        changes=changes,
        calls=calls if changes else (),
        prefix=key["prefix"],
    )


def _guard_caller(spec: KeySpec | UserSpec, state: State, problems: list[Problem]) -> None:
    """apply never locks out the key running it: no demotion of its user, no taking 'admin'
    from the key itself (both would stop the run half way, and every later one)."""
    users = state.user_by_email()
    if isinstance(spec, UserSpec):
        user = users.get(spec.ident)
        if user is not None and user["id"] == state.caller_user_id and spec.role != "admin":
            problems.append(
                Problem(
                    spec.lines["role"],
                    f"user {spec.email}: role: would take the admin role from the user of the "
                    'key running apply (write role = "admin")',
                )
            )
        return
    if "admin" not in spec.permissions:
        problems.append(
            Problem(
                spec.lines["permissions"],
                f"key {spec.name!r} of {spec.user}: permissions: would take 'admin' from the key "
                "running apply",
            )
        )


def _expiry_problem(spec: KeySpec, key: ApiKey | None, now: datetime) -> Problem | None:
    """A new or moved expiry must lie ahead (the API refuses it otherwise); an unchanged one
    may have passed."""
    if spec.expires_at is None or spec.expires_at > now:
        return None
    if key is not None and _when(key["expires_at"]) == spec.expires_at:
        return None
    return Problem(
        spec.lines["expires_at"],
        f"key {spec.name!r} of {spec.user}: expires_at: must be in the future",
    )


def _api_keys(listed: Sequence[ApiKey]) -> list[ApiKey]:
    """The API keys among the records the keys listing shows: OAuth grants are listed there
    too (SPEC §9), but a person approved each on a consent page and no file can declare one,
    so apply neither matches nor prunes them."""
    return [k for k in listed if k.get("kind", "key") == "key"]


def _prune_items(desired: Desired, state: State, prune: bool) -> tuple[list[Item], list[str]]:
    """The live keys of the users the file names ([[users]] or a key's `user`) that it does
    not list: revoked with prune, else mentioned. Never the calling key, nothing of others."""
    named = {u.ident for u in desired.users} | {k.user.casefold() for k in desired.keys}
    listed = {k.ident for k in desired.keys}
    emails = {u["id"]: u["email"] for u in state.users}
    items: list[Item] = []
    notes: list[str] = []
    unlisted = 0
    for key in sorted(
        _api_keys(state.keys), key=lambda k: (emails.get(k["user_id"], ""), k["name"])
    ):
        email = emails.get(key["user_id"])
        if email is None or email.casefold() not in named:
            continue
        if (email.casefold(), key["name"]) in listed:
            continue
        if key["id"] == state.caller_key_id:
            notes.append(f"key {key['name']!r} of {email} is the key running apply: kept")
            continue
        if not prune:
            unlisted += 1
            continue
        revoke = Call("revoke_key", {}, ())
        items.append(
            Item(
                "key",
                "revoke",
                email,
                key["name"],
                target_id=key["id"],
                calls=(revoke,),
                prefix=key["prefix"],
            )
        )
    if unlisted:
        notes.append(
            f"{unlisted} live key(s) of the users named here are not in the file: kept "
            "(--prune revokes them)"
        )
    return items, notes


def make_plan(desired: Desired, state: State, *, prune: bool) -> tuple[Plan, list[Problem]]:
    """Users (file order), then keys (file order), then revocations: the order they are
    applied in. Problems only the state can reveal (an expiry that passed, a lock-out) too."""
    users = state.user_by_email()
    problems: list[Problem] = []
    items = []
    for spec in desired.users:
        user = users.get(spec.ident)
        items.append(_user_item(spec, user))
        _guard_caller(spec, state, problems)
    live = {(k["user_id"], k["name"]): k for k in _api_keys(state.keys)}
    spelled = {spec.ident: spec.email for spec in desired.users}
    for key_spec in desired.keys:
        owner = users.get(key_spec.user.casefold())
        # The user's email as the API has it, else as its [[users]] entry spells it.
        email = owner["email"] if owner else spelled.get(key_spec.user.casefold(), key_spec.user)
        key = live.get((owner["id"], key_spec.name)) if owner is not None else None
        items.append(_key_item(key_spec, key, email))
        if key is not None and key["id"] == state.caller_key_id:
            _guard_caller(key_spec, state, problems)
        if (expiry := _expiry_problem(key_spec, key, state.now)) is not None:
            problems.append(expiry)
    revocations, notes = _prune_items(desired, state, prune)
    return Plan(tuple(items + revocations), tuple(notes)), problems


# --- showing the plan ---

_MARK = {"create": "+", "update": "~", "unchanged": "=", "revoke": "-"}


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_plan(plan: Plan) -> Iterator[str]:
    for item in plan.items:
        head = f"  {_MARK[item.verb]} {item.verb} {item.label}"
        if item.verb == "unchanged":
            yield f"  {_MARK[item.verb]} {item.label} (unchanged)"
        elif item.verb == "revoke":
            yield f"{head} ({item.prefix})"
        else:
            yield head
        for change in item.changes:
            if item.verb == "create":
                yield f"      {change.field} = {_show(change.new)}"
            else:
                yield f"      {change.field}: {_show(change.old)} -> {_show(change.new)}"
    for note in plan.notes:
        yield f"  note: {note}"
    yield (
        f"Plan: {plan.count('create')} to create, {plan.count('update')} to update, "
        f"{plan.count('revoke')} to revoke, {plan.count('unchanged')} unchanged."
    )


# --- 4. applying it ---


@dataclass(frozen=True)
class Secret:
    user: str
    name: str
    key_id: str
    key: str


@dataclass
class Outcome:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    stopped: bool = False
    secrets: list[Secret] = field(default_factory=list)


_PAST = {
    "create_user": "created",
    "update_user": "updated",
    "grant_servers": "granted servers to",
    "grant_tools": "set the tools of",
    "create_key": "created",
    "update_key": "updated",
    "revoke_key": "revoked",
}


async def _call(admin: KeystileAdmin, item: Item, call: Call, ids: dict[str, str]) -> str | None:
    """Make one call; the new key's secret when it creates one."""
    body: dict[str, Any] = dict(call.body)
    target = item.target_id or ""
    match call.operation:
        case "create_user":
            user = await admin.users.create(body.pop("email"), **body)
            ids[item.email.casefold()] = user["id"]
        case "update_user":
            await admin.users.update(target, **body)
        case "grant_servers":
            await admin.users.grant_servers(target, body["servers"])
        case "grant_tools":
            await admin.users.grant_tools(target, body["tools"])
        case "create_key":
            created = await admin.keys.create(
                body.pop("name"), body.pop("servers"), user_id=ids[item.email.casefold()], **body
            )
            return created["key"]
        case "update_key":
            await admin.keys.update(target, **body)
        case "revoke_key":
            await admin.keys.delete(target)
    return None


async def execute(
    plan: Plan, admin: KeystileAdmin, state: State, out: TextIO, err: TextIO
) -> Outcome:
    """Each item's calls in plan order. A failed call ends its item (each earlier call of it
    stays done: it was its own transaction) and skips the keys of its user; an admin plane
    that is gone, or a key that stopped working, ends the run."""
    ids = {u["email"].casefold(): u["id"] for u in state.users}
    failed_users: set[str] = set()
    outcome = Outcome()
    for item in plan.items:
        if item.verb == "unchanged":
            continue
        if outcome.stopped or (item.kind == "key" and item.email.casefold() in failed_users):
            why = "not attempted" if outcome.stopped else "skipped: a change to its user failed"
            print(f"keystile: apply: {item.verb} {item.label}: {why}", file=err)
            outcome.skipped += 1
            continue
        await _run_item(admin, item, ids, failed_users, outcome, out, err)
    return outcome


async def _run_item(
    admin: KeystileAdmin,
    item: Item,
    ids: dict[str, str],
    failed_users: set[str],
    outcome: Outcome,
    out: TextIO,
    err: TextIO,
) -> None:
    for call in item.calls:
        try:
            secret = await _call(admin, item, call, ids)
        except KeystileError as exc:
            what = f" ({', '.join(call.fields)})" if item.verb == "update" else ""
            print(f"keystile: apply: {item.verb} {item.label}{what}: {exc.message}", file=err)
            outcome.failed += 1
            if item.kind == "user":
                failed_users.add(item.email.casefold())
            # Gone, or the key no longer works: every later call would fail the same way.
            outcome.stopped = isinstance(exc, KeystileUnreachable) or exc.status == 401
            return
        fields = f" ({', '.join(call.fields)})" if call.operation.startswith("update") else ""
        print(f"  {_PAST[call.operation]} {item.label}{fields}", file=out)
        if secret is not None:
            key_id = secret.split("-")[2]
            outcome.secrets.append(Secret(item.email, item.name or "", key_id, secret))
    outcome.done += 1


# --- the secrets ---


def check_secrets_path(path: str) -> str | None:
    """Why the secrets cannot go to `path`, or None."""
    if os.path.islink(path):
        return f"--secrets-out {path} is a symbolic link; name a new file"
    if os.path.lexists(path):
        return f"--secrets-out {path} exists; name a new file (secrets are never overwritten)"
    return None


def open_secrets(path: str) -> int:
    """A new file only this user can read: created, never followed through a link, never an
    existing file (O_EXCL), mode 0600 whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_secrets(fd: int, secrets: Sequence[Secret]) -> None:
    document = {
        "keys": [{"user": s.user, "name": s.name, "id": s.key_id, "key": s.key} for s in secrets]
    }
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")


def print_secrets(secrets: Sequence[Secret], out: TextIO) -> None:
    if not secrets:
        return
    print("\nSecrets of the keys created (shown once; store them now):", file=out)
    for secret in secrets:
        print(f"# {secret.user} {secret.name}", file=out)
        print(secret.key, file=out)


# --- the command ---


async def load_state(admin: KeystileAdmin) -> State:
    servers = await admin.servers()
    users = await admin.users.fetch_all()
    keys = await admin.keys.fetch_all(all=True)
    return State(
        servers=frozenset(s["name"] for s in servers),
        users=users,
        keys=keys,
        caller_key_id=admin.key_id,
        caller_user_id=admin.user_id,
        now=datetime.now(UTC),
    )


def report_problems(path: str, problems: Sequence[Problem], err: TextIO) -> None:
    for problem in sorted(problems, key=lambda p: p.line):
        print(f"{path}:{problem.line}: {problem.message}", file=err)
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    print(f"keystile: apply: {path} is invalid ({count}); nothing was changed", file=err)


async def command(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    path: str = args.file
    if args.secrets_out and (why := check_secrets_path(args.secrets_out)):
        print(f"keystile: apply: {why}", file=err)
        return EXIT_INVALID
    try:
        text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"keystile: apply: cannot read {path}: {_why(exc)}", file=err)
        return EXIT_INVALID
    data, problems = parse(text)
    if data is None:
        report_problems(path, problems, err)
        return EXIT_INVALID
    state = await load_state(admin)
    desired, problems = check(data, locate(text), state)
    plan, more = make_plan(desired, state, prune=args.prune) if not problems else (None, [])
    if problems or more or plan is None:
        report_problems(path, problems + more, err)
        return EXIT_INVALID
    print(f"Plan for {path}:", file=out)
    for line in render_plan(plan):
        print(line, file=out)
    if args.dry_run:
        print("Dry run: nothing was changed.", file=out)
        return EXIT_OK
    return await apply_plan(plan, admin, state, args.secrets_out, out, err)


async def apply_plan(
    plan: Plan,
    admin: KeystileAdmin,
    state: State,
    secrets_out: str | None,
    out: TextIO,
    err: TextIO,
) -> int:
    fd = None
    if secrets_out:
        try:
            fd = open_secrets(secrets_out)  # before any change: a refusal changes nothing
        except OSError as exc:
            print(f"keystile: apply: cannot create {secrets_out}: {_why(exc)}", file=err)
            return EXIT_INVALID
    if not plan.changes_anything:
        print("No changes.", file=out)
        outcome = Outcome()
    else:
        print("Applying:", file=out)
        outcome = await execute(plan, admin, state, out, err)
        summary = f"Applied {outcome.done} of {outcome.done + outcome.failed + outcome.skipped}"
        extra = f"; {outcome.failed} failed, {outcome.skipped} skipped" if outcome.failed else ""
        print(f"{summary} changes{extra}.", file=out)
    _hand_over(fd, secrets_out, outcome.secrets, out, err)
    if outcome.failed or outcome.skipped:
        return EXIT_FAILED
    return EXIT_OK


def _hand_over(
    fd: int | None, path: str | None, secrets: Sequence[Secret], out: TextIO, err: TextIO
) -> None:
    """Write the secrets to the file, or print them; printed anyway if the file fails, since
    they cannot be shown again."""
    if fd is None:
        print_secrets(secrets, out)
        return
    try:
        write_secrets(fd, secrets)
    except OSError as exc:
        print(f"keystile: apply: cannot write {path}: {_why(exc)}; the secrets follow", file=err)
        print_secrets(secrets, out)
        return
    if secrets:
        print(f"Secrets of the {len(secrets)} key(s) created written to {path}.", file=out)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
