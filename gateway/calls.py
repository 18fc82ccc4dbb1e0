"""Call records: one per data-plane request made with a verified key (SPEC §7).

A record names who called (workspace, user, key), what (route, server, MCP method, tool), how
it went (status, duration, bytes each way) and from where (the client's address), with the
request id the client and the upstream saw. Never arguments, bodies or header values.

Records are cheap to make on the request path (a slotted object; the time as a float) and are
written behind it in batches (gateway.usage). Durations are also counted in fixed buckets so
that hourly roll-ups can answer percentiles without the raw rows.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import orjson

from gateway.models import Principal

Route = Literal["mcp", "chat", "me"]

# Upper bounds (ms) of the duration buckets kept in roll-ups; the last bucket is open-ended.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
)
BUCKETS = len(DURATION_BUCKETS_MS) + 1


class CallRecord(NamedTuple):
    """A tuple of plain values: thousands wait in the write-behind buffer at a time, and the
    cyclic garbage collector stops tracking a tuple that holds only atoms, where it would walk
    every slotted object on every full collection."""

    time: float  # seconds since the epoch, when the request arrived
    request_id: str
    workspace_id: str
    user_id: str
    key_id: str
    route: Route
    server: str | None
    mcp_method: str | None
    tool: str | None
    status: int
    duration_ms: float
    bytes_in: int
    bytes_out: int
    client: str


def bucket_of(duration_ms: float) -> int:
    """The index of the duration bucket `duration_ms` falls in."""
    return bisect.bisect_left(DURATION_BUCKETS_MS, duration_ms)


def percentile_ms(buckets: list[int], fraction: float) -> float | None:
    """An estimate of the `fraction` percentile from bucket counts: linear within the bucket
    it falls in (the open-ended last bucket reports its lower bound)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = DURATION_BUCKETS_MS[index - 1] if index else 0.0
            if index >= len(DURATION_BUCKETS_MS):
                return float(low)
            high = DURATION_BUCKETS_MS[index]
            return round(low + (high - low) * (rank - seen) / count, 3)
        seen += count
    return float(DURATION_BUCKETS_MS[-1])


# --- request ids ----------------------------------------------------------------------------

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_PROCESS = secrets.token_hex(4)  # unique enough per process; the counter does the rest
_counter = itertools.count(1)


def request_id(sent: str | None) -> str:
    """The client's X-Request-Id when it is 1-128 of [A-Za-z0-9._:-], else a new one."""
    if sent is not None and _REQUEST_ID.fullmatch(sent):
        return sent
    return f"ks-{_PROCESS}-{next(_counter):x}"


@dataclass(slots=True)
class Exchange:
    """What the data plane learns about one request as it goes: for its call record, its
    access-log line and its metrics."""

    request_id: str
    started: float  # time.time() at arrival
    route: str = "invalid"
    server: str = ""  # a configured server's name, or ""
    principal: Principal | None = None  # once the key verified
    mcp_method: str | None = None
    tool: str | None = None
    named: bool = False  # mcp_method and tool are read (by the tool policy's check)
    lists_tools: bool = False  # the body asked for a tool list (the tool policy's check)
    bytes_in: int = 0
    body: bytes | None = None  # a request body read whole (never kept past the request)
    cors: dict[str, str] | None = None  # CORS headers for the answer (a browser's request)

    def call_record(self, status: int, duration: float, bytes_out: int, client: str) -> CallRecord:
        assert self.principal is not None
        p = self.principal
        route: Route = "mcp" if self.route == "mcp" else "chat" if self.route == "chat" else "me"
        # Positional: a named tuple built from keywords costs several times as much.
        return CallRecord(
            self.started,
            self.request_id,
            p.workspace.id,
            p.user.id,
            p.key.id,
            route,
            self.server or None,
            self.mcp_method,
            self.tool,
            status,
            round(duration * 1000, 3),
            self.bytes_in,
            bytes_out,
            client,
        )


def mcp_names(
    headers: Mapping[str, str], body: bytes | None, limit: int
) -> tuple[str | None, str | None]:
    """The MCP method and tool a request names: from Mcp-Method / Mcp-Name (2026-07-28), else
    from a single JSON-RPC object in a body of at most `limit` bytes. Never arguments."""
    method, name = headers.get("Mcp-Method"), headers.get("Mcp-Name")
    if method is None and body and len(body) <= limit:
        try:
            message = orjson.loads(body)  # on the hot path: several times json's speed
        except orjson.JSONDecodeError:
            try:  # what orjson refuses that others read (integers past 64 bits)
                message = json.loads(body)
            except (ValueError, RecursionError):
                return None, None
        if isinstance(message, dict) and isinstance(message.get("method"), str):
            method = message["method"]
            params = message.get("params")
            if method == "tools/call" and isinstance(params, dict):
                found = params.get("name")
                name = found if isinstance(found, str) else None
    tool = name if method == "tools/call" else None
    return bounded(method), bounded(tool)


def bounded(value: str | None) -> str | None:
    """A recorded name: it comes from a client, so it is kept short (a record stays small)."""
    return value[:200] if value is not None else None
