"""The upstream HTTP/1.1 client: pooled keep-alive connections, one write per request.

A gateway's upstream call is narrow: the request line and headers are already decided, the
body is bytes or a stream, and the answer goes straight back out. So this client is an
asyncio Protocol around httptools' response parser (llhttp, in C), with no per-request
tasks, timers, cookie jars or URL objects. A request with a known body goes out in one
`write`; a streamed body is sent chunked. Reading pauses while more than `_HIGH_WATER`
bytes wait for the client, so a large answer streams with flat memory.

Timeouts belong to the caller: `on_connection` hands it the connection, whose `close()` ends
whatever awaits it with UpstreamError; a cancelled await closes the connection too. Either
way a connection is never reused mid-answer. Connecting is bounded by `connect_timeout`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from types import TracebackType
from typing import cast

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


class UpstreamError(Exception):
    """The upstream could not be reached, closed the connection, or answered malformed."""


class _Stale(UpstreamError):
    """A reused connection closed before any byte of the answer: nothing was processed."""


class Origin:
    """Where requests go: scheme, host and port, and the Host header that names them."""

    __slots__ = ("host", "host_header", "key", "port", "ssl")

    def __init__(self, scheme: str, netloc: str) -> None:
        secure = scheme == "https"
        host, port = _split_netloc(netloc, 443 if secure else 80)
        self.host = host
        self.port = port
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        self.host_header = netloc
        self.key = (scheme, netloc)


def _split_netloc(netloc: str, default_port: int) -> tuple[str, int]:
    if netloc.startswith("["):  # [v6]:port
        host, _, rest = netloc[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return netloc, default_port


class UpstreamClient:
    """A pool of keep-alive connections per origin."""

    def __init__(self, *, connect_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str], deque[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._busy: set[_Connection] = set()
        self._closed = False

    def origin(self, url: str) -> tuple[Origin, str]:
        """Split an absolute URL into its origin and the request target (path and query)."""
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        prefix = f"{scheme}://{netloc}"
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._origins[prefix] = Origin(scheme, netloc)
        return origin, slash + path if slash else "/"

    async def request(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: Body,
        on_connection: Callable[[_Connection], None] | None = None,
    ) -> UpstreamResponse:
        """Send a request and return once the answer's head has arrived. `headers` must not
        carry Host, Content-Length or Transfer-Encoding: the client writes those.
        `on_connection` learns the connection used (its `close()` ends the exchange)."""
        origin, target = self.origin(url)
        head = _request_head(method, target, origin.host_header, headers, body)
        conn = self._take_idle(origin)
        if conn is not None:
            if on_connection is not None:
                on_connection(conn)
            try:
                return await self._send(conn, method, head, body)
            except _Stale:
                if method not in _IDEMPOTENT or not isinstance(body, bytes | None):
                    raise UpstreamError("the upstream closed a kept-alive connection") from None
        conn = await self._connect(origin)
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

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        oldest_usable = time.monotonic() - IDLE_SECONDS
        while idle:
            conn = idle.pop()
            if conn.usable and conn.idle_since >= oldest_usable:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        if self._closed:
            raise UpstreamError("the client is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin.key),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                )
        except TimeoutError:
            raise UpstreamError("connecting to the upstream timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to the upstream: {exc.strerror or exc}") from None
        return conn

    def release(self, conn: _Connection) -> None:
        """Take a connection back after its answer was handled: pooled if reusable."""
        self._busy.discard(conn)
        if self._closed or not conn.reusable:
            conn.close()
            return
        now = time.monotonic()
        idle = self._idle.get(conn.origin_key)
        if idle is None:
            idle = self._idle[conn.origin_key] = deque()
        # Oldest first: close what idled too long (reuse takes the newest, so under steady
        # traffic the old ones would otherwise never be looked at) and what overflows.
        while idle and (
            idle[0].idle_since < now - IDLE_SECONDS or len(idle) >= MAX_IDLE_PER_ORIGIN
        ):
            idle.popleft().close()
        conn.idle_since = now
        idle.append(conn)

    def abort_all(self) -> None:
        """End every answer in flight: their readers see the stream end with an error."""
        for conn in list(self._busy):
            conn.close()

    async def close(self) -> None:
        self._closed = True
        self.abort_all()
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost


def _request_head(
    method: str, target: str, host: str, headers: CIMultiDict[str], body: Body
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
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


class _Connection(asyncio.Protocol):
    """One connection to an upstream and the answer in progress on it."""

    def __init__(self, origin_key: tuple[str, str]) -> None:
        self.origin_key = origin_key
        self.idle_since = 0.0
        self.complete = False
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
        self._received = False  # any byte of the current answer
        self._sent = False  # the current request went out whole
        self._head_only = False  # answering HEAD: no body follows, whatever it announces
        self._keep_alive = True
        self._reading_paused = False
        self._writing_paused = False
        self._used = False

    # -- connection state ------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self._sent
            and self._keep_alive
            and not self._head_only
            and self._error is None
            and self.usable
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(UpstreamError("the upstream connection was closed"))

    # -- the exchange ----------------------------------------------------------------------

    async def exchange(
        self, client: UpstreamClient, method: str, head: bytes, body: Body
    ) -> UpstreamResponse:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise _Stale("closed while idle")
        reused, self._used = self._used, True
        self._client = client
        self._head = self._loop.create_future()
        self._headers = []
        self._chunks.clear()
        self._buffered = 0
        self._error = None
        self.complete = self._received = self._sent = False
        self._head_only = method == "HEAD"
        if isinstance(body, bytes):
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
            self._sent = True
        elif body is None:
            transport.write(head)
            self._sent = True
        else:
            transport.write(head)
            await self._send_chunked(transport, body)
        try:
            return await self._head
        except UpstreamError:
            if reused and not self._received:
                raise _Stale("closed before answering") from None
            raise

    async def _send_chunked(self, transport: asyncio.Transport, body: AsyncIterable[bytes]) -> None:
        assert self._head is not None
        async for chunk in body:
            if self._head.done():
                return  # answered (or failed) before the upload ended: stop sending
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if self._writing_paused:
                await self._wait()
        if not self._head.done():
            transport.write(b"0\r\n\r\n")
            self._sent = True

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

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        self._wake()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None or self.complete:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._keep_alive = False
            if self._transport is not None:
                self._transport.close()
            self._fail(UpstreamError(f"malformed answer from the upstream: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost settles the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.complete and self._until_close():
            self.complete = True  # a body delimited by the connection's end
            self._wake()
            return
        self._fail(UpstreamError("the upstream closed the connection"))

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
        if self.complete:
            self._keep_alive = False  # a second answer nobody asked for: never reuse this

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self.complete:
            return  # the head of an answer nobody asked for (see on_message_begin)
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []  # informational (100 Continue, 103 Early Hints): not the answer
            return
        self._keep_alive = self._parser.should_keep_alive()
        assert self._client is not None and self._head is not None
        response = UpstreamResponse(
            self, self._client, status, self._reason, CIMultiDict(self._headers)
        )
        if self._head_only or status in _NO_BODY_STATUSES:
            self.complete = True
        if not self._head.done():
            self._head.set_result(response)
        self._wake()  # a chunked upload still going stops: the answer is here

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            return
        self.complete = True
        self._wake()
