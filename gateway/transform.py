"""The seams through which a request's body may be judged before it goes upstream, and an
answer's body rewritten on its way to the client.

The forwarder knows nothing of SSE endpoints or MCP tool lists: a route that needs to rewrite
what comes back hands it a factory, which looks at the upstream's answer head and returns a
BodyTransform (or None: the body passes untouched, at no cost). A transform that finds the
answer unacceptable raises StreamRefused; the forwarder then cuts the client's connection,
since the head has already been sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy


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


class BodyCheck(NamedTuple):
    """A request body to read whole (at most `limit` bytes, 413 past it) and judge before it
    goes upstream: `check` returns None to forward it, or the answer to give instead. (A
    named tuple: one is made per inspected request.)"""

    limit: int
    check: Callable[[CIMultiDictProxy[str], bytes], web.StreamResponse | None]


def chain(first: TransformFactory, then: TransformFactory) -> TransformFactory:
    """Both rewrites, `first`'s output fed to `then`."""

    def for_answer(status: int, headers: CIMultiDict[str]) -> BodyTransform | None:
        a, b = first(status, headers), then(status, headers)
        if a is None or b is None:
            return a or b
        return _Chained(a, b)

    return for_answer


class _Chained:
    def __init__(self, first: BodyTransform, then: BodyTransform) -> None:
        self._first = first
        self._then = then

    def feed(self, chunk: bytes) -> bytes:
        return self._then.feed(self._first.feed(chunk))

    def flush(self) -> bytes:
        return self._then.feed(self._first.flush()) + self._then.flush()
