"""`keystile demo`: embedded Postgres, the sample MCP server, both planes, and two keys."""

from __future__ import annotations

import sys
from dataclasses import replace

from admin.api import create_admin_app
from gateway.app import serve_until_signalled
from gateway.bootstrap import issue_admin_key
from gateway.config import Address, Settings, UpstreamSettings
from gateway.keyring import Keyring
from gateway.runtime import Runtime, open_runtime
from gateway.sample_mcp import MCP_PATH, start_sample_server
from gateway.store import Actor

DEMO_SERVER = "sample"
DEMO_WORKSPACE = "default"
DEMO_MEMBER = "demo@localhost"


def demo_settings(settings: Settings, sample_url: str, *, configured: bool) -> Settings:
    """Point a `sample` server and the chat API at the bundled sample server."""
    servers = {**settings.mcp_servers, DEMO_SERVER: UpstreamSettings(url=sample_url + MCP_PATH)}
    demo = replace(
        settings,
        mcp_servers=servers,
        chat=settings.chat or UpstreamSettings(url=sample_url),
    )
    if not configured:
        demo = replace(
            demo,
            gateway=replace(demo.gateway, listen=Address("127.0.0.1", 8080)),
        )
    return demo


async def run_demo(settings: Settings, database_url: str, *, configured: bool) -> None:
    runner, port = await start_sample_server("127.0.0.1", 0)
    try:
        demo = demo_settings(settings, f"http://127.0.0.1:{port}", configured=configured)
        await serve_until_signalled(
            open_runtime(demo, database_url), create_admin_app, ready=_ready
        )
    finally:
        await runner.cleanup()


async def _ready(runtime: Runtime, gateway_port: int, admin_port: int) -> None:
    admin_key, scoped_key = await issue_demo_keys(runtime.keyring)
    gateway = f"http://127.0.0.1:{gateway_port}"
    admin = f"http://127.0.0.1:{admin_port}"
    rpc = "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream'"
    call = (
        '{"jsonrpc":"2.0","id":2,"method":"tools/call",'
        '"params":{"name":"echo","arguments":{"text":"hi"}}}'
    )
    print(
        f"""
Keystile demo is running (Ctrl-C stops everything).
  gateway  {gateway}
  admin    {admin}
  sample MCP server behind the gateway as '{DEMO_SERVER}'

ADMIN_KEY={admin_key}
SCOPED_KEY={scoped_key}

# who am I?
curl -s {gateway}/api/me -H "Authorization: Bearer $SCOPED_KEY"
# list the sample server's tools through the gateway
curl -s {gateway}/mcp-connect/{DEMO_SERVER} {rpc} -H "Authorization: Bearer $SCOPED_KEY" \\
  -d '{{"jsonrpc":"2.0","id":1,"method":"tools/list"}}'
# call a tool
curl -s {gateway}/mcp-connect/{DEMO_SERVER} {rpc} -H "Authorization: Bearer $SCOPED_KEY" \\
  -d '{call}'
# no key: 401
curl -s -i {gateway}/mcp-connect/{DEMO_SERVER}
# the chat API needs the 'chat' permission: the admin key has it, the scoped key gets 403
curl -s {gateway}/api/v1/chat -H "Authorization: Bearer $ADMIN_KEY" -d '{{"message":"hello"}}'
""",
        flush=True,
    )
    del admin  # shown above; the admin API lives on that port
    sys.stdout.flush()


async def issue_demo_keys(keyring: Keyring) -> tuple[str, str]:
    """Fresh demo keys each run: the previous run's keys are revoked (they were shown once)."""
    ws = await keyring.ensure_workspace(DEMO_WORKSPACE)
    system = Actor(ws.id)
    for key in await keyring.store.list_keys(ws.id):
        if key.name in ("demo-admin", "demo-scoped"):
            await keyring.revoke_key(system, key.id)
    admin = await issue_admin_key(
        keyring,
        workspace=DEMO_WORKSPACE,
        email="admin@localhost",
        force=True,
        key_name="demo-admin",
    )
    member = next((u for u in await keyring.store.users(ws.id) if u.email == DEMO_MEMBER), None)
    if member is None:
        member = await keyring.create_user(
            system, email=DEMO_MEMBER, display_name="Demo user", servers=[DEMO_SERVER]
        )
    scoped = await keyring.create_key(
        system,
        user_id=member.id,
        name="demo-scoped",
        description="Reaches only the sample MCP server",
        servers=[DEMO_SERVER],
        permissions=["mcp"],
    )
    return admin.key, scoped.key
