"""Domain errors of the ingest; each says its HTTP status and metric label
(`shared.errors.ServiceError`), answered by `shared.web.error_response`."""

from typing import ClassVar

from shared import errors


class InvalidWebhook(errors.InvalidInput):
    """The body is not a well-formed PayOS webhook (400)."""


class BadSignature(errors.ServiceError):
    """The signature is missing or does not sign the data (401)."""

    status = 401
    label = "bad_signature"

    def __init__(self, message: str, *, hint: str = "<none>") -> None:
        super().__init__(message)
        # A loggable prefix of the claimed signature, never the whole value.
        self.hint = hint


class StoreUnavailable(errors.StoreUnavailable):
    """MongoDB cannot take the delivery now; PayOS must deliver it again (503)."""

    log_event: ClassVar[str | None] = "webhook_not_stored"
    ADVICE: ClassVar[str] = "storage unavailable, deliver again later"
