"""PostgreSQL plumbing: the connection pool and versioned migrations."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.config import DatabaseSettings

log = logging.getLogger("keystile.db")

# A connection of our own or one borrowed from a pool: both run the same statements.
Connection = asyncpg.Connection | PoolConnectionProxy

# Errors that mean "the database could not be reached or went away", as opposed to an error
# in what was asked of it: the change did not happen, and retrying later may succeed.
STORE_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)

# Any constant works; it only has to be the same for every Keystile process on a database.
MIGRATION_LOCK_ID = 0x6B657973  # "keys"

_CREATE_VERSIONS = """
CREATE TABLE IF NOT EXISTS keystile_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped in gateway/migrations, ordered by their numeric prefix."""
    found = []
    for entry in resources.files("gateway.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: Connection) -> list[int]:
    """Apply pending migrations under an advisory lock; return the versions applied here.

    The lock is taken before anything else, so processes starting together on an empty
    database queue up instead of racing to create the same tables.
    """
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(_CREATE_VERSIONS)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM keystile_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO keystile_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("applied migration %04d %s", migration.version, migration.name)
            applied.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied


async def create_pool(url: str, settings: DatabaseSettings) -> asyncpg.Pool:
    """A pool whose connections give up quickly, so an outage turns into 503s, not hangs."""
    # The time limit is enforced by the driver (it cancels the query), not by a
    # statement_timeout startup parameter, which transaction-mode PgBouncer refuses.
    server_settings = {"application_name": "keystile"}
    pool = await asyncpg.create_pool(
        url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.connect_timeout,
        command_timeout=settings.statement_timeout or None,
        # Prepared statements live in a server session; a transaction-mode pooler hands each
        # transaction a different one, so the cache must be off there (size 0).
        statement_cache_size=settings.statement_cache_size,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool


async def connect_and_migrate(url: str, settings: DatabaseSettings) -> asyncpg.Pool:
    """Migrate over a direct session, then open the pool.

    The advisory lock is a session lock held across several transactions: behind a
    transaction-mode pooler it must go over `database.listen_url` (direct), like LISTEN.
    """
    direct = await asyncpg.connect(
        str(settings.listen_url) or url,
        timeout=settings.connect_timeout,
        statement_cache_size=settings.statement_cache_size,
    )
    try:
        await migrate(direct)
    finally:
        await direct.close()
    return await create_pool(url, settings)
