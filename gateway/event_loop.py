"""Which event loop serves: uvloop (libuv, in C) unless the operator chose asyncio's own.

A proxy's event loop does part of the work of every request (readiness polling, callbacks,
socket transports). uvloop does that work in C with the same asyncio API, as aiohttp's and
uvicorn's deployments commonly run; in bench/RESULTS.md asyncio's loop cost 1.08x uvloop's
CPU per request (median of five runs, 0.99-1.27x). It does not exist on Windows; there, or when
`gateway.event_loop = "asyncio"`, asyncio's selector loop serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("keystile.event_loop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
T = TypeVar("T")


def loop_factory(name: str) -> LoopFactory:
    """A factory of the named loop ("uvloop" or "asyncio")."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: serving on asyncio's event loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], name: str) -> T:
    """asyncio.run on the named loop (asyncio.run takes no loop factory before 3.12)."""
    with asyncio.Runner(loop_factory=loop_factory(name)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """ "uvloop" or "asyncio": which loop this process serves on (for the start-up line)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
