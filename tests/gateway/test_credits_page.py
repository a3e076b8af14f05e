"""The Credits page's shell (``gateway.credits_page``): headers, the string catalogue, the
configured FAQ texts, the static files, ``returnTo``. The page's behaviour in a browser is in
tests/browser/."""

from __future__ import annotations

import json
import re

import aiohttp

from gateway.credits_page import CSP
from tests.harness import GatewayHarness

STRINGS = re.compile(r'<script type="application/json" id="strings">(.*?)</script>', re.S)


async def get(gw: GatewayHarness, path: str) -> tuple[int, dict[str, str], str]:
    url = gw.base_url.removesuffix("/v1") + path
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, dict(response.headers), await response.text()


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


async def test_unknown_purchase_is_404_with_the_page(gw: GatewayHarness) -> None:
    status, headers, page = await get(gw, "/credits?purchase=pur_unknown")

    assert status == 404
    assert headers["Content-Security-Policy"] == CSP
    assert 'data-status="error"' in page and "We could not find this purchase." in page


async def test_return_to_may_be_an_allowed_origin(make_gateway) -> None:
    gw = await make_gateway(return_to_origins=frozenset({"https://app.example.com"}))

    _, _, page = await get(gw, "/credits?returnTo=https://app.example.com/billing")
    assert 'href="https://app.example.com/billing">Return to app</a>' in page
    _, _, page = await get(gw, "/credits?returnTo=https://evil.example.com/billing")
    assert 'id="return-to"' not in page
