"""The console's session list: its filters (status, account, time range, page) and the query.

A refusal names the catalogue message that explains it (FilterError, 400), so the operator
reads what was wrong in their language. Times in the form are Vietnam's (the operators'),
as an `<input type=datetime-local>` sends them: `2026-11-27T14:07`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from pymongo import DESCENDING

from shared.errors import storage
from shared.model import SessionStatus
from shared.mongo import Doc, Store

from ..errors import InvalidRequest
from ..validation import ACCOUNT_RE, Paging, parse_paging

VIETNAM = timezone(timedelta(hours=7))
# The statuses the filter offers: the stored ones, and `cancelled` (issue 13's cancel). A
# session in a status not listed here is still shown, under its own name.
STATUSES: tuple[str, ...] = tuple(dict.fromkeys([*(s.value for s in SessionStatus), "cancelled"]))
TIME_FORMATS = ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S")
# What a row shows (not the QR payload, the references or the outbox).
ROW_FIELDS = (
    "uuid",
    "orderCode",
    "accountNumber",
    "amount",
    "amountPaid",
    "status",
    "createdAt",
    "expiresAt",
)


class FilterError(InvalidRequest):
    """A filter the console cannot apply (400); `key` is its catalogue message."""

    def __init__(self, key: str, **params: object) -> None:
        super().__init__(key)
        self.key = key
        self.params = params


@dataclass(frozen=True, slots=True)
class SessionFilter:
    status: str | None
    account: str | None
    since: datetime | None
    until: datetime | None
    paging: Paging

    def query(self) -> Doc:
        query: Doc = {}
        if self.status is not None:
            query["status"] = self.status
        if self.account is not None:
            query["accountNumber"] = self.account
        created: Doc = {}
        if self.since is not None:
            created["$gte"] = self.since
        if self.until is not None:
            created["$lt"] = self.until
        if created:
            query["createdAt"] = created
        return query


def parse_time(query: Mapping[str, str], name: str) -> datetime | None:
    raw = query.get(name, "").strip()
    if not raw:
        return None
    for fmt in TIME_FORMATS:
        try:
            return datetime.strptime(raw, fmt).replace(tzinfo=VIETNAM).astimezone(UTC)
        except ValueError:
            continue
    raise FilterError("error.filter_time", field=name)


def parse_session_filter(query: Mapping[str, str]) -> SessionFilter:
    """`?status=&account=&from=&to=&page=&limit=` (each optional), or FilterError."""
    status = query.get("status", "").strip() or None
    if status == "all":
        status = None
    if status is not None and status not in STATUSES:
        raise FilterError("error.filter_status", statuses=", ".join(STATUSES))
    account = query.get("account", "").strip() or None
    if account is not None and not ACCOUNT_RE.fullmatch(account):
        raise FilterError("error.filter_account")
    since, until = parse_time(query, "from"), parse_time(query, "to")
    if since is not None and until is not None and since >= until:
        raise FilterError("error.filter_range")
    try:
        paging = parse_paging(query)
    except InvalidRequest:
        raise FilterError("error.filter_page") from None
    return SessionFilter(status, account, since, until, paging)


@dataclass(frozen=True, slots=True)
class SessionRows:
    total: int
    rows: list[Doc]
    paging: Paging

    @property
    def pages(self) -> int:
        return max(1, (self.total + self.paging.limit - 1) // self.paging.limit)


async def find_sessions(store: Store, wanted: SessionFilter) -> SessionRows:
    """One page of the sessions `wanted` selects, newest first."""
    query = wanted.query()
    projection: dict[str, Any] = {"_id": 0, **dict.fromkeys(ROW_FIELDS, 1)}
    with storage():
        total = await store.sessions.count_documents(query)
        cursor = (
            store.sessions.find(query, projection)
            .sort("createdAt", DESCENDING)
            .skip(wanted.paging.skip)
            .limit(wanted.paging.limit)
        )
        rows = [doc async for doc in cursor]
    return SessionRows(total, rows, wanted.paging)
