"""Last-used write-behind: the request path records into a dict, a task writes batches.

A failed write keeps its batch (merged with newer entries) for the next attempt, so an outage
delays last-used updates instead of losing them. Past `max_pending` distinct keys the oldest
entries are dropped and counted in metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from gateway.metrics import Metrics
from gateway.store import Store

log = logging.getLogger("keystile.usage")


class LastUsedRecorder:
    def __init__(
        self, store: Store, metrics: Metrics, *, interval: float, max_pending: int
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._interval = interval
        self._max_pending = max_pending
        self._pending: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def record(self, key_id: str, when: datetime | None = None) -> None:
        """Called on the request path: O(1), never waits."""
        pending = self._pending
        if key_id not in pending and len(pending) >= self._max_pending:
            del pending[next(iter(pending))]  # oldest first: dicts keep insertion order
            self._metrics.last_used_dropped += 1
        pending[key_id] = when or datetime.now(UTC)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keystile-last-used")

    async def stop(self) -> None:
        """Stop the periodic task and write what is pending (graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> bool:
        """Write pending entries; on failure put them back and return False."""
        async with self._lock:
            if not self._pending:
                return True
            batch, self._pending = self._pending, {}
            try:
                await self._store.touch_last_used(batch)
            except Exception as exc:
                self._restore(batch)
                self._metrics.last_used_flush_failures += 1
                log.warning("last-used flush failed (%s); %d kept", type(exc).__name__, len(batch))
                return False
            finally:
                self._metrics.last_used_pending = len(self._pending)
            self._metrics.last_used_flushes += 1
            return True

    def _restore(self, batch: dict[str, datetime]) -> None:
        # Newer timestamps recorded during the failed write win; the batch goes first (older).
        merged = dict(batch)
        for key_id, when in self._pending.items():
            merged.pop(key_id, None)
            merged[key_id] = when
        while len(merged) > self._max_pending:
            del merged[next(iter(merged))]
            self._metrics.last_used_dropped += 1
        self._pending = merged

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
