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

import bisect
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

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
        # The three things counted on every request: in plain numbers read at scrape time in
        # a single process (a dict update, not a lock and a value object per sample); through
        # prometheus-client's shared files under --workers, where the sum must cross processes.
        self._hot: _HotMetrics = _SharedHot(r) if self.multiprocess else _LocalHot(r)
        self.argon2_seconds = Histogram(
            "keystile_argon2_seconds",
            "argon2 verification time (in the verification threads).",
            registry=r,
            buckets=_ARGON2_BUCKETS,
        )
        self._counters = {
            name: Counter(f"keystile_{name}", text, registry=r) for name, text in _COUNTERS
        }
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
        self._hot.request(route, server, status, seconds)

    def upstream_headers(self, server: str, seconds: float) -> None:
        self._hot.upstream(server, seconds)

    def cache_hit(self) -> None:
        self._hot.cache_hit()

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


_REQUESTS = ("keystile_requests", "Data-plane requests by route, server and status class.")
_REQUEST_SECONDS = (
    "keystile_request_duration_seconds",
    "Data-plane request duration, from the request's arrival to the answer's end.",
)
_UPSTREAM_SECONDS = (
    "keystile_upstream_headers_seconds",
    "From sending a request upstream to the upstream's response head.",
)
_CACHE_HITS = ("keystile_cache_hits", "Requests whose key was verified from the cache.")


class _HotMetrics(Protocol):
    def request(self, route: str, server: str, status: int, seconds: float) -> None: ...

    def upstream(self, server: str, seconds: float) -> None: ...

    def cache_hit(self) -> None: ...


class _Buckets:
    """One histogram's counts per bucket (not cumulative) and sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_REQUEST_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1
        self.sum += seconds

    def family_buckets(self) -> list[tuple[str, float]]:
        bounds = [*(repr(float(b)) for b in _REQUEST_BUCKETS), "+Inf"]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class _LocalHot:
    """A single process's request metrics: plain numbers, rendered by collect()."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations: dict[tuple[str, str], _Buckets] = {}
        self._upstream: dict[str, _Buckets] = {}
        self._cache_hits = 0
        registry.register(self)

    def request(self, route: str, server: str, status: int, seconds: float) -> None:
        key = (route, server, status // 100)
        self._requests[key] = self._requests.get(key, 0) + 1
        buckets = self._durations.get((route, server))
        if buckets is None:
            buckets = self._durations[(route, server)] = _Buckets()
        buckets.observe(seconds)

    def upstream(self, server: str, seconds: float) -> None:
        buckets = self._upstream.get(server)
        if buckets is None:
            buckets = self._upstream[server] = _Buckets()
        buckets.observe(seconds)

    def cache_hit(self) -> None:
        self._cache_hits += 1

    def describe(self) -> list[Metric]:
        return []  # families appear as they are first counted

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*_REQUESTS, labels=["route", "server", "status_class"])
        for (route, server, status_class), count in sorted(self._requests.items()):
            label = _STATUS_CLASSES.get(status_class, "other")
            requests.add_metric([route, server, label], count)
        yield requests
        durations = HistogramMetricFamily(*_REQUEST_SECONDS, labels=["route", "server"])
        for (route, server), buckets in sorted(self._durations.items()):
            durations.add_metric([route, server], buckets.family_buckets(), buckets.sum)
        yield durations
        upstream = HistogramMetricFamily(*_UPSTREAM_SECONDS, labels=["server"])
        for server, buckets in sorted(self._upstream.items()):
            upstream.add_metric([server], buckets.family_buckets(), buckets.sum)
        yield upstream
        yield CounterMetricFamily(*_CACHE_HITS, value=self._cache_hits)


class _SharedHot:
    """Under --workers: prometheus-client's multiprocess values, summed at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(*_REQUESTS, ["route", "server", "status_class"], registry=registry)
        self._durations = Histogram(
            *_REQUEST_SECONDS, ["route", "server"], registry=registry, buckets=_REQUEST_BUCKETS
        )
        self._upstream = Histogram(
            *_UPSTREAM_SECONDS, ["server"], registry=registry, buckets=_REQUEST_BUCKETS
        )
        self._cache_hits = Counter(*_CACHE_HITS, registry=registry)
        # Children resolved once per label set: .labels() costs more than the increment.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._upstream_children: dict[str, Histogram] = {}

    def request(self, route: str, server: str, status: int, seconds: float) -> None:
        key = (route, server, status // 100)
        children = self._children.get(key)
        if children is None:
            label = _STATUS_CLASSES.get(status // 100, "other")
            children = self._children[key] = (
                self._requests.labels(route, server, label),
                self._durations.labels(route, server),
            )
        children[0].inc()
        children[1].observe(seconds)

    def upstream(self, server: str, seconds: float) -> None:
        child = self._upstream_children.get(server)
        if child is None:
            child = self._upstream_children[server] = self._upstream.labels(server)
        child.observe(seconds)

    def cache_hit(self) -> None:
        self._cache_hits.inc()


def mark_worker_dead(pid: int) -> None:
    """Under --workers: drop a dead worker's live gauges from the sums."""
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def names(metrics: Metrics) -> Iterable[str]:
    """Every metric family this process exposes (for documentation and tests)."""
    return sorted(family.name for family in metrics.registry.collect())
