"""Process metrics through prometheus-client (SPEC §7).

Histograms of request duration (by route and server), of the time to an upstream's response
head (by server) and of argon2 verifications; request counters by route, server and status
class; counters and gauges for the cache, the invalidation listener and the write-behind
buffers. Labels are route kinds, configured server names and status classes: never key or
user ids, never a header value, never a server name a client made up.

Under `keystile serve --workers N` the supervisor gives every worker one
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode: each worker writes its values
to a memory-mapped file there), so a scrape of the admin port, whichever worker answers it,
reports the sum over all workers. A single process keeps its values in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# One series per counter, not a second `_created` timestamp series beside each.
disable_created_metrics()  # type: ignore[no-untyped-call]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. A cached key's request takes about a millisecond; streams run for minutes.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ARGON2_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

# name, help: plain counters, `keystile_<name>_total`.
_COUNTERS = (
    ("cache_hits", "Requests whose key was verified from the cache."),
    ("cache_misses", "Requests that needed the key store."),
    ("auth_failures", "Requests refused with 401."),
    ("argon2_verifications", "argon2 verifications run."),
    ("store_errors", "Key lookups that failed because the store was unreachable."),
    ("upstream_errors", "Requests answered 502/504 (or cut) because of the upstream."),
    ("cache_revalidations", "Cache hits re-checked because the cache was untrusted."),
    ("invalidations", "Invalidation notices received."),
    ("listener_connects", "Times the invalidation listener (re)subscribed."),
)
# What each write-behind buffer reports, `keystile_<writer>_<what>`.
_WRITERS = ("last_used", "calls")


class Metrics:
    """The metrics of one process; `render()` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        r = self.registry
        self.requests = Counter(
            "keystile_requests",
            "Data-plane requests by route, server and status class.",
            ["route", "server", "status_class"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "keystile_request_duration_seconds",
            "Data-plane request duration, from the request's arrival to the answer's end.",
            ["route", "server"],
            registry=r,
            buckets=_REQUEST_BUCKETS,
        )
        self.upstream_headers_seconds = Histogram(
            "keystile_upstream_headers_seconds",
            "From sending a request upstream to the upstream's response head.",
            ["server"],
            registry=r,
            buckets=_REQUEST_BUCKETS,
        )
        self.argon2_seconds = Histogram(
            "keystile_argon2_seconds",
            "argon2 verification time (in the verification threads).",
            registry=r,
            buckets=_ARGON2_BUCKETS,
        )
        self._counters = {
            name: Counter(f"keystile_{name}", text, registry=r) for name, text in _COUNTERS
        }
        self.cache_hits = self._counters["cache_hits"]
        self.cache_misses = self._counters["cache_misses"]
        self.auth_failures = self._counters["auth_failures"]
        self.argon2_verifications = self._counters["argon2_verifications"]
        self.store_errors = self._counters["store_errors"]
        self.upstream_errors = self._counters["upstream_errors"]
        self.cache_revalidations = self._counters["cache_revalidations"]
        self.invalidations = self._counters["invalidations"]
        self.listener_connects = self._counters["listener_connects"]
        self._writers: dict[str, dict[str, Counter | Gauge]] = {
            writer: self._writer_metrics(writer) for writer in _WRITERS
        }
        self.cached_keys = Gauge(
            "keystile_cached_keys",
            "Verified keys held in the cache.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.listener_up = Gauge(
            "keystile_listener_up",
            "1 while the invalidation listener is subscribed (under --workers: the number of "
            "workers whose listener is).",
            registry=r,
            multiprocess_mode="livesum",
        )
        # (route, server, status class) -> its counter and histogram children: resolved once.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._upstream_children: dict[str, Histogram] = {}

    def _writer_metrics(self, writer: str) -> dict[str, Counter | Gauge]:
        r = self.registry
        what = "last-used updates" if writer == "last_used" else "call records"
        return {
            "written": Counter(
                f"keystile_{writer}_flushes", f"Successful batch writes of {what}.", registry=r
            ),
            "failed": Counter(
                f"keystile_{writer}_flush_failures",
                f"Failed batch writes of {what} (kept and retried).",
                registry=r,
            ),
            "dropped": Counter(
                f"keystile_{writer}_dropped",
                f"{what.capitalize()} dropped because the buffer was full.",
                registry=r,
            ),
            "pending": Gauge(
                f"keystile_{writer}_pending",
                f"{what.capitalize()} waiting to be written.",
                registry=r,
                multiprocess_mode="livesum",
            ),
        }

    # --- the request path -----------------------------------------------------------------

    def request(self, route: str, server: str, status: int, seconds: float) -> None:
        """One data-plane request. `server` must be a configured name, or ""."""
        key = (route, server, status // 100)
        children = self._children.get(key)
        if children is None:
            status_class = _STATUS_CLASSES.get(status // 100, "other")
            children = self._children[key] = (
                self.requests.labels(route, server, status_class),
                self.request_seconds.labels(route, server),
            )
        children[0].inc()
        children[1].observe(seconds)

    def upstream_headers(self, server: str, seconds: float) -> None:
        child = self._upstream_children.get(server)
        if child is None:
            child = self._upstream_children[server] = self.upstream_headers_seconds.labels(server)
        child.observe(seconds)

    # --- write-behind -------------------------------------------------------------------------

    def write_behind(self, name: str, outcome: str, count: int = 1) -> None:
        """A write-behind outcome: `written`, `failed` (kept for later) or `dropped`."""
        self._writers[name][outcome].inc(count)

    def write_behind_pending(self, name: str, count: int) -> None:
        gauge = self._writers[name]["pending"]
        assert isinstance(gauge, Gauge)
        gauge.set(count)

    # --- reading --------------------------------------------------------------------------------

    def count(self, name: str, **labels: str) -> float:
        """This process's value of `keystile_<name>` (a counter's total, summed over the label
        values not given): for tests and the benchmark."""
        sample = name if name.endswith(("_total", "_count", "_sum")) else f"{name}_total"
        wanted = f"keystile_{sample}"
        total = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def render(self) -> bytes:
        """The exposition: this process's, or under --workers every worker's, summed."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def mark_worker_dead(pid: int) -> None:
    """Under --workers: drop a dead worker's live gauges from the sums."""
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def names(metrics: Metrics) -> Iterable[str]:
    """Every metric family this process exposes (for documentation and tests)."""
    return sorted(family.name for family in metrics.registry.collect())
