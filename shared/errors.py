"""The base of every service's domain errors: each class says how it shows at the HTTP edge.

A domain error carries its HTTP status, the label it is counted under in its service's
metrics and whether the same request may succeed later; `shared.web.error_response` turns
any of them into the one JSON error shape, and `shared.web.error_middleware` does so for
every handler. The core raises them without knowing about HTTP otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from pymongo.errors import PyMongoError


class ServiceError(Exception):
    """A reason a request is refused."""

    status: ClassVar[int] = 500
    # The outcome label of the service's request counters.
    label: ClassVar[str] = "error"
    # Said in the answer (`retryable`) unless None; an instance may say otherwise.
    retryable: bool | None = None
    # Logged (at error level, with the message) when answered; None: not logged here.
    log_event: ClassVar[str | None] = None

    def public_message(self) -> str:
        """The `error` of the answer; the message itself unless it names internals."""
        return str(self)

    def fields(self) -> dict[str, Any]:
        """Extra keys of the answer, beside `success`, `error` and `retryable`."""
        return {}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInput(ServiceError):
    """The request is malformed or out of range (400); nothing was stored."""

    status = 400
    label = "invalid"


class BodyTooLarge(ServiceError):
    """The request body is over the service's limit (413); nothing was stored."""

    status = 413
    label = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes")


class NotFound(ServiceError):
    """No such session (404)."""

    status = 404
    label = "not_found"


class StoreUnavailable(ServiceError):
    """MongoDB cannot answer now (503, retry). The message (the driver's, naming hosts) is
    logged; the answer says only `ADVICE`."""

    status = 503
    label = "store_unavailable"
    retryable = True
    log_event: ClassVar[str | None] = "store_unavailable"
    ADVICE: ClassVar[str] = "storage unavailable, try again later"

    def public_message(self) -> str:
        return self.ADVICE


@contextlib.contextmanager
def storage(unavailable: type[StoreUnavailable] = StoreUnavailable) -> Iterator[None]:
    """MongoDB's failures within the block raised as `unavailable`."""
    try:
        yield
    except PyMongoError as exc:
        raise unavailable(str(exc)) from exc
