"""The one seam between the data plane and MCP awareness.

The data plane asks one question per request: `ToolGuard.guard(principal, server)`. For a key
and user without `tools` (the common case) the answer is None after two attribute reads, and
the request is forwarded exactly as before: nothing is inspected or filtered. With a policy,
the answer is that policy on that server's route (a ServerGuard, built once per distinct
policy and server): a request check (the POST body is read whole, at most
`mcp.max_inspect_bytes`, and inspected before anything goes upstream) and an answer filter
(tools/list results lose the denied tools, in JSON bodies and SSE events).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import policy as scope
from gateway.calls import bounded
from gateway.errors import ApiError
from gateway.mcp.inspect import InspectError, Inspection, inspect
from gateway.mcp.listing import JsonListFilter, SseListFilter
from gateway.mcp.patterns import ToolPolicy, policy_for
from gateway.models import Principal
from gateway.transform import BodyTransform, StreamRefused

_DENIED = -32602


def tool_not_allowed(tool: str) -> ApiError:
    return ApiError(403, "tool_not_allowed", f"Tool '{tool}' is not available with this API key.")


class Inspected(Protocol):
    """Where a check leaves what it read of a request: the MCP method and tool (for the call
    record and the access log, which would otherwise read the body a second time), and
    whether it asked for a tool list (whose answer is then filtered)."""

    mcp_method: str | None
    tool: str | None
    named: bool
    lists_tools: bool


class ToolGuard:
    def __init__(self, configured: Collection[str], max_inspect_bytes: int) -> None:
        self._configured = frozenset(configured)
        self.max_inspect_bytes = max_inspect_bytes
        # Many keys share a few policies: built once per distinct (tools, scope, server).
        self._guards = functools.lru_cache(maxsize=4096)(self._compile)

    def guard(self, principal: Principal, server: str) -> ServerGuard | None:
        key, user = principal.key, principal.user
        user_tools = None if user.role == "admin" else user.tools
        if key.tools is None and user_tools is None:
            return None
        return self._guards(key.tools, user_tools, key.servers, user.servers, user.role, server)

    def _compile(
        self,
        key_tools: tuple[str, ...] | None,
        user_tools: tuple[str, ...] | None,
        key_servers: tuple[str, ...],
        user_servers: tuple[str, ...],
        role: str,
        server: str,
    ) -> ServerGuard | None:
        reach = scope.reachable(key_servers, user_servers, role, self._configured)
        policy = policy_for(key_tools, user_tools, reach)
        return ServerGuard(policy, server, self.max_inspect_bytes) if policy else None


class ServerGuard:
    """A key's tool policy on one server's route: `check` judges a request body, `answers`
    (a TransformFactory) filters what comes back."""

    def __init__(self, policy: ToolPolicy, server: str, limit: int) -> None:
        self.limit = limit
        self._allows = functools.partial(policy.allows, server)  # a tool name -> allowed

    def check(
        self, seen: Inspected, headers: CIMultiDictProxy[str], body: bytes
    ) -> web.StreamResponse | None:
        """None to forward the body; otherwise the answer to give instead (the upstream
        never sees a denied call). What the body holds is left in `seen`."""
        try:
            inspection = inspect(
                body,
                limit=self.limit,
                mcp_method=headers.getall("Mcp-Method", ()),
                mcp_name=headers.getall("Mcp-Name", ()),
                content_encoding=headers.getall("Content-Encoding", ()),
            )
        except InspectError as exc:
            return ApiError(exc.status, exc.code, exc.message).response()
        _name(seen, inspection)
        seen.lists_tools = any(m.method == "tools/list" for m in inspection.messages)
        for call in inspection.tool_calls():
            assert call.name is not None  # the inspector guarantees a tools/call names its tool
            if self._allows(call.name):
                continue
            if inspection.batch or not _streamable(headers):
                return tool_not_allowed(call.name).response()
            return _jsonrpc_denial(call.id, call.name)
        return None

    def answers_to_post(
        self, seen: Inspected, status: int, headers: CIMultiDict[str]
    ) -> BodyTransform | None:
        """The filter for a POST's answer, which holds the answers to that POST's own
        requests (and requests and notifications of the server's, never a response to
        anything else): a tool list only if the POST asked for one. The answer to a
        tools/call passes untouched, even one whose result happens to hold a "tools" list."""
        return self.answers(status, headers) if seen.lists_tools else None

    def answers(self, status: int, headers: CIMultiDict[str]) -> BodyTransform | None:
        """The filter for any answer that may hold a tool list (a GET's event stream)."""
        # Media types are case-insensitive; a client reads "Text/Event-Stream" as SSE.
        content_type = headers.get("Content-Type", "").lower()
        if content_type.startswith("text/event-stream"):
            filtered: BodyTransform = SseListFilter(self._allows)
        elif "json" in content_type:
            filtered = JsonListFilter(self._allows)
        else:
            return None
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # The gateway asked for an unencoded answer; it cannot filter what it cannot
            # read, and it does not pass what it has not filtered.
            raise StreamRefused(f"a {encoding}-encoded answer cannot be filtered")
        return filtered


def _name(names: Inspected, inspection: Inspection) -> None:
    """A single message's method and tool, as gateway.calls.mcp_names would read them (a
    batch names none)."""
    names.named = True
    if inspection.batch:
        return
    message = inspection.messages[0]
    method = message.method
    tool = message.name if method == "tools/call" else None
    names.mcp_method, names.tool = bounded(method), bounded(tool)


def _streamable(headers: CIMultiDictProxy[str]) -> bool:
    """A Streamable HTTP POST must accept an SSE answer; the legacy transport's posts do not
    say so. The denial then speaks the transport's language."""
    return "text/event-stream" in headers.get("Accept", "")


def _jsonrpc_denial(request_id: str | int | None, tool: str) -> web.Response:
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": _DENIED, "message": f"Tool '{tool}' is not available with this API key."},
    }
    return web.Response(status=200, body=json.dumps(body).encode(), content_type="application/json")
