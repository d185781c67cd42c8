"""`python -m tests.stream_clients PORT`: light raw-socket SSE clients in a process of their own.

Reads a JSON list of uuids on stdin, opens one stream each (a bounded number connecting at
once), waits for each stream's first event, prints `{"open", "failures", "statuses"}` once every
stream has been tried, holds the streams until stdin gets another line, then closes them. The
clients' own sockets would otherwise compete for the test process's file limit and event loop.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from collections import Counter

STREAM_PATH = "/api/webhooks/stream"
CONNECT_CONCURRENCY = 200
CONNECT_TIMEOUT = 30.0


async def main(port: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uuids: list[str] = json.loads(sys.stdin.readline())
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []
    statuses: Counter[str] = Counter()

    async def one(uuid: str) -> bool:
        async with gate:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writers.append(writer)
                    writer.write(
                        f"GET {STREAM_PATH}?uuid={uuid} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Accept: text/event-stream\r\n\r\n".encode()
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    statuses[head.split(b" ", 2)[1].decode()] += 1
                    if not head.startswith(b"HTTP/1.1 200"):
                        return False
                    await reader.readuntil(b"\r\n\r\n")  # the first event (CRLF lines)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                statuses["error"] += 1
                return False
        return True

    results = await asyncio.gather(*(one(u) for u in uuids))
    opened = sum(results)
    report = {"open": opened, "failures": len(uuids) - opened, "statuses": dict(statuses)}
    print(json.dumps(report), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for writer in writers:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
