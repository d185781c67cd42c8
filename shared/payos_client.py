"""The payos SDK's async client, configured from settings (the simulator locally)."""

from __future__ import annotations

from payos import AsyncPayOS

from .settings import Settings


def payos_client(settings: Settings) -> AsyncPayOS:
    """An `AsyncPayOS` for PAYOS_BASE_URL; retries are ours to decide, so the SDK makes none."""
    return AsyncPayOS(
        client_id=settings.payos_client_id,
        api_key=settings.payos_api_key,
        checksum_key=settings.payos_checksum_key,
        base_url=settings.payos_base_url,
        timeout=settings.payos_timeout_seconds,
        max_retries=0,
    )
