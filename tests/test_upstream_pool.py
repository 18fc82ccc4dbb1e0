"""What goes back to the upstream pool and how many connections an origin gets: the client
against raw servers on 127.0.0.1, then the same through the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from gateway.config import Settings, UpstreamSettings
from gateway.keyring import IssuedKey
from gateway.upstream import Closable, UpstreamClient, UpstreamError
from tests.support import DEADLINE, Keystile, Upstream, make_settings, start_keystile, wait_until
from tests.test_upstream_client import (
    OK,
    RawServer,
    loop_errors,
    raw_server,
    read_request,
    until_closed,
    url,
)


class Held:
    """A raw server's answers, each held until the test lets it go (requests are named by
    their paths, recorded in the order they arrive)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._gates: dict[str, asyncio.Event] = {}

    def release(self, *paths: str) -> None:
        for path in paths:
            self._gate(path).set()

    def _gate(self, path: str) -> asyncio.Event:
        return self._gates.setdefault(path, asyncio.Event())

    async def handler(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        while True:
            head, _body = await read_request(reader)
            path = head.split(b" ", 2)[1].decode()
            self.paths.append(path)
            await self._gate(path).wait()
            writer.write(OK)
            await writer.drain()


@asynccontextmanager
async def capped(limit: int) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(connect_timeout=2, max_per_origin=limit)
    try:
        yield client
    finally:
        await client.close()


async def get(
    client: UpstreamClient, server: RawServer, path: str, hooks: list[Closable] | None = None
) -> bytes:
    """GET `path`, recording what `on_connection` is handed: the connection, or first the
    request's place in line."""
    on_connection = None if hooks is None else hooks.append
    async with await client.request(
        "GET", url(server, path), [], None, on_connection=on_connection
    ) as answer:
        return await answer.read()


def started(
    client: UpstreamClient, server: RawServer, path: str
) -> tuple[asyncio.Task[bytes], list[Closable]]:
    hooks: list[Closable] = []
    return asyncio.create_task(get(client, server, path, hooks)), hooks


async def in_line(hooks: list[Closable]) -> None:
    await wait_until(lambda: len(hooks) == 1)


async def arrived(held: Held, count: int) -> None:
    await wait_until(lambda: len(held.paths) == count)


async def settled(*tasks: asyncio.Task[bytes]) -> list[bytes]:
    async with asyncio.timeout(DEADLINE):
        return await asyncio.gather(*tasks)


async def slots_intact(client: UpstreamClient, server: RawServer, held: Held, limit: int) -> None:
    """As many requests as the limit at once, then one more: the extra one waits for a
    pooled connection and no new connection is opened. A slot lost or counted twice shows
    as a hang or as a connection too many."""
    before = server.connections
    paths = [f"/check-{n}" for n in range(limit + 1)]
    held.release(*paths)
    answers = await settled(*(asyncio.create_task(get(client, server, p)) for p in paths))
    assert answers == [b"ok"] * (limit + 1)
    assert server.connections <= max(before, limit)


# -- the per-origin limit, at the client ---------------------------------------------------


async def test_a_request_past_the_limit_waits_for_a_released_connection() -> None:
    held = Held()
    async with raw_server(held.handler) as server, capped(2) as client:
        a, _ = started(client, server, "/a")
        b, _ = started(client, server, "/b")
        await wait_until(lambda: len(held.paths) == 2)
        c, c_hooks = started(client, server, "/c")
        await wait_until(lambda: len(c_hooks) == 1)  # handed its place in line, not a connection
        held.release("/a")
        await wait_until(lambda: len(held.paths) == 3)
        assert held.paths[2] == "/c"  # on the connection /a released
        assert len(c_hooks) == 2 and c_hooks[0] is not c_hooks[1]
        held.release("/b", "/c")
        assert await settled(a, b, c) == [b"ok"] * 3
        assert server.connections == 2
        await slots_intact(client, server, held, 2)


async def test_released_connections_go_to_waiters_first_come_first_served() -> None:
    held = Held()
    async with raw_server(held.handler) as server, capped(1) as client:
        a, _ = started(client, server, "/a")
        await wait_until(lambda: held.paths == ["/a"])
        waiting = []
        for path in ("/b", "/c", "/d"):
            waiting.append(started(client, server, path))
            await in_line(waiting[-1][1])  # so they queue in this order
        for n, path in enumerate(("/a", "/b", "/c")):
            held.release(path)
            await arrived(held, n + 2)
            # Exactly the next one was served; those behind it still wait.
            assert [len(hooks) for _, hooks in waiting] == [2] * (n + 1) + [1] * (2 - n)
        held.release("/d")
        assert await settled(a, *(task for task, _ in waiting)) == [b"ok"] * 4
        assert held.paths == ["/a", "/b", "/c", "/d"]
        assert server.connections == 1


async def test_a_waiter_that_gives_up_fails_and_takes_no_slot() -> None:
    held = Held()
    async with raw_server(held.handler) as server, capped(1) as client:
        a, _ = started(client, server, "/a")
        await wait_until(lambda: held.paths == ["/a"])
        b, b_hooks = started(client, server, "/b")
        c, c_hooks = started(client, server, "/c")
        await wait_until(lambda: len(b_hooks) == len(c_hooks) == 1)
        b_hooks[0].close()  # what the watchdog does at b's deadline, or when b's client left
        with pytest.raises(UpstreamError, match="gave up waiting"):
            await settled(b)
        held.release("/a", "/c")
        assert await settled(a, c) == [b"ok", b"ok"]
        assert held.paths == ["/a", "/c"]  # /b never went out
        assert server.connections == 1
        await slots_intact(client, server, held, 1)


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    held = Held()
    async with raw_server(held.handler) as server, capped(1) as client:
        a, _ = started(client, server, "/a")
        await wait_until(lambda: held.paths == ["/a"])
        b, b_hooks = started(client, server, "/b")
        c, c_hooks = started(client, server, "/c")
        await wait_until(lambda: len(b_hooks) == len(c_hooks) == 1)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        held.release("/a", "/c")
        assert await settled(a, c) == [b"ok", b"ok"]
        assert held.paths == ["/a", "/c"]
        assert server.connections == 1
        await slots_intact(client, server, held, 1)


async def test_a_connection_closed_mid_answer_lets_the_next_waiter_connect() -> None:
    held = Held()
    async with raw_server(held.handler) as server, capped(1) as client:
        a, a_hooks = started(client, server, "/a")
        await wait_until(lambda: held.paths == ["/a"])
        b, b_hooks = started(client, server, "/b")
        await wait_until(lambda: len(b_hooks) == 1)
        a_hooks[0].close()  # a's deadline: its connection is closed
        with pytest.raises(UpstreamError):
            await settled(a)
        await wait_until(lambda: held.paths == ["/a", "/b"])  # b, on a connection of its own
        held.release("/b")
        assert await settled(b) == [b"ok"]
        assert server.connections == 2
        await slots_intact(client, server, held, 1)


@pytest.mark.parametrize("ending", ["abort_all", "close"])
async def test_ending_the_client_fails_every_waiter(ending: str) -> None:
    held = Held()
    async with raw_server(held.handler) as server, capped(1) as client:
        a, _ = started(client, server, "/a")
        await wait_until(lambda: held.paths == ["/a"])
        b, b_hooks = started(client, server, "/b")
        c, c_hooks = started(client, server, "/c")
        await wait_until(lambda: len(b_hooks) == len(c_hooks) == 1)
        if ending == "abort_all":
            client.abort_all()
        else:
            await client.close()
        for task in (a, b, c):
            with pytest.raises(UpstreamError):
                await settled(task)
        assert held.paths == ["/a"]
        if ending == "abort_all":  # the client goes on, with its slot back
            held.release("/d")
            assert await get(client, server, "/d") == b"ok"
            await slots_intact(client, server, held, 1)
        else:
            with pytest.raises(UpstreamError, match="closed"):
                await get(client, server, "/d")


# -- through the gateway -------------------------------------------------------------------


async def a_key(keystile: Keystile) -> IssuedKey:
    user = await keystile.user(servers=["*"])
    return await keystile.key(user, permissions=("mcp",))


def only_server(name: str, address: str, **sections: Any) -> Settings:
    return replace(make_settings(**sections), mcp_servers={name: UpstreamSettings(url=address)})


def upstream_server(upstream: Upstream) -> web.Server:
    server = upstream.runner.server
    assert server is not None
    return server


async def read_the_head_and_leave(keystile: Keystile, key: str, size: int) -> None:
    """The attacker: asks for a large answer, reads its head, lets the gateway stream until
    the way to it is full, and disconnects with the rest unread."""
    reader, writer = await asyncio.open_connection("127.0.0.1", keystile.gateway_port)
    writer.write(
        b"GET /mcp-connect/gitlab/big?bytes=%d HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer %b\r\n\r\n" % (size, key.encode())
    )
    async with asyncio.timeout(DEADLINE):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    for _ in range(50):  # event-loop turns, not time: the gateway pumps into the sockets
        await asyncio.sleep(0)
    writer.close()
    await writer.wait_closed()


async def test_clients_leaving_large_answers_early_do_not_poison_the_pool(
    keystile: Keystile, upstream: Upstream
) -> None:
    """Whether the gateway had the whole answer, half of it with reading paused, or little of
    it when the client left, the next request through the same upstream is answered."""
    issued = await a_key(keystile)
    sizes = range(1024 * 1024, 8 * 1024 * 1024, 64 * 1024)  # the gateway's buffers fall between
    for size in sizes:
        await read_the_head_and_leave(keystile, issued.key, size)
        async with asyncio.timeout(DEADLINE):
            status, _, body = await keystile.request(
                "GET", f"/mcp-connect/github/after-{size}", issued.key
            )
        assert status == 200, body
    # Each request reached the upstream once: none was sent twice, none lost.
    assert upstream_server(upstream).requests_count == 2 * len(sizes)
    assert [seen["path"] for seen in upstream.seen] == [
        f"/github/mcp/after-{size}" for size in sizes
    ]


async def test_an_upstream_switching_protocols_is_502(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def switching(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x05hello"
        )
        await writer.drain()
        await until_closed(reader)

    with loop_errors() as errors:
        async with raw_server(switching) as server:
            settings = only_server("ws", url(server))
            async with start_keystile(settings, database_url) as ks:
                issued = await a_key(ks)
                status, headers, body = await ks.request("GET", "/mcp-connect/ws/", issued.key)
            assert status == 502
            assert headers["Content-Type"].startswith("application/json")
            assert body["error"] == "bad_gateway"
            async with asyncio.timeout(DEADLINE):
                await server.ended.wait()
    assert errors == []
    assert not [record for record in caplog.records if record.name == "asyncio"]


async def test_the_upstream_connection_limit_queues_requests_end_to_end(
    database_url: str, upstream: Upstream
) -> None:
    settings = make_settings(upstream, gateway={"upstream_max_connections": 1})
    async with start_keystile(settings, database_url) as ks:
        issued = await a_key(ks)
        first = asyncio.create_task(
            ks.request("GET", "/mcp-connect/gitlab/slow?seconds=1", issued.key)
        )
        await wait_until(lambda: len(upstream.seen) == 1)
        second = asyncio.create_task(
            ks.request("GET", "/mcp-connect/gitlab/slow?seconds=0.1", issued.key)
        )
        await wait_until(lambda: len(upstream.seen) == 2)
        # The second went out only once the first was answered, on the same connection.
        assert len(upstream_server(upstream).connections) == 1
        async with asyncio.timeout(DEADLINE):
            answers = await asyncio.gather(first, second)
        assert [status for status, _, _ in answers] == [200, 200]
        assert [seen["query"] for seen in upstream.seen] == ["seconds=1", "seconds=0.1"]


async def test_a_request_queued_past_its_deadline_is_504_and_leaves_the_line(
    database_url: str,
) -> None:
    """The watchdog ends a wait for a connection as it ends a wait for an answer."""
    finish_stream = asyncio.Event()
    paths: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            head, _body = await read_request(reader)
            paths.append(head.split(b" ", 2)[1])
            if head.startswith(b"GET /mcp/stream "):
                # A streamed answer: past its head no deadline applies, it holds the one slot.
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await writer.drain()
                await finish_stream.wait()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(OK)
            await writer.drain()

    async with raw_server(handler) as server:
        settings = only_server(
            "held",
            url(server),
            gateway={"upstream_max_connections": 1, "response_timeout": 0.3},
        )
        async with start_keystile(settings, database_url) as ks:
            issued = await a_key(ks)
            streaming = asyncio.create_task(
                ks.request("GET", "/mcp-connect/held/stream", issued.key)
            )
            await wait_until(lambda: paths == [b"/mcp/stream"])
            async with asyncio.timeout(DEADLINE):
                status, _, body = await ks.request("GET", "/mcp-connect/held/queued", issued.key)
            assert status == 504 and body["error"] == "upstream_timeout"
            finish_stream.set()
            async with asyncio.timeout(DEADLINE):
                status, _, body = await streaming
            assert (status, body) == (200, b"first")
            status, _, _ = await ks.request("GET", "/mcp-connect/held/after", issued.key)
            assert status == 200
        assert paths == [b"/mcp/stream", b"/mcp/after"]  # the queued one never went out
        assert server.connections == 1
