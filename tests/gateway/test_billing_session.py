"""Signing in to the billing API: portal links, the session cookie, the sign-in form's API,
sign-out and CSRF, through the gateway with real Postgres and Redis (and the Stripe stand-in
for checkout).

Cookies are handled by hand (a ``DummyCookieJar`` client): each test says exactly which
cookie it sends.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import ClientResponse, DummyCookieJar
from aiohttp.test_utils import TestClient

from billing import api_keys
from billing.accounts import suspend_account
from billing.audit import CLI_ACTOR
from devtools.localservices import free_port
from devtools.stripe_sim import StripeStub
from gateway.app import create_app
from gateway.billing_session_store import COOKIE_NAME
from runtime import appkeys
from tests.e2e.test_checkout_flow import PUBLIC_BASE_URL, Shop, shop_settings


class Portal(Shop):
    """The gateway (no cookie jar), a buyer with a key, and the session helpers."""

    async def link(self, key: str | None = None, **body: Any) -> ClientResponse:
        return await self.gateway.post(
            "/api/billing/portal-sessions",
            json=body,
            headers={"Authorization": f"Bearer {key or self.key}"},
        )

    async def show(self, url: str) -> ClientResponse:
        """GET the link: its confirmation page (never uses it up)."""
        return await self.gateway.get(_link_path(url), allow_redirects=False)

    async def open(self, url: str, cookie: str | None = None, **headers: str) -> ClientResponse:
        """The confirmation page's Continue: POST the link (uses it up, signs in)."""
        return await self.gateway.post(
            _link_path(url), allow_redirects=False, headers={**_cookie_header(cookie), **headers}
        )

    async def signed_in_by_link(self, **body: Any) -> str:
        """A session cookie value, from a portal link of the buyer's key."""
        response = await self.link(**body)
        assert response.status == 201, await response.text()
        opened = await self.open((await response.json())["url"])
        assert opened.status == 303
        return session_cookie(opened)

    async def sign_in(self, key: str | None = None, **headers: str) -> ClientResponse:
        return await self.gateway.post(
            "/api/billing/session", json={"apiKey": key or self.key}, headers=headers
        )

    async def session(self, cookie: str | None) -> ClientResponse:
        return await self.gateway.get("/api/billing/session", headers=_cookie_header(cookie))

    async def csrf_token(self, cookie: str) -> str:
        response = await self.session(cookie)
        assert response.status == 200
        token: str = (await response.json())["csrfToken"]
        return token


def _link_path(url: str) -> str:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_BASE_URL
    return parts.path


def _cookie_header(cookie: str | None, csrf: str | None = None) -> dict[str, str]:
    headers = {} if cookie is None else {"Cookie": f"{COOKIE_NAME}={cookie}"}
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return headers


def session_cookie(response: ClientResponse) -> str:
    morsel = response.cookies[COOKIE_NAME]
    assert morsel.value
    return morsel.value


def _set_cookie_header(response: ClientResponse) -> str:
    [header] = [h for h in response.headers.getall("Set-Cookie") if h.startswith(COOKIE_NAME)]
    return header


async def open_portal(aiohttp_client: Any, settings: Any, stub: StripeStub) -> Portal:
    gateway: TestClient = await aiohttp_client(create_app(settings), cookie_jar=DummyCookieJar())
    portal = Portal(gateway, gateway, stub)
    portal.account_id, portal.key = await portal.add_buyer()
    return portal


@pytest.fixture
async def portal(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> Portal:
    return await open_portal(
        aiohttp_client, shop_settings(database_url, redis_url, stripe_stub), stripe_stub
    )


# -- portal links ------------------------------------------------------------------------


async def test_portal_link_opens_once_then_answers_410(portal: Portal) -> None:
    response = await portal.link()
    assert response.status == 201
    link = await response.json()
    assert link["object"] == "billing_portal.session"
    assert link["url"].startswith(PUBLIC_BASE_URL + "/credits/portal/")
    assert link["returnTo"] is None
    assert link["expiresAt"]

    first = await portal.open(link["url"])
    second = await portal.open(link["url"])

    assert first.status == 303
    assert first.headers["Location"] == "/credits"
    assert session_cookie(first)
    assert second.status == 410
    assert "Set-Cookie" not in second.headers
    page = await second.text()
    assert "This link has expired or was already used" in page
    assert 'href="/credits"' in page


async def test_portal_link_head_does_not_use_it_up(portal: Portal) -> None:
    url = (await (await portal.link()).json())["url"]

    head = await portal.gateway.head(urlsplit(url).path, allow_redirects=False)

    assert head.status == 200  # what a link checker or unfurler sees: the confirmation page
    assert "Set-Cookie" not in head.headers
    assert (await portal.open(url)).status == 303


async def test_portal_link_get_shows_a_confirmation_page_and_never_signs_in(
    portal: Portal,
) -> None:
    url = (await (await portal.link()).json())["url"]
    email = await portal.pool.fetchval(
        "SELECT email FROM accounts WHERE id = $1", portal.account_id
    )

    shown = [await portal.show(url), await portal.show(url)]
    opened = await portal.open(url, Origin=PUBLIC_BASE_URL)
    again = await portal.open(url, Origin=PUBLIC_BASE_URL)

    for page in shown:
        assert page.status == 200
        assert "Set-Cookie" not in page.headers
        html = await page.text()
        assert email in html
        assert "Continue to your Credits page" in html
        assert '<form method="post">' in html
        assert "form-action 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["Referrer-Policy"] == "same-origin"
    assert opened.status == 303
    assert session_cookie(opened)
    assert again.status == 410
    assert (await portal.show(url)).status == 410


async def test_portal_link_post_from_another_origin_is_refused_and_keeps_the_link(
    portal: Portal,
) -> None:
    url = (await (await portal.link()).json())["url"]

    refused = await portal.open(url, Origin="https://evil.example")
    null = await portal.open(url, Origin="null")
    opened = await portal.open(url, Origin=PUBLIC_BASE_URL)

    for answer in (refused, null):
        assert answer.status == 403
        assert (await answer.json())["error"]["code"] == "csrf_failed"
        assert "Set-Cookie" not in answer.headers
    assert opened.status == 303


@pytest.mark.parametrize(
    ("return_to", "location"),
    [("/a b", "/a%20b"), ("/ünï?x=é", "/%C3%BCn%C3%AF?x=%C3%A9"), ("/ok%20x", "/ok%20x")],
)
async def test_portal_link_location_is_percent_encoded(
    portal: Portal, return_to: str, location: str
) -> None:
    link = await (await portal.link(returnTo=return_to)).json()

    opened = await portal.open(link["url"])

    assert opened.status == 303
    assert opened.headers["Location"] == location


async def test_portal_link_concurrent_opens_sign_in_once(portal: Portal) -> None:
    url = (await (await portal.link()).json())["url"]

    answers = await asyncio.gather(*(portal.open(url) for _ in range(10)))

    assert sorted(a.status for a in answers) == [303] + [410] * 9


async def test_portal_link_token_is_stored_only_as_its_digest(portal: Portal) -> None:
    url = (await (await portal.link()).json())["url"]
    token = url.rsplit("/", 1)[1]
    redis = portal.gateway.app[appkeys.REDIS]

    [key] = [k async for k in redis.scan_iter("cg:v1:portal_link:*")]

    assert token not in key
    assert token not in await redis.get(key)
    assert 290 <= await redis.ttl(key) <= 300


async def test_portal_link_expired_answers_410(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = shop_settings(database_url, redis_url, stripe_stub, portal_link_ttl_s=1)
    portal = await open_portal(aiohttp_client, settings, stripe_stub)
    url = (await (await portal.link()).json())["url"]

    await asyncio.sleep(1.5)

    assert (await portal.open(url)).status == 410


async def test_portal_link_unknown_token_answers_410(portal: Portal) -> None:
    for url in (
        PUBLIC_BASE_URL + "/credits/portal/nope",
        PUBLIC_BASE_URL + "/credits/portal/" + "x" * 5000,
    ):
        assert (await portal.show(url)).status == 410
        assert (await portal.open(url)).status == 410


async def test_portal_link_needs_a_valid_key(portal: Portal) -> None:
    response = await portal.gateway.post("/api/billing/portal-sessions", json={})
    assert response.status == 401
    response = await portal.link(key="cg_live_" + "x" * 43)
    assert response.status == 401


async def test_portal_link_of_a_revoked_key_answers_410(portal: Portal) -> None:
    url = (await (await portal.link()).json())["url"]
    await portal.pool.execute("UPDATE api_keys SET revoked_at = now()")

    assert (await portal.show(url)).status == 410
    assert (await portal.open(url)).status == 410


async def test_portal_link_return_to_is_honoured(portal: Portal) -> None:
    response = await portal.link(returnTo="/credits?tab=usage")
    link = await response.json()
    assert link["returnTo"] == "/credits?tab=usage"

    opened = await portal.open(link["url"])

    assert opened.status == 303
    assert opened.headers["Location"] == "/credits?tab=usage"


async def test_portal_link_return_to_an_allowed_origin_is_honoured(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = shop_settings(
        database_url,
        redis_url,
        stripe_stub,
        return_to_origins=frozenset({"https://app.example.com"}),
    )
    portal = await open_portal(aiohttp_client, settings, stripe_stub)
    refused = await portal.link(returnTo="https://other.example.com/")
    link = await (await portal.link(returnTo="https://app.example.com/billing")).json()

    opened = await portal.open(link["url"])

    assert refused.status == 400
    assert opened.status == 303
    assert opened.headers["Location"] == "https://app.example.com/billing"


@pytest.mark.parametrize(
    "return_to", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "credits", 5]
)
async def test_portal_link_refuses_open_redirects(portal: Portal, return_to: object) -> None:
    response = await portal.link(returnTo=return_to)

    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "returnTo"
    assert await portal.pool.fetchval("SELECT 1") == 1
    redis = portal.gateway.app[appkeys.REDIS]
    assert [k async for k in redis.scan_iter("cg:v1:portal_link:*")] == []


async def test_portal_link_replaces_the_browsers_old_session(portal: Portal) -> None:
    old = await portal.signed_in_by_link()
    url = (await (await portal.link()).json())["url"]

    opened = await portal.open(url, cookie=old)

    new = session_cookie(opened)
    assert new != old
    assert (await portal.session(old)).status == 401
    assert (await portal.session(new)).status == 200


# -- the cookie ----------------------------------------------------------------------------


async def test_session_cookie_attributes(portal: Portal) -> None:
    url = (await (await portal.link()).json())["url"]
    opened = await portal.open(url)

    header = _set_cookie_header(opened)
    attributes = {part.strip().lower() for part in header.split(";")}

    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "path=/api/billing" in attributes
    assert "max-age=43200" in attributes
    assert "secure" not in attributes  # PUBLIC_BASE_URL is http here
    assert opened.headers["Cache-Control"] == "no-store"
    assert opened.headers["Referrer-Policy"] == "no-referrer"


async def test_session_cookie_is_secure_under_an_https_base_url(
    database_url: str, redis_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = shop_settings(
        database_url, redis_url, stripe_stub, public_base_url="https://gateway.test"
    )
    portal = await open_portal(aiohttp_client, settings, stripe_stub)
    response = await portal.sign_in()

    assert response.status == 201
    attributes = {part.strip().lower() for part in _set_cookie_header(response).split(";")}
    assert "secure" in attributes


async def test_session_data_lives_in_redis_with_the_session_ttl(portal: Portal) -> None:
    cookie = session_cookie(await portal.sign_in())
    redis = portal.gateway.app[appkeys.REDIS]

    [key] = [k async for k in redis.scan_iter("cg:v1:billing_session:*")]

    assert key == f"cg:v1:billing_session:{cookie}"
    assert 43190 <= await redis.ttl(key) <= 43200
    assert portal.key not in await redis.get(key)


# -- sign-in form, session, sign-out -------------------------------------------------------


async def test_sign_in_with_a_key_opens_a_session(portal: Portal) -> None:
    response = await portal.sign_in()

    assert response.status == 201
    body = await response.json()
    assert body["object"] == "billing_session"
    assert body["accountId"] == str(portal.account_id)
    assert body["via"] == "api_key"
    assert body["csrfToken"]
    assert portal.key not in await response.text()
    assert portal.key not in str(response.headers)
    current = await portal.session(session_cookie(response))
    assert current.status == 200
    assert (await current.json())["csrfToken"] == body["csrfToken"]


async def test_sign_in_with_a_bad_key_is_401_and_never_echoed(portal: Portal) -> None:
    bad = "cg_live_" + "Q" * 43

    response = await portal.sign_in(bad)

    assert response.status == 401
    assert "Set-Cookie" not in response.headers
    assert bad not in await response.text()
    assert (await response.json())["error"]["code"] == "invalid_api_key"


async def test_sign_in_from_another_origin_is_refused(portal: Portal) -> None:
    refused = await portal.sign_in(Origin="https://evil.example")
    allowed = await portal.sign_in(Origin=PUBLIC_BASE_URL)

    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "csrf_failed"
    assert "Set-Cookie" not in refused.headers
    assert allowed.status == 201


async def test_sign_in_from_the_requests_own_origin_is_accepted(portal: Portal) -> None:
    """The page opened as http://localhost:<port> while PUBLIC_BASE_URL names another host:
    the request's own origin (scheme://Host as it arrived) is ours too."""
    own = f"http://{portal.gateway.host}:{portal.gateway.port}"
    assert own != PUBLIC_BASE_URL

    by_host = await portal.sign_in(Origin=own)
    proxied = await portal.sign_in(Origin="http://credits.example", Host="credits.example")
    foreign = await portal.sign_in(Origin="http://evil.example", Host="credits.example")

    assert by_host.status == 201, await by_host.text()
    assert proxied.status == 201, await proxied.text()
    assert foreign.status == 403


async def test_session_without_a_cookie_is_401(portal: Portal) -> None:
    for cookie in (None, "unknown-session-id"):
        response = await portal.session(cookie)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "not_signed_in"
        assert "x-request-id" in response.headers


async def test_portal_session_reports_via_portal(portal: Portal) -> None:
    response = await portal.session(await portal.signed_in_by_link())

    assert response.status == 200
    assert (await response.json())["via"] == "portal"


async def test_sign_out_ends_the_session(portal: Portal) -> None:
    cookie = session_cookie(await portal.sign_in())
    token = await portal.csrf_token(cookie)

    response = await portal.gateway.post(
        "/api/billing/sign-out", headers=_cookie_header(cookie, token)
    )

    assert response.status == 200
    assert await response.json() == {"object": "billing_session", "signedIn": False}
    assert response.cookies[COOKIE_NAME].value == ""
    assert (await portal.session(cookie)).status == 401
    redis = portal.gateway.app[appkeys.REDIS]
    assert [k async for k in redis.scan_iter("cg:v1:billing_session:*")] == []


@pytest.mark.parametrize("csrf", [None, "wrong", ""])
async def test_sign_out_needs_the_csrf_token(portal: Portal, csrf: str | None) -> None:
    cookie = session_cookie(await portal.sign_in())

    response = await portal.gateway.post(
        "/api/billing/sign-out", headers=_cookie_header(cookie, csrf)
    )

    assert response.status == 403
    assert (await response.json())["error"]["code"] == "csrf_failed"
    assert (await portal.session(cookie)).status == 200


async def test_cookie_posts_from_another_origin_are_refused_even_with_the_token(
    portal: Portal,
) -> None:
    cookie = session_cookie(await portal.sign_in())
    token = await portal.csrf_token(cookie)
    evil = {**_cookie_header(cookie, token), "Origin": "https://evil.example"}
    ours = {**_cookie_header(cookie, token), "Origin": PUBLIC_BASE_URL}

    checkout = await _checkout(portal, evil)
    sign_out = await portal.gateway.post("/api/billing/sign-out", headers=evil)
    allowed = await _checkout(portal, ours)

    for refused in (checkout, sign_out):
        assert refused.status == 403
        assert (await refused.json())["error"]["code"] == "csrf_failed"
    assert (await portal.session(cookie)).status == 200
    assert allowed.status == 201, await allowed.text()
    assert await portal.pool.fetchval("SELECT count(*) FROM purchases") == 1


async def test_session_of_a_revoked_key_is_signed_out(portal: Portal) -> None:
    cookie = session_cookie(await portal.sign_in())
    async with portal.pool.acquire() as conn:
        await api_keys.revoke_api_key(conn, await conn.fetchval("SELECT max(id) FROM api_keys"))

    assert (await portal.session(cookie)).status == 401


# -- billing_caller on the purchase routes ---------------------------------------------------


async def _checkout(portal: Portal, headers: dict[str, str]) -> ClientResponse:
    return await portal.gateway.post(
        "/api/billing/checkout", json={"packageCode": "starter"}, headers=headers
    )


async def test_checkout_with_the_cookie_needs_the_csrf_token(portal: Portal) -> None:
    cookie = session_cookie(await portal.sign_in())
    token = await portal.csrf_token(cookie)

    missing = await _checkout(portal, _cookie_header(cookie))
    wrong_token = token[:-1] + ("B" if token.endswith("A") else "A")
    wrong = await _checkout(portal, _cookie_header(cookie, wrong_token))
    right = await _checkout(portal, _cookie_header(cookie, token))

    for refused in (missing, wrong):
        assert refused.status == 403
        assert (await refused.json())["error"]["code"] == "csrf_failed"
    assert right.status == 201, await right.text()
    rows = await portal.pool.fetch("SELECT account_id FROM purchases")
    assert [r["account_id"] for r in rows] == [portal.account_id]


async def test_checkout_with_a_bearer_key_needs_no_csrf_token(portal: Portal) -> None:
    response = await _checkout(portal, {"Authorization": f"Bearer {portal.key}"})

    assert response.status == 201


async def test_checkout_without_a_caller_is_401(portal: Portal) -> None:
    response = await _checkout(portal, {})

    assert response.status == 401


async def test_purchase_of_another_account_is_404_through_a_session(portal: Portal) -> None:
    theirs = await _checkout(portal, {"Authorization": f"Bearer {portal.key}"})
    purchase_id = (await theirs.json())["purchaseId"]
    _, other_key = await portal.add_buyer()
    mine = session_cookie(await portal.sign_in(other_key))
    owner = session_cookie(await portal.sign_in())

    other = await portal.gateway.get(
        f"/api/billing/purchases/{purchase_id}", headers=_cookie_header(mine)
    )
    own = await portal.gateway.get(
        f"/api/billing/purchases/{purchase_id}", headers=_cookie_header(owner)
    )

    assert other.status == 404
    assert (await other.json())["error"]["code"] == "purchase_not_found"
    assert own.status == 200
    assert (await own.json())["id"] == purchase_id


async def test_suspended_account_reads_but_cannot_check_out(portal: Portal) -> None:
    bought = await _checkout(portal, {"Authorization": f"Bearer {portal.key}"})
    purchase_id = (await bought.json())["purchaseId"]
    async with portal.pool.acquire() as conn:
        await suspend_account(conn, CLI_ACTOR, portal.account_id, reason="test")

    signed_in = await portal.sign_in()
    cookie = session_cookie(signed_in)
    token = await portal.csrf_token(cookie)
    read = await portal.gateway.get(
        f"/api/billing/purchases/{purchase_id}", headers=_cookie_header(cookie)
    )
    read_by_key = await portal.gateway.get(
        f"/api/billing/purchases/{purchase_id}",
        headers={"Authorization": f"Bearer {portal.key}"},
    )
    by_session = await _checkout(portal, _cookie_header(cookie, token))
    by_key = await _checkout(portal, {"Authorization": f"Bearer {portal.key}"})

    assert signed_in.status == 201
    assert (read.status, read_by_key.status) == (200, 200)
    for refused in (by_session, by_key):
        assert refused.status == 403
        assert (await refused.json())["error"]["code"] == "account_deactivated"
    assert await portal.pool.fetchval("SELECT count(*) FROM purchases") == 1


# -- Redis unreachable ---------------------------------------------------------------------


async def test_sessions_and_links_with_redis_down_answer_503(
    database_url: str, stripe_stub: StripeStub, aiohttp_client: Any
) -> None:
    settings = shop_settings(
        database_url,
        f"redis://127.0.0.1:{free_port()}/0",
        stripe_stub,
        redis_connect_timeout_s=0.5,
        settlement_poster_enabled=False,
    )
    portal = await open_portal(aiohttp_client, settings, stripe_stub)

    answers = [
        await portal.link(),
        await portal.sign_in(),
        await portal.session("some-session-id"),
        await portal.show(PUBLIC_BASE_URL + "/credits/portal/some-token"),
        await portal.open(PUBLIC_BASE_URL + "/credits/portal/some-token"),
        await _checkout(portal, _cookie_header("some-session-id", "token")),
    ]

    for response in answers:
        assert response.status == 503, await response.text()
        assert (await response.json())["error"]["code"] == "billing_unavailable"
        assert "Set-Cookie" not in response.headers
