"""Tests for the bundled sample MCP server, driven by the official MCP SDK and raw aiohttp."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from gateway.sample_mcp import start_sample_server

INIT_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "raw-test", "version": "0"},
}


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    runner, port = await start_sample_server("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _rpc(method: str, params: dict[str, Any] | None = None, msg_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params or {}}


def _text(result: Any) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def _initialize(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/mcp", json=_rpc("initialize", INIT_PARAMS)) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert body["result"]["protocolVersion"] == "2025-06-18"
        return resp.headers["Mcp-Session-Id"]


# --- official SDK client ---------------------------------------------------------------------


async def test_sdk_session_roundtrip(base_url: str, http: aiohttp.ClientSession) -> None:
    seen: list[tuple[str, str | None, int, str | None]] = []

    async def record(response: httpx2.Response) -> None:
        req = response.request
        sent, got = req.headers.get("mcp-session-id"), response.headers.get("mcp-session-id")
        seen.append((req.method, sent, response.status_code, got))

    url = f"{base_url}/mcp"
    async with (
        httpx2.AsyncClient(event_hooks={"response": [record]}) as client,
        streamable_http_client(url, http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.protocol_version == "2025-11-25"
        assert init.server_info.name == "keystile-sample"
        assert init.server_info.version == "1.0.0"
        assert init.capabilities.tools is not None

        tools = await session.list_tools()
        assert [t.name for t in tools.tools] == ["echo", "add", "whoami"]
        assert tools.tools[1].input_schema["properties"]["a"] == {"type": "number"}

        echoed = await session.call_tool("echo", {"text": "hello"})
        assert not echoed.is_error
        assert _text(echoed) == "hello"
        added = await session.call_tool("add", {"a": 2, "b": 3.5})
        assert _text(added) == "5.5"
        who = await session.call_tool("whoami", {})
        assert json.loads(_text(who)) == {
            "X-Keystile-User-Id": None,
            "X-Keystile-Key-Id": None,
            "X-Keystile-Workspace-Id": None,
        }
        await session.send_ping()

    # initialize minted the id; every later exchange carried it back; closing DELETEd it.
    assert seen[0][0] == "POST" and seen[0][1] is None and seen[0][2] == 200
    session_id = seen[0][3]
    assert session_id and session_id.isascii() and session_id.isprintable()
    assert all(sent == session_id for _, sent, _, _ in seen[1:])
    assert ("DELETE", session_id, 200, None) in seen
    # the SDK's background probe for a server stream (timing-dependent) is refused
    assert all(status == 405 for method, _, status, _ in seen if method == "GET")

    # the closed session is forgotten
    headers = {"Mcp-Session-Id": session_id}
    async with http.post(url, json=_rpc("ping"), headers=headers) as resp:
        assert resp.status == 404


async def test_sdk_client_auto_mode_falls_back_to_initialize(base_url: str) -> None:
    # mode="auto" probes server/discover first; our -32601 makes it fall back to initialize.
    async with Client(f"{base_url}/mcp") as client:
        assert client.protocol_version == "2025-11-25"
        result = await client.call_tool("add", {"a": 40, "b": 2})
        assert _text(result) == "42"


async def test_sdk_client_stateless_2026(base_url: str) -> None:
    # A pinned 2026-07-28 client skips initialize and sends no session id at all.
    sent: list[httpx2.Request] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(request)

    async with (
        httpx2.AsyncClient(event_hooks={"request": [record]}) as http_client,
        Client(
            streamable_http_client(f"{base_url}/mcp", http_client=http_client), mode="2026-07-28"
        ) as client,
    ):
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} == {"echo", "add", "whoami"}
        assert _text(await client.call_tool("echo", {"text": "stateless"})) == "stateless"
    assert [r.method for r in sent] == ["POST", "POST"]
    assert all("mcp-session-id" not in r.headers for r in sent)
    assert all(r.headers["mcp-protocol-version"] == "2026-07-28" for r in sent)


async def test_sdk_unknown_tool_is_an_error(base_url: str) -> None:
    async with Client(f"{base_url}/mcp", mode="legacy") as client:
        with pytest.raises(MCPError) as excinfo:
            await client.call_tool("nope", {})
        assert excinfo.value.code == -32602


# --- raw HTTP --------------------------------------------------------------------------------


async def test_unknown_session_is_404(base_url: str, http: aiohttp.ClientSession) -> None:
    await _initialize(http, base_url)  # sessions exist, but not this one
    headers = {"Mcp-Session-Id": "not-a-session"}
    async with http.post(f"{base_url}/mcp", json=_rpc("tools/list"), headers=headers) as resp:
        assert resp.status == 404
    async with http.delete(f"{base_url}/mcp", headers=headers) as resp:
        assert resp.status == 404


async def test_no_session_id_is_accepted(base_url: str, http: aiohttp.ClientSession) -> None:
    await _initialize(http, base_url)
    async with http.post(f"{base_url}/mcp", json=_rpc("ping", msg_id=7)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"jsonrpc": "2.0", "id": 7, "result": {}}


async def test_delete_forgets_session(base_url: str, http: aiohttp.ClientSession) -> None:
    headers = {"Mcp-Session-Id": await _initialize(http, base_url)}
    async with http.post(f"{base_url}/mcp", json=_rpc("ping"), headers=headers) as resp:
        assert resp.status == 200
    async with http.delete(f"{base_url}/mcp", headers=headers) as resp:
        assert resp.status == 200
    async with http.post(f"{base_url}/mcp", json=_rpc("ping"), headers=headers) as resp:
        assert resp.status == 404


async def test_get_is_405(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base_url}/mcp", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST, DELETE"


async def test_parse_error_is_400(base_url: str, http: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{base_url}/mcp", data=b"{not json", headers=headers) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["id"] is None
        assert body["error"]["code"] == -32700


async def test_errors_notifications_and_versions(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    url = f"{base_url}/mcp"
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=note) as resp:
        assert resp.status == 202
        assert await resp.read() == b""
    async with http.post(url, json=_rpc("resources/list")) as resp:
        assert (await resp.json())["error"]["code"] == -32601
    async with http.post(url, json=_rpc("tools/call", {"name": "nope"})) as resp:
        assert (await resp.json())["error"]["code"] == -32602
    async with http.post(url, json=_rpc("initialize", {"protocolVersion": "1999-01-01"})) as resp:
        assert (await resp.json())["result"]["protocolVersion"] == "2025-11-25"
    async with http.post(url, json=[_rpc("ping", msg_id=1), note, _rpc("ping", msg_id=2)]) as resp:
        assert [r["id"] for r in await resp.json()] == [1, 2]


async def test_whoami_reports_gateway_headers(base_url: str, http: aiohttp.ClientSession) -> None:
    headers = {"X-Keystile-User-Id": "u1", "X-Keystile-Key-Id": "k1"}
    call = _rpc("tools/call", {"name": "whoami", "arguments": {}})
    async with http.post(f"{base_url}/mcp", json=call, headers=headers) as resp:
        result = (await resp.json())["result"]
    assert result["isError"] is False
    assert json.loads(result["content"][0]["text"]) == {
        "X-Keystile-User-Id": "u1",
        "X-Keystile-Key-Id": "k1",
        "X-Keystile-Workspace-Id": None,
    }


async def test_sse_only_accept_gets_sse(base_url: str, http: aiohttp.ClientSession) -> None:
    headers = {"Accept": "text/event-stream"}
    async with http.post(f"{base_url}/mcp", json=_rpc("ping", msg_id=3), headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        text = await resp.text()
    event, data = text.strip().split("\n")
    assert event == "event: message"
    assert json.loads(data.removeprefix("data: ")) == {"jsonrpc": "2.0", "id": 3, "result": {}}


async def test_chat_echo(base_url: str, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{base_url}/api/v1/chat", json={"message": "hi"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"reply": "echo: hi"}
    async with http.post(f"{base_url}/api/v1/chat", json={"nope": 1}) as resp:
        assert resp.status == 400


async def test_chat_stream_sends_three_events(base_url: str, http: aiohttp.ClientSession) -> None:
    events: list[Any] = []
    async with http.get(f"{base_url}/api/v1/chat/stream") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    assert events == [{"n": 0}, {"n": 1}, {"n": 2}]
