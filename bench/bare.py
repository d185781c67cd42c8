"""The baseline of `bench.status`, `bench.ingest` and `bench.peer`: bare aiohttp handlers.

    python -m bench.bare --port N

Served exactly as the services are (`shared.runner.serve`: the same settings from the
environment, logging, open file limit, frozen heap, uvloop, no access log, the same host and
backlog), with nothing of theirs in between: no middleware, no metrics, no Redis. What a
service costs per request beyond this is what its own code costs.

- `GET /api/webhooks`: a constant body the size and shape of a cached status read's answer;
- `POST /api/webhooks`: reads the whole body, answers a constant like the ingest's answer;
- `GET /sse?id=`: an aiohttp-sse stream as its README writes one (`sse_response`, its own
  ping task at `SSE_KEEPALIVE_SECONDS`), first event a constant status, then whatever
  `POST /pub?id=` sends to that id: the gateway's job with no Redis, no status read, no
  validation, no middleware;
- `GET /healthz`: how the benchmark sees it is up.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from shared.appkeys import SETTINGS
from shared.model import StatusEvent, StreamStatus
from shared.runner import serve
from shared.settings import Settings

# A pending session's status event, compact.
EVENT = StatusEvent(
    uuid="3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
    order_code=1_700_000_123,
    status=StreamStatus.PENDING,
    amount=10_000,
    amount_paid=0,
    updated_at=datetime(2025, 1, 1, tzinfo=UTC),
    version=1,
).to_json()
# What session-api answers for a cached session: `{"success":true, **event}`.
STATUS_BODY = b'{"success":true,' + EVENT.encode()[1:]
# What the ingest answers for an accepted webhook.
INGEST_BODY = json.dumps(
    {"success": True, "code": "00", "desc": "success", "outcome": "completed"}
).encode()
# The open streams of `GET /sse`, by id.
STREAMS = web.AppKey("streams", dict[str, EventSourceResponse])


async def status(request: web.Request) -> web.Response:
    return web.Response(body=STATUS_BODY, content_type="application/json")


async def ingest(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=INGEST_BODY, content_type="application/json")


async def sse(request: web.Request) -> web.StreamResponse:
    key = request.query.get("id", "")
    keepalive = request.app[SETTINGS].sse_keepalive_seconds
    async with sse_response(request, ping_interval=keepalive) as stream:
        request.app[STREAMS][key] = stream
        try:
            await stream.send(EVENT, id="1")
            await stream.wait()
        finally:
            request.app[STREAMS].pop(key, None)
    return stream


async def publish(request: web.Request) -> web.Response:
    stream = request.app[STREAMS].get(request.query.get("id", ""))
    body = (await request.read()).decode()
    if stream is None:
        return web.Response(status=202)  # nobody listening, as nchan answers
    await stream.send(body)
    return web.Response(status=201)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[STREAMS] = {}
    app.router.add_routes(
        [
            web.get("/api/webhooks", status),
            web.post("/api/webhooks", ingest),
            web.get("/sse", sse),
            web.post("/pub", publish),
            web.get("/healthz", healthz),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    serve(create_app, lambda _settings: port)


if __name__ == "__main__":
    main()
