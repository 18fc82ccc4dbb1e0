"""Markdown tables from a results JSON, for bench/RESULTS.md.

Run: python -m bench.summary bench/results/latest.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ms(entry: dict[str, Any]) -> str:
    return f"{entry['median_ms']} / {entry['p99_ms']} / {entry['max_ms']}"


def render(r: dict[str, Any]) -> str:
    out: list[str] = []
    meta = r["meta"]
    m = meta["machine"]
    out += [
        f"Date: {meta['date']} · command: `{meta['command']}` · duration "
        f"{meta['duration_seconds']} s · git {m['git_head'][:10]} "
        f"({m['git_modified_tracked_files']} tracked files modified in the work tree)",
        "",
        f"Machine: {m['nproc']} CPUs, {m['memory_gib']} GiB, kernel {m['kernel']}, Python "
        f"{m['python']}, aiohttp {m['aiohttp']}, {' '.join(m['wrk'])[:40]}, {m['nginx']}; "
        f"load average at start {m['loadavg_at_start']}, at end {meta['loadavg_at_end']}.",
        "",
        "```",
        *m["lscpu"][:10],
        "```",
        "",
        "### Throughput (median of rounds; ratios = median of per-round ratios)",
        "",
        "| target | req/s | p50 ms | p99 ms | CPU µs/req | upstream µs/req | other load "
        "(cores) | req/s ÷ ref | CPU ÷ ref | req/s ÷ nginx | CPU ÷ nginx |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["throughput"]["summary"].items():
        out.append(
            f"| {name} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['cpu_us_per_req']:.1f} | {s['upstream_cpu_us_per_req']:.1f} | "
            f"{s['other_load_cores']:.2f} | {s['rps_ratio_to_reference']} | "
            f"{s['cpu_ratio_to_reference']} | {s['rps_ratio_to_nginx']} | "
            f"{s['cpu_ratio_to_nginx']} |"
        )
    out += ["", "Per round (CPU µs/req):", ""]
    rounds: dict[str, list[str]] = {}
    for row in r["throughput"]["rounds"]:
        rounds.setdefault(row["target"], []).append(
            f"{row['cpu_us_per_req']} ({row['other_load_cores']:.2f})"
        )
    out += [f"- {name}: {', '.join(vals)}" for name, vals in rounds.items()]
    out += ["", "(in brackets: other load in cores during that run)", ""]
    w = r.get("workers", {})
    if "pinned" in w:
        p, u = w["pinned"], w["unpinned"]
        out += [
            "### Workers",
            "",
            "| | 1 worker req/s | 2 workers req/s | scaling | CPU µs/req 1 → 2 |",
            "|---|---|---|---|---|",
            f"| pinned (one server core) | {p['1_worker']['rps']:.0f} | "
            f"{p['2_workers']['rps']:.0f} | {p['rps_scaling']} | "
            f"{p['1_worker']['cpu_us_per_req']} → {p['2_workers']['cpu_us_per_req']} |",
            f"| unpinned (both cores, shared with wrk and upstream) | {u['1_worker']['rps']:.0f} "
            f"| {u['2_workers']['rps']:.0f} | {u['rps_scaling']} | "
            f"{u['1_worker']['cpu_us_per_req']} → {u['2_workers']['cpu_us_per_req']} |",
            "",
        ]
    s = r.get("streaming", {})
    if "sse_time_to_first_event" in s:
        t = s["sse_time_to_first_event"]
        out += [
            "### Streaming",
            "",
            "SSE time to first event, fresh connection per run, ms (median / p99 / max):",
            "",
            *(f"- {n}: {_ms(t[n])}" for n in ("direct", "reference", "keystile", "nginx")),
            "",
            f"Events 50 ms apart arrive at {s['sse_event_arrivals_ms']['arrivals']} ms.",
            "",
        ]
        big = s["large_response"]
        out += [
            f"10 MiB response, MiB/s (fast reader): {big['fast_reader_mib_per_s']}. Keystile peak "
            f"RSS growth (fresh process): fast reader {big['fast_reader']['peak_rss_growth_mib']}"
            f" MiB, slow reader ({big['slow_reader']['seconds']} s) "
            f"{big['slow_reader']['peak_rss_growth_mib']} MiB.",
            "",
        ]
    out += _hot_path(r) + _paired(r) + _usage_query(r) + _targets(r)
    return "\n".join(out)


def _hot_path(r: dict[str, Any]) -> list[str]:
    hot = r.get("hot_path", {})
    if "tool_policy" not in hot:
        return []
    policy, calls = hot["tool_policy"], hot["call_records"]
    out = [
        "### The hot path's variants (same process, same request)",
        "",
        "| | CPU µs/req | vs. the plain key |",
        "|---|---|---|",
        f"| a key, no tool policy | {policy['cpu_us_per_req_no_policy']} | — |",
        f"| a key with a 3-pattern tool policy | {policy['cpu_us_per_req_policy']} | "
        f"{policy['extra_cpu']:+.1%} |",
    ]
    oauth = hot.get("oauth_token")
    if oauth:
        out.append(
            f"| an OAuth access token | {oauth['cpu_us_per_req_token']} | "
            f"{oauth['difference']:+.1%} |"
        )
    out += [
        "",
        f"Call records on (the default): {calls['cpu_us_per_req_on']} µs/req = "
        f"{calls['ratio_to_reference_on']}× the reference; off: {calls['cpu_us_per_req_off']} "
        f"µs/req = {calls['ratio_to_reference_off']}×. Heap per buffered record: "
        f"{calls['heap_bytes_per_buffered_record']} B.",
        "",
    ]
    return out


def _paired(r: dict[str, Any]) -> list[str]:
    paired = r.get("paired", {})
    if not paired.get("summary"):
        return []
    out = [
        "### Paired: two targets loaded at the same moments",
        "",
        "| other / base | CPU ratio, median | min | max | rounds | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in paired["summary"].items():
        out.append(
            f"| {name} | {p['ratio_median']} | {p['ratio_min']} | {p['ratio_max']} | "
            f"{p['rounds']} | {p['errors'] or 0} |"
        )
    out += ["", "Per round (other / base: ratio, other's and base's CPU µs/req):", ""]
    for row in paired["rounds"]:
        out.append(
            f"- round {row['round']}, {row['other']} / {row['base']}: {row['ratio']} "
            f"({row['other_cpu_us_per_req']} / {row['base_cpu_us_per_req']}; other load "
            f"{row['other_load_cores']})"
        )
    return [*out, ""]


def _usage_query(r: dict[str, Any]) -> list[str]:
    usage = r.get("usage_query", {})
    if "calls" not in usage:
        return []
    out = [
        "### Usage at volume",
        "",
        f"{usage['calls']:,} call records ({usage['tables']['calls']['table_mib']} MiB, indexes "
        f"{usage['tables']['calls']['indexes_mib']} MiB), "
        f"{usage['tables']['usage_hourly']['rows']:,} hourly roll-up rows; filled in "
        f"{usage['fill_seconds']['total']} s. GET /api/usage for the busiest key over 7 days:",
        "",
    ]
    for name, timing in usage.get("one_key_7_days", {}).items():
        out.append(f"- {name}: median {timing['median_ms']} ms, max {timing['max_ms']} ms")
    out += ["", "Workspace-wide (no target):", ""]
    for name, timing in usage.get("informational", {}).items():
        out.append(f"- {name}: median {timing['median_ms']} ms, max {timing['max_ms']} ms")
    return [*out, ""]


def _targets(r: dict[str, Any]) -> list[str]:
    checks = r.get("targets", [])
    if not checks:
        return []
    out = ["### Targets", "", "| what | target | measured | met |", "|---|---|---|---|"]
    for c in checks:
        met = {True: "met", False: "MISSED", None: "—"}[c["met"]]
        out.append(f"| {c['what']} | {c['target']} | {c['measured']} | {met} |")
    return [*out, ""]


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
