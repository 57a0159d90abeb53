"""Who may read transcripts and review labels (docs/architecture.md#access-to-conversations).

Transcripts are customer data. The conversation endpoints depend on :data:`ReaderDep`, which
accepts, in this order:

* ``Authorization: Bearer <token>`` with a token of ``API_TOKENS`` (``name:token`` pairs; each
  compared in constant time; the name is who reviewed). A wrong token is 401, whatever else the
  request carries.
* The session cookie set by ``POST /login`` (a browser): signed and time-stamped by itsdangerous,
  HttpOnly, SameSite=Strict, Secure when the request came over HTTPS, valid ``API_SESSION_HOURS``,
  and only while its user's token is unchanged in ``API_TOKENS``. A state-changing request that
  carries only the cookie must also send the session's CSRF token in ``X-CSRF-Token`` (403
  without): SameSite=Strict already keeps the cookie off cross-site requests; the token covers
  browsers and same-site subdomains where it does not.
* Without ``API_TOKENS``: nobody, unless the API is bound to a loopback address (``API_HOST``),
  the request arrived on a loopback address and names a loopback host (a DNS-rebinding page names
  its own); then the caller is ``local``. Bound elsewhere, the answer is 403 naming ``API_TOKENS``.

The aggregates (``/api/stats``, ``/dashboard``) and ``/classify`` do not depend on this.
:func:`install` adds ``/login``, ``/logout`` and ``/api/session``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from api_dependencies import SettingsDep
from config import Settings
from error_handler import ForbiddenError, InputError, NotAuthenticatedError

logger = logging.getLogger(__name__)

SESSION_COOKIE = "classifier_session"
CSRF_HEADER = "X-CSRF-Token"
#: The one body that is not JSON the API reads (JSONBodyOnlyMiddleware lets it through): the login form.
FORM_PATHS = frozenset({"/login"})
#: A login form is a few hundred bytes; a bigger body is not one.
MAX_FORM_BYTES = 4096
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_USER = "local"
_SESSION_SALT = "support-classifier-session"


@dataclass(frozen=True)
class Principal:
    """Who is asking: a token's name (bearer or session) or ``local`` (a loopback API without tokens)."""

    name: str
    via: Literal["bearer", "session", "loopback"]
    csrf_token: str | None = None


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1), with or without brackets."""
    if not host:
        return False
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_header_name(request: Request) -> str:
    host = request.headers.get("host", "")
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Sessions:
    """Signed, expiring session cookies (itsdangerous), keyed by the configured tokens.

    The signing key is derived from API_TOKENS, so every API process of a deployment accepts the
    same cookies and changing the tokens ends every session. A session also carries a
    fingerprint of its user's token: changing one user's token ends that user's sessions.
    """

    def __init__(self, settings: Settings) -> None:
        self.tokens = settings.api_token_names  # {token: name}
        secret = "" if settings.api_tokens is None else settings.api_tokens.get_secret_value()
        self._key = hashlib.sha256(b"support-classifier session key\0" + secret.encode("utf-8")).digest()
        self._serializer = URLSafeTimedSerializer(self._key, salt=_SESSION_SALT)
        self.max_age = int(settings.api_session_hours * 3600)

    def name_of(self, token: str) -> str | None:
        """The name of ``token``, compared with every configured token in constant time."""
        found = None
        given = token.encode("utf-8")
        for candidate, name in self.tokens.items():
            if hmac.compare_digest(given, candidate.encode("utf-8")):
                found = name
        return found

    def _fingerprint(self, name: str) -> str:
        token = next((t for t, n in self.tokens.items() if n == name), "")
        return hmac.new(self._key, token.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def issue(self, name: str) -> tuple[str, str]:
        """A new session for ``name``: (cookie value, CSRF token)."""
        csrf = secrets.token_urlsafe(32)
        return self._serializer.dumps({"u": name, "f": self._fingerprint(name), "c": csrf}), csrf

    def read(self, cookie: str) -> Principal | None:
        """The session's user, or None when the cookie is forged, expired or its token changed."""
        try:
            data = self._serializer.loads(cookie, max_age=self.max_age)
        except BadSignature:  # (SignatureExpired is one)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("c"), str):
            return None
        name = data["u"]
        if name not in self.tokens.values() or not hmac.compare_digest(str(data.get("f")), self._fingerprint(name)):
            return None
        return Principal(name, "session", data["c"])


def get_sessions(request: Request) -> Sessions:
    return request.state.sessions


SessionsDep = Annotated[Sessions, Depends(get_sessions)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise NotAuthenticatedError("The Authorization header must be 'Bearer <token>'.",
                                    hint="Send a token of API_TOKENS as 'Authorization: Bearer <token>'.")
    return value.strip()


def require_reader(request: Request, settings: SettingsDep, sessions: SessionsDep) -> Principal:
    """The caller allowed to read transcripts and review labels, or a 401/403 (see the module doc)."""
    if not sessions.tokens:
        return _loopback_principal(request, settings)
    token = _bearer(request)
    if token is not None:
        name = sessions.name_of(token)
        if name is None:
            logger.warning("%s %s -> 401: a bearer token that is not in API_TOKENS", request.method, request.url.path)
            raise NotAuthenticatedError("The bearer token is not one of API_TOKENS.",
                                        hint="Check the token; ask whoever runs the API for one.")
        return Principal(name, "bearer")
    cookie = request.cookies.get(SESSION_COOKIE)
    principal = sessions.read(cookie) if cookie else None
    if principal is None:
        raise NotAuthenticatedError(
            "Reading conversations needs a token: 'Authorization: Bearer <token>', or log in on /login."
            + (" The session has expired or was ended." if cookie else ""),
            hint="API_TOKENS lists who may read them.",
        )
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode("utf-8"), (principal.csrf_token or "").encode("utf-8")):
            raise ForbiddenError(f"A change made with the session cookie needs the session's {CSRF_HEADER} header.",
                                 hint="Pages of this API send it; scripts use a bearer token instead.")
    return principal


def _loopback_principal(request: Request, settings: Settings) -> Principal:
    server = request.scope.get("server")
    arrived_on = server[0] if server else None
    if not is_loopback_host(settings.api_host):
        raise ForbiddenError(
            f"Conversations are customer data: without API_TOKENS they are served only by an API bound to a "
            f"loopback address, and API_HOST is {settings.api_host!r}.",
            hint="Set API_TOKENS (e.g. API_TOKENS='alice:<long random token>'), or bind the API to 127.0.0.1.",
        )
    if not is_loopback_host(arrived_on) or not is_loopback_host(_host_header_name(request)):
        raise ForbiddenError(
            "Without API_TOKENS conversations are served only to requests made to a loopback address.",
            hint="Set API_TOKENS to serve them elsewhere; open the page as http://127.0.0.1:<port>/ or "
            "http://localhost:<port>/.",
        )
    return Principal(LOCAL_USER, "loopback")


ReaderDep = Annotated[Principal, Depends(require_reader)]


# --- login and logout -------------------------------------------------------------------------

router = APIRouter(tags=["access"])

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in - Support conversation classifier</title><link rel="stylesheet" href="/static/dashboard.css"></head>
<body><main class="login"><h1>Log in</h1>{message}
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label for="token">Token</label> <input id="token" name="token" type="password" autocomplete="current-password"
 required autofocus> <button type="submit">Log in</button></form>
<p class="muted">Tokens are set by whoever runs the API (API_TOKENS).</p></main></body></html>
"""


def _safe_next(value: str | None) -> str:
    """Where to go after logging in: a path of this site only (never ``//host`` or ``https://...``)."""
    if value and value.startswith("/") and not value.startswith(("//", "/\\")):
        return value
    return "/conversations"


def _login_page(message: str, next_path: str, status: int = 200) -> HTMLResponse:
    shown = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return HTMLResponse(LOGIN_PAGE.format(message=shown, next=html.escape(_safe_next(next_path), quote=True)),
                        status_code=status, headers={"Cache-Control": "no-store"})


@router.get("/login", include_in_schema=False)
async def login_form(sessions: SessionsDep, next: str | None = None) -> HTMLResponse:  # noqa: A002
    if not sessions.tokens:
        return _login_page("API_TOKENS is not set: there is nothing to log in to (a loopback-bound API serves "
                           "conversations without a login).", next or "")
    return _login_page("", next or "")


@router.post("/login", include_in_schema=False)
async def login(request: Request, sessions: SessionsDep) -> Response:
    """The form's ``token`` (and ``next``): a session cookie and a redirect, or the form again with 401."""
    _same_origin(request)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InputError("The login form is larger than a login form.", field="body", status_code=413)
    form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=10)
    token = (form.get("token") or [""])[0].strip()
    next_path = _safe_next((form.get("next") or [""])[0])
    if not sessions.tokens:
        return _login_page("API_TOKENS is not set: there is nothing to log in to.", next_path, 400)
    name = sessions.name_of(token) if token else None
    if name is None:
        logger.warning("POST /login -> 401: a token that is not in API_TOKENS")
        return _login_page("That token is not valid.", next_path, 401)
    value, _ = sessions.issue(name)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(SESSION_COOKIE, value, max_age=sessions.max_age, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    logger.info("%s logged in", name)
    return response


def _same_origin(request: Request) -> None:
    """A login posted from another site's page (login CSRF) is refused: browsers send Origin on POST."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return
    expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin.lower() != expected.lower():
        raise ForbiddenError("The login form was posted from another site.", hint="Log in on this site's /login.")


@router.api_route("/logout", methods=["GET", "POST"], include_in_schema=False)
async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


@router.get("/api/session", summary="Who the caller is, and the CSRF token of a browser session", tags=["access"])
async def session(principal: ReaderDep, sessions: SessionsDep) -> dict[str, Any]:
    return {"user": principal.name, "via": principal.via, "csrf_token": principal.csrf_token,
            "tokens_required": bool(sessions.tokens)}


def lifespan_state(settings: Settings) -> dict[str, Any]:
    """What this module keeps for the app's life (merged into the lifespan state)."""
    return {"sessions": Sessions(settings)}


def install(app: FastAPI) -> None:
    """``/login``, ``/logout`` and ``/api/session`` (the app's lifespan yields :func:`lifespan_state`)."""
    app.include_router(router)
