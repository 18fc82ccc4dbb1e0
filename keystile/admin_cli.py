"""keystile keys | users | usage | apply: the admin API from a shell (SPEC §8).

The admin plane is `--admin-url`, else KEYSTILE_ADMIN_URL, else http://127.0.0.1:8081. The key
comes only from `--admin-key-file PATH` or KEYSTILE_ADMIN_KEY: a value on the command line can
be read by every user of the machine (ps, /proc/<pid>/cmdline), so `--admin-key` and anything
that looks like a key anywhere in argv are refused before anything else happens.

Output: tables and relative dates for people; `--json` prints the API's JSON for scripts. A
created or rotated key's secret is the only thing on stdout (its details go to stderr), so
`KEY=$(keystile keys create ...)` works. Exit codes: 0 done, 1 the API refused (its message on
one line of stderr) or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from admin.client import (
    ApiKey,
    ApiKeyWithSecret,
    KeystileAdmin,
    KeystileError,
    KeystileUnreachable,
    RateLimit,
    Usage,
    User,
)
from gateway.models import PERMISSIONS

ENV_URL = "KEYSTILE_ADMIN_URL"
ENV_KEY = "KEYSTILE_ADMIN_KEY"
DEFAULT_URL = "http://127.0.0.1:8081"
EXIT_OK, EXIT_API, EXIT_USAGE = 0, 1, 2
STATUSES = ("active", "disabled", "expired", "pending", "revoked")
GROUP_BY = ("key", "user", "server", "tool", "status", "hour", "day")
# The secret of a key (ks1-) or an OAuth token (kso1-, ksr1-): more than the 4 characters a
# masked prefix shows.
_SECRET_LIKE = re.compile(r"ks(?:1|o1|r1)-[0-9A-Za-z]+-[0-9A-Za-z]+-[0-9A-Za-z]{5,}")
KEY_IN_ARGV = (
    "a key on the command line can be read by every user of this machine (ps, "
    f"/proc/<pid>/cmdline); set {ENV_KEY} or pass --admin-key-file PATH"
)

Command = Callable[[KeystileAdmin, argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """The command line asks for something that cannot be done as asked (exit 2)."""


class CommandError(Exception):
    """The command cannot be done with what the API answered (exit 1)."""


class _Null:
    """A flag given as "none"/"never": send JSON null (absent flags send nothing)."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


# --- argv: no key in it ---


def refuse_secrets(argv: Sequence[str]) -> str | None:
    """Why argv cannot be taken (it carries a key), or None. The value is never echoed."""
    for arg in argv:
        if arg == "--admin-key" or arg.startswith("--admin-key="):
            return f"--admin-key is not accepted: {KEY_IN_ARGV}"
        if _SECRET_LIKE.search(arg):
            return f"an argument looks like an API key and was refused: {KEY_IN_ARGV}"
    return None


# --- values of flags ---


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w`."""
    found = _DURATION.fullmatch(text.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 30d, 12h or 90m")
    return timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])


def _instant(text: str, *, sign: int) -> datetime:
    """An ISO date or timestamp (no offset: UTC), or a duration from now (`sign` -1: ago)."""
    if _DURATION.fullmatch(text.strip()):
        return datetime.now(UTC) + sign * duration(text)
    try:
        if len(text.strip()) == 10:
            day = date.fromisoformat(text.strip())
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO date or timestamp (2030-01-31, 2030-01-31T12:00:00Z) "
            "or a duration like 30d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def future(text: str) -> str | _Null:
    """--expires / --valid-from: a moment, a duration from now, or never."""
    if text.strip().lower() in ("never", "none", "null"):
        return NULL
    return _iso(_instant(text, sign=1))


def past(text: str) -> str:
    """--from / --to: a moment, or a duration ago."""
    return _iso(_instant(text, sign=-1))


def names(text: str) -> list[str]:
    """A comma-separated list; empty text is the empty list."""
    return [part.strip() for part in text.split(",") if part.strip()]


def servers(text: str) -> list[str]:
    return ["*"] if text.strip() == "*" else names(text)


def permissions(text: str) -> list[str]:
    given = names(text)
    unknown = [p for p in given if p not in PERMISSIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown permission {unknown[0]!r}; expected some of {','.join(PERMISSIONS)}"
        )
    return given


def nullable(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`none` or `null` for JSON null, else the value."""

    def parse_or_null(text: str) -> Any:
        return NULL if text.strip().lower() in ("none", "null") else parse(text)

    parse_or_null.__name__ = parse.__name__  # argparse names the type in its errors
    return parse_or_null


def rate_limit(text: str) -> RateLimit:
    """N/S: N requests per S seconds (S may be a duration: 100/1m)."""
    count, slash, per = text.partition("/")
    try:
        seconds = int(per) if per.strip().isdigit() else int(duration(per).total_seconds())
        requests = int(count)
    except (ValueError, argparse.ArgumentTypeError):
        seconds = requests = 0
    if not slash or requests < 1 or seconds < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N/S, e.g. 100/60 or 100/1m")
    return {"requests": requests, "per_seconds": seconds}


def grace(text: str) -> float:
    """Seconds, or a duration."""
    try:
        value = float(text)
    except ValueError:
        return duration(text).total_seconds()
    if value < 0:
        raise argparse.ArgumentTypeError("expected seconds >= 0 or a duration like 1h")
    return value


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return lowered in ("true", "yes", "1")


def key_id(text: str) -> str:
    """A key id, or its masked prefix as the tables show it (ks1-<user>-<key>-abcd…, or an
    OAuth grant's kso1-<user>-<grant>-…)."""
    parts = text.split("-")
    if len(parts) == 4 and parts[0] in ("ks1", "kso1"):
        return parts[2]
    return text


# --- showing things ---


_RELATIVE_UNITS = (
    ("year", 365 * 86400),
    ("month", 30 * 86400),
    ("week", 7 * 86400),
    ("day", 86400),
    ("hour", 3600),
    ("minute", 60),
)
_NEIGHBOURS = {
    "year": ("last year", "next year"),
    "month": ("last month", "next month"),
    "week": ("last week", "next week"),
    "day": ("yesterday", "tomorrow"),
}


def relative(value: str | None, now: datetime, *, none: str = "never") -> str:
    """As the admin page says it: "just now", "3 days ago", "in 2 hours", "yesterday"."""
    if value is None:
        return none
    seconds = (datetime.fromisoformat(value) - now).total_seconds()
    if abs(seconds) < 45:
        return "just now"
    unit, size = next(((u, s) for u, s in _RELATIVE_UNITS if abs(seconds) >= s), ("minute", 60))
    count = int(seconds / size) if abs(seconds) >= size else round(seconds / 60)
    if abs(count) == 1 and unit in _NEIGHBOURS:
        return _NEIGHBOURS[unit][int(count > 0)]
    plural = unit if abs(count) == 1 else unit + "s"
    return f"in {count} {plural}" if count > 0 else f"{-count} {plural} ago"


def clean(value: object) -> str:
    """One printable line: what a name holds cannot move the cursor or forge a line."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[clean(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def listing(values: Sequence[str] | None, *, none: str = "all") -> str:
    if values is None:
        return none
    return ",".join(values) if values else "none"


def _rate(value: RateLimit | None) -> str:
    return f"{value['requests']}/{value['per_seconds']}s" if value else "none"


def _owner(key: ApiKey) -> str:
    return key["user"].get("email", key["user_id"])


def _name(key: ApiKey) -> str:
    # An OAuth grant is named after its client: marked, so it is not taken for a key.
    return f"{key['name']} (oauth)" if key.get("kind") == "oauth" else key["name"]


def keys_table(keys: Sequence[ApiKey], now: datetime) -> str:
    rows = [
        (
            k["id"],
            _name(k),
            _owner(k),
            k["prefix"],
            k["status"],
            listing(k["servers"]),
            ",".join(k["permissions"]),
            listing(k["tools"]),
            relative(k["expires_at"], now),
            relative(k["last_used_at"], now),
        )
        for k in sorted(keys, key=lambda k: k["created_at"], reverse=True)
    ]
    headers = ("ID", "NAME", "USER", "PREFIX", "STATUS", "SERVERS", "PERMISSIONS", "TOOLS")
    return table((*headers, "EXPIRES", "LAST USED"), rows)


def _when(value: str | None, now: datetime, *, none: str = "never") -> str:
    return f"{value} ({relative(value, now)})" if value else none


def key_details(key: ApiKey, now: datetime) -> str:
    fields = [
        ("id", key["id"]),
        ("name", key["name"]),
        ("kind", key.get("kind", "key")),
        ("user", _owner(key)),
        ("prefix", key["prefix"]),
        ("status", key["status"]),
        ("description", key["description"] or "-"),
        ("servers", listing(key["servers"])),
        ("permissions", ",".join(key["permissions"]) or "none"),
        ("tools", listing(key["tools"])),
        ("rate limit", _rate(key["rate_limit"])),
        ("allowed cidrs", listing(key["allowed_cidrs"], none="any")),
        ("allowed origins", listing(key["allowed_origins"], none="any")),
        ("valid from", _when(key["valid_from"], now, none="always")),
        ("expires", _when(key["expires_at"], now)),
        ("created", _when(key["created_at"], now)),
        ("last used", _when(key["last_used_at"], now)),
    ]
    if key["revoked_at"]:
        fields.append(("revoked", _when(key["revoked_at"], now)))
    return _details(fields)


def _details(fields: Sequence[tuple[str, object]]) -> str:
    width = max(len(label) for label, _ in fields)
    return "\n".join(f"{label.ljust(width)}  {clean(value)}" for label, value in fields)


def users_table(users: Sequence[User], now: datetime) -> str:
    rows = [
        (
            u["id"],
            u["email"],
            u["display_name"] or "-",
            u["role"],
            "yes" if u["is_active"] else "no",
            listing(u["servers"]),
            listing(u["tools"]),
            relative(u["created_at"], now),
        )
        for u in users
    ]
    headers = ("ID", "EMAIL", "NAME", "ROLE", "ACTIVE", "SERVERS", "TOOLS", "CREATED")
    return table(headers, rows)


def user_details(user: User, now: datetime) -> str:
    return _details(
        [
            ("id", user["id"]),
            ("email", user["email"]),
            ("name", user["display_name"] or "-"),
            ("role", user["role"]),
            ("active", "yes" if user["is_active"] else "no"),
            ("servers", listing(user["servers"])),
            ("tools", listing(user["tools"])),
            ("created", _when(user["created_at"], now)),
        ]
    )


def _size(count: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def usage_table(usage: Usage, group_by: Sequence[str]) -> str:
    fields = [{"key": "key_id", "user": "user_id"}.get(d, d) for d in group_by]
    headers = [f.upper() for f in fields] + ["REQUESTS", "ERRORS", "P50", "P95", "IN", "OUT"]
    rows = []
    for row in usage["rows"]:
        values: Mapping[str, Any] = row
        group = ["-" if values.get(f) is None else values[f] for f in fields]
        rows.append(
            [
                *group,
                row["requests"],
                row["errors"],
                _ms(row["p50_ms"]),
                _ms(row["p95_ms"]),
                _size(row["bytes_in"]),
                _size(row["bytes_out"]),
            ]
        )
    return table(headers, rows)


def emit_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _tell(message: str) -> None:
    print(message, file=sys.stderr)


# --- resolving what people type ---


async def user_id_of(admin: KeystileAdmin, text: str) -> str:
    """A user id, or the id of the user with this email (through the users list)."""
    if "@" not in text:
        return text
    user = await admin.users.find(text)
    if user is None:
        raise CommandError(f"no user with email {text}")
    return user["id"]


async def user_of(admin: KeystileAdmin, text: str) -> User:
    if "@" not in text:
        return await admin.users.fetch(text)
    user = await admin.users.find(text)
    if user is None:
        raise CommandError(f"no user with email {text}")
    return user


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags given, by API field name; NULL becomes None (JSON null)."""
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = None if value is NULL else value
    return out


# --- keys ---

KEY_FIELDS = (
    "name",
    "description",
    "servers",
    "permissions",
    "tools",
    "valid_from",
    "expires_at",
    "rate_limit",
    "allowed_cidrs",
    "allowed_origins",
)


async def keys_list(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    user_id = await user_id_of(admin, args.user) if args.user else None
    keys = await admin.keys.fetch_all(all=args.all, user_id=user_id, status=args.status)
    if args.json:
        emit_json(keys)
    elif keys:
        print(keys_table(keys, datetime.now(UTC)))
    else:
        _tell("No keys.")
    return EXIT_OK


async def keys_show(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    key = await admin.keys.fetch(key_id(args.id))
    if args.json:
        emit_json(key)
    else:
        print(key_details(key, datetime.now(UTC)))
    return EXIT_OK


def _secret(record: ApiKeyWithSecret, args: argparse.Namespace, verb: str) -> None:
    """The full key alone on stdout; what it is on stderr (or everything as JSON)."""
    if args.json:
        emit_json(record)
        return
    _tell(key_details(record, datetime.now(UTC)))
    _tell(f"{verb} key {clean(record['name'])!r}; its secret follows, shown only this once:")
    print(record["key"])


async def keys_create(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    fields = given(args, KEY_FIELDS)
    name, scope = fields.pop("name"), fields.pop("servers")
    if args.user:
        fields["user_id"] = await user_id_of(admin, args.user)
    _secret(await admin.keys.create(name, scope, **fields), args, "Created")
    return EXIT_OK


async def keys_update(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    fields = given(args, KEY_FIELDS)
    if not fields:
        raise UsageError("nothing to change: give at least one of the flags (see --help)")
    key = await admin.keys.update(key_id(args.id), **fields)
    _show_key(key, args, "Updated")
    return EXIT_OK


def _show_key(key: ApiKey, args: argparse.Namespace, verb: str) -> None:
    if args.json:
        emit_json(key)
    else:
        print(f"{verb} key {key['id']} ({clean(key['name'])!r}, {key['prefix']}): {key['status']}")


async def keys_revoke(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    ident = key_id(args.id)
    await admin.keys.delete(ident)
    _show_key(await admin.keys.fetch(ident), args, "Revoked")  # the record stays, revoked
    return EXIT_OK


async def keys_enable(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    _show_key(await admin.keys.enable(key_id(args.id)), args, "Enabled")
    return EXIT_OK


async def keys_disable(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    _show_key(await admin.keys.disable(key_id(args.id)), args, "Disabled")
    return EXIT_OK


async def keys_rotate(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    rotated = await admin.keys.rotate(key_id(args.id), grace_seconds=args.grace_seconds)
    _secret(rotated, args, "Rotated")
    return EXIT_OK


# --- users ---


async def users_list(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    users = await admin.users.fetch_all()
    if args.json:
        emit_json(users)
    elif users:
        print(users_table(users, datetime.now(UTC)))
    else:
        _tell("No users.")
    return EXIT_OK


def _show_user(user: User, args: argparse.Namespace, verb: str | None = None) -> None:
    if args.json:
        emit_json(user)
    elif verb is None:
        print(user_details(user, datetime.now(UTC)))
    else:
        print(f"{verb} user {user['id']} ({clean(user['email'])}).")


async def users_show(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    _show_user(await user_of(admin, args.id), args)
    return EXIT_OK


async def users_create(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    fields = given(args, ("display_name", "role", "servers", "tools"))
    _show_user(await admin.users.create(args.email, **fields), args, "Created")
    return EXIT_OK


async def users_update(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    fields = given(args, ("email", "display_name", "role", "is_active"))
    if not fields:
        raise UsageError("nothing to change: give at least one of the flags (see --help)")
    user = await user_of(admin, args.id)
    _show_user(await admin.users.update(user["id"], **fields), args, "Updated")
    return EXIT_OK


async def users_delete(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    user = await user_of(admin, args.id)
    await admin.users.delete(user["id"])
    if args.json:
        emit_json({"id": user["id"], "email": user["email"], "deleted": True})
    else:
        print(f"Deleted user {user['id']} ({clean(user['email'])}); every key of theirs stopped.")
    return EXIT_OK


async def users_grant(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    if args.servers is None and args.tools is None:
        raise UsageError("give --servers, --tools or both")
    user = await user_of(admin, args.id)
    if args.servers is not None:
        user = await admin.users.grant_servers(user["id"], args.servers)
    if args.tools is not None:
        user = await admin.users.grant_tools(user["id"], None if args.tools is NULL else args.tools)
    _show_user(user, args, "Granted")
    return EXIT_OK


# --- usage ---


async def usage(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    if args.csv and args.json:
        raise UsageError("--csv and --json: choose one")
    user_id = await user_id_of(admin, args.user) if args.user else None
    query: dict[str, Any] = {
        "from_": args.from_,
        "to": args.to,
        "group_by": args.group_by or None,
        "key_id": key_id(args.key) if args.key else None,
        "user_id": user_id,
        "server": args.server,
        "tool": args.tool,
    }
    if args.csv:
        sys.stdout.write(await admin.usage_csv(**query))
        return EXIT_OK
    found = await admin.usage(**query)
    if args.json:
        emit_json(found)
    elif found["rows"]:
        print(f"Usage from {found['from']} to {found['to']}:")
        print(usage_table(found, args.group_by or []))
    else:
        _tell(f"No usage from {found['from']} to {found['to']}.")
    return EXIT_OK


def group_by(text: str) -> list[str]:
    chosen = names(text)
    unknown = [d for d in chosen if d not in GROUP_BY]
    if unknown or not 1 <= len(chosen) <= 2 or len(set(chosen)) != len(chosen):
        raise argparse.ArgumentTypeError(f"one or two of {','.join(GROUP_BY)}, comma-separated")
    return chosen


# --- running a command ---


def admin_key(args: argparse.Namespace) -> str:
    """--admin-key-file's content, else KEYSTILE_ADMIN_KEY; never anything from argv."""
    if args.admin_key_file:
        try:
            with open(args.admin_key_file, encoding="utf-8") as handle:
                key = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UsageError(f"cannot read --admin-key-file {args.admin_key_file}: {why}") from None
        if not key:
            raise UsageError(f"--admin-key-file {args.admin_key_file} is empty")
        return key
    key = os.environ.get(ENV_KEY, "").strip()
    if not key:
        raise UsageError(f"no admin key: set {ENV_KEY} or pass --admin-key-file PATH")
    return key


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _api_failure(exc: KeystileError) -> str:
    message = _one_line(exc.message)
    if isinstance(exc, KeystileUnreachable):
        return message
    if exc.status == 401:
        return f"the admin plane refused the key (401 {exc.error}): {message}"
    if exc.status == 403:
        return f"not allowed with this key (403 {exc.error}): {message}"
    return f"{message} ({exc.status} {exc.error})"


def run(command: Command) -> Callable[[argparse.Namespace], int]:
    """The command with its admin client; every failure as one line on stderr and an exit code."""

    def main(args: argparse.Namespace) -> int:
        url = args.admin_url or os.environ.get(ENV_URL) or DEFAULT_URL
        try:
            client = KeystileAdmin(url, admin_key(args))
        except (UsageError, ValueError) as exc:
            _tell(f"keystile: {exc}")
            return EXIT_USAGE
        try:
            return asyncio.run(_call(client, command, args))
        except UsageError as exc:
            _tell(f"keystile: {exc}")
            return EXIT_USAGE
        except CommandError as exc:
            _tell(f"keystile: {exc}")
            return EXIT_API
        except KeystileError as exc:
            _tell(f"keystile: {_api_failure(exc)}")
            return EXIT_API

    return main


async def _call(client: KeystileAdmin, command: Command, args: argparse.Namespace) -> int:
    async with client:
        return await command(client, args)


# --- the parsers ---


def _connection(json_flag: bool = True) -> argparse.ArgumentParser:
    """The options every admin command takes (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parent.add_argument_group("admin plane")
    group.add_argument(
        "--admin-url",
        metavar="URL",
        help=f"the admin plane (default: ${ENV_URL}, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--admin-key-file",
        metavar="PATH",
        help=f"read the admin key from this file (default: ${ENV_KEY}); never on the command line",
    )
    if json_flag:
        parent.add_argument("--json", action="store_true", help="print the API's JSON")
    return parent


def _leaf(
    group: Any, name: str, command: Command, help_text: str, parent: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(
        name, help=help_text, description=help_text, parents=[parent], allow_abbrev=False
    )
    parser.set_defaults(func=run(command))
    return parser


def _key_flags(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    parser.add_argument("--name", required=creating, help="unique among the user's live keys")
    parser.add_argument("--description")
    parser.add_argument(
        "--servers", type=servers, required=creating, metavar="A,B|*", help="server names, or *"
    )
    parser.add_argument(
        "--permissions", type=permissions, metavar="P,Q", help="of mcp,chat,keys,admin"
    )
    parser.add_argument(
        "--tools",
        type=nullable(names),
        metavar="PATTERNS|none",
        help="tool patterns like 'github/search_*,!github/delete_*'; none: every tool",
    )
    parser.add_argument(
        "--expires",
        dest="expires_at",
        type=future,
        metavar="WHEN",
        help="ISO date or timestamp, a duration like 30d or 12h, or never",
    )
    parser.add_argument("--valid-from", type=future, metavar="WHEN", help="not usable before")
    parser.add_argument(
        "--rate-limit", type=nullable(rate_limit), metavar="N/S|none", help="N requests per S s"
    )
    parser.add_argument(
        "--allowed-cidrs", type=nullable(names), metavar="CIDR,...|none", help="client networks"
    )
    parser.add_argument(
        "--allowed-origins",
        type=nullable(names),
        metavar="ORIGIN,...|none",
        help="browser origins the key works from, like https://app.example.com (requests "
        "without an Origin are not affected); none: any",
    )


def _keys(commands: Any, parent: argparse.ArgumentParser) -> None:
    keys = commands.add_parser("keys", help="API keys", allow_abbrev=False)
    sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing_ = _leaf(sub, "list", keys_list, "list keys (your own; admins: --all, --user)", parent)
    listing_.add_argument("--all", action="store_true", help="every key of the workspace")
    listing_.add_argument("--user", metavar="EMAIL|ID", help="this user's keys")
    listing_.add_argument("--status", choices=STATUSES, help="only keys in this status")
    show = _leaf(sub, "show", keys_show, "one key", parent)
    show.add_argument("id", help="the key's id (or its masked prefix)")
    create = _leaf(sub, "create", keys_create, "create a key; prints its secret once", parent)
    _key_flags(create, creating=True)
    create.add_argument("--user", metavar="EMAIL|ID", help="whose key (admins; default: yours)")
    update = _leaf(sub, "update", keys_update, "change a key's fields", parent)
    update.add_argument("id", help="the key's id (or its masked prefix)")
    _key_flags(update, creating=False)
    for name, command, text in (
        ("revoke", keys_revoke, "revoke a key: immediate and permanent"),
        ("enable", keys_enable, "enable a disabled key"),
        ("disable", keys_disable, "disable a key (reversible)"),
    ):
        _leaf(sub, name, command, text, parent).add_argument("id", help="the key's id")
    rotate = _leaf(sub, "rotate", keys_rotate, "a new secret for a key; prints it once", parent)
    rotate.add_argument("id", help="the key's id")
    rotate.add_argument(
        "--grace-seconds",
        type=grace,
        metavar="S|DURATION",
        help="how long the old secret keeps working (default 0)",
    )


def _users(commands: Any, parent: argparse.ArgumentParser) -> None:
    users = commands.add_parser(
        "users", help="users, roles and grants (admins)", allow_abbrev=False
    )
    sub = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    _leaf(sub, "list", users_list, "list users", parent)
    for name, command, text in (
        ("show", users_show, "one user"),
        ("delete", users_delete, "delete a user; every key of theirs stops"),
    ):
        _leaf(sub, name, command, text, parent).add_argument("id", metavar="EMAIL|ID")
    create = _leaf(sub, "create", users_create, "create a user", parent)
    create.add_argument("--email", required=True)
    update = _leaf(sub, "update", users_update, "change a user", parent)
    update.add_argument("id", metavar="EMAIL|ID")
    update.add_argument("--email")
    update.add_argument("--is-active", type=boolean, metavar="true|false")
    for parser in (create, update):
        parser.add_argument("--display-name")
        parser.add_argument("--role", choices=("admin", "member"))
    for parser in (create, _leaf(sub, "grant", users_grant, "set a user's grants", parent)):
        parser.add_argument("--servers", type=servers, metavar="A,B|*", help="server grants")
        parser.add_argument(
            "--tools", type=nullable(names), metavar="PATTERNS|none", help="tool patterns"
        )
    sub.choices["grant"].add_argument("id", metavar="EMAIL|ID")


def _usage(commands: Any, parent: argparse.ArgumentParser) -> None:
    parser = _leaf(commands, "usage", usage, "usage totals (GET /api/usage)", parent)
    parser.add_argument(
        "--from", dest="from_", type=past, metavar="WHEN", help="ISO date/timestamp or 7d (ago)"
    )
    parser.add_argument("--to", type=past, metavar="WHEN", help="default: now")
    parser.add_argument(
        "--group-by", type=group_by, metavar="A[,B]", help=f"one or two of {','.join(GROUP_BY)}"
    )
    parser.add_argument("--key", metavar="ID", help="only this key")
    parser.add_argument("--user", metavar="EMAIL|ID", help="only this user's keys")
    parser.add_argument("--server", help="only this server")
    parser.add_argument("--tool", help="only this tool")
    parser.add_argument("--csv", action="store_true", help="print the API's CSV")


async def apply_file(admin: KeystileAdmin, args: argparse.Namespace) -> int:
    from keystile import apply  # its checks need the API's field rules: load them only here

    return await apply.command(admin, args)


def _apply(commands: Any) -> None:
    parser = _leaf(
        commands,
        "apply",
        apply_file,
        "make users and keys as a TOML file declares them",
        _connection(json_flag=False),
    )
    parser.add_argument("-f", "--file", required=True, metavar="FILE", help="the TOML file")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="revoke the live keys of the file's users that it does not list",
    )
    parser.add_argument(
        "--secrets-out",
        metavar="FILE",
        help="write the new keys' secrets to this new file (mode 0600) instead of printing them",
    )


def register(commands: Any) -> None:
    """Add keys, users, usage and apply to `keystile`'s subcommands."""
    parent = _connection()
    _keys(commands, parent)
    _users(commands, parent)
    _usage(commands, parent)
    _apply(commands)
