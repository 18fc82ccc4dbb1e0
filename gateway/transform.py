"""The seam through which an answer's body may be rewritten on its way to the client.

The forwarder knows nothing of SSE endpoints or MCP tool lists: a route that needs to rewrite
what comes back hands it a factory, which looks at the upstream's answer head and returns a
BodyTransform (or None: the body passes untouched, at no cost). A transform that finds the
answer unacceptable raises StreamRefused; the forwarder then cuts the client's connection,
since the head has already been sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDict


class StreamRefused(Exception):
    """The answer must not reach the client; what was sent of it stays incomplete."""


class BodyTransform(Protocol):
    def feed(self, chunk: bytes) -> bytes:
        """What to send the client for this chunk (possibly nothing yet)."""
        ...

    def flush(self) -> bytes:
        """What is still held when the answer ends."""
        ...


# Called with the answer's status and headers (which it may change, e.g. Content-Length).
TransformFactory = Callable[[int, CIMultiDict[str]], BodyTransform | None]
