"""The payment ledger for operators (issue 11): list and resolve items, and keep the gauge of
open items by kind. The ledger itself (one item per case) is shared.ledger."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from bson import ObjectId
from pymongo.errors import PyMongoError

from shared.errors import NotFound, ServiceError, storage
from shared.ledger import (
    AlreadyResolved,
    IssueKind,
    IssueNotFound,
    IssueStatus,
    Ledger,
    public_item,
)
from shared.tasks import Supervised, Supervisor, checkpoint

from .errors import InvalidRequest
from .metrics import SessionMetrics
from .validation import Paging, parse_paging

log = structlog.get_logger(__name__)

MAX_NOTE = 2000
MAX_RESOLVER = 100
ITEM_ID_RE = re.compile(r"^[0-9a-f]{24}$")
# How often each replica refreshes the gauge of open items (besides after a resolve).
GAUGE_SECONDS = 15.0


class IssueResolved(ServiceError):
    """The item was resolved before (409); the answer carries it as it is."""

    status = 409
    label = "already_resolved"

    def __init__(self, item: dict[str, Any]) -> None:
        super().__init__("this payment issue is already resolved")
        self.item = item

    def fields(self) -> dict[str, Any]:
        return {"item": self.item}


@dataclass(frozen=True, slots=True)
class IssueQuery:
    status: IssueStatus | None
    kind: IssueKind | None
    paging: Paging


def parse_issue_query(query: Mapping[str, str]) -> IssueQuery:
    """`?status=open|resolved|all&kind=&page=&limit=`; default open, every kind."""
    raw_status = query.get("status", "") or IssueStatus.OPEN.value
    if raw_status == "all":
        status = None
    elif raw_status in IssueStatus._value2member_map_:
        status = IssueStatus(raw_status)
    else:
        raise InvalidRequest("`status` must be one of open, resolved, all")
    raw_kind = query.get("kind", "")
    if raw_kind and raw_kind not in IssueKind._value2member_map_:
        raise InvalidRequest(f"`kind` must be one of {', '.join(k.value for k in IssueKind)}")
    kind = IssueKind(raw_kind) if raw_kind else None
    return IssueQuery(status, kind, parse_paging(query))


@dataclass(frozen=True, slots=True)
class Resolution:
    by: str
    note: str


def parse_resolution(body: object) -> Resolution:
    """`{resolvedBy, note}`: who resolves it and why, both kept with the item."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    by, note = body.get("resolvedBy"), body.get("note")
    if not isinstance(by, str) or not 0 < len(by.strip()) <= MAX_RESOLVER:
        raise InvalidRequest(f"`resolvedBy` must be 1 to {MAX_RESOLVER} characters")
    if not isinstance(note, str) or not 0 < len(note.strip()) <= MAX_NOTE:
        raise InvalidRequest(f"`note` must be 1 to {MAX_NOTE} characters")
    return Resolution(by.strip(), note.strip())


def validate_item_id(value: str) -> str:
    if not ITEM_ID_RE.fullmatch(value) or not ObjectId.is_valid(value):
        raise InvalidRequest("the item id must be 24 lowercase hexadecimal digits")
    return value


class PaymentIssues:
    """What the admin API does with the ledger; raises domain errors only."""

    def __init__(self, ledger: Ledger, metrics: SessionMetrics) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._task: Supervised | None = None

    async def page(self, query: IssueQuery) -> dict[str, Any]:
        limit = query.paging.limit
        with storage():
            total, docs = await self._ledger.find(
                status=query.status, kind=query.kind, page=query.paging.page, limit=limit
            )
        return {
            "page": query.paging.page,
            "limit": limit,
            "total": total,
            "pages": (total + limit - 1) // limit,
            "items": [public_item(d) for d in docs],
        }

    async def resolve(self, item_id: str, resolution: Resolution) -> dict[str, Any]:
        try:
            with storage():
                item = await self._ledger.resolve(
                    validate_item_id(item_id), by=resolution.by, note=resolution.note
                )
        except IssueNotFound:
            raise NotFound("no payment issue with this id") from None
        except AlreadyResolved as exc:
            raise IssueResolved(public_item(exc.item)) from None
        log.info(
            "payment_issue_resolved",
            issue_id=item_id,
            kind=item["kind"],
            order_code=item["orderCode"],
            resolved_by=resolution.by,
        )
        await self.refresh_gauge()
        return public_item(item)

    async def refresh_gauge(self) -> None:
        try:
            counts = await self._ledger.open_counts()
        except PyMongoError as exc:
            log.info("payment_issues_gauge_stale", error=str(exc))
            return
        for kind, n in counts.items():
            self._metrics.issues_open.labels(kind).set(n)

    def start(self, supervisor: Supervisor) -> None:
        self._task = supervisor.spawn("payment-issues-gauge", self._run)

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.stop()

    async def _run(self) -> None:
        while True:
            await self.refresh_gauge()
            checkpoint()
            await asyncio.sleep(GAUGE_SECONDS)
