"""A shop's webhook receiver for the tests: a real HTTP server that verifies every delivery
with the `standardwebhooks` reference library (not our signing code) and credits a balance
once per event id, as the README's example receiver does.

Its behaviour can be changed while it runs: answer 500, answer slowly, hang until released,
or be down altogether (the server stopped, its port closed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from devstack.servers import free_port

Mode = Literal["ok", "fail", "slow", "hang"]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Arrival:
    id: str
    type: str
    data: dict[str, Any]
    answered: int


@dataclass
class ShopReceiver:
    secret: str
    port: int = field(default_factory=free_port)
    mode: Mode = "ok"
    slow_seconds: float = 2.0
    # Every verified request, in arrival order (including those answered 500 or hung).
    requests: list[Arrival] = field(default_factory=list)
    # Deliveries answered 2xx, in order.
    accepted: list[Arrival] = field(default_factory=list)
    rejected_signatures: int = 0
    balance: dict[str, int] = field(default_factory=dict)
    credited: set[str] = field(default_factory=set)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/shop/webhooks"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/shop/webhooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            self.release.set()
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.rejected_signatures += 1
            return web.json_response({"error": "bad signature"}, status=400)
        msg_id = request.headers["webhook-id"]
        assert event["id"] == msg_id
        arrival = Arrival(msg_id, event["type"], event["data"], 0)
        self.requests.append(arrival)
        if self.mode == "hang":
            self.hanging.set()
            await self.release.wait()
        if self.mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        if self.mode == "fail":
            arrival.answered = 500
            return web.json_response({"error": "try later"}, status=500)
        # Credit once per event id: a redelivery (same id) changes nothing.
        if event["type"] == "payment.completed" and msg_id not in self.credited:
            self.credited.add(msg_id)
            account = event["data"]["accountNumber"]
            self.balance[account] = self.balance.get(account, 0) + event["data"]["amountPaid"]
        arrival.answered = 200
        self.accepted.append(arrival)
        self.arrived.set()
        return web.json_response({"ok": True})

    def accepted_ids(self, type_: str | None = None) -> Counter[str]:
        return Counter(a.id for a in self.accepted if type_ is None or a.type == type_)

    def of_session(self, uuid: str) -> list[Arrival]:
        return [a for a in self.accepted if a.data.get("uuid") == uuid]

    async def wait_for(self, count: int, timeout: float = 15.0, type_: str | None = None) -> None:
        """Until `count` distinct ids (of `type_`) were accepted."""
        async with asyncio.timeout(timeout):
            while len(self.accepted_ids(type_)) < count:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def running_receiver(secret: str | None = None) -> AsyncIterator[ShopReceiver]:
    receiver = ShopReceiver(secret or new_secret())
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()
