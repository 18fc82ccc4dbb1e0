"""The benchmark's upstream: a minimal, fast aiohttp server (low-level, no router, no log).

    POST <any path>          -> a small JSON-RPC result (the body is read and dropped)
    GET  <path ending /sse>  -> text/event-stream: `count` events (default 1), `delay` s apart
    GET  <path ending /big>  -> 10 MiB of bytes (Content-Length set), in 64 KiB writes

Run: python -m bench.upstream --port N
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import web

RESULT = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}]}}'
BIG_SIZE = 10 * 1024 * 1024
CHUNK = b"x" * 65536
_JSON_HEADERS = {"Content-Type": "application/json"}


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    if request.method == "POST":
        await request.read()
        return web.Response(body=RESULT, headers=_JSON_HEADERS)
    if path.endswith("/sse"):
        return await _sse(request)
    if path.endswith("/big"):
        return await _big(request)
    return web.Response(status=404)


async def _sse(request: web.BaseRequest) -> web.StreamResponse:
    count = int(request.query.get("count", "1"))
    delay = float(request.query.get("delay", "0"))
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for n in range(count):
        if n:
            await asyncio.sleep(delay)
        await response.write(b'id: %d\nevent: message\ndata: {"n": %d}\n\n' % (n, n))
    await response.write_eof()
    return response


async def _big(request: web.BaseRequest) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = BIG_SIZE
    await response.prepare(request)
    for _ in range(BIG_SIZE // len(CHUNK)):
        await response.write(CHUNK)
    await response.write_eof()
    return response


async def serve(host: str, port: int) -> None:
    server = web.Server(handle, access_log=None)
    runner = web.ServerRunner(server, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
