"""Domain errors of the ingest; the view maps each to its HTTP status."""


class WebhookError(Exception):
    """Base of every reason a delivery is refused."""


class InvalidWebhook(WebhookError):
    """The body is not a well-formed PayOS webhook (400)."""


class BadSignature(WebhookError):
    """The signature is missing or does not sign the data (401)."""

    def __init__(self, message: str, *, hint: str = "<none>") -> None:
        super().__init__(message)
        # A loggable prefix of the claimed signature, never the whole value.
        self.hint = hint


class StoreUnavailable(WebhookError):
    """MongoDB cannot take the delivery now; PayOS must deliver it again (503)."""
