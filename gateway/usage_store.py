"""Call records in PostgreSQL: the batch write, the roll-ups, retention and the reads (SPEC §7).

A batch is one transaction: the raw records go into `calls` with COPY and the batch's hourly
roll-ups, added up by PostgreSQL, go into `usage_hourly` with one upsert. A failed write
leaves neither behind, so the write-behind's retry (gateway.usage) counts each record once.

Usage is read from the roll-ups only (hour granularity); the raw rows serve the newest-first
pages of GET /api/calls. SQL is built from the constants below: filters and groupings pick
fixed fragments from whitelists, and every value is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from gateway.calls import BUCKETS, DURATION_BUCKETS_MS, CallRecord, percentile_ms

log = logging.getLogger("keystile.usage")

# --- the write ---

CALL_COLUMNS: tuple[str, ...] = CallRecord._fields
BUCKET_COLUMNS: tuple[str, ...] = tuple(f"d{i}" for i in range(BUCKETS))
# The roll-up's primary key in index order; batches upsert in this order so that two
# processes adding to the same rows lock them in the same order (no deadlock).
HOURLY_KEY = ("workspace_id", "key_id", "hour", "server", "tool", "status")
HOURLY_COLUMNS = (
    "hour",
    "workspace_id",
    "key_id",
    "user_id",
    "server",
    "tool",
    "status",
    "requests",
    "errors",
    "bytes_in",
    "bytes_out",
    *BUCKET_COLUMNS,
)
_COUNTERS = ("requests", "errors", "bytes_in", "bytes_out", *BUCKET_COLUMNS)
# Past this length a text field is cut: a client chooses tool names and request ids, and
# a record's size must stay bounded whatever it sends.
MAX_TEXT = 256


def _bucket_filters() -> str:
    # $1 is DURATION_BUCKETS_MS as float8[] (1-based): d<i> counts durations in
    # ($1[i], $1[i+1]], as gateway.calls.bucket_of places them.
    b = "($1::float8[])"
    parts = [f"count(*) FILTER (WHERE duration_ms <= {b}[1])::int"]
    parts += [
        f"count(*) FILTER (WHERE duration_ms > {b}[{i}] AND duration_ms <= {b}[{i + 1}])::int"
        for i in range(1, BUCKETS - 1)
    ]
    parts.append(f"count(*) FILTER (WHERE duration_ms > {b}[{BUCKETS - 1}])::int")
    return ",\n       ".join(parts)


# The roll-ups of the raw rows, computed in SQL: what write_calls must have added up (tests
# compare the two), and how a table of raw rows gets its roll-ups in one statement.
HOURLY_FROM_CALLS = f"""
SELECT date_trunc('hour', time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
       workspace_id, key_id, user_id, COALESCE(server, '') AS server,
       COALESCE(tool, '') AS tool, status,
       count(*) AS requests, count(*) FILTER (WHERE status >= 400) AS errors,
       sum(bytes_in)::bigint AS bytes_in, sum(bytes_out)::bigint AS bytes_out,
       {_bucket_filters()}
FROM calls
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""
# Into an empty roll-up table (no ON CONFLICT: adding twice must fail, not double-count).
BUILD_HOURLY = f"INSERT INTO usage_hourly ({', '.join(HOURLY_COLUMNS)}) {HOURLY_FROM_CALLS}"


def _clean(value: str) -> str:
    """Text PostgreSQL accepts: no NUL, no lone surrogates."""
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "") if "\x00" in value else value


def _storable(record: CallRecord) -> tuple[Any, ...]:
    """The record with every text made acceptable to PostgreSQL (see write_calls)."""
    return tuple(_clean(v) if isinstance(v, str) else v for v in record)


# A batch is copied as it is into a per-connection staging table (the time as seconds since
# the epoch) and moved from there in two statements: into `calls`, and, added up by
# PostgreSQL, into the hourly roll-ups. The gateway's process converts nothing per record and
# aggregates nothing: it runs beside the data plane. What a client chose (request id, MCP
# method, tool) is cut to MAX_TEXT and a duration or size that is not a sane number is made
# one on the way out of the staging table, by PostgreSQL.
# ON COMMIT DELETE ROWS: the staging table is empty again whether the batch commits or not.
STAGE_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS calls_staged (
    time float8, request_id text, workspace_id text, user_id text, key_id text, route text,
    server text, mcp_method text, tool text, status smallint, duration_ms float8,
    bytes_in bigint, bytes_out bigint, client text
) ON COMMIT DELETE ROWS
"""
STAGED = f"""(
SELECT to_timestamp(time) AS time, left(request_id, {MAX_TEXT}) AS request_id,
       workspace_id, user_id, key_id, route, server,
       left(mcp_method, {MAX_TEXT}) AS mcp_method, left(tool, {MAX_TEXT}) AS tool, status,
       CASE WHEN duration_ms >= 0 AND duration_ms < 'Infinity' THEN duration_ms ELSE 0 END
           AS duration_ms,
       GREATEST(bytes_in, 0) AS bytes_in, GREATEST(bytes_out, 0) AS bytes_out,
       left(client, {MAX_TEXT}) AS client
FROM calls_staged) AS calls_batch"""
_MOVED = ", ".join(CALL_COLUMNS)
MOVE_CALLS = f"INSERT INTO calls ({_MOVED}) SELECT {_MOVED} FROM {STAGED}"
# Rows upserted in primary-key order: two processes adding to the same roll-up rows lock them
# in the same order, so they queue instead of deadlocking.
ADD_HOURLY = f"""
INSERT INTO usage_hourly AS u ({", ".join(HOURLY_COLUMNS)})
SELECT date_trunc('hour', time AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
       workspace_id, key_id, user_id, COALESCE(server, '') AS server,
       COALESCE(tool, '') AS tool, status,
       count(*), count(*) FILTER (WHERE status >= 400),
       sum(bytes_in)::bigint, sum(bytes_out)::bigint,
       {_bucket_filters()}
FROM {STAGED}
GROUP BY 1, 2, 3, 4, 5, 6, 7
ORDER BY 2, 3, 1, 5, 6, 7
ON CONFLICT ({", ".join(HOURLY_KEY)}) DO UPDATE
SET {", ".join(f"{c} = u.{c} + EXCLUDED.{c}" for c in _COUNTERS)}
"""
# What makes PostgreSQL (NUL) or the driver (a lone surrogate) refuse a batch's text.
_UNSTORABLE_TEXT = (asyncpg.DataError, UnicodeEncodeError)


async def write_calls(pool: asyncpg.Pool, batch: Sequence[CallRecord]) -> None:
    """COPY a batch and add its roll-ups, in one transaction.

    Records are copied as they are. Text a client chose may hold what PostgreSQL refuses, and
    a refused batch would fail on every retry and stop recording altogether: then the batch
    is written again with such text made storable (checking every record up front would cost
    the hot path's process a few microseconds per request, for what almost never happens).
    """
    if not batch:
        return
    try:
        await _write_batch(pool, batch)
    except _UNSTORABLE_TEXT:
        await _write_batch(pool, [_storable(record) for record in batch])


async def _write_batch(pool: asyncpg.Pool, rows: Sequence[tuple[Any, ...]]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(STAGE_TABLE)
        await conn.copy_records_to_table("calls_staged", records=rows, columns=CALL_COLUMNS)
        await conn.execute(MOVE_CALLS)
        await conn.execute(ADD_HOURLY, bucket_bounds())


# --- retention ---

# Whoever takes this lock prunes a batch; the others skip their round (one pruner is enough,
# and several would only queue on the same rows). Transaction-scoped, so it is safe behind a
# transaction-mode pooler.
PRUNE_LOCK_ID = 0x6B737072  # "kspr"
TRY_PRUNE_LOCK = "SELECT pg_try_advisory_xact_lock($1)"
PRUNE_CALLS = """
DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE time < $1 ORDER BY time LIMIT $2)
"""
# A roll-up row goes once its whole hour is past retention (hour + 1 h <= cutoff).
PRUNE_HOURLY = """
DELETE FROM usage_hourly WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM usage_hourly WHERE hour < date_trunc('hour', $1 AT TIME ZONE 'UTC')
                                               AT TIME ZONE 'UTC'
    ORDER BY hour LIMIT $2))
"""
PRUNE_BATCH = 10_000  # rows per DELETE: each holds its row locks for a short transaction


@dataclass(frozen=True, slots=True)
class Pruned:
    calls: int
    hourly: int
    skipped: bool = False  # another process held the prune lock


async def prune(
    pool: asyncpg.Pool,
    retention_days: int,
    *,
    now: datetime | None = None,
    batch_size: int = PRUNE_BATCH,
) -> Pruned:
    """Delete raw records older than the retention and roll-ups of hours wholly before it,
    `batch_size` rows per transaction."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    calls = await _prune_table(pool, PRUNE_CALLS, cutoff, batch_size)
    if calls is None:
        return Pruned(0, 0, skipped=True)
    hourly = await _prune_table(pool, PRUNE_HOURLY, cutoff, batch_size)
    return Pruned(calls, hourly or 0, skipped=hourly is None)


async def _prune_table(
    pool: asyncpg.Pool, statement: str, cutoff: datetime, batch_size: int
) -> int | None:
    """Rows deleted, or None when another process holds the prune lock."""
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(TRY_PRUNE_LOCK, PRUNE_LOCK_ID):
                return None if total == 0 else total
            status = await conn.execute(statement, cutoff, batch_size)
        deleted = int(status.rsplit(" ", 1)[1])  # "DELETE <n>"
        total += deleted
        if deleted < batch_size:
            return total


class RetentionTask:
    """Prunes past-retention records at start and then every `interval` seconds."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        retention_days: int,
        *,
        interval: float = 3600.0,
        batch_size: int = PRUNE_BATCH,
    ) -> None:
        self._pool = pool
        self._days = retention_days
        self._interval = interval
        self._batch = batch_size
        self._task: asyncio.Task[None] | None = None
        self.last: Pruned | None = None  # the latest round's outcome (None before, or failed)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keystile-usage-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def prune_once(self) -> Pruned | None:
        """One round; a failure (e.g. the database is away) is logged and tried next round."""
        try:
            self.last = await prune(self._pool, self._days, batch_size=self._batch)
        except Exception as exc:
            log.warning("usage retention failed (%s); retried next round", type(exc).__name__)
            self.last = None
            return None
        if self.last.calls or self.last.hourly:
            log.info("usage retention: %d calls, %d hourly rows", self.last.calls, self.last.hourly)
        return self.last

    async def _run(self) -> None:
        while True:
            await self.prune_once()
            await asyncio.sleep(self._interval)


# --- reads ---


@dataclass(frozen=True, slots=True)
class Scope:
    """Which records a read covers: always one workspace, then optional equality filters.

    The caller decides visibility (admin.usage): a member's scope always carries their user.
    """

    workspace_id: str
    user_id: str | None = None
    key_id: str | None = None
    server: str | None = None
    tool: str | None = None
    status: int | None = None


# Filters become `AND <column> = $n` only when given: a statement per combination, each with
# a plan that uses its index (an `$n IS NULL OR column = $n` form would get a generic plan
# that cannot).
FILTER_COLUMNS = ("user_id", "key_id", "server", "tool", "status")

# group_by dimension -> (output field, SQL expression over usage_hourly).
DIMENSIONS: dict[str, tuple[str, str]] = {
    "key": ("key_id", "key_id"),
    "user": ("user_id", "user_id"),
    "server": ("server", "NULLIF(server, '')"),
    "tool": ("tool", "NULLIF(tool, '')"),
    "status": ("status", "status"),
    "hour": ("hour", "hour"),
    "day": ("day", "(hour AT TIME ZONE 'UTC')::date"),
}
# The most rows one usage answer may have: a grouping like key,hour over a long window of a
# large workspace would otherwise build an answer of millions of rows.
MAX_GROUPS = 50_000
USAGE = """
SELECT {dimensions}COALESCE(sum(requests), 0)::bigint AS requests,
       COALESCE(sum(errors), 0)::bigint AS errors,
       COALESCE(sum(bytes_in), 0)::bigint AS bytes_in,
       COALESCE(sum(bytes_out), 0)::bigint AS bytes_out,
       {buckets}
FROM usage_hourly
WHERE workspace_id = $1 AND hour >= $2 AND hour < $3{filters}
{grouping}
"""
_BUCKET_SUMS = ", ".join(f"COALESCE(sum({c}), 0)::bigint AS {c}" for c in BUCKET_COLUMNS)

CALLS_PAGE = f"""
SELECT id, {", ".join(CALL_COLUMNS)}
FROM calls
WHERE workspace_id = $1{{filters}}
ORDER BY id DESC
LIMIT ${{limit}}
"""


def _filters(scope: Scope, first: int) -> tuple[str, list[Any]]:
    """`AND column = $n` for each filter given, numbered from `first`, and their values."""
    sql: list[str] = []
    values: list[Any] = []
    for column in FILTER_COLUMNS:
        value = getattr(scope, column)
        if value is not None:
            values.append(value)
            sql.append(f" AND {column} = ${first + len(values) - 1}")
    return "".join(sql), values


def usage_sql(
    scope: Scope, group_by: Sequence[str], *, max_groups: int = MAX_GROUPS
) -> tuple[str, list[Any]]:
    """The statement for these filters and dimensions, and its values from $4 on (the
    workspace, start and end are $1-$3)."""
    where, values = _filters(scope, 4)
    if not group_by:
        return USAGE.format(dimensions="", buckets=_BUCKET_SUMS, filters=where, grouping=""), values
    selected = "".join(f"{DIMENSIONS[d][1]} AS {DIMENSIONS[d][0]}, " for d in group_by)
    positions = ", ".join(str(n) for n in range(1, len(group_by) + 1))
    values.append(max_groups + 1)  # one row past the cap tells "too many" from "exactly"
    grouping = f"GROUP BY {positions} ORDER BY {positions} LIMIT ${len(values) + 3}"
    sql = USAGE.format(dimensions=selected, buckets=_BUCKET_SUMS, filters=where, grouping=grouping)
    return sql, values


class TooManyGroups(Exception):
    """A grouping that would answer more than the allowed number of rows."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} groups")
        self.limit = limit


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _usage_row(row: asyncpg.Record, group_by: Sequence[str]) -> dict[str, Any]:
    out = {DIMENSIONS[d][0]: _json_value(row[DIMENSIONS[d][0]]) for d in group_by}
    buckets = [int(row[c]) for c in BUCKET_COLUMNS]
    out["requests"] = int(row["requests"])
    out["errors"] = int(row["errors"])
    out["p50_ms"] = percentile_ms(buckets, 0.5)
    out["p95_ms"] = percentile_ms(buckets, 0.95)
    out["bytes_in"] = int(row["bytes_in"])
    out["bytes_out"] = int(row["bytes_out"])
    return out


async def usage(
    pool: asyncpg.Pool,
    scope: Scope,
    start: datetime,
    end: datetime,
    group_by: Sequence[str],
    *,
    max_groups: int = MAX_GROUPS,
) -> list[dict[str, Any]]:
    """Roll-up sums over hours in [start, end), one row per group (one row in all without
    dimensions), ordered by the group fields; p50/p95 estimated from the duration buckets.
    TooManyGroups past `max_groups` rows."""
    sql, values = usage_sql(scope, group_by, max_groups=max_groups)
    rows = await pool.fetch(sql, scope.workspace_id, start, end, *values)
    if group_by and len(rows) > max_groups:  # ungrouped: always the one total row
        raise TooManyGroups(max_groups)
    return [_usage_row(row, group_by) for row in rows]


def calls_sql(scope: Scope, before: int | None) -> tuple[str, list[Any]]:
    where, values = _filters(scope, 2)
    if before is not None:
        values.append(before)
        where += f" AND id < ${len(values) + 1}"
    return CALLS_PAGE.format(filters=where, limit=len(values) + 2), values


def _call_json(row: asyncpg.Record) -> dict[str, Any]:
    out = {name: _json_value(value) for name, value in row.items()}
    out["id"] = int(row["id"])
    return out


async def calls(
    pool: asyncpg.Pool, scope: Scope, *, before: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to `limit` records newest first (ids below `before`), and the id to pass as
    `before` for the next page: None when no older record matches."""
    sql, values = calls_sql(scope, before)
    rows = await pool.fetch(sql, scope.workspace_id, *values, limit + 1)
    page = [_call_json(row) for row in rows[:limit]]
    next_before = page[-1]["id"] if len(rows) > limit else None
    return page, next_before


def bucket_bounds() -> list[float]:
    """DURATION_BUCKETS_MS as the float8[] that HOURLY_FROM_CALLS takes as $1."""
    return [float(b) for b in DURATION_BUCKETS_MS]
