"""The one seam between the data plane and MCP awareness.

The data plane asks one question per request: `ToolGuard.policy(principal)`. For a key and
user without `tools` (the common case) the answer is None after two attribute reads, and the
request is forwarded exactly as before: nothing is inspected or filtered. With a policy, the
guard hands the forwarder a request check (the POST body is read whole, at most
`mcp.max_inspect_bytes`, and inspected before anything goes upstream) and an answer filter
(tools/list results lose the denied tools, in JSON bodies and SSE events).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import policy as scope
from gateway.errors import ApiError
from gateway.mcp.inspect import InspectError, inspect
from gateway.mcp.listing import JsonListFilter, SseListFilter
from gateway.mcp.patterns import ToolPolicy, policy_for
from gateway.models import Principal
from gateway.transform import BodyTransform, StreamRefused, TransformFactory

_DENIED = -32602


def tool_not_allowed(tool: str) -> ApiError:
    return ApiError(403, "tool_not_allowed", f"Tool '{tool}' is not available with this API key.")


class ToolGuard:
    def __init__(self, configured: Collection[str], max_inspect_bytes: int) -> None:
        self._configured = frozenset(configured)
        self.max_inspect_bytes = max_inspect_bytes
        # Many keys share a few policies: compiled once per distinct (tools, scope) input.
        self._policies = functools.lru_cache(maxsize=4096)(self._compile)

    def policy(self, principal: Principal) -> ToolPolicy | None:
        key, user = principal.key, principal.user
        user_tools = None if user.role == "admin" else user.tools
        if key.tools is None and user_tools is None:
            return None
        return self._policies(key.tools, user_tools, key.servers, user.servers, user.role)

    def _compile(
        self,
        key_tools: tuple[str, ...] | None,
        user_tools: tuple[str, ...] | None,
        key_servers: tuple[str, ...],
        user_servers: tuple[str, ...],
        role: str,
    ) -> ToolPolicy | None:
        reach = scope.reachable(key_servers, user_servers, role, self._configured)
        return policy_for(key_tools, user_tools, reach)

    def check_request(
        self, policy: ToolPolicy, server: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> web.StreamResponse | None:
        """None to forward the body; otherwise the answer to give instead (the upstream
        never sees a denied call)."""
        try:
            inspection = inspect(
                body,
                limit=self.max_inspect_bytes,
                mcp_method=headers.getall("Mcp-Method", ()),
                mcp_name=headers.getall("Mcp-Name", ()),
                content_encoding=headers.getall("Content-Encoding", ()),
            )
        except InspectError as exc:
            return ApiError(exc.status, exc.code, exc.message).response()
        for call in inspection.tool_calls():
            assert call.name is not None  # the inspector guarantees a tools/call names its tool
            if policy.allows(server, call.name):
                continue
            if inspection.batch or not _streamable(headers):
                return tool_not_allowed(call.name).response()
            return _jsonrpc_denial(call.id, call.name)
        return None

    def answer_filter(self, policy: ToolPolicy, server: str) -> TransformFactory:
        allows = functools.partial(policy.allows, server)

        def for_answer(status: int, headers: CIMultiDict[str]) -> BodyTransform | None:
            # Media types are case-insensitive; a client reads "Text/Event-Stream" as SSE.
            content_type = headers.get("Content-Type", "").lower()
            if content_type.startswith("text/event-stream"):
                filtered: BodyTransform = SseListFilter(allows)
            elif "json" in content_type:
                filtered = JsonListFilter(allows)
            else:
                return None
            encoding = headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                # The gateway asked for an unencoded answer; it cannot filter what it cannot
                # read, and it does not pass what it has not filtered.
                raise StreamRefused(f"a {encoding}-encoded answer cannot be filtered")
            return filtered

        return for_answer


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
