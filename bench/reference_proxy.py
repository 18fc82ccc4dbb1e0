"""The reference: a plain aiohttp pass-through proxy, the least a Python gateway can do.

One pooled ClientSession, a dict lookup for the key, StreamResponse back. No path judgement,
no metrics, no access log. Kept in bench/ only, as the yardstick for Keystile's hot path.

Run: python -m bench.reference_proxy --port N --upstream http://127.0.0.1:U/mcp --keys FILE
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

PREFIX = "/mcp-connect/bench"
DROP = frozenset({"host", "authorization", "connection", "keep-alive", "transfer-encoding"})
SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str, keys: dict[str, str]) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in keys:
            return web.json_response({"error": "invalid_api_key"}, status=401)
        if not request.raw_path.startswith(PREFIX):
            return web.json_response({"error": "not_found"}, status=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        body = await request.read() if request.body_exists else None
        url = upstream + request.raw_path[len(PREFIX) :]
        async with request.app[SESSION].request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in DROP}
            response = web.StreamResponse(status=up.status, headers=out)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="URL that /mcp-connect/bench maps to")
    parser.add_argument("--keys", type=Path, required=True, help="file: one valid key per line")
    args = parser.parse_args()
    keys = {line.strip(): "user" for line in args.keys.read_text().splitlines() if line.strip()}
    app = create_app(args.upstream, keys)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
