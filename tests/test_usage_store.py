"""Call records in PostgreSQL: COPY writes and hourly roll-ups that agree with the raw rows, a
failed write that leaves nothing (a trigger that raises, a connection cut mid-transaction) and
a retry that counts once, retention in bounded batches, and the reads behind the admin API."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.calls import BUCKETS, DURATION_BUCKETS_MS, CallRecord, bucket_of
from gateway.config import DatabaseSettings
from gateway.db import create_pool
from gateway.metrics import Metrics
from gateway.usage import CallRecorder
from gateway.usage_store import (
    BUCKET_COLUMNS,
    CALL_COLUMNS,
    DIMENSIONS,
    HOURLY_COLUMNS,
    HOURLY_FROM_CALLS,
    MAX_TEXT,
    PRUNE_LOCK_ID,
    Pruned,
    RetentionTask,
    Scope,
    TooManyGroups,
    bucket_bounds,
    calls,
    prune,
    usage,
    write_calls,
)
from tests.support import FaultyProxy, wait_until

# A fixed hour boundary, so records land in known hours.
T0 = datetime(2030, 3, 1, 10, 0, tzinfo=UTC).timestamp()
KEYS = {"kA1": "uA", "kA2": "uA", "kB1": "uB"}  # key -> user, workspace "w1"
SERVERS = ["github", "gitlab", None]
TOOLS = ["search", "get_issue", "delete_repo", None]
STATUSES = [200, 200, 200, 201, 403, 429, 502]
# Durations on and around every bucket bound, plus the extremes.
EDGES = [0.0, 0.4, *DURATION_BUCKETS_MS, *(b + 0.001 for b in DURATION_BUCKETS_MS), 90_000.0]


def record(
    t: float,
    *,
    key: str = "kA1",
    workspace: str = "w1",
    server: str | None = "github",
    tool: str | None = "search",
    status: int = 200,
    duration: float = 12.5,
    bytes_in: int = 100,
    bytes_out: int = 1000,
    request_id: str = "req",
) -> CallRecord:
    return CallRecord(
        time=t,
        request_id=request_id,
        workspace_id=workspace,
        user_id=KEYS.get(key, "uZ"),
        key_id=key,
        route="mcp" if server is not None else "chat",
        server=server,
        mcp_method="tools/call" if tool is not None else None,
        tool=tool,
        status=status,
        duration_ms=duration,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        client="10.0.0.1",
    )


def random_records(n: int, seed: int, *, hours: int = 5) -> list[CallRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        server = rng.choice(SERVERS)
        out.append(
            record(
                T0 + rng.uniform(0, hours * 3600),
                key=rng.choice(list(KEYS)),
                server=server,
                tool=rng.choice(TOOLS) if server is not None else None,
                status=rng.choice(STATUSES),
                duration=rng.choice(EDGES) if i % 3 == 0 else rng.expovariate(1 / 150),
                bytes_in=rng.randrange(0, 5000),
                bytes_out=rng.randrange(0, 50_000),
                request_id=f"r{seed}-{i}",
            )
        )
    return out


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url, DatabaseSettings(pool_min_size=1, pool_max_size=8))
    yield p
    await p.close()


async def hourly_rows(conn: asyncpg.Pool | asyncpg.Connection) -> set[tuple[Any, ...]]:
    rows = await conn.fetch(f"SELECT {', '.join(HOURLY_COLUMNS)} FROM usage_hourly")
    return {tuple(r) for r in rows}


async def hourly_from_raw(pool: asyncpg.Pool) -> set[tuple[Any, ...]]:
    rows = await pool.fetch(HOURLY_FROM_CALLS, bucket_bounds())
    return {tuple(r) for r in rows}


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM calls) AS calls, "
        "(SELECT COALESCE(sum(requests), 0) FROM usage_hourly) AS requests"
    )
    assert row is not None
    return int(row["calls"]), int(row["requests"])


# --- the schema ---


async def test_calls_hold_exactly_the_record_fields_and_nothing_else(pool: asyncpg.Pool) -> None:
    columns = [
        r["column_name"]
        for r in await pool.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'calls' ORDER BY ordinal_position"
        )
    ]
    # The record has no field for arguments, bodies or header values, and neither does the
    # table: every column is one of the record's fields (plus the paging id).
    assert columns == ["id", *CallRecord._fields]
    assert tuple(columns[1:]) == CALL_COLUMNS
    hourly = {
        r["column_name"]
        for r in await pool.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage_hourly'"
        )
    }
    assert hourly == set(HOURLY_COLUMNS)
    assert tuple(f"d{i}" for i in range(BUCKETS)) == BUCKET_COLUMNS


# --- writes and roll-ups ---


async def test_copy_and_rollups_agree_with_the_raw_rows(pool: asyncpg.Pool) -> None:
    records = random_records(3000, seed=1)
    # Several batches, so later ones add into roll-up rows the earlier ones created.
    for start in range(0, len(records), 700):
        await write_calls(pool, records[start : start + 700])
    assert await counts(pool) == (3000, 3000)

    stored = await pool.fetch(f"SELECT {', '.join(CALL_COLUMNS)} FROM calls ORDER BY id")
    for rec, row in zip(records, stored, strict=True):
        stored_row = dict(row)
        # PostgreSQL's to_timestamp and Python may round the last microsecond differently.
        assert abs(stored_row.pop("time").timestamp() - rec.time) <= 2e-6
        expected = rec._asdict()
        del expected["time"]
        assert stored_row == expected
    assert await hourly_rows(pool) == await hourly_from_raw(pool)

    # The totals the API reports, against sums over the records made here.
    total = (await usage(pool, Scope("w1"), ts(T0), ts(T0 + 6 * 3600), []))[0]
    assert total["requests"] == len(records)
    assert total["errors"] == sum(r.status >= 400 for r in records)
    assert total["bytes_in"] == sum(r.bytes_in for r in records)
    assert total["bytes_out"] == sum(r.bytes_out for r in records)


def ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def expected_groups(
    records: Iterable[CallRecord], dims: list[str]
) -> dict[tuple[Any, ...], dict[str, int]]:
    field_of: dict[str, Callable[[CallRecord], Any]] = {
        "key": lambda r: r.key_id,
        "user": lambda r: r.user_id,
        "server": lambda r: r.server,
        "tool": lambda r: r.tool,
        "status": lambda r: r.status,
        "hour": lambda r: ts(math.floor(r.time / 3600) * 3600).isoformat().replace("+00:00", "Z"),
        "day": lambda r: ts(r.time).date().isoformat(),
    }
    out: dict[tuple[Any, ...], dict[str, int]] = defaultdict(Counter)
    for r in records:
        group = tuple(field_of[d](r) for d in dims)
        out[group]["requests"] += 1
        out[group]["errors"] += r.status >= 400
        out[group]["bytes_in"] += r.bytes_in
        out[group]["bytes_out"] += r.bytes_out
    return out


ALL_GROUPINGS = [[], *([d] for d in DIMENSIONS)] + [
    [a, b] for a in DIMENSIONS for b in DIMENSIONS if a != b
]


async def test_every_grouping_agrees_with_the_records(pool: asyncpg.Pool) -> None:
    # Across a UTC midnight, so `day` has two values.
    records = random_records(800, seed=2, hours=30)
    await write_calls(pool, records)
    start, end = ts(T0), ts(T0 + 31 * 3600)
    for dims in ALL_GROUPINGS:
        rows = await usage(pool, Scope("w1"), start, end, dims)
        names = [DIMENSIONS[d][0] for d in dims]
        got = {
            tuple(row[n] for n in names): {
                k: row[k] for k in ("requests", "errors", "bytes_in", "bytes_out")
            }
            for row in rows
        }
        expected = expected_groups(records, dims)
        assert got == {g: dict(v) for g, v in expected.items()}, dims
        assert len(rows) == len(expected), dims  # one row per group
        assert all(list(row)[: len(names)] == names for row in rows)  # group fields first
    days = await usage(pool, Scope("w1"), start, end, ["day"])
    assert len(days) == 2
    assert [r["day"] for r in days] == sorted(r["day"] for r in days)


async def test_filters_narrow_the_usage(pool: asyncpg.Pool) -> None:
    records = random_records(600, seed=3)
    others = [r._replace(workspace_id="w2") for r in random_records(50, seed=4)]
    await write_calls(pool, records + others)
    start, end = ts(T0), ts(T0 + 6 * 3600)
    cases: list[tuple[Scope, Callable[[CallRecord], bool]]] = [
        (Scope("w1"), lambda r: True),
        (Scope("w1", key_id="kA2"), lambda r: r.key_id == "kA2"),
        (Scope("w1", user_id="uA"), lambda r: r.user_id == "uA"),
        (Scope("w1", server="gitlab"), lambda r: r.server == "gitlab"),
        (Scope("w1", tool="delete_repo"), lambda r: r.tool == "delete_repo"),
        (
            Scope("w1", user_id="uA", server="github", tool="search"),
            lambda r: r.user_id == "uA" and r.server == "github" and r.tool == "search",
        ),
        (Scope("w1", user_id="uB", key_id="kA1"), lambda r: False),
        (Scope("w2"), lambda r: False),  # the other workspace's own view is its own
    ]
    for scope, keep in cases:
        total = (await usage(pool, scope, start, end, []))[0]
        wanted = [r for r in records if keep(r)]
        if scope.workspace_id == "w2":
            wanted = others
        assert total["requests"] == len(wanted), scope
        assert total["bytes_out"] == sum(r.bytes_out for r in wanted), scope


async def test_the_window_covers_whole_hours(pool: asyncpg.Pool) -> None:
    await write_calls(
        pool, [record(T0 + 10), record(T0 + 3599.5), record(T0 + 3600), record(T0 + 7300)]
    )

    async def between(a: float, b: float) -> int:
        row = (await usage(pool, Scope("w1"), ts(a), ts(b), []))[0]
        return int(row["requests"])

    assert await between(T0, T0 + 3600) == 2
    assert await between(T0 + 3600, T0 + 7200) == 1
    assert await between(T0, T0 + 3 * 3600) == 4
    assert await between(T0 - 3600, T0) == 0
    empty = await usage(pool, Scope("w1"), ts(T0 - 7200), ts(T0), ["tool"])
    assert empty == []  # grouped: no groups; ungrouped: one row of zeros
    zero = (await usage(pool, Scope("w1"), ts(T0 - 7200), ts(T0), []))[0]
    assert zero == {
        "requests": 0,
        "errors": 0,
        "p50_ms": None,
        "p95_ms": None,
        "bytes_in": 0,
        "bytes_out": 0,
    }


async def test_a_grouping_past_the_cap_is_refused(pool: asyncpg.Pool) -> None:
    await write_calls(pool, [record(T0 + h * 3600) for h in range(4)])
    start, end = ts(T0), ts(T0 + 5 * 3600)
    assert len(await usage(pool, Scope("w1"), start, end, ["hour"], max_groups=4)) == 4
    with pytest.raises(TooManyGroups):
        await usage(pool, Scope("w1"), start, end, ["hour"], max_groups=3)
    assert len(await usage(pool, Scope("w1"), start, end, [], max_groups=0)) == 1


def exact_percentile(durations: list[float], fraction: float) -> float:
    ordered = sorted(durations)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def bucket_range(duration: float) -> tuple[float, float]:
    index = bucket_of(duration)
    low = DURATION_BUCKETS_MS[index - 1] if index else 0.0
    high = DURATION_BUCKETS_MS[index] if index < len(DURATION_BUCKETS_MS) else low
    return float(low), float(high)


async def test_percentile_estimates_fall_in_the_exact_percentiles_bucket(
    pool: asyncpg.Pool,
) -> None:
    records = random_records(2000, seed=5)
    await write_calls(pool, records)
    rows = await usage(pool, Scope("w1"), ts(T0), ts(T0 + 6 * 3600), ["key", "server"])
    assert rows
    by_group: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for r in records:
        by_group[(r.key_id, r.server)].append(r.duration_ms)
    for row in rows:
        durations = by_group[(row["key_id"], row["server"])]
        for fraction, name in ((0.5, "p50_ms"), (0.95, "p95_ms")):
            low, high = bucket_range(exact_percentile(durations, fraction))
            assert low <= row[name] <= high, (row, fraction)


async def test_text_a_client_chose_is_made_storable(pool: asyncpg.Pool) -> None:
    # NUL and a lone surrogate would make PostgreSQL refuse the whole batch, on every retry.
    odd = [
        record(T0, tool="nul\x00tool", request_id="r\x00"),
        record(T0, tool="half \ud800 surrogate"),
        record(T0, tool="x" * 5000),
        record(T0, duration=float("nan"), bytes_in=-5),
    ]
    await write_calls(pool, odd)
    rows = await pool.fetch("SELECT tool, request_id, duration_ms, bytes_in FROM calls ORDER BY id")
    assert rows[0]["tool"] == "nultool"
    assert rows[0]["request_id"] == "r"
    assert rows[1]["tool"] == "half ? surrogate"
    assert rows[2]["tool"] == "x" * MAX_TEXT
    assert (rows[3]["duration_ms"], rows[3]["bytes_in"]) == (0.0, 0)
    assert await hourly_rows(pool) == await hourly_from_raw(pool)


async def test_concurrent_batches_on_the_same_rows_all_count(pool: asyncpg.Pool) -> None:
    # Every batch adds to the same roll-up rows, in different orders: the upsert locks rows
    # in key order, so the writers queue instead of deadlocking, and no count is lost.
    batches = []
    for seed in range(8):
        batch = random_records(300, seed=100 + seed, hours=2)
        random.Random(seed).shuffle(batch)
        batches.append(batch)
    await asyncio.gather(*(write_calls(pool, b) for b in batches))
    assert await counts(pool) == (2400, 2400)
    assert await hourly_rows(pool) == await hourly_from_raw(pool)


# --- failures ---

FAIL_TRIGGER = """
CREATE TABLE test_fail_switch (on_ boolean);
CREATE FUNCTION test_fail_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM test_fail_switch) THEN
        RAISE EXCEPTION 'roll-up refused by the test';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_fail_rollup BEFORE INSERT ON usage_hourly
FOR EACH ROW EXECUTE FUNCTION test_fail_rollup();
"""


async def test_a_write_failing_mid_transaction_leaves_nothing_and_a_retry_counts_once(
    pool: asyncpg.Pool,
) -> None:
    first = random_records(200, seed=6)
    await write_calls(pool, first)
    before = await hourly_rows(pool)
    await pool.execute(FAIL_TRIGGER)
    await pool.execute("INSERT INTO test_fail_switch VALUES (true)")
    # The second batch shares roll-up rows with the first (same keys and hours) and has
    # new ones; the COPY succeeds, then the upsert fails inside the same transaction.
    second = random_records(300, seed=7)
    with pytest.raises(asyncpg.RaiseError):
        await write_calls(pool, second)
    assert await counts(pool) == (200, 200)
    assert await hourly_rows(pool) == before

    await pool.execute("DELETE FROM test_fail_switch")
    await write_calls(pool, second)
    assert await counts(pool) == (500, 500)
    assert await hourly_rows(pool) == await hourly_from_raw(pool)
    ids = await pool.fetchval("SELECT count(DISTINCT request_id) FROM calls")
    assert ids == 500  # each record once


async def test_the_call_recorder_keeps_a_failed_batch_and_writes_it_once(
    pool: asyncpg.Pool,
) -> None:
    async def write(batch: list[CallRecord]) -> None:
        await write_calls(pool, batch)

    recorder = CallRecorder(write, Metrics(), interval=3600, max_pending=10_000)
    await pool.execute(FAIL_TRIGGER)
    await pool.execute("INSERT INTO test_fail_switch VALUES (true)")
    records = random_records(100, seed=8)
    for r in records[:60]:
        recorder.record(r)
    assert await recorder.flush() is False
    assert recorder.pending == 60
    for r in records[60:]:
        recorder.record(r)  # arrived during the outage
    assert await counts(pool) == (0, 0)
    await pool.execute("DELETE FROM test_fail_switch")
    assert await recorder.flush() is True
    assert recorder.pending == 0
    assert await counts(pool) == (100, 100)
    stored = [r["request_id"] for r in await pool.fetch("SELECT request_id FROM calls ORDER BY id")]
    assert stored == [r.request_id for r in records]  # oldest first, each once


async def test_a_full_batch_of_call_records_is_written_before_the_interval(
    pool: asyncpg.Pool,
) -> None:
    async def write(batch: list[CallRecord]) -> None:
        await write_calls(pool, batch)

    # The interval never comes during the test: only the batch can start the write.
    recorder = CallRecorder(write, Metrics(), interval=3600, max_pending=10_000, batch=50)
    recorder.start()
    try:
        records = random_records(120, seed=9)
        for r in records[:49]:
            recorder.record(r)
        assert recorder.pending == 49
        recorder.record(records[49])

        async def written(n: int) -> bool:
            return (await counts(pool))[0] == n

        await wait_until(lambda: written(50), message="a full batch was not written")
        for r in records[50:100]:
            recorder.record(r)
        await wait_until(lambda: written(100), message="the second batch was not written")
        for r in records[100:]:
            recorder.record(r)
        for _ in range(100):
            await asyncio.sleep(0)
        assert recorder.pending == 20  # less than a batch: waits for the interval
    finally:
        await recorder.stop()
    assert (await counts(pool))[0] == 120  # the rest, at shutdown


async def test_a_full_batch_that_fails_is_retried_after_the_interval_not_at_once() -> None:
    attempts = 0

    async def write(batch: list[CallRecord]) -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionResetError("the database is away")

    recorder = CallRecorder(write, Metrics(), interval=3600, max_pending=10_000, batch=10)
    recorder.start()
    try:
        for r in random_records(10, seed=10):
            recorder.record(r)

        async def tried() -> bool:
            return attempts == 1

        await wait_until(tried, message="a full batch was not written")
        for _ in range(100):  # a retry in a tight loop would have run by now
            await asyncio.sleep(0)
        assert attempts == 1
        assert recorder.pending == 10  # kept for the next try
    finally:
        await recorder.stop()


HOLD_TRIGGER = """
CREATE FUNCTION test_hold_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
CREATE TRIGGER test_hold_rollup BEFORE INSERT ON usage_hourly
FOR EACH ROW EXECUTE FUNCTION test_hold_rollup();
"""


async def test_a_connection_cut_mid_write_leaves_nothing(
    database_url: str, db_proxy: FaultyProxy
) -> None:
    settings = DatabaseSettings(pool_min_size=1, pool_max_size=2, statement_timeout=0)
    proxied = await create_pool(db_proxy.url_for(database_url), settings)
    direct = await asyncpg.connect(database_url)
    holder = await asyncpg.connect(database_url)
    try:
        await direct.execute(HOLD_TRIGGER)
        # The test holds the lock the trigger waits for: the write is parked inside its
        # transaction, after the COPY, until the connection is cut under it.
        await holder.execute("SELECT pg_advisory_lock(4242)")
        records = random_records(300, seed=9)
        write = asyncio.create_task(write_calls(proxied, records))
        pid = await wait_until(
            lambda: direct.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%INSERT INTO usage_hourly%'"
            ),
            message="the write never reached its roll-up upsert",
        )
        await db_proxy.cut()
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await write
        await holder.execute("SELECT pg_advisory_unlock(4242)")
        # The backend finishes the statement, finds its client gone and rolls back.
        await wait_until(
            lambda: direct.fetchval(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid
            ),
            message="the cut backend never went away",
        )
        assert await direct.fetchval("SELECT count(*) FROM calls") == 0
        assert await direct.fetchval("SELECT count(*) FROM usage_hourly") == 0

        await direct.execute("DROP TRIGGER test_hold_rollup ON usage_hourly")
        retry = await create_pool(database_url, settings)
        try:
            await write_calls(retry, records)
            assert await counts(retry) == (300, 300)
            assert await hourly_rows(retry) == await hourly_from_raw(retry)
        finally:
            await retry.close()
    finally:
        await holder.close()
        await direct.close()
        proxied.terminate()


# --- retention ---


async def test_pruning_removes_exactly_what_is_past_retention(pool: asyncpg.Pool) -> None:
    now = datetime(2030, 4, 1, 12, 30, tzinfo=UTC)
    cutoff = now - timedelta(days=30)  # 2030-03-02 12:30
    c = cutoff.timestamp()
    times = {
        "old": c - 86400,
        "hour_before": c - 1800 - 1,  # 11:59:59, in the hour wholly before the cutoff
        "just_before": c - 0.001,  # 12:29:59.999, in the cutoff's own hour
        "at": c,
        "after": c + 60,
        "new": now.timestamp() - 60,
    }
    await write_calls(pool, [record(t, request_id=name) for name, t in times.items()])
    hours_before = await pool.fetchval("SELECT count(*) FROM usage_hourly")
    assert hours_before == 4  # the day before, 11:00, 12:00 (four records), a month later
    pruned = await prune(pool, 30, now=now, batch_size=2)
    assert (pruned.calls, pruned.hourly, pruned.skipped) == (3, 2, False)
    kept = [r["request_id"] for r in await pool.fetch("SELECT request_id FROM calls ORDER BY id")]
    assert kept == ["at", "after", "new"]
    hours = [r["hour"] for r in await pool.fetch("SELECT hour FROM usage_hourly ORDER BY hour")]
    # The cutoff's hour keeps its roll-up (it still holds records within retention).
    assert hours == [datetime(2030, 3, 2, 12, tzinfo=UTC), datetime(2030, 4, 1, 12, tzinfo=UTC)]
    assert await prune(pool, 30, now=now) == Pruned(0, 0)


async def test_pruning_in_small_batches_takes_everything_past_retention(
    pool: asyncpg.Pool,
) -> None:
    now = datetime(2030, 6, 1, tzinfo=UTC)
    old = [record(T0 + i * 600, request_id=f"o{i}") for i in range(57)]  # March: past 30 days
    new = [record(now.timestamp() - i, request_id=f"n{i}") for i in range(5)]
    await write_calls(pool, old + new)
    pruned = await prune(pool, 30, now=now, batch_size=4)
    assert pruned.calls == 57
    assert await counts(pool) == (5, 5)


async def test_one_pruner_at_a_time(pool: asyncpg.Pool, database_url: str) -> None:
    await write_calls(pool, [record(T0)])
    later = ts(T0 + 3 * 86400)
    other = await asyncpg.connect(database_url)
    try:
        async with other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock($1)", PRUNE_LOCK_ID)
            busy = await prune(pool, 1, now=later)
        assert busy.skipped and busy.calls == 0
        assert await counts(pool) == (1, 1)
    finally:
        await other.close()
    done = await prune(pool, 1, now=later)
    assert (done.calls, done.hourly, done.skipped) == (1, 1, False)


async def test_the_retention_task_prunes_at_start_and_stops(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC).timestamp()
    await write_calls(pool, [record(now - 400 * 86400), record(now)])
    task = RetentionTask(pool, 30, interval=3600)
    task.start()
    try:
        last = await wait_until(lambda: task.last, message="the first round never ran")
    finally:
        await task.stop()
    assert (last.calls, last.hourly) == (1, 1)
    assert await counts(pool) == (1, 1)


async def test_the_retention_task_survives_a_failed_round(pool: asyncpg.Pool) -> None:
    task = RetentionTask(pool, 30, interval=3600)
    await pool.execute("ALTER TABLE calls RENAME TO calls_away")
    assert await task.prune_once() is None  # logged, not raised
    await pool.execute("ALTER TABLE calls_away RENAME TO calls")
    assert await task.prune_once() is not None


# --- pages of raw records ---


async def test_calls_page_newest_first_with_filters(pool: asyncpg.Pool) -> None:
    records = random_records(230, seed=10)
    await write_calls(pool, records)
    await write_calls(pool, [r._replace(workspace_id="w2") for r in records[:20]])
    seen: list[dict[str, Any]] = []
    before = None
    while True:
        page, before = await calls(pool, Scope("w1"), before=before, limit=100)
        seen += page
        if before is None:
            break
        assert len(page) == 100
    assert [c["request_id"] for c in seen] == [r.request_id for r in reversed(records)]
    assert [c["id"] for c in seen] == sorted((c["id"] for c in seen), reverse=True)
    first = seen[-1]
    assert set(first) == {"id", *CALL_COLUMNS}
    assert first["time"] == ts(records[0].time).isoformat().replace("+00:00", "Z")

    exact, nxt = await calls(pool, Scope("w1", key_id="kB1", status=403), before=None, limit=500)
    wanted = [r for r in records if r.key_id == "kB1" and r.status == 403]
    assert [c["request_id"] for c in exact] == [r.request_id for r in reversed(wanted)]
    assert nxt is None
    tools, _ = await calls(pool, Scope("w1", user_id="uA", tool="search"), before=None, limit=500)
    assert len(tools) == sum(1 for r in records if r.user_id == "uA" and r.tool == "search")
    full, nxt = await calls(pool, Scope("w2"), before=None, limit=20)
    assert len(full) == 20 and nxt is None  # a full last page says there is no more
