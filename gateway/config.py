"""Settings: frozen typed data, loaded from TOML plus environment overrides, validated at once.

Precedence: `DATABASE_URL` and `KEYSTILE_<SECTION>_<KEY>` environment variables, then the TOML
file, then the defaults below. Every problem is collected before failing, one line per field.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.cors import normalise_origin

SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one human line per bad field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Secret(str):
    """A string whose repr hides its value, so it never lands in logs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('**********')"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    listen: Address = Address("0.0.0.0", 8080)  # noqa: S104 - the data plane serves the network
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_body_bytes: int = 10 * 1024 * 1024
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    stream_idle_timeout: float = 0.0
    access_log: bool = True
    access_log_format: str = "text"  # "text": one readable line; "json": one object per line
    event_loop: str = "uvloop"  # "uvloop" (C, where installed) or "asyncio" (gateway.event_loop)
    shutdown_timeout: float = 30.0
    keepalive_timeout: float = 30.0  # idle connection, or one trickling a request head
    body_timeout: float = 30.0  # longest silence while a request body is read
    # An upload slower than this on average (after body_timeout's worth of grace) is dropped
    # with 408, so a trickled body cannot hold a connection for ever. 0: no floor.
    body_min_rate: int = 1024  # bytes per second
    # Open connections per upstream origin; further requests wait for one to be released.
    upstream_max_connections: int = 256
    # Client connections per process; past it new connections get 503 and are closed, so
    # the process keeps file descriptors for its upstreams, its database and its admin plane.
    max_connections: int = 10_000
    # The data plane as clients see it, e.g. "https://gw.example.com": an origin, kept without
    # a trailing slash (it is the OAuth issuer, compared character for character). Empty: the
    # OAuth flow for MCP clients (SPEC §9) is off and its routes answer 404.
    public_url: str = ""
    # Browser origins whose pages may call the data plane (CORS, SPEC §4); ["*"]: any origin.
    # Empty: no CORS headers, and preflights are refused (the OAuth endpoints stay open).
    cors_allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address = Address("127.0.0.1", 8081)
    max_connections: int = 256  # client connections per process on the admin plane


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: Secret = Secret("")  # noqa: RUF009 - an immutable str
    listen_url: Secret = Secret("")  # noqa: RUF009 - LISTEN connection; empty: same as url
    data_dir: str = ".keystile"
    pool_min_size: int = 1
    pool_max_size: int = 10
    connect_timeout: float = 5.0
    statement_timeout: float = 10.0
    statement_cache_size: int = 100  # 0 behind PgBouncer in transaction mode


@dataclass(frozen=True, slots=True)
class KeySettings:
    argon2_time_cost: int = 1
    argon2_memory_kib: int = 4096
    argon2_parallelism: int = 1
    cache_ttl_seconds: float = 300.0
    cache_max_entries: int = 100_000
    negative_ttl_seconds: float = 30.0
    negative_max_entries: int = 100_000
    verify_concurrency: int = 2


@dataclass(frozen=True, slots=True)
class UsageSettings:
    flush_interval_seconds: float = 2.0
    max_pending: int = 100_000  # last-used entries waiting to be written
    # Call records (SPEC §7): one per request made with a verified key, written in batches.
    record_calls: bool = True
    max_pending_calls: int = 100_000
    flush_batch_calls: int = 500  # written as soon as this many records wait
    retention_days: int = 30


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    failures_per_client: int = 20
    failures_per_key: int = 10
    window_seconds: float = 60.0
    max_tracked: int = 100_000


@dataclass(frozen=True, slots=True)
class McpSettings:
    # Largest POST body read whole and inspected for a key with a tool policy (413 past it).
    max_inspect_bytes: int = 1024 * 1024
    # How long GET /api/servers/{name}/tools waits for a server to list its tools.
    discovery_timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    """The OAuth flow for MCP clients (SPEC §9); on only when gateway.public_url is set."""

    access_token_ttl_seconds: int = 3600
    # A grant's whole life: its refresh tokens rotate, but none outlives consent + this (nor
    # the approving key's own expiry); then the person approves again.
    refresh_token_ttl_seconds: int = 30 * 86400
    code_ttl_seconds: int = 60
    consent_ttl_seconds: int = 600  # how long a consent page stays usable
    # Requests per client address (IPv6: per /64) per window. A client registers once, opens
    # the consent page once and refreshes hourly; these allow a few dozen calls a minute.
    register_requests_per_client: int = 30  # POST /oauth/register
    authorize_requests_per_client: int = 60  # GET and POST /oauth/authorize
    token_requests_per_client: int = 120  # POST /oauth/token and /oauth/revoke
    window_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str
    headers: Mapping[str, Secret] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Settings:
    gateway: GatewaySettings = GatewaySettings()
    admin: AdminSettings = AdminSettings()
    database: DatabaseSettings = DatabaseSettings()
    keys: KeySettings = KeySettings()
    usage: UsageSettings = UsageSettings()
    throttle: ThrottleSettings = ThrottleSettings()
    mcp: McpSettings = McpSettings()
    oauth: OAuthSettings = OAuthSettings()
    logging: LoggingSettings = LoggingSettings()
    mcp_servers: Mapping[str, UpstreamSettings] = field(default_factory=dict)
    chat: UpstreamSettings | None = None


_SECTIONS: dict[str, type[Any]] = {
    "gateway": GatewaySettings,
    "admin": AdminSettings,
    "database": DatabaseSettings,
    "keys": KeySettings,
    "usage": UsageSettings,
    "throttle": ThrottleSettings,
    "mcp": McpSettings,
    "oauth": OAuthSettings,
    "logging": LoggingSettings,
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (optional) and `env` (default: os.environ) into validated Settings."""
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{path}: not valid TOML: the file is not UTF-8"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    _apply_env(raw, env, problems)
    settings = _build(raw, env, problems)
    if problems:
        raise ConfigError(problems)
    return settings


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    """Overlay KEYSTILE_<SECTION>_<KEY> and DATABASE_URL; values parse as TOML when they can."""
    if env.get("DATABASE_URL"):
        table = raw.setdefault("database", {})
        if isinstance(table, dict):
            table["url"] = env["DATABASE_URL"]
        else:
            problems.append("DATABASE_URL: [database] in the file is not a table")
    for name, value in env.items():
        if not name.startswith("KEYSTILE_"):
            continue
        rest = name[len("KEYSTILE_") :].lower()
        section = next((s for s in (*_SECTIONS, "chat") if rest.startswith(s + "_")), None)
        if section is None:
            continue  # other KEYSTILE_* variables (e.g. KEYSTILE_CONFIG) are not settings
        key = rest[len(section) + 1 :]
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: [{section}] in the file is not a table")
            continue
        table[key] = _env_value(value)


def _env_value(text: str) -> Any:
    """A TOML literal (number, bool, list, quoted string) if `text` is exactly one; else text."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if len(parsed) == 1 and "\n" not in text else text


def _build(raw: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> Settings:
    known = {*_SECTIONS, "mcp_servers", "chat"}
    for name in raw:
        if name not in known:
            problems.append(f"{name}: unknown section (expected one of {', '.join(sorted(known))})")
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: must be a table")
            continue
        built[name] = _build_section(name, cls, table, problems)
    built["mcp_servers"] = _build_servers(raw.get("mcp_servers", {}), env, problems)
    if "chat" in raw:
        built["chat"] = _build_upstream("chat", raw["chat"], env, problems)
    settings = Settings(**built)
    _cross_check(settings, problems)
    return settings


def _build_section(name: str, cls: type[Any], table: dict[str, Any], problems: list[str]) -> Any:
    defaults = cls()
    values: dict[str, Any] = {}
    names = {f.name for f in fields(cls)}
    for key, value in table.items():
        if key not in names:
            problems.append(f"{name}.{key}: unknown setting")
            continue
        parser = _PARSERS[(name, key)]
        try:
            values[key] = parser(value)
        except (TypeError, ValueError) as exc:
            # Never echo a secret (a database URL carries its password) into an error line.
            shown = "" if isinstance(getattr(defaults, key), Secret) else f" (got {value!r})"
            problems.append(f"{name}.{key}: {exc}{shown}")
    for key in names - values.keys():
        values[key] = getattr(defaults, key)
    return cls(**values)


def _build_servers(
    table: Any, env: Mapping[str, str], problems: list[str]
) -> dict[str, UpstreamSettings]:
    if not isinstance(table, dict):
        problems.append("mcp_servers: must be a table of [mcp_servers.<name>] tables")
        return {}
    servers: dict[str, UpstreamSettings] = {}
    for name, spec in table.items():
        if not SERVER_NAME.fullmatch(name) or name in {".", ".."}:
            problems.append(f"mcp_servers.{name}: server names use letters, digits, '_', '.', '-'")
            continue
        upstream = _build_upstream(f"mcp_servers.{name}", spec, env, problems)
        if upstream is not None:
            servers[name] = upstream
    return servers


def _build_upstream(
    where: str, spec: Any, env: Mapping[str, str], problems: list[str]
) -> UpstreamSettings | None:
    if not isinstance(spec, dict):
        problems.append(f"{where}: must be a table with url and optional headers")
        return None
    ok = True
    for key in spec.keys() - {"url", "headers"}:
        problems.append(f"{where}.{key}: unknown setting")
        ok = False
    try:
        url = _http_url(spec.get("url"))
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}.url: {exc} (got {spec.get('url')!r})")
        return None
    headers = spec.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        problems.append(f"{where}.headers: must be a table of string values")
        return None
    expanded: dict[str, Secret] = {}
    for hname, hvalue in headers.items():
        missing = [m for m in _ENV_REF.findall(hvalue) if m not in env]
        if missing:
            problems.append(
                f"{where}.headers.{hname}: environment variable {missing[0]} is not set"
            )
            ok = False
            continue
        value = _ENV_REF.sub(lambda m: env[m.group(1)], hvalue)
        if any(c in value for c in "\r\n\0") or any(c in hname for c in "\r\n\0: "):
            problems.append(f"{where}.headers.{hname}: header names and values cannot hold CR/LF")
            ok = False
            continue
        expanded[hname] = Secret(value)
    return UpstreamSettings(url=url, headers=expanded) if ok else None


def _cross_check(settings: Settings, problems: list[str]) -> None:
    db = settings.database
    if db.pool_min_size > db.pool_max_size:
        problems.append("database.pool_min_size: must not exceed database.pool_max_size")
    # Port 0 asks the OS for a free port, so two port-0 listeners never collide.
    if settings.gateway.listen == settings.admin.listen and settings.admin.listen.port != 0:
        problems.append("admin.listen: must differ from gateway.listen")


# --- value parsers: each raises ValueError/TypeError with a sentence naming what was expected ---


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"expected an integer {bound}")
        return value

    return parse


def _number(minimum: float, *, exclusive: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("expected a number")
        if value != value or value < minimum or (exclusive and value == minimum):  # NaN
            raise ValueError(f"expected a number {'>' if exclusive else '>='} {minimum}")
        return float(value)

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}")
        return str(value)

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _address(value: Any) -> Address:
    text = _string(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    return Address(host, int(port))


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("expected a list of CIDR strings")
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in value)
    except ValueError as exc:
        raise ValueError(f"expected CIDRs like 10.0.0.0/8: {exc}") from None


def _database_url(value: Any) -> Secret:
    text = _string(value)
    if text and not text.startswith(("postgres://", "postgresql://")):
        raise ValueError("expected empty (embedded PostgreSQL) or a postgresql:// URL")
    return Secret(text)


def _http_url(value: Any) -> str:
    text = _string(value)
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise ValueError("expected an http:// or https:// URL")
    return text.rstrip("/") if text.count("/") > 2 else text


def _origins(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError('expected a list of origins like "https://app.example.com", or ["*"]')
    if "*" in value:
        if value != ["*"]:
            raise ValueError('"*" stands alone: every origin')
        return ("*",)
    normalised = []
    for origin in value:
        normal = normalise_origin(origin)
        if normal is None:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        normalised.append(normal)
    return tuple(dict.fromkeys(normalised))


def _public_url(value: Any) -> str:
    """An http(s) origin, without its trailing slash; empty for "OAuth off".

    Decision: no path. The OAuth documents live at the root of the data plane
    (/.well-known/oauth-authorization-server), and an issuer with a path would have its metadata
    looked up at /.well-known/oauth-authorization-server/<path>, outside any path prefix a
    proxy could forward; so the issuer is the bare origin.
    """
    text = _string(value)
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL, e.g. https://gw.example.com")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("expected no query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ValueError("expected no user name or password")
    if parts.path not in ("", "/"):
        raise ValueError("expected an origin without a path (the data plane serves at its root)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("expected a valid port") from None
    # Spelt as clients canonicalise URLs (the MCP SDK parses them with pydantic): host in lower
    # case, no default port. The documents name this origin and clients send it back as
    # `resource`, compared exactly.
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def _log_level(value: Any) -> str:
    text = _string(value).lower()
    if text not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return text


_PARSERS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("gateway", "listen"): _address,
    ("gateway", "trusted_proxies"): _networks,
    ("gateway", "max_body_bytes"): _integer(0),
    ("gateway", "connect_timeout"): _number(0, exclusive=True),
    ("gateway", "response_timeout"): _number(0, exclusive=True),
    ("gateway", "stream_idle_timeout"): _number(0),
    ("gateway", "access_log"): _boolean,
    ("gateway", "access_log_format"): _choice("text", "json"),
    ("gateway", "event_loop"): _choice("uvloop", "asyncio"),
    ("gateway", "shutdown_timeout"): _number(0),
    ("gateway", "keepalive_timeout"): _number(0, exclusive=True),
    ("gateway", "body_timeout"): _number(0, exclusive=True),
    ("gateway", "body_min_rate"): _integer(0),
    ("gateway", "upstream_max_connections"): _integer(1, 100_000),
    ("gateway", "max_connections"): _integer(1, 1_000_000),
    ("gateway", "public_url"): _public_url,
    ("gateway", "cors_allowed_origins"): _origins,
    ("throttle", "failures_per_client"): _integer(0),
    ("throttle", "failures_per_key"): _integer(0),
    ("throttle", "window_seconds"): _number(0, exclusive=True),
    ("throttle", "max_tracked"): _integer(1),
    ("admin", "listen"): _address,
    ("admin", "max_connections"): _integer(1, 1_000_000),
    ("database", "url"): _database_url,
    ("database", "listen_url"): _database_url,
    ("database", "data_dir"): _string,
    ("database", "pool_min_size"): _integer(0),
    ("database", "pool_max_size"): _integer(1),
    ("database", "connect_timeout"): _number(0, exclusive=True),
    ("database", "statement_timeout"): _number(0),
    ("database", "statement_cache_size"): _integer(0, 100_000),
    ("keys", "argon2_time_cost"): _integer(1, 10),
    ("keys", "argon2_memory_kib"): _integer(8, 1024 * 1024),
    ("keys", "argon2_parallelism"): _integer(1, 16),
    ("keys", "cache_ttl_seconds"): _number(0, exclusive=True),
    ("keys", "cache_max_entries"): _integer(1),
    ("keys", "negative_ttl_seconds"): _number(0),
    ("keys", "negative_max_entries"): _integer(1),
    ("keys", "verify_concurrency"): _integer(1, 64),
    ("usage", "flush_interval_seconds"): _number(0, exclusive=True),
    ("usage", "max_pending"): _integer(1),
    ("usage", "record_calls"): _boolean,
    ("usage", "max_pending_calls"): _integer(1),
    ("usage", "flush_batch_calls"): _integer(1),
    ("usage", "retention_days"): _integer(1, 3650),
    ("mcp", "max_inspect_bytes"): _integer(1024, 64 * 1024 * 1024),
    ("mcp", "discovery_timeout_seconds"): _number(0, exclusive=True),
    ("oauth", "access_token_ttl_seconds"): _integer(60, 86_400),
    ("oauth", "refresh_token_ttl_seconds"): _integer(300, 365 * 86_400),
    ("oauth", "code_ttl_seconds"): _integer(10, 600),
    ("oauth", "consent_ttl_seconds"): _integer(60, 86_400),
    ("oauth", "register_requests_per_client"): _integer(1),
    ("oauth", "authorize_requests_per_client"): _integer(1),
    ("oauth", "token_requests_per_client"): _integer(1),
    ("oauth", "window_seconds"): _number(0, exclusive=True),
    ("logging", "level"): _log_level,
}
