"""The console's views: they check who asks (auth), read what to show (the filters, the
ledger's core in session_api.issues, the overview) and fill templates (render). A domain
error becomes an HTML page in the reader's language, with the error's own status."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import structlog
from aiohttp import web
from multidict import MultiDictProxy

from shared.appkeys import SETTINGS, STORE
from shared.i18n import Language, language_switch, request_language, switch_redirect
from shared.ledger import IssueKind, IssueStatus

from ..appkeys import PAYMENT_ISSUES, TRUSTED_PROXIES
from ..errors import InvalidRequest, NotFound, RateLimited, ServiceError, StoreUnavailable
from ..issues import IssueResolved, parse_issue_query, parse_resolution, validate_item_id
from ..limits import check_rate
from . import chart, render
from .appkeys import ADMIN_AUTH, ADMIN_CONSOLE, ADMIN_OVERVIEW, ADMIN_SIGNIN_LIMITER
from .auth import COOKIE, CSRF_FIELD, AdminSession
from .filters import STATUSES, VIETNAM, FilterError, find_sessions, parse_session_filter
from .overview import Overview
from .render import Console, esc

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Form = MultiDictProxy[Any]
SignedInView = Callable[[web.Request, AdminSession], Awaitable[web.StreamResponse]]
PostView = Callable[[web.Request, AdminSession, Form], Awaitable[web.StreamResponse]]
SIGN_IN = "/admin/signin"
# The ledger list's arguments a resolve form carries back (nothing else: no open redirect).
ISSUE_QUERY_KEYS = ("status", "kind", "page", "limit")


class Refused(Exception):
    """Answer with the error page: `status`, and the catalogue's `key` with `params`."""

    def __init__(self, http_status: int, key: str, **params: object) -> None:
        super().__init__(key)
        self.status, self.key, self.params = http_status, key, params


def _console(request: web.Request) -> Console:
    return request.app[ADMIN_CONSOLE]


def _page(
    request: web.Request,
    *,
    title: str,
    page: str,
    body: str,
    session: AdminSession | None,
    status: int = 200,
) -> web.Response:
    console, language = _console(request), request_language(request)
    nav = signout = ""
    if session is not None:
        marks = {f"{name}_current": "" for name in ("overview", "sessions", "issues")}
        if f"{page}_current" in marks:
            marks[f"{page}_current"] = 'aria-current="page"'
        nav = console.fill("nav", language, **marks)
        signout = console.fill("signout", language, csrf=esc(session.csrf))
    text = console.fill(
        "layout",
        language,
        lang=language,
        title=esc(console.text(language, title)),
        page=esc(page),
        nav=nav,
        switch=language_switch(request, language, console.catalogues),
        signout=signout,
        body=body,
    )
    response = web.Response(text=text, status=status, content_type="text/html")
    # Operators' data: never kept by a browser or a proxy.
    response.headers["Cache-Control"] = "no-store"
    # Not the site's `no-referrer`: under it a browser sends `Origin: null` with the forms'
    # POSTs, which the Origin check must refuse. Other origins still learn nothing.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Vary"] = "Accept-Language, Cookie"
    response.headers["Content-Language"] = language
    return response


def _error_page(
    request: web.Request, refused: Refused, session: AdminSession | None, back: str = "/admin"
) -> web.Response:
    console, language = _console(request), request_language(request)
    message = console.text(language, refused.key, **refused.params)
    body = console.fill("error", language, message=esc(message), back=esc(back))
    return _page(
        request,
        title="error.title",
        page="error",
        body=body,
        session=session,
        status=refused.status,
    )


def _refused(exc: ServiceError) -> Refused:
    """A domain error as the console tells it."""
    if isinstance(exc, FilterError):
        return Refused(400, exc.key, **exc.params)
    if isinstance(exc, IssueResolved):
        return Refused(409, "error.already_resolved", by=exc.item.get("resolvedBy", "?"))
    if isinstance(exc, NotFound):
        return Refused(404, "error.issue_missing")
    if isinstance(exc, InvalidRequest):
        return Refused(400, "error.issue_filter", detail=str(exc))
    if isinstance(exc, StoreUnavailable):
        return Refused(exc.status, "error.storage")
    return Refused(exc.status, "error.other", status=exc.status)


def _to_sign_in(request: web.Request) -> web.Response:
    """303 to the sign-in form; a cookie that did not prove a session is deleted."""
    had_cookie = COOKIE in request.cookies
    response = web.Response(
        status=303, headers={"Location": SIGN_IN + ("?expired=1" if had_cookie else "")}
    )
    if had_cookie:
        request.app[ADMIN_AUTH].clear_cookie(response)
    response.headers["Cache-Control"] = "no-store"
    return response


def _session(request: web.Request) -> AdminSession | None:
    return request.app[ADMIN_AUTH].verify(request.cookies.get(COOKIE))


def signed_in(view: SignedInView) -> Handler:
    """A page for signed-in operators; anyone else is sent to the sign-in form."""

    async def handler(request: web.Request) -> web.StreamResponse:
        switched = switch_redirect(request, secure=request.app[SETTINGS].is_production)
        if switched is not None:
            return switched
        session = _session(request)
        if session is None:
            return _to_sign_in(request)
        try:
            return await view(request, session)
        except Refused as refused:
            return _error_page(request, refused, session)
        except ServiceError as exc:
            return _error_page(request, _refused(exc), session)

    return handler


def _field(form: Form, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def posted(view: PostView) -> Handler:
    """A form's POST: from the console's own origin (403), by a signed-in operator (else to
    the sign-in form), carrying the session's CSRF token (403)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        auth = request.app[ADMIN_AUTH]
        if not auth.same_origin(request):
            log.warning("admin_post_refused", reason="origin", origin=request.headers.get("Origin"))
            return _error_page(request, Refused(403, "error.origin"), None)
        session = _session(request)
        if session is None:
            return _to_sign_in(request)
        form = await request.post()
        if not auth.csrf_matches(session, _field(form, CSRF_FIELD)):
            log.warning("admin_post_refused", reason="csrf", path=request.path)
            return _error_page(request, Refused(403, "error.csrf"), session)
        try:
            return await view(request, session, form)
        except Refused as refused:
            return _error_page(
                request, refused, session, back=request.headers.get("Referer") or "/admin"
            )
        except ServiceError as exc:
            return _error_page(request, _refused(exc), session)

    return handler


# -- sign-in ----------------------------------------------------------------------------------


def _sign_in_page(request: web.Request, notice_key: str | None, status: int = 200) -> web.Response:
    console, language = _console(request), request_language(request)
    notice = ""
    if notice_key is not None:
        kind = "error" if status >= 400 else "notice"
        role = "alert" if status >= 400 else "status"
        notice = (
            f'<p class="{kind}" id="signin-notice" role="{role}">'
            f"{esc(console.text(language, notice_key))}</p>"
        )
    body = console.fill("signin", language, notice=notice)
    return _page(
        request, title="signin.title", page="signin", body=body, session=None, status=status
    )


async def sign_in_form(request: web.Request) -> web.StreamResponse:
    """`GET /admin/signin`."""
    switched = switch_redirect(request, secure=request.app[SETTINGS].is_production)
    if switched is not None:
        return switched
    if _session(request) is not None:
        return web.Response(status=303, headers={"Location": "/admin"})
    notice = None
    if request.query.get("expired"):
        notice = "signin.expired"
    elif request.query.get("out"):
        notice = "signin.signed_out"
    return _sign_in_page(request, notice)


async def sign_in(request: web.Request) -> web.StreamResponse:
    """`POST /admin/signin` `token=…`: the session cookie and on to the overview, or 401."""
    auth = request.app[ADMIN_AUTH]
    if not auth.same_origin(request):
        log.warning("admin_post_refused", reason="origin", origin=request.headers.get("Origin"))
        return _error_page(request, Refused(403, "error.origin"), None)
    try:
        # Every attempt counts (a person signs in once): guessing the token is not an option.
        await check_rate(request, request.app[ADMIN_SIGNIN_LIMITER], request.app[TRUSTED_PROXIES])
    except RateLimited as exc:
        log.warning("admin_signin_rate_limited", remote=request.remote)
        limited = _sign_in_page(request, "signin.too_many", status=429)
        limited.headers["Retry-After"] = str(exc.retry_after)
        return limited
    form = await request.post()
    if not auth.token_matches(_field(form, "token") or ""):
        log.warning("admin_signin_refused", remote=request.remote)
        return _sign_in_page(request, "signin.wrong", status=401)
    log.info("admin_signed_in", remote=request.remote)
    response = web.Response(status=303, headers={"Location": "/admin"})
    auth.set_cookie(response, auth.issue())
    return response


@posted
async def sign_out(request: web.Request, session: AdminSession, form: Form) -> web.StreamResponse:
    """`POST /admin/signout`."""
    response = web.Response(status=303, headers={"Location": SIGN_IN + "?out=1"})
    request.app[ADMIN_AUTH].clear_cookie(response)
    return response


# -- the overview -----------------------------------------------------------------------------


def _counters(console: Console, language: Language, overview: Overview) -> dict[str, str]:
    gateways = overview.gateways
    return {
        "streams": render.count(console, language, gateways.open_streams),
        "pending": render.count(console, language, overview.pending_sessions),
        "payments": render.count(console, language, overview.payments_last_hour),
        "p50": render.milliseconds(console, language, gateways.p50_seconds),
        "p99": render.milliseconds(console, language, gateways.p99_seconds),
    }


@signed_in
async def overview(request: web.Request, session: AdminSession) -> web.StreamResponse:
    """`GET /admin`: the live counters and the payments chart."""
    console, language = _console(request), request_language(request)
    taken = await request.app[ADMIN_OVERVIEW].get()
    counters = {k: esc(v) for k, v in _counters(console, language, taken).items()}
    body = console.fill(
        "overview",
        language,
        chart_summary=esc(chart.summary(console, language, taken)),
        **counters,
    )
    return _page(request, title="overview.title", page="overview", body=body, session=session)


async def counters(request: web.Request) -> web.StreamResponse:
    """`GET /admin/api/counters`: what the overview's script shows, written in the reader's
    language (401 without a session: the script then sends the reader to sign in)."""
    if _session(request) is None:
        return web.json_response({"success": False, "error": "sign in first"}, status=401)
    console, language = _console(request), request_language(request)
    taken = await request.app[ADMIN_OVERVIEW].get()
    body = {
        "success": True,
        "counters": _counters(console, language, taken),
        "paymentsLastHour": taken.payments_last_hour,
        "chartSummary": chart.summary(console, language, taken),
    }
    return web.Response(
        text=json.dumps(body, ensure_ascii=False),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def chart_svg(request: web.Request) -> web.StreamResponse:
    """`GET /admin/chart.svg`: payments per minute over the last hour."""
    if _session(request) is None:
        return web.Response(status=401, text="sign in first", headers={"Cache-Control": "no-store"})
    console, language = _console(request), request_language(request)
    taken = await request.app[ADMIN_OVERVIEW].get()
    return web.Response(
        text=chart.payments_svg(console, language, taken),
        content_type="image/svg+xml",
        headers={"Cache-Control": "no-store", "Content-Language": language},
    )


# -- lists ------------------------------------------------------------------------------------


def _pager(request: web.Request, page: int, pages: int) -> str:
    console, language = _console(request), request_language(request)

    def link(to: int, key: str, rel: str) -> str:
        href = request.rel_url.with_query({**request.query, "page": str(to)})
        return f'<a rel="{rel}" href="{esc(href)}">{esc(console.text(language, key))}</a>'

    parts = []
    if page > 1:
        parts.append(link(page - 1, "pager.prev", "prev"))
    parts.append(
        f'<span id="page-position">'
        f"{esc(console.text(language, 'pager.position', page=page, pages=max(1, pages)))}</span>"
    )
    if page < pages:
        parts.append(link(page + 1, "pager.next", "next"))
    label = esc(console.text(language, "pager.label"))
    return f'<nav class="pager" aria-label="{label}">{"".join(parts)}</nav>'


def _time_input(value: datetime | None) -> str:
    """A time as the datetime-local input shows it again (Vietnam time)."""
    return "" if value is None else value.astimezone(VIETNAM).strftime("%Y-%m-%dT%H:%M")


@signed_in
async def sessions(request: web.Request, session: AdminSession) -> web.StreamResponse:
    """`GET /admin/sessions?status=&account=&from=&to=&page=&limit=`."""
    console, language = _console(request), request_language(request)
    wanted = parse_session_filter(request.query)
    found = await find_sessions(request.app[STORE], wanted)
    rows = []
    for doc in found.rows:
        status = str(doc.get("status", ""))
        uuid = str(doc.get("uuid", ""))
        rows.append(
            console.fill(
                "session_row",
                language,
                status=esc(status),
                status_class=esc(f"s-{status}" if status in STATUSES else "s-other"),
                status_label=esc(console.label(language, "status", status)),
                created=esc(render.when(language, doc.get("createdAt"))),
                expires=esc(render.when(language, doc.get("expiresAt"))),
                order=esc(doc.get("orderCode", "")),
                account=esc(doc.get("accountNumber", "")),
                amount=esc(render.money(language, doc.get("amount"))),
                paid=esc(render.money(language, doc.get("amountPaid"))),
                uuid=esc(uuid),
                uuid_short=esc(uuid[:8]),
            )
        )
    if rows:
        table = console.fill("sessions_table", language, rows="\n".join(rows))
    else:
        table = f'<p class="empty">{esc(console.text(language, "sessions.empty"))}</p>'
    status_choices = [("", console.text(language, "filter.any"))] + [
        (s, console.label(language, "status", s)) for s in STATUSES
    ]
    body = console.fill(
        "sessions",
        language,
        status_options=render.options(status_choices, wanted.status or ""),
        account=esc(wanted.account or ""),
        since=esc(_time_input(wanted.since)),
        until=esc(_time_input(wanted.until)),
        count=esc(
            console.text(language, "sessions.count", total=render.number(language, found.total))
        ),
        table=table,
        pager=_pager(request, wanted.paging.page, found.pages),
    )
    return _page(request, title="sessions.title", page="sessions", body=body, session=session)


def _parsed_time(value: object) -> datetime | None:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return value if isinstance(value, datetime) else None


def _issue(
    console: Console, language: Language, item: dict[str, Any], session: AdminSession, back: str
) -> str:
    status = str(item.get("status", ""))
    amount = render.money(language, item.get("amount"))
    if isinstance(item.get("excess"), int):
        excess = render.money(language, item["excess"])
        amount += f" ({console.text(language, 'issues.excess', excess=excess)})"
    snapshot = item.get("session") or {}
    if status == IssueStatus.OPEN.value:
        action = console.fill(
            "resolve_form", language, id=esc(item["id"]), csrf=esc(session.csrf), back=esc(back)
        )
    else:
        done = console.text(
            language,
            "issues.resolved_by",
            by=item.get("resolvedBy", "?"),
            time=render.when(language, _parsed_time(item.get("resolvedAt"))),
            note=item.get("note", ""),
        )
        action = f'<p class="resolution">{esc(done)}</p>'
    return console.fill(
        "issue_item",
        language,
        id=esc(item["id"]),
        kind=esc(item.get("kind", "")),
        kind_label=esc(console.label(language, "kind", item.get("kind", ""))),
        status=esc(status),
        status_class="s-open" if status == IssueStatus.OPEN.value else "s-resolved",
        status_label=esc(console.label(language, "issues", status)),
        order=esc(item.get("orderCode", "")),
        created=esc(render.when(language, _parsed_time(item.get("createdAt")))),
        amount=esc(amount),
        account=esc(snapshot.get("accountNumber") or render.NONE),
        uuid=esc(item.get("uuid") or render.NONE),
        source=esc(console.label(language, "source", item.get("source", ""))),
        action=action,
    )


@signed_in
async def issues(request: web.Request, session: AdminSession) -> web.StreamResponse:
    """`GET /admin/issues?status=open|resolved|all&kind=&page=&limit=` (the admin API's own
    parsing and listing)."""
    console, language = _console(request), request_language(request)
    query = parse_issue_query(request.query)
    listed = await request.app[PAYMENT_ISSUES].page(query)
    back = urlencode([(k, v) for k, v in request.query.items() if k in ISSUE_QUERY_KEYS])
    items = [_issue(console, language, item, session, back) for item in listed["items"]]
    if not items:
        items = [f'<p class="empty">{esc(console.text(language, "issues.empty"))}</p>']
    notice = ""
    done = request.query.get("done", "")
    if done.isdigit():
        notice = (
            f'<p class="notice" id="issue-notice" role="status">'
            f"{esc(console.text(language, 'issues.done', order=done))}</p>"
        )
    status_choices = [
        ("open", console.text(language, "issues.open")),
        ("resolved", console.text(language, "issues.resolved")),
        ("all", console.text(language, "filter.any")),
    ]
    kind_choices = [("", console.text(language, "filter.any"))] + [
        (k.value, console.label(language, "kind", k.value)) for k in IssueKind
    ]
    body = console.fill(
        "issues",
        language,
        notice=notice,
        status_options=render.options(
            status_choices, query.status.value if query.status else "all"
        ),
        kind_options=render.options(kind_choices, query.kind.value if query.kind else ""),
        count=esc(
            console.text(language, "issues.count", total=render.number(language, listed["total"]))
        ),
        items="\n".join(items),
        pager=_pager(request, query.paging.page, listed["pages"]),
    )
    return _page(request, title="issues.title", page="issues", body=body, session=session)


@posted
async def resolve(request: web.Request, session: AdminSession, form: Form) -> web.StreamResponse:
    """`POST /admin/issues/{id}/resolve` `resolvedBy, note` (the admin API's own resolve);
    back to the list it was sent from, which says it is done."""
    try:
        item_id = validate_item_id(request.match_info["id"])
    except InvalidRequest:
        raise Refused(400, "error.issue_missing") from None
    try:
        resolution = parse_resolution(
            {"resolvedBy": _field(form, "resolvedBy"), "note": _field(form, "note")}
        )
    except InvalidRequest:
        raise Refused(400, "error.resolve_invalid") from None
    item = await request.app[PAYMENT_ISSUES].resolve(item_id, resolution)
    kept = [(k, v) for k, v in parse_qsl(_field(form, "back") or "") if k in ISSUE_QUERY_KEYS]
    kept.append(("done", str(item.get("orderCode", ""))))
    return web.Response(status=303, headers={"Location": "/admin/issues?" + urlencode(kept)})
