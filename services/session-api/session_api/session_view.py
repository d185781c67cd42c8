"""Sessions as the API shows them: the creating browser's view and the admins' list rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.model import format_time
from shared.mongo import Doc


@dataclass(frozen=True, slots=True)
class SessionView:
    """A session as the creating browser sees it."""

    doc: Doc
    resumed: bool

    def to_dict(self) -> dict[str, Any]:
        d = self.doc
        return {
            "uuid": d["uuid"],
            "orderCode": d["orderCode"],
            "amount": d["amount"],
            "description": d["description"],
            "checkoutUrl": d["checkoutUrl"],
            "qrCode": d["qrCode"],
            "status": d["status"],
            "expiresAt": format_time(d["expiresAt"]),
            "resumed": self.resumed,
        }


def public(doc: Doc) -> dict[str, Any]:
    """A stored session as an admin's list shows it: every field, timestamps formatted."""
    return {k: format_time(v) if isinstance(v, datetime) else v for k, v in doc.items()}


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of the admins' list, newest first."""

    page: int
    limit: int
    total: int
    items: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "page": self.page,
            "limit": self.limit,
            "total": self.total,
            "pages": (self.total + self.limit - 1) // self.limit,
            "items": self.items,
        }
