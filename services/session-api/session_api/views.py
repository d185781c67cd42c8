"""HTTP views of session-api: they speak HTTP and call the services; a domain error they
raise is answered by `shared.web.error_middleware` (its status is the error's own)."""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from aiohttp import web

from shared.appkeys import CACHE, SETTINGS, STORE
from shared.clients import REDIS_ERRORS
from shared.errors import storage
from shared.model import SessionStatus, format_time
from shared.web import json_error, read_body

from .appkeys import (
    ACCOUNT_LINKS,
    CACHED_READS,
    CANCELLATIONS,
    PAYMENT_ISSUES,
    RATE_LIMITER,
    SESSION_METRICS,
    SESSIONS,
    STATS,
    STATUS_READER,
    TRUSTED_PROXIES,
)
from .cleanup import run_cleanup
from .errors import InvalidRequest, NotFound, ServiceError
from .issues import parse_issue_query, parse_resolution
from .limits import check_rate
from .validation import (
    parse_create_request,
    parse_json,
    parse_paging,
    validate_account_number,
    validate_account_token,
    validate_uuid,
)

log = structlog.get_logger(__name__)

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


async def create_session(request: web.Request) -> web.Response:
    """`POST /api/sessions` `{accountNumber, amount, accountToken?, uuid?, description?}`."""
    metrics = request.app[SESSION_METRICS].sessions
    try:
        await check_rate(request, request.app[RATE_LIMITER], request.app[TRUSTED_PROXIES])
        body = await read_body(request, request.app[SETTINGS].session_max_body_bytes)
        req = parse_create_request(parse_json(body))
        # Before anything is counted or stored: the shop must have signed this account.
        request.app[ACCOUNT_LINKS].verify(req.account_number, req.account_token)
        view = await request.app[SESSIONS].create(req)
    except ServiceError as exc:
        metrics.labels(exc.label).inc()
        raise
    metrics.labels("resumed" if view.resumed else "created").inc()
    return web.json_response(
        {"success": True, **view.to_dict()}, status=200 if view.resumed else 201
    )


async def cancel_session(request: web.Request) -> web.Response:
    """`POST /api/sessions/{uuid}/cancel`: the uuid is the capability, as for reads."""
    metrics = request.app[SESSION_METRICS].cancels
    try:
        uuid = validate_uuid(request.match_info["uuid"])
        event = await request.app[CANCELLATIONS].cancel(uuid)
    except ServiceError as exc:
        metrics.labels(exc.label).inc()
        raise
    metrics.labels("cancelled").inc()
    return web.json_response({"success": True, **event.to_dict()})


async def status_or_list(request: web.Request) -> web.Response:
    """`GET /api/webhooks?uuid=` (status, for polling) or `?page=&limit=` (admins' list)."""
    if "uuid" in request.query:
        if "page" in request.query or "limit" in request.query:
            # Paging given with a uuid is validated all the same (and then unused).
            parse_paging(request.query)
        return await _status(request)
    return await _list(request)


async def _status(request: web.Request) -> web.Response:
    metrics = request.app[SESSION_METRICS]
    try:
        uuid = validate_uuid(request.query["uuid"])
        # Hot path (pollers of cached sessions): the cached event is already the JSON we
        # answer with, so it is passed through rather than decoded and encoded again; the
        # reads of the same moment share one MGET.
        try:
            body = await request.app[CACHED_READS].get_json(uuid)
        except REDIS_ERRORS:
            body = None  # the reader falls back to MongoDB
        if body is not None:
            metrics.reads_found.inc()
            return web.Response(body=_OK_PREFIX + body[1:], content_type="application/json")
        with storage():
            # The cache was just read: go on from the miss rather than read it again.
            event = await request.app[STATUS_READER].read_uncached(uuid)
        if event is None:
            raise NotFound("no payment session with this uuid")
    except ServiceError as exc:
        metrics.status_reads.labels(exc.label).inc()
        raise
    metrics.reads_found.inc()
    return web.json_response({"success": True, **event.to_dict()})


async def _list(request: web.Request) -> web.Response:
    if not _authorized(request, request.app[SETTINGS].admin_token):
        return _unauthorized()
    page = await request.app[SESSIONS].list_page(parse_paging(request.query))
    return web.json_response({"success": True, **page.to_dict()})


async def check_session_limit(request: web.Request) -> web.Response:
    """`GET /api/webhooks/check-session-limit?uuid=` or `?accountNumber=` (exactly one; with
    ACCOUNT_LINK_KEY set, the account with its `accountToken`)."""
    has_uuid, has_account = "uuid" in request.query, "accountNumber" in request.query
    if has_uuid == has_account:
        raise InvalidRequest("give exactly one of `uuid` and `accountNumber`")
    # Validated whichever is given (like paging beside a uuid), used with an account only.
    token = validate_account_token(request.query.get("accountToken"))
    sessions = request.app[SESSIONS]
    if has_uuid:
        doc = await sessions.find(validate_uuid(request.query["uuid"]))
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
    # Another account's count is not this caller's business unless the shop says it is theirs.
    request.app[ACCOUNT_LINKS].verify(account, token)
    count = await sessions.pending_count(account)
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
    with storage():
        result = await run_cleanup(request.app[STORE], request.app[CACHE])
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
        body["takenAt"] = format_time(snapshot.taken_at)
        body["errors"] = snapshot.errors
    return web.json_response(body)


async def payment_issues(request: web.Request) -> web.Response:
    """`GET /api/admin/payment-issues?status=open&kind=&page=&limit=` (bearer ADMIN_TOKEN)."""
    if not _authorized(request, request.app[SETTINGS].admin_token):
        return _unauthorized()
    page = await request.app[PAYMENT_ISSUES].page(parse_issue_query(request.query))
    return web.json_response({"success": True, **page})


async def resolve_payment_issue(request: web.Request) -> web.Response:
    """`POST /api/admin/payment-issues/{id}/resolve` `{resolvedBy, note}` (ADMIN_TOKEN)."""
    if not _authorized(request, request.app[SETTINGS].admin_token):
        log.warning("payment_issue_resolve_unauthorized")
        return _unauthorized()
    body = await read_body(request, request.app[SETTINGS].session_max_body_bytes)
    resolution = parse_resolution(parse_json(body))
    item = await request.app[PAYMENT_ISSUES].resolve(request.match_info["id"], resolution)
    return web.json_response({"success": True, "item": item})
