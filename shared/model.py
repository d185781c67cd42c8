"""The session model, its status flow and the status event sent to browsers (one JSON shape)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

# uuid4 in its canonical text form; anything else is rejected before touching a store.
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
# PayOS order codes are positive and JavaScript-safe.
MAX_ORDER_CODE = 9_007_199_254_740_991


def is_valid_uuid(value: str) -> bool:
    return bool(UUID_RE.fullmatch(value))


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """Every timestamp the services answer with: UTC, milliseconds, `Z`."""
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SessionStatus(StrEnum):
    """Stored status: `pending → completed | expired | cancelled`. The one way back out of a
    final status is a payment PayOS accepted in time (shared.payments): `expired` or
    `cancelled → completed`."""

    PENDING = "pending"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class StreamStatus(StrEnum):
    """Status as browsers see it (the original's wording)."""

    PENDING = "pending"
    DONE = "done"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not StreamStatus.PENDING


_TO_STREAM = {
    SessionStatus.PENDING: StreamStatus.PENDING,
    SessionStatus.COMPLETED: StreamStatus.DONE,
    SessionStatus.EXPIRED: StreamStatus.EXPIRED,
    SessionStatus.CANCELLED: StreamStatus.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One state of one session; `version` grows with every change and is the SSE event id."""

    uuid: str
    order_code: int
    status: StreamStatus
    amount: int
    amount_paid: int
    updated_at: datetime
    version: int

    @classmethod
    def from_session(cls, doc: dict[str, Any]) -> StatusEvent:
        """The event describing a stored session document."""
        return cls(
            uuid=doc["uuid"],
            order_code=int(doc["orderCode"]),
            status=_TO_STREAM[SessionStatus(doc["status"])],
            amount=int(doc["amount"]),
            amount_paid=int(doc.get("amountPaid", 0)),
            updated_at=_aware(doc.get("updatedAt") or doc["createdAt"]),
            version=int(doc.get("version", 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "orderCode": self.order_code,
            "status": self.status.value,
            "amount": self.amount,
            "amountPaid": self.amount_paid,
            "updatedAt": format_time(self.updated_at),
            "version": self.version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> StatusEvent:
        d = json.loads(raw)
        return cls(
            uuid=d["uuid"],
            order_code=int(d["orderCode"]),
            status=StreamStatus(d["status"]),
            amount=int(d["amount"]),
            amount_paid=int(d.get("amountPaid", 0)),
            updated_at=datetime.fromisoformat(d["updatedAt"].replace("Z", "+00:00")),
            version=int(d["version"]),
        )


def _aware(value: datetime) -> datetime:
    # PyMongo returns naive UTC unless tz_aware; accept both.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# How long a session outlives its `expiresAt` before the TTL may delete it: far beyond the
# late-payment grace, so a payment made in time and delivered late is counted, and one made
# outside the grace is recorded against the session it was meant for.
PURGE_AFTER_EXPIRY = timedelta(hours=24)


def new_session(
    *,
    uuid: str,
    order_code: int,
    account_number: str,
    amount: int,
    description: str,
    now: datetime,
    ttl_seconds: int,
    checkout_url: str = "",
    qr_code: str = "",
    payment_link_id: str = "",
) -> dict[str, Any]:
    """A new `pending` session document, as stored in MongoDB."""
    return {
        "uuid": uuid,
        "orderCode": order_code,
        "accountNumber": account_number,
        "amount": amount,
        "amountPaid": 0,
        "references": [],
        "description": description,
        "status": SessionStatus.PENDING.value,
        "checkoutUrl": checkout_url,
        "qrCode": qr_code,
        "paymentLinkId": payment_link_id,
        "createdAt": now,
        "updatedAt": now,
        "expiresAt": now + timedelta(seconds=ttl_seconds),
        "purgeAt": now + timedelta(seconds=ttl_seconds) + PURGE_AFTER_EXPIRY,
        "version": 1,
    }
