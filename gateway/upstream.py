"""The upstream HTTP/1.1 client: pooled keep-alive connections, one write per request.

A gateway's upstream call is narrow: the request line and headers are already decided, the
body is bytes or a stream, and the answer goes straight back out. So this client is an
asyncio Protocol around httptools' response parser (llhttp, in C), with no per-request
tasks, timers, cookie jars or URL objects. A request with a known body goes out in one
`write`; a streamed body is sent chunked. Reading pauses while more than `_HIGH_WATER`
bytes wait for the client, so a large answer streams with flat memory.

Timeouts belong to the caller: `on_connection` hands it the connection, whose `close()` ends
whatever awaits it with UpstreamError; a cancelled await closes the connection too. Either
way a connection is never reused mid-answer: it goes back to the pool only once its answer
was read to the end. Connecting is bounded by `connect_timeout`. With `max_per_origin`, a
request that would open one connection too many to its origin waits in line for one; while it
waits, `on_connection` hands the caller its place in line, whose `close()` gives it up.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from time import monotonic
from types import TracebackType
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# A pooled connection idle this long is closed rather than reused: upstream servers drop idle
# keep-alive connections on their own schedule (uvicorn after 5 s, aiohttp after 75 s), and a
# request sent at that moment would fail.
IDLE_SECONDS = 4.0
MAX_IDLE_PER_ORIGIN = 256
# Safe to send again on a fresh connection when a reused one turns out to be closed.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_NO_BODY_STATUSES = frozenset({204, 304})

Body = bytes | AsyncIterable[bytes] | None
# A request's headers, in the order they are written (a multidict's .items() will do).
Headers = Iterable[tuple[str, str]]


class UpstreamError(Exception):
    """The upstream could not be reached, closed the connection, or answered malformed."""


class _Stale(UpstreamError):
    """A reused connection closed before any byte of the answer: nothing was processed."""


class Closable(Protocol):
    """What `on_connection` receives: a connection, or a place in line for one."""

    def close(self) -> None: ...


class Origin:
    """Where requests go: scheme, host and port, and the Host header that names them."""

    __slots__ = ("host", "host_header", "port", "ssl")

    def __init__(self, scheme: str, netloc: str) -> None:
        secure = scheme == "https"
        host, port = _split_netloc(netloc, 443 if secure else 80)
        self.host = host
        self.port = port
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        self.host_header = netloc


def _split_netloc(netloc: str, default_port: int) -> tuple[str, int]:
    if netloc.startswith("["):  # [v6]:port
        host, _, rest = netloc[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return netloc, default_port


class _Pool:
    """One origin's connections: the idle ones, how many are open, who waits for one."""

    __slots__ = ("idle", "open", "origin", "waiters")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.idle: deque[_Connection] = deque()
        self.open = 0  # idle, busy and connecting
        self.waiters: deque[_Turn] = deque()

    def slot_freed(self) -> None:
        """A connection closed (or never opened): the first in line may open one instead."""
        while self.waiters:
            if self.waiters.popleft().serve(None):
                return  # the slot passes to it: the count stays
        self.open -= 1

    def fail_waiters(self, error: UpstreamError) -> None:
        waiters = list(self.waiters)
        self.waiters.clear()
        for turn in waiters:
            turn.fail(error)


class _Turn:
    """A request's place in line for a connection to an origin at its limit. It is served a
    pooled connection, or None: a slot to open a new one with. `close()` gives it up."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()

    def serve(self, conn: _Connection | None) -> bool:
        if self.future.done():
            return False
        self.future.set_result(conn)
        return True

    def fail(self, error: UpstreamError) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def close(self) -> None:
        self.fail(UpstreamError("gave up waiting for a connection to the upstream"))

    @property
    def served(self) -> bool:
        future = self.future
        return future.done() and not future.cancelled() and future.exception() is None


class UpstreamClient:
    """A pool of keep-alive connections per origin, at most `max_per_origin` open to each."""

    def __init__(self, *, connect_timeout: float, max_per_origin: int | None = None) -> None:
        self._connect_timeout = connect_timeout
        self._max_per_origin = sys.maxsize if max_per_origin is None else max_per_origin
        self._pools: dict[str, _Pool] = {}
        self._busy: set[_Connection] = set()
        self._closed = False

    def _pool(self, url: str) -> tuple[_Pool, str]:
        """The pool of an absolute URL's origin, and the request target (path and query)."""
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        prefix = f"{scheme}://{netloc}"
        pool = self._pools.get(prefix)
        if pool is None:
            pool = self._pools[prefix] = _Pool(Origin(scheme, netloc))
        return pool, slash + path if slash else "/"

    async def request(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        on_connection: Callable[[Closable], None] | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the answer's head has arrived. `headers` must not
        carry Host, Content-Length or Transfer-Encoding: the client writes those.
        `on_connection` learns the connection used, or the place in line while the origin
        has all the connections it may have (either's `close()` ends the exchange)."""
        pool, target = self._pool(url)
        head = _request_head(method, target, pool.origin.host_header, headers, body)
        conn = self._take_idle(pool)
        if conn is None:
            conn = await self._open(pool, on_connection)
        if on_connection is not None:
            on_connection(conn)
        try:
            return await self._send(conn, method, head, body)
        except _Stale:
            if method not in _IDEMPOTENT or not isinstance(body, bytes | None):
                raise UpstreamError("the upstream closed a kept-alive connection") from None
        conn = await self._open(pool, on_connection)
        if on_connection is not None:
            on_connection(conn)
        return await self._send(conn, method, head, body)

    async def _send(
        self, conn: _Connection, method: str, head: bytes, body: Body
    ) -> UpstreamResponse:
        self._busy.add(conn)
        try:
            return await conn.exchange(self, method, head, body)
        except BaseException:
            self._busy.discard(conn)
            conn.close()
            raise

    def _take_idle(self, pool: _Pool) -> _Connection | None:
        idle = pool.idle
        if not idle:
            return None
        oldest_usable = monotonic() - IDLE_SECONDS
        while idle:
            conn = idle.pop()
            if conn.usable and conn.idle_since >= oldest_usable:
                return conn
            conn.close()
        return None

    async def _open(
        self, pool: _Pool, on_connection: Callable[[Closable], None] | None
    ) -> _Connection:
        """A new connection or, when the origin has all it may have, the first to be
        released (a pooled one, or a new one opened in place of one that closed)."""
        while True:
            if self._closed:
                raise UpstreamError("the client is closed")
            if pool.open < self._max_per_origin:
                pool.open += 1
                return await self._connect(pool)
            conn = await self._wait_turn(pool, on_connection)
            if conn is None:
                return await self._connect(pool)  # the slot of one that closed
            if conn.usable:
                return conn
            # It closed between being handed over and now, and its slot moved on: wait again.

    async def _wait_turn(
        self, pool: _Pool, on_connection: Callable[[Closable], None] | None
    ) -> _Connection | None:
        turn = _Turn()
        pool.waiters.append(turn)
        if on_connection is not None:
            on_connection(turn)  # the caller's deadline, or its client leaving, ends the wait
        try:
            conn = await turn.future
        except BaseException:
            if turn.served:  # served, then cancelled before it could run: pass it on
                self._pass_on(pool, turn.future.result())
            elif turn in pool.waiters:
                pool.waiters.remove(turn)
            raise
        if self._closed:
            self._pass_on(pool, conn)
            raise UpstreamError("the client is closed")
        return conn

    def _pass_on(self, pool: _Pool, conn: _Connection | None) -> None:
        """Give back what a waiter was served and cannot use."""
        if conn is None:
            pool.slot_freed()
        elif self._closed:
            conn.close()
        else:
            self._park(conn)

    async def _connect(self, pool: _Pool) -> _Connection:
        """Open a connection in a slot already counted; a failure frees the slot."""
        origin = pool.origin
        conn = _Connection(pool)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, origin.host, origin.port, ssl=origin.ssl
                )
        except BaseException as exc:
            conn.close()  # frees the slot, once, whatever the connection got to
            if isinstance(exc, TimeoutError):
                raise UpstreamError("connecting to the upstream timed out") from None
            if isinstance(exc, OSError):
                raise UpstreamError(
                    f"cannot connect to the upstream: {exc.strerror or exc}"
                ) from None
            raise
        return conn

    def release(self, conn: _Connection) -> None:
        """Take a connection back after its answer was handled: pooled only if the answer
        was read to the end and nothing else arrived, else closed."""
        self._busy.discard(conn)
        if self._closed:
            conn.close()
        elif conn.finish():
            self._park(conn)

    def _park(self, conn: _Connection) -> None:
        """A connection ready for another exchange: to the first in line, else the pool."""
        pool = conn.pool
        while pool.waiters:
            if pool.waiters.popleft().serve(conn):
                return
        now = monotonic()
        idle = pool.idle
        # Oldest first: close what idled too long (reuse takes the newest, so under steady
        # traffic the old ones would otherwise never be looked at) and what overflows.
        while idle and (
            idle[0].idle_since < now - IDLE_SECONDS or len(idle) >= MAX_IDLE_PER_ORIGIN
        ):
            idle.popleft().close()
        conn.idle_since = now
        idle.append(conn)

    def abort_all(self) -> None:
        """End every answer in flight, and every wait for a connection: their readers see
        the stream end with an error."""
        self._abort(UpstreamError("the upstream exchange was aborted"))

    def _abort(self, error: UpstreamError) -> None:
        for pool in self._pools.values():
            pool.fail_waiters(error)
        for conn in list(self._busy):
            conn.close()

    async def close(self) -> None:
        self._closed = True
        self._abort(UpstreamError("the client is closed"))
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()
        await asyncio.sleep(0)  # let the transports run connection_lost


def _request_head(method: str, target: str, host: str, headers: Headers, body: Body) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    elif body is None:
        lines.append("\r\n")
    else:
        lines.append("Transfer-Encoding: chunked\r\n\r\n")
    # surrogateescape: header bytes aiohttp could not decode go out exactly as they came in.
    return "".join(lines).encode("utf-8", "surrogateescape")


class UpstreamResponse:
    """An answer's head, and its body to read once (whole, or as it arrives)."""

    __slots__ = ("_client", "_conn", "content_length", "headers", "reason", "status")

    def __init__(
        self,
        conn: _Connection,
        client: UpstreamClient,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._conn = conn
        self._client = client

    @property
    def complete(self) -> bool:
        """The whole body has arrived (reading it will not wait)."""
        return self._conn.complete

    async def read(self) -> bytes:
        if self._conn.complete:
            return self._conn.take_all()
        chunks = [chunk async for chunk in self.iter_chunks()]
        return b"".join(chunks)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            chunk = conn.next_chunk()
            if chunk:
                yield chunk
            elif conn.complete:
                return
            else:
                await conn.body_arrival()

    def close(self) -> None:
        """Abandon the answer: the connection is closed, its reader ends with an error."""
        self._conn.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client.release(self._conn)


class _State(enum.Enum):
    """Where a connection stands. Only an IDLE one is pooled or handed to a waiter."""

    IDLE = enum.auto()  # no exchange: new, or pooled between two
    WAITING = enum.auto()  # a request is (being) sent; no byte of its answer yet
    ANSWERING = enum.auto()  # the answer is arriving
    COMPLETE = enum.auto()  # the whole answer has arrived, maybe not all of it read yet
    # Never used again. An answer that was complete stays readable (no _error is set).
    CLOSED = enum.auto()


class _Connection(asyncio.Protocol):
    """One connection to an upstream and the answer in progress on it."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool  # counts this connection among its open ones until it closes
        self.idle_since = 0.0
        self._state = _State.IDLE
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._client: UpstreamClient | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers: list[tuple[str, str]] = []
        self._reason = ""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._exchanges = 0
        self._head_only = False  # answering HEAD: no body follows, whatever it announces
        # The connection may carry another exchange once this answer is read: keep-alive,
        # the request went out whole, and the parser is in step with the stream.
        self._keep = True
        self._reading_paused = False
        self._writing_paused = False

    # -- connection state ------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Idle, and the upstream has not closed it."""
        transport = self._transport
        return self._state is _State.IDLE and transport is not None and not transport.is_closing()

    @property
    def complete(self) -> bool:
        state = self._state
        return state is _State.COMPLETE or (state is _State.CLOSED and self._error is None)

    def finish(self) -> bool:
        """The consumer is done with the answer. True: the connection is idle again, ready
        for another exchange. False: it was closed, since the answer was not read to the
        end (bytes of it buffered, or reading paused with more in the socket), or the
        connection cannot carry another exchange."""
        transport = self._transport
        if (
            self._state is _State.COMPLETE
            and self._keep
            and not self._chunks
            and not self._reading_paused
            and transport is not None
            and not transport.is_closing()
        ):
            self._state = _State.IDLE
            return True
        self.close()
        return False

    def close(self) -> None:
        self._retire(UpstreamError("the upstream connection was closed"))

    def _retire(self, error: UpstreamError) -> None:
        """Close for good: what awaits an answer fails with `error`, the pool's slot frees."""
        state = self._state
        if state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        transport = self._transport
        if transport is not None:
            if state is _State.IDLE:
                transport.close()
            else:
                # Mid-exchange there may be request bytes the upstream will never read, or
                # answer bytes nobody will: close() would wait to flush them, abort() does not.
                transport.abort()
        if state is not _State.COMPLETE:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()
        self.pool.slot_freed()

    # -- the exchange ----------------------------------------------------------------------

    async def exchange(
        self, client: UpstreamClient, method: str, head: bytes, body: Body
    ) -> UpstreamResponse:
        transport = self._transport
        if transport is None or transport.is_closing() or self._state is not _State.IDLE:
            raise _Stale("closed while idle")
        self._exchanges += 1
        self._state = _State.WAITING
        self._client = client
        self._head = self._loop.create_future()
        self._headers = []
        self._error = None
        self._head_only = method == "HEAD"
        # After HEAD the parser would take the next answer for the body this one announced.
        self._keep = not self._head_only
        if isinstance(body, bytes):
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
        elif body is None:
            transport.write(head)
        else:
            transport.write(head)
            await self._send_chunked(transport, body)
        return await self._head

    async def _send_chunked(self, transport: asyncio.Transport, body: AsyncIterable[bytes]) -> None:
        assert self._head is not None
        async for chunk in body:
            if self._head.done():
                self._keep = False  # answered (or failed) before the upload ended: stop
                return
            if not chunk:
                continue  # an empty chunk would be the terminating one
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if self._writing_paused:
                await self._wait()
        if self._head.done():
            self._keep = False
        else:
            transport.write(b"0\r\n\r\n")

    async def body_arrival(self) -> None:
        if self._error is not None:
            raise self._error
        await self._wait()
        if self._error is not None and not self._chunks:
            raise self._error

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take_all(self) -> bytes:
        """Everything received and not yet taken (the whole body once complete)."""
        chunks = self._chunks
        body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self._resume_when_drained()
        return body

    def next_chunk(self) -> bytes | None:
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self._resume_when_drained()
        return chunk

    def _resume_when_drained(self) -> None:
        if self._reading_paused and self._buffered <= _LOW_WATER and self._transport:
            self._reading_paused = False
            self._transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _State.WAITING:
            self._state = _State.ANSWERING
        elif state is not _State.ANSWERING:
            # Idle, or past the end of the answer: bytes nobody asked for. The connection
            # cannot be trusted; an answer already complete stays readable.
            self._retire(UpstreamError("the upstream sent bytes nobody asked for"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops at a 101 and hands the rest of the stream over: nothing we speak.
            self._retire(UpstreamError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._retire(UpstreamError(f"malformed answer from the upstream: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        state = self._state
        if state is _State.ANSWERING and self._until_close():
            self._state = _State.COMPLETE  # a body delimited by the connection's end
        if state is _State.WAITING and self._exchanges > 1:
            # The upstream dropped a kept-alive connection as the request went out.
            self._retire(_Stale("the upstream closed the connection before answering"))
        else:
            self._retire(UpstreamError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def _until_close(self) -> bool:
        head = self._head
        if head is None or not head.done() or head.cancelled() or head.exception() is not None:
            return False
        response = head.result()
        return (
            response.content_length is None
            and "chunked" not in response.headers.get("Transfer-Encoding", "").lower()
        )

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state is _State.COMPLETE:
            # A second answer in the same read as the first: nobody asked for it.
            self._retire(UpstreamError("the upstream sent an answer nobody asked for"))

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._state is not _State.ANSWERING:
            return  # the head of an answer nobody asked for (see on_message_begin)
        status = self._parser.get_status_code()
        if status == 101:
            # Switching protocols: never asked for, and past it the stream is not HTTP.
            self._retire(UpstreamError("the upstream switched protocols"))
            return
        if 100 <= status < 200:
            self._headers = []  # informational (100 Continue, 103 Early Hints): not the answer
            return
        if not self._parser.should_keep_alive():
            self._keep = False
        assert self._client is not None and self._head is not None
        response = UpstreamResponse(
            self, self._client, status, self._reason, CIMultiDict(self._headers)
        )
        if self._head_only or status in _NO_BODY_STATUSES:
            self._state = _State.COMPLETE
        if not self._head.done():
            self._head.set_result(response)
        self._wake()  # a chunked upload still going stops: the answer is here

    def on_body(self, body: bytes) -> None:
        if self._state is not _State.ANSWERING:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._state is not _State.ANSWERING or self._parser.get_status_code() < 200:
            return
        self._state = _State.COMPLETE
        self._wake()
