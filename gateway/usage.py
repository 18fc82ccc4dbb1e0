"""Write-behind: the request path records into a bounded buffer, a task writes it in batches.

One abstraction serves both things Keystile writes behind the request path: last-used times
(a dict: a key's latest use wins) and call records (a queue, written with COPY). A failed write
puts its batch back in front of what arrived since, so an outage delays writes instead of
losing them; past the buffer's bound the oldest entries are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Generic, Protocol, TypeVar

from gateway.calls import CallRecord
from gateway.metrics import Metrics

log = logging.getLogger("keystile.usage")

B = TypeVar("B")


class Buffer(Protocol[B]):
    def __len__(self) -> int: ...

    def take(self) -> B:
        """Everything pending, leaving the buffer empty."""
        ...

    def restore(self, batch: B) -> int:
        """Put a batch that could not be written back, older than what arrived since;
        return how many entries were dropped to stay within bounds."""
        ...


class Stats(Protocol):
    def written(self, name: str) -> None: ...

    def failed(self, name: str) -> None: ...

    def dropped(self, name: str, count: int) -> None: ...

    def pending(self, name: str, count: int) -> None: ...


class WriteBehind(Generic[B]):
    def __init__(
        self,
        name: str,
        buffer: Buffer[B],
        write: Callable[[B], Awaitable[None]],
        stats: Stats,
        *,
        interval: float,
    ) -> None:
        self.name = name
        self.buffer = buffer
        self._write = write
        self._stats = stats
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._due: asyncio.Future[None] | None = None  # set: the wait for the next write

    @property
    def pending(self) -> int:
        return len(self.buffer)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"keystile-{self.name}")

    async def stop(self) -> None:
        """Stop the periodic task and write what is pending (graceful shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> bool:
        """Write what is pending; on failure put it back and return False."""
        async with self._lock:
            if not len(self.buffer):
                return True
            batch = self.buffer.take()
            try:
                await self._write(batch)
            except Exception as exc:
                dropped = self.buffer.restore(batch)
                if dropped:
                    self._stats.dropped(self.name, dropped)
                self._stats.failed(self.name)
                log.warning(
                    "%s flush failed (%s); %d kept", self.name, type(exc).__name__, self.pending
                )
                return False
            finally:
                self._stats.pending(self.name, len(self.buffer))
            self._stats.written(self.name)
            return True

    def wake(self) -> None:
        """Write now rather than at the end of the interval (a batch is full)."""
        due = self._due
        if due is not None and not due.done():
            due.set_result(None)

    def _full(self) -> bool:
        """Whether a batch waits already (then the next write starts at once)."""
        return False

    async def _run(self) -> None:
        failed = False
        while True:
            # A full batch goes at once; after a failed write the next try waits for the
            # interval (an outage is not retried in a tight loop).
            if failed or not self._full():
                await self._due_or_woken()
            failed = not await self.flush()

    async def _due_or_woken(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = due = loop.create_future()
        timer = loop.call_later(self._interval, _settle, due)
        try:
            await due
        finally:
            self._due = None
            timer.cancel()


def _settle(due: asyncio.Future[None]) -> None:
    if not due.done():
        due.set_result(None)


class LastUsedBuffer:
    """key id -> its latest use. Oldest keys go first when the bound is reached."""

    def __init__(self, max_pending: int, on_drop: Callable[[int], None]) -> None:
        self._max = max_pending
        self._on_drop = on_drop
        self._pending: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key_id: str, when: datetime) -> None:
        pending = self._pending
        if key_id not in pending and len(pending) >= self._max:
            del pending[next(iter(pending))]  # oldest first: dicts keep insertion order
            self._on_drop(1)
        pending[key_id] = when

    def take(self) -> dict[str, datetime]:
        batch, self._pending = self._pending, {}
        return batch

    def restore(self, batch: dict[str, datetime]) -> int:
        # Newer timestamps recorded during the failed write win; the batch goes first (older).
        merged = dict(batch)
        for key_id, when in self._pending.items():
            merged.pop(key_id, None)
            merged[key_id] = when
        dropped = 0
        while len(merged) > self._max:
            del merged[next(iter(merged))]
            dropped += 1
        self._pending = merged
        return dropped


class CallBuffer:
    """Call records in arrival order. Oldest go first when the bound is reached; `on_batch`
    is called when `batch` records wait."""

    def __init__(
        self,
        max_pending: int,
        on_drop: Callable[[int], None],
        batch: int | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self._records: deque[CallRecord] = deque()
        self._max = max_pending
        self._on_drop = on_drop
        self.batch = batch or max_pending
        self._on_batch = on_batch

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: CallRecord) -> None:
        records = self._records
        waiting = len(records)
        if waiting >= self._max:
            records.popleft()
            self._on_drop(1)
        elif waiting + 1 == self.batch and self._on_batch is not None:
            self._on_batch()
        records.append(record)

    def take(self) -> list[CallRecord]:
        batch = list(self._records)
        self._records.clear()
        return batch

    def restore(self, batch: list[CallRecord]) -> int:
        newer = self._records
        keep = max(0, self._max - len(newer))
        dropped = max(0, len(batch) - keep)
        self._records = deque(batch[dropped:])
        self._records.extend(newer)
        return dropped


class MetricsStats:
    """Write-behind outcomes into the process metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def written(self, name: str) -> None:
        self._metrics.write_behind(name, "written")

    def failed(self, name: str) -> None:
        self._metrics.write_behind(name, "failed")

    def dropped(self, name: str, count: int) -> None:
        self._metrics.write_behind(name, "dropped", count)

    def pending(self, name: str, count: int) -> None:
        self._metrics.write_behind_pending(name, count)


class LastUsedRecorder(WriteBehind[dict[str, datetime]]):
    """last_used_at, written behind the request path (one UPDATE per batch)."""

    def __init__(
        self,
        write: Callable[[dict[str, datetime]], Awaitable[None]],
        metrics: Metrics,
        *,
        interval: float,
        max_pending: int,
    ) -> None:
        stats = MetricsStats(metrics)
        buffer = LastUsedBuffer(max_pending, lambda n: stats.dropped("last_used", n))
        super().__init__("last_used", buffer, write, stats, interval=interval)
        self._buffer = buffer

    def record(self, key_id: str, when: datetime | None = None) -> None:
        """Called on the request path: O(1), never waits."""
        self._buffer.add(key_id, when or datetime.now(UTC))


class CallRecorder(WriteBehind[list[CallRecord]]):
    """Call records, written behind the request path (COPY per batch): every interval, and
    as soon as `batch` records wait. Under load, small batches written often cost the
    process less than large ones written seldom (bench/RESULTS.md: about 5 % of the hot
    path's CPU, between batches of 500 and of 2 seconds' traffic)."""

    def __init__(
        self,
        write: Callable[[list[CallRecord]], Awaitable[None]],
        metrics: Metrics,
        *,
        interval: float,
        max_pending: int,
        batch: int | None = None,
    ) -> None:
        stats = MetricsStats(metrics)
        self._buffer = buffer = CallBuffer(
            max_pending, lambda n: stats.dropped("calls", n), batch, self.wake
        )
        super().__init__("calls", buffer, write, stats, interval=interval)
        self.record = buffer.add  # the request path's one call: O(1), never waits

    def _full(self) -> bool:
        return len(self._buffer) >= self._buffer.batch
