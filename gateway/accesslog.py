"""The access log: one line per data-plane request, cheap on the hot path.

Lines are formatted from a handful of fields (no strftime per request: the logging
formatter stamps them) and buffered, then written in batches by a periodic flush, so a
request costs a list append rather than a write system call.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

ACCESS_LOGGER = "keystile.access"
_BUFFER = 512  # lines held before a write; the periodic flush writes fewer


class AccessLogger(AbstractAccessLogger):
    """`<client> "<method> <path>" <status> <bytes> <ms>ms` — never headers, never keys."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.1fms',
            request.remote,
            request.method,
            request.raw_path,
            response.status,
            response.body_length,
            time * 1000,
        )


def buffered_handler(formatter: logging.Formatter) -> logging.handlers.MemoryHandler:
    """A stderr handler that writes access lines in batches (see flush_access_log)."""
    target = logging.StreamHandler(sys.stderr)
    target.setFormatter(formatter)
    return logging.handlers.MemoryHandler(_BUFFER, flushLevel=logging.ERROR, target=target)


def flush_access_log() -> None:
    for handler in logging.getLogger(ACCESS_LOGGER).handlers:
        handler.flush()
