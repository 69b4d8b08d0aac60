"""The local dashboard: a page at ``/`` on the shim (docs/architecture.md#the-dashboard).

A browser cannot send the API key as a bearer header when the user simply
opens a page, so the page has its own way in: a **one-time login link**
(``/login?token=...``, printed when the node starts and by ``p2pnode
dashboard``, good for ten minutes) that the shim exchanges, once, for a
session cookie (good for twelve hours). The cookie is ``HttpOnly`` (the
page's script cannot read it) and ``SameSite=Strict`` (another site's page
cannot make the browser send it); the loopback Host rule still stands
before it (DNS rebinding), and a request with the cookie
that is not a GET must also carry the ``X-P2PNode-Dashboard`` header, which a
cross-origin page cannot add without a CORS preflight the shim never
grants. A cookie admits what the owner's key admits.

What the page shows comes from ``GET /dashboard/state`` (the node's
:meth:`Backend.dashboard`): strangers' offers among it, so the page writes
every value as text, never as markup, and its Content-Security-Policy lets
it run only its own script. Its assets are files of this package: a node may
have no internet, so nothing comes from a CDN.
"""

from __future__ import annotations

import collections
import functools
import hmac
import secrets
import time
from collections.abc import Callable
from importlib import resources
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request as HttpRequest
from starlette.responses import RedirectResponse, Response

COOKIE: Final = "p2pnode_dashboard"
HEADER: Final = b"x-p2pnode-dashboard"
# Unused links kept at once, and cookies: an old one is dropped for a new one,
# so asking for links again and again cannot grow the node's memory.
MAX_LINKS: Final = 8
MAX_COOKIES: Final = 16
# A link printed to a terminal or a log is good for a few minutes; a cookie
# for a working day, in the browser and here.
LINK_TTL_S: Final = 600.0
COOKIE_TTL_S: Final = 12 * 3600.0
# The page's own files (inference/static/), by the name the page asks for.
ASSETS: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Its script from its own origin only; no inline script, no frames of it elsewhere.
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class Login:
    """One-time login links, and the cookies they were exchanged for, each with
    its expiry (``clock``: seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._links: collections.deque[tuple[str, float]] = collections.deque(maxlen=MAX_LINKS)
        self._cookies: collections.deque[tuple[str, float]] = collections.deque(maxlen=MAX_COOKIES)

    def new_link(self, base: str) -> str:
        """A login link for the shim at ``base`` (``http://host:port``), good once,
        for ``LINK_TTL_S``."""
        token = secrets.token_urlsafe(24)
        self._links.append((token, self._clock() + LINK_TTL_S))
        return f"{base}/login?token={token}"

    def redeem(self, token: str) -> str | None:
        """The cookie for a login link's token, or None if it is not one (or was
        used, or expired)."""
        now = self._clock()
        for known in list(self._links):
            if hmac.compare_digest(known[0].encode(), token.encode()):
                self._links.remove(known)
                if known[1] <= now:
                    return None
                cookie = secrets.token_urlsafe(32)
                self._cookies.append((cookie, now + COOKIE_TTL_S))
                return cookie
        return None

    def admits(self, cookie: str) -> bool:
        now = self._clock()
        return any(
            hmac.compare_digest(c.encode(), cookie.encode()) and until > now
            for c, until in self._cookies
        )


def cookies_of(headers: dict[bytes, bytes]) -> list[str]:
    """Every value the Cookie header gives the dashboard's cookie: a page on
    another port of this host can set one by the same name (browsers share
    cookies across ports), and must not hide the real one."""
    found = []
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            found.append(value)
    return found[:4]


def local_base(url: str) -> str:
    """``http://host:port`` of the shim at ``url`` as a browser on this machine
    reaches it: a non-loopback listen address (``--shim-allow-remote``) would
    fail the Host check, so the link names 127.0.0.1 then."""
    base = url.removesuffix("/v1")
    parts = urlsplit(base)
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return base
    return f"http://127.0.0.1:{parts.port}"


def login(request: HttpRequest, logins: Login) -> Response:
    """``GET /login?token=...``: the cookie, and on to the page; a used or unknown
    token gets a page that says where a new link comes from."""
    cookie = logins.redeem(request.query_params.get("token", ""))
    if cookie is None:
        return Response(
            "This login link is not valid here, or was used already. Run `p2pnode dashboard` "
            "for a new one.\n",
            status_code=401,
            media_type="text/plain; charset=utf-8",
        )
    answer = RedirectResponse("/", status_code=303)
    answer.set_cookie(
        COOKIE, cookie, max_age=int(COOKIE_TTL_S), httponly=True, samesite="strict", path="/"
    )
    return answer


def page() -> Response:
    """``GET /``: the page itself."""
    return Response(
        _asset("dashboard.html"),
        media_type="text/html; charset=utf-8",
        headers=_HEADERS,
    )


def asset(name: str) -> Response | None:
    """``GET /dashboard/<name>``: one of the page's files, or None if there is none by that name."""
    media = ASSETS.get(name)
    if media is None:
        return None
    return Response(_asset(name), media_type=media, headers=_HEADERS)


_HEADERS: Final = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
}


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("p2pnode.inference").joinpath("static", name).read_bytes()
