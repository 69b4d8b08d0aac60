"""The dashboard's way in: a one-time login link, then a cookie that admits what
the key admits, and nothing a cross-site page or a used link could reuse."""

from __future__ import annotations

import functools

import httpx
import trio

from p2pnode.inference import dashboard, openai_api
from p2pnode.tests.inference.test_openai_api import CHAT, KEY, ScriptedNode

BOUND_S = 10


def _with(cookie: str, **headers: str) -> dict[str, str]:
    return {"cookie": f"{dashboard.COOKIE}={cookie}", **headers}


def _cookie(answer: httpx.Response) -> str:
    return answer.cookies[dashboard.COOKIE]


async def _serve(nursery: trio.Nursery, logins: dashboard.Login) -> str:
    url = await nursery.start(
        functools.partial(openai_api.serve, ScriptedNode(), KEY, "127.0.0.1:0", logins=logins)
    )
    return str(url).removesuffix("/v1")


async def test_a_login_link_works_once_and_its_cookie_opens_the_page() -> None:
    logins = dashboard.Login()
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            base = await _serve(nursery, logins)
            link = logins.new_link(base)
            # A client per request: none keeps a cookie the test did not give it.
            async with httpx.AsyncClient() as http:
                assert (await http.get(base + "/")).status_code == 401
                said = (await http.get(base + "/")).json()["error"]["message"]
                assert "p2pnode dashboard" in said
                first = await http.get(link)
                assert first.status_code == 303
                assert first.headers["location"] == "/"
                said_cookie = first.headers["set-cookie"].lower()
                assert "httponly" in said_cookie
                assert "samesite=strict" in said_cookie
                cookie = _cookie(first)
                http.cookies.clear()
                assert (await http.get(base + "/")).status_code == 401
                page = await http.get(base + "/", headers=_with(cookie))
                assert page.status_code == 200
                assert "<title>p2pnode</title>" in page.text
                assert "script-src 'self'" in page.headers["content-security-policy"]
                script = await http.get(base + "/dashboard/dashboard.js", headers=_with(cookie))
                assert script.status_code == 200
                assert "textContent" in script.text
                state = await http.get(base + "/dashboard/state", headers=_with(cookie))
                assert state.json() == {"node": {"peer_id": "scripted"}, "keys": []}
                # The link was good once: a second use buys nothing.
                again = await http.get(link)
                assert again.status_code == 401
                assert "set-cookie" not in again.headers
                # No file beyond the page's own.
                other = await http.get(base + "/dashboard/..%2Fdashboard.py", headers=_with(cookie))
                assert other.status_code == 404
            nursery.cancel_scope.cancel()


async def test_the_cookie_spends_only_with_the_header_a_cross_site_page_cannot_add() -> None:
    logins = dashboard.Login()
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            base = await _serve(nursery, logins)
            async with httpx.AsyncClient() as http:
                cookie = _cookie(await http.get(logins.new_link(base)))
                http.cookies.clear()
                chat = base + "/v1/chat/completions"
                bare = await http.post(chat, json=CHAT, headers=_with(cookie))
                assert bare.status_code == 401
                marked = _with(cookie, **{"x-p2pnode-dashboard": "1"})
                answer = await http.post(chat, json=CHAT, headers=marked)
                assert answer.status_code == 200
                assert answer.json()["choices"][0]["message"]["content"] == "hello"
                forged = await http.post(
                    chat, json=CHAT, headers=_with("guessed", **{"x-p2pnode-dashboard": "1"})
                )
                assert forged.status_code == 401
                # The Host rule stands before the cookie (DNS rebinding).
                rebound = await http.get(
                    base + "/dashboard/state", headers=_with(cookie, host="evil.example")
                )
                assert rebound.status_code == 403
            nursery.cancel_scope.cancel()


def test_links_and_cookies_are_bounded() -> None:
    logins = dashboard.Login()
    links = [logins.new_link("http://127.0.0.1:1") for _ in range(dashboard.MAX_LINKS + 3)]
    tokens = [link.rsplit("=", 1)[1] for link in links]
    assert logins.redeem(tokens[0]) is None  # pushed out by newer ones
    cookies = [logins.redeem(t) for t in tokens[3:]]
    assert all(cookies)
    assert all(logins.admits(c) for c in cookies if c)


def test_links_and_cookies_expire() -> None:
    now = [1000.0]
    logins = dashboard.Login(clock=lambda: now[0])
    stale = logins.new_link("http://127.0.0.1:1").rsplit("=", 1)[1]
    fresh = logins.new_link("http://127.0.0.1:1").rsplit("=", 1)[1]
    now[0] += dashboard.LINK_TTL_S + 1
    assert logins.redeem(stale) is None
    assert logins.redeem(fresh) is None  # both past their ten minutes
    cookie = logins.redeem(logins.new_link("http://127.0.0.1:1").rsplit("=", 1)[1])
    assert cookie is not None
    assert logins.admits(cookie)
    now[0] += dashboard.COOKIE_TTL_S + 1
    assert not logins.admits(cookie)


def test_a_cookie_of_the_same_name_from_another_port_does_not_hide_the_real_one() -> None:
    headers = {b"cookie": f"{dashboard.COOKIE}=planted; {dashboard.COOKIE}=real".encode()}
    assert dashboard.cookies_of(headers) == ["planted", "real"]
    assert dashboard.local_base("http://0.0.0.0:8080/v1") == "http://127.0.0.1:8080"
    assert dashboard.local_base("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080"
