"""Process metrics as plain counters, rendered in the Prometheus text format.

Plain attributes instead of a metrics library: the hot path pays one integer increment.
Labels never carry keys, hashes or header values: only route kinds and status classes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Metrics:
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route kind, status)
    cache_hits: int = 0
    cache_misses: int = 0
    auth_failures: int = 0
    argon2_verifications: int = 0
    store_errors: int = 0
    upstream_errors: int = 0
    last_used_flushes: int = 0
    last_used_flush_failures: int = 0
    last_used_dropped: int = 0
    last_used_pending: int = 0
    cached_keys: int = 0
    cache_revalidations: int = 0
    invalidations: int = 0
    listener_connects: int = 0
    listener_up: int = 0
    calls_written: int = 0
    calls_failed: int = 0
    calls_dropped: int = 0
    calls_pending: int = 0

    def write_behind(self, name: str, outcome: str, count: int = 1) -> None:
        """A write-behind outcome: `written`, `failed` (kept for later) or `dropped`."""
        if name == "last_used":
            attribute = {
                "written": "last_used_flushes",
                "failed": "last_used_flush_failures",
                "dropped": "last_used_dropped",
            }[outcome]
        else:
            attribute = f"calls_{outcome}"
        setattr(self, attribute, getattr(self, attribute) + count)

    def write_behind_pending(self, name: str, count: int) -> None:
        setattr(self, "last_used_pending" if name == "last_used" else "calls_pending", count)

    def render(self) -> str:
        lines = [
            "# HELP keystile_requests_total Data-plane requests by route and status.",
            "# TYPE keystile_requests_total counter",
        ]
        for (route, status), count in sorted(self.requests.items()):
            lines.append(f'keystile_requests_total{{route="{route}",status="{status}"}} {count}')
        for name, kind, help_text in _SCALARS:
            lines.append(f"# HELP keystile_{name} {help_text}")
            lines.append(f"# TYPE keystile_{name} {kind}")
            lines.append(f"keystile_{name} {getattr(self, _ATTR.get(name, name))}")
        return "\n".join(lines) + "\n"


_SCALARS = (
    ("cache_hits_total", "counter", "Requests whose key was verified from the cache."),
    ("cache_misses_total", "counter", "Requests that needed the key store."),
    ("auth_failures_total", "counter", "Requests refused with 401."),
    ("argon2_verifications_total", "counter", "argon2 verifications run."),
    ("store_errors_total", "counter", "Key lookups that failed because the store was unreachable."),
    ("upstream_errors_total", "counter", "Requests answered 502/504 because of the upstream."),
    ("last_used_flushes_total", "counter", "Successful last-used batch writes."),
    ("last_used_flush_failures_total", "counter", "Failed last-used batch writes (retried)."),
    (
        "last_used_dropped_total",
        "counter",
        "Last-used updates dropped because the buffer was full.",
    ),
    ("last_used_pending", "gauge", "Last-used updates waiting to be written."),
    ("cached_keys", "gauge", "Verified keys held in the cache."),
    ("cache_revalidations_total", "counter", "Cache hits re-checked because it was untrusted."),
    ("invalidations_total", "counter", "Invalidation notices received."),
    ("listener_connects_total", "counter", "Times the invalidation listener (re)subscribed."),
    ("listener_up", "gauge", "1 while the invalidation listener is subscribed."),
)
_ATTR = {name: name.removesuffix("_total") for name, _, _ in _SCALARS}
