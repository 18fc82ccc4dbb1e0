"""The legacy MCP HTTP+SSE transport's `endpoint` event, rewritten to point at the gateway.

A legacy server opens its SSE stream with `event: endpoint` whose data is the path (or an
absolute URL on the server's origin) the client must POST messages to. Behind the gateway that
path must become `/mcp-connect/{server}/...`, query kept, or the client would post past the
gateway (and without a key). Pure: bytes in, bytes out; events pass through as soon as they
are complete, and after the endpoint event everything passes untouched.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# Inspect at most this much of a stream for the endpoint event; it comes first in practice.
_SCAN_LIMIT = 64 * 1024
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EndpointRewriter:
    """Feed it the upstream's SSE bytes; it returns what to send to the client."""

    def __init__(self, upstream_url: str, gateway_prefix: str) -> None:
        parts = urlsplit(upstream_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._base = parts.path.rstrip("/")
        self._prefix = gateway_prefix.rstrip("/")
        self._buffer = b""
        self._seen = 0
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return chunk
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
            out.append(self._buffer)
            self._buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        """What is still buffered when the stream ends."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _rewrite_event(self, event: bytes) -> bytes:
        lines = event.splitlines(keepends=True)
        if not any(_field(line) == (b"event", b"endpoint") for line in lines):
            return event
        self.done = True
        rewritten = []
        for line in lines:
            name, value = _field(line)
            if name == b"data":
                ending = line[len(line.rstrip(b"\r\n")) :]
                target = self.gateway_path(value.decode("utf-8", "replace"))
                line = b"data: " + target.encode() + ending
            rewritten.append(line)
        return b"".join(rewritten)

    def gateway_path(self, endpoint: str) -> str:
        """Map an upstream endpoint (path or same-origin URL) to the gateway's path for it."""
        if endpoint.startswith(("http://", "https://")):
            parts = urlsplit(endpoint)
            if f"{parts.scheme}://{parts.netloc}" != self._origin:
                return endpoint  # another origin: not ours to route
            endpoint = parts.path + (f"?{parts.query}" if parts.query else "")
        if not endpoint.startswith("/"):
            return endpoint  # relative: resolves against the stream's URL, already ours
        path, sep, query = endpoint.partition("?")
        if self._base and not (path == self._base or path.startswith(self._base + "/")):
            return endpoint  # outside the server's url path: no gateway path maps to it
        return self._prefix + path[len(self._base) :] + sep + query


def _field(line: bytes) -> tuple[bytes, bytes]:
    name, sep, value = line.rstrip(b"\r\n").partition(b":")
    if not sep:
        return name, b""
    return name, value[1:] if value.startswith(b" ") else value
