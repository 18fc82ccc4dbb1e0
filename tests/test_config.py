"""gateway.config: every mistake is reported as one line naming its field; the CLI never traces."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import (
    AdminSettings,
    ConfigError,
    DatabaseSettings,
    GatewaySettings,
    KeySettings,
    LoggingSettings,
    McpSettings,
    OAuthSettings,
    Secret,
    Settings,
    ThrottleSettings,
    UsageSettings,
    load_settings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SECTIONS = {
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
GITHUB = '[mcp_servers.github]\nurl = "http://127.0.0.1:9001/mcp"\n'


def write(tmp_path: Path, text: str, name: str = "keystile.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={} if env is None else env)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- one mistake, one line naming the field ------------------------------------------------------

# (id, file text, field the single problem line must start with, another fragment it must hold)
MISTAKES = [
    ("unknown section", '[gatway]\nlisten = "0.0.0.0:8080"', "gatway", "unknown section"),
    ("unknown key", '[gateway]\nlisen = "0.0.0.0:8080"', "gateway.lisen", "unknown setting"),
    ("unknown top-level key", 'listen = "0.0.0.0:8080"', "listen", "unknown section"),
    ("section not a table", "gateway = 5", "gateway", "table"),
    ("string for int", '[database]\npool_max_size = "10"', "database.pool_max_size", "integer"),
    ("bool for int", "[keys]\nargon2_time_cost = true", "keys.argon2_time_cost", "integer"),
    ("float for int", "[keys]\ncache_max_entries = 1.5", "keys.cache_max_entries", "integer"),
    ("list for str", '[database]\ndata_dir = ["a"]', "database.data_dir", "string"),
    ("string for number", '[gateway]\nconnect_timeout = "5s"', "gateway.connect_timeout", "number"),
    ("bool for number", "[usage]\nflush_interval_seconds = true", "usage.", "number"),
    ("string for bool", '[gateway]\naccess_log = "yes"', "gateway.access_log", "true or false"),
    ("int below range", "[keys]\nargon2_parallelism = 0", "keys.argon2_parallelism", "1"),
    ("int above range", "[keys]\nverify_concurrency = 65", "keys.verify_concurrency", "64"),
    ("argon2 memory", "[keys]\nargon2_memory_kib = 4", "keys.argon2_memory_kib", "8"),
    ("negative size", "[gateway]\nmax_body_bytes = -1", "gateway.max_body_bytes", ">= 0"),
    ("zero timeout", "[gateway]\nconnect_timeout = 0", "gateway.connect_timeout", "> 0"),
    (
        "negative timeout",
        "[database]\nstatement_timeout = -1.0",
        "database.statement_timeout",
        ">= 0",
    ),
    ("NaN timeout", "[gateway]\nresponse_timeout = nan", "gateway.response_timeout", "> 0"),
    ("zero pool max", "[database]\npool_max_size = 0", "database.pool_max_size", ">= 1"),
    ("listen no port", '[gateway]\nlisten = "localhost"', "gateway.listen", "host:port"),
    ("listen no host", '[gateway]\nlisten = ":8080"', "gateway.listen", "host:port"),
    ("listen port word", '[admin]\nlisten = "127.0.0.1:http"', "admin.listen", "host:port"),
    ("listen port high", '[admin]\nlisten = "127.0.0.1:65536"', "admin.listen", "host:port"),
    ("listen not string", "[gateway]\nlisten = 8080", "gateway.listen", "string"),
    ("bad proxy CIDR", '[gateway]\ntrusted_proxies = ["10.0.0.0/33"]', "gateway.trusted_", "CIDR"),
    ("proxies not list", '[gateway]\ntrusted_proxies = "10.0.0.0/8"', "gateway.trusted_", "list"),
    ("db url scheme", '[database]\nurl = "mysql://db/keystile"', "database.url", "postgresql://"),
    ("log level", '[logging]\nlevel = "verbose"', "logging.level", "debug, info"),
    ("mcp url scheme", '[mcp_servers.a]\nurl = "ftp://h/mcp"', "mcp_servers.a.url", "http"),
    ("mcp url no scheme", '[mcp_servers.a]\nurl = "127.0.0.1:9001"', "mcp_servers.a.url", "http"),
    ("mcp url empty host", '[mcp_servers.a]\nurl = "http://"', "mcp_servers.a.url", "http"),
    ("mcp url missing", "[mcp_servers.a]\nheaders = {}", "mcp_servers.a.url", "string"),
    ("mcp unknown key", GITHUB + 'token = "x"', "mcp_servers.github.token", "unknown setting"),
    ("mcp not a table", 'mcp_servers = "github"', "mcp_servers", "table"),
    ("server not a table", 'mcp_servers.github = "http://h"', "mcp_servers.github", "table"),
    (
        "server name space",
        '[mcp_servers."my server"]\nurl = "http://h"',
        "mcp_servers.my ",
        "letters",
    ),
    ("server name slash", '[mcp_servers."a/b"]\nurl = "http://h"', "mcp_servers.a/b", "letters"),
    ("server name dotdot", '[mcp_servers.".."]\nurl = "http://h"', "mcp_servers...", "letters"),
    ("server name empty", '[mcp_servers.""]\nurl = "http://h"', "mcp_servers.:", "letters"),
    ("headers not table", GITHUB + 'headers = "x"', "mcp_servers.github.headers", "table"),
    ("header not string", GITHUB + "headers = { X-N = 1 }", "mcp_servers.github.headers", ""),
    (
        "header unset env",
        GITHUB + 'headers = { Authorization = "Bearer ${KEYSTILE_TEST_UNSET}" }',
        "mcp_servers.github.headers.Authorization",
        "KEYSTILE_TEST_UNSET",
    ),
    (
        "header CRLF",
        GITHUB + 'headers = { X-A = "a\\r\\nEvil: 1" }',
        "mcp_servers.github.headers.X-A",
        "CR/LF",
    ),
    ("header LF", GITHUB + 'headers = { X-A = "a\\nb" }', "mcp_servers.github.headers.X-A", ""),
    (
        "header name colon",
        GITHUB + 'headers = { "X:A" = "a" }',
        "mcp_servers.github.headers.X:A",
        "",
    ),
    ("event loop", '[gateway]\nevent_loop = "trio"', "gateway.event_loop", "uvloop"),
    ("chat url", '[chat]\nurl = "localhost:9000"', "chat.url", "http"),
    ("chat unknown key", '[chat]\nurl = "http://h"\nmodel = "x"', "chat.model", "unknown setting"),
    (
        "pool min > max",
        "[database]\npool_min_size = 5\npool_max_size = 2",
        "database.pool_min_size",
        "pool_max_size",
    ),
    (
        "same listen",
        '[gateway]\nlisten = "127.0.0.1:9000"\n[admin]\nlisten = "127.0.0.1:9000"',
        "admin.listen",
        "gateway.listen",
    ),
]


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [case[1:] for case in MISTAKES],
    ids=[case[0] for case in MISTAKES],
)
def test_mistake_is_one_line_naming_the_field(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1, problems
    assert problems[0].startswith(field), problems
    assert fragment in problems[0]
    assert "\n" not in problems[0]


def test_header_crlf_from_an_env_var_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GITHUB + 'headers = { Authorization = "Bearer ${TOKEN}" }')
    problems = problems_of(path, env={"TOKEN": "abc\r\nX-Evil: 1"})
    assert len(problems) == 1
    assert problems[0].startswith("mcp_servers.github.headers.Authorization")
    assert "abc" not in problems[0]


def test_bad_database_url_does_not_echo_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "mysql://keystile:hunter2@db/keystile"')
    (problem,) = problems_of(path)
    assert problem.startswith("database.url")
    assert "hunter2" not in problem


def test_invalid_toml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway\nlisten = 1\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:")
    assert "TOML" in problem
    assert "\n" not in problem


def test_duplicate_key_is_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nlisten = "a:1"\nlisten = "b:2"\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:")


def test_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[logging]\nlevel = "café"\n'.encode("latin-1"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:")
    assert "UTF-8" in problem


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file_is_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nope.toml"
    if kind == "directory":
        path.mkdir()
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:")
    assert "cannot read" in problem


def test_all_mistakes_are_reported_at_once(tmp_path: Path) -> None:
    text = """
        [gatway]
        x = 1
        [gateway]
        listen = "nowhere"
        connect_timeout = "soon"
        [database]
        url = "sqlite:///keystile.db"
        pool_min_size = true
        [keys]
        argon2_time_cost = 0
        colour = "blue"
        [logging]
        level = "loud"
        [mcp_servers."bad name"]
        url = "http://h"
        [mcp_servers.ok]
        url = "ftp://h"
        [mcp_servers.tok]
        url = "http://h"
        headers = { Authorization = "Bearer ${KEYSTILE_TEST_UNSET}" }
    """
    problems = problems_of(write(tmp_path, text))
    fields = [
        "gatway",
        "gateway.listen",
        "gateway.connect_timeout",
        "database.url",
        "database.pool_min_size",
        "keys.argon2_time_cost",
        "keys.colour",
        "logging.level",
        "mcp_servers.bad name",
        "mcp_servers.ok.url",
        "mcp_servers.tok.headers.Authorization",
    ]
    assert len(problems) == len(fields), problems
    for field in fields:
        assert sum(line.startswith(field) for line in problems) == 1, (field, problems)


def test_cross_checks_are_reported_with_other_mistakes(tmp_path: Path) -> None:
    text = """
        [gateway]
        listen = "127.0.0.1:9000"
        [admin]
        listen = "127.0.0.1:9000"
        [database]
        pool_min_size = 11
        [logging]
        level = 3
    """
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 3, problems
    assert [line.split(":")[0] for line in sorted(problems)] == [
        "admin.listen",
        "database.pool_min_size",
        "logging.level",
    ]


# --- good configurations ------------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, env={})
    assert settings == Settings()
    assert str(settings.gateway.listen) == "0.0.0.0:8080"
    assert str(settings.admin.listen) == "127.0.0.1:8081"
    assert settings.database.url == ""
    assert settings.database.data_dir == ".keystile"
    keys = settings.keys
    assert (keys.argon2_time_cost, keys.argon2_memory_kib, keys.argon2_parallelism) == (1, 4096, 1)
    assert settings.logging.level == "info"
    assert settings.mcp_servers == {}
    assert settings.chat is None


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), env={}) == Settings()


def test_example_file_loads() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert str(settings.gateway.listen) == "0.0.0.0:8080"
    assert str(settings.admin.listen) == "127.0.0.1:8081"
    assert settings.database.url == ""
    assert settings.database.data_dir == ".keystile"
    assert settings.mcp_servers["github"].url == "http://127.0.0.1:9001/mcp"
    assert settings.chat is not None
    assert settings.chat.url == "http://127.0.0.1:9000"


def _uncommented_example() -> str:
    """The example with every `# key = value` line switched on."""
    return re.sub(r"(?m)^# (\w[\w-]* = )", r"\1", EXAMPLE.read_text(encoding="utf-8"))


def test_example_documents_every_option() -> None:
    raw = tomllib.loads(_uncommented_example())
    assert set(raw) == {*SECTIONS, "mcp_servers", "chat"}
    for name, cls in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert set(raw["mcp_servers"]["github"]) == {"url", "headers"}
    assert set(raw["chat"]) == {"url", "headers"}


def test_example_shows_the_real_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, _uncommented_example())
    env = {"GITHUB_TOKEN": "gh-token", "CHAT_API_TOKEN": "chat-token"}
    settings = load_settings(path, env=env)
    for name, cls in SECTIONS.items():
        assert getattr(settings, name) == cls(), name
    assert settings.mcp_servers["github"].headers == {"Authorization": "Bearer gh-token"}


def test_full_file(tmp_path: Path) -> None:
    text = """
        [gateway]
        listen = "[::1]:9090"
        trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
        max_body_bytes = 1024
        stream_idle_timeout = 30
        access_log = false
        [admin]
        listen = "127.0.0.1:9091"
        [database]
        url = "postgres://u:p@db:5432/k"
        pool_min_size = 2
        pool_max_size = 2
        [keys]
        argon2_time_cost = 2
        [logging]
        level = "DEBUG"
        [mcp_servers."git-hub_1.0"]
        url = "https://mcp.example.com/mcp/"
    """
    settings = load_settings(write(tmp_path, text), env={})
    assert (settings.gateway.listen.host, settings.gateway.listen.port) == ("::1", 9090)
    assert settings.gateway.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert settings.gateway.max_body_bytes == 1024
    assert settings.gateway.stream_idle_timeout == 30.0
    assert settings.gateway.access_log is False
    assert settings.database.url == "postgres://u:p@db:5432/k"
    assert settings.keys.argon2_time_cost == 2
    assert settings.logging.level == "debug"
    assert settings.mcp_servers["git-hub_1.0"].url == "https://mcp.example.com/mcp"


def test_both_listeners_may_use_port_zero(tmp_path: Path) -> None:
    text = '[gateway]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.gateway.listen.port == settings.admin.listen.port == 0


# --- environment overrides ----------------------------------------------------------------------


def test_env_overrides_listen() -> None:
    settings = load_settings(None, env={"KEYSTILE_GATEWAY_LISTEN": "0.0.0.0:9090"})
    assert str(settings.gateway.listen) == "0.0.0.0:9090"


def test_env_value_parsed_as_number() -> None:
    settings = load_settings(None, env={"KEYSTILE_KEYS_CACHE_TTL_SECONDS": "5"})
    assert settings.keys.cache_ttl_seconds == 5.0
    assert isinstance(settings.keys.cache_ttl_seconds, float)


def test_env_value_parsed_as_list() -> None:
    env = {"KEYSTILE_GATEWAY_TRUSTED_PROXIES": '["10.0.0.0/8"]'}
    settings = load_settings(None, env=env)
    assert settings.gateway.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)


def test_env_values_parsed_as_bool_and_plain_string() -> None:
    env = {"KEYSTILE_GATEWAY_ACCESS_LOG": "false", "KEYSTILE_LOGGING_LEVEL": "warning"}
    settings = load_settings(None, env=env)
    assert settings.gateway.access_log is False
    assert settings.logging.level == "warning"


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[gateway]\nlisten = "127.0.0.1:7000"\n[keys]\nverify_concurrency = 4')
    env = {"KEYSTILE_GATEWAY_LISTEN": "127.0.0.1:7001"}
    settings = load_settings(path, env=env)
    assert str(settings.gateway.listen) == "127.0.0.1:7001"
    assert settings.keys.verify_concurrency == 4


def test_env_sets_chat() -> None:
    settings = load_settings(None, env={"KEYSTILE_CHAT_URL": "http://127.0.0.1:9000"})
    assert settings.chat is not None
    assert settings.chat.url == "http://127.0.0.1:9000"


def test_database_url_env_sets_url() -> None:
    settings = load_settings(None, env={"DATABASE_URL": "postgresql://u:p@db/k"})
    assert settings.database.url == "postgresql://u:p@db/k"


def test_database_url_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "postgresql://file/k"\ndata_dir = "/srv/pg"')
    settings = load_settings(path, env={"DATABASE_URL": "postgresql://env/k"})
    assert settings.database.url == "postgresql://env/k"
    assert settings.database.data_dir == "/srv/pg"


def test_empty_database_url_env_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "postgresql://file/k"')
    assert load_settings(path, env={"DATABASE_URL": ""}).database.url == "postgresql://file/k"


def test_unrelated_env_is_ignored() -> None:
    env = {"KEYSTILE_CONFIG": "/etc/keystile.toml", "KEYSTILE": "1", "PATH": "/bin"}
    assert load_settings(None, env=env) == Settings()


ENV_MISTAKES = [
    ({"KEYSTILE_KEYS_CACHE_TTL_SECONDS": "soon"}, "keys.cache_ttl_seconds"),
    ({"KEYSTILE_KEYS_CACHE_TTL_SECONDS": "0"}, "keys.cache_ttl_seconds"),
    ({"KEYSTILE_GATEWAY_LISTEN": "nowhere"}, "gateway.listen"),
    ({"KEYSTILE_GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8"}, "gateway.trusted_proxies"),
    ({"KEYSTILE_GATEWAY_LISTNE": "0.0.0.0:1"}, "gateway.listne"),
    ({"KEYSTILE_LOGGING_LEVEL": "loud"}, "logging.level"),
    ({"KEYSTILE_CHAT_URL": "nope"}, "chat.url"),
    ({"DATABASE_URL": "mysql://u:hunter2@db/k"}, "database.url"),
]


@pytest.mark.parametrize(("env", "field"), ENV_MISTAKES, ids=[f for _, f in ENV_MISTAKES])
def test_bad_env_value_names_the_field(env: dict[str, str], field: str) -> None:
    (problem,) = problems_of(None, env=env)
    assert problem.startswith(field)
    assert "hunter2" not in problem


def test_env_into_a_non_table_section_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, 'database = "postgresql://h/k"\ngateway = 1')
    env = {"DATABASE_URL": "postgresql://env/k", "KEYSTILE_GATEWAY_LISTEN": "127.0.0.1:1"}
    problems = problems_of(path, env=env)
    assert any(line.startswith("DATABASE_URL") for line in problems), problems
    assert any(line.startswith("KEYSTILE_GATEWAY_LISTEN") for line in problems), problems


# --- headers and secrets ------------------------------------------------------------------------


def test_header_env_expansion(tmp_path: Path) -> None:
    text = (
        GITHUB + 'headers = { Authorization = "Bearer ${TOKEN}", X-Pair = "${A}:${B}", X-S = "s" }'
    )
    settings = load_settings(write(tmp_path, text), env={"TOKEN": "t0k", "A": "1", "B": "2"})
    headers = settings.mcp_servers["github"].headers
    assert headers == {"Authorization": "Bearer t0k", "X-Pair": "1:2", "X-S": "s"}
    assert all(isinstance(value, Secret) for value in headers.values())


def test_header_expansion_is_not_recursive(tmp_path: Path) -> None:
    text = GITHUB + 'headers = { X-A = "${A}" }'
    settings = load_settings(write(tmp_path, text), env={"A": "${B}"})
    assert settings.mcp_servers["github"].headers["X-A"] == "${B}"


def test_repr_hides_secrets(tmp_path: Path) -> None:
    text = (
        '[database]\nurl = "postgresql://keystile:db-pa55word@db/k"\n'
        + GITHUB
        + 'headers = { Authorization = "Bearer ${TOKEN}" }\n'
        + '[chat]\nurl = "http://h"\nheaders = { X-Api-Key = "chat-s3cret" }\n'
    )
    settings = load_settings(write(tmp_path, text), env={"TOKEN": "gh-t0ken"})
    for text in (repr(settings), str(settings), repr(settings.database), repr(settings.chat)):
        assert "db-pa55word" not in text
        assert "gh-t0ken" not in text
        assert "chat-s3cret" not in text
    # The value itself is intact for the code that needs it.
    assert str(settings.database.url) == "postgresql://keystile:db-pa55word@db/k"
    assert f"{settings.mcp_servers['github'].headers['Authorization']}" == "Bearer gh-t0ken"


def test_secret_repr() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in repr([secret])
    assert secret == "hunter2"


# --- command line -------------------------------------------------------------------------------


def run_cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE") and k != "DATABASE_URL"
    }
    return subprocess.run(
        [sys.executable, "-m", "keystile.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**clean, **(env or {})},
        check=False,
    )


def assert_config_failure(result: subprocess.CompletedProcess[str], problems: list[str]) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"keystile: config: {line}" for line in problems]
    assert result.stdout == ""


BAD_FILE = """
[gateway]
listen = "nowhere"
[keys]
argon2_time_cost = "1"
[logging]
level = "loud"
"""


def test_check_config_good_file(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "check-config", str(EXAMPLE))
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [f"{EXAMPLE}: configuration is valid"]
    assert result.stderr == ""


def test_check_config_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_FILE)
    problems = problems_of(path)
    assert len(problems) == 3
    assert_config_failure(run_cli(tmp_path, "check-config", str(path)), problems)


@pytest.mark.parametrize(
    "content",
    [b"[gateway\n", b"\xff\xfe[gateway]\n", None],
    ids=["invalid TOML", "not UTF-8", "missing"],
)
def test_check_config_unloadable_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.toml"
    if content is not None:
        path.write_bytes(content)
    result = run_cli(tmp_path, "check-config", str(path))
    assert_config_failure(result, problems_of(path))
    assert len(result.stderr.splitlines()) == 1


def test_check_config_bad_env_override(tmp_path: Path) -> None:
    env = {"KEYSTILE_GATEWAY_LISTEN": "nowhere"}
    result = run_cli(tmp_path, "check-config", str(EXAMPLE), env=env)
    assert_config_failure(result, problems_of(EXAMPLE, env=env))
    assert "gateway.listen" in result.stderr


def test_serve_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_FILE)
    result = run_cli(tmp_path, "serve", "--config", str(path))
    assert_config_failure(result, problems_of(path))
    assert not (tmp_path / ".keystile").exists()  # stopped before starting PostgreSQL


def test_serve_with_missing_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    result = run_cli(tmp_path, "serve", "--config", str(path))
    assert_config_failure(result, problems_of(path))


def test_serve_takes_config_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_FILE)
    result = run_cli(tmp_path, "serve", env={"KEYSTILE_CONFIG": str(path)})
    assert_config_failure(result, problems_of(path))


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("", ""),
        ("https://gw.example.com", "https://gw.example.com"),
        ("https://gw.example.com/", "https://gw.example.com"),  # no trailing slash kept
        ("https://GW.Example.com:443/", "https://gw.example.com"),  # as clients spell it
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
    ],
)
def test_public_url_is_kept_as_the_issuer_clients_compare(given: str, kept: str) -> None:
    settings = load_settings(None, env={"KEYSTILE_GATEWAY_PUBLIC_URL": f'"{given}"'})
    assert settings.gateway.public_url == kept


@pytest.mark.parametrize(
    "bad",
    [
        "gw.example.com",
        "ftp://gw.example.com",
        "https://gw.example.com/keystile",
        "https://gw.example.com?x=1",
        "https://gw.example.com#top",
        "https://user:pw@gw.example.com",
        "https://gw.example.com:99999",
        "https://",
    ],
)
def test_public_url_refusals_name_the_field(bad: str) -> None:
    problems = problems_of(None, {"KEYSTILE_GATEWAY_PUBLIC_URL": f'"{bad}"'})
    assert len(problems) == 1
    assert problems[0].startswith("gateway.public_url: ")
