"""The Keystile benchmark: one command, every number in bench/README.md.

    python -m bench.run [--quick] [--out bench/results/latest.json] [--store-scale N]

Starts PostgreSQL (embedded, fsync off; or the server of DATABASE_URL, in databases of its
own), an upstream, Keystile (`keystile serve`, real processes), a plain aiohttp reference
proxy and nginx, then measures throughput and CPU per request, streaming, the cold path, a
herd of new keys, the key store at scale and revocation between two instances. Results go to
--out as JSON and a table on stdout. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import psutil

from bench import clients, fixtures, loadgen, nginx, profile
from bench.procs import (
    Proc,
    free_port,
    pinned,
    reset_peak_rss,
    set_affinity_tree,
    status_kib,
    wait_port,
)
from gateway import keys, usage_store
from gateway.cache import CachedKey, KeyCache, VerifiedSecret
from gateway.config import KeySettings
from gateway.embedded_pg import EmbeddedPostgres
from gateway.store import LOAD_PRINCIPAL, Actor

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MAIN_DB = f"keystile_bench_{os.getpid()}"  # per run: runs may share a DATABASE_URL server
SCALE_DB = f"keystile_bench_scale_{os.getpid()}"
USAGE_DB = f"keystile_bench_usage_{os.getpid()}"
SERVER = "bench"  # the MCP server name configured in Keystile
PROXY_PATH = f"/mcp-connect/{SERVER}"
KIB = 1024
# The hot path's CPU per request, as a fraction of the reference proxy's in the same run.
TARGET_RATIO = 0.7
# A key with a tool policy: what the policy may add to the hot path's CPU per request.
POLICY_PATTERNS = ("bench/search", "bench/get_*", "!bench/delete_*")
POLICY_TARGET = 0.15
# An OAuth access token on the hot path (SPEC §9): verified on the key's cache path, so its
# CPU per request should equal a key's; "equal" is within this much either way (run noise).
OAUTH_NOISE = 0.05
# The paired phase: two targets loaded at the same moment, each by its own wrk, their
# processes sharing the server core, so both see the same machine (see bench/README.md).
# (base, other): the ratio reported is other's CPU per request / base's.
PAIRS: tuple[tuple[str, str], ...] = (
    ("reference", "keystile"),
    ("reference", "keystile_no_calls"),
    ("keystile", "keystile_twin"),  # the control: identical processes, the same key
    ("keystile", "keystile_twin_policy"),
    ("keystile", "keystile_twin_oauth"),
)
# GET /api/usage for one key over 7 days, on a store of 10M call records: the target (ms).
USAGE_TARGET_MS = 200.0
USAGE_USERS = 4
USAGE_KEYS = 100
USAGE_DAYS = 30
USAGE_TOOLS = ["search", "get_issue", "list_files", "create_pr", "comment", "get_file", "run"]
PHASES = (
    "throughput",
    "paired",
    "workers",
    "profile",
    "streaming",
    "cold_path",
    "herd",
    "revocation",
    "store_scale",
    "usage_query",
    "attack",  # last: it leaves the driver's address throttled for a window
)


@dataclass
class Config:
    quick: bool
    out: Path
    rounds: int
    seconds: float
    warmup: float
    connections: int
    ttfb_runs: int
    cold_keys: int
    herd_keys: int
    herd_connections: int
    store_small: int
    store_scale: int
    store_sample: int
    store_passes: int
    memory_keys: int
    usage_calls: int
    usage_runs: int
    rss_keys: int
    revocations: int
    profile_seconds: int
    stats_settle: float
    keep: bool
    only: frozenset[str] = frozenset()  # phases to run; empty: all
    # Experiment: the upstream on the load core, so the server core runs the proxy alone.
    upstream_on_load_core: bool = False
    load_cpus: set[int] = field(default_factory=set)
    server_cpus: set[int] = field(default_factory=set)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (5; quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per target per round (10; 1)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--herd", type=int, help="distinct keys in the herd (10000; 100)")
    parser.add_argument("--store-scale", type=int, help="keys in the big store (1000000; 5000)")
    parser.add_argument(
        "--usage-calls", type=int, help="call records in the usage store (10000000; 100000)"
    )
    parser.add_argument("--revocations", type=int, help="revocations timed (100; 5)")
    parser.add_argument("--profile-seconds", type=int, help="py-spy seconds, 0 = off (10; 0)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs)")
    parser.add_argument(
        "--only", help=f"comma-separated phases to run (all: {','.join(PHASES)})", default=""
    )
    parser.add_argument(
        "--upstream-on-load-core",
        action="store_true",
        help="experiment: run the upstream beside wrk, leaving the server core to the proxy",
    )
    a = parser.parse_args(argv)
    q = a.quick
    cfg = Config(
        quick=q,
        out=a.out,
        rounds=a.rounds or (1 if q else 5),
        seconds=a.seconds or (1.0 if q else 10.0),
        warmup=1.0 if q else 3.0,
        connections=a.connections,
        ttfb_runs=5 if q else 50,
        cold_keys=10 if q else 300,
        herd_keys=a.herd or (100 if q else 10_000),
        herd_connections=20 if q else 256,
        store_small=1000,
        store_scale=a.store_scale or (5000 if q else 1_000_000),
        store_sample=10 if q else 200,
        store_passes=1 if q else 2,
        memory_keys=500 if q else 10_000,
        usage_calls=a.usage_calls or (100_000 if q else 10_000_000),
        usage_runs=3 if q else 9,
        rss_keys=100 if q else 2040,
        revocations=a.revocations or (5 if q else 100),
        profile_seconds=a.profile_seconds if a.profile_seconds is not None else (0 if q else 10),
        stats_settle=1.0 if q else 11.0,
        keep=a.keep,
        only=frozenset(filter(None, a.only.split(","))),
        upstream_on_load_core=a.upstream_on_load_core,
    )
    if unknown := cfg.only - set(PHASES):
        parser.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        cfg.load_cpus, cfg.server_cpus = {cpus[0]}, {cpus[1]}
    return cfg


def _cmd_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def machine_info() -> dict[str, Any]:
    git_head = _cmd_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    dirty = _cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "lscpu": _cmd_output(["lscpu"]).splitlines()[:16],
        "kernel": platform.release(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": _cmd_output(["wrk", "-v"]).splitlines()[:1],
        "nginx": _cmd_output([nginx.find_nginx() or "nginx", "-v"]),
        "git_head": git_head,
        "git_modified_tracked_files": len(dirty.splitlines()) if dirty else 0,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


class HasCpu(Protocol):
    def cpu_seconds(self) -> float: ...


class CpuWindow:
    """CPU seconds spent in a window: by given processes, by the driver and its reaped
    children (wrk), and by the whole machine, to tell our load from everyone else's."""

    def __init__(self, procs: dict[str, HasCpu]) -> None:
        self.procs = procs
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {name: p.cpu_seconds() for name, p in self.procs.items()}
        out.update(
            _machine=busy,
            _steal=getattr(sys_t, "steal", 0.0),
            _driver=own.ru_utime + own.ru_stime,
            _children=kids.ru_utime + kids.ru_stime,
            _wall=time.perf_counter(),
        )
        return out

    def stop(self) -> dict[str, float]:
        end = self._read()
        delta = {k: end[k] - self.start[k] for k in end}
        wall = delta.pop("_wall")
        ours = sum(delta[n] for n in self.procs) + delta["_driver"] + delta["_children"]
        delta["wall"] = wall
        delta["other_cores"] = max(0.0, (delta["_machine"] - ours) / wall) if wall else 0.0
        return delta


@dataclass
class Target:
    name: str
    port: int
    procs: list[Proc]
    script: Path | None = None  # the wrk script, when not the hot key's

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PROXY_PATH}"

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)


def keystile_config(
    path: Path, *, gateway: int, admin: int, upstream: int, extra: str = "", sections: str = ""
) -> Path:
    """`extra`: more [gateway] settings; `sections`: more tables, whole."""
    path.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{gateway}"\n{extra}'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[mcp_servers.{SERVER}]\nurl = "http://127.0.0.1:{upstream}/mcp"\n{sections}'
    )
    return path


def buffered_record_bytes(count: int = 20_000) -> float:
    """Heap held per call record waiting in the write-behind buffer (tracemalloc): a typical
    record, its ids shared with the cached key as on the request path, its request id its own."""
    from gateway.calls import CallRecord
    from gateway.usage import CallBuffer

    ids = (keys.new_id(), keys.new_id(), keys.new_id())
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    buffer = CallBuffer(count, lambda _: None)
    for n in range(count):
        buffer.add(
            CallRecord(
                time.time(),
                f"ks-1a2b3c4d-{n:x}",
                *ids,
                "mcp",
                SERVER,
                "tools/call",
                "search",
                200,
                1.234,
                203,
                75,
                "127.0.0.1",
            )
        )
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return round(grown / count, 1)


def tcp_listeners(port: int) -> int:
    """Listening sockets on 127.0.0.1:port (one per `--workers` process, SO_REUSEPORT)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A" and int(parts[1].split(":")[1], 16) == port:
            count += 1
    return count


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already held."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def r3(value: float) -> float:
    return round(value, 3)


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.work = Path(tempfile.mkdtemp(prefix="keystile-bench-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.procs: list[Proc] = []
        self.pg: EmbeddedPostgres | None = None
        self.root_url = ""
        self.main_url = ""
        self.created_dbs: list[str] = []
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.http: aiohttp.ClientSession | None = None
        self.wrk = loadgen.find_wrk()
        self.nginx = nginx.find_nginx()
        self.upstream_port = free_port()
        self.targets: dict[str, Target] = {}
        self._gw_ports: dict[str, int] = {}
        self._script = self.work / "wrk-post.lua"
        self.keystile_cfg: dict[str, Path] = {}
        self.admin_ports: dict[str, int] = {}
        self.admin_key = ""
        self.user_id = ""
        self.workspace_id = ""
        self.hot_key = ""
        self.cold_keys: list[str] = []
        self.herd_keys: list[str] = []
        self.rss_keys: list[str] = []

    # --- processes ---

    def spawn(self, name: str, argv: list[str], cpus: set[int] | None, **env: str) -> Proc:
        full_env = {**os.environ, "PYTHONPATH": python_path(), **env}
        proc = Proc(name, argv, log_dir=self.logs, cpus=cpus, env=full_env).start()
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    async def start_keystile(self, name: str, db_url: str, *, workers: int = 1) -> Proc:
        argv = [PY, "-m", "keystile.cli", "serve", "--config", str(self.keystile_cfg[name])]
        if workers > 1:
            argv += ["--workers", str(workers)]
        proc = self.spawn(name, argv, self.cfg.server_cpus or None, DATABASE_URL=db_url)
        port = self._gw_ports[name]
        await self.wait_ready(proc, port)
        deadline = time.monotonic() + 30
        while tcp_listeners(port) < workers:
            if time.monotonic() > deadline or not proc.alive():
                raise RuntimeError(f"{name}: {workers} workers never listened\n{proc.log_tail()}")
            await asyncio.sleep(0.1)
        return proc

    async def restart_keystile(self) -> Proc:
        """A fresh `keystile` process (empty cache, small heap), the hot key cached again."""
        target = self.targets["keystile"]
        for old in target.procs:
            self.stop(old)
        proc = await self.start_keystile("keystile", self.main_url)
        target.procs[:] = [proc]  # shared with keystile_policy and keystile_oauth: one process
        async with clients.session(1) as http:
            for _ in range(5):
                await clients.post_once(http, target.url, self.hot_key)
        await asyncio.sleep(0.5)
        return proc

    async def wait_ready(self, proc: Proc, port: int, within: float = 60.0) -> None:
        assert self.http is not None
        deadline = time.monotonic() + within
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} never ready:\n{proc.log_tail()}")
            await asyncio.sleep(0.1)

    def admin(self, name: str) -> fixtures.Admin:
        assert self.http is not None
        return fixtures.Admin(
            self.http, f"http://127.0.0.1:{self.admin_ports[name]}", self.admin_key
        )

    # --- setup ---

    async def setup(self) -> None:
        cfg = self.cfg
        if not self.wrk:
            raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
        if not self.nginx:
            raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
        external = os.environ.get("DATABASE_URL")
        if external:
            self.root_url = external
        else:
            self.pg = EmbeddedPostgres(self.work / "pgdata", fsync=False)
            self.root_url = await asyncio.to_thread(self.pg.start)
            if cfg.load_cpus:
                # The database is another host's work in any deployment: kept off the core
                # whose CPU is measured, where its write-behind inserts would preempt the
                # proxy and count against Keystile only (the reference uses none).
                postmaster = (self.pg.pgdata / "postmaster.pid").read_text().split()[0]
                set_affinity_tree(int(postmaster), cfg.load_cpus)
        self.main_url = await fixtures.create_database(self.root_url, MAIN_DB)
        self.created_dbs.append(MAIN_DB)
        self.http = clients.session(64)

        up = self.spawn(
            "upstream",
            [PY, "-m", "bench.upstream", "--port", str(self.upstream_port)],
            (cfg.load_cpus if cfg.upstream_on_load_core else cfg.server_cpus) or None,
        )
        wait_port(self.upstream_port, proc=up)

        for name, extra, sections in (
            # The defaults: access log on, call records on, metrics on the admin plane.
            ("keystile", "", ""),
            ("keystile_no_access_log", "access_log = false\n", ""),
            ("keystile_no_calls", "", "[usage]\nrecord_calls = false\n"),
            ("keystile_2_workers", "", ""),
            # The defaults again, for the paired phase: a second process beside `keystile`.
            ("keystile_twin", "", ""),
            ("keystile_scale", "", ""),
            # What the event loop (uvloop by default) is worth: the defaults on asyncio's.
            ("keystile_asyncio_loop", 'event_loop = "asyncio"\n', ""),
        ):
            gw, adm = free_port(), free_port()
            self._gw_ports[name], self.admin_ports[name] = gw, adm
            # OAuth on, as a gateway serving hosted MCP clients runs: keys pay nothing for it.
            extra += f'public_url = "http://127.0.0.1:{gw}"\n'
            self.keystile_cfg[name] = keystile_config(
                self.work / f"{name}.toml",
                gateway=gw,
                admin=adm,
                upstream=self.upstream_port,
                extra=extra,
                sections=sections,
            )

        # An admin key the way an operator gets one: `keystile bootstrap` (runs migrations).
        boot = await asyncio.to_thread(
            subprocess.run,
            [PY, "-m", "keystile.cli", "bootstrap", "--config", str(self.keystile_cfg["keystile"])],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DATABASE_URL": self.main_url},
            check=False,
        )
        if boot.returncode != 0:
            raise RuntimeError(f"keystile bootstrap failed: {boot.stderr}")
        self.admin_key = boot.stdout.strip().splitlines()[-1]

        ks = await self.start_keystile("keystile", self.main_url)
        admin = self.admin("keystile")
        user = await admin.create_user("bench@localhost", [SERVER])
        self.user_id, self.workspace_id = user["id"], user["workspace_id"]
        hot_id, self.hot_key = await admin.create_key(self.user_id, "hot", [SERVER])
        self._script = loadgen.write_script(self.work, self.hot_key)
        self.targets["keystile"] = Target("keystile", self._gw_ports["keystile"], [ks])
        # The same process and request, with a key limited by a 3-pattern tool policy: every
        # POST is read whole and inspected, every answer passes the tools/list filter.
        _, policy_key = await admin.create_key(
            self.user_id, "policy", [SERVER], tools=list(POLICY_PATTERNS)
        )
        self.targets["keystile_policy"] = Target(
            "keystile_policy",
            self._gw_ports["keystile"],
            self.targets["keystile"].procs,
            loadgen.write_script(self.work, policy_key, name="policy"),
        )

        # Keys that must not be cached yet: minted through the product's Keyring, in-process.
        pool, store, keyring = await fixtures.open_store(self.main_url)
        try:
            # The same process and request again, with an OAuth access token of a grant the
            # hot key approved instead of the hot key: the token's cost on the hot path.
            token = await fixtures.mint_oauth_token(pool, store, key_id=hot_id, server=SERVER)
            self.targets["keystile_oauth"] = Target(
                "keystile_oauth",
                self._gw_ports["keystile"],
                self.targets["keystile"].procs,
                loadgen.write_script(self.work, token, name="oauth"),
            )
            actor = Actor(self.workspace_id)
            minted = await fixtures.mint_keys(
                keyring,
                actor,
                self.user_id,
                cfg.cold_keys + cfg.herd_keys + cfg.rss_keys,
                prefix="k",
            )
        finally:
            await pool.close()
        all_keys = [k for _, k in minted]
        self.cold_keys = all_keys[: cfg.cold_keys]
        self.herd_keys = all_keys[cfg.cold_keys : cfg.cold_keys + cfg.herd_keys]
        self.rss_keys = all_keys[cfg.cold_keys + cfg.herd_keys :]

        more = [("keystile_no_access_log", 1), ("keystile_no_calls", 1), ("keystile_2_workers", 2)]
        more += [("keystile_asyncio_loop", 1), ("keystile_twin", 1)]
        for name, workers in more:
            self.targets[name] = Target(name, self._gw_ports[name], [])
            proc = await self.start_keystile(name, self.main_url, workers=workers)
            self.targets[name].procs.append(proc)
        twin = self.targets["keystile_twin"]
        for variant in ("policy", "oauth"):  # the same scripts, against the twin process
            self.targets[f"keystile_twin_{variant}"] = Target(
                f"keystile_twin_{variant}",
                twin.port,
                twin.procs,
                self.targets[f"keystile_{variant}"].script,
            )

        keys_file = self.work / "reference-keys.txt"
        keys_file.write_text(self.hot_key + "\n")
        ref_port = free_port()
        ref = self.spawn(
            "reference",
            [
                PY,
                "-m",
                "bench.reference_proxy",
                "--port",
                str(ref_port),
                "--keys",
                str(keys_file),
                "--upstream",
                f"http://127.0.0.1:{self.upstream_port}/mcp",
            ],
            cfg.server_cpus or None,
        )
        wait_port(ref_port, proc=ref)
        self.targets["reference"] = Target("reference", ref_port, [ref])

        ngx_port = free_port()
        prefix = self.work / "nginx"
        conf = nginx.write_config(
            prefix, port=ngx_port, upstream_port=self.upstream_port, keys=[self.hot_key]
        )
        ngx = self.spawn("nginx", nginx.command(self.nginx, prefix, conf), cfg.server_cpus or None)
        wait_port(ngx_port, proc=ngx)
        self.targets["nginx"] = Target("nginx", ngx_port, [ngx])

        for target in self.targets.values():
            await self.check_target(target)
        if cfg.load_cpus:
            os.sched_setaffinity(0, cfg.load_cpus)  # the driver's main thread: the load core
        self.results["setup"] = {
            "database": "DATABASE_URL (databases of its own)"
            if external
            else "embedded, fsync=off",
            "upstream": "aiohttp low-level server, no access log (bench/upstream.py)",
            "keystile": "keystile serve, defaults (access log on, metrics on), DATABASE_URL",
            "nginx": "worker_processes 1, keepalive 128 to upstream, proxy_buffering off, "
            "access_log off, key checked with a map",
            "reference": "bench/reference_proxy.py: aiohttp, one ClientSession, dict lookup",
            "keys_minted": len(all_keys) + 1,
            "affinity": {
                "load_generator_and_driver": sorted(cfg.load_cpus),
                "servers": sorted(cfg.server_cpus),
                "observed": {p.name: p.affinity() for p in self.procs},
            },
        }

    async def check_target(self, target: Target) -> None:
        assert self.http is not None
        status, _ = await clients.post_once(self.http, target.url, self.hot_key)
        if status != 200:
            raise RuntimeError(f"{target.name}: hot key answered {status}")
        bad, _ = await clients.post_once(self.http, target.url, "ks1-wrong")
        if bad != 401:
            raise RuntimeError(f"{target.name}: a wrong key answered {bad}, not 401")

    # --- throughput: interleaved rounds ---

    async def wrk_once(
        self, target: Target, seconds: float, cpus: set[int] | None
    ) -> dict[str, Any]:
        assert self.wrk is not None
        upstream = next(p for p in self.procs if p.name == "upstream")
        window = CpuWindow({"proxy": target, "upstream": upstream})
        res = await loadgen.run_wrk(
            self.wrk,
            target.url,
            target.script or self._script,
            seconds=seconds,
            connections=self.cfg.connections,
            cpus=cpus,
        )
        cpu = window.stop()
        n = max(res.requests, 1)
        errors = {k: v for k, v in res.errors.items() if v}
        return {
            "requests": res.requests,
            "rps": round(res.rps, 1),
            "p50_ms": r3(res.p50_ms),
            "p90_ms": r3(res.p90_ms),
            "p99_ms": r3(res.p99_ms),
            "max_ms": r3(res.max_ms),
            "cpu_us_per_req": round(cpu["proxy"] * 1e6 / n, 1),
            "upstream_cpu_us_per_req": round(cpu["upstream"] * 1e6 / n, 1),
            "wrk_cpu_us_per_req": round(cpu["_children"] * 1e6 / n, 1),
            "proxy_cores_busy": r3(cpu["proxy"] / cpu["wall"]),
            "other_load_cores": r3(cpu["other_cores"]),
            "steal_cores": r3(cpu["_steal"] / cpu["wall"]),
            "errors": errors,
        }

    async def throughput(self) -> None:
        cfg = self.cfg
        order = ["reference", "keystile", "keystile_policy", "keystile_oauth", "keystile_no_calls"]
        order += ["keystile_no_access_log", "keystile_2_workers"]
        order += ["keystile_asyncio_loop"]
        order += ["nginx"]
        for name in order:  # warm connections, pools and caches; not recorded
            await self.wrk_once(self.targets[name], cfg.warmup, cfg.load_cpus or None)
        shared = ("keystile_policy", "keystile_oauth")  # keystile's own process: one /metrics
        ks_names = [n for n in order if n.startswith("keystile") and n not in shared]
        metrics_before = {n: await self.admin(n).metrics() for n in ks_names}
        await asyncio.sleep(cfg.stats_settle)
        stats_before = await fixtures.db_stats(self.root_url, MAIN_DB)
        started = time.monotonic()
        rounds: list[dict[str, Any]] = []
        for r in range(cfg.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for name in rotated:
                row = await self.wrk_once(self.targets[name], cfg.seconds, cfg.load_cpus or None)
                rounds.append({"round": r + 1, "target": name, **row})
                print(_row_line(name, row), flush=True)
                await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        metrics_after = {n: await self.admin(n).metrics() for n in ks_names}
        await asyncio.sleep(cfg.stats_settle)
        stats_after = await fixtures.db_stats(self.root_url, MAIN_DB)
        summary = summarise_rounds(rounds, order)
        self.results["throughput"] = {
            "method": (
                f"{cfg.rounds} rounds x {len(order)} targets x {cfg.seconds:g} s, order rotated "
                f"each round; wrk -t1 -c{cfg.connections} keep-alive POST of a "
                f"{len(loadgen.JSONRPC_BODY)}-byte JSON-RPC body with a Bearer key; wrk and "
                f"driver on CPU {sorted(cfg.load_cpus)}, "
                + ("upstream too, " if cfg.upstream_on_load_core else "upstream and ")
                + f"proxy under test on CPU {sorted(cfg.server_cpus)}; "
                "CPU = utime+stime of the proxy's processes over the wrk run / requests "
                "completed; summary = median over rounds; ratios = median of the per-round "
                "ratios."
            ),
            "rounds": rounds,
            "summary": summary,
        }
        self._hot_path(summary, metrics_before, metrics_after, stats_before, stats_after, elapsed)

    def _hot_path(
        self,
        summary: dict[str, dict[str, Any]],
        m0: dict[str, dict[str, float]],
        m1: dict[str, dict[str, float]],
        s0: dict[str, int],
        s1: dict[str, int],
        elapsed: float,
    ) -> None:
        ks, ref = summary["keystile"], summary["reference"]
        delta = fixtures.stats_delta(s0, s1)
        per_instance = {
            name: {
                k.removeprefix("keystile_"): int(m1[name].get(k, 0) - m0[name].get(k, 0))
                for k in (
                    "keystile_cache_hits_total",
                    "keystile_cache_misses_total",
                    "keystile_argon2_verifications_total",
                    "keystile_last_used_flushes_total",
                )
            }
            for name in m0
        }
        listeners = len(m0) + 1  # one LISTEN connection per process; keystile_2_workers has 2
        window = elapsed + self.cfg.stats_settle
        # Each process looks a credential up once, then again each time its cache entry
        # reaches the TTL: the rounds outlast keys.cache_ttl_seconds, so a few re-lookups are
        # the cache working, not misses on the hot path.
        credentials = sum(
            2 if name == "keystile_2_workers" else 1
            for name in summary
            if name.startswith("keystile")
        )
        allowed = credentials * math.ceil(window / KeySettings().cache_ttl_seconds)
        self.results["hot_path"] = {
            "keystile_cpu_us_per_req": ks["cpu_us_per_req"],
            "reference_cpu_us_per_req": ref["cpu_us_per_req"],
            "ratio_keystile_to_reference": ks["cpu_ratio_to_reference"],
            "target_ratio": TARGET_RATIO,
            "met": ks["cpu_ratio_to_reference"] <= TARGET_RATIO,
            "tool_policy": self._policy_cost(summary, self.results["throughput"]["rounds"]),
            "oauth_token": self._oauth_cost(summary, self.results["throughput"]["rounds"]),
            "call_records": {
                "cpu_us_per_req_on": ks["cpu_us_per_req"],
                "cpu_us_per_req_off": summary["keystile_no_calls"]["cpu_us_per_req"],
                "ratio_to_reference_on": ks["cpu_ratio_to_reference"],
                "ratio_to_reference_off": summary["keystile_no_calls"]["cpu_ratio_to_reference"],
                "heap_bytes_per_buffered_record": buffered_record_bytes(),
            },
            "other_keystile_variants_cpu_ratio_to_reference": {
                name: entry["cpu_ratio_to_reference"]
                for name, entry in summary.items()
                if name.startswith("keystile_")
            },
            "database": {
                "window_seconds": round(window, 1),
                "pg_stat_database_delta": delta,
                "key_lookups_seen_by_postgres": delta.get("users_scans", -1),
                "key_lookups_allowed": allowed,
                "allowed_explained": (
                    f"{credentials} (process, credential) pairs in the rounds, each looked up "
                    f"at most once per cache TTL ({KeySettings().cache_ttl_seconds:g} s) of "
                    f"the {window:.0f} s window"
                ),
                "explained": (
                    "A key lookup (gateway.store.LOAD_PRINCIPAL) scans users, workspaces and "
                    "server_grants once each; nothing else on the hot path reads users, so "
                    "users_scans is the number of key lookups. The remaining transactions: "
                    "last-used flushes (one UPDATE of api_keys every 2 s per process while "
                    "requests arrive; api_keys_updates counts the rows), the invalidation "
                    f"listeners' `SELECT 1` ping every 5 s ({listeners} listeners: about "
                    f"{int(listeners * window / 5)} in this window), and one transaction per "
                    "statistics snapshot taken by the benchmark itself. No readiness probe "
                    "was called during the rounds."
                ),
                "keystile_metrics_delta": per_instance,
                "note": "keystile_2_workers' /metrics sums both workers (prometheus-client's "
                "multiprocess mode), whichever of them answers the scrape",
            },
        }

    @staticmethod
    def _policy_cost(
        summary: dict[str, dict[str, Any]], rounds: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The policy's extra CPU: the median over rounds of policy ÷ no policy, each round's
        pair measured back to back on the same process."""
        plain, policy = summary["keystile"], summary["keystile_policy"]
        extra = paired_extra(rounds, "keystile_policy", "keystile")
        return {
            "patterns": list(POLICY_PATTERNS),
            "cpu_us_per_req_no_policy": plain["cpu_us_per_req"],
            "cpu_us_per_req_policy": policy["cpu_us_per_req"],
            "extra_cpu": round(extra, 3),
            "target_extra_cpu": POLICY_TARGET,
            "met": extra <= POLICY_TARGET,
        }

    @staticmethod
    def _oauth_cost(
        summary: dict[str, dict[str, Any]], rounds: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """An access token's CPU against the hot key's, paired per round as for the policy;
        its errors too (every request must be a 200: the token is accepted, not refused)."""
        key, token = summary["keystile"], summary["keystile_oauth"]
        difference = paired_extra(rounds, "keystile_oauth", "keystile")
        return {
            "cpu_us_per_req_key": key["cpu_us_per_req"],
            "cpu_us_per_req_token": token["cpu_us_per_req"],
            "rps_key": key["rps"],
            "rps_token": token["rps"],
            "difference": round(difference, 3),
            "errors": token["errors"],
            "target": f"equal within +-{OAUTH_NOISE:.0%}",
            "met": abs(difference) <= OAUTH_NOISE and token["errors"] == 0,
        }

    # --- paired: two targets loaded at the same moment ---

    async def paired(self) -> None:
        """Each pair of PAIRS loaded at once, each target by its own wrk (the connections of
        the throughput rounds each), their processes sharing the server core: the ratio of
        their CPU per request is taken over the same seconds of the same machine, so the
        machine's drift, which moves a target's CPU per request by ±20 % from one round to
        the next, cancels out. Pairs rotate each round."""
        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        for r in range(cfg.rounds):
            for base, other in PAIRS[r % len(PAIRS) :] + PAIRS[: r % len(PAIRS)]:
                row = await self._pair_once(base, other, cfg.seconds)
                rows.append({"round": r + 1, **row})
                print(
                    f"  {other} / {base}: {row['ratio']:.3f} "
                    f"({row['other_cpu_us_per_req']} / {row['base_cpu_us_per_req']} us/req, "
                    f"other load {row['other_load_cores']})",
                    flush=True,
                )
                await asyncio.sleep(0.5)
        self.results["paired"] = {
            "method": (
                f"{cfg.rounds} rounds x {len(PAIRS)} pairs x {cfg.seconds:g} s; in each, both "
                f"targets loaded at once by two wrk -t1 -c{cfg.connections} (on CPU "
                f"{sorted(cfg.load_cpus)}), their processes and the upstream sharing CPU "
                f"{sorted(cfg.server_cpus)}; ratio = other's CPU us/req / base's over the same "
                "window; summary = median, min, max over rounds. keystile_twin is a second "
                "process with keystile's configuration: keystile_twin / keystile (the same key) "
                "is the control, what two identical processes differ by."
            ),
            "rounds": rows,
            "summary": summarise_pairs(rows),
        }

    async def _pair_once(self, base: str, other: str, seconds: float) -> dict[str, Any]:
        wrk = self.wrk
        assert wrk is not None
        a, b = self.targets[base], self.targets[other]
        window = CpuWindow({"base": a, "other": b})

        async def load(target: Target) -> loadgen.WrkResult:
            return await loadgen.run_wrk(
                wrk,
                target.url,
                target.script or self._script,
                seconds=seconds,
                connections=self.cfg.connections,
                cpus=self.cfg.load_cpus or None,
            )

        res_a, res_b = await asyncio.gather(load(a), load(b))
        cpu = window.stop()
        per_a = cpu["base"] * 1e6 / max(res_a.requests, 1)
        per_b = cpu["other"] * 1e6 / max(res_b.requests, 1)
        return {
            "base": base,
            "other": other,
            "base_rps": round(res_a.rps, 1),
            "other_rps": round(res_b.rps, 1),
            "base_cpu_us_per_req": round(per_a, 1),
            "other_cpu_us_per_req": round(per_b, 1),
            "ratio": round(per_b / per_a, 4) if per_a else float("nan"),
            "errors": {
                name: {k: v for k, v in res.errors.items() if v}
                for name, res in ((base, res_a), (other, res_b))
            },
            "other_load_cores": r3(cpu["other_cores"]),
        }

    # --- workers ---

    async def workers_unpinned(self) -> None:
        cfg = self.cfg
        everything = set(os.sched_getaffinity(0)) | cfg.load_cpus | cfg.server_cpus
        names = ["keystile", "keystile_2_workers"]
        upstream = next(p for p in self.procs if p.name == "upstream")
        movable = [
            upstream,
            *self.targets["keystile"].procs,
            *self.targets["keystile_2_workers"].procs,
        ]
        for proc in movable:
            set_affinity_tree(proc.pid, everything)
        rows: list[dict[str, Any]] = []
        try:
            for r in range(cfg.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    row = await self.wrk_once(self.targets[name], cfg.seconds, everything)
                    rows.append({"round": r + 1, "target": name, **row})
                    print(_row_line(name + " (unpinned)", row), flush=True)
                    await asyncio.sleep(0.5)
        finally:
            for proc in movable:
                set_affinity_tree(proc.pid, cfg.server_cpus or everything)
        pinned = self.results["throughput"]["summary"]
        unpinned = summarise_rounds(rows, names, reference=None, ceiling=None)
        one, two = pinned["keystile"], pinned["keystile_2_workers"]
        u1, u2 = unpinned["keystile"], unpinned["keystile_2_workers"]
        self.results["workers"] = {
            "pinned": {
                "1_worker": {k: one[k] for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")},
                "2_workers": {k: two[k] for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")},
                "rps_scaling": r3(two["rps"] / one["rps"]),
                "cpu_per_req_ratio": r3(two["cpu_us_per_req"] / one["cpu_us_per_req"]),
            },
            "unpinned": {
                "rounds": rows,
                "1_worker": u1,
                "2_workers": u2,
                "rps_scaling": r3(u2["rps"] / u1["rps"]),
                "cpu_per_req_ratio": r3(u2["cpu_us_per_req"] / u1["cpu_us_per_req"]),
            },
            "meaning": (
                "Pinned: both workers share the one server core with the upstream, so req/s "
                "cannot scale; the figure shows what a second process costs (or saves) per "
                "request. Unpinned: wrk, the upstream and the workers all float over both "
                "cores; the second worker can only take CPU the load generator and upstream "
                "leave, so this is not a scaling measurement either. On this 2-core machine "
                "the honest number is CPU us/request, which is what N workers multiply: "
                "capacity ~ N cores / (CPU per request) when cores are free."
            ),
        }

    # --- profile ---

    async def profile_hot_path(self) -> None:
        cfg = self.cfg
        py_spy = profile.find_py_spy()
        if cfg.profile_seconds <= 0:
            self.results["profile"] = {"skipped": "profiling off (--profile-seconds 0)"}
            return
        if py_spy is None:
            self.results["profile"] = {"skipped": "py-spy not installed (pip install py-spy)"}
            return
        out: dict[str, Any] = {
            "method": f"py-spy record --rate 250 --nolineno, {cfg.profile_seconds} s, idle "
            "stacks excluded, under the same wrk load as the rounds (separate run, so "
            "sampling overhead does not touch the measured rounds)"
        }
        for name in ("keystile", "keystile_policy", "reference"):
            target = self.targets[name]
            raw = self.work / f"profile-{name}.txt"
            load = asyncio.create_task(
                self.wrk_once(target, cfg.profile_seconds + 3, cfg.load_cpus or None)
            )
            await asyncio.sleep(1.0)
            await profile.record(py_spy, target.procs[0].pid, cfg.profile_seconds, raw)
            await load
            out[name] = profile.summarise(raw)
            if not cfg.quick:
                keep = cfg.out.parent / f"profile-{name}.txt"
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(raw, keep)
                out[f"{name}_raw"] = str(keep)
        self.results["profile"] = out

    # --- streaming ---

    async def streaming(self) -> None:
        cfg = self.cfg
        assert self.http is not None
        sse_path = f"{PROXY_PATH}/sse"
        ports = {
            "direct": (self.upstream_port, "/mcp/sse", None),
            **{
                n: (self.targets[n].port, sse_path, self.hot_key)
                for n in ("reference", "keystile", "nginx")
            },
        }
        ttfb: dict[str, list[float]] = {n: [] for n in ports}
        for _ in range(cfg.ttfb_runs):
            for name, (port, path, key) in ports.items():
                ttfb[name].append(await clients.sse_first_event(port, path, key))
        ks_url = f"http://127.0.0.1:{self.targets['keystile'].port}{sse_path}?count=5&delay=0.05"
        gaps = await clients.sse_gaps(self.http, ks_url, self.hot_key)

        big = await self._big_response()
        self.results["streaming"] = {
            "sse_time_to_first_event": {
                "method": f"{cfg.ttfb_runs} runs per target, targets interleaved; each run a "
                "fresh TCP connection (connect included) and a GET with Accept: "
                "text/event-stream; time until the first complete event (blank line) arrives; "
                "the upstream sends it right after its headers",
                **{n: clients.summary_ms(v) for n, v in ttfb.items()},
                "keystile_minus_direct_median_ms": r3(
                    median(ttfb["keystile"]) - median(ttfb["direct"])
                ),
            },
            "sse_event_arrivals_ms": {
                "method": "5 events sent 50 ms apart by the upstream, through Keystile: arrival "
                "times relative to the first (each event written as it arrives, not batched)",
                "arrivals": gaps,
            },
            "large_response": big,
        }

    async def _big_response(self) -> dict[str, Any]:
        assert self.http is not None
        ks = self.targets["keystile"].procs[0]
        path = f"{PROXY_PATH}/big"
        out: dict[str, Any] = {"size_bytes": 10 * 1024 * 1024}
        timings: dict[str, list[float]] = {}
        for name, url, key in (
            ("direct", f"http://127.0.0.1:{self.upstream_port}/mcp/big", None),
            *(
                (n, f"http://127.0.0.1:{self.targets[n].port}{path}", self.hot_key)
                for n in ("reference", "keystile", "nginx")
            ),
        ):
            timings[name] = []
            for _ in range(3):
                size, seconds = await clients.download(self.http, url, key)
                if size != out["size_bytes"]:
                    raise RuntimeError(f"{name}: 10 MiB download returned {size} bytes")
                timings[name].append(seconds)
        out["fast_reader_mib_per_s"] = {n: round(10 / median(v), 1) for n, v in timings.items()}
        # Memory on a fresh process: an older one may hold free heap from earlier load, which
        # would hide buffering. Reader speeds: as fast as possible, and ~16 MiB/s.
        ks = await self.restart_keystile()
        ks_url = f"http://127.0.0.1:{self.targets['keystile'].port}{path}"
        for label, pause in (("fast_reader", 0.0), ("slow_reader", 0.004)):
            rss_before = status_kib(ks.pid, "VmRSS")
            hwm_reset = reset_peak_rss(ks.pid)
            peak_sampled = rss_before
            done = asyncio.Event()

            async def sample(done: asyncio.Event = done) -> None:
                nonlocal peak_sampled
                while not done.is_set():
                    peak_sampled = max(peak_sampled, status_kib(ks.pid, "VmRSS"))
                    await asyncio.sleep(0.002)

            sampler = asyncio.create_task(sample())
            size, seconds = await clients.download(self.http, ks_url, self.hot_key, pause=pause)
            done.set()
            await sampler
            hwm = status_kib(ks.pid, "VmHWM")
            growth_kib = (hwm if hwm_reset else peak_sampled) - rss_before
            out[label] = {
                "seconds": r3(seconds),
                "rss_before_mib": round(rss_before / KIB, 1),
                "peak_rss_growth_mib": round(growth_kib / KIB, 2),
                "sampled_peak_rss_growth_mib": round((peak_sampled - rss_before) / KIB, 2),
                "peak_source": "VmHWM after reset (clear_refs=5)"
                if hwm_reset
                else "VmRSS sampled every 2 ms",
                "pause_per_64k_read_s": pause,
            }
        return out

    # --- cold path ---

    async def cold_path(self) -> None:
        target = self.targets["keystile"]
        admin = self.admin("keystile")
        m0 = await admin.metrics()
        miss: list[float] = []
        hit: list[float] = []
        statuses: dict[int, int] = {}
        async with clients.session(1) as http:
            for _ in range(20):  # a warm connection and a cached hot key
                await clients.post_once(http, target.url, self.hot_key)
            for key in self.cold_keys:
                status, ms = await clients.post_once(http, target.url, key)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    miss.append(ms)
                status, ms = await clients.post_once(http, target.url, self.hot_key)
                if status == 200:
                    hit.append(ms)
        m1 = await admin.metrics()
        parts = await self._miss_parts()
        self.results["cold_path"] = {
            "method": "each fresh key once (a cache miss: one PostgreSQL query + one argon2 "
            "verify), alternating with a request for the cached hot key, sequentially on one "
            "keep-alive connection; latency is the client's, full request through to the "
            "upstream and back",
            "cache_miss": clients.summary_ms(miss),
            "cached": clients.summary_ms(hit),
            "miss_minus_cached_median_ms": r3(median(miss) - median(hit)),
            "statuses": statuses,
            "argon2_verifications_delta": int(
                m1.get("keystile_argon2_verifications_total", 0)
                - m0.get("keystile_argon2_verifications_total", 0)
            ),
            "components_in_process": parts,
        }

    async def _miss_parts(self) -> dict[str, Any]:
        """The two costs of a miss measured alone, in this process: argon2 and the query."""
        hasher = keys.KeyHasher()
        sample = keys.generate(keys.new_id(), keys.new_id()).full
        stored = hasher.hash(sample)
        argon: list[float] = []
        for _ in range(50 if self.cfg.quick else 200):
            start = time.perf_counter()
            hasher.verify(stored, sample)
            argon.append((time.perf_counter() - start) * 1000)
        parsed = keys.parse(self.cold_keys[0])
        assert parsed is not None
        pool, store, _ = await fixtures.open_store(self.main_url)
        query: list[float] = []
        try:
            for _ in range(50 if self.cfg.quick else 200):
                start = time.perf_counter()
                await store.load_principal(parsed.key_id)
                query.append((time.perf_counter() - start) * 1000)
        finally:
            await pool.close()
        return {
            "argon2_verify": clients.summary_ms(argon),
            "load_principal_query": clients.summary_ms(query),
            "note": "measured in the benchmark driver (load core), not inside Keystile",
        }

    # --- herd ---

    async def herd(self) -> None:
        cfg = self.cfg
        target = self.targets["keystile"]
        proc = await self.restart_keystile()
        admin = self.admin("keystile")
        # The cache alone, on the fresh process: fresh keys each once over 4 connections,
        # RSS before and after / keys newly cached (before the herd inflates the heap).
        warm = 40  # first misses open pool connections and argon2 threads: not cache memory
        await clients.herd(target.url, self.rss_keys[:warm], 4)
        await asyncio.sleep(0.5)
        m_fresh = await admin.metrics()
        rss_fresh = proc.rss_bytes()
        extra = await clients.herd(target.url, self.rss_keys[warm:], 4)
        await asyncio.sleep(0.5)
        rss_cached = proc.rss_bytes()
        extra_cached = (await admin.metrics()).get("keystile_cached_keys", 0) - m_fresh.get(
            "keystile_cached_keys", 0
        )
        idle_probe = await self._probe(target.url, lambda: asyncio.sleep(1.0 if cfg.quick else 3.0))
        rss_before = proc.rss_bytes()
        threads_before = proc.threads()
        m0 = await admin.metrics()
        samples: list[dict[str, float]] = []
        done = asyncio.Event()

        async def sampler() -> None:
            t0 = time.perf_counter()
            while not done.is_set():
                m = await admin.metrics()
                samples.append(
                    {
                        "t": time.perf_counter() - t0,
                        "argon2": m.get("keystile_argon2_verifications_total", 0),
                        "cached": m.get("keystile_cached_keys", 0),
                        "threads": proc.threads(),
                    }
                )
                await asyncio.sleep(0.25)

        result_box: list[clients.HerdResult] = []

        async def run_herd() -> None:
            task = asyncio.create_task(sampler())
            try:
                result_box.append(
                    await clients.herd(target.url, self.herd_keys, cfg.herd_connections)
                )
            finally:
                done.set()
                await task

        probe = await self._probe(target.url, run_herd)
        result = result_box[0]
        await asyncio.sleep(0.5)
        m1 = await admin.metrics()
        rss_after = proc.rss_bytes()
        verifications = m1.get("keystile_argon2_verifications_total", 0) - m0.get(
            "keystile_argon2_verifications_total", 0
        )
        cached_delta = m1.get("keystile_cached_keys", 0) - m0.get("keystile_cached_keys", 0)
        rates = [
            (b["argon2"] - a["argon2"]) / (b["t"] - a["t"])
            for a, b in zip(samples, samples[4:], strict=False)  # ~1 s windows
            if b["t"] > a["t"]
        ]
        self.results["herd"] = {
            "method": f"{len(self.herd_keys)} distinct valid keys, never used, right after a "
            f"restart of Keystile; {cfg.herd_connections} concurrent keep-alive connections "
            "each taking the next unused key; meanwhile a separate process probes a cached key "
            "sequentially (one connection, ~2 ms pause between requests)",
            "keys": len(self.herd_keys),
            "connections": cfg.herd_connections,
            "all_served_seconds": r3(result.seconds),
            "statuses": result.statuses,
            "herd_request_latency": clients.summary_ms([v for v in result.latencies if v]),
            "verify_concurrency_setting": KeySettings().verify_concurrency,
            "argon2_verifications": int(verifications),
            "verification_rate_per_s": round(verifications / result.seconds, 1),
            "peak_verification_rate_per_s_1s_window": round(max(rates), 1) if rates else None,
            "threads_before": threads_before,
            "threads_peak_during": max((int(s["threads"]) for s in samples), default=0),
            "cached_key_latency_idle": idle_probe,
            "cached_key_latency_during_herd": probe,
            "memory": {
                "rss_before_mib": round(rss_before / 2**20, 1),
                "rss_after_mib": round(rss_after / 2**20, 1),
                "keys_cached": int(cached_delta),
                "bytes_per_key_herd_rss": round((rss_after - rss_before) / cached_delta)
                if cached_delta > 0
                else None,
                "note": "the herd's RSS delta also holds what its connections left behind "
                "(buffers, allocator high water); `fresh_process` is the cache alone",
                "fresh_process": {
                    "method": "right after a restart, before the herd: fresh keys each once "
                    "over 4 connections (40 more first, unmeasured, to open pool connections "
                    "and threads); Keystile's RSS before and after / keys newly cached",
                    "keys_cached": int(extra_cached),
                    "statuses": extra.statuses,
                    "rss_before_mib": round(rss_fresh / 2**20, 1),
                    "rss_after_mib": round(rss_cached / 2**20, 1),
                    "bytes_per_cached_key_rss": round((rss_cached - rss_fresh) / extra_cached)
                    if extra_cached > 0
                    else None,
                },
                "cache_bound": f"keys.cache_max_entries = {KeySettings().cache_max_entries} "
                "per process (TTL keys.cache_ttl_seconds)",
            },
        }

    async def _probe(self, url: str, during: Callable[[], Awaitable[None]]) -> dict[str, Any]:
        """Latencies of a cached key from a separate process while `during()` runs."""
        argv = pinned([PY, "-m", "bench.probe", url, self.hot_key], self.cfg.load_cpus or None)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": python_path()},
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), 30)
            if ready.strip() != b"ready":
                raise RuntimeError(f"probe did not start: {ready!r}")
            await during()
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.stdin.close()
                await asyncio.wait_for(proc.wait(), 30)
        data = json.loads(line)
        return {**clients.summary_ms(data["latencies"]), "statuses": data["statuses"]}

    # --- abuse ---

    async def attack(self) -> None:
        """A flood of wrong secrets for real key ids, and of unknown keys, from one client:
        how much argon2 work it causes, and what it does to an already-cached key."""
        cfg = self.cfg
        target = self.targets["keystile"]
        await self.restart_keystile()  # fresh throttle windows, cold cache but for the hot key
        admin = self.admin("keystile")
        async with aiohttp.ClientSession() as warm:
            await clients.post_once(warm, target.url, self.hot_key)
        real = [keys.parse(k) for k in self.herd_keys[:200]]
        forged = [keys.generate(p.user_id, p.key_id).full for p in real if p is not None]
        unknown = [keys.generate(keys.new_id(), keys.new_id()).full for _ in range(200)]
        seconds = 2.0 if cfg.quick else 10.0
        statuses: dict[int, int] = {}
        m0 = await admin.metrics()

        async def flood() -> None:
            deadline = time.monotonic() + seconds
            connector = aiohttp.TCPConnector(limit=50)
            async with aiohttp.ClientSession(connector=connector) as http:

                async def worker(i: int) -> None:
                    n = i
                    while time.monotonic() < deadline:
                        pool = forged if n % 2 else unknown
                        key = pool[n % len(pool)]
                        n += 50
                        status, _ = await clients.post_once(http, target.url, key)
                        statuses[status] = statuses.get(status, 0) + 1

                await asyncio.gather(*(worker(i) for i in range(50)))

        probe = await self._probe(target.url, flood)
        m1 = await admin.metrics()
        verifications = m1.get("keystile_argon2_verifications_total", 0) - m0.get(
            "keystile_argon2_verifications_total", 0
        )
        self.results["attack"] = {
            "method": f"{seconds:g} s from one client over 50 connections: wrong secrets for "
            f"{len(forged)} real key ids alternating with {len(unknown)} unknown keys; "
            "meanwhile a separate process uses an already-cached key",
            "requests": sum(statuses.values()),
            "statuses": statuses,
            "argon2_verifications": int(verifications),
            "argon2_per_second": round(verifications / seconds, 2),
            "throttle": "throttle.failures_per_client = 20 per 60 s window (defaults)",
            "cached_key_latency_during_attack": probe,
        }

    # --- revocation ---

    async def revocation(self) -> None:
        cfg = self.cfg
        a, b = "keystile", "keystile_no_access_log"
        admin_a = self.admin(a)
        url_b = self.targets[b].url
        created = [
            await admin_a.create_key(self.user_id, f"revoke-{n:04d}", [SERVER])
            for n in range(cfg.revocations)
        ]
        from_request: list[float] = []
        from_ack: list[float] = []
        async with clients.session(1) as http:
            for _, key in created:  # cache each key on B first
                status, _ = await clients.post_once(http, url_b, key)
                if status != 200:
                    raise RuntimeError(f"revocation key not usable on B: {status}")
            for key_id, key in created:
                seen_401 = asyncio.get_running_loop().create_future()

                async def poll(key: str = key, seen: asyncio.Future[float] = seen_401) -> None:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        status, _ = await clients.post_once(http, url_b, key)
                        if status == 401:
                            seen.set_result(time.perf_counter())
                            return
                    seen.set_exception(TimeoutError("B never refused the revoked key"))

                poller = asyncio.create_task(poll())
                await asyncio.sleep(0.01)  # B answers 200 at least once before the revoke
                sent = time.perf_counter()
                await admin_a.revoke(key_id)
                acked = time.perf_counter()
                refused = await seen_401
                await poller
                from_request.append((refused - sent) * 1000)
                from_ack.append((refused - acked) * 1000)
        self.results["revocation"] = {
            "method": "two `keystile serve` processes on one database; each key cached on B, "
            "then DELETE /api/keys/{id} on A while a client polls B back-to-back on one "
            "connection; time until B's first 401, from sending the DELETE and from A's 204",
            "revocations": len(created),
            "from_delete_sent": clients.summary_ms(from_request),
            "from_delete_acknowledged": clients.summary_ms(from_ack),
        }

    # --- the store at scale ---

    async def store_scale(self) -> None:
        cfg = self.cfg
        url = await fixtures.create_database(self.root_url, SCALE_DB)
        self.created_dbs.append(SCALE_DB)
        pool, store, keyring = await fixtures.open_store(url)
        out: dict[str, Any] = {}
        try:
            ws = await keyring.ensure_workspace("default")
            actor = Actor(ws.id)
            user = await keyring.create_user(actor, email="scale@localhost", servers=[SERVER])
            sample = [
                k
                for _, k in await fixtures.mint_keys(
                    keyring, actor, user.id, cfg.store_sample, prefix="s"
                )
            ]
            dummy = keys.KeyHasher().hash(keys.generate(user.id, keys.new_id()).full)
            filler = {"user_id": user.id, "workspace_id": ws.id, "dummy": dummy}
            small = max(cfg.store_small, cfg.store_sample)
            await fixtures.insert_filler(pool, start=0, stop=small - cfg.store_sample, **filler)
            sizes: dict[str, Any] = {}
            sizes[str(small)] = await self._scale_pass(url, sample, pool)
            started = time.perf_counter()
            await fixtures.insert_filler(
                pool,
                start=small - cfg.store_sample,
                stop=cfg.store_scale - cfg.store_sample,
                **filler,
            )
            insert_s = time.perf_counter() - started
            sizes[str(cfg.store_scale)] = await self._scale_pass(url, sample, pool)
            out["memory"] = await self._cache_memory(store)
        finally:
            await pool.close()
        small_m = sizes[str(small)]["cache_miss"]["median_ms"]
        big_m = sizes[str(cfg.store_scale)]["cache_miss"]["median_ms"]
        self.results["store_scale"] = {
            "method": f"a database of its own; {cfg.store_sample} real keys (Keyring) among "
            "filler rows (INSERT ... SELECT generate_series, valid ids, a real-format argon2 "
            "hash nobody can match); Keystile restarted before each pass so every sample key "
            f"misses the cache; {cfg.store_passes} pass(es) per size, each key once, "
            "sequentially on one connection",
            "sizes": sizes,
            "insert_seconds": round(insert_s, 1),
            "ratio_big_to_small_median": r3(big_m / small_m),
            "target_ratio": 1.5,
            "met": big_m / small_m <= 1.5,
            **out,
        }

    async def _scale_pass(self, url: str, sample: list[str], pool: Any) -> dict[str, Any]:
        name = "keystile_scale"
        lat: list[float] = []
        statuses: dict[int, int] = {}
        for _ in range(self.cfg.store_passes):
            proc = await self.start_keystile(name, url)
            try:
                target_url = f"http://127.0.0.1:{self._gw_ports[name]}{PROXY_PATH}"
                async with clients.session(1) as http:
                    async with http.get(f"http://127.0.0.1:{self._gw_ports[name]}/healthz"):
                        pass
                    got, st = await clients.sequential(http, target_url, sample)
                lat += got
                for k, v in st.items():
                    statuses[k] = statuses.get(k, 0) + v
            finally:
                self.stop(proc)
        parsed = keys.parse(sample[0])
        assert parsed is not None
        async with pool.acquire() as conn:
            count = await conn.fetchval("SELECT count(*) FROM api_keys")
            plan = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {LOAD_PRINCIPAL}", parsed.key_id
            )
        plan_json = json.loads(plan) if isinstance(plan, str) else plan
        return {
            "keys_in_store": int(count),
            "cache_miss": clients.summary_ms(lat),
            "statuses": statuses,
            "load_principal_execution_ms": plan_json[0]["Execution Time"],
        }

    async def _cache_memory(self, store: Any) -> dict[str, Any]:
        """Bytes per entry of the real KeyCache holding principals loaded by the real Store."""
        n = self.cfg.memory_keys
        cache = KeyCache(
            max_entries=KeySettings().cache_max_entries,
            ttl_seconds=300,
            negative_max_entries=10,
            negative_ttl_seconds=30,
        )
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            key_id = f"F{i:015d}"  # a new string, as parsed from a request
            loaded = await store.load_principal(key_id)
            assert loaded is not None
            principal, hashes = loaded
            full = keys.generate(principal.user.id, key_id).full
            secret = VerifiedSecret(keys.fingerprint(full), None)
            cache.put(key_id, CachedKey.of(principal, hashes.current, secret), epoch=0)
            del loaded, principal, hashes, full, secret
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {
            "method": f"{n} principals loaded with Store.load_principal and put in a KeyCache "
            "(as after their first request), Python heap measured with tracemalloc",
            "entries": len(cache),
            "bytes_per_cached_key": round((after - before) / n),
            "target_bytes": 1024,
            "met": (after - before) / n < 1024,
            "cache_bound": f"keys.cache_max_entries = {KeySettings().cache_max_entries}"
            " per process",
        }

    # --- usage over many call records ---

    async def usage_query(self) -> None:
        """GET /api/usage through `keystile serve` on a database of its own holding
        cfg.usage_calls call records over 30 days (and their hourly roll-ups)."""
        cfg = self.cfg
        url = await fixtures.create_database(self.root_url, USAGE_DB)
        self.created_dbs.append(USAGE_DB)
        pool, _store, keyring = await fixtures.open_store(url)
        try:
            filled = await self._fill_usage(pool, keyring)
        finally:
            await pool.close()
        name = "keystile_usage"
        gw, adm = free_port(), free_port()
        self._gw_ports[name], self.admin_ports[name] = gw, adm
        self.keystile_cfg[name] = keystile_config(
            self.work / f"{name}.toml", gateway=gw, admin=adm, upstream=self.upstream_port
        )
        proc = await self.start_keystile(name, url)
        try:
            timed = await self._time_usage(adm, filled["admin_key"], filled["busiest_key"])
        finally:
            self.stop(proc)
        await fixtures.drop_database(self.root_url, USAGE_DB)  # gigabytes: free them now
        one_key = timed.pop("one_key_7_days")
        worst = max(t["max_ms"] for t in one_key.values())
        self.results["usage_query"] = {
            "method": f"a database of its own: {cfg.usage_calls:,} call records over "
            f"{USAGE_DAYS} days for {USAGE_KEYS} keys of {USAGE_USERS} users (generate_series "
            "in PostgreSQL, keys picked with a skew), then the hourly roll-ups built with one "
            "INSERT ... SELECT; `keystile serve` restarted on it; each query once untimed, then "
            f"{cfg.usage_runs} times sequentially on one connection with an admin key, timed "
            "at the client (request sent to body read); the busiest key",
            "calls": cfg.usage_calls,
            "tables": filled["tables"],
            "fill_seconds": filled["fill_seconds"],
            "busiest_key_7_days": filled["busiest_key_7_days"],
            "sql_execution_ms": filled["sql_execution_ms"],
            "sql_plan_tool_status": filled["sql_plan_tool_status"],
            "one_key_7_days": one_key,
            "informational": timed["informational"],
            "target_ms": USAGE_TARGET_MS,
            "met": worst < USAGE_TARGET_MS,
        }

    async def _fill_usage(self, pool: Any, keyring: Any) -> dict[str, Any]:
        cfg = self.cfg
        ws = await keyring.ensure_workspace("default")
        actor = Actor(ws.id)
        boss = await keyring.create_user(
            actor, email="usage-admin@localhost", role="admin", servers=["*"]
        )
        admin = await keyring.create_key(
            actor, user_id=boss.id, name="usage", permissions=["admin", "keys", "mcp", "chat"]
        )
        keys: list[tuple[str, str]] = []
        for n in range(USAGE_USERS):
            user = await keyring.create_user(actor, email=f"usage-{n}@localhost", servers=["*"])
            minted = await fixtures.mint_keys(
                keyring, actor, user.id, USAGE_KEYS // USAGE_USERS, prefix=f"u{n}"
            )
            keys += [(key_id, user.id) for key_id, _ in minted]
        span = USAGE_DAYS * 86400
        started = time.perf_counter()
        steps = await fixtures.fill_calls(
            pool,
            workspace_id=ws.id,
            keys=keys,
            count=cfg.usage_calls,
            start=time.time() - span,
            seconds=span,
            servers=[SERVER, "github", "gitlab"],
            tools=USAGE_TOOLS,
        )
        fill_s = time.perf_counter() - started
        busiest = keys[0][0]  # the skew gives the first key the most traffic
        week_ago = datetime.now(UTC) - timedelta(days=7)
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT count(*) AS rows, COALESCE(sum(requests), 0) AS requests "
                "FROM usage_hourly WHERE key_id = $1 AND hour >= $2",
                busiest,
                week_ago,
            )
            plans = {}
            for group_by in (["day"], ["tool", "status"]):
                scope = usage_store.Scope(ws.id, key_id=busiest)
                sql, values = usage_store.usage_sql(scope, group_by)
                plan = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}",
                    ws.id,
                    week_ago,
                    datetime.now(UTC),
                    *values,
                )
                plan_json = json.loads(plan) if isinstance(plan, str) else plan
                plans[",".join(group_by)] = plan_json[0]["Execution Time"]
            text_plan = await conn.fetch(
                f"EXPLAIN (ANALYZE, BUFFERS) {sql}", ws.id, week_ago, datetime.now(UTC), *values
            )
        return {
            "admin_key": admin.key,
            "busiest_key": busiest,
            "tables": await fixtures.table_sizes(pool, ["calls", "usage_hourly"]),
            "fill_seconds": {"total": round(fill_s, 1), **steps},
            "busiest_key_7_days": {
                "hourly_rows": int(row["rows"]),
                "requests": int(row["requests"]),
            },
            "sql_execution_ms": plans,
            "sql_plan_tool_status": [r[0] for r in text_plan],
        }

    async def _time_usage(self, admin_port: int, key: str, key_id: str) -> dict[str, Any]:
        """Client-side latency of each query: one untimed call, then cfg.usage_runs timed."""
        now = datetime.now(UTC)
        window = {
            "from": (now - timedelta(days=7)).isoformat(),
            "to": now.isoformat(),
        }
        base = f"http://127.0.0.1:{admin_port}"
        queries: dict[str, dict[str, tuple[str, dict[str, str]]]] = {
            "one_key_7_days": {
                "group_by=day": ("/api/usage", {"key_id": key_id, "group_by": "day", **window}),
                "group_by=tool,status": (
                    "/api/usage",
                    {"key_id": key_id, "group_by": "tool,status", **window},
                ),
            },
            "informational": {
                "workspace_7_days_group_by=day": ("/api/usage", {"group_by": "day", **window}),
                "workspace_30_days_group_by=key": (
                    "/api/usage",
                    {"group_by": "key", "from": (now - timedelta(days=30)).isoformat()},
                ),
                "calls_one_key_first_page": ("/api/calls", {"key_id": key_id, "limit": "100"}),
            },
        }
        headers = {"Authorization": f"Bearer {key}"}
        out: dict[str, Any] = {}
        async with clients.session(1) as http:
            for group, named in queries.items():
                out[group] = {}
                for label, (path, params) in named.items():
                    latencies: list[float] = []
                    for run in range(self.cfg.usage_runs + 1):
                        started = time.perf_counter()
                        async with http.get(base + path, params=params, headers=headers) as resp:
                            body = await resp.read()
                            if resp.status != 200:
                                raise RuntimeError(f"{path} {params}: {resp.status} {body[:300]!r}")
                        if run:  # the first call warms the key cache and the plan
                            latencies.append((time.perf_counter() - started) * 1000)
                    out[group][label] = clients.summary_ms(latencies)
        return out

    # --- the whole run ---

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results["meta"] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
            "mode": "quick" if self.cfg.quick else "full",
            "config": {
                k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                for k, v in asdict(self.cfg).items()
            },
            "machine": machine_info(),
        }
        loop = asyncio.get_running_loop()
        everything = set(os.sched_getaffinity(0))
        loop.set_default_executor(  # hashing threads may use every core, whatever the driver's
            ThreadPoolExecutor(8, initializer=os.sched_setaffinity, initargs=(0, everything))
        )
        await self.setup()
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "throughput": self.throughput,
            "paired": self.paired,
            "workers": self.workers_unpinned,
            "profile": self.profile_hot_path,
            "streaming": self.streaming,
            "cold_path": self.cold_path,
            "herd": self.herd,
            "revocation": self.revocation,
            "store_scale": self.store_scale,
            "usage_query": self.usage_query,
            "attack": self.attack,
        }
        for name in PHASES:  # PHASES holds the order (and --only checks against it)
            phase = steps[name]
            if self.cfg.only and name not in self.cfg.only:
                continue
            print(f"== {name}", flush=True)
            try:
                await phase()
            except Exception as exc:
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                self.results.setdefault(name, {"error": self.errors[name]})
                traceback.print_exc()
            if name == "streaming":  # no longer needed: free the server core
                for gone in ("nginx", "reference", "keystile_2_workers", "keystile_asyncio_loop"):
                    for proc in self.targets[gone].procs if gone in self.targets else []:
                        self.stop(proc)
        self.results["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.results["meta"]["duration_seconds"] = round(time.monotonic() - started, 1)
        self.results["targets"] = self.target_checks()
        self.results["errors"] = self.errors
        return self.results

    def target_checks(self) -> list[dict[str, Any]]:
        r = self.results
        checks: list[dict[str, Any]] = []

        def add(point: str, what: str, target: str, measured: Any, met: bool | None) -> None:
            checks.append(
                {"point": point, "what": what, "target": target, "measured": measured, "met": met}
            )

        hot = r.get("hot_path", {})
        if "ratio_keystile_to_reference" in hot:
            add(
                "3",
                "Keystile CPU us/req vs reference (sequential rounds: median of per-round ratios)",
                f"<= {TARGET_RATIO}x",
                f"{hot['keystile_cpu_us_per_req']} vs {hot['reference_cpu_us_per_req']} us "
                f"= {hot['ratio_keystile_to_reference']}x",
                hot["met"],
            )
            calls = hot["call_records"]
            add(
                "3",
                "call records on (the default) vs off: CPU us/req, ratio to reference "
                "(sequential rounds)",
                f"on <= {TARGET_RATIO}x",
                f"on {calls['cpu_us_per_req_on']} us = {calls['ratio_to_reference_on']}x; "
                f"off {calls['cpu_us_per_req_off']} us = {calls['ratio_to_reference_off']}x; "
                f"{calls['heap_bytes_per_buffered_record']} B heap per buffered record",
                calls["ratio_to_reference_on"] <= TARGET_RATIO,
            )
            policy = hot["tool_policy"]
            add(
                "3",
                "a 3-pattern tool policy's extra CPU us/req (sequential rounds: median of "
                "per-round ratios)",
                f"<= +{POLICY_TARGET:.0%}",
                f"{policy['cpu_us_per_req_policy']} vs {policy['cpu_us_per_req_no_policy']} us "
                f"= {policy['extra_cpu']:+.1%}",
                policy["met"],
            )
            oauth = hot["oauth_token"]
            add(
                "5",
                "an OAuth access token's CPU us/req vs a key's (sequential rounds: median of "
                "per-round ratios)",
                oauth["target"],
                f"{oauth['cpu_us_per_req_token']} vs {oauth['cpu_us_per_req_key']} us "
                f"= {oauth['difference']:+.1%}; {oauth['errors']} errors",
                oauth["met"],
            )
            lookups = hot["database"]["key_lookups_seen_by_postgres"]
            allowed = hot["database"].get("key_lookups_allowed", 0)
            misses = sum(
                v["cache_misses_total"] for v in hot["database"]["keystile_metrics_delta"].values()
            )
            # A re-lookup at the TTL is shared by every request in flight at that moment
            # (single flight): each of them counts as a miss, one query answers them all.
            sharing = self.cfg.connections
            add(
                "3",
                "key lookups on the hot path (Postgres users scans; Keystile misses)",
                f"<= {allowed} lookups: one per process and credential per cache TTL, "
                f"each shared by up to {sharing} requests in flight (misses <= "
                f"{allowed * sharing})",
                f"{lookups} lookups; {misses} cache misses",
                lookups <= allowed and misses <= allowed * sharing,
            )
        self._paired_checks(add)
        herd = r.get("herd", {})
        if "statuses" in herd:
            # int keys as measured; str keys once the results went through JSON
            served = herd["statuses"].get(200, herd["statuses"].get("200", 0))
            ok = served == herd["keys"]
            add(
                "6",
                "herd: every key served 200",
                f"{herd['keys']} x 200",
                f"{herd['statuses']} in {herd['all_served_seconds']} s",
                ok,
            )
            mem = herd["memory"]["fresh_process"]["bytes_per_cached_key_rss"]
            add(
                "7",
                "memory per cached key (Keystile RSS delta / keys newly cached)",
                "< 1024 B",
                mem,
                None if mem is None else mem < 1024,
            )
        scale = r.get("store_scale", {})
        if "ratio_big_to_small_median" in scale:
            add(
                "7",
                f"cache-miss median at {self.cfg.store_scale} keys vs 1,000",
                "<= 1.5x",
                scale["ratio_big_to_small_median"],
                scale["met"],
            )
            mem_t = scale["memory"]
            add(
                "7",
                "memory per cached key (tracemalloc, cache alone)",
                "< 1024 B",
                mem_t["bytes_per_cached_key"],
                mem_t["met"],
            )
        usage = r.get("usage_query", {})
        if "met" in usage:
            timed = usage["one_key_7_days"]
            add(
                "usage",
                f"GET /api/usage, one key over 7 days, {usage['calls']:,} call records "
                "(median / max of each group_by)",
                f"< {USAGE_TARGET_MS:g} ms",
                "; ".join(f"{q}: {t['median_ms']} / {t['max_ms']} ms" for q, t in timed.items()),
                usage["met"],
            )
        for name in self.errors:
            add("-", f"phase {name} completed", "no error", self.errors[name], False)
        return checks

    def _paired_checks(self, add: Callable[[str, str, str, Any, bool | None], None]) -> None:
        """The paired phase's figures against the same targets. The policy's and the token's
        ratios are taken against the control's (the twin with the plain key), so that what
        two identical processes differ by is not counted as their cost."""
        pairs = self.results.get("paired", {}).get("summary", {})

        def spread(p: dict[str, Any]) -> str:
            return f"{p['ratio_median']}x (rounds {p['ratio_min']}-{p['ratio_max']})"

        hot, off = pairs.get("keystile/reference"), pairs.get("keystile_no_calls/reference")
        control = pairs.get("keystile_twin/keystile")
        if hot:
            add(
                "3",
                "Keystile CPU us/req vs reference (paired: loaded at the same moments)",
                f"<= {TARGET_RATIO}x",
                spread(hot),
                hot["ratio_median"] <= TARGET_RATIO,
            )
        if hot and off:
            add(
                "3",
                "call records on (the default) vs off, ratio to reference (paired)",
                f"on <= {TARGET_RATIO}x",
                f"on {spread(hot)}; off {spread(off)}",
                hot["ratio_median"] <= TARGET_RATIO,
            )
        if not control:
            return
        add(
            "-",
            "control: two identical processes, the same key (paired)",
            "1.0: what the pairs cannot tell apart",
            spread(control),
            None,
        )

        def against_control(p: dict[str, Any]) -> tuple[float, str]:
            """A twin pair's ratio over the control's, less one, and how it was worked out."""
            extra = p["ratio_median"] / control["ratio_median"] - 1
            shown = f"{p['ratio_median']} / {control['ratio_median']} = {extra:+.1%}"
            return extra, f"{shown} (rounds {p['ratio_min']}-{p['ratio_max']})"

        policy = pairs.get("keystile_twin_policy/keystile")
        if policy:
            extra, shown = against_control(policy)
            add(
                "3",
                "a 3-pattern tool policy's extra CPU us/req (paired, against the control)",
                f"<= +{POLICY_TARGET:.0%}",
                shown,
                extra <= POLICY_TARGET,
            )
        token = pairs.get("keystile_twin_oauth/keystile")
        if token:
            diff, shown = against_control(token)
            add(
                "5",
                "an OAuth access token's CPU us/req vs a key's (paired, against the control)",
                f"equal within +-{OAUTH_NOISE:.0%}",
                f"{shown}; errors {token['errors'] or 0}",
                abs(diff) <= OAUTH_NOISE and not token["errors"],
            )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.pg.stop, "immediate")
        elif self.root_url:
            for name in self.created_dbs:
                with contextlib.suppress(Exception):
                    await fixtures.drop_database(self.root_url, name)
        if self.cfg.keep:
            print(f"work dir kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def paired_extra(rounds: list[dict[str, Any]], target: str, base: str) -> float:
    """The median over rounds of target's CPU per request ÷ base's, minus one: each round's
    pair is measured back to back on the same process, so slow drift cancels out."""
    per_round: dict[int, dict[str, float]] = {}
    for row in rounds:
        per_round.setdefault(row["round"], {})[row["target"]] = row["cpu_us_per_req"]
    ratios = [r[target] / r[base] for r in per_round.values() if r.get(base) and target in r]
    return median(ratios) - 1 if ratios else float("nan")


def summarise_pairs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per pair: the median, min and max of its per-round ratios, and its errors."""
    out: dict[str, dict[str, Any]] = {}
    for base, other in PAIRS:
        mine = [r for r in rows if r["base"] == base and r["other"] == other]
        ratios = [r["ratio"] for r in mine]
        if not ratios:
            continue
        errors: dict[str, int] = {}
        for r in mine:
            for counts in r["errors"].values():
                for kind, n in counts.items():
                    errors[kind] = errors.get(kind, 0) + n
        out[f"{other}/{base}"] = {
            "base": base,
            "other": other,
            "ratio_median": round(median(ratios), 4),
            "ratio_min": round(min(ratios), 4),
            "ratio_max": round(max(ratios), 4),
            "rounds": len(ratios),
            "errors": errors,
        }
    return out


def summarise_rounds(
    rows: list[dict[str, Any]],
    order: list[str],
    *,
    reference: str | None = "reference",
    ceiling: str | None = "nginx",
) -> dict[str, dict[str, Any]]:
    """Median per target over rounds; ratios as the median of per-round ratios."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["target"]] = row
    out: dict[str, dict[str, Any]] = {}
    metrics = (
        "rps",
        "p50_ms",
        "p99_ms",
        "cpu_us_per_req",
        "upstream_cpu_us_per_req",
        "proxy_cores_busy",
        "other_load_cores",
    )
    for name in order:
        mine = [row for row in rows if row["target"] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {m: round(median([row[m] for row in mine]), 3) for m in metrics}
        entry["errors"] = sum(sum(row["errors"].values()) for row in mine)
        for base, label in ((reference, "reference"), (ceiling, "nginx")):
            if base is None:
                continue
            for m, short in (("rps", "rps"), ("cpu_us_per_req", "cpu"), ("p99_ms", "p99")):
                ratios = [
                    rnd[name][m] / rnd[base][m]
                    for rnd in by_round.values()
                    if name in rnd and base in rnd and rnd[base][m]
                ]
                entry[f"{short}_ratio_to_{label}"] = r3(median(ratios)) if ratios else None
        out[name] = entry
    return out


def _row_line(name: str, row: dict[str, Any]) -> str:
    errors = f"  errors {row['errors']}" if row["errors"] else ""
    return (
        f"  {name:<34} {row['rps']:>9.0f} req/s  p50 {row['p50_ms']:>6.2f} ms  "
        f"p99 {row['p99_ms']:>6.2f} ms  {row['cpu_us_per_req']:>6.1f} us/req  "
        f"other load {row['other_load_cores']:.2f} cores{errors}"
    )


def print_report(results: dict[str, Any]) -> None:
    summary = results.get("throughput", {}).get("summary")
    if summary:
        print()
        head = (
            f"{'target':<24}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'CPU us/req':>11}"
            f"{'rps/ref':>9}{'CPU/ref':>9}{'rps/ngx':>9}{'CPU/ngx':>9}"
        )
        print(head)
        print("-" * len(head))
        for name, s in summary.items():
            print(
                f"{name:<24}{s['rps']:>9.0f}{s['p50_ms']:>8.2f}{s['p99_ms']:>8.2f}"
                f"{s['cpu_us_per_req']:>11.1f}{_f(s['rps_ratio_to_reference'])}"
                f"{_f(s['cpu_ratio_to_reference'])}{_f(s['rps_ratio_to_nginx'])}"
                f"{_f(s['cpu_ratio_to_nginx'])}"
            )
    print()
    for check in results.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
        print(
            f"[{mark:>6}] ({check['point']}) {check['what']}: {check['measured']} "
            f"(target {check['target']})"
        )


def _f(value: float | None) -> str:
    return f"{value:>9.2f}" if value is not None else f"{'-':>9}"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    bench = Bench(cfg)

    async def go() -> dict[str, Any]:
        try:
            return await bench.run()
        finally:
            await bench.close()

    try:
        results = asyncio.run(go())
    except Exception as exc:
        traceback.print_exc()
        results = {
            **bench.results,
            "errors": {**bench.errors, "setup": f"{type(exc).__name__}: {exc}"},
        }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_report(results)
    print(f"\nresults: {cfg.out}")
    sys.exit(1 if results.get("errors") else 0)


if __name__ == "__main__":
    main()
