"""HTTP views of session-api: they speak HTTP and map domain errors to status codes."""

from __future__ import annotations

import hmac
import json
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web
from pymongo import DESCENDING
from pymongo.errors import PyMongoError

from shared.appkeys import CACHE, SETTINGS, STORE
from shared.clients import REDIS_ERRORS
from shared.model import SessionStatus
from shared.web import json_error

from .appkeys import (
    RATE_LIMITER,
    SESSION_METRICS,
    SESSIONS,
    STATS,
    STATUS_READER,
    TRUSTED_PROXIES,
)
from .cleanup import run_cleanup
from .errors import (
    AccountBusy,
    InvalidRequest,
    LimitReached,
    PayOSFailed,
    PayOSTimeout,
    StoreUnavailable,
    UuidConflict,
)
from .limits import check_rate
from .sessions import iso, parse_create_request, validate_account_number, validate_uuid

log = structlog.get_logger(__name__)

# Every request body here is a few fields of JSON.
MAX_BODY_BYTES = 16 * 1024
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_PAGE = 1_000_000
# `{"success":true,` + the cached event JSON without its `{`: `{success: true, **event}`.
_OK_PREFIX = b'{"success":true,'


def _authorized(request: web.Request, secret: str) -> bool:
    """`Authorization: Bearer <secret>`, compared in constant time."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), secret.encode())


def _unauthorized() -> web.Response:
    response = json_error(401, "missing or wrong bearer token")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _store_down(exc: Exception) -> web.Response:
    log.error("store_unavailable", error=str(exc))
    return json_error(503, "storage unavailable, try again later", retryable=True)


async def create_session(request: web.Request) -> web.Response:
    """`POST /api/sessions` `{accountNumber, amount, uuid?, description?}`."""
    metrics = request.app[SESSION_METRICS].sessions
    limited = await check_rate(request, request.app[RATE_LIMITER], request.app[TRUSTED_PROXIES])
    if limited is not None:
        metrics.labels("rate_limited").inc()
        return limited
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.labels("too_large").inc()
        return json_error(413, f"body exceeds {MAX_BODY_BYTES} bytes")
    try:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            # ValueError: not UTF-8, not JSON, or an integer of more than 4,300 digits;
            # RecursionError: nesting deeper than the parser's stack.
            raise InvalidRequest("body is not valid JSON") from None
        req = parse_create_request(payload)
        view = await request.app[SESSIONS].create(req)
    except InvalidRequest as exc:
        metrics.labels("invalid").inc()
        return json_error(400, str(exc))
    except LimitReached as exc:
        metrics.labels("limited").inc()
        return json_error(
            429,
            str(exc),
            pendingCount=exc.pending_count,
            maxAllowed=exc.max_allowed,
        )
    except UuidConflict as exc:
        metrics.labels("conflict").inc()
        return json_error(409, str(exc), retryable=exc.retryable)
    except AccountBusy as exc:
        metrics.labels("busy").inc()
        return json_error(503, str(exc), retryable=True)
    except StoreUnavailable as exc:
        metrics.labels("store_unavailable").inc()
        return _store_down(exc)
    except PayOSTimeout as exc:
        metrics.labels("payos_timeout").inc()
        return json_error(504, str(exc), retryable=True)
    except PayOSFailed as exc:
        metrics.labels("payos_error").inc()
        return json_error(502, str(exc), payosCode=exc.code, retryable=True)
    metrics.labels("resumed" if view.resumed else "created").inc()
    return web.json_response(
        {"success": True, **view.to_dict()}, status=200 if view.resumed else 201
    )


async def status_or_list(request: web.Request) -> web.Response:
    """`GET /api/webhooks?uuid=` (status, for polling) or `?page=&limit=` (admins' list)."""
    if "uuid" in request.query:
        if "page" in request.query or "limit" in request.query:
            # Paging given with a uuid is validated all the same (and then unused).
            try:
                _page_arg(request, "page", 1, MAX_PAGE)
                _page_arg(request, "limit", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
            except InvalidRequest as exc:
                return json_error(400, str(exc))
        return await _status(request)
    return await _list(request)


async def _status(request: web.Request) -> web.Response:
    metrics = request.app[SESSION_METRICS]
    try:
        uuid = validate_uuid(request.query["uuid"])
    except InvalidRequest as exc:
        metrics.reads_invalid.inc()
        return json_error(400, str(exc))
    # Hot path (pollers of cached sessions): the cached event is already the JSON we answer
    # with, so it is passed through rather than decoded and encoded again.
    try:
        body = await request.app[CACHE].get_json(uuid)
    except REDIS_ERRORS:
        body = None  # the reader falls back to MongoDB
    if body is not None:
        metrics.reads_found.inc()
        return web.Response(body=_OK_PREFIX + body[1:], content_type="application/json")
    try:
        # The cache was just read: go on from the miss rather than read it again.
        event = await request.app[STATUS_READER].read_uncached(uuid)
    except PyMongoError as exc:
        metrics.reads_store_unavailable.inc()
        return _store_down(exc)
    if event is None:
        metrics.reads_not_found.inc()
        return json_error(404, "no payment session with this uuid")
    metrics.reads_found.inc()
    return web.json_response({"success": True, **event.to_dict()})


def _page_arg(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an integer") from None
    if not 1 <= value <= maximum:
        raise InvalidRequest(f"`{name}` must be between 1 and {maximum}")
    return value


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in doc.items()}


async def _list(request: web.Request) -> web.Response:
    if not _authorized(request, request.app[SETTINGS].admin_token):
        return _unauthorized()
    try:
        page = _page_arg(request, "page", 1, MAX_PAGE)
        limit = _page_arg(request, "limit", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    except InvalidRequest as exc:
        return json_error(400, str(exc))
    sessions = request.app[STORE].sessions
    try:
        total = await sessions.count_documents({})
        cursor = (
            sessions.find({}, {"_id": 0, "references": 0})
            .sort("createdAt", DESCENDING)
            .skip((page - 1) * limit)
            .limit(limit)
        )
        items = [_public(doc) async for doc in cursor]
    except PyMongoError as exc:
        return _store_down(exc)
    return web.json_response(
        {
            "success": True,
            "page": page,
            "limit": limit,
            "total": total,
            "pages": (total + limit - 1) // limit,
            "items": items,
        }
    )


async def check_session_limit(request: web.Request) -> web.Response:
    """`GET /api/webhooks/check-session-limit?uuid=` or `?accountNumber=` (exactly one)."""
    has_uuid, has_account = "uuid" in request.query, "accountNumber" in request.query
    if has_uuid == has_account:
        return json_error(400, "give exactly one of `uuid` and `accountNumber`")
    sessions = request.app[SESSIONS]
    try:
        if has_uuid:
            uuid = validate_uuid(request.query["uuid"])
            doc = await sessions.find(uuid)
            if doc is None:
                return web.json_response(
                    {
                        "success": True,
                        "exists": False,
                        "status": None,
                        "message": "no live payment session with this uuid",
                    }
                )
            status = doc["status"]
            return web.json_response(
                {
                    "success": True,
                    "exists": True,
                    "status": status,
                    "message": "session is pending and can be resumed"
                    if status == SessionStatus.PENDING
                    else f"session is {status}",
                }
            )
        account = validate_account_number(request.query["accountNumber"])
        count = await sessions.pending_count(account)
    except InvalidRequest as exc:
        return json_error(400, str(exc))
    except PyMongoError as exc:
        return _store_down(exc)
    maximum = sessions.max_pending
    can_create = count < maximum
    return web.json_response(
        {
            "success": True,
            "canCreate": can_create,
            "pendingCount": count,
            "maxAllowed": maximum,
            "message": f"{maximum - count} more pending sessions allowed in 24 h"
            if can_create
            else f"limit reached: {count} of {maximum} pending sessions in 24 h",
        }
    )


async def cleanup(request: web.Request) -> web.Response:
    """`GET`/`POST /api/webhooks/cleanup`, both with `Authorization: Bearer $CRON_SECRET`."""
    if not _authorized(request, request.app[SETTINGS].cron_secret):
        log.warning("cleanup_unauthorized", method=request.method)
        return _unauthorized()
    try:
        result = await run_cleanup(request.app[STORE], request.app[CACHE])
    except PyMongoError as exc:
        return _store_down(exc)
    metrics = request.app[SESSION_METRICS]
    metrics.cleanup_expired.inc(result.expired)
    metrics.cleanup_deleted.labels("sessions").inc(result.sessions_deleted)
    metrics.cleanup_deleted.labels("webhooks").inc(result.webhooks_deleted)
    return web.json_response({"success": True, **result.to_dict()})


async def stats(request: web.Request) -> web.Response:
    """`GET /api/stats`: the counts (at most a second old); admins also get when they were
    taken and why a backend could not count."""
    snapshot = await request.app[STATS].get()
    body: dict[str, Any] = {"success": True, **snapshot.counts()}
    if _authorized(request, request.app[SETTINGS].admin_token):
        body["takenAt"] = iso(snapshot.taken_at)
        body["errors"] = snapshot.errors
    return web.json_response(body)
