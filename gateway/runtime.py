"""Everything one Keystile process shares between its data plane and admin plane.

Opened and closed in one place (`open_runtime`), in dependency order: pool and migrations,
then cache, key verification and the last-used writer; closed in reverse, flushing last-used
before the pool goes away.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from gateway.auth import STORE_ERRORS, Authenticator
from gateway.cache import KeyCache
from gateway.config import Settings
from gateway.db import connect_and_migrate
from gateway.invalidation import InvalidationListener
from gateway.keyring import Keyring
from gateway.keys import KeyHasher
from gateway.metrics import Metrics
from gateway.oauth.store import OAuthStore
from gateway.store import Store
from gateway.throttle import FailureThrottle, KeyRateLimiter
from gateway.usage import CallRecorder, LastUsedRecorder
from gateway.usage_store import RetentionTask, write_calls


@dataclass(slots=True)
class Runtime:
    settings: Settings
    pool: asyncpg.Pool
    store: Store
    cache: KeyCache
    keyring: Keyring
    authenticator: Authenticator
    usage: LastUsedRecorder
    metrics: Metrics
    listener: InvalidationListener
    # Failed attempts are counted per plane: a client's failures on the data plane do not
    # lock it out of the admin plane, nor the reverse.
    data_throttle: FailureThrottle
    admin_throttle: FailureThrottle
    # One budget per key across both planes.
    rate_limiter: KeyRateLimiter
    # Call records (None when usage.record_calls is off) and their retention.
    calls: CallRecorder | None
    retention: RetentionTask | None
    # The OAuth flow's store (SPEC §9); None while gateway.public_url is unset (OAuth off).
    oauth: OAuthStore | None = None

    def refresh_gauges(self) -> None:
        """Gauges that are read off the process rather than counted as things happen."""
        self.metrics.cached_keys.set(len(self.cache))
        self.metrics.listener_up.set(int(self.listener.connected))

    async def readiness(self) -> dict[str, bool]:
        """Readiness for /readyz: the store answers and the invalidation listener is up."""
        try:
            async with asyncio.timeout(1.0):
                await self.pool.fetchval("SELECT 1")
            store_ok = True
        except STORE_ERRORS:
            store_ok = False
        return {"store": store_ok, "listener": self.listener.connected}


async def _refresh_gauges_every_second(runtime: Runtime) -> None:
    # Under --workers a scrape sums every worker's gauges, so each keeps its own current.
    while True:
        runtime.refresh_gauges()
        await asyncio.sleep(1.0)


def make_hasher(settings: Settings) -> KeyHasher:
    k = settings.keys
    return KeyHasher(
        time_cost=k.argon2_time_cost,
        memory_kib=k.argon2_memory_kib,
        parallelism=k.argon2_parallelism,
    )


def make_throttle(settings: Settings) -> FailureThrottle:
    t = settings.throttle
    return FailureThrottle(
        per_client=t.failures_per_client,
        per_key=t.failures_per_key,
        window_seconds=t.window_seconds,
        max_tracked=t.max_tracked,
    )


@asynccontextmanager
async def open_runtime(settings: Settings, database_url: str) -> AsyncIterator[Runtime]:
    pool = await connect_and_migrate(database_url, settings.database)
    metrics = Metrics()
    store = Store(pool)
    oauth = OAuthStore(pool) if settings.gateway.public_url else None
    k = settings.keys
    cache = KeyCache(
        max_entries=k.cache_max_entries,
        ttl_seconds=k.cache_ttl_seconds,
        negative_max_entries=k.negative_max_entries,
        negative_ttl_seconds=k.negative_ttl_seconds,
    )
    hasher = make_hasher(settings)
    authenticator = Authenticator(
        store=store,
        cache=cache,
        hasher=hasher,
        metrics=metrics,
        verify_concurrency=k.verify_concurrency,
        tokens=oauth,  # access tokens verify only while OAuth is on
    )
    usage = LastUsedRecorder(
        store.touch_last_used,
        metrics,
        interval=settings.usage.flush_interval_seconds,
        max_pending=settings.usage.max_pending,
    )
    calls = retention = None
    if settings.usage.record_calls:
        calls = CallRecorder(
            functools.partial(write_calls, pool),
            metrics,
            interval=settings.usage.flush_interval_seconds,
            max_pending=settings.usage.max_pending_calls,
            batch=settings.usage.flush_batch_calls,
        )
        retention = RetentionTask(pool, settings.usage.retention_days)
    listener = InvalidationListener(
        str(settings.database.listen_url) or database_url,
        cache,
        metrics,
        connect_timeout=settings.database.connect_timeout,
    )
    runtime = Runtime(
        settings=settings,
        pool=pool,
        store=store,
        cache=cache,
        keyring=Keyring(store, cache, hasher),
        authenticator=authenticator,
        usage=usage,
        metrics=metrics,
        listener=listener,
        data_throttle=make_throttle(settings),
        admin_throttle=make_throttle(settings),
        rate_limiter=KeyRateLimiter(),
        calls=calls,
        retention=retention,
        oauth=oauth,
    )
    await listener.start(wait=settings.database.connect_timeout)
    usage.start()
    for started in (calls, retention):
        if started is not None:
            started.start()
    gauges = asyncio.create_task(_refresh_gauges_every_second(runtime))
    try:
        yield runtime
    finally:
        gauges.cancel()
        await listener.stop()
        await usage.stop()
        if calls is not None:
            await calls.stop()  # written before the pool goes away
        if retention is not None:
            await retention.stop()
        authenticator.close()
        await pool.close()
