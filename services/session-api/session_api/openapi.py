"""session-api's OpenAPI document: the bounds are the validators' own constants."""

from __future__ import annotations

from shared import openapi
from shared.ledger import IssueKind, IssueStatus
from shared.model import UUID_RE, SessionStatus
from shared.openapi import Doc
from shared.settings import Settings

from . import events_openapi
from .issues import ITEM_ID_RE, MAX_NOTE, MAX_RESOLVER
from .stats import MAX_AGE_SECONDS
from .validation import (
    ACCOUNT_RE,
    DEFAULT_PAGE_SIZE,
    DESCRIPTION_RE,
    MAX_ACCOUNT_TOKEN,
    MAX_AMOUNT,
    MAX_DESCRIPTION,
    MAX_PAGE,
    MAX_PAGE_SIZE,
    MIN_AMOUNT,
)

ACCOUNT: Doc = {
    "type": "string",
    "pattern": ACCOUNT_RE.pattern,
    "description": "The shop's identifier of the account to credit: 1 to 64 letters, "
    "digits, `.`, `_` or `-`.",
}
ACCOUNT_TOKEN: Doc = {
    "type": ["string", "null"],
    "maxLength": MAX_ACCOUNT_TOKEN,
    "description": "With ACCOUNT_LINK_KEY set, required: the shop's signature of the account, "
    "`<expires>.<hex HMAC-SHA256 of account:expires>` (README, accounts proven by the shop); "
    "ignored otherwise.",
}
LINK_REJECTED: Doc = openapi.error(
    "ACCOUNT_LINK_KEY is set and the account's token is missing, malformed, not the shop's, "
    "expired or valid for more than 1 h (`reason`); nothing counted."
)

CREATE_REQUEST: Doc = {
    "type": "object",
    "required": ["accountNumber", "amount"],
    "properties": {
        "accountNumber": ACCOUNT,
        "accountToken": ACCOUNT_TOKEN,
        "amount": {
            "type": "integer",
            "minimum": MIN_AMOUNT,
            "maximum": MAX_AMOUNT,
            "description": "VND.",
        },
        "uuid": {
            "type": ["string", "null"],
            "pattern": UUID_RE.pattern,
            "description": "Resume this session if it is still pending for this account; "
            "a uuid never used before names the new session. A uuid names one session "
            "only: once used, it is refused (409) when its session is over or gone.",
        },
        "description": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": MAX_DESCRIPTION,
            "pattern": DESCRIPTION_RE.pattern,
            "description": "The transfer note (default NAPTIEN).",
        },
    },
}

SESSION: Doc = openapi.success_object(
    {
        "uuid": openapi.UUID,
        "orderCode": openapi.ORDER_CODE,
        "amount": {"type": "integer"},
        "description": {"type": "string"},
        "checkoutUrl": {"type": "string"},
        "qrCode": {"type": "string"},
        "status": {"enum": [s.value for s in SessionStatus]},
        "expiresAt": openapi.TIMESTAMP,
        "resumed": {"type": "boolean"},
    },
    required=[
        "uuid",
        "orderCode",
        "amount",
        "checkoutUrl",
        "qrCode",
        "status",
        "expiresAt",
        "resumed",
    ],
)

STATUS: Doc = openapi.success_object(
    openapi.STATUS_EVENT_PROPERTIES, required=openapi.STATUS_EVENT_REQUIRED
)

SESSION_LIST: Doc = openapi.success_object(
    {
        "page": {"type": "integer", "minimum": 1},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
        "total": {"type": "integer", "minimum": 0},
        "pages": {"type": "integer", "minimum": 0},
        "items": {"type": "array", "items": {"type": "object"}},
    },
    required=["page", "limit", "total", "pages", "items"],
)

CHECK: Doc = {
    "oneOf": [
        openapi.success_object(
            {
                "exists": {"type": "boolean"},
                "status": {"type": ["string", "null"]},
                "message": {"type": "string"},
            },
            required=["exists", "status", "message"],
        ),
        openapi.success_object(
            {
                "canCreate": {"type": "boolean"},
                "pendingCount": {"type": "integer", "minimum": 0},
                "maxAllowed": {"type": "integer", "minimum": 0},
                "message": {"type": "string"},
            },
            required=["canCreate", "pendingCount", "maxAllowed", "message"],
        ),
    ]
}

CLEANUP: Doc = openapi.success_object(
    {
        name: {"type": "integer", "minimum": 0}
        for name in (
            "expired",
            "published",
            "publishFailed",
            "sessionsDeleted",
            "webhooksDeleted",
            "partialExpired",
        )
    }
    | {"durationMs": {"type": "number", "minimum": 0}},
    required=["expired", "published", "publishFailed", "sessionsDeleted", "webhooksDeleted"],
)

_COUNT: Doc = {"type": ["integer", "null"], "minimum": 0}
STATS: Doc = openapi.success_object(
    {
        "cachedOrders": _COUNT,
        "activeSubscriptions": _COUNT,
        "pendingSessions": _COUNT,
        "takenAt": openapi.TIMESTAMP | {"description": "When the counts were taken; admins only."},
        "errors": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Why a backend (`redis`, `mongodb`) could not count; admins only.",
        },
    },
    required=["cachedOrders", "activeSubscriptions", "pendingSessions"],
)

ISSUE: Doc = {
    "type": "object",
    "required": ["id", "kind", "orderCode", "reference", "status", "amount", "createdAt"],
    "properties": {
        "id": {"type": "string", "pattern": ITEM_ID_RE.pattern},
        "kind": {"enum": [k.value for k in IssueKind]},
        "orderCode": {"type": "integer"},
        "reference": {"type": "string"},
        "status": {"enum": [s.value for s in IssueStatus]},
        "amount": {"type": "integer"},
        "excess": {"type": "integer", "description": "overpaid: what went beyond the amount"},
        "data": {
            "type": ["object", "null"],
            "description": "What PayOS signed (the webhook's data, or the transaction PayOS "
            "reported to the reconciler); null for an item about a whole session.",
        },
        "session": {"type": ["object", "null"]},
        "uuid": {"type": ["string", "null"]},
        "source": {"enum": ["webhook", "reconciler", "cleanup"]},
        "test": {"type": "boolean", "description": "PayOS's confirm-webhook test delivery"},
        "createdAt": openapi.TIMESTAMP,
        "resolvedAt": openapi.TIMESTAMP,
        "resolvedBy": {"type": "string"},
        "note": {"type": "string"},
    },
}

ISSUE_LIST: Doc = openapi.success_object(
    {
        "page": {"type": "integer", "minimum": 1},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
        "total": {"type": "integer", "minimum": 0},
        "pages": {"type": "integer", "minimum": 0},
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/PaymentIssue"}},
    },
    required=["page", "limit", "total", "pages", "items"],
)

RESOLUTION: Doc = {
    "type": "object",
    "required": ["resolvedBy", "note"],
    "properties": {
        "resolvedBy": {"type": "string", "minLength": 1, "maxLength": MAX_RESOLVER},
        "note": {"type": "string", "minLength": 1, "maxLength": MAX_NOTE},
    },
}

_REF = "#/components/schemas/"


def _or_empty(maximum: int) -> Doc:
    """A paging number; empty means the default (`_page_arg`)."""
    return {"anyOf": [{"type": "integer", "minimum": 1, "maximum": maximum}, {"const": ""}]}


def _too_large(settings: Settings) -> Doc:
    return openapi.error(f"Body over {settings.session_max_body_bytes} bytes; nothing stored.")


def _cleanup(method: str, settings: Settings) -> Doc:
    op: Doc = {
        "operationId": f"cleanup{method.capitalize()}",
        "summary": "Expire stale pending sessions (publishing `expired`), delete expired "
        "records. Idempotent.",
        "security": [{"cronSecret": []}],
        "responses": {
            "200": openapi.ok("The run's counts.", {"$ref": _REF + "CleanupResult"}),
            "401": openapi.BEARER_UNAUTHORIZED,
            "503": openapi.STORE_UNAVAILABLE,
        },
    }
    if method == "post":
        op["responses"]["413"] = _too_large(settings)
    return op


def document(settings: Settings) -> Doc:
    rate = settings.session_rate_limit_per_minute
    return openapi.document(
        title="session-api",
        description="Payment sessions with a per-account limit, status reads for polling, "
        "the admins' list, cleanup, stats and the deposit page.",
        schemas={
            "CreateSession": CREATE_REQUEST,
            "Session": SESSION,
            "Status": STATUS,
            "SessionList": SESSION_LIST,
            "CheckResult": CHECK,
            "CleanupResult": CLEANUP,
            "Stats": STATS,
            "PaymentIssue": ISSUE,
            "PaymentIssueList": ISSUE_LIST,
            "Resolution": RESOLUTION,
            "ResolvedIssue": openapi.success_object(
                {"item": {"$ref": _REF + "PaymentIssue"}}, required=["item"]
            ),
            **events_openapi.SCHEMAS,
        },
        security_schemes={
            "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
            "cronSecret": {"type": "http", "scheme": "bearer", "description": "CRON_SECRET"},
            **events_openapi.SECURITY_SCHEMES,
        },
        paths={
            "/api/sessions": {
                "post": {
                    "operationId": "createSession",
                    "summary": "Create a payment session (PayOS link), or resume a pending one.",
                    "description": f"At most {settings.max_pending_per_account} pending "
                    "sessions per account in 24 h"
                    + (f"; at most {rate} creations per client address a minute." if rate else "."),
                    "requestBody": {
                        "required": True,
                        "content": openapi.json_body({"$ref": _REF + "CreateSession"}),
                    },
                    "responses": {
                        "201": openapi.ok("Created.", {"$ref": _REF + "Session"}),
                        "200": openapi.ok(
                            "Resumed (pending, same account).", {"$ref": _REF + "Session"}
                        ),
                        "400": openapi.error("Invalid request; nothing stored."),
                        "401": LINK_REJECTED,
                        "409": openapi.error(
                            "The uuid is already used by a session this request may not "
                            "resume: paid, expired, another account's, or gone (a uuid names "
                            "one session only): `retryable: false`, make a new uuid. Or that "
                            "session is still being created: `retryable: true`, retry."
                        ),
                        "413": _too_large(settings),
                        "429": openapi.error(
                            "The account's pending limit (`pendingCount`, `maxAllowed`) or the "
                            "client's rate limit (`retryAfter`, and the header) is reached.",
                            headers={"Retry-After": {"schema": {"type": "integer"}}},
                        ),
                        "502": openapi.error("PayOS refused or is unreachable; nothing counted."),
                        "503": openapi.error("MongoDB unavailable or the account busy; retry."),
                        "504": openapi.error("PayOS did not answer in time; nothing counted."),
                    },
                }
            },
            "/api/sessions/{uuid}/cancel": {
                "post": {
                    "operationId": "cancelSession",
                    "summary": "Cancel a pending session: its PayOS link first, then the "
                    "session (`cancelled`, final; frees its place in the pending limit).",
                    "description": "The uuid is the capability, as for reads. Idempotent: a "
                    "session cancelled before answers 200 again. The payment wins: what PayOS "
                    "took before the cancel is counted first, and a session it paid answers "
                    "409 with its paid state (`session`).",
                    "parameters": [
                        {"name": "uuid", "in": "path", "required": True, "schema": openapi.UUID}
                    ],
                    "responses": {
                        "200": openapi.ok("Cancelled (now or before).", {"$ref": _REF + "Status"}),
                        "400": openapi.error("Malformed uuid."),
                        "404": openapi.error("No live session with this uuid."),
                        "409": openapi.error(
                            "Paid, expired, or still being created (`retryable: true`); "
                            "`session` is its state."
                        ),
                        "502": openapi.error("PayOS refused or is unreachable; nothing changed."),
                        "503": openapi.STORE_UNAVAILABLE,
                        "504": openapi.error("PayOS did not answer in time; nothing changed."),
                    },
                }
            },
            "/api/webhooks": {
                "get": {
                    "operationId": "statusOrList",
                    "summary": "`?uuid=`: a session's status (polling); otherwise the admins' "
                    "paginated list (bearer ADMIN_TOKEN).",
                    "parameters": [
                        openapi.query_param(
                            "uuid", openapi.UUID, "The session whose status to read."
                        ),
                        openapi.query_param(
                            "page", _or_empty(MAX_PAGE), "List page (default 1); admins only."
                        ),
                        openapi.query_param(
                            "limit",
                            _or_empty(MAX_PAGE_SIZE),
                            f"Page size (default {DEFAULT_PAGE_SIZE}); admins only.",
                        ),
                    ],
                    "security": [{}, {"adminToken": []}],
                    "responses": {
                        "200": openapi.ok(
                            "The status, or a page of sessions (newest first).",
                            {
                                "oneOf": [
                                    {"$ref": _REF + "Status"},
                                    {"$ref": _REF + "SessionList"},
                                ]
                            },
                        ),
                        "400": openapi.error("Malformed uuid or paging."),
                        "401": openapi.BEARER_UNAUTHORIZED,
                        "404": openapi.error("No session with this uuid."),
                        "503": openapi.STORE_UNAVAILABLE,
                    },
                }
            },
            "/api/webhooks/check-session-limit": {
                "get": {
                    "operationId": "checkSessionLimit",
                    "summary": "Exactly one of `uuid` (does it exist, its status) and "
                    "`accountNumber` (may it create one more).",
                    "parameters": [
                        openapi.query_param("uuid", openapi.UUID, "A session's uuid."),
                        openapi.query_param("accountNumber", ACCOUNT, "An account."),
                        openapi.query_param(
                            "accountToken", ACCOUNT_TOKEN, "The shop's signature of the account."
                        ),
                    ],
                    "responses": {
                        "200": openapi.ok("The answer.", {"$ref": _REF + "CheckResult"}),
                        "400": openapi.error("Neither or both given, or malformed."),
                        "401": LINK_REJECTED,
                        "503": openapi.STORE_UNAVAILABLE,
                    },
                }
            },
            "/api/webhooks/cleanup": {
                "get": _cleanup("get", settings),
                "post": _cleanup("post", settings),
            },
            **events_openapi.PATHS,
            "/api/stats": {
                "get": {
                    "operationId": "stats",
                    "summary": "Cached orders, active subscriptions, pending sessions "
                    f"(null when Redis or MongoDB cannot tell), at most {MAX_AGE_SECONDS:g} s "
                    "old: each process counts once for every caller in that time.",
                    "description": "Counts only, for anyone; with the admin token also "
                    "`takenAt` and `errors`. Any other credential gets the counts.",
                    "security": [{}, {"adminToken": []}],
                    "responses": {"200": openapi.ok("The counts.", {"$ref": _REF + "Stats"})},
                }
            },
            "/api/admin/payment-issues": {
                "get": {
                    "operationId": "paymentIssues",
                    "summary": "The payment ledger: money that fits no session (late, unknown "
                    "order, overpaid, partial then expired, paid after cancel, not VND), one "
                    "item per case, newest first.",
                    "security": [{"adminToken": []}],
                    "parameters": [
                        openapi.query_param(
                            "status",
                            {"enum": ["open", "resolved", "all", ""]},
                            "Which items (default open).",
                        ),
                        openapi.query_param(
                            "kind",
                            {"enum": [k.value for k in IssueKind] + [""]},
                            "One kind only (default every kind).",
                        ),
                        openapi.query_param("page", _or_empty(MAX_PAGE), "Page (default 1)."),
                        openapi.query_param(
                            "limit",
                            _or_empty(MAX_PAGE_SIZE),
                            f"Page size (default {DEFAULT_PAGE_SIZE}).",
                        ),
                    ],
                    "responses": {
                        "200": openapi.ok("A page of items.", {"$ref": _REF + "PaymentIssueList"}),
                        "400": openapi.error("Bad status, kind or paging."),
                        "401": openapi.BEARER_UNAUTHORIZED,
                        "503": openapi.STORE_UNAVAILABLE,
                    },
                }
            },
            "/api/admin/payment-issues/{id}/resolve": {
                "post": {
                    "operationId": "resolvePaymentIssue",
                    "summary": "Resolve one item; who, when and the note are kept with it.",
                    "security": [{"adminToken": []}],
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": openapi.json_body({"$ref": _REF + "Resolution"}),
                    },
                    "responses": {
                        "200": openapi.ok("Resolved.", {"$ref": _REF + "ResolvedIssue"}),
                        "400": openapi.error("Malformed id or body; nothing changed."),
                        "401": openapi.BEARER_UNAUTHORIZED,
                        "404": openapi.error("No item with this id."),
                        "409": openapi.error("Already resolved (`item` as it is)."),
                        "413": _too_large(settings),
                        "503": openapi.STORE_UNAVAILABLE,
                    },
                }
            },
            "/": {
                "get": {
                    "operationId": "depositPage",
                    "summary": "The deposit page, in Vietnamese unless the reader prefers "
                    "English (Accept-Language, or the switch's cookie).",
                    "parameters": [
                        openapi.query_param(
                            "lang",
                            {"type": "string"},
                            "The switch: `vi` or `en` is remembered in a cookie and the "
                            "reader sent back to the address without it (303); another "
                            "value is ignored.",
                        ),
                        openapi.query_param(
                            "account", {"type": "string"}, "The shop's signed account link."
                        ),
                        openapi.query_param(
                            "token", {"type": "string"}, "The shop's signature of `account`."
                        ),
                    ],
                    "responses": {
                        "303": {
                            "description": "`?lang=vi|en`: remembered; go to `Location`.",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                        },
                        "200": {
                            "description": "HTML.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        },
                    },
                }
            },
            "/api/sessions/{uuid}/qr.svg": {
                "get": {
                    "operationId": "qrCode",
                    "summary": "The session's VietQR code as SVG.",
                    "parameters": [
                        {"name": "uuid", "in": "path", "required": True, "schema": openapi.UUID}
                    ],
                    "responses": {
                        "200": {
                            "description": "SVG.",
                            "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                        },
                        "400": openapi.error("Malformed uuid."),
                        "404": openapi.error("No session (with a QR code) with this uuid."),
                    },
                }
            },
        },
    )
