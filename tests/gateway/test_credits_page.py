"""The Credits page's shell (``gateway.credits_page``): headers, the string catalogue, the
configured FAQ texts, the static files, ``returnTo``. The page's behaviour in a browser is in
tests/browser/."""

from __future__ import annotations

import json
import re
import uuid

import aiohttp

from billing.api_keys import KEY_PREFIX
from billing.purchases.packages import get_package
from billing.purchases.purchase_records import attach_checkout_session, create_purchase
from gateway.credits_page import CSP
from tests.harness import GatewayHarness

STRINGS = re.compile(r'<script type="application/json" id="strings">(.*?)</script>', re.S)


async def get(gw: GatewayHarness, path: str) -> tuple[int, dict[str, str], str]:
    url = gw.base_url.removesuffix("/v1") + path
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.text()


async def test_head_of_the_page_answers_like_get(gw: GatewayHarness) -> None:
    url = gw.base_url.removesuffix("/v1") + "/credits"
    async with aiohttp.ClientSession() as session, session.head(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.headers["Content-Security-Policy"] == CSP


async def test_page_has_the_security_headers_and_no_inline_script_or_style(
    gw: GatewayHarness,
) -> None:
    status, headers, page = await get(gw, "/credits")

    assert status == 200
    assert headers["Content-Security-Policy"] == CSP
    assert "unsafe-inline" not in CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    scripts = re.findall(r"<script([^>]*)>", page)
    assert scripts == [
        ' type="application/json" id="strings"',
        ' src="/credits/static/credits.js" defer',
    ]
    assert "<style" not in page and " style=" not in page and "onclick" not in page


async def test_strings_are_embedded_and_rendered_from_one_catalogue(gw: GatewayHarness) -> None:
    _, _, page = await get(gw, "/credits")

    strings = json.loads(STRINGS.search(page).group(1))
    assert strings["balance"]["usdNote"] == "USD equivalent is approximate"
    assert strings["faq"]["refundA"] == (
        "Unused credits are refundable within 14 days of purchase; contact support."
    )
    assert strings["faq"]["expiryA"] == "Credits do not expire."
    assert f'<h2 id="faq-heading">{strings["faq"]["heading"]}</h2>' in page
    assert "Credits do not expire." in page


async def test_faq_texts_are_shown_as_configured_and_escaped(make_gateway) -> None:
    gw = await make_gateway(
        credits_refund_policy_text="No refunds </script><b>ever</b>",
        credits_expiry_text="Credits expire after 12 months & more.",
    )

    _, _, page = await get(gw, "/credits")

    assert "No refunds &lt;/script&gt;&lt;b&gt;ever&lt;/b&gt;" in page
    assert "Credits expire after 12 months &amp; more." in page
    assert "</script><b>" not in page
    strings = json.loads(STRINGS.search(page).group(1))
    assert strings["faq"]["refundA"] == "No refunds </script><b>ever</b>"


async def test_static_files_are_served_with_their_types(gw: GatewayHarness) -> None:
    status, headers, body = await get(gw, "/credits/static/credits.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "BigInt" in body
    status, headers, _ = await get(gw, "/credits/static/credits.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")

    for name in ("missing.js", "..%2Fstrings.json", "credits.html", "%2E%2E%2Fcredits.js"):
        status, _, body = await get(gw, f"/credits/static/{name}")
        assert status == 404, name
        assert "error" in json.loads(body)


async def test_return_to_link_only_for_a_valid_target(gw: GatewayHarness) -> None:
    _, _, page = await get(gw, "/credits?returnTo=/app/settings%3Ftab%3D1")
    assert '<a id="return-to" class="button secondary" href="/app/settings?tab=1">' in page

    for bad in ("//evil.example/", "https://evil.example/", "javascript:alert(1)"):
        status, _, page = await get(gw, f"/credits?returnTo={bad}")
        assert status == 200 and 'id="return-to"' not in page, bad


async def started_purchase(gw: GatewayHarness, return_path: str) -> tuple[str, str]:
    """A pending Starter purchase of a new account with a Checkout Session: (id, session id)."""
    account_id, _ = await gw.create_account()
    async with gw.pool.acquire() as conn:
        package = await get_package(conn, "starter")
        purchase = await create_purchase(
            conn, account_id=account_id, package=package, return_path=return_path
        )
        session_id = f"cs_test_{uuid.uuid4().hex}"
        await attach_checkout_session(
            conn, purchase.id, checkout_session_id=session_id, checkout_url="https://x.test/c"
        )
    return purchase.public_id, session_id


def shows_nothing_about_it(page: str) -> bool:
    """No amount, status text or stored returnTo of the purchase in the page (the notice is
    hidden and empty)."""
    notice = re.search(r'<section id="purchase-notice"[^>]*>.*?</section>', page, re.S)
    assert notice is not None
    return (
        "9,990" not in page
        and "/app/private" not in page
        and 'id="return-to"' not in page
        and 'data-status=""' in notice.group(0)
        and " hidden>" in notice.group(0)
        and '<p id="purchase-text"></p>' in notice.group(0)
    )


async def test_purchase_details_only_on_its_own_checkout_success_return(
    gw: GatewayHarness,
) -> None:
    public_id, session_id = await started_purchase(gw, "/app/private?tab=billing")

    # Anyone holding only the public id (no session, another account: the page cannot tell):
    # nothing about the purchase; the script asks the API, which answers only its owner.
    status, _, page = await get(gw, f"/credits?purchase={public_id}")
    assert status == 200 and shows_nothing_about_it(page)
    assert f'data-purchase-id="{public_id}"' in page and 'data-lookup="true"' in page
    for wrong in ("cs_test_guess", session_id[:-1], "%00", ""):
        status, _, page = await get(gw, f"/credits?purchase={public_id}&session_id={wrong}")
        assert status == 200 and shows_nothing_about_it(page), wrong
    # A cancel return: the polite message, without amounts or the stored returnTo.
    status, _, page = await get(gw, f"/credits?purchase={public_id}&checkout=cancelled")
    assert status == 200 and "Checkout was cancelled." in page
    assert "9,990" not in page and "/app/private" not in page and 'data-lookup="false"' in page

    # Checkout's success return (Stripe's session id is the proof): status, amount, returnTo.
    status, _, page = await get(gw, f"/credits?purchase={public_id}&session_id={session_id}")
    assert status == 200
    assert 'data-status="pending"' in page and 'data-follow="true"' in page
    assert "9,990.00 credits will be added" in page
    assert '<a id="return-to" class="button secondary" href="/app/private?tab=billing">' in page


async def test_unknown_or_malformed_purchase_renders_the_page_without_a_notice(
    gw: GatewayHarness,
) -> None:
    for query in (
        "purchase=pur_unknown",
        "purchase=pur_unknown&session_id=cs_test_x",
        "purchase=%00&session_id=cs_test_x",
        "purchase=pur_x%00&session_id=%00",
        "purchase=%EF%BC%91",
    ):
        status, headers, page = await get(gw, f"/credits?{query}")

        assert status == 200, query
        assert headers["Content-Security-Policy"] == CSP
        assert shows_nothing_about_it(page), query


async def test_key_hint_names_our_key_prefix(gw: GatewayHarness) -> None:
    _, _, page = await get(gw, "/credits")

    strings = json.loads(STRINGS.search(page).group(1))
    assert strings["signIn"]["keyHint"].startswith(f"Your key starts with {KEY_PREFIX}.")
    assert f'<p id="api-key-hint" class="hint">Your key starts with {KEY_PREFIX}.' in page
    assert "sk-" not in page


async def test_scroll_regions_are_focusable_and_named(gw: GatewayHarness) -> None:
    _, _, page = await get(gw, "/credits")

    regions = re.findall(r'<div class="table-scroll"([^>]*)>', page)
    assert regions == [
        ' tabindex="0" role="region" aria-label="Rate card table"',
        ' tabindex="0" role="region" aria-label="Usage table"',
        ' tabindex="0" role="region" aria-label="Ledger table"',
    ]


async def test_return_to_may_be_an_allowed_origin(make_gateway) -> None:
    gw = await make_gateway(return_to_origins=frozenset({"https://app.example.com"}))

    _, _, page = await get(gw, "/credits?returnTo=https://app.example.com/billing")
    assert 'href="https://app.example.com/billing">Return to app</a>' in page
    _, _, page = await get(gw, "/credits?returnTo=https://evil.example.com/billing")
    assert 'id="return-to"' not in page
