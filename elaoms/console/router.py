"""The operator console: server-rendered pages under /console (docs/console.md).

Present only when CONSOLE_SECRET or ADMIN_API_KEY is set. Thin: every page asks
`ConsoleService` and renders a template; this module only handles who may ask (session
cookie, CSRF token, same-origin POSTs, sign-in limits) and the page headers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elaoms.console.auth import COOKIE_NAME, CSRF_FIELD, ConsoleKeys, Session, SignInLimiter
from elaoms.console.service import ConsoleService
from elaoms.services import Services

logger = logging.getLogger("elaoms.console")

PREFIX = "/console"
HERE = Path(__file__).parent
FORGET_WORD = "forget"

# No script at all, no inline style, nothing from elsewhere, never in a frame.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    # Pages hold personal data: no copy in any cache, the browser's included.
    (b"cache-control", b"no-store"),
]


@dataclass
class ConsoleState:
    service: ConsoleService
    keys: ConsoleKeys
    limiter: SignInLimiter
    templates: Jinja2Templates


class ConsoleHeadersMiddleware:
    """Adds SECURITY_HEADERS to every /console response (errors and redirects included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != b"cache-control"
                ]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_console(app: FastAPI, services: Services) -> None:
    """Serve the console from `app` when a console secret is configured."""
    settings = services.settings
    secret = settings.console_sign_in_secret
    if not secret:
        return
    keys = ConsoleKeys(secret, session_seconds=settings.console_session_minutes * 60)
    app.state.console = ConsoleState(
        service=ConsoleService(services, keys),
        keys=keys,
        limiter=SignInLimiter(
            settings.anomaly_failure_threshold, float(settings.anomaly_window_seconds)
        ),
        templates=Jinja2Templates(directory=HERE / "templates"),
    )
    app.include_router(router, include_in_schema=False)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.add_middleware(ConsoleHeadersMiddleware)
    app.add_exception_handler(StarletteHTTPException, _error_page)  # type: ignore[arg-type]


async def _error_page(request: Request, error: StarletteHTTPException) -> Response:
    """Console errors as a page (a browser shows them); every other path as before."""
    if not request.url.path.startswith(PREFIX) or error.status_code < 400:
        return await http_exception_handler(request, error)
    return _state(request).templates.TemplateResponse(
        request,
        "error.html",
        {"status_code": error.status_code, "detail": error.detail, "signed_in": False},
        status_code=error.status_code,
        headers=error.headers,
    )


# Dependencies ----------------------------------------------------------------------------
def _state(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


def _source(request: Request) -> str:
    header = request.app.state.services.settings.trusted_proxy_header
    if header and (value := request.headers.get(header)):
        return value.split(",")[0].strip()
    return request.client.host if request.client else "unknown"


def _to_login() -> HTTPException:
    return HTTPException(status.HTTP_303_SEE_OTHER, headers={"Location": f"{PREFIX}/login"})


async def require_session(request: Request) -> Session:
    session = _state(request).keys.session_of(request.cookies.get(COOKIE_NAME))
    if session is None:
        raise _to_login()
    return session


SessionDep = Annotated[Session, Depends(require_session)]


def _same_origin(request: Request) -> bool:
    """A form posted from our own pages: browsers send Origin with every POST (Referer
    when an old one does not). A POST with neither is refused too."""
    claimed = request.headers.get("origin") or request.headers.get("referer")
    if not claimed or claimed == "null":
        return False
    # X-Forwarded-Host: behind a proxy that rewrites Host. A cross-site form cannot set
    # either header, so believing it opens nothing.
    ours = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
    return urlsplit(claimed).netloc in ours - {None}


def _refuse_cross_site(request: Request, kind: str) -> None:
    services: Services = request.app.state.services
    services.auth_monitor.record(kind, _source(request))
    logger.warning("console: %s refused from %s on %s", kind, _source(request), request.url.path)
    raise HTTPException(status.HTTP_403_FORBIDDEN, detail="Cross-site request refused")


async def checked_form(request: Request, session: SessionDep) -> FormData:
    """The posted form, once it proved to come from a console page of this session."""
    if not _same_origin(request):
        _refuse_cross_site(request, "console_origin")
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not _state(request).keys.csrf_matches(session, token if isinstance(token, str) else None):
        _refuse_cross_site(request, "console_csrf")
    return form


FormDep = Annotated[FormData, Depends(checked_form)]


def _caller(request: Request, opaque_id: str) -> str:
    user_id = _state(request).keys.user_id_of(opaque_id)
    if user_id is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="No such caller")
    return user_id


def _render(
    request: Request,
    template: str,
    session: Session | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    state = _state(request)
    csrf = state.keys.csrf_token(session) if session else ""
    return state.templates.TemplateResponse(
        request,
        template,
        {"csrf_field": CSRF_FIELD, "csrf": csrf, "signed_in": session is not None, **context},
        status_code=status_code,
    )


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


router = APIRouter(prefix=PREFIX, tags=["console"])


# Sign-in -------------------------------------------------------------------------------
@router.get("", response_class=HTMLResponse)
async def home(session: SessionDep) -> Response:
    return RedirectResponse(f"{PREFIX}/callers", status.HTTP_303_SEE_OTHER)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    if _state(request).keys.session_of(request.cookies.get(COOKIE_NAME)):
        return RedirectResponse(f"{PREFIX}/callers", status.HTTP_303_SEE_OTHER)
    return _render(request, "login.html", None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, secret: Annotated[str, Form(max_length=1000)] = "") -> Response:
    state = _state(request)
    source = _source(request)
    if not _same_origin(request):  # login CSRF: signing a victim in to our session
        _refuse_cross_site(request, "console_origin")
    if state.limiter.blocked(source):
        # Still an attempt the anomaly monitor must see: a guesser does not stop at 429.
        request.app.state.services.auth_monitor.record("console_sign_in", source)
        logger.warning("console: sign-in from %s refused: too many failures", source)
        return _render(
            request,
            "login.html",
            None,
            status.HTTP_429_TOO_MANY_REQUESTS,
            error="Too many failed sign-ins from this address: try again later.",
        )
    if not state.keys.secret_matches(secret):
        state.limiter.failed(source)
        request.app.state.services.auth_monitor.record("console_sign_in", source)
        logger.warning("console: sign-in refused from %s", source)
        return _render(
            request, "login.html", None, status.HTTP_401_UNAUTHORIZED, error="Wrong secret."
        )
    session, cookie = state.keys.new_session()
    logger.info("console: session %s signed in from %s", session.audit_id, source)
    response = RedirectResponse(f"{PREFIX}/callers", status.HTTP_303_SEE_OTHER)
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=state.keys.session_seconds,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=secure,
    )
    return response


@router.post("/logout")
async def logout(form: FormDep) -> Response:
    response = RedirectResponse(f"{PREFIX}/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(COOKIE_NAME, path=PREFIX)
    return response


# Callers -------------------------------------------------------------------------------
@router.get("/callers", response_class=HTMLResponse)
async def callers(
    request: Request,
    session: SessionDep,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    forgotten: Annotated[int, Query(ge=0, le=1)] = 0,
) -> Response:
    service = _state(request).service
    listing = await service.callers("", page)
    return _render(
        request,
        "callers.html",
        session,
        listing=listing,
        chart=await service.service_chart(),
        notice="The caller was forgotten." if forgotten else "",
    )


@router.post("/callers", response_class=HTMLResponse)
async def search_callers(request: Request, session: SessionDep, form: FormDep) -> Response:
    """Search by number or name: in the body, so a number never reaches a URL or a log."""
    page = _field(form, "page")
    service = _state(request).service
    listing = await service.callers(_field(form, "q"), int(page) if page.isdigit() else 1)
    return _render(
        request, "callers.html", session, listing=listing, chart=await service.service_chart()
    )


@router.get("/callers/{opaque_id}", response_class=HTMLResponse)
async def caller(request: Request, session: SessionDep, opaque_id: str) -> Response:
    return await _caller_page(request, session, opaque_id)


async def _caller_page(
    request: Request, session: Session, opaque_id: str, status_code: int = 200, **context: Any
) -> Response:
    user_id = _caller(request, opaque_id)
    page = await _state(request).service.caller(user_id)
    if page is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Nothing is held about this caller")
    return _render(request, "caller.html", session, status_code, caller=page, **context)


@router.post("/callers/{opaque_id}/search", response_class=HTMLResponse)
async def search_caller(
    request: Request, session: SessionDep, form: FormDep, opaque_id: str
) -> Response:
    user_id = _caller(request, opaque_id)
    query = _field(form, "query")
    answer = await _state(request).service.search(user_id, query) if query.strip() else None
    return await _caller_page(request, session, opaque_id, search=answer, query=query)


@router.get("/callers/{opaque_id}/calls/{conversation_id}", response_class=HTMLResponse)
async def call(
    request: Request, session: SessionDep, opaque_id: str, conversation_id: str
) -> Response:
    page = await _state(request).service.call(_caller(request, opaque_id), conversation_id)
    if page is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="No such call for this caller")
    return _render(request, "call.html", session, call=page)


@router.get("/callers/{opaque_id}/calls/{conversation_id}/audio")
async def audio(
    request: Request, session: SessionDep, opaque_id: str, conversation_id: str
) -> Response:
    data = await _state(request).service.audio(_caller(request, opaque_id), conversation_id)
    if data is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="No recording kept for this call")
    return Response(data, media_type="audio/mpeg")


@router.post("/callers/{opaque_id}/export")
async def export(request: Request, session: SessionDep, form: FormDep, opaque_id: str) -> Response:
    user_id = _caller(request, opaque_id)
    document = await _state(request).service.export(user_id)
    logger.warning("console: caller %s exported by session %s", opaque_id, session.audit_id)
    return Response(
        document,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="caller-{opaque_id[:16]}.json"'},
    )


@router.post("/callers/{opaque_id}/forget", response_class=HTMLResponse)
async def forget(request: Request, session: SessionDep, form: FormDep, opaque_id: str) -> Response:
    user_id = _caller(request, opaque_id)
    if _field(form, "confirm").strip().lower() != FORGET_WORD:
        return await _caller_page(
            request,
            session,
            opaque_id,
            status.HTTP_400_BAD_REQUEST,
            forget_error=f'Nothing was deleted: type "{FORGET_WORD}" to confirm.',
        )
    report = await _state(request).service.forget(user_id)
    logger.warning(
        "console: caller %s forgotten by session %s (%d store items, %d files, %d quarantined)",
        opaque_id,
        session.audit_id,
        report.store_items_deleted,
        len(report.files_deleted) + len(report.unclaimed_audio_deleted),
        len(report.quarantined_deleted),
    )
    return RedirectResponse(f"{PREFIX}/callers?forgotten=1", status.HTTP_303_SEE_OTHER)


# Agents and health ---------------------------------------------------------------------
@router.get("/agents", response_class=HTMLResponse)
async def agents(request: Request, session: SessionDep) -> Response:
    lines = await _state(request).service.agents()
    return _render(request, "agents.html", session, agents=lines)


@router.get("/health", response_class=HTMLResponse)
async def health(request: Request, session: SessionDep) -> Response:
    page = await _state(request).service.health()
    return _render(request, "health.html", session, health=page)


@router.post("/health/quarantine/{name}/requeue", response_class=HTMLResponse)
async def requeue(request: Request, session: SessionDep, form: FormDep, name: str) -> Response:
    service = _state(request).service
    try:
        outcome = await service.requeue(name)
    except LookupError:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail="No such quarantined delivery"
        ) from None
    logger.warning(
        "console: quarantined %s requeued by session %s: %s", name, session.audit_id, outcome
    )
    return _render(request, "health.html", session, health=await service.health(), notice=outcome)
