"""HTTP views of the shop's events (issue 17): the pull API and the admins' replay.

`GET /api/events?after=<cursor>&limit=` (Bearer SHOP_API_TOKEN): events in log order after the
cursor (`0` or none: from the oldest kept, 7 days), the cursor to continue from, and whether
more are waiting. `POST /api/events/replay` (Bearer ADMIN_TOKEN), body `{"id": "evt_…"}` or
`{"from": ISO time, "to": ISO time}`: the event(s) delivered again, same ids.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from shared import outbox
from shared.appkeys import SETTINGS
from shared.errors import storage
from shared.web import ascii_int, read_body

from .appkeys import EVENT_LOG, OUTBOX_METRICS
from .errors import InvalidRequest, NotFound
from .event_log import MAX_PAGE
from .validation import parse_json
from .views import _authorized, _unauthorized

log = structlog.get_logger(__name__)

DEFAULT_LIMIT = 100
# Cursors are sequence numbers; anything longer is not one of ours.
MAX_CURSOR_DIGITS = 18


class EventsApiOff(NotFound):
    """The pull API is off: SHOP_API_TOKEN is not set (404)."""


def parse_cursor(raw: str | None) -> int:
    if raw is None or raw == "":
        return 0
    cursor = ascii_int(raw, MAX_CURSOR_DIGITS)
    if cursor is None:
        raise InvalidRequest("`after` must be a cursor this API returned (digits)")
    return cursor


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    limit = ascii_int(raw, 6)
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"`limit` must be an integer between 1 and {MAX_PAGE}")
    return limit


async def list_events(request: web.Request) -> web.Response:
    token = request.app[SETTINGS].shop_api_token
    if not token:
        raise EventsApiOff("the events API is off: SHOP_API_TOKEN is not set")
    if not _authorized(request, token):
        return _unauthorized()
    unknown = set(request.query) - {"after", "limit"}
    if unknown:
        raise InvalidRequest(f"unknown query parameters: {', '.join(sorted(unknown))}")
    after = parse_cursor(request.query.get("after"))
    limit = parse_limit(request.query.get("limit"))
    with storage():
        page = await request.app[EVENT_LOG].page(after, limit)
    return web.json_response(
        {
            "success": True,
            "events": page.events,
            "next": str(page.next_cursor),
            "hasMore": page.has_more,
        }
    )


def parse_replay(body: Any) -> dict[str, Any]:
    """The replay request as EventLog.replay's arguments; InvalidRequest when malformed."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = set(body) - {"id", "from", "to"}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    if "id" in body:
        if "from" in body or "to" in body:
            raise InvalidRequest("give either `id` or `from` and `to`, not both")
        event_id = body["id"]
        if not isinstance(event_id, str) or not outbox.is_event_id(event_id):
            raise InvalidRequest("`id` must be an event id (evt_ and 32 hex digits)")
        return {"event_id": event_id}
    if "from" not in body or "to" not in body:
        raise InvalidRequest("give `id`, or both `from` and `to`")
    since, until = _time(body, "from"), _time(body, "to")
    if since >= until:
        raise InvalidRequest("`from` must be before `to`")
    return {"since": since, "until": until}


def _time(body: dict[str, Any], name: str) -> datetime:
    raw = body[name]
    if not isinstance(raw, str) or len(raw) > 40:
        raise InvalidRequest(f"`{name}` must be an ISO 8601 time with a zone")
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an ISO 8601 time with a zone") from None
    if value.tzinfo is None:
        raise InvalidRequest(f"`{name}` must carry a zone (Z or ±hh:mm)")
    return value


async def replay(request: web.Request) -> web.Response:
    if not _authorized(request, request.app[SETTINGS].admin_token):
        return _unauthorized()
    body = await read_body(request, request.app[SETTINGS].session_max_body_bytes)
    args = parse_replay(parse_json(body))
    with storage():
        count = await request.app[EVENT_LOG].replay(**args)
    request.app[OUTBOX_METRICS].replayed.inc(count)
    log.info("events_replayed", count=count, **{k: str(v) for k, v in args.items()})
    return web.json_response({"success": True, "replayed": count})
