"""GET /api/usage and GET /api/calls on a running admin plane: every grouping and filter, the
hour-aligned window, CSV, who sees what (member, admin, another workspace), paging, and a 422
naming the parameter for every kind of bad input."""

from __future__ import annotations

import csv
import io
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import pytest

from gateway.calls import CallRecord
from gateway.keyring import IssuedKey
from gateway.store import Actor
from gateway.usage_store import MAX_GROUPS, write_calls
from tests.support import (
    ADMIN_PERMISSIONS,
    Keystile,
    Reply,
    admin_call,
    assert_422,
    assert_error,
    wait_until,
)

DIMENSIONS = ["key", "user", "server", "tool", "status", "hour", "day"]
FIELD = {"key": "key_id", "user": "user_id", "hour": "hour", "day": "day"}
METRICS = ["requests", "errors", "p50_ms", "p95_ms", "bytes_in", "bytes_out"]
CALL_FIELDS = {
    "id",
    "time",
    "request_id",
    "workspace_id",
    "user_id",
    "key_id",
    "route",
    "server",
    "mcp_method",
    "tool",
    "status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "client",
}


def hour_floor(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# Records lie in the 40 hours from BASE: in the past, inside the default 7-day window, and
# across at least one UTC midnight.
BASE = hour_floor(datetime.now(UTC)) - timedelta(hours=48)
WINDOW = {"from": iso(BASE), "to": iso(BASE + timedelta(hours=48))}


def records_for(issued: IssuedKey, n: int, seed: int) -> list[CallRecord]:
    rng = random.Random(seed)
    key = issued.record
    out = []
    for i in range(n):
        server = rng.choice(["github", "gitlab", None])
        tool = rng.choice(["search", "get_issue", None]) if server else None
        out.append(
            CallRecord(
                time=(BASE + timedelta(seconds=rng.uniform(0, 40 * 3600))).timestamp(),
                request_id=f"{key.id}-{i}",
                workspace_id=key.workspace_id,
                user_id=key.user_id,
                key_id=key.id,
                route="mcp" if server else "chat",
                server=server,
                mcp_method="tools/call" if tool else None,
                tool=tool,
                status=rng.choice([200, 200, 200, 404, 502]),
                duration_ms=rng.expovariate(1 / 80),
                bytes_in=rng.randrange(1000),
                bytes_out=rng.randrange(10_000),
                client="127.0.0.1",
            )
        )
    return sorted(out, key=lambda r: r.time)


def value_of(r: CallRecord, dimension: str) -> Any:
    moment = datetime.fromtimestamp(r.time, UTC)
    return {
        "key": r.key_id,
        "user": r.user_id,
        "server": r.server,
        "tool": r.tool,
        "status": r.status,
        "hour": iso(hour_floor(moment)),
        "day": moment.date().isoformat(),
    }[dimension]


def expected(records: Sequence[CallRecord], dims: Sequence[str]) -> dict[tuple[Any, ...], Any]:
    out: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for r in records:
        group = out[tuple(value_of(r, d) for d in dims)]
        group["requests"] += 1
        group["errors"] += r.status >= 400
        group["bytes_in"] += r.bytes_in
        group["bytes_out"] += r.bytes_out
    return {g: dict(c) for g, c in out.items()}


def got(rows: list[dict[str, Any]], dims: Sequence[str]) -> dict[tuple[Any, ...], Any]:
    out = {}
    for row in rows:
        group = tuple(row[FIELD.get(d, d)] for d in dims)
        out[group] = {m: row[m] for m in ("requests", "errors", "bytes_in", "bytes_out")}
    return out


async def get(ks: Keystile, path: str, key: str | None, **params: Any) -> Reply:
    query = urlencode(params, doseq=True, quote_via=quote)
    return await admin_call(ks, "GET", f"{path}?{query}" if query else path, key)


@dataclass
class World:
    """Two workspaces' worth of keys, each with records written through the store."""

    admin: IssuedKey  # an admin of the default workspace
    member: IssuedKey  # a member's self-service key ('keys')
    member_mcp: IssuedKey  # the same member's data-plane key
    other_member: IssuedKey  # another member of the same workspace
    outsider: IssuedKey  # an admin of another workspace
    records: dict[str, list[CallRecord]]  # key id -> its records

    def of(self, *keys: IssuedKey) -> list[CallRecord]:
        return [r for k in keys for r in self.records[k.record.id]]


@pytest.fixture
async def world(keystile: Keystile) -> World:
    ks = keystile
    boss = await ks.user("boss@example.com", role="admin", servers=["*"])
    admin = await ks.key(boss, name="admin", permissions=ADMIN_PERMISSIONS)
    alice = await ks.user("alice@example.com", servers=["*"])
    member = await ks.key(alice, name="self", permissions=("keys", "mcp"))
    member_mcp = await ks.key(alice, name="ci", permissions=("mcp",))
    bob = await ks.user("bob@example.com", servers=["*"])
    other_member = await ks.key(bob, name="bob", permissions=("keys", "mcp"))
    keyring = ks.runtime.keyring
    elsewhere = Actor((await keyring.ensure_workspace("elsewhere")).id)
    eve = await keyring.create_user(elsewhere, email="eve@example.com", role="admin", servers=["*"])
    outsider = await keyring.create_key(
        elsewhere, user_id=eve.id, name="eve", permissions=ADMIN_PERMISSIONS
    )
    keys = [admin, member, member_mcp, other_member, outsider]
    records = {k.record.id: records_for(k, 60 + 10 * n, seed=n) for n, k in enumerate(keys)}
    await write_calls(ks.runtime.pool, [r for batch in records.values() for r in batch])
    return World(admin, member, member_mcp, other_member, outsider, records)


# --- groupings, filters, window ---


async def test_every_dimension_and_pair_groups_the_workspace(
    keystile: Keystile, world: World
) -> None:
    workspace = world.of(world.admin, world.member, world.member_mcp, world.other_member)
    groupings = [[d] for d in DIMENSIONS] + [
        [a, b] for a in DIMENSIONS for b in DIMENSIONS if a != b
    ]
    for dims in groupings:
        reply = await get(
            keystile, "/api/usage", world.admin.key, group_by=",".join(dims), **WINDOW
        )
        assert reply.status == 200, reply.text
        rows = reply.body["rows"]
        assert got(rows, dims) == expected(workspace, dims), dims
        fields = [FIELD.get(d, d) for d in dims]
        assert all(list(row) == fields + METRICS for row in rows), dims
        groups = [tuple(str(row[f]) for f in fields) for row in rows]
        assert len(groups) == len(set(groups)), dims


async def test_no_group_by_is_one_total_row(keystile: Keystile, world: World) -> None:
    reply = await get(keystile, "/api/usage", world.admin.key, **WINDOW)
    (row,) = reply.body["rows"]
    workspace = world.of(world.admin, world.member, world.member_mcp, world.other_member)
    assert got([row], []) == expected(workspace, [])
    assert 0 < row["p50_ms"] <= row["p95_ms"]
    empty = await get(
        keystile, "/api/usage", world.admin.key, **{"from": "2001-01-01", "to": "2001-01-02"}
    )
    assert empty.body["rows"] == [
        {"requests": 0, "errors": 0, "p50_ms": None, "p95_ms": None, "bytes_in": 0, "bytes_out": 0}
    ]


async def test_filters(keystile: Keystile, world: World) -> None:
    admin = world.admin.key
    workspace = world.of(world.admin, world.member, world.member_mcp, world.other_member)
    cases: list[tuple[dict[str, str], list[CallRecord]]] = [
        ({"key_id": world.member_mcp.record.id}, world.of(world.member_mcp)),
        ({"user_id": world.member.record.user_id}, world.of(world.member, world.member_mcp)),
        ({"server": "gitlab"}, [r for r in workspace if r.server == "gitlab"]),
        ({"tool": "search"}, [r for r in workspace if r.tool == "search"]),
        (
            {"server": "github", "tool": "get_issue", "user_id": world.other_member.record.user_id},
            [
                r
                for r in world.of(world.other_member)
                if (r.server, r.tool) == ("github", "get_issue")
            ],
        ),
        ({"server": "nowhere"}, []),
    ]
    for filters, wanted in cases:
        reply = await get(keystile, "/api/usage", admin, group_by="key,status", **filters, **WINDOW)
        assert got(reply.body["rows"], ["key", "status"]) == expected(wanted, ["key", "status"])
        page = await get(keystile, "/api/calls", admin, limit=500, **filters)
        assert sorted(c["request_id"] for c in page.body["calls"]) == sorted(
            r.request_id for r in wanted
        )


def window_of(reply: Reply) -> tuple[str, str]:
    assert reply.status == 200, reply.text
    return reply.body["from"], reply.body["to"]


async def test_the_window_is_widened_to_whole_utc_hours(keystile: Keystile, world: World) -> None:
    key = world.admin.key
    reply = await get(
        keystile,
        "/api/usage",
        key,
        **{"from": "2030-01-01T10:20:00Z", "to": "2030-01-01T12:00:01Z"},
    )
    assert (reply.body["from"], reply.body["to"]) == (
        "2030-01-01T10:00:00Z",
        "2030-01-01T13:00:00Z",
    )
    exact = await get(
        keystile, "/api/usage", key, **{"from": "2030-01-01T10:00:00", "to": "2030-01-01T11:00"}
    )
    assert (exact.body["from"], exact.body["to"]) == (
        "2030-01-01T10:00:00Z",
        "2030-01-01T11:00:00Z",
    )
    # An offset's "+" sent unescaped arrives as a space; it is read as the "+" it was.
    spaced = await admin_call(
        keystile,
        "GET",
        "/api/usage?from=2030-01-01T12:30:00+02:00&to=2030-01-01T14:00:00%2B02:00",
        key,
    )
    assert (spaced.body["from"], spaced.body["to"]) == (
        "2030-01-01T10:00:00Z",
        "2030-01-01T12:00:00Z",
    )

    before = datetime.now(UTC)
    default = await get(keystile, "/api/usage", key, group_by="day")
    after = datetime.now(UTC)
    to = datetime.fromisoformat(default.body["to"])
    start = datetime.fromisoformat(default.body["from"])
    assert before <= to and to - after <= timedelta(hours=1)  # the current hour counts
    assert start == hour_floor(start) and to == hour_floor(to)
    assert timedelta(days=7) <= to - start <= timedelta(days=7, hours=1)
    everyone = world.of(world.admin, world.member, world.member_mcp, world.other_member)
    assert sum(row["requests"] for row in default.body["rows"]) == len(everyone)


async def test_csv_gives_the_same_rows(keystile: Keystile, world: World) -> None:
    key = world.admin.key
    params = {"group_by": "server,status", **WINDOW}
    as_json = await get(keystile, "/api/usage", key, **params)
    as_csv = await get(keystile, "/api/usage", key, format="csv", **params)
    assert as_csv.status == 200
    assert as_csv.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in as_csv.headers["Content-Disposition"]
    assert as_csv.text.endswith("\r\n")
    table = list(csv.reader(io.StringIO(as_csv.text)))
    header, *rows = table
    assert header == ["server", "status", *METRICS]
    assert len(rows) == len(as_json.body["rows"])
    for line, row in zip(rows, as_json.body["rows"], strict=True):
        assert line == ["" if row[c] is None else str(row[c]) for c in header]
    assert any(line[0] == "" for line in rows)  # chat requests have no server: an empty cell

    total = await get(keystile, "/api/usage", key, format="csv", **WINDOW)
    assert total.text.split("\r\n")[0] == ",".join(METRICS)


async def test_csv_quotes_cells_a_spreadsheet_would_run(keystile: Keystile, world: World) -> None:
    record = world.of(world.admin)[0]
    hostile = CallRecord(**{**_fields(record), "tool": "=HYPERLINK(1)", "request_id": "h"})
    await write_calls(keystile.runtime.pool, [hostile])
    reply = await get(keystile, "/api/usage", world.admin.key, format="csv", group_by="tool")
    cells = [line.split(",")[0] for line in reply.text.split("\r\n")[1:] if line]
    assert "'=HYPERLINK(1)" in cells
    assert "=HYPERLINK(1)" not in cells
    as_json = await get(keystile, "/api/usage", world.admin.key, group_by="tool")
    assert "=HYPERLINK(1)" in {row["tool"] for row in as_json.body["rows"]}  # JSON: as recorded


def _fields(record: CallRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in CALL_FIELDS - {"id"}}


# --- visibility ---


async def test_a_member_sees_only_their_own_keys(keystile: Keystile, world: World) -> None:
    ks, me = keystile, world.member.key
    mine = world.of(world.member, world.member_mcp)
    reply = await get(ks, "/api/usage", me, group_by="key", **WINDOW)
    assert got(reply.body["rows"], ["key"]) == expected(mine, ["key"])
    users = await get(ks, "/api/usage", me, group_by="user", **WINDOW)
    assert [row["user_id"] for row in users.body["rows"]] == [world.member.record.user_id]
    own_user = await get(ks, "/api/usage", me, user_id=world.member.record.user_id, **WINDOW)
    assert own_user.body["rows"][0]["requests"] == len(mine)
    own_key = await get(ks, "/api/usage", me, key_id=world.member_mcp.record.id, **WINDOW)
    assert own_key.body["rows"][0]["requests"] == len(world.of(world.member_mcp))

    calls = await get(ks, "/api/calls", me, limit=500)
    assert sorted(c["request_id"] for c in calls.body["calls"]) == sorted(
        r.request_id for r in mine
    )

    # Another user's key or user, a key of another workspace, a key that does not exist:
    # all the same 404, on both routes.
    for route in ("/api/usage", "/api/calls"):
        for params in (
            {"key_id": world.admin.record.id},
            {"key_id": world.other_member.record.id},
            {"key_id": world.outsider.record.id},
            {"key_id": "nosuchkey"},
            {"user_id": world.other_member.record.user_id},
            {"user_id": world.admin.record.user_id},
            {"user_id": "nosuchuser"},
        ):
            assert_error(await get(ks, route, me, **params), 404, "not_found")


async def test_an_admin_users_key_without_admin_sees_only_its_own_user(
    keystile: Keystile, world: World
) -> None:
    boss = await keystile.runtime.store.user(
        keystile.actor.workspace_id, world.admin.record.user_id
    )
    assert boss is not None
    limited = await keystile.key(boss, name="keys only", permissions=("keys",))
    reply = await get(keystile, "/api/usage", limited.key, group_by="user", **WINDOW)
    assert [row["user_id"] for row in reply.body["rows"]] == [boss.id]
    assert_error(await get(keystile, "/api/calls", limited.key, key_id=world.member.record.id), 404)


async def test_an_admin_sees_the_workspace_and_nothing_of_another(
    keystile: Keystile, world: World
) -> None:
    ks = keystile
    users = await get(ks, "/api/usage", world.admin.key, group_by="user", **WINDOW)
    assert {row["user_id"] for row in users.body["rows"]} == {
        world.admin.record.user_id,
        world.member.record.user_id,
        world.other_member.record.user_id,
    }
    member = await get(ks, "/api/usage", world.admin.key, key_id=world.member.record.id, **WINDOW)
    assert member.body["rows"][0]["requests"] == len(world.of(world.member))
    for route in ("/api/usage", "/api/calls"):
        assert_error(await get(ks, route, world.admin.key, key_id=world.outsider.record.id), 404)
        assert_error(
            await get(ks, route, world.admin.key, user_id=world.outsider.record.user_id), 404
        )
    calls = await get(ks, "/api/calls", world.admin.key, limit=500)
    assert world.outsider.record.workspace_id not in {
        c["workspace_id"] for c in calls.body["calls"]
    }

    # The other workspace's admin sees its own records, and only those.
    theirs = await get(ks, "/api/usage", world.outsider.key, group_by="key", **WINDOW)
    assert got(theirs.body["rows"], ["key"]) == expected(world.of(world.outsider), ["key"])
    their_calls = await get(ks, "/api/calls", world.outsider.key, limit=500)
    assert {c["key_id"] for c in their_calls.body["calls"]} == {world.outsider.record.id}
    assert_error(await get(ks, "/api/usage", world.outsider.key, key_id=world.admin.record.id), 404)


async def test_a_revoked_keys_usage_stays_visible(keystile: Keystile, world: World) -> None:
    await keystile.runtime.keyring.revoke_key(keystile.actor, world.member_mcp.record.id)
    reply = await get(
        keystile, "/api/usage", world.member.key, key_id=world.member_mcp.record.id, **WINDOW
    )
    assert reply.body["rows"][0]["requests"] == len(world.of(world.member_mcp))


async def test_routes_need_keys_or_admin(keystile: Keystile, world: World) -> None:
    for route in ("/api/usage", "/api/calls"):
        assert_error(await get(keystile, route, None), 401)
        assert_error(await get(keystile, route, world.member_mcp.key), 403)


# --- /api/calls paging ---


async def test_calls_page_newest_first_with_next_before(keystile: Keystile, world: World) -> None:
    key = world.admin.key
    workspace = world.of(world.admin, world.member, world.member_mcp, world.other_member)
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 70}
    while True:
        page = await get(keystile, "/api/calls", key, **params)
        assert page.status == 200, page.text
        seen += page.body["calls"]
        if page.body["next_before"] is None:
            break
        assert page.body["next_before"] == page.body["calls"][-1]["id"]
        params["before"] = page.body["next_before"]
    assert len(seen) == len(workspace)
    ids = [c["id"] for c in seen]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert all(set(c) == CALL_FIELDS for c in seen)
    by_request = {r.request_id: r for r in workspace}
    for call in seen:
        r = by_request[call["request_id"]]
        assert datetime.fromisoformat(call["time"]) == datetime.fromtimestamp(r.time, UTC)
        assert call["time"].endswith("Z")
        assert (call["key_id"], call["tool"], call["status"]) == (r.key_id, r.tool, r.status)

    default = await get(keystile, "/api/calls", key)
    assert len(default.body["calls"]) == 100
    exact = await get(keystile, "/api/calls", key, limit=len(workspace))
    assert exact.body["next_before"] is None  # a full page with nothing after it
    status = await get(keystile, "/api/calls", key, status=502, limit=500)
    assert len(status.body["calls"]) == sum(r.status == 502 for r in workspace)
    past_all = await get(keystile, "/api/calls", key, before=min(ids))
    assert past_all.body == {"calls": [], "next_before": None}


# --- 422 naming the parameter ---

USAGE_422 = [
    ("group_by=week", "group_by"),
    ("group_by=tool,status,day", "group_by"),
    ("group_by=tool,tool", "group_by"),
    ("group_by=tool,", "group_by"),
    ("group_by=", "group_by"),
    ("group_by=Tool", "group_by"),
    ("from=yesterday", "from"),
    ("to=2030-13-01T00:00:00Z", "to"),
    ("from=", "from"),
    ("from=2030-01-02T00:00:00Z&to=2030-01-01T00:00:00Z", "from"),
    ("from=2030-01-01T00:00:00Z&to=2030-01-01T00:00:00Z", "from"),
    ("from=2028-01-01T00:00:00Z&to=2029-02-05T00:00:00Z", "from"),  # 401 days
    ("to=0001-01-01T00:00:00Z", "to"),
    ("from=3000-01-01T00:00:00Z", "from"),  # after the default to (now)
    ("format=xml", "format"),
    ("key_id=", "key_id"),
    ("user_id=" + "u" * 257, "user_id"),
    ("server=git%0Ahub", "server"),
    ("tool=%7F", "tool"),
    ("nope=1", "nope"),
    ("status=200", "status"),  # a /api/calls parameter, not one of /api/usage
    ("key_id=a&key_id=b", "key_id"),
    ("group_by=day&group_by=hour", "group_by"),
]
CALLS_422 = [
    ("status=99", "status"),
    ("status=600", "status"),
    ("status=abc", "status"),
    ("status=-200", "status"),
    ("status=2e2", "status"),
    ("status=%20200", "status"),
    ("limit=0", "limit"),
    ("limit=501", "limit"),
    ("limit=", "limit"),
    ("before=0", "before"),
    ("before=x", "before"),
    (f"before={2**62 + 1}", "before"),
    ("before=" + "9" * 40, "before"),
    ("tool=", "tool"),
    ("server=" + "s" * 257, "server"),
    ("group_by=day", "group_by"),
    ("from=2030-01-01T00:00:00Z", "from"),
    ("limit=5&limit=6", "limit"),
]


@pytest.mark.parametrize(
    ("route", "query", "field"),
    [
        *(("/api/usage", q, f) for q, f in USAGE_422),
        *(("/api/calls", q, f) for q, f in CALLS_422),
    ],
)
async def test_bad_parameters_are_422_naming_them(
    keystile: Keystile, route: str, query: str, field: str
) -> None:
    boss = await keystile.user("boss@example.com", role="admin", servers=["*"])
    admin = await keystile.key(boss, name="admin", permissions=ADMIN_PERMISSIONS)
    reply = await admin_call(keystile, "GET", f"{route}?{query}", admin.key)
    assert_422(reply, field)


async def test_too_many_groups_is_422(keystile: Keystile) -> None:
    boss = await keystile.user("boss@example.com", role="admin", servers=["*"])
    admin = await keystile.key(boss, name="admin", permissions=ADMIN_PERMISSIONS)
    one = records_for(admin, 1, seed=1)[0]
    many = [CallRecord(**{**_fields(one), "key_id": f"k{n}"}) for n in range(MAX_GROUPS + 1)]
    await write_calls(keystile.runtime.pool, many)
    assert_422(await get(keystile, "/api/usage", admin.key, group_by="key", **WINDOW), "group_by")
    total = await get(keystile, "/api/usage", admin.key, group_by="day", **WINDOW)
    assert [row["requests"] for row in total.body["rows"]] == [MAX_GROUPS + 1]


async def test_parameters_are_checked_before_reach(keystile: Keystile, world: World) -> None:
    # A bad parameter is 422 even beside a filter the caller may not use (no lookup first).
    reply = await get(
        keystile, "/api/calls", world.member.key, key_id=world.admin.record.id, limit=0
    )
    assert_422(reply, "limit")


# --- end to end: a data-plane request becomes a call record the API shows ---


async def test_a_data_plane_call_is_shown_and_its_arguments_are_not_stored(
    keystile: Keystile, database_url: str
) -> None:
    ks = keystile
    boss = await ks.user("boss@example.com", role="admin", servers=["*"])
    admin = await ks.key(boss, name="admin", permissions=ADMIN_PERMISSIONS)
    secret = "hunter2-argument-value"
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": secret}},
    }
    status, _, _ = await ks.request(
        "POST",
        "/mcp-connect/github",
        admin.key,
        json=body,
        headers={"X-Request-Id": "e2e-1", "X-Secret-Header": secret},
    )
    assert status == 200
    recorder = ks.runtime.calls
    assert recorder is not None

    async def written() -> bool:
        # The record is made as the answer ends, which may be after the client has it.
        await recorder.flush()
        found = await ks.runtime.pool.fetchval("SELECT count(*) FROM calls")
        return bool(found)

    await wait_until(written, message="the call record was never written")
    page = await get(ks, "/api/calls", admin.key, key_id=admin.record.id)
    (call,) = [c for c in page.body["calls"] if c["request_id"] == "e2e-1"]
    assert (call["route"], call["server"], call["mcp_method"], call["tool"], call["status"]) == (
        "mcp",
        "github",
        "tools/call",
        "search",
        200,
    )
    usage = await get(ks, "/api/usage", admin.key, group_by="tool", key_id=admin.record.id)
    assert {"tool": "search"}.items() <= usage.body["rows"][0].items()
    # Neither the arguments nor any header value is anywhere in the stored record.
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch("SELECT calls::text AS row FROM calls")
    finally:
        await conn.close()
    assert stored and all(secret not in r["row"] for r in stored)
