"""The access log: one line per request, cheap on the hot path.

Going through `logging` costs tens of microseconds a line (a LogRecord, a formatter, a
timestamp rendered per line, a write). Like nginx, Keystile instead appends the formatted
line to a buffer and writes the buffer to stderr once a second, when it grows past 64 KiB,
and at shutdown. The timestamp is rendered once per second. A crash loses at most the last
second of access lines, never a security or error log line (those go through `logging`).

    2026-11-22T10:15:02Z 10.0.0.7 "POST /mcp-connect/github/mcp" 200 183 1.4ms

Lines never carry headers, so never a key; and since a careless client may put one in the
URL (`?api_key=...`), query values whose name sounds like a credential, or that look like a
Keystile key, are written as `REDACTED`.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO
from urllib.parse import unquote

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_FLUSH_BYTES = 64 * 1024
_CREDENTIAL_NAME = re.compile(
    r"key|token|secret|passw|pwd|auth|credential|session|signature|sig$|code|jwt|bearer", re.I
)
_REDACTED = "REDACTED"


def redacted_target(raw_target: str) -> str:
    """The request target with credential-like query values replaced."""
    path, sep, query = raw_target.partition("?")
    if not sep:
        return raw_target
    params = []
    for param in query.split("&"):
        name, eq, value = param.partition("=")
        if eq and value and _looks_secret(name, value):
            value = _REDACTED
        params.append(f"{name}{eq}{value}")
    return f"{path}?{'&'.join(params)}"


def _looks_secret(name: str, value: str) -> bool:
    return bool(_CREDENTIAL_NAME.search(unquote(name))) or "ks1-" in unquote(value)


class AccessLogBuffer:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""

    def redirect(self, stream: TextIO | None) -> None:
        """Write to `stream` from now on (None: stderr)."""
        self.flush()
        self._stream = stream

    def stamp(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self._stamp

    def append(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text, self._lines, self._size = "".join(self._lines), [], 0
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or full: access lines are not worth failing a request for


BUFFER = AccessLogBuffer()


class AccessLogger(AbstractAccessLogger):
    """`aiohttp`'s access logger interface, writing into the process's AccessLogBuffer."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        target = redacted_target(request.raw_path)
        BUFFER.append(
            f'{BUFFER.stamp()} {request.remote} "{request.method} {target}" '
            f"{response.status} {response.body_length} {time * 1000:.1f}ms\n"
        )

    @property
    def enabled(self) -> bool:
        return True


def flush_access_log() -> None:
    BUFFER.flush()
