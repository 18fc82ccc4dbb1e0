"""Where the time goes: py-spy samples of the Keystile process under load, summarised."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# A sample is charged to the first category whose pattern matches any of its frames, in
# this order (so "access log" wins over "aiohttp server", which calls it).
CATEGORIES: tuple[tuple[str, str], ...] = (
    (
        "access log (AccessLogger + logging)",
        r"\((logging/[^)]*|gateway/accesslog\.py|aiohttp/web_log\.py)\)",
    ),
    ("auth: parse, fingerprint, cache lookup", r"gateway/(auth|keys|cache)\.py"),
    ("path judgement (gateway.paths)", r"gateway/paths\.py"),
    ("policy checks (gateway.policy)", r"gateway/policy\.py"),
    ("tool policy: inspect the body, filter the answer (gateway.mcp)", r"gateway/mcp/"),
    ("header rewriting (gateway.headers)", r"gateway/headers\.py"),
    ("last-used record (gateway.usage)", r"gateway/usage\.py"),
    ("throttle (gateway.throttle)", r"gateway/throttle\.py"),
    ("request body read (proxy._request_body)", r"_request_body \("),
    ("response back to client (proxy._stream_back)", r"_stream_back \("),
    ("watchdog (gateway.watchdog)", r"gateway/watchdog\.py"),
    ("upstream client: request out, answer in, pool (gateway.upstream)", r"gateway/upstream\.py"),
    ("upstream request: the rest of proxy.forward", r"forward \(gateway/proxy\.py"),
    ("reference handler (bench/reference_proxy.py)", r"bench/reference_proxy\.py"),
    ("other data-plane handler code", r"gateway/dataplane\.py"),
    ("aiohttp server: parse, Request objects, dispatch", r"aiohttp/web_"),
    ("asyncio loop, transports, callbacks", r"asyncio/"),
)
# Self time of these frames is mostly the system call under them (py-spy without --native
# charges C and kernel time to the calling Python frame).
_SYSCALLS = (
    ("send (transport.write -> socket.send)", "_SelectorSocketTransport.write "),
    ("receive (socket.recv)", "_SelectorSocketTransport._read_ready__data_received "),
    ("epoll", "EpollSelector.select "),
)
_IDLE_POOL_WORKER = "_worker (concurrent/futures/thread.py)"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


def find_py_spy() -> str | None:
    """py-spy on PATH, or next to this Python (a venv's bin/, not always on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


async def record(py_spy: str, pid: int, seconds: int, out: Path, rate: int = 250) -> None:
    """Sample `pid` (all threads, idle excluded) for `seconds` into a raw collapsed file."""
    argv = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--nolineno",
        "--output",
        str(out),
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    text, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    if proc.returncode != 0 or not await asyncio.to_thread(out.exists):
        raise RuntimeError(f"py-spy failed: {text.decode(errors='replace')[-500:]}")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares by function, and shares by category (see CATEGORIES)."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        stacks.append(([_short(f) for f in frames], int(number)))
    total = sum(c for f, c in stacks if not (f and f[-1].startswith(_IDLE_POOL_WORKER))) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    compiled = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]
    idle = 0
    for frames, count in stacks:
        if frames and frames[-1].startswith(_IDLE_POOL_WORKER):
            idle += count  # a thread-pool worker blocked on its queue: py-spy calls it active
            continue
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        joined = ";".join(frames)
        category = next((n for n, rx in compiled if rx.search(joined)), "other")
        categories[category] += count

    def pct(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": name, "samples": n, "pct": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    kernel_io = {
        name: round(100 * sum(n for f, n in own.items() if f.startswith(prefix)) / total, 1)
        for name, prefix in _SYSCALLS
    }
    return {
        "samples": total,
        "socket_io_self_pct": kernel_io,
        "idle_pool_thread_samples_dropped": idle,
        "categories": pct(categories),
        "self": pct(own),
        "inclusive": pct(inclusive),
    }
