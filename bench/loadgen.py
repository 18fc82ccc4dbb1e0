"""wrk as the load generator: a Lua script for the JSON-RPC POST, results as JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pinned

# ~200 bytes: a typical MCP tools/call request.
JSONRPC_BODY = (
    '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search",'
    '"arguments":{"query":"keystile benchmark request body","limit":10,'
    '"filters":{"lang":"en","kind":"doc"},"cursor":"c-000000000001"}}}'
)

_LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer %(key)s"

done = function(summary, latency, requests)
  io.write(string.format(
    "BENCHJSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"bytes\\": %%d, " ..
    "\\"p50_us\\": %%d, \\"p90_us\\": %%d, \\"p99_us\\": %%d, \\"mean_us\\": %%.1f, " ..
    "\\"max_us\\": %%d, \\"err_connect\\": %%d, \\"err_read\\": %%d, \\"err_write\\": %%d, " ..
    "\\"err_status\\": %%d, \\"err_timeout\\": %%d}\\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
"""


def find_wrk() -> str | None:
    return shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").exists() else None)


def write_script(directory: Path, key: str, name: str = "post") -> Path:
    assert "]]" not in JSONRPC_BODY
    path = directory / f"wrk-{name}.lua"
    path.write_text(_LUA % {"body": JSONRPC_BODY, "key": key})
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


async def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    cpus: set[int] | None = None,
) -> WrkResult:
    argv = pinned(
        [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        cpus,
    )
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        mean_ms=data["mean_us"] / 1e3,
        max_ms=data["max_us"] / 1e3,
        errors={k.removeprefix("err_"): int(v) for k, v in data.items() if k.startswith("err_")},
    )
