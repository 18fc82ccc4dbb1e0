"""Metrics through prometheus-client: the SPEC §7 histograms and labels, no ids or made-up
names as label values, and under `--workers 2` one scrape reports the sum over the workers."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metrics import MULTIPROC_ENV
from tests.processes import ServeProcess, keystile_cli
from tests.support import DEADLINE, Keystile, Upstream


def samples(text: str, name: str) -> dict[str, float]:
    """`name`'s samples: the label set (as written) -> value."""
    out: dict[str, float] = {}
    for match in re.finditer(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        out[match.group(1) or ""] = float(match.group(2))
    return out


async def scrape(http: aiohttp.ClientSession, admin: str) -> str:
    async with http.get(f"{admin}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_requests_are_counted_and_timed_by_route_server_and_class(
    keystile: Keystile, upstream: Upstream
) -> None:
    user = await keystile.user(servers=["github"])
    issued = await keystile.key(user, servers=["github"], permissions=["mcp"])
    for _ in range(3):
        status, _, _ = await keystile.request("POST", "/mcp-connect/github/x", issued.key, json={})
        assert status == 200
    assert (await keystile.request("GET", "/mcp-connect/gitlab/x", issued.key))[0] == 403
    assert (await keystile.request("GET", "/mcp-connect/made-up-server/x", issued.key))[0] == 403
    assert (await keystile.request("GET", "/api/me", issued.key))[0] == 200
    text = await scrape(keystile.http, keystile.admin)

    requests = samples(text, "keystile_requests_total")
    assert requests['{route="mcp",server="github",status_class="2xx"}'] == 3
    assert requests['{route="mcp",server="gitlab",status_class="4xx"}'] == 1
    assert requests['{route="me",server="",status_class="2xx"}'] == 1
    durations = samples(text, "keystile_request_duration_seconds_count")
    assert durations['{route="mcp",server="github"}'] == 3
    assert samples(text, "keystile_upstream_headers_seconds_count")['{server="github"}'] == 3
    assert samples(text, "keystile_argon2_seconds_count")[""] >= 1
    assert samples(text, "keystile_cache_hits_total")[""] >= 4
    # Labels name route kinds, configured servers and classes: never ids or made-up names.
    for forbidden in ("made-up-server", user.id, issued.record.id, user.workspace_id):
        assert forbidden not in text


async def test_a_scrape_of_two_workers_reports_their_sum(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = keystile_cli("bootstrap", database_url=database_url)
    assert boot.returncode == 0, boot.stderr
    admin_key = boot.stdout.strip().splitlines()[-1]
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(metrics_dir))  # the workers' shared directory
    server = ServeProcess(database_url, tmp_path, workers=2)
    try:
        await server.wait_ready()
        auth = {"Authorization": f"Bearer {admin_key}"}
        connector = aiohttp.TCPConnector(force_close=True)  # every request on a new connection
        async with aiohttp.ClientSession(connector=connector) as http:
            sent = 0

            def both_served() -> bool:
                shares = _per_worker(metrics_dir)
                return sent >= 20 and len(shares) == 2 and min(shares.values()) > 0

            # New connections spread over the workers (SO_REUSEPORT) once both listen; go on
            # until each has answered some, as its own metrics file shows.
            async with asyncio.timeout(DEADLINE):
                while not both_served():
                    async with http.get(f"{server.gateway}/api/me", headers=auth) as resp:
                        assert resp.status == 200
                    sent += 1
            per_worker = _per_worker(metrics_dir)
            assert len(per_worker) == 2 and sum(per_worker.values()) == sent
            # Whichever worker answers a scrape, it reports the sum, not its own share.
            for _ in range(20):
                text = await scrape(http, server.admin)
                total = samples(text, "keystile_requests_total")
                assert total['{route="me",server="",status_class="2xx"}'] == sent, per_worker
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.close()


def _per_worker(directory: Path) -> dict[str, float]:
    """Each worker's own count of 2xx /api/me requests, read from its files alone."""
    counts: dict[str, float] = {}
    for counter_file in directory.glob("counter_*.db"):
        pid = counter_file.stem.removeprefix("counter_")
        alone = directory / f"alone-{pid}"
        alone.mkdir(exist_ok=True)
        shutil.copy(counter_file, alone / counter_file.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        value = registry.get_sample_value(
            "keystile_requests_total", {"route": "me", "server": "", "status_class": "2xx"}
        )
        counts[pid] = value or 0.0
        shutil.rmtree(alone)
    return counts
