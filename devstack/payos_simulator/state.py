"""The simulator's in-memory world: payment links, their transactions, webhook deliveries."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

VN = timezone(timedelta(hours=7))
BANK_BIN = "970422"
ACCOUNT_NUMBER = "0123456789"
ACCOUNT_NAME = "PAYMENT PUSH DEMO"


def vn_now() -> datetime:
    return datetime.now(VN).replace(microsecond=0)


@dataclass
class Transaction:
    reference: str
    amount: int
    description: str
    when: datetime

    def to_payos(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "amount": self.amount,
            "accountNumber": ACCOUNT_NUMBER,
            "description": self.description,
            "transactionDateTime": self.when.strftime("%Y-%m-%d %H:%M:%S"),
            "virtualAccountName": None,
            "virtualAccountNumber": None,
            "counterAccountBankId": "970436",
            "counterAccountBankName": None,
            "counterAccountName": "NGUYEN VAN A",
            "counterAccountNumber": "9876543210",
        }


@dataclass
class PaymentLink:
    id: str
    order_code: int
    amount: int
    description: str
    cancel_url: str
    return_url: str
    created_at: datetime
    expired_at: int | None
    transactions: list[Transaction] = field(default_factory=list)
    canceled_at: datetime | None = None
    cancellation_reason: str | None = None

    @property
    def amount_paid(self) -> int:
        return sum(t.amount for t in self.transactions)

    @property
    def expired(self) -> bool:
        """Past its `expiredAt`: PayOS takes no more payment on it."""
        return self.expired_at is not None and time.time() >= self.expired_at

    @property
    def status(self) -> str:
        if self.canceled_at is not None:
            return "CANCELLED"
        if self.amount_paid >= self.amount:
            return "PAID"
        if self.amount_paid > 0:
            return "UNDERPAID"
        if self.expired:
            return "EXPIRED"
        return "PENDING"

    def to_payos(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "orderCode": self.order_code,
            "amount": self.amount,
            "amountPaid": self.amount_paid,
            "amountRemaining": max(self.amount - self.amount_paid, 0),
            "status": self.status,
            "createdAt": self.created_at.isoformat(),
            "transactions": [t.to_payos() for t in self.transactions],
            "canceledAt": self.canceled_at.isoformat() if self.canceled_at else None,
            "cancellationReason": self.cancellation_reason,
        }


@dataclass
class Delivery:
    """One webhook and every attempt to deliver it."""

    body: dict[str, Any]
    attempts: list[int] = field(default_factory=list)  # HTTP status per attempt, 0 = no answer

    @property
    def delivered(self) -> bool:
        return any(200 <= s < 300 for s in self.attempts)


@dataclass
class Faults:
    """How the payment-link API misbehaves, set by tests through `/sim/faults`."""

    # slow: wait, then answer; late: create the payment link, then answer after the wait (the
    # link exists though the caller may time out first); error, down: refuse.
    mode: str = "none"  # none | error | slow | late | down
    delay_seconds: float = 0.0
    # Webhook deliveries to drop (answered as if the network lost them) before one goes out.
    drop_deliveries: int = 0
    # How long every webhook delivery attempt waits before it goes out (a slow PayOS).
    delivery_delay_seconds: float = 0.0
    # Every delivery attempt lost while set (our endpoint unreachable from PayOS for good).
    drop_all_deliveries: bool = False


@dataclass
class World:
    links: dict[str, PaymentLink] = field(default_factory=dict)
    by_order: dict[int, str] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    # `GET /v2/payment-requests/{id}` calls per orderCode (what a reconciler costs PayOS).
    get_calls: Counter[int] = field(default_factory=Counter)

    def find(self, ref: str) -> PaymentLink | None:
        """A link by its id or its orderCode, as PayOS's API accepts both."""
        if ref in self.links:
            return self.links[ref]
        if ref.isdigit() and int(ref) in self.by_order:
            return self.links[self.by_order[int(ref)]]
        return None

    def add(self, link: PaymentLink) -> None:
        self.links[link.id] = link
        self.by_order[link.order_code] = link.id


def new_link_id() -> str:
    return secrets.token_hex(16)


def new_reference() -> str:
    return "FT" + secrets.token_hex(6).upper()
