"""Streaming a request to an upstream and its answer back.

Bodies are streamed both ways; SSE events are written to the client as they arrive. Waiting
for the upstream's response headers is bounded (504 past `response_timeout`); once the answer
streams, only an optional idle timeout applies. After the first byte of a response is out, an
upstream failure can no longer become an error page: the client connection is cut instead,
so a truncated body is never mistaken for a complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Protocol

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from gateway.config import GatewaySettings
from gateway.cors import is_cors_header
from gateway.errors import ApiError
from gateway.headers import (
    TrustedProxies,
    downstream_response_headers,
    upstream_request_headers,
    without,
)
from gateway.metrics import Metrics
from gateway.transform import BodyCheck, BodyTransform, StreamRefused, TransformFactory
from gateway.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from gateway.watchdog import Watch, Watchdog

log = logging.getLogger("keystile.proxy")

# Bodies up to this size are already in the read buffer; reading them at once saves a
# chunked-transfer round of small writes. Anything larger is streamed chunk by chunk.
_SMALL_BODY = 64 * 1024
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    pass


class ClientGone(Exception):
    """The client went away while its request body was being read."""


class Observed(Protocol):
    """Where the caller learns what the forwarder read of the request."""

    bytes_in: int
    body: bytes | None


def upstream_timeout() -> ApiError:
    return ApiError(504, "upstream_timeout", "The upstream did not answer in time.")


def body_timeout() -> ApiError:
    return ApiError(408, "request_timeout", "The request body stalled; the upload was dropped.")


def too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"The request body exceeds {limit} bytes.")


class Forwarder:
    def __init__(self, settings: GatewaySettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.client: UpstreamClient | None = None
        self._watchdog = Watchdog(_tick_for(settings))
        self._streams: set[UpstreamResponse] = set()
        self._ending = False

    async def open(self) -> None:
        self.client = UpstreamClient(
            connect_timeout=self._settings.connect_timeout,
            max_per_origin=self._settings.upstream_max_connections,
        )

    def end_streams(self) -> None:
        """Shutdown deadline: end every response still streaming, cleanly for the client."""
        self._ending = True
        for upstream in list(self._streams):
            upstream.close()

    async def close(self) -> None:
        self._watchdog.close()
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def forward(
        self,
        request: web.BaseRequest,
        url: str,
        *,
        identity: Sequence[tuple[str, str]],
        extra_headers: Mapping[str, str],
        transform: TransformFactory | None = None,
        body_check: BodyCheck | None = None,
        plain_answer: bool = False,
        response_headers: Mapping[str, str] | None = None,
        label: str = "",
        observed: Observed | None = None,
        own_cors: bool = False,
    ) -> web.StreamResponse:
        """Forward `request` to `url` (`label`: the configured server, for metrics;
        `observed` learns the request body's size, and the body if it was at most 64 KiB;
        `own_cors`: the upstream's Access-Control-* headers give way to the gateway's).

        `body_check`, if given, judges a POST body (read whole) before anything goes upstream;
        `transform`, if given, may rewrite the answer's body (see gateway.transform);
        `plain_answer` asks the upstream for an unencoded answer, for a transform that must
        read every answer."""
        limit = self._settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise too_large(limit)
        headers = upstream_request_headers(
            request.headers,
            client_ip=request.remote or "",
            scheme=request.scheme,
            host=request.host,
            trusted_client=self.trusted.is_trusted(request.remote),
            identity=identity,
            extra=extra_headers,
        )
        if plain_answer:
            headers = without(headers, "Accept-Encoding")
            headers.append(("Accept-Encoding", "identity"))
        data: bytes | LimitedBody | None
        try:
            if body_check is not None and request.method == "POST":
                data = await self._whole_body(request, length, min(limit, body_check.limit))
                denial = body_check.check(request.headers, data)
                if denial is not None:
                    return denial
            else:
                keep = _SMALL_BODY if observed is not None else 0
                data = await self._request_body(request, length, limit, keep)
        except ClientGone:
            return _client_gone()
        if observed is not None and isinstance(data, bytes):
            observed.body, observed.bytes_in = data, len(data)
        watch = self._watchdog.watch(request)
        try:
            sent = time.monotonic()
            upstream = await self._send(request, url, headers, data, watch)
            # (Not isinstance(upstream, web.StreamResponse): an abstract base class's check
            # costs several times a plain class's, on every request.)
            if not isinstance(upstream, UpstreamResponse):
                return upstream
            self._metrics.upstream_headers(label, time.monotonic() - sent)
            async with upstream:
                return await self._stream_back(
                    request, upstream, transform, response_headers, watch, own_cors
                )
        finally:
            self._watchdog.release(watch)
            if observed is not None and isinstance(data, LimitedBody):
                observed.bytes_in, observed.body = data.received, data.kept

    async def _send(
        self,
        request: web.BaseRequest,
        url: str,
        headers: Sequence[tuple[str, str]],
        data: bytes | LimitedBody | None,
        watch: Watch,
    ) -> UpstreamResponse | web.StreamResponse:
        """The upstream's answer head, or the response to give instead."""
        assert self.client is not None
        # The response deadline counts from when the body is sent: a long, steady upload is
        # not the upstream being slow (a stalled one is body_timeout's business).
        if isinstance(data, LimitedBody):
            data.on_complete = lambda: self._start_deadline(watch)
        else:
            self._start_deadline(watch)
        try:
            # The path was judged raw: it goes out exactly as it came in.
            return await self.client.request(
                request.method, url, headers, data, on_connection=watch.attach
            )
        except BodyStalled:
            raise body_timeout() from None
        except ClientGone:
            return _client_gone()
        except BodyTooLarge:
            raise too_large(self._settings.max_body_bytes) from None
        except UpstreamError as exc:
            return self._failed(watch, f"upstream {_origin(url)} failed: {exc}")

    def _failed(self, watch: Watch, problem: str) -> web.Response:
        """The answer when the exchange broke before anything was sent to the client: 499
        if the client left (nobody reads it), 504 past the deadline, else 502."""
        if watch.reason == "client":
            return _client_gone()
        self._metrics.upstream_errors.inc()
        if watch.reason == "deadline":
            raise upstream_timeout()
        log.warning("%s", problem)
        raise ApiError(502, "bad_gateway", "The upstream is unreachable or failed.")

    def _start_deadline(self, watch: Watch) -> None:
        watch.deadline = self._watchdog.now() + self._settings.response_timeout

    async def _small_answer(
        self,
        upstream: UpstreamResponse,
        headers: CIMultiDict[str],
        watch: Watch,
        transform: BodyTransform | None,
    ) -> web.StreamResponse:
        """A short answer of announced length is already (or nearly) in the read buffer:
        send it in one write with its headers, instead of headers, chunk and end apart (a
        rewrite, too, sees it whole). The response deadline still runs: an upstream that
        announces a body and then stalls must not hold us."""
        try:
            body = await upstream.read()
        except UpstreamError as exc:
            return self._failed(watch, f"upstream failed mid-answer: {exc}")
        if transform is not None:
            try:
                body = transform.feed(body) + transform.flush()
            except StreamRefused as exc:  # nothing is sent yet: a clean 502
                log.warning("refused an upstream answer: %s", exc)
                raise ApiError(
                    502, "bad_gateway", "The upstream's answer cannot be passed on."
                ) from None
        headers.popall("Content-Length", None)  # set from the body by Response
        return web.Response(
            status=upstream.status, reason=upstream.reason or None, body=body, headers=headers
        )

    async def _whole_body(self, request: web.BaseRequest, length: int | None, limit: int) -> bytes:
        """The body, read whole before it is judged (413 past `limit`, 408 if it stalls)."""
        if length is not None and length > limit:
            raise too_large(limit)
        body = await self._request_body(request, length, limit)
        if not isinstance(body, LimitedBody):
            return body or b""
        try:
            return b"".join([chunk async for chunk in body])
        except BodyStalled:
            raise body_timeout() from None
        except BodyTooLarge:
            raise too_large(limit) from None

    async def _request_body(
        self, request: web.BaseRequest, length: int | None, limit: int, keep: int = 0
    ) -> bytes | LimitedBody | None:
        if not request.body_exists:
            return None if request.method in _NO_BODY_METHODS or length is None else b""
        content = request.content
        if content.is_eof():  # all there already: no timer, no await
            body = content.read_nowait()
            if len(body) > limit:
                raise too_large(limit)
            return body
        if request.headers.get("Expect", "").lower() == "100-continue":
            # Authorised: now invite the body the client is holding back.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length is not None and length <= _SMALL_BODY:
            try:
                async with asyncio.timeout(self._settings.body_timeout):
                    return await request.read()
            except TimeoutError:
                raise body_timeout() from None
            except (ConnectionError, HttpProcessingError):  # the client left mid-upload
                raise ClientGone from None
        settings = self._settings
        return LimitedBody(
            request.content, limit, settings.body_timeout, settings.body_min_rate, keep
        )

    async def _stream_back(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        transform: TransformFactory | None,
        extra: Mapping[str, str] | None,
        watch: Watch,
        own_cors: bool = False,
    ) -> web.StreamResponse:
        headers = downstream_response_headers(upstream.headers)
        if own_cors:
            for name in [n for n in headers if is_cors_header(n)]:
                headers.popall(name, None)
        if extra:
            headers.update(extra)
        try:
            body_transform = transform(upstream.status, headers) if transform else None
        except StreamRefused as exc:  # nothing is sent yet: a clean 502
            log.warning("refused an upstream answer: %s", exc)
            raise ApiError(
                502, "bad_gateway", "The upstream's answer cannot be passed on."
            ) from None
        length = upstream.content_length
        if (
            length is not None
            and length <= _SMALL_BODY
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
        ):
            return await self._small_answer(upstream, headers, watch, body_transform)
        if body_transform is not None:
            headers.popall("Content-Length", None)  # the rewrite changes the length
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason or None, headers=headers
        )
        # Streaming: no deadline any more, only the optional idle limit.
        watch.deadline = None
        watch.idle = self._settings.stream_idle_timeout
        watch.last_active = self._watchdog.now()
        self._streams.add(upstream)
        try:
            await response.prepare(request)
            await _pump(upstream, response, body_transform, watch, self._watchdog)
            await response.write_eof()
        except ConnectionError:  # the client went away (reset, or lost while we wrote)
            return response
        except StreamRefused as exc:
            # Headers are out: cut the connection, so the client never completes the event.
            self._metrics.upstream_errors.inc()
            log.warning("refused an upstream stream: %s", exc)
            _abort(request)
            return response
        except UpstreamError as exc:
            if watch.reason == "client":
                return response  # leaving `async with` in forward() releases the upstream
            if self._ending:  # we closed it: a deliberate, clean end of the stream
                await _end_quietly(response)
                return response
            # Headers are out: the only honest signal left is cutting the connection.
            self._metrics.upstream_errors.inc()
            if watch.reason == "idle":
                log.warning("upstream stream idle past stream_idle_timeout")
            else:
                log.warning("upstream stream broke: %s", exc)
            _abort(request)
            return response
        finally:
            self._streams.discard(upstream)
        return response


class LimitedBody:
    """A streamed request body that stops the upload once it passes `limit` bytes
    (BodyTooLarge), or once no chunk arrived for `stall` seconds (BodyStalled). With a
    `min_rate`, every window of `stall` seconds must also bring at least `min_rate` bytes a
    second: a body trickled a byte at a time would otherwise hold its upstream connection
    for as long as the client likes.

    A copy of a body of at most `keep` bytes is kept as it passes (`kept`), so that what the
    request was (an MCP call's method and tool) does not depend on whether its body had
    arrived before the request was handled."""

    def __init__(
        self, content: StreamReader, limit: int, stall: float, min_rate: int, keep: int = 0
    ) -> None:
        self._content = content
        self._limit = limit
        self._stall = stall
        self._window_need = int(min_rate * stall)
        self._keep = keep
        self._copy: list[bytes] | None = [] if keep else None
        self._complete = False
        self.on_complete: Callable[[], None] | None = None
        self.received = 0  # bytes of the body read so far

    @property
    def kept(self) -> bytes | None:
        """The whole body, once it has passed, if it was at most `keep` bytes."""
        return b"".join(self._copy) if self._complete and self._copy is not None else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        total = 0
        window_end, window_bytes = loop.time() + self._stall, 0
        while True:
            wait = self._stall if not self._window_need else max(0.0, window_end - loop.time())
            try:
                chunk = await asyncio.wait_for(self._content.readany(), wait)
            except TimeoutError:
                if not self._window_need or window_bytes < self._window_need:
                    raise BodyStalled from None
                window_end, window_bytes = window_end + self._stall, 0
                continue
            except (ConnectionError, HttpProcessingError):  # the client left mid-upload
                raise ClientGone from None
            if not chunk:
                self._complete = True
                if self.on_complete is not None:
                    self.on_complete()
                return
            total += len(chunk)
            self.received = total
            if total > self._limit:
                raise BodyTooLarge
            if self._copy is not None:
                if total <= self._keep:
                    self._copy.append(chunk)
                else:
                    self._copy = None  # too large to name: no copy is held
            window_bytes += len(chunk)
            if self._window_need and loop.time() >= window_end:
                if window_bytes < self._window_need:
                    raise BodyStalled
                window_end, window_bytes = loop.time() + self._stall, 0
            yield chunk


async def _pump(
    upstream: UpstreamResponse,
    response: web.StreamResponse,
    transform: BodyTransform | None,
    watch: Watch,
    watchdog: Watchdog,
) -> None:
    """Copy the upstream body to the client as it arrives (SSE events included)."""
    watch_idle = watch.idle > 0
    async for chunk in upstream.iter_chunks():
        if watch_idle:
            watch.last_active = watchdog.now()
        if transform is not None:
            chunk = transform.feed(chunk)
        if chunk:
            await response.write(chunk)
    if transform is not None and (rest := transform.flush()):
        await response.write(rest)


def _tick_for(settings: GatewaySettings) -> float:
    """How often the watchdog looks: a deadline may fire this late, a quarter of the
    shortest limit at most, and never more often than 100 times a second."""
    limits = [settings.response_timeout]
    if settings.stream_idle_timeout > 0:
        limits.append(settings.stream_idle_timeout)
    return max(0.01, min(1.0, *(limit / 4 for limit in limits)))


def _client_gone() -> web.Response:
    # Nobody will read this; 499 (as nginx logs it) tells the access log and metrics why.
    return web.Response(status=499)


async def _end_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write_eof()


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _origin(url: str) -> str:
    """Scheme and host of an upstream URL, for logs (paths may carry tokens)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
