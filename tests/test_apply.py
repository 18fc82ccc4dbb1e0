"""`keystile apply`: a declarative file of users and keys against a running admin plane (real
`keystile` processes, real PostgreSQL). The plan, idempotence (a second run changes nothing in
the database nor the audit trail), --prune, invalid files refused with every problem by line,
--secrets-out, per-item failures; and the pure parts (line finding, plan) on their own."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from admin.client import ApiKey, KeystileAdmin, User
from gateway import keys
from gateway.keys import new_id
from gateway.models import Principal
from gateway.oauth.store import GrantPlan, OAuthStore
from keystile import apply
from tests.support import Keystile
from tests.test_admin_cli import Cli, Run, admin_fixture, cli_fixture, rows  # noqa: F401  (the cli and admin fixtures)

EXAMPLE = Path(__file__).parent.parent / "deploy" / "apply.example.toml"


async def snapshot(database_url: str) -> dict[str, list[str]]:
    """Every row that apply could change, and the audit trail; the calling key's last_used_at
    (written behind as it is used) left out."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = {}
        for table in ("users", "server_grants", "api_keys", "audit_events"):
            found = await conn.fetch(f"SELECT to_jsonb(t) - 'last_used_at' AS r FROM {table} t")
            tables[table] = sorted(str(row["r"]) for row in found)
        return tables
    finally:
        await conn.close()


def write(tmp_path: Path, text: str, name: str = "keystile.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def plan_lines(run: Run) -> list[str]:
    """The plan's item lines (with their field lines), without the header and the totals."""
    lines = run.out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Plan for "))
    end = next(i for i, line in enumerate(lines) if line.startswith("Plan: "))
    return lines[start + 1 : end]


def heads(run: Run) -> list[str]:
    return [line for line in plan_lines(run) if not line.startswith("      ")]


def secrets_printed(run: Run) -> dict[str, str]:
    """`# <user> <name>` then the key alone on the next line, after the secrets' heading."""
    lines = run.out.splitlines()
    start = lines.index("Secrets of the keys created (shown once; store them now):")
    found = {}
    for label, secret in zip(lines[start + 1 :: 2], lines[start + 2 :: 2], strict=True):
        assert label.startswith("# ") and keys.parse(secret) is not None
        found[label[2:]] = secret
    return found


# --- the example file ---


async def test_the_example_file_is_valid_and_plans_exactly_what_it_says(
    cli: Cli, database_url: str
) -> None:
    declared = tomllib.loads(EXAMPLE.read_text())
    before = await snapshot(database_url)
    dry = await cli("apply", "-f", str(EXAMPLE), "--dry-run")
    assert dry.code == 0, dry.err
    assert await snapshot(database_url) == before
    expected = [f"  + create user {u['email']}" for u in declared["users"]] + [
        f"  + create key {k['name']!r} of {k['user']}" for k in declared["keys"]
    ]
    assert heads(dry) == expected
    total = len(expected)
    assert f"Plan: {total} to create, 0 to update, 0 to revoke, 0 unchanged." in dry.out
    assert dry.out.endswith("Dry run: nothing was changed.\n")
    fields = plan_lines(dry)
    assert '      servers = ["github", "gitlab"]' in fields  # canonical: sorted
    assert '      expires_at = "2099-12-31T00:00:00Z"' in fields
    assert '      rate_limit = {"requests": 600, "per_seconds": 60}' in fields
    assert '      allowed_origins = ["https://docs.example.com"]' in fields

    done = await cli("apply", "-f", str(EXAMPLE))
    assert done.code == 0, done.err
    assert set(secrets_printed(done)) == {f"{k['user']} {k['name']}" for k in declared["keys"]}
    again = await cli("apply", "-f", str(EXAMPLE), "--dry-run")
    assert all(line.endswith("(unchanged)") for line in heads(again))
    assert f"Plan: 0 to create, 0 to update, 0 to revoke, {total} unchanged." in again.out


# --- idempotence, diffs ---

CANONICAL = """
[[users]]
email = "Dev@Example.com"
display_name = "  Dev  "
servers = ["gitlab", "github"]
tools = ["github/*", "gitlab/*", "github/*"]

[[users]]
email = "boss@example.com"
role = "admin"
servers = ["*"]

[[keys]]
user = "dev@example.com"
name = " ci "
servers = ["gitlab", "github"]
permissions = ["chat", "mcp"]
expires_at = 2031-01-01T02:00:00+02:00
description = "deploys  "
allowed_cidrs = ["10.1.2.3/8", "192.168.1.0/24"]
allowed_origins = [
  "HTTPS://Docs.Example.com:443",
  "http://127.0.0.1:3000",
  "https://docs.example.com",
]
rate_limit = "100/60"

[[keys]]
user = "boss@example.com"
name = "ops"
servers = ["*"]
permissions = ["keys", "admin"]
expires_at = 2031-06-01
tools = []
"""


async def test_a_second_run_changes_nothing(
    keystile: Keystile, cli: Cli, admin: KeystileAdmin, database_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path, CANONICAL)
    first = await cli("apply", "-f", path)
    assert first.code == 0, first.err
    assert "Applied 4 of 4 changes." in first.out
    secrets = secrets_printed(first)
    assert set(secrets) == {"Dev@Example.com ci", "boss@example.com ops"}
    status, _, _ = await keystile.request("GET", "/api/me", secrets["boss@example.com ops"])
    assert status == 200
    dev = await admin.users.find("dev@example.com")
    assert dev is not None
    assert (dev["display_name"], dev["servers"]) == ("Dev", ["github", "gitlab"])
    assert dev["tools"] == ["github/*", "gitlab/*"]
    ci = (await admin.keys.fetch_all(user_id=dev["id"]))[0]
    assert (ci["name"], ci["description"], ci["expires_at"]) == (
        "ci",
        "deploys",
        "2031-01-01T00:00:00Z",
    )
    assert ci["allowed_cidrs"] == ["10.0.0.0/8", "192.168.1.0/24"]
    assert ci["allowed_origins"] == ["https://docs.example.com", "http://127.0.0.1:3000"]
    assert ci["permissions"] == ["mcp", "chat"]

    before = await snapshot(database_url)
    second = await cli("apply", "-f", path)
    assert second.code == 0, second.err
    assert heads(second) == [
        "  = user Dev@Example.com (unchanged)",
        "  = user boss@example.com (unchanged)",
        "  = key 'ci' of Dev@Example.com (unchanged)",
        "  = key 'ops' of boss@example.com (unchanged)",
    ]
    assert second.out.endswith("No changes.\n") and "Secrets" not in second.out
    assert await snapshot(database_url) == before  # rows and audit trail alike


async def test_changes_are_planned_field_by_field_and_applied(
    cli: Cli, admin: KeystileAdmin, tmp_path: Path
) -> None:
    path = write(tmp_path, CANONICAL)
    assert (await cli("apply", "-f", path)).code == 0
    changed = (
        CANONICAL.replace('servers = ["gitlab", "github"]\ntools', 'servers = ["github"]\ntools')
        .replace('rate_limit = "100/60"', "")
        .replace('role = "admin"', 'role = "admin"\ndisplay_name = "Boss"')
        .replace('tools = ["github/*", "gitlab/*", "github/*"]\n', "")
        .replace('  "HTTPS://Docs.Example.com:443",\n  "http://127.0.0.1:3000",\n', "")
    )
    path = write(tmp_path, changed)
    dry = await cli("apply", "-f", path, "--dry-run")
    assert dry.code == 0, dry.err
    assert plan_lines(dry) == [
        "  ~ update user Dev@Example.com",
        '      servers: ["github", "gitlab"] -> ["github"]',
        '      tools: ["github/*", "gitlab/*"] -> null',
        "  ~ update user boss@example.com",
        '      display_name: "" -> "Boss"',
        "  ~ update key 'ci' of Dev@Example.com",
        '      rate_limit: {"requests": 100, "per_seconds": 60} -> null',
        '      allowed_origins: ["https://docs.example.com", "http://127.0.0.1:3000"] ->'
        ' ["https://docs.example.com"]',
        "  = key 'ops' of boss@example.com (unchanged)",
    ]
    done = await cli("apply", "-f", path)
    assert done.code == 0, done.err
    assert [line for line in done.out.splitlines() if line.startswith("  ") and "->" not in line][
        -4:
    ] == [
        "  granted servers to user Dev@Example.com",
        "  set the tools of user Dev@Example.com",
        "  updated user boss@example.com (display_name)",
        "  updated key 'ci' of Dev@Example.com (rate_limit, allowed_origins)",
    ]
    dev = await admin.users.find("dev@example.com")
    assert dev is not None and (dev["servers"], dev["tools"]) == (["github"], None)
    ci = (await admin.keys.fetch_all(user_id=dev["id"]))[0]
    assert (ci["rate_limit"], ci["allowed_origins"]) == (None, ["https://docs.example.com"])
    assert (await cli("apply", "-f", path)).out.endswith("No changes.\n")


# --- prune ---

PRUNED = """
[[users]]
email = "alice@example.com"
servers = ["github"]

[[users]]
email = "admin@x"
role = "admin"
servers = ["*"]

[[keys]]
user = "alice@example.com"
name = "keep"
servers = ["github"]
"""


async def oauth_grant(ks: Keystile, user_id: str, approving_key_id: str) -> str:
    """A grant an MCP client would hold after its consent page (SPEC §9), made through the
    OAuth store as the token endpoint makes it."""
    runtime = ks.runtime
    store = OAuthStore(runtime.pool)
    await store.register_client("client-1", "Inspector", ["http://127.0.0.1/cb"], "127.0.0.1")
    user = await runtime.store.user(ks.actor.workspace_id, user_id)
    key = await runtime.store.key(ks.actor.workspace_id, approving_key_id)
    workspace = await runtime.store.workspace(ks.actor.workspace_id)
    assert user is not None and key is not None and workspace is not None
    plan = GrantPlan(
        grant_id=new_id(),
        approver=Principal(key, user, workspace),
        client_id="client-1",
        client_name="Inspector",
        server="github",
        expires_at=datetime.now(UTC) + timedelta(days=1),
        tools=None,
        rate_limit=None,
        allowed_cidrs=None,
    )
    grant = await store.create_grant(plan, b"no code", [])
    return grant.id


async def test_prune_revokes_only_the_named_users_unlisted_keys(
    keystile: Keystile, cli: Cli, admin: KeystileAdmin, tmp_path: Path
) -> None:
    alice = await admin.users.create("alice@example.com", servers=["github"])
    bob = await admin.users.create("bob@example.com", servers=["github"])
    made = {
        name: await admin.keys.create(name, ["github"], user_id=alice["id"])
        for name in ("keep", "old", "old-disabled", "gone")
    }
    # Not in the file, yet never pruned: no file can declare a grant.
    grant = await oauth_grant(keystile, alice["id"], made["keep"]["id"])
    await admin.keys.disable(made["old-disabled"]["id"])
    await admin.keys.delete(made["gone"]["id"])  # already revoked: nothing to do
    others = await admin.keys.create("other", ["github"], user_id=bob["id"])
    path = write(tmp_path, PRUNED)

    kept = await cli("apply", "-f", path)
    assert kept.code == 0, kept.err
    assert "  note: key 'admin key' of admin@x is the key running apply: kept" in kept.out
    assert "  note: 2 live key(s) of the users named here are not in the file: kept" in kept.out
    assert not [line for line in heads(kept) if line.startswith("  - revoke")]

    pruned = await cli("apply", "-f", path, "--prune")
    assert pruned.code == 0, pruned.err
    assert [line for line in heads(pruned) if "revoke" in line] == [
        f"  - revoke key 'old' of alice@example.com ({made['old']['prefix']})",
        f"  - revoke key 'old-disabled' of alice@example.com ({made['old-disabled']['prefix']})",
    ]
    assert "Plan: 0 to create, 0 to update, 2 to revoke, 3 unchanged." in pruned.out
    status = {k["name"]: k["status"] for k in await admin.keys.fetch_all(all=True)}
    assert status == {
        "keep": "active",
        "other": "active",
        "admin key": "active",
        "Inspector": "active",
    }
    assert (await admin.keys.fetch(grant))["kind"] == "oauth"
    assert (await admin.keys.fetch(others["id"]))["status"] == "active"
    for name in ("old", "old-disabled", "gone"):
        assert (await admin.keys.fetch(made[name]["id"]))["status"] == "revoked"
    again, listed = await asyncio.gather(
        cli("apply", "-f", path, "--prune"), cli("keys", "list", "--user", "alice@example.com")
    )
    assert again.out.endswith("No changes.\n")
    assert {row["NAME"] for row in rows(listed.out)} == {"keep", "Inspector (oauth)"}


# --- invalid files ---

INVALID = """\
# An invalid file: every problem is reported, with its line.
[[users]]
email = "a@example.com"
servers = ["github", "nowhere"]
colour = "blue"

[[users]]
email = "A@example.com"

[[users]]
email = "not-an-email"
role = "owner"

[[keys]]
user = "a@example.com"
name = "ci"
servers = "github"

[[keys]]
user = "a@example.com"
name = "ci"
servers = ["github"]
tools = ["github/search_*",
         "nowhere/x",
]
expires_at = 12

[[keys]]
user = "ghost@example.com"
name = "x"
servers = ["*"]
permissions = ["admin"]

[[keys]]
user = "member@example.com"
name = "y"
servers = ["*"]
permissions = ["mcp", "admin"]
description = \"\"\"
name = "not a field"\"\"\"
rate_limit = { requests = 0, per_seconds = 1 }

[settings]
verbose = true
"""
PROBLEMS = [
    (4, "user a@example.com: servers: unknown server 'nowhere'"),
    (5, "user a@example.com: unknown field 'colour'"),
    (7, "user A@example.com: listed twice (first at line 2)"),
    (11, "user not-an-email: email: expected an email address"),
    (12, 'user not-an-email: role: expected "admin" or "member"'),
    (17, "key 'ci' of a@example.com: servers: expected a list of server names"),
    (19, "key 'ci' of a@example.com: listed twice (first at line 14)"),
    (23, "key 'ci' of a@example.com: tools: 'nowhere/x': unknown server 'nowhere'"),
    (26, "key 'ci' of a@example.com: expires_at: expected an ISO 8601 timestamp or null"),
    (29, "key 'x' of ghost@example.com: no user ghost@example.com in the workspace or the file"),
    (38, "key 'y' of member@example.com: permissions: 'admin' is only for keys of admin users"),
    (41, "key 'y' of member@example.com: rate_limit.requests: expected a positive integer"),
    (43, "unknown table or field 'settings'"),
]


async def test_an_invalid_file_is_refused_whole_with_every_problem_by_line(
    keystile: Keystile, cli: Cli, database_url: str, tmp_path: Path
) -> None:
    await keystile.user("member@example.com", servers=["github"])
    path = write(tmp_path, INVALID)
    before = await snapshot(database_url)
    run = await cli("apply", "-f", path)
    assert run.code == 2 and run.out == "", run
    *problems, last = run.err.splitlines()
    assert len(problems) == len(PROBLEMS), run.err
    for line, (number, message) in zip(problems, PROBLEMS, strict=True):
        assert line.startswith(f"{path}:{number}: {message}"), (line, number, message)
    assert (
        last
        == f"keystile: apply: {path} is invalid ({len(PROBLEMS)} problems); nothing was changed"
    )
    assert await snapshot(database_url) == before

    broken = write(tmp_path, '[[users]]\nemail = "a@x"\nservers = ["a" "b"]\n', "broken.toml")
    unfinished = write(tmp_path, '[[users]]\nemail = "a@x"\nservers = [\n', "unfinished.toml")
    syntax, end = await asyncio.gather(
        cli("apply", "-f", broken, "--dry-run"), cli("apply", "-f", unfinished)
    )
    assert syntax.code == 2 and syntax.err.startswith(f"{broken}:3: not valid TOML: Unclosed")
    assert end.code == 2 and end.err.startswith(f"{unfinished}:3: not valid TOML")
    missing = await cli("apply", "-f", str(tmp_path / "missing.toml"))
    assert missing.code == 2 and "No such file or directory" in missing.err


BAD_ORIGINS = """\
[[keys]]
user = "admin@x"
name = "widget"
servers = ["*"]
allowed_origins = [
  "https://docs.example.com",
  "https://docs.example.com/chat",
]

[[keys]]
user = "admin@x"
name = "other widget"
servers = ["*"]
description = "one origin, not in a list"
allowed_origins = "https://docs.example.com"
"""


async def test_a_bad_origin_is_refused_with_its_line(
    cli: Cli, database_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path, BAD_ORIGINS)
    before = await snapshot(database_url)
    run = await cli("apply", "-f", path, "--dry-run")
    assert run.code == 2 and run.out == "", run
    assert run.err.splitlines() == [
        f"{path}:5: key 'widget' of admin@x: allowed_origins: 'https://docs.example.com/chat' is"
        " not an origin (scheme://host[:port], no path)",
        f"{path}:15: key 'other widget' of admin@x: allowed_origins: expected a list of origins,"
        ' e.g. ["https://app.example.com"], or null',
        f"keystile: apply: {path} is invalid (2 problems); nothing was changed",
    ]
    assert await snapshot(database_url) == before


# --- secrets ---


async def test_secrets_out_is_a_new_0600_file_and_nothing_is_printed(
    cli: Cli, database_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path, CANONICAL)
    out = tmp_path / "secrets.json"
    run = await cli("apply", "-f", path, "--secrets-out", str(out))
    assert run.code == 0, run.err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    written = json.loads(out.read_text())["keys"]
    assert {(s["user"], s["name"]) for s in written} == {
        ("Dev@Example.com", "ci"),
        ("boss@example.com", "ops"),
    }
    for secret in written:
        parsed = keys.parse(secret["key"])
        assert parsed is not None and parsed.key_id == secret["id"]
        assert secret["key"] not in run.out + run.err
    assert f"Secrets of the 2 key(s) created written to {out}." in run.out

    before = await snapshot(database_url)
    changed = write(tmp_path, CANONICAL.replace('name = "ops"', 'name = "ops-2"'), "b.toml")
    exists = await cli("apply", "-f", changed, "--secrets-out", str(out))
    assert exists.code == 2 and "exists" in exists.err
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    linked = await cli("apply", "-f", changed, "--secrets-out", str(link))
    assert linked.code == 2 and "symbolic link" in linked.err
    assert not (tmp_path / "target.json").exists()
    assert await snapshot(database_url) == before


# --- partial failure (the steps in-process, against the running admin plane) ---


async def test_a_failed_item_is_reported_and_only_its_dependents_are_skipped(
    keystile: Keystile, admin: KeystileAdmin, tmp_path: Path
) -> None:
    gone = await admin.users.create("gone@example.com", servers=[])
    text = CANONICAL + (
        '\n[[users]]\nemail = "gone@example.com"\nservers = ["github"]\n'
        '\n[[keys]]\nuser = "gone@example.com"\nname = "k"\nservers = ["github"]\n'
    )
    data, problems = apply.parse(text)
    assert data is not None and not problems
    state = await apply.load_state(admin)
    desired, problems = apply.check(data, apply.locate(text), state)
    plan, more = apply.make_plan(desired, state, prune=False)
    assert not problems and not more
    await admin.users.delete(gone["id"])  # between the plan and its run: its steps fail

    out, err = io.StringIO(), io.StringIO()
    code = await apply.apply_plan(plan, admin, state, None, out, err)
    assert code == 1
    assert err.getvalue().splitlines() == [
        "keystile: apply: update user gone@example.com (servers): No such user.",
        "keystile: apply: create key 'k' of gone@example.com: skipped: a change to its user failed",
    ]
    assert "Applied 4 of 6 changes; 1 failed, 1 skipped." in out.getvalue()
    assert {k["name"] for k in await admin.keys.fetch_all(all=True)} == {"admin key", "ci", "ops"}
    assert "Secrets of the keys created" in out.getvalue()  # those made are still handed over


# --- the pure parts ---


def test_locate_finds_each_table_and_field_line() -> None:
    text = """\
# comment [[keys]]
[[users]]
email = "a@x"   # trailing comment
servers = [
  "github",
  'name = "not a field"',
]
description = \"\"\"
email = "not a field either"
\"\"\"

[[keys]]
"user" = "a@x"
name = "k"
rate_limit.requests = 5
[keys.allowed]
name = "inside a sub-table"

[[keys]]
name = "second"
"""
    found = apply.locate(text)
    assert found.tables == {("users", 0): 2, ("keys", 0): 12, ("keys", 1): 19}
    assert found.fields == {
        ("users", 0, "email"): 3,
        ("users", 0, "servers"): 4,
        ("users", 0, "description"): 8,
        ("keys", 0, "user"): 13,
        ("keys", 0, "name"): 14,
        ("keys", 0, "rate_limit"): 15,
        ("keys", 0, "allowed"): 16,
        ("keys", 1, "name"): 20,
    }
    assert found.of("keys", 1, "servers") == 19  # not there: its table's line
    assert found.of("users", 5) == 2  # no such table: the section's first


def _state(users: list[User], api_keys: list[ApiKey]) -> apply.State:
    return apply.State(
        servers=frozenset({"github", "gitlab"}),
        users=users,
        keys=api_keys,
        caller_key_id="K1",
        caller_user_id="U1",
        now=datetime(2030, 1, 1, tzinfo=UTC),
    )


def _user(**fields: Any) -> User:
    base: dict[str, Any] = {
        "id": "U1",
        "workspace_id": "W",
        "email": "root@x",
        "display_name": "",
        "role": "admin",
        "is_active": True,
        "servers": ["*"],
        "tools": None,
        "created_at": "2029-01-01T00:00:00Z",
    }
    return base | fields  # type: ignore[return-value]


def _key(**fields: Any) -> ApiKey:
    base: dict[str, Any] = {
        "id": "K1",
        "user_id": "U1",
        "workspace_id": "W",
        "name": "root",
        "description": "",
        "prefix": "ks1-U1-K1-abcd…",
        "servers": ["github", "gitlab"],
        "permissions": ["mcp", "chat", "admin"],
        "valid_from": None,
        "expires_at": "2030-06-01T00:00:00Z",
        "is_active": True,
        "status": "active",
        "created_at": "2029-01-01T00:00:00Z",
        "updated_at": "2029-01-01T00:00:00Z",
        "last_used_at": None,
        "revoked_at": None,
        "rate_limit": None,
        "allowed_cidrs": ["10.0.0.0/8"],
        "allowed_origins": None,
        "tools": ["github/*"],
        "user": {"id": "U1", "email": "root@x"},
    }
    return base | fields  # type: ignore[return-value]


def _plan(text: str, state: apply.State) -> tuple[apply.Plan, list[apply.Problem]]:
    data, problems = apply.parse(text)
    assert data is not None and not problems
    desired, problems = apply.check(data, apply.locate(text), state)
    assert not problems, problems
    return apply.make_plan(desired, state, prune=True)


def test_values_the_api_canonicalises_compare_equal() -> None:
    text = """
[[users]]
email = "ROOT@x"
role = "admin"
servers = ["*"]

[[keys]]
user = "root@X"
name = "root"
servers = ["gitlab", "github", "github"]
permissions = ["admin", "chat", "mcp", "mcp"]
expires_at = 2030-06-01T02:00:00+02:00
allowed_cidrs = ["192.168.1.1/16", "10.9.9.9/8"]
tools = ["gitlab/*", "github/*", "github/*"]
allowed_origins = ["HTTP://LOCALHOST:80",
  "https://App.example.com:443", "https://app.example.com"]
"""
    # Order carries no meaning in tools, CIDRs and origins: the page may have stored another
    # one; origins compare as browsers send them.
    stored = _key(
        tools=["github/*", "gitlab/*"],
        allowed_cidrs=["10.0.0.0/8", "192.168.0.0/16"],
        allowed_origins=["https://app.example.com", "http://localhost"],
    )
    plan, problems = _plan(text, _state([_user()], [stored]))
    assert not problems
    assert [item.verb for item in plan.items] == ["unchanged", "unchanged"]
    assert not plan.changes_anything and plan.notes == ()


def test_apply_never_locks_out_the_key_running_it() -> None:
    text = """
[[users]]
email = "root@x"
servers = ["*"]

[[keys]]
user = "root@x"
name = "root"
servers = ["*"]
"""
    users = [_user()]
    data, _ = apply.parse(text)
    assert data is not None
    # Checked as a file first: a member's key cannot hold admin, so no problem is raised yet.
    desired, problems = apply.check(data, apply.locate(text), _state(users, [_key()]))
    assert not problems
    _, problems = apply.make_plan(desired, _state(users, [_key()]), prune=True)
    assert [(p.line, p.message.split(":")[1].strip()) for p in problems] == [
        (2, "role"),  # no role line: the table's
        (6, "permissions"),
    ]


def test_duplicates_are_found_in_inline_tables_too() -> None:
    text = 'users = [{email = "a@x"}, {email = "A@x"}]\n'
    data, _ = apply.parse(text)
    assert data is not None
    _, problems = apply.check(data, apply.locate(text), _state([], []))
    assert problems == [apply.Problem(1, "user A@x: listed twice (first at line 1)")]
