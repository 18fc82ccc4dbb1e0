"""`keystile keys | users | usage` as an administrator runs them: real `keystile` processes
against a served admin plane (real PostgreSQL). Every command, its tables and its `--json`,
every exit code, and the admin key kept out of argv, output and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from admin.client import KeystileAdmin
from gateway import keys
from gateway.usage_store import write_calls
from tests.processes import free_port
from tests.support import DEADLINE, Keystile, make_admin
from tests.test_client import call_records

ENVIRONMENT = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(f"not JSON: {self}") from None


class Cli:
    """Runs `keystile` with the admin plane's URL and key in its environment, and checks
    that the admin key shows up in none of its output."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key

    async def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> Run:
        base = {"KEYSTILE_ADMIN_URL": self.url, "KEYSTILE_ADMIN_KEY": self.key}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keystile.cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**ENVIRONMENT, **base, **(env or {})},
        )
        async with asyncio.timeout(DEADLINE):  # only a hang trips it
            out, err = await process.communicate()
        assert process.returncode is not None
        run = Run(process.returncode, out.decode(), err.decode())
        assert self.key not in run.out + run.err
        return run


@pytest.fixture(name="cli")
async def cli_fixture(keystile: Keystile) -> Cli:
    """The command line with an admin key of its own (tests/test_apply.py uses it too)."""
    _, issued = await make_admin(keystile)
    return Cli(keystile.admin, issued.key)


@pytest.fixture(name="admin")
async def admin_fixture(keystile: Keystile, cli: Cli) -> AsyncIterator[KeystileAdmin]:
    async with KeystileAdmin(keystile.admin, cli.key) as client:
        yield client


def rows(text: str) -> list[dict[str, str]]:
    """An aligned table read back by its header's column starts: a misaligned cell shows."""
    header, *lines = text.splitlines()
    columns = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    out = []
    for line in lines:
        cells = {}
        for n, (name, start) in enumerate(columns):
            end = columns[n + 1][1] if n + 1 < len(columns) else None
            assert start == 0 or line[start - 1] == " ", (line, name)  # a column starts here
            cells[name] = line[start:end].strip()
        out.append(cells)
    return out


def settled(records: Any) -> Any:
    """Records without last_used_at: the admin key's is written behind, at any moment."""
    if isinstance(records, list):
        return [settled(r) for r in records]
    return {k: v for k, v in records.items() if k != "last_used_at"}


def one_line_error(run: Run, code: int = 1) -> str:
    assert run.code == code, run
    assert run.out == ""
    lines = run.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keystile: "), run.err
    return lines[0]


async def test_keys_create_prints_the_secret_alone_and_list_and_show_it(
    keystile: Keystile, cli: Cli, admin: KeystileAdmin
) -> None:
    made = await cli("users", "create", "--email", "dev@example.com", "--servers", "github")
    assert made.code == 0, made.err
    assert re.fullmatch(r"Created user \w+ \(dev@example\.com\)\.\n", made.out)

    created = await cli(
        "keys", "create", "--name", "ci", "--user", "dev@example.com",
        "--servers", "gitlab,github", "--permissions", "mcp,chat",
        "--tools", "github/search_*,!github/delete_*", "--expires", "30d",
        "--description", "deploy bot", "--rate-limit", "100/1m",
        "--allowed-cidrs", "127.0.0.0/8",
        "--allowed-origins", "HTTPS://App.Example.com:443, http://127.0.0.1:3000",
    )  # fmt: skip
    assert created.code == 0, created.err
    secret = created.out.removesuffix("\n")
    assert "\n" not in secret  # the secret alone, on the only line of stdout
    parsed = keys.parse(secret)
    assert parsed is not None
    assert secret not in created.err and parsed.display_prefix in created.err
    record = await admin.keys.fetch(parsed.key_id)
    assert (record["servers"], record["permissions"]) == (["github", "gitlab"], ["mcp", "chat"])
    assert record["tools"] == ["github/search_*", "!github/delete_*"]
    assert record["rate_limit"] == {"requests": 100, "per_seconds": 60}
    assert (record["description"], record["allowed_cidrs"]) == ("deploy bot", ["127.0.0.0/8"])
    assert record["allowed_origins"] == ["https://app.example.com", "http://127.0.0.1:3000"]
    expires = datetime.fromisoformat(str(record["expires_at"]))
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)

    # Reads change nothing: run them side by side.
    listed, as_json, mine, theirs, disabled, shown, shown_json = await asyncio.gather(
        cli("keys", "list", "--all"),
        cli("keys", "list", "--all", "--json"),
        cli("keys", "list", "--json"),
        cli("keys", "list", "--user", "dev@example.com", "--json"),
        cli("keys", "list", "--all", "--status", "disabled", "--json"),
        cli("keys", "show", record["prefix"]),  # the masked prefix names the key
        cli("keys", "show", parsed.key_id, "--json"),
    )
    assert listed.code == 0, listed.err
    table = {row["NAME"]: row for row in rows(listed.out)}
    assert set(table) == {"ci", "admin key"}
    assert table["ci"] == {
        "ID": parsed.key_id,
        "NAME": "ci",
        "USER": "dev@example.com",
        "PREFIX": record["prefix"],
        "STATUS": "active",
        "SERVERS": "github,gitlab",
        "PERMISSIONS": "mcp,chat",
        "TOOLS": "github/search_*,!github/delete_*",
        "EXPIRES": "in 4 weeks",  # as the page says it: whole units, truncated
        "LAST USED": "never",
    }
    assert table["admin key"]["TOOLS"] == "all"

    assert settled(as_json.json) == settled(await admin.keys.fetch_all(all=True))
    assert [k["name"] for k in mine.json] == ["admin key"]
    assert [k["id"] for k in theirs.json] == [parsed.key_id]
    assert disabled.json == []
    assert shown.code == 0, shown.err
    details = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in shown.out.splitlines())
    assert details["name"] == "ci" and details["user"] == "dev@example.com"
    assert details["expires"] == f"{record['expires_at']} (in 4 weeks)"
    assert details["rate limit"] == "100/60s" and details["last used"] == "never"
    assert details["allowed origins"] == "https://app.example.com,http://127.0.0.1:3000"
    assert details["allowed cidrs"] == "127.0.0.0/8"
    assert shown_json.json == record

    status, _, _ = await keystile.request("GET", "/api/me", secret)
    assert status == 200  # the printed secret is the key


async def test_keys_update_toggle_rotate_and_revoke(
    keystile: Keystile, cli: Cli, admin: KeystileAdmin
) -> None:
    created = await admin.keys.create(
        "bot",
        ["github"],
        expires_at=datetime.now(UTC) + timedelta(days=3),
        tools=["github/*"],
        rate_limit={"requests": 5, "per_seconds": 1},
        allowed_cidrs=["127.0.0.0/8"],
        allowed_origins=["https://app.example.com"],
    )
    ident = created["id"]
    cleared = await cli(
        "keys", "update", ident, "--name", "bot-2", "--expires", "never", "--tools", "none",
        "--rate-limit", "none", "--allowed-cidrs", "none", "--allowed-origins", "null", "--json",
    )  # fmt: skip
    assert cleared.code == 0, cleared.err
    body = cleared.json
    assert (body["name"], body["expires_at"], body["tools"]) == ("bot-2", None, None)
    assert (body["rate_limit"], body["allowed_cidrs"], body["allowed_origins"]) == (
        None,
        None,
        None,
    )
    shown = await cli("keys", "show", ident)
    assert "allowed origins  any" in shown.out.splitlines()
    origins = await cli(
        "keys", "update", ident, "--allowed-origins", "https://b.example,https://a.example:8443"
    )  # fmt: skip
    assert origins.code == 0, origins.err
    assert (await admin.keys.fetch(ident))["allowed_origins"] == [
        "https://b.example",
        "https://a.example:8443",
    ]

    changed = await cli(
        "keys", "update", ident, "--description", "nightly", "--permissions", "chat,mcp",
        "--servers", "*", "--expires", "2031-01-01",
    )  # fmt: skip
    assert changed.code == 0, changed.err
    assert changed.out == f"Updated key {ident} ('bot-2', {created['prefix']}): active\n"
    record = await admin.keys.fetch(ident)
    assert (record["description"], record["servers"]) == ("nightly", ["*"])
    assert record["expires_at"] == "2031-01-01T00:00:00Z"

    disabled = await cli("keys", "disable", ident)
    assert disabled.out == f"Disabled key {ident} ('bot-2', {created['prefix']}): disabled\n"
    enabled = await cli("keys", "enable", ident, "--json")
    assert enabled.json["status"] == "active"

    rotated = await cli("keys", "rotate", ident, "--grace-seconds", "1h")
    assert rotated.code == 0, rotated.err
    new = rotated.out.removesuffix("\n")
    assert keys.parse(new) is not None and new != created["key"] and "\n" not in new
    for secret in (created["key"], new):  # the old one still within its hour of grace
        status, _, _ = await keystile.request("GET", "/api/me", secret)
        assert status == 200
    rotated_json = await cli("keys", "rotate", ident, "--json")
    newest = rotated_json.json["key"]
    assert rotated_json.json["id"] == ident and keys.parse(newest) is not None

    revoked = await cli("keys", "revoke", ident, "--json")
    assert revoked.code == 0 and revoked.json["status"] == "revoked"
    status, _, _ = await keystile.request("GET", "/api/me", newest)
    assert status == 401
    again = await cli("keys", "enable", ident)
    assert "revoked keys cannot change. (409 key_revoked)" in one_line_error(again)


async def test_users_commands(cli: Cli, admin: KeystileAdmin) -> None:
    created = await cli(
        "users", "create", "--email", "ann@example.com", "--display-name", "Ann",
        "--servers", "github", "--tools", "github/*", "--json",
    )  # fmt: skip
    assert created.code == 0, created.err
    ann = created.json
    assert (ann["role"], ann["servers"], ann["tools"]) == ("member", ["github"], ["github/*"])

    listed, as_json, shown, shown_json = await asyncio.gather(
        cli("users", "list"),
        cli("users", "list", "--json"),
        cli("users", "show", "ANN@example.com"),  # emails compare without case
        cli("users", "show", ann["id"], "--json"),
    )
    table = {row["EMAIL"]: row for row in rows(listed.out)}
    assert table["ann@example.com"] == {
        "ID": ann["id"],
        "EMAIL": "ann@example.com",
        "NAME": "Ann",
        "ROLE": "member",
        "ACTIVE": "yes",
        "SERVERS": "github",
        "TOOLS": "github/*",
        "CREATED": "just now",
    }
    assert as_json.json == await admin.users.fetch_all()
    assert "email    ann@example.com" in shown.out.splitlines()
    assert shown_json.json == ann

    promoted = await cli(
        "users", "update", "ann@example.com", "--role", "admin", "--display-name", "Ann B",
        "--json",
    )  # fmt: skip
    assert (promoted.json["role"], promoted.json["display_name"]) == ("admin", "Ann B")
    assert promoted.json["tools"] is None  # an admin holds every tool
    demoted = await cli("users", "update", ann["id"], "--role", "member", "--is-active", "false")
    assert demoted.out == f"Updated user {ann['id']} (ann@example.com).\n"
    assert (await admin.users.fetch(ann["id"]))["is_active"] is False

    granted = await cli("users", "grant", "ann@example.com", "--servers", "*", "--tools", "")
    assert granted.code == 0, granted.err
    user = await admin.users.fetch(ann["id"])
    assert (user["servers"], user["tools"]) == (["*"], [])
    every_tool = await cli("users", "grant", ann["id"], "--tools", "none", "--json")
    assert every_tool.json["tools"] is None

    deleted = await cli("users", "delete", "ann@example.com")
    assert deleted.out.startswith(f"Deleted user {ann['id']} (ann@example.com)")
    gone = await cli("users", "show", "ann@example.com")
    assert one_line_error(gone) == "keystile: no user with email ann@example.com"


async def test_usage_command(keystile: Keystile, cli: Cli, admin: KeystileAdmin) -> None:
    user = await keystile.user("u@example.com", servers=["github"])
    issued = await keystile.key(user)
    await write_calls(keystile.runtime.pool, call_records(issued, 24))
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    window = ["--from", (end - timedelta(days=3)).isoformat(), "--to", end.isoformat()]
    query: dict[str, Any] = {"from_": end - timedelta(days=3), "to": end}

    as_json = await cli("usage", *window, "--group-by", "tool,status", "--json")
    assert as_json.code == 0, as_json.err
    expected = await admin.usage(**query, group_by=["tool", "status"])
    assert as_json.json == expected and len(expected["rows"]) == 3

    table = await cli("usage", *window, "--group-by", "tool")
    title, *lines = table.out.splitlines()
    assert title == f"Usage from {expected['from']} to {expected['to']}:"
    by_tool = {row["TOOL"]: row for row in rows("\n".join(lines))}
    assert set(by_tool) == {"-", "search", "get_issue"}
    assert by_tool["-"]["ERRORS"] == by_tool["-"]["REQUESTS"] == "8"  # n % 3 == 0: 502s
    assert by_tool["search"]["IN"].endswith(" B") and by_tool["search"]["P50"].endswith(" ms")

    csv = await cli("usage", *window, "--group-by", "tool", "--csv")
    assert csv.out == await admin.usage_csv(**query, group_by="tool")
    filtered = await cli(
        "usage", *window, "--user", "u@example.com", "--key", issued.record.id,
        "--server", "github", "--tool", "search", "--json",
    )  # fmt: skip
    assert filtered.json["rows"][0]["requests"] == 8
    nothing = await cli("usage", "--from", "2h", "--user", "dev@nowhere.example")
    assert one_line_error(nothing) == "keystile: no user with email dev@nowhere.example"
    empty = await cli("usage", "--from", "2020-01-01", "--to", "2020-01-02", "--group-by", "day")
    assert empty.code == 0 and empty.out == "" and empty.err.startswith("No usage from 2020")


async def test_exit_codes_and_one_line_messages(
    keystile: Keystile, cli: Cli, tmp_path: Path
) -> None:
    await cli("keys", "create", "--name", "dup", "--servers", "*")
    member = await keystile.user("m@example.com", servers=["github"])
    limited = await keystile.key(member, permissions=["keys"])
    wrong = limited.key[:-1] + ("A" if limited.key[-1] != "A" else "B")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    closed = f"http://127.0.0.1:{free_port()}"
    no_key = {"KEYSTILE_ADMIN_KEY": ""}
    api_errors = {
        ("keys", "show", "nope"): "keystile: No such key. (404 not_found)",
        ("keys", "create", "--name", "x", "--servers", "nowhere"): (
            "keystile: servers: unknown server 'nowhere' (422 invalid_request)"
        ),
        ("keys", "create", "--name", "dup", "--servers", "*"): "(409 conflict)",
        ("keys", "create", "--name", "w", "--servers", "*", "--allowed-origins", "a.example"): (
            "keystile: allowed_origins: 'a.example' is not an origin"
        ),
        ("keys", "list", "--user", "ghost@example.com"): "no user with email ghost@example.com",
        ("keys", "list", "--admin-url", closed): (
            f"keystile: cannot reach the admin plane at {closed}: Connection refused"
        ),
    }
    usage_errors = {
        ("keys",): "the following arguments are required: ACTION",
        ("keys", "create", "--servers", "github"): "required: --name",
        ("keys", "create", "--name", "x", "--servers", "*", "--expires", "soonish"): "--expires",
        ("keys", "create", "--name", "x", "--servers", "*", "--rate-limit", "5"): "N/S",
        ("keys", "create", "--name", "x", "--servers", "*", "--permissions", "root"): "root",
        ("keys", "update", "some-id"): "nothing to change",
        ("users", "grant", "a@example.com"): "give --servers, --tools or both",
        ("usage", "--csv", "--json"): "choose one",
        ("usage", "--group-by", "week"): "--group-by",
        ("keys", "list", "--bogus"): "unrecognized arguments: --bogus",
        ("keys", "list", "--admin-key-f", "x"): "unrecognized arguments",  # no abbreviations
        ("keys", "list", "--admin-key-file", str(tmp_path / "missing")): "No such file",
        ("keys", "list", "--admin-key-file", str(empty)): "is empty",
    }
    runs = await asyncio.gather(
        *(cli(*args) for args in api_errors),
        *(cli(*args) for args in usage_errors),
        cli("keys", "list", env=no_key),
        cli("keys", "list", env={"KEYSTILE_ADMIN_KEY": wrong}),
        cli("users", "list", env={"KEYSTILE_ADMIN_KEY": limited.key}),
    )
    for (args, expected), run in zip(api_errors.items(), runs, strict=False):
        assert expected in one_line_error(run), (args, run)
    for (args, expected), run in zip(usage_errors.items(), runs[len(api_errors) :], strict=False):
        assert run.code == 2 and run.out == "" and expected in run.err, (args, run)
    missing, refused, forbidden = runs[-3:]
    assert missing.code == 2 and "no admin key: set KEYSTILE_ADMIN_KEY" in missing.err
    message = one_line_error(refused)
    assert message.startswith("keystile: the admin plane refused the key (401 invalid_api_key)")
    assert wrong not in message
    assert one_line_error(forbidden).startswith(
        "keystile: not allowed with this key (403 forbidden)"
    )


async def test_the_key_never_travels_in_argv_and_never_in_output_or_logs(
    keystile: Keystile, cli: Cli, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = cli.key
    refused = await asyncio.gather(
        cli("keys", "list", "--admin-key", key),
        cli("keys", "list", f"--admin-key={key}"),
        cli("keys", "show", key),
        cli("users", "create", "--email", "x@example.com", "--display-name", key),
        cli("keys", "list", "--admin-key", "not-a-key-at-all"),
    )
    for run in refused:  # the Cli helper also checked that the key is in neither stream
        assert run.code == 2 and run.out == "", run
        assert "KEYSTILE_ADMIN_KEY or pass --admin-key-file" in run.err
    assert "--admin-key is not accepted" in refused[0].err
    assert "looks like an API key" in refused[2].err

    key_file = tmp_path / "admin.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    elsewhere = f"http://127.0.0.1:{free_port()}"
    from_file = await cli(
        "keys", "list", "--json", "--admin-key-file", str(key_file), "--admin-url", cli.url,
        env={"KEYSTILE_ADMIN_KEY": "", "KEYSTILE_ADMIN_URL": elsewhere},
    )  # fmt: skip
    assert from_file.code == 0, from_file.err
    assert [k["name"] for k in from_file.json] == ["admin key"]
    # The file wins over the environment.
    env_wrong = {"KEYSTILE_ADMIN_KEY": "ks1-wrong-wrong-x"}
    file_wins = await cli("keys", "list", "--admin-key-file", str(key_file), env=env_wrong)
    assert file_wins.code == 0, file_wins.err

    # Every command's output checked so far, and the admin plane's logs, hold no key.
    created = await cli("keys", "create", "--name", "n", "--servers", "*", "--json")
    secret = created.json["key"]
    assert key.split("-")[3] not in caplog.text and secret.split("-")[3] not in caplog.text
