"""``runtime.return_to``: the one ``returnTo`` validator, its setting, and the 402/403
``buyCreditsUrl`` that carries it."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from runtime.errors import InvalidRequestError
from runtime.return_to import url_origin, validated_return_to
from runtime.settings import ConfigError, Settings
from tests.e2e.test_checkout_flow import open_shop, shop_settings  # stripe_stub: conftest

ORIGINS = frozenset({"https://app.example.com", "http://localhost:3000"})
_ENV = {
    "DATABASE_URL": "postgresql://x/y",
    "REDIS_URL": "redis://x",
    "UPSTREAM_API_KEY": "sk-x",
}


@pytest.mark.parametrize(
    "value",
    [
        "/",
        "/dashboard?tab=credits#top",
        "https://app.example.com/after",
        "https://APP.example.com:443/after?x=1",
        "http://localhost:3000/",
        "/" + "a" * 511,
    ],
)
def test_validated_return_to_accepts_paths_and_allowed_origins(value: str) -> None:
    assert validated_return_to(value, ORIGINS) == value


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example/x",
        "https://evil.example/",
        "https://app.example.com.evil.example/",
        "https://user@app.example.com/",
        "http://app.example.com/",  # scheme is part of the origin
        "http://localhost:3001/",
        "javascript:alert(1)",
        "/a\\b",
        "/a\nb",
        "/a\x7fb",
        "relative/path",
        "",
        "/" + "a" * 512,
        5,
        ["/x"],
    ],
)
def test_validated_return_to_rejects_others_with_param(value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validated_return_to(value, ORIGINS, param="returnPath")
    assert info.value.param == "returnPath"
    assert info.value.status == 400


def test_validated_return_to_without_origins_takes_paths_only() -> None:
    assert validated_return_to(None) is None
    assert validated_return_to("/credits") == "/credits"
    with pytest.raises(InvalidRequestError) as info:
        validated_return_to("https://app.example.com/")
    assert info.value.param == "returnTo"


def test_url_origin_normalizes_case_and_default_port() -> None:
    assert url_origin("HTTPS://App.Example.com:443/x") == "https://app.example.com"
    assert url_origin("http://a.test:8080") == "http://a.test:8080"
    assert url_origin("http://a.test:99999/") is None
    assert url_origin("ftp://a.test/") is None


def test_settings_return_to_origins_parsed_and_checked() -> None:
    settings = Settings.from_env(
        {**_ENV, "RETURN_TO_ORIGINS": "https://App.example.com/, http://localhost:3000"}
    )
    assert settings.return_to_origins == ORIGINS
    assert Settings.from_env(_ENV).return_to_origins == frozenset()
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**_ENV, "RETURN_TO_ORIGINS": "https://a.test/path,notaurl"})
    assert len(info.value.problems) == 2
    assert all("RETURN_TO_ORIGINS" in problem for problem in info.value.problems)


async def _refusal(gw, key: str, *, headers=None, query: str = "") -> dict:
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            f"{gw.base_url}/chat/completions{query}",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        )
        assert response.status in (402, 403)
        return (await response.json())["error"]


def _return_to(url: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get("returnTo")
    return values[0] if values else None


async def test_402_buy_credits_url_carries_header_or_query_return_to(make_gateway) -> None:
    gw = await make_gateway(return_to_origins=ORIGINS)
    _, key = await gw.create_account(5)
    credits_url = "http://127.0.0.1:9999/credits"

    plain = await _refusal(gw, key)
    by_header = await _refusal(gw, key, headers={"X-Return-To": "https://app.example.com/a?b=1"})
    by_query = await _refusal(gw, key, query="?returnTo=%2Fafter%3Fx%3D1")
    both = await _refusal(gw, key, headers={"X-Return-To": "/h"}, query="?returnTo=/q")

    assert plain["buyCreditsUrl"] == credits_url
    assert by_header["code"] == "insufficient_credits"
    assert by_header["buyCreditsUrl"].startswith(credits_url + "?returnTo=")
    assert _return_to(by_header["buyCreditsUrl"]) == "https://app.example.com/a?b=1"
    assert _return_to(by_query["buyCreditsUrl"]) == "/after?x=1"
    assert _return_to(both["buyCreditsUrl"]) == "/h"
    assert credits_url in by_query["message"]


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"X-Return-To": "https://evil.example/"}, ""),
        ({"X-Return-To": "//evil.example/"}, ""),
        ({}, "?returnTo=https%3A%2F%2Fevil.example%2F"),
        ({}, "?returnTo=%2Fa%5Cb"),
    ],
)
async def test_402_invalid_return_to_is_ignored(gw, headers, query) -> None:
    _, key = await gw.create_account(5)

    error = await _refusal(gw, key, headers=headers, query=query)

    assert error["code"] == "insufficient_credits"
    assert error["buyCreditsUrl"] == "http://127.0.0.1:9999/credits"


async def test_403_account_deactivated_buy_credits_url_carries_return_to(gw) -> None:
    account, key = await gw.create_account(1_000_000)
    await gw.pool.execute("UPDATE accounts SET status = 'suspended' WHERE id = $1", account)

    error = await _refusal(gw, key, headers={"X-Return-To": "/back"})

    assert error["code"] == "account_deactivated"
    assert _return_to(error["buyCreditsUrl"]) == "/back"


async def test_checkout_takes_return_to_or_return_path_through_the_validator(
    database_url,
    redis_url,
    stripe_stub,
    aiohttp_client,
) -> None:
    settings = shop_settings(
        database_url, redis_url, stripe_stub, return_to_origins=frozenset({"https://app.test"})
    )
    shop = await open_shop(aiohttp_client, settings, stripe_stub)

    by_url = await shop.started("starter", returnTo="https://app.test/after?x=1")
    by_path = await shop.started("starter", returnPath="/dashboard")
    refused = await shop.buy({"packageCode": "starter", "returnTo": "https://evil.test/"})
    refused_old = await shop.buy({"packageCode": "starter", "returnPath": "//evil.test/"})

    stored = await shop.pool.fetch(
        "SELECT return_path FROM purchases WHERE account_id = $1 ORDER BY id", shop.account_id
    )
    assert [row["return_path"] for row in stored] == ["https://app.test/after?x=1", "/dashboard"]
    assert by_url["status"] == by_path["status"] == "pending"
    assert refused.status == refused_old.status == 400
    assert (await refused.json())["error"]["param"] == "returnTo"
    assert (await refused_old.json())["error"]["param"] == "returnPath"
    assert (await refused_old.json())["error"]["code"] == "invalid_return_path"
