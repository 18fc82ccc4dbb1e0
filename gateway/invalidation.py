"""Push invalidation: a dedicated LISTEN connection evicts what other processes changed.

Every admin change that can narrow access sends `NOTIFY keystile_invalidate, '<kind>:<id>'`
inside its transaction (gateway.store). Each process listens on its own connection, outside
the pool, and evicts the named key or user at once.

Fail-safe: while the connection is down, a change could be missed, so the cache is marked
untrusted (every hit is re-checked against the store) until the connection is back and
subscribed again; then the cache is cleared, since anything in it may predate a missed change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from gateway.cache import KeyCache
from gateway.metrics import Metrics
from gateway.store import INVALIDATE_CHANNEL

log = logging.getLogger("keystile.invalidation")


class InvalidationListener:
    def __init__(
        self,
        url: str,
        cache: KeyCache,
        metrics: Metrics,
        *,
        connect_timeout: float = 5.0,
        ping_interval: float = 5.0,
        retry_interval: float = 0.5,
    ) -> None:
        self._url = url
        self._cache = cache
        self._metrics = metrics
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._retry_interval = retry_interval
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.connection_pid: int | None = None  # the backend pid, for operators (and tests)

    @property
    def connected(self) -> bool:
        return self._subscribed.is_set()

    async def start(self, wait: float) -> None:
        """Start listening; wait up to `wait` seconds for the first subscription."""
        self._task = asyncio.create_task(self._run(), name="keystile-invalidation")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("invalidation listener down (%s); retrying", type(exc).__name__)
            self._lost()
            await asyncio.sleep(self._retry_interval)

    async def _listen_once(self) -> None:
        conn = await asyncpg.connect(
            self._url,
            timeout=self._connect_timeout,
            server_settings={"application_name": "keystile-listener"},
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(INVALIDATE_CHANNEL, self._on_notify)
            # Subscribed first, cleared second: a change committed from here on is delivered;
            # anything cached before may predate a change we never heard of.
            self._cache.clear()
            self._cache.trusted = True
            self.connection_pid = conn.get_server_pid()
            self._subscribed.set()
            self._metrics.listener_connects.inc()
            log.info("invalidation listener subscribed (backend pid %s)", self.connection_pid)
            await self._watch(conn, lost)
        finally:
            conn.terminate()

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone: terminated, or silent to a ping."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    await lost.wait()
            if lost.is_set() or conn.is_closed():
                return
            async with asyncio.timeout(self._connect_timeout):
                await conn.fetchval("SELECT 1")

    def _lost(self) -> None:
        if self._subscribed.is_set():
            log.warning("invalidation listener lost; cache untrusted until it is back")
        self._subscribed.clear()
        self._cache.trusted = False

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        kind, _, target = str(payload).partition(":")
        self._metrics.invalidations.inc()
        if kind == "key":
            self._cache.evict_key(target)
        elif kind == "user":
            self._cache.evict_user(target)
        else:
            self._cache.clear()
