"""Publishing a session's new state from session-api (the reconciler, a cancel)."""

from __future__ import annotations

import structlog

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.model import StatusEvent
from shared.mongo import PUBLISH_PENDING, Doc, Store

log = structlog.get_logger(__name__)


async def publish(cache: StatusCache, store: Store, doc: Doc) -> bool:
    """Put `doc`'s state in the status cache, which publishes it; False if Redis could not
    take it, and then the session is marked `publishPending` (the ingest's durable mark):
    every ingest replica's sweep publishes it once Redis is back. A session whose update
    set the mark itself has it cleared here once the state reached Redis."""
    event = StatusEvent.from_session(doc)
    try:
        await cache.put(event)
    except REDIS_ERRORS as exc:
        log.warning("publish_deferred", uuid=event.uuid, error=str(exc))
        await store.sessions.update_one({"uuid": event.uuid}, {"$set": {PUBLISH_PENDING: True}})
        return False
    if doc.get(PUBLISH_PENDING):
        await store.clear_publish_pending(event.uuid, event.version)
    return True
