"""The baseline of `bench.status` and `bench.ingest`: a bare aiohttp handler returning a constant.

    python -m bench.bare --port N

Served exactly as the services are (`shared.runner.serve`: the same settings from the
environment, logging, open file limit, frozen heap, uvloop, no access log, the same host and
backlog), with nothing of theirs in between: no middleware, no metrics, no Redis. What a
service costs per request beyond this is what its own code costs.

- `GET /api/webhooks`: a constant body the size and shape of a cached status read's answer;
- `POST /api/webhooks`: reads the whole body, answers a constant like the ingest's answer;
- `GET /healthz`: how the benchmark sees it is up.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

from aiohttp import web

from shared.model import StatusEvent, StreamStatus
from shared.runner import serve
from shared.settings import Settings

# What session-api answers for a cached session: `{"success":true, **event}`, compact.
STATUS_BODY = (
    b'{"success":true,'
    + StatusEvent(
        uuid="3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b",
        order_code=1_700_000_123,
        status=StreamStatus.PENDING,
        amount=10_000,
        amount_paid=0,
        updated_at=datetime(2025, 1, 1, tzinfo=UTC),
        version=1,
    )
    .to_json()
    .encode()[1:]
)
# What the ingest answers for an accepted webhook.
INGEST_BODY = json.dumps(
    {"success": True, "code": "00", "desc": "success", "outcome": "completed"}
).encode()


async def status(request: web.Request) -> web.Response:
    return web.Response(body=STATUS_BODY, content_type="application/json")


async def ingest(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=INGEST_BODY, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(settings: Settings) -> web.Application:
    app = web.Application()
    app.router.add_routes(
        [
            web.get("/api/webhooks", status),
            web.post("/api/webhooks", ingest),
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
