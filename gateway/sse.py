"""The legacy MCP HTTP+SSE transport's `endpoint` event, rewritten to point at the gateway.

A legacy server opens its SSE stream with `event: endpoint` whose data is the URL the client
must POST messages to, resolved by the client against the stream's URL. Behind the gateway it
must become `/mcp-connect/{server}/...`, query kept, or the client would post past the gateway
(and without a key). The upstream is not trusted to say where the client goes next: its
endpoint is resolved as a client would resolve it (RFC 3986: relative references, dot
segments, `//host`, any scheme spelling), and unless the result lies on the upstream's own
origin under the server's url path, and maps to a gateway path that stays under
`/mcp-connect/{server}/`, the stream is refused (EndpointRefused): the client never receives
that event.

Pure: bytes in, bytes out. Events pass as soon as they are complete. After the first endpoint
event (or 64 KiB without one: not a legacy stream) the stream passes untouched, only guarded:
a later endpoint event, which some clients would follow, refuses the stream before its end
reaches the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from gateway import paths
from gateway.transform import StreamRefused

# Inspect at most this much of a stream for the endpoint event; it comes first in practice.
_SCAN_LIMIT = 64 * 1024
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_ENDPOINT_FIELD = re.compile(rb"[\r\n]event: ?endpoint(?:\r\n|\r|\n)")
# Enough of a previous chunk to find an `event: endpoint` line split across two chunks.
_CARRY = 32
_DEFAULT_PORTS = {"http": 80, "https": 443}


class EndpointRefused(StreamRefused):
    """The upstream's endpoint event would send the client somewhere it must not go."""


@dataclass(frozen=True, slots=True)
class EndpointTarget:
    """What a rewrite needs: the server's configured url, its name, and the upstream URL of
    the stream itself (relative endpoints resolve against it)."""

    server_url: str
    server: str
    stream_url: str


class EndpointRewriter:
    """Feed it the upstream's SSE bytes; it returns what to send to the client."""

    def __init__(self, target: EndpointTarget) -> None:
        parts = urlsplit(target.server_url)
        self._origin = _origin_of(parts.scheme, parts.hostname, parts.port)
        self._base = parts.path.rstrip("/")
        self._server = target.server
        self._prefix = f"/{paths.MCP_PREFIX}/{target.server}"
        self._stream_url = target.stream_url
        self._buffer = b""
        self._seen = 0
        self._carry = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return self._guard(chunk)
        self._buffer += chunk
        self._seen += len(chunk)
        out = []
        while not self.done:
            match = _EVENT_END.search(self._buffer)
            if match is None:
                break
            event, self._buffer = self._buffer[: match.end()], self._buffer[match.end() :]
            out.append(self._rewrite_event(event))
        if not self.done and self._seen > _SCAN_LIMIT:
            self.done = True  # no endpoint event early on: not a legacy stream
        if self.done:
            self._carry = b"\n"  # the buffer starts at an event boundary
            rest, self._buffer = self._buffer, b""
            out.append(self._guard(rest))
        return b"".join(out)

    def flush(self) -> bytes:
        """What is still buffered when the stream ends."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _guard(self, chunk: bytes) -> bytes:
        """Pass `chunk`, unless it completes a second `event: endpoint` line."""
        suspect = b"endpoint" in chunk or b"endpoint" in self._carry + chunk[:_CARRY]
        if suspect and _ENDPOINT_FIELD.search(self._carry + chunk):
            raise EndpointRefused("a second endpoint event")
        self._carry = (self._carry + chunk)[-_CARRY:]
        return chunk

    def _rewrite_event(self, event: bytes) -> bytes:
        lines = event.splitlines(keepends=True)
        if not any(_field(line) == (b"event", b"endpoint") for line in lines):
            return event
        self.done = True
        data = [line for line in lines if _field(line)[0] == b"data"]
        if len(data) != 1:
            raise EndpointRefused("an endpoint event needs exactly one data line")
        rewritten = []
        for line in lines:
            if line is data[0]:
                ending = line[len(line.rstrip(b"\r\n")) :]
                target = self.gateway_path(_field(line)[1].decode("utf-8", "replace"))
                line = b"data: " + target.encode() + ending
            rewritten.append(line)
        return b"".join(rewritten)

    def gateway_path(self, endpoint: str) -> str:
        """The gateway path for an upstream endpoint, or EndpointRefused."""
        if any(c.isspace() or c < " " or c in "\\\x7f" for c in endpoint) or not endpoint:
            raise EndpointRefused("whitespace, controls or backslashes in the endpoint")
        resolved = urlsplit(urljoin(self._stream_url, endpoint))
        try:
            port = resolved.port
        except ValueError:
            raise EndpointRefused("a malformed port") from None
        if resolved.username is not None or resolved.password is not None:
            raise EndpointRefused("user information in the endpoint")
        if _origin_of(resolved.scheme, resolved.hostname, port) != self._origin:
            raise EndpointRefused("the endpoint is on another origin")
        path = resolved.path or "/"
        base = self._base
        if base and not (path == base or path.startswith(base + "/")):
            raise EndpointRefused("the endpoint is outside the server's url path")
        target = self._prefix + path[len(base) :]
        if resolved.query:
            target += "?" + resolved.query
        try:
            route = paths.route(target)
        except paths.PathError as exc:
            raise EndpointRefused(f"the endpoint's path is not acceptable: {exc}") from None
        if route.kind != "mcp" or route.server != self._server:
            raise EndpointRefused("the endpoint leaves the server's gateway path")
        return target


def _origin_of(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int]:
    scheme = scheme.lower()
    return scheme, (host or "").lower(), port or _DEFAULT_PORTS.get(scheme, -1)


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, sep, value = line.rstrip(b"\r\n").partition(b":")
    if not sep:
        return name, b""
    return name, value[1:] if value.startswith(b" ") else value
