"""Real `keystile` processes for tests: start, wait for readiness, signal, collect output."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from tests.support import DEADLINE, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: held open together while they are picked (one port freed
    and asked for again can come back the same)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def keystile_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keystile.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DATABASE_URL": database_url},
        check=False,
    )


class ServeProcess:
    """`keystile serve` on free loopback ports with a generated config file."""

    def __init__(
        self,
        database_url: str,
        config_dir: Path,
        *,
        gateway_toml: str = "",
        extra_toml: str = "",
        workers: int = 1,
    ) -> None:
        self.gateway_port, self.admin_port = free_ports(2)
        self.config = Path(tempfile.mkstemp(suffix=".toml", dir=config_dir)[1])
        self.config.write_text(
            f'[gateway]\nlisten = "127.0.0.1:{self.gateway_port}"\naccess_log = false\n'
            + gateway_toml
            + f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n'
            + extra_toml
        )
        command = [sys.executable, "-m", "keystile.cli", "serve", "--config", str(self.config)]
        if workers > 1:
            command += ["--workers", str(workers)]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            command,
            env={**os.environ, "DATABASE_URL": database_url},
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def wait_ready(self, within: float = DEADLINE) -> dict[str, object]:
        """Poll /readyz until it answers 200 (its JSON returned); fail early if the process
        exits. `within` only turns a process that never gets ready into a failure."""
        async with aiohttp.ClientSession() as http:

            async def ready() -> dict[str, object] | None:
                assert self.proc.poll() is None, f"exited early: {self.stderr()}"
                try:
                    async with http.get(f"{self.gateway}/readyz") as resp:
                        if resp.status == 200:
                            body: dict[str, object] = await resp.json()
                            return body
                except aiohttp.ClientError:
                    pass
                return None

            body: dict[str, object] = await wait_until(
                ready, within=within, interval=0.1, message=lambda: f"never ready: {self.stderr()}"
            )
            return body

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, within: float = 60.0) -> int:
        return self.proc.wait(timeout=within)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        """Stop if still running (SIGKILL as a last resort) and release the log file."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
