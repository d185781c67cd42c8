"""Domain errors of the gateway; each says its HTTP status (`shared.errors.ServiceError`),
answered by `shared.web.error_response`."""

from __future__ import annotations

from shared.errors import ServiceError


class StreamUnavailable(ServiceError):
    """No stream started: this process is full or stopping, or the status is unreadable
    (503, `Retry-After`): the Ingress tries the next pod, a browser retries later."""

    status = 503
    label = "unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
