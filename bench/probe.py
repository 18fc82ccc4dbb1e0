"""A latency probe in its own process: sequential requests with one (cached) key until told
to stop (a line or EOF on stdin), then one JSON line of latencies (ms) on stdout.

Run: python -m bench.probe URL KEY
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.clients import post_once, session


async def probe(url: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.run_in_executor(None, sys.stdin.readline)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with session(1) as http:
        await post_once(http, url, key)  # connect outside the measurement
        print("ready", flush=True)
        deadline = time.monotonic() + 900  # bounded even if nobody tells it to stop
        while not stop.done() and time.monotonic() < deadline:
            status, ms = await post_once(http, url, key)
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append(round(ms, 3))
            await asyncio.sleep(0.002)  # a light client: ~a few hundred requests/s at most
    print(json.dumps({"latencies": latencies, "statuses": statuses}), flush=True)


def main() -> None:
    asyncio.run(probe(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    main()
