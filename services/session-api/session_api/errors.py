"""Domain errors of session-api; each says its HTTP status and metric label
(`shared.errors.ServiceError`), answered by `shared.web.error_response`."""

from __future__ import annotations

from typing import Any

from shared import errors
from shared.errors import BodyTooLarge, NotFound, ServiceError, StoreUnavailable
from shared.model import StatusEvent

__all__ = [
    "AccountBusy",
    "BodyTooLarge",
    "CancelConflict",
    "InvalidRequest",
    "LimitReached",
    "NotFound",
    "PayOSFailed",
    "PayOSTimeout",
    "RateLimited",
    "ServiceError",
    "StoreUnavailable",
    "UuidConflict",
    "UuidUsed",
]


class InvalidRequest(errors.InvalidInput):
    """The request is malformed or out of range (400); nothing was stored."""


class LimitReached(ServiceError):
    """The account already has its maximum of pending sessions (429)."""

    status = 429
    label = "limited"

    def __init__(self, pending_count: int, max_allowed: int) -> None:
        super().__init__(
            f"at most {max_allowed} pending payment sessions per account in 24 h; "
            f"this account has {pending_count}"
        )
        self.pending_count = pending_count
        self.max_allowed = max_allowed

    def fields(self) -> dict[str, Any]:
        return {"pendingCount": self.pending_count, "maxAllowed": self.max_allowed}


class RateLimited(ServiceError):
    """The client address created too many sessions this window (429, `Retry-After`)."""

    status = 429
    label = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def fields(self) -> dict[str, Any]:
        return {"retryAfter": self.retry_after}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UuidConflict(ServiceError):
    """The uuid belongs to a session that cannot be resumed by this request (409)."""

    status = 409
    label = "conflict"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class UuidUsed(UuidConflict):
    """The uuid already named a session that cannot be resumed (409, not retryable): paid,
    expired, another account's, or gone. A uuid names one session only; make a new one."""

    def __init__(self) -> None:
        super().__init__(
            "this uuid is already used by a payment session that can no longer be resumed; "
            "make a new uuid for a new session"
        )


class AccountBusy(ServiceError):
    """The account's lock could not be taken in time (503, retry)."""

    status = 503
    label = "busy"
    retryable = True


class PayOSFailed(ServiceError):
    """PayOS refused or could not be reached (502); nothing was counted."""

    status = 502
    label = "payos_error"
    retryable = True

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        # PayOS's own HTTP status (for the log), not ours.
        self.payos_status = status

    def fields(self) -> dict[str, Any]:
        return {"payosCode": self.code}


class PayOSTimeout(ServiceError):
    """PayOS did not answer within PAYOS_TIMEOUT_SECONDS (504); nothing was counted."""

    status = 504
    label = "payos_timeout"
    retryable = True


class AccountLinkRejected(ServiceError):
    """With ACCOUNT_LINK_KEY set, the account came without the shop's valid signature (401):
    missing, malformed, forged, expired, or valid for too long. Nothing was counted."""

    status = 401
    label = "unauthorized"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        # For the page (which tells an expired link from a forged one) and the logs.
        self.reason = reason

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason}

    def headers(self) -> dict[str, str]:
        # A 401 names how to authenticate (RFC 9110): with the shop's signed account link.
        return {"WWW-Authenticate": 'AccountToken realm="deposit"'}


class CancelConflict(ServiceError):
    """The session cannot be cancelled (409): paid (the payment wins), expired, or changing.
    The answer carries the session's state (`session`), so the page shows what happened."""

    status = 409
    label = "conflict"

    def __init__(self, message: str, event: StatusEvent | None, *, retryable: bool = False):
        super().__init__(message)
        self.event = event
        self.retryable = retryable

    def fields(self) -> dict[str, Any]:
        return {"session": self.event.to_dict() if self.event is not None else None}
