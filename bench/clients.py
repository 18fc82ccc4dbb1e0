"""Measuring clients: sequential latency, SSE time to first event, big downloads, herds."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.loadgen import JSONRPC_BODY

POST_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: Sequence[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "median_ms": round(statistics.median(values), 3),
        "p90_ms": round(percentile(values, 90), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "min_ms": round(min(values), 3),
        "max_ms": round(max(values), 3),
    }


def session(connections: int = 1) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


async def post_once(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, float]:
    """One JSON-RPC POST; (status, latency ms), the whole body read."""
    headers = {**POST_HEADERS, "Authorization": f"Bearer {key}"}
    start = time.perf_counter()
    async with http.post(url, data=JSONRPC_BODY, headers=headers) as resp:
        await resp.read()
        status = resp.status
    return status, (time.perf_counter() - start) * 1000


async def sequential(
    http: aiohttp.ClientSession, url: str, keys: Sequence[str]
) -> tuple[list[float], dict[int, int]]:
    """Each key once, one after another on one keep-alive connection."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    for key in keys:
        status, ms = await post_once(http, url, key)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            latencies.append(ms)
    return latencies, statuses


async def sse_first_event(port: int, path: str, key: str | None) -> float:
    """ms from opening a fresh TCP connection to the end of the first SSE event."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        f"{auth}Connection: close\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        buffer = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                raise RuntimeError(f"SSE stream ended before an event: {buffer[:200]!r}")
            buffer += chunk
            head, sep, body = buffer.partition(b"\r\n\r\n")
            if sep and not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"SSE request failed: {head[:200]!r}")
            if sep and b"\n\n" in body:
                return (time.perf_counter() - start) * 1000
    finally:
        writer.close()


async def sse_gaps(http: aiohttp.ClientSession, url: str, key: str | None) -> list[float]:
    """Arrival times (ms, relative to the first) of each event of a multi-event stream."""
    headers = {"Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    arrivals: list[float] = []
    buffer = b""
    async with http.get(url, headers=headers) as resp:
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                _, _, buffer = buffer.partition(b"\n\n")
                arrivals.append(time.perf_counter())
    return [round((t - arrivals[0]) * 1000, 2) for t in arrivals]


async def download(
    http: aiohttp.ClientSession, url: str, key: str | None, *, pause: float = 0.0
) -> tuple[int, float]:
    """GET a large body; (bytes, seconds). `pause` s after each read makes a slow reader."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    total = 0
    start = time.perf_counter()
    async with http.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"download {url}: {resp.status}")
        while chunk := await resp.content.read(65536):
            total += len(chunk)
            if pause:
                await asyncio.sleep(pause)
    return total, time.perf_counter() - start


@dataclass
class HerdResult:
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    first_done: float = 0.0


async def herd(url: str, keys: Sequence[str], connections: int) -> HerdResult:
    """All `keys` once each, `connections` at a time (each connection its own keys)."""
    result = HerdResult()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    start = time.perf_counter()

    async def worker(http: aiohttp.ClientSession) -> None:
        while True:
            try:
                key = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                status, ms = await post_once(http, url, key)
            except aiohttp.ClientError:
                status, ms = 0, 0.0
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.latencies.append(ms)
            if not result.first_done:
                result.first_done = time.perf_counter() - start

    async with session(connections) as http:
        await asyncio.gather(*(worker(http) for _ in range(connections)))
    result.seconds = time.perf_counter() - start
    return result
