"""The commands as a user runs them: real processes, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg

from gateway import keys
from gateway.keys import KeyHasher


def keystile(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keystile.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def key_row(database_url: str, key_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT k.secret_hash, k.permissions, k.servers, u.role, u.email "
            "FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.id = $1",
            key_id,
        )
        assert row is not None
        return row
    finally:
        await conn.close()


async def test_bootstrap_prints_the_admin_key_once_and_refuses_twice(
    empty_database_url: str,
) -> None:
    env = {"DATABASE_URL": empty_database_url}
    first = await asyncio.to_thread(keystile, "bootstrap", "--email", "ops@example.com", env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1  # the key alone on its own line of stdout
    parsed = keys.parse(lines[0])
    assert parsed is not None
    row = await key_row(empty_database_url, parsed.key_id)
    assert sorted(row["permissions"]) == ["admin", "chat", "keys", "mcp"]
    assert list(row["servers"]) == ["*"]
    assert (row["role"], row["email"]) == ("admin", "ops@example.com")
    assert KeyHasher().verify(row["secret_hash"], lines[0])
    assert lines[0] not in first.stderr

    again = await asyncio.to_thread(keystile, "bootstrap", env=env)
    assert again.returncode == 1
    assert again.stdout == ""
    assert "--force" in again.stderr

    forced = await asyncio.to_thread(keystile, "bootstrap", "--force", env=env)
    assert forced.returncode == 0
    second = keys.parse(forced.stdout.strip())
    assert second is not None and second.key_id != parsed.key_id
    assert second.user_id == parsed.user_id  # another key for the same bootstrap admin


def _read_until(proc: subprocess.Popen[str], marker: str, within: float) -> str:
    """Collect stdout lines until `marker` shows up (a thread reads, so no pipe buffering games)."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    text = ""
    deadline = time.monotonic() + within
    while marker not in text:
        try:
            text += lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {marker!r} in demo output: {text}") from None
    return text


def _curl_commands(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.startswith("curl ")]


def test_demo_prints_keys_and_curl_lines_that_work(tmp_path: Path) -> None:
    config = tmp_path / "demo.toml"
    config.write_text(
        '[gateway]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
        f'[database]\ndata_dir = "{tmp_path / "data"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keystile.cli", "demo", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        text = _read_until(proc, "/api/v1/chat", within=90)
        found = dict(re.findall(r"^(ADMIN_KEY|SCOPED_KEY)=(\S+)$", text, re.M))
        assert keys.parse(found["ADMIN_KEY"]) and keys.parse(found["SCOPED_KEY"])
        commands = _curl_commands(text)
        assert len(commands) == 5
        outputs = [
            subprocess.run(
                ["bash", "-c", command],
                env={**env, **found},
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            for command in commands
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    me, tools, call, no_key, chat = outputs
    assert json.loads(me)["key"]["name"] == "demo-scoped"
    assert [t["name"] for t in json.loads(tools)["result"]["tools"]][:2] == ["echo", "add"]
    assert json.loads(call)["result"]["content"][0]["text"] == "hi"
    assert no_key.startswith("HTTP/1.1 401") and "invalid_api_key" in no_key
    assert json.loads(chat) == {"reply": "echo: hello"}
    assert code == 0
    assert not (tmp_path / "data" / "pg" / "postmaster.pid").exists()  # Ctrl-C stopped Postgres
