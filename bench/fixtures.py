"""Databases, keys and admin calls for the benchmark, through the product's own APIs."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from gateway import keys
from gateway.cache import KeyCache
from gateway.config import DatabaseSettings
from gateway.db import connect_and_migrate
from gateway.keyring import Keyring
from gateway.oauth.store import GrantPlan, NewToken, OAuthStore
from gateway.store import Actor, Store
from gateway.usage_store import BUILD_HOURLY, bucket_bounds


def with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{name}" + (f"?{query}" if query else "")


async def create_database(root_url: str, name: str) -> str:
    conn = await asyncpg.connect(root_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(root_url, name)


async def drop_database(root_url: str, name: str) -> None:
    conn = await asyncpg.connect(root_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def db_stats(root_url: str, name: str) -> dict[str, int]:
    """Transactions of database `name` and scans of the tables a key lookup reads.

    Cumulative statistics reach the views up to ~10 s after an idle backend ran the query
    (PostgreSQL flushes them at most once a second, and 10 s after going idle), so callers
    wait before taking a snapshot. Read from another database, so reading does not count
    as a transaction of `name`; the table scans need a connection to `name` itself (one
    transaction, counted by the next snapshot).
    """
    conn = await asyncpg.connect(root_url)
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched "
            "FROM pg_stat_database WHERE datname = $1",
            name,
        )
    finally:
        await conn.close()
    assert row is not None
    out = {k: int(v) for k, v in dict(row).items()}
    conn = await asyncpg.connect(with_database(root_url, name))
    try:
        for rel in await conn.fetch(
            "SELECT relname, COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0) AS scans, "
            "n_tup_upd FROM pg_stat_user_tables "
            "WHERE relname IN ('api_keys', 'users', 'workspaces', 'server_grants')"
        ):
            out[f"{rel['relname']}_scans"] = int(rel["scans"])
            out[f"{rel['relname']}_updates"] = int(rel["n_tup_upd"])
    finally:
        await conn.close()
    return out


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


@dataclass
class Admin:
    """The admin API of one Keystile instance, called with an admin key."""

    http: aiohttp.ClientSession
    base: str
    key: str

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def _call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        async with self.http.request(
            method, self.base + path, json=body, headers=self._headers
        ) as resp:
            text = await resp.text()
            if resp.status != expect:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]}")
            return await resp.json() if text else None

    async def create_user(self, email: str, servers: list[str]) -> dict[str, Any]:
        body = {"email": email, "display_name": "bench", "role": "member", "servers": servers}
        user: dict[str, Any] = await self._call("POST", "/api/users", body, expect=201)
        return user

    async def create_key(
        self, user_id: str, name: str, servers: list[str], *, tools: list[str] | None = None
    ) -> tuple[str, str]:
        body: dict[str, Any] = {
            "name": name,
            "user_id": user_id,
            "servers": servers,
            "permissions": ["mcp"],
            "tools": tools,
        }
        created = await self._call("POST", "/api/keys", body, expect=201)
        return str(created["id"]), str(created["key"])

    async def revoke(self, key_id: str) -> None:
        await self._call("DELETE", f"/api/keys/{key_id}", expect=204)

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.base + "/metrics") as resp:
            text = await resp.text()
        return parse_metrics(text)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {name: value}; labelled samples are summed per name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(3))
    return out


async def open_store(url: str) -> tuple[asyncpg.Pool, Store, Keyring]:
    """The product's Store and Keyring over a pool made as Keystile makes it (migrated)."""
    settings = DatabaseSettings(pool_min_size=1, pool_max_size=16, statement_timeout=0)
    pool = await connect_and_migrate(url, settings)  # no timeout: the 1M-row insert is long
    store = Store(pool)
    cache = KeyCache(max_entries=10, ttl_seconds=1, negative_max_entries=10, negative_ttl_seconds=0)
    return pool, store, Keyring(store, cache, keys.KeyHasher())


async def mint_keys(
    keyring: Keyring,
    actor: Actor,
    user_id: str,
    count: int,
    *,
    prefix: str,
    servers: tuple[str, ...] = ("bench",),
    concurrency: int = 16,
) -> list[tuple[str, str]]:
    """`count` real keys through Keyring.create_key (argon2 hashing in threads): (id, key)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> tuple[str, str]:
        async with gate:
            issued = await keyring.create_key(
                actor, user_id=user_id, name=f"{prefix}-{n:07d}", servers=servers
            )
            return issued.record.id, issued.key

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def mint_oauth_token(pool: asyncpg.Pool, store: Store, *, key_id: str, server: str) -> str:
    """An OAuth grant approved by key `key_id` for `server`, and an access token of it, minted
    through the product's OAuth store (the benchmark measures the data plane, not the consent
    flow). The token lives a day, so a long run never sees it expire."""
    loaded = await store.load_principal(key_id)
    assert loaded is not None, key_id
    approver = loaded[0]
    oauth = OAuthStore(pool)
    client_id = keys.new_id()
    await oauth.register_client(client_id, "bench client", ["http://127.0.0.1/cb"], "127.0.0.1")
    now = datetime.now(UTC)
    plan = GrantPlan(
        grant_id=keys.new_id(),
        approver=approver,
        client_id=client_id,
        client_name="bench client",
        server=server,
        expires_at=now + timedelta(days=2),
        tools=None,
        rate_limit=None,
        allowed_cidrs=None,
    )
    access = keys.generate(approver.user.id, plan.grant_id, "oauth")
    token = NewToken(keys.token_hash(access.full), "access", now + timedelta(days=1))
    await oauth.create_grant(plan, b"", [token])  # no code: nothing to link
    return access.full


FILLER_SQL = """
INSERT INTO api_keys (id, user_id, workspace_id, name, servers, permissions,
                      secret_hash, secret_prefix)
SELECT 'F' || lpad(i::text, 15, '0'), $1, $2, 'filler-' || i, '{bench}', '{mcp}', $3, 'xxxx'
FROM generate_series($4::int, $5::int) AS i
"""


async def insert_filler(
    pool: asyncpg.Pool, *, user_id: str, workspace_id: str, start: int, stop: int, dummy: str
) -> None:
    """Filler keys [start, stop): valid ids and a real-format argon2 hash nobody can match."""
    if stop <= start:
        return
    async with pool.acquire() as conn:
        await conn.execute(FILLER_SQL, user_id, workspace_id, dummy, start, stop - 1)
        await conn.execute("ANALYZE api_keys")


# Call records generated inside PostgreSQL (a minute for millions, no Python per row): `n`
# records at even steps from $4 (epoch seconds) every $5 seconds, for keys $2 of users $3
# (parallel arrays). Keys are picked with a skew (the first gets ~10% of the traffic, as a
# busy CI key would); every tenth key is a chat key; the rest call tools of one server each,
# tools skewed towards the first names; ~8% errors; durations log-uniform from 1 ms to 8 s.
FILL_CALLS_SQL = """
INSERT INTO calls (time, request_id, workspace_id, user_id, key_id, route, server, mcp_method,
                   tool, status, duration_ms, bytes_in, bytes_out, client)
SELECT to_timestamp($4::float8 + g.i * $5::float8),
       'bench-' || g.i,
       $1,
       ($3::text[])[g.k],
       ($2::text[])[g.k],
       CASE WHEN g.k % 10 = 0 THEN 'chat' ELSE 'mcp' END,
       CASE WHEN g.k % 10 <> 0 THEN ($6::text[])[1 + g.k % cardinality($6::text[])] END,
       CASE WHEN g.k % 10 = 0 THEN NULL WHEN g.r < 0.85 THEN 'tools/call' ELSE 'tools/list' END,
       CASE WHEN g.k % 10 <> 0 AND g.r < 0.85
            THEN ($7::text[])[1 + floor(g.s * g.s * cardinality($7::text[]))::int] END,
       CASE WHEN g.t < 0.92 THEN 200 WHEN g.t < 0.96 THEN 403 WHEN g.t < 0.985 THEN 429
            ELSE 502 END,
       round(exp(g.d * 9)::numeric, 3)::float8,
       200 + g.i % 1800,
       400 + (g.i * 7) % 40000,
       '10.0.' || (g.k % 250) || '.1'
FROM (SELECT i, 1 + floor(random() ^ 2 * cardinality($2::text[]))::int AS k,
             random() AS r, random() AS s, random() AS t, random() AS d
      FROM generate_series(0, $8::int - 1) AS i) AS g
"""


async def fill_calls(
    pool: asyncpg.Pool,
    *,
    workspace_id: str,
    keys: list[tuple[str, str]],
    count: int,
    start: float,
    seconds: float,
    servers: list[str],
    tools: list[str],
) -> dict[str, float]:
    """`count` call records over `seconds` from `start` (epoch) for `keys` (key id, user id),
    then their hourly roll-ups built in one INSERT ... SELECT, then statistics. Returns the
    seconds each step took."""
    key_ids = [k for k, _ in keys]
    user_ids = [u for _, u in keys]
    took: dict[str, float] = {}
    async with pool.acquire() as conn:
        started = time.perf_counter()
        await conn.execute(
            FILL_CALLS_SQL,
            workspace_id,
            key_ids,
            user_ids,
            start,
            seconds / count,
            servers,
            tools,
            count,
        )
        took["calls"] = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute(BUILD_HOURLY, bucket_bounds())
        took["rollups"] = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute("VACUUM ANALYZE usage_hourly")
        await conn.execute("ANALYZE calls")
        took["analyze"] = time.perf_counter() - started
    return {step: round(s, 1) for step, s in took.items()}


async def table_sizes(pool: asyncpg.Pool, tables: list[str]) -> dict[str, dict[str, Any]]:
    """Rows, heap and index bytes of each table (MiB, rounded)."""
    out: dict[str, dict[str, Any]] = {}
    async with pool.acquire() as conn:
        for table in tables:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM " + table + ") AS rows, "  # a fixed name
                "pg_table_size($1::regclass) AS heap, pg_indexes_size($1::regclass) AS indexes",
                table,
            )
            assert row is not None
            out[table] = {
                "rows": int(row["rows"]),
                "table_mib": round(row["heap"] / 2**20, 1),
                "indexes_mib": round(row["indexes"] / 2**20, 1),
            }
    return out
