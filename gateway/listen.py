"""Listening sockets with a connection cap, and the file-descriptor budget they live within.

aiohttp's runners accept every connection the kernel hands them; at the process's
file-descriptor limit, accept() fails, the planes stop answering, and the upstreams and the
database can no longer be reached either. So each plane listens through `listen()`, which
hands accepted connections to the runner's server (`runner.server`, aiohttp's public protocol
factory) while the plane holds fewer than its cap, and answers the rest `503` and closes them
at once. At start the soft RLIMIT_NOFILE is raised to the hard limit, and the data plane's cap
is lowered if the limit could not hold it together with an upstream connection per client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Address

log = logging.getLogger("keystile")

# Descriptors kept for everything that is not a client connection: the database pool and
# listener, the admin plane, log files, the embedded PostgreSQL's pipes.
_RESERVED_FDS = 128
_ANY_LIMIT = 1 << 20  # what "unlimited" is taken to mean
_BACKLOG = 1024

_BUSY_BODY = json.dumps(
    {"error": "busy", "message": "Too many open connections; retry shortly."}
).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
    % (len(_BUSY_BODY), _BUSY_BODY)
)


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ANY_LIMIT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return _ANY_LIMIT if soft == resource.RLIM_INFINITY else soft


def connection_budget(configured: int, other_connections: int, open_files: int) -> int:
    """The data plane's connection cap: as configured, unless the open-files limit cannot hold
    that many clients plus an upstream connection each, beside everything else."""
    fits = (open_files - _RESERVED_FDS - other_connections) // 2
    return max(16, min(configured, fits))


class _Busy(asyncio.Protocol):
    """What a connection past the cap gets: 503, then the connection closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


@dataclass(slots=True)
class Listening:
    """A plane that is listening: its runner and its socket server."""

    runner: web.BaseRunner
    server: asyncio.Server
    port: int
    refused: list[int]  # connections answered 503 at the cap (a one-item counter)
    # Started when draining begins (e.g. a timer that ends open streams before the deadline).
    on_drain: Callable[[], asyncio.Task[None]] | None = None
    _closed: bool = False

    def stop_accepting(self) -> None:
        self.server.close()

    async def close(self) -> None:
        """Stop accepting, then let the runner drain and close the open connections."""
        if self._closed:
            return
        self._closed = True
        self.server.close()
        drain = self.on_drain() if self.on_drain is not None else None
        try:
            await self.runner.cleanup()
        finally:
            if drain is not None:
                drain.cancel()


async def listen(
    runner: web.BaseRunner,
    address: Address,
    *,
    max_connections: int,
    reuse_port: bool = False,
) -> Listening:
    await runner.setup()
    handler_factory = runner.server
    assert handler_factory is not None
    refused = [0]

    def protocol() -> asyncio.Protocol:
        # The server's connection list is public (and copied): only ever read on accept.
        if len(handler_factory.connections) >= max_connections:
            refused[0] += 1
            return _Busy()
        return handler_factory()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        protocol,
        address.host,
        address.port,
        reuse_port=reuse_port or None,
        reuse_address=True,
        backlog=_BACKLOG,
    )
    sock = server.sockets[0]
    port = int(sock.getsockname()[1]) if sock.family in (socket.AF_INET, socket.AF_INET6) else 0
    return Listening(runner, server, port, refused)


class RepeatFilter(logging.Filter):
    """At most one record per message template every `interval` seconds; the next one that
    passes says how many were suppressed. For lines an outside event can repeat thousands of
    times a second (accept() out of descriptors, an upstream refusing connections)."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = self._clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self._interval:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        if len(self._last) > 1024:
            self._last.clear()
        self._last[key] = (now, 0)
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} similar suppressed)"
        return True


def install_repeat_filter(*names: str) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())
