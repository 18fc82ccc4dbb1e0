"""The upstream client against raw HTTP servers on 127.0.0.1 that answer byte for byte."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from gateway import upstream
from gateway.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from tests.support import DEADLINE, wait_until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"


@contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler (asyncio logs it as an error)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


class RawServer:
    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.ended = asyncio.Event()  # set once a connection has ended (closed by the client)
        self.ended_count = 0
        self.requests: list[bytes] = []


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    """A server whose `handler(reader, writer, connection_number)` speaks HTTP by hand."""
    state = RawServer()
    writers: list[asyncio.StreamWriter] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(reader, writer, state.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # cancelled below, at the end of the test: asyncio would log it as an error
        finally:
            state.ended_count += 1
            state.ended.set()
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        for task in handlers:  # handlers still holding an answer back
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Return once the client has closed the connection (or reset it)."""
    while await reader.read(65536):
        pass


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request with a Content-Length body (or none): (head, body)."""
    head = await read_head(reader)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def serving(answer: bytes, server: list[RawServer]) -> Handler:
    """Answer every request on every connection with `answer`, recording the requests."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, body = await read_request(reader)
            server[0].requests.append(head + body)
            writer.write(answer)
            await writer.drain()

    return handler


def reading_paused(answer: UpstreamResponse) -> bool:
    """Whether the client stopped reading the answer's socket (a look inside the client)."""
    transport = answer._conn._transport
    return transport is not None and not transport.is_reading()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream_client = UpstreamClient(connect_timeout=2)
    yield upstream_client
    await upstream_client.close()


def url(server: RawServer, path: str = "/mcp") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_requests_share_one_kept_alive_connection(client: UpstreamClient) -> None:
    holder: list[RawServer] = []
    async with raw_server(serving(OK, holder)) as server:
        holder.append(server)
        for n in range(3):
            headers = [("X-N", str(n)), ("Mcp-Session-Id", "s")]
            async with await client.request("POST", url(server), headers, b'{"n":1}') as answer:
                assert answer.status == 200
                assert await answer.read() == b"ok"
        assert server.connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
        assert b"X-N: 0\r\nMcp-Session-Id: s\r\nContent-Length: 7\r\n\r\n" in first
        assert first.endswith(b'{"n":1}')


async def test_chunked_answer_arrives_decoded_as_it_is_sent(client: UpstreamClient) -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
            await writer.drain()

    async with raw_server(handler) as server:
        async with await client.request("GET", url(server), [], None) as answer:
            chunks = answer.iter_chunks()
            assert await anext(chunks) == b"first"  # before the rest is even sent
            release.set()
            assert b"".join([c async for c in chunks]) == b"second"
        async with await client.request("GET", url(server), [], None) as again:
            assert await again.read() == b"firstsecond"
        assert server.connections == 1


async def test_body_delimited_by_close_is_read_whole(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with raw_server(handler) as server:
        for _ in range(2):
            async with await client.request("GET", url(server), [], None) as answer:
                assert await answer.read() == b"all of it"
        assert server.connections == 2  # never reused


async def test_informational_answers_are_skipped(client: UpstreamClient) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    holder: list[RawServer] = []
    async with raw_server(serving(early + OK, holder)) as server:
        holder.append(server)
        async with await client.request("POST", url(server), [], b"x") as answer:
            assert answer.status == 200
            assert "Link" not in answer.headers
            assert await answer.read() == b"ok"


async def test_head_answer_has_no_body_whatever_it_announces(client: UpstreamClient) -> None:
    holder: list[RawServer] = []
    answer_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    async with raw_server(serving(answer_bytes, holder)) as server:
        holder.append(server)
        async with await client.request("HEAD", url(server), [], None) as answer:
            assert answer.content_length == 10
            assert answer.complete
            assert await answer.read() == b""


async def test_stale_connection_is_retried_only_when_safe(client: UpstreamClient) -> None:
    async def first_only(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # the second request on a connection: hang up unanswered

    async with raw_server(first_only) as server:
        for _ in range(2):
            async with await client.request("GET", url(server), [], None) as answer:
                assert await answer.read() == b"ok"
        assert server.connections == 2  # the GET went again on a fresh connection
        with pytest.raises(UpstreamError):
            await client.request("POST", url(server), [], b"{}")
        assert server.connections == 2  # a POST is never sent twice


async def test_malformed_answer_is_an_upstream_error(client: UpstreamClient) -> None:
    holder: list[RawServer] = []
    async with raw_server(serving(b"HTTP/1.1 abc nonsense\r\n\r\n", holder)) as server:
        holder.append(server)
        with pytest.raises(UpstreamError, match="malformed"):
            await client.request("GET", url(server), [], None)


async def test_unreachable_upstream_is_an_upstream_error(client: UpstreamClient) -> None:
    async with raw_server(serving(OK, [])) as server:
        port = server.port
    with pytest.raises(UpstreamError, match="cannot connect"):
        await client.request("GET", f"http://127.0.0.1:{port}/", [], None)


async def test_streamed_upload_goes_out_chunked(client: UpstreamClient) -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        head = await read_head(reader)
        assert b"Transfer-Encoding: chunked" in head
        while (size := int((await reader.readline()).strip(), 16)) > 0:
            received.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readexactly(2)
        writer.write(OK)
        await writer.drain()

    async def body() -> AsyncIterator[bytes]:
        for part in (b"one", b"two", b"three"):
            await asyncio.sleep(0)  # each part a write of its own
            yield part

    async with (
        raw_server(handler) as server,
        await client.request("POST", url(server), [], body()) as answer,
    ):
        assert await answer.read() == b"ok"
    assert received == [b"one", b"two", b"three"]


async def test_answer_complete_but_unread_with_reading_paused_is_never_pooled(
    client: UpstreamClient,
) -> None:
    """A consumer that leaves (its client went away) with the answer unread: pooled, its
    connection would keep reading paused, and the next request on it would wait for ever."""
    holder: list[RawServer] = []
    # One byte over the high-water mark: reading pauses exactly as the answer completes.
    body = b"x" * (upstream._HIGH_WATER + 1)
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, _body = await read_request(reader)
            holder[0].requests.append(head)
            writer.write(big if head.startswith(b"GET /big ") else OK)
            await writer.drain()

    async with raw_server(handler) as server:
        holder.append(server)
        async with await client.request("GET", url(server, "/big"), [], None) as big_answer:
            await wait_until(lambda: big_answer.complete)
            assert reading_paused(big_answer)
        async with (
            asyncio.timeout(DEADLINE),
            await client.request("GET", url(server, "/small"), [], None) as answer,
        ):
            assert await answer.read() == b"ok"
        assert server.connections == 2
        assert len(server.requests) == 2
        await wait_until(lambda: server.ended_count == 1)  # the abandoned one, closed


async def test_answer_left_partly_unread_is_never_pooled(client: UpstreamClient) -> None:
    holder: list[RawServer] = []
    answer_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
    async with raw_server(serving(answer_bytes, holder)) as server:
        holder.append(server)
        async with await client.request("GET", url(server), [], None) as first:
            await wait_until(lambda: first.complete)  # arrived whole, and never read
        async with await client.request("GET", url(server), [], None) as second:
            assert await second.read() == b"0123456789"
        assert server.connections == 2
        await wait_until(lambda: server.ended_count == 1)


async def test_answer_read_to_the_end_keeps_its_connection(client: UpstreamClient) -> None:
    holder: list[RawServer] = []
    body = b"y" * (3 * upstream._HIGH_WATER)  # reading pauses and resumes on the way
    answer_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    async with raw_server(serving(answer_bytes, holder)) as server:
        holder.append(server)
        for _ in range(2):
            async with await client.request("GET", url(server), [], None) as answer:
                assert b"".join([chunk async for chunk in answer.iter_chunks()]) == body
        assert server.connections == 1


@pytest.mark.parametrize(
    "switch",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=["announced", "bare"],
)
async def test_switching_protocols_is_an_upstream_error_and_nothing_escapes(
    client: UpstreamClient, switch: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(switch + b"\x81\x05hello")  # and then another protocol's bytes
        await writer.drain()
        await until_closed(reader)

    with loop_errors() as errors:
        async with raw_server(handler) as server:
            with pytest.raises(UpstreamError, match="switched protocols"):
                await client.request("GET", url(server), [], None)
            async with asyncio.timeout(DEADLINE):
                await server.ended.wait()  # the client closed the connection
    assert errors == []
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_an_empty_chunk_of_a_streamed_body_is_not_sent(client: UpstreamClient) -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_head(reader)
        received.append(await reader.readuntil(b"0\r\n\r\n"))  # up to the first last-chunk
        writer.write(OK)
        await writer.drain()
        await until_closed(reader)

    async def body() -> AsyncIterator[bytes]:
        for part in (b"one", b"", b"two", b""):
            await asyncio.sleep(0)
            yield part

    async with (
        raw_server(handler) as server,
        await client.request("POST", url(server), [], body()) as answer,
    ):
        assert await answer.read() == b"ok"
    assert received == [b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"]


async def test_unread_answer_stops_the_upstream_from_sending(client: UpstreamClient) -> None:
    total = 64 * 1024 * 1024
    finished = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * (1024 * 1024)
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        finished.set()

    async with raw_server(handler) as server:
        async with await client.request("GET", url(server), [], None) as answer:
            # Nobody reads: the client stops reading the socket; everything the server could
            # still send fits in the sockets' buffers, far less than the answer, so it waits.
            await wait_until(lambda: reading_paused(answer))
            assert not finished.is_set()
            size = 0
            async for chunk in answer.iter_chunks():
                size += len(chunk)
            assert size == total
        assert finished.is_set()


async def test_abort_all_ends_answers_in_flight(client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await until_closed(reader)

    async with (
        raw_server(handler) as server,
        await client.request("GET", url(server), [], None) as answer,
    ):
        chunks = answer.iter_chunks()
        assert await anext(chunks) == b"abc"
        client.abort_all()
        with pytest.raises(UpstreamError):
            await anext(chunks)


async def test_header_bytes_pass_both_ways_unchanged(client: UpstreamClient) -> None:
    holder: list[RawServer] = []
    answer_bytes = b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9 \xe2\x9c\x93\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(serving(answer_bytes, holder)) as server:
        holder.append(server)
        sent = "caf\udce9 \u2713"  # how aiohttp's server decodes those same bytes
        headers = [("X-Name", sent)]
        async with await client.request("GET", url(server), headers, None) as answer:
            assert answer.headers["X-Name"] == sent
        assert b"X-Name: caf\xe9 \xe2\x9c\x93\r\n" in server.requests[0]


async def test_an_answer_pipelined_after_the_first_retires_the_connection(
    client: UpstreamClient,
) -> None:
    holder: list[RawServer] = []
    async with raw_server(serving(OK + STRAY, holder)) as server:  # one write, two answers
        holder.append(server)
        for _ in range(2):
            async with await client.request("GET", url(server), [], None) as answer:
                assert await answer.read() == b"ok"  # the answer asked for is still whole
        assert server.connections == 2  # the stray answer was never taken for the second
        await wait_until(lambda: server.ended_count >= 1)


async def test_an_answer_arriving_on_an_idle_connection_retires_it(
    client: UpstreamClient,
) -> None:
    pooled = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            if n == 1:
                await pooled.wait()
                writer.write(STRAY)  # late, to nobody: the connection sits in the pool
                await writer.drain()
                await until_closed(reader)
                return

    async with raw_server(handler) as server:
        async with await client.request("GET", url(server), [], None) as answer:
            assert await answer.read() == b"ok"
        pooled.set()
        async with asyncio.timeout(DEADLINE):
            await server.ended.wait()  # the client closed the connection the stray came on
        async with await client.request("GET", url(server), [], None) as answer:
            assert await answer.read() == b"ok"
        assert server.connections == 2


class Clock:
    """Stands in for the client's monotonic clock: time passes only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_connections_idle_too_long_are_closed_not_reused(
    client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(upstream, "monotonic", clock)
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 1.0)
    holder: list[RawServer] = []

    async def get() -> None:
        async with await client.request("GET", url(server), [], None) as answer:
            assert await answer.read() == b"ok"

    async with raw_server(serving(OK, holder)) as server:
        holder.append(server)
        await asyncio.gather(get(), get())  # two connections, both pooled
        assert server.connections == 2
        clock.now += 0.5
        await get()  # reuses the newer one
        clock.now += 0.7
        await get()  # the newer again; the older, idle for 1.2 s, is closed on the way
        assert server.connections == 2
        async with asyncio.timeout(DEADLINE):
            await server.ended.wait()
        clock.now += 1.2
        await get()  # everything pooled has idled past the limit: a fresh connection
        assert server.connections == 3
