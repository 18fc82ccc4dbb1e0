"""A small sample MCP server and chat API for ``keystile demo``.

It speaks the MCP Streamable HTTP transport on ``/mcp`` well enough for the official
SDK's client, using aiohttp only (the ``mcp`` package is a test-only dependency).
Run standalone with ``python -m gateway.sample_mcp 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

JsonObj = dict[str, Any]
ToolFn = Callable[[JsonObj, web.Request], str]

MCP_PATH: Final = "/mcp"
SESSION_HEADER: Final = "Mcp-Session-Id"
KNOWN_VERSIONS: Final = ("2025-11-25", "2025-06-18", "2025-03-26", "2026-07-28")
DEFAULT_VERSION: Final = "2025-11-25"
MODERN_VERSION: Final = "2026-07-28"  # stateless era: no initialize, no session id
SERVER_INFO: Final = {"name": "keystile-sample", "version": "1.0.0"}
IDENTITY_HEADERS: Final = ("X-Keystile-User-Id", "X-Keystile-Key-Id", "X-Keystile-Workspace-Id")

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
SESSION_NOT_FOUND: Final = -32001

SESSIONS: Final = web.AppKey("sessions", set[str])


class RpcError(Exception):
    """A JSON-RPC error to send back in place of a result."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _tool(name: str, description: str, properties: dict[str, str]) -> JsonObj:
    """A tool description whose listed (JSON Schema typed) arguments are all required."""
    props = {key: {"type": kind} for key, kind in properties.items()}
    schema = {"type": "object", "properties": props, "required": list(properties)}
    return {"name": name, "description": description, "inputSchema": schema}


TOOLS: Final = [
    _tool("echo", "Return the text.", {"text": "string"}),
    _tool("add", "Add two numbers.", {"a": "number", "b": "number"}),
    _tool("whoami", "Show the X-Keystile-* identity headers this server received.", {}),
]


def _echo(args: JsonObj, _request: web.Request) -> str:
    """The ``echo`` tool."""
    text = args.get("text")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    return text


def _number(args: JsonObj, key: str) -> float:
    """A numeric tool argument (bools are not numbers here)."""
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"'{key}' must be a number")
    return value


def _add(args: JsonObj, _request: web.Request) -> str:
    """The ``add`` tool."""
    return str(_number(args, "a") + _number(args, "b"))


def _whoami(_args: JsonObj, request: web.Request) -> str:
    """The ``whoami`` tool: the identity headers the gateway set."""
    return json.dumps({name: request.headers.get(name) for name in IDENTITY_HEADERS})


TOOL_FNS: Final[dict[str, ToolFn]] = {"echo": _echo, "add": _add, "whoami": _whoami}


def _initialize(params: JsonObj) -> JsonObj:
    """Negotiate the protocol version and describe this server."""
    requested = params.get("protocolVersion")
    version = requested if requested in KNOWN_VERSIONS else DEFAULT_VERSION
    return {
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": SERVER_INFO,
    }


def _call_tool(params: JsonObj, request: web.Request) -> JsonObj:
    """Run a tool; bad arguments are a tool error, an unknown tool a protocol error."""
    name, args = params.get("name"), params.get("arguments") or {}
    fn = TOOL_FNS.get(name) if isinstance(name, str) else None
    if fn is None or not isinstance(args, dict):
        raise RpcError(INVALID_PARAMS, f"Unknown tool or bad arguments: {name!r}")
    try:
        return {"content": [{"type": "text", "text": fn(args, request)}], "isError": False}
    except ValueError as exc:
        return {"content": [{"type": "text", "text": str(exc)}], "isError": True}


def _dispatch(method: str, params: JsonObj, request: web.Request) -> JsonObj:
    """Route one JSON-RPC request to its result."""
    if method == "initialize":
        return _initialize(params)
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call":
        return _call_tool(params, request)
    raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")


def _era_fields(method: str, request: web.Request) -> JsonObj:
    """Result fields the 2026-07-28 schema requires (its clients reject results without them)."""
    if request.headers.get("Mcp-Protocol-Version") != MODERN_VERSION:
        return {}
    cache = {"ttlMs": 0, "cacheScope": "private"} if method == "tools/list" else {}
    return {"resultType": "complete", **cache}


def _error(msg_id: Any, code: int, message: str) -> JsonObj:
    """A JSON-RPC error response."""
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def _handle_message(msg: Any, request: web.Request) -> JsonObj | None:
    """Answer one JSON-RPC message; None for notifications and client responses."""
    if not isinstance(msg, dict):
        return _error(None, INVALID_REQUEST, "Invalid Request")
    if "id" not in msg or "method" not in msg:
        return None
    method, params = msg["method"], msg.get("params") or {}
    try:
        if not isinstance(method, str) or not isinstance(params, dict):
            raise RpcError(INVALID_REQUEST, "Invalid Request")
        result = _dispatch(method, params, request) | _era_fields(method, request)
        return {"jsonrpc": "2.0", "id": msg["id"], "result": result}
    except RpcError as exc:
        return _error(msg["id"], exc.code, exc.message)


def _session_not_found(msg_id: Any) -> web.Response:
    """404 for a session id this server never issued or already forgot."""
    return web.json_response(_error(msg_id, SESSION_NOT_FOUND, "Session not found"), status=404)


def _reply(request: web.Request, payload: Any, headers: dict[str, str]) -> web.Response:
    """JSON by default; a one-event SSE stream when the client accepts only SSE."""
    accept = request.headers.get("Accept", "")
    if "text/event-stream" in accept and "application/json" not in accept:
        body = f"event: message\ndata: {json.dumps(payload)}\n\n"
        return web.Response(text=body, content_type="text/event-stream", headers=headers)
    return web.json_response(payload, headers=headers)


async def _post_mcp(request: web.Request) -> web.Response:
    """POST /mcp: one JSON-RPC message or a batch."""
    try:
        body = json.loads(await request.read())
    except ValueError:
        return web.json_response(_error(None, PARSE_ERROR, "Parse error"), status=400)
    messages = body if isinstance(body, list) else [body]
    if not messages:
        return web.json_response(_error(None, INVALID_REQUEST, "Empty batch"), status=400)
    is_init = any(isinstance(m, dict) and m.get("method") == "initialize" for m in messages)
    session_id = request.headers.get(SESSION_HEADER)
    if session_id is not None and session_id not in request.app[SESSIONS] and not is_init:
        first_id = messages[0].get("id") if isinstance(messages[0], dict) else None
        return _session_not_found(first_id)
    responses = [r for m in messages if (r := _handle_message(m, request)) is not None]
    if not responses:
        return web.Response(status=202)
    headers: dict[str, str] = {}
    if is_init and any("result" in r for r in responses):
        headers[SESSION_HEADER] = secrets.token_urlsafe(24)
        request.app[SESSIONS].add(headers[SESSION_HEADER])
    return _reply(request, responses if isinstance(body, list) else responses[0], headers)


async def _get_mcp(_request: web.Request) -> web.Response:
    """GET /mcp: this server never opens a server-initiated stream."""
    return web.Response(status=405, headers={"Allow": "POST, DELETE"})


async def _delete_mcp(request: web.Request) -> web.Response:
    """DELETE /mcp: end a session."""
    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None or session_id not in request.app[SESSIONS]:
        return _session_not_found(None)
    request.app[SESSIONS].discard(session_id)
    return web.Response(status=200)


async def _chat(request: web.Request) -> web.Response:
    """POST /api/v1/chat: echo the message back."""
    try:
        data = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, str):
        return web.json_response({"error": "'message' must be a string"}, status=400)
    return web.json_response({"reply": f"echo: {message}"})


async def _chat_stream(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/chat/stream: three SSE events, 100 ms apart."""
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for n in range(3):
        if n:
            await asyncio.sleep(0.1)
        await response.write(f"data: {json.dumps({'n': n})}\n\n".encode())
    await response.write_eof()
    return response


def create_sample_app() -> web.Application:
    """Build the sample MCP server and chat API application."""
    app = web.Application()
    app[SESSIONS] = set()
    app.router.add_post(MCP_PATH, _post_mcp)
    app.router.add_get(MCP_PATH, _get_mcp)
    app.router.add_delete(MCP_PATH, _delete_mcp)
    app.router.add_post("/api/v1/chat", _chat)
    app.router.add_get("/api/v1/chat/stream", _chat_stream)
    return app


async def start_sample_server(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start the sample server; returns the runner (call ``cleanup()``) and the bound port."""
    runner = web.AppRunner(create_sample_app())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port: int = runner.addresses[0][1]
    return runner, bound_port


def main() -> None:
    """Run the sample server standalone: ``python -m gateway.sample_mcp [PORT]``."""
    parser = argparse.ArgumentParser(description="Keystile sample MCP server and chat API.")
    parser.add_argument("port", nargs="?", type=int, default=9001)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    web.run_app(create_sample_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
