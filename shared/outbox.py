"""The shop's payment events (issue 17), written into the document whose change they describe.

A change the shop acts on — a session completed, partly paid, expired, cancelled; a new ledger
item — is written together with its event, in the same single-document update: the update
that makes the change also pushes the event (JSON text) onto the document's `outbox` array and
increments its `outboxPending` counter. MongoDB applies one document's update atomically, so
there is no moment at which the change is stored and the event is not: a process that dies
right after the update leaves the event behind for session-api's dispatcher, which moves it
into the `events` collection (the log the pull API reads and the push delivers from).

The entries are JSON text rather than subdocuments: the body a shop receives is fixed, byte
for byte, when the change is made, and arrays of strings are what every MongoDB (and the
local stand-in) stores, pulls and compares exactly.

Event ids are stable: derived from what changed (the session's uuid and the event type, plus
the transaction's reference for a partial payment, the item for a ledger event), so the same
change always carries the same id, however often a delivery or a replay repeats it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from .model import utcnow

# The fields every outbox-bearing document carries (sessions, ledger items).
OUTBOX = "outbox"
OUTBOX_PENDING = "outboxPending"
EVENT_ID_PREFIX = "evt_"


class EventType(StrEnum):
    COMPLETED = "payment.completed"
    PARTIAL = "payment.partial"
    EXPIRED = "session.expired"
    CANCELLED = "session.cancelled"
    NEEDS_ATTENTION = "payment.needs_attention"


def event_id(*parts: str) -> str:
    """The stable id of one change: the same parts give the same id, always."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return EVENT_ID_PREFIX + digest[:32]


def is_event_id(value: str) -> bool:
    rest = value.removeprefix(EVENT_ID_PREFIX)
    return (
        value.startswith(EVENT_ID_PREFIX)
        and len(rest) == 32
        and all(c in "0123456789abcdef" for c in rest)
    )


def iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry(
    type_: EventType, data: dict[str, Any], *id_parts: str, at: datetime | None = None
) -> str:
    """One outbox entry (the event exactly as the shop receives it), as JSON text."""
    return json.dumps(
        {
            "id": event_id(*id_parts),
            "type": type_.value,
            "timestamp": iso(at or utcnow()),
            "data": data,
        },
        separators=(",", ":"),
    )


def session_data(after: dict[str, Any]) -> dict[str, Any]:
    """What every session event tells the shop, from the session as the update leaves it."""
    return {
        "uuid": after["uuid"],
        "orderCode": int(after["orderCode"]),
        "accountNumber": after.get("accountNumber", ""),
        "amount": int(after["amount"]),
        "amountPaid": int(after.get("amountPaid", 0)),
        "references": list(after.get("references", ())),
        "status": after["status"],
        "version": int(after.get("version", 1)),
    }


def session_entry(
    type_: EventType, after: dict[str, Any], *, reference: str | None = None, **extra: Any
) -> str:
    """The entry of a session event. `after`: the session as the update leaves it (its
    `version` included: the caller's update is guarded by the version it read)."""
    parts = [after["uuid"], type_.value]
    if type_ is EventType.PARTIAL:
        if reference is None:
            raise ValueError("a partial payment's event is identified by its reference")
        parts.append(reference)
    data = session_data(after)
    if reference is not None:
        data["reference"] = reference
    data.update(extra)
    return entry(type_, data, *parts)


def with_entry(update: dict[str, Any], *entries: str) -> dict[str, Any]:
    """`update` that also pushes `entries` onto the document's outbox (in this order)."""
    out = {op: dict(fields) for op, fields in update.items()}
    if not entries:
        return out
    pushes = out.setdefault("$push", {})
    if OUTBOX in pushes:
        raise ValueError("the update pushes onto the outbox already")
    pushes[OUTBOX] = {"$each": list(entries)} if len(entries) > 1 else entries[0]
    incs = out.setdefault("$inc", {})
    incs[OUTBOX_PENDING] = incs.get(OUTBOX_PENDING, 0) + len(entries)
    return out


def initial(*entries: str) -> dict[str, Any]:
    """The outbox fields of a document inserted with its events."""
    return {OUTBOX: list(entries), OUTBOX_PENDING: len(entries)}


def parse(raw: str) -> dict[str, Any]:
    """An outbox entry back as the event's fields."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("an outbox entry is a JSON object")
    return value
