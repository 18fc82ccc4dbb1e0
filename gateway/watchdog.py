"""One timer per process that ends upstream exchanges nobody should wait on any longer.

Every forwarded request is watched. When its client has gone, its response deadline has
passed or its stream has been idle too long, the watchdog closes the upstream connection:
whatever the handler awaits on it ends at once (UpstreamError), and the handler reads
`Watch.reason` to answer accordingly (499, 504, a cut stream). One timer ticking for all
requests costs the hot path nothing but a set insertion, where a timer and a cancel scope per
request cost it several microseconds. A deadline fires at most one tick late.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal, Protocol

Reason = Literal["client", "deadline", "idle"]


class Closable(Protocol):
    def close(self) -> None: ...


class ClientTransport(Protocol):
    def is_closing(self) -> bool: ...


class _HasTransport(Protocol):
    @property
    def transport(self) -> ClientTransport | None: ...


class Watch:
    """One request's watch: its client, its deadline, its idle limit, its upstream."""

    __slots__ = ("_request", "_upstream", "deadline", "idle", "last_active", "reason")

    def __init__(self, request: _HasTransport) -> None:
        self._request = request
        self._upstream: Closable | None = None
        self.deadline: float | None = None
        self.idle = 0.0
        self.last_active = 0.0
        self.reason: Reason | None = None

    def attach(self, upstream: Closable) -> None:
        """The upstream connection to close when the watch fires."""
        self._upstream = upstream
        if self.reason is not None:
            upstream.close()

    def check(self, now: float) -> Reason | None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return "client"
        if self.deadline is not None and now >= self.deadline:
            return "deadline"
        if self.idle > 0 and now - self.last_active >= self.idle:
            return "idle"
        return None

    def fire(self, reason: Reason) -> None:
        self.reason = reason
        if self._upstream is not None:
            self._upstream.close()


class Watchdog:
    """Checks every watch each `tick` seconds while any is open."""

    def __init__(self, tick: float) -> None:
        self._tick_seconds = tick
        self._watches: set[Watch] = set()
        self._timer: asyncio.TimerHandle | None = None

    # Deadlines are on the monotonic clock, whatever the event loop's own clock is.
    now = staticmethod(time.monotonic)

    def watch(self, request: _HasTransport) -> Watch:
        watch = Watch(request)
        self._watches.add(watch)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._tick_seconds, self._tick)
        return watch

    def release(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        now = time.monotonic()
        for watch in list(self._watches):
            reason = watch.check(now)
            if reason is not None:
                self._watches.discard(watch)
                watch.fire(reason)
        self._timer = None
        if self._watches:
            self._timer = asyncio.get_running_loop().call_later(self._tick_seconds, self._tick)
