"""Pending sessions stored in bulk, for tests and benchmarks that need many at once."""

from __future__ import annotations

import secrets
import uuid as uuidlib
from typing import Any

from shared import keys
from shared.model import new_session, utcnow
from shared.mongo import Store

# insert_many batches: the MongoDB stand-in is slow per operation, not per document.
BATCH = 1000


async def store_pending_sessions(store: Store, n: int, *, amount: int) -> list[dict[str, Any]]:
    """`n` new pending sessions of `amount`, as session-api would store them (without `_id`)."""
    now = utcnow()
    docs = [
        new_session(
            uuid=str(uuidlib.uuid4()),
            order_code=secrets.randbelow(10**12) + 1,
            account_number="0001112223",
            amount=amount,
            description="NAPTIEN",
            now=now,
            ttl_seconds=keys.SESSION_TTL_SECONDS,
        )
        for _ in range(n)
    ]
    for i in range(0, n, BATCH):
        await store.sessions.insert_many([dict(d) for d in docs[i : i + BATCH]])
    return docs
