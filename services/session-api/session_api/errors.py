"""Domain errors of session-api; the views map each to its HTTP status."""

from __future__ import annotations


class SessionError(Exception):
    """Base of every reason a session request is refused."""


class InvalidRequest(SessionError):
    """The request is malformed or out of range (400); nothing was stored."""


class LimitReached(SessionError):
    """The account already has its maximum of pending sessions (429)."""

    def __init__(self, pending_count: int, max_allowed: int) -> None:
        super().__init__(
            f"at most {max_allowed} pending payment sessions per account in 24 h; "
            f"this account has {pending_count}"
        )
        self.pending_count = pending_count
        self.max_allowed = max_allowed


class UuidConflict(SessionError):
    """The uuid belongs to a session that cannot be resumed by this request (409)."""

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


class AccountBusy(SessionError):
    """The account's lock could not be taken in time (503, retry)."""


class StoreUnavailable(SessionError):
    """MongoDB cannot answer now (503, retry)."""


class PayOSFailed(SessionError):
    """PayOS refused or could not be reached (502); nothing was counted."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class PayOSTimeout(SessionError):
    """PayOS did not answer within PAYOS_TIMEOUT_SECONDS (504); nothing was counted."""


class AccountLinkRejected(SessionError):
    """The account came without the shop's valid signature (401): missing, malformed, forged,
    expired, or valid for too long. Nothing was counted."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
