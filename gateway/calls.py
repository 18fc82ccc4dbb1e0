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
from dataclasses import dataclass
from typing import Literal

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


@dataclass(slots=True)
class CallRecord:
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
