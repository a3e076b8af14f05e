"""``creditgate serve`` as the application's role, ``creditgate_app`` (docker-compose.yml's
gateway): in a database migrated by the superuser, every route and background task of the
service works with the grants the migrations give that role, and that role still cannot
rewrite the audit log or the ledger (the guarantee of the append-only tables rests on it)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest
from redis import asyncio as aioredis
from yarl import URL

from billing.reconciliation import DailyReconciliation
from devtools.localservices import PostgresServer, find_pg_bindir, free_port
from devtools.simulator import Simulator
from devtools.stripe_sim import TEST_API_KEY, WEBHOOK_SECRET, StripeStub, event_body, sign
from tests.harness import start_serve

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_ROLE = "creditgate_app"
STARTER_MC = 9_990_000
MESSAGES = [{"role": "user", "content": "Say hello."}]
# What PostgreSQL says when a role lacks a privilege (SQLSTATE 42501, insufficient_privilege).
_PERMISSION_ERROR = re.compile(r"permission denied|insufficient.?privilege|42501", re.IGNORECASE)


@pytest.fixture
async def fresh_database(pg_server: PostgresServer) -> AsyncIterator[str]:
    """An empty database of this test's own (not the migrated template), as the superuser."""
    name = f"t_app_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield pg_server.dsn_for(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _cli(env: dict[str, str], *args: str) -> bytes:
    """One ``creditgate`` command's output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-P", "-m", "creditgate.cli", *args],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    assert not _PERMISSION_ERROR.search(done.stderr.decode()), done.stderr
    return done.stdout


def _let_the_role_log_in(owner_url: str, password: str) -> None:
    """postgres/app_role.sql, run as the `migrate` service runs it."""
    subprocess.run(
        [
            str(find_pg_bindir() / "psql"),
            owner_url,
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"app_password={password}",
            "-f",
            str(REPO_ROOT / "postgres" / "app_role.sql"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def _eventually(probe: Any, what: str, timeout_s: float = 20) -> Any:
    """``await probe()`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := await probe()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)
    return value


class Admin:
    """The admin service of the process under test, called with one admin token."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str) -> None:
        self.http = http
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, status: int = 200, **kwargs: Any
    ) -> dict[str, Any]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.http.request(
            method, self.base_url + path, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            assert response.status == status, (method, path, response.status, body)
            return dict(orjson.loads(body)) if body else {}


async def _gateway_calls(
    http: aiohttp.ClientSession, gateway_url: str, key: str, broke_key: str
) -> list[str]:
    """Paid chat and stream, and a 402; returns the paid requests' ids."""
    request_ids = []
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key=key, max_retries=0
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=20
        )
        raw.parse()
        request_ids.append(raw.headers["x-request-id"])
        streamed = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, stream=True
        )
        async for _ in streamed.parse():
            pass
        request_ids.append(streamed.headers["x-request-id"])
    async with openai.AsyncOpenAI(
        base_url=gateway_url + "/v1", api_key=broke_key, max_retries=0
    ) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert refused.value.status_code == 402
    async with http.get(gateway_url + "/v1/models", headers=_bearer(key)) as response:
        assert response.status == 200
    return request_ids


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _deliver(http: aiohttp.ClientSession, admin: Admin, event: dict[str, Any]) -> None:
    """A Stripe event, signed, to the admin service's webhook (it must be taken)."""
    payload = event_body(event)
    async with http.post(
        admin.base_url + "/stripe/webhook",
        data=payload,
        headers={
            "Stripe-Signature": sign(payload, WEBHOOK_SECRET),
            "Content-Type": "application/json",
        },
    ) as response:
        assert response.status == 200, (event["type"], await response.text())


async def _balance(http: aiohttp.ClientSession, gateway_url: str, key: str) -> int:
    async with http.get(gateway_url + "/api/billing/me", headers=_bearer(key)) as response:
        assert response.status == 200, await response.text()
        return int((await response.json())["balanceMillicredits"])


async def _billing_api_calls(
    http: aiohttp.ClientSession,
    gateway_url: str,
    admin: Admin,
    stub: StripeStub,
    key: str,
    portal_url: str,
) -> None:
    """The Credits page's API; a purchase through Checkout, its return page, a refund and a
    dispute through the signed webhook; a billing session and a portal link."""
    for path in (
        "/api/billing/me",
        "/api/billing/usage",
        "/api/billing/ledger",
        "/api/billing/packages",
        f"/api/billing/statements/{datetime.now(UTC):%Y-%m}",
        f"/api/billing/statements/{datetime.now(UTC):%Y-%m}?format=csv",
        f"/api/billing/statements/{datetime.now(UTC):%Y-%m}?format=pdf",
    ):
        async with http.get(gateway_url + path, headers=_bearer(key)) as response:
            assert response.status == 200, (path, await response.text())
            await response.read()
    async with http.post(
        gateway_url + "/api/billing/estimate",
        json={"model": "gpt-4o-mini", "inputTokens": 1000, "outputTokens": 1000},
        headers=_bearer(key),
    ) as response:
        assert response.status == 200, await response.text()
    before = await _balance(http, gateway_url, key)

    async with http.post(
        gateway_url + "/api/billing/checkout",
        json={"packageCode": "starter"},
        headers=_bearer(key),
    ) as response:
        assert response.status == 201, await response.text()
        checkout = await response.json()
    session_id = checkout["checkoutSessionId"]
    await _deliver(http, admin, stub.event("checkout.session.completed", stub.pay(session_id)))
    assert await _balance(http, gateway_url, key) == before + STARTER_MC
    # The return from Checkout (the Credits page applies the session too: already paid).
    success_url = stub.sessions[session_id]["success_url"]
    async with http.get(success_url.replace("{CHECKOUT_SESSION_ID}", session_id)) as response:
        assert response.status == 200, await response.text()
    stub.refund(session_id, 333)
    await _deliver(http, admin, stub.event("charge.refunded", stub.charge_of(session_id)))
    assert await _balance(http, gateway_url, key) == before + STARTER_MC - STARTER_MC * 333 // 999
    await _deliver(
        http, admin, stub.event("charge.dispute.created", stub.dispute(session_id, amount=100))
    )

    async with http.post(gateway_url + "/api/billing/session", json={"apiKey": key}) as response:
        assert response.status == 201, await response.text()
    async with http.get(gateway_url + "/api/billing/session") as response:
        assert response.status == 200, await response.text()
    async with http.get(portal_url) as response:
        assert response.status == 200, await response.text()
    async with http.post(portal_url, allow_redirects=False) as response:
        assert response.status == 303, await response.text()


async def _admin_calls(admin: Admin) -> dict[str, Any]:
    """Every kind of admin change; returns the account, its keys and the broke account's key."""
    account = await admin.call(
        "POST",
        "/admin/v1/accounts",
        201,
        json={"email": "ann@example.com", "externalId": "crm-42", "startingCredits": "100"},
    )
    account_id = account["id"]
    await admin.call(
        "POST",
        f"/admin/v1/accounts/{account_id}/adjustments",
        json={"amountCredits": "25.5", "direction": "credit", "reason": "goodwill"},
        headers={"Idempotency-Key": "app-role-adjustment"},
    )
    await admin.call(
        "PATCH", f"/admin/v1/accounts/{account_id}", json={"dailySpendCapCredits": "1000"}
    )
    issued = await admin.call(
        "POST", f"/admin/v1/accounts/{account_id}/keys", 201, json={"name": "production"}
    )
    spare = await admin.call("POST", f"/admin/v1/accounts/{account_id}/keys", 201, json={})
    await admin.call("PATCH", f"/admin/v1/keys/{spare['id']}", json={"requestsPerMinute": 60})
    await admin.call("POST", f"/admin/v1/keys/{spare['id']}/revoke")

    broke = await admin.call("POST", "/admin/v1/accounts", 201, json={"email": "bo@example.com"})
    broke_key = await admin.call("POST", f"/admin/v1/accounts/{broke['id']}/keys", 201, json={})
    await admin.call("POST", f"/admin/v1/accounts/{broke['id']}/suspend", json={"reason": "t"})
    await admin.call("POST", f"/admin/v1/accounts/{broke['id']}/reactivate")

    await admin.call(
        "POST",
        "/admin/v1/rate-cards",
        201,
        json={
            "model": "gpt-4o-mini",
            "modelKind": "chat",
            "inputCreditsPer1kTokens": "2.400",
            "cachedInputCreditsPer1kTokens": "1.200",
            "outputCreditsPer1kTokens": "9.600",
            "maxOutputTokens": 16384,
            "displayLabel": "Eco",
        },
    )
    flag = "/admin/v1/flags/billing.low_balance_threshold_credits"
    await admin.call("PUT", flag, json={"value": 250})
    await admin.call("DELETE", flag)
    await admin.call("PATCH", "/admin/v1/packages/professional", json={"badge": "Popular"})
    await admin.call(
        "POST",
        "/admin/v1/packages",
        201,
        json={
            "code": "team",
            "name": "Team",
            "priceMinorUnits": "19900",
            "currency": "usd",
            "baseCredits": "199000",
            "bonusCredits": "20000",
        },
    )
    await admin.call("POST", "/admin/v1/packages/team/deactivate")
    token = await admin.call("POST", "/admin/v1/tokens", 201, json={"name": "ci", "role": "viewer"})
    await admin.call("PATCH", f"/admin/v1/tokens/{token['id']}", json={"name": "ci deploys"})
    await admin.call("POST", f"/admin/v1/tokens/{token['id']}/revoke")
    portal = await admin.call(
        "POST",
        f"/admin/v1/accounts/{account_id}/portal-sessions",
        201,
        json={"returnTo": "/credits"},
    )
    for path in (
        "/admin/v1/me",
        "/admin/v1/accounts",
        f"/admin/v1/accounts/{account_id}",
        f"/admin/v1/accounts/{account_id}/keys",
        f"/admin/v1/accounts/{account_id}/ledger",
        f"/admin/v1/accounts/{account_id}/usage",
        "/admin/v1/ledger",
        "/admin/v1/usage",
        "/admin/v1/audit-log",
        "/admin/v1/flags",
        "/admin/v1/rate-cards",
        "/admin/v1/rate-cards/gpt-4o-mini/history",
        "/admin/v1/packages",
        "/admin/v1/tokens",
        "/admin/v1/reconciliation-runs",
    ):
        await admin.call("GET", path)
    return {
        "account_id": account_id,
        "key": issued["key"],
        "broke_key": broke_key["key"],
        "portal_url": portal["url"],
    }


async def _metric(http: aiohttp.ClientSession, metrics_url: str, name: str) -> float | None:
    async with http.get(metrics_url) as response:
        text = await response.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found[1])


async def _exercise(
    app_pool: asyncpg.Pool,
    redis: aioredis.Redis,
    stripe_stub: StripeStub,
    token: str,
    port: int,
    admin_port: int,
    metrics_port: int,
) -> None:
    """Everything the running service does, each call succeeding; then the daily run."""
    gateway_url = f"http://127.0.0.1:{port}"
    # unsafe: keep the billing session cookie of an IP address host (127.0.0.1).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        admin = Admin(http, f"http://127.0.0.1:{admin_port}", token)
        made = await _admin_calls(admin)
        request_ids = await _gateway_calls(http, gateway_url, made["key"], made["broke_key"])

        async def posted() -> bool:
            count = await app_pool.fetchval(
                "SELECT count(*) FROM usage_events WHERE request_id = ANY($1::text[])",
                request_ids,
            )
            return bool(count == len(request_ids))

        # Before the balance is compared across a purchase: a settlement posted in between
        # would move it (one did, under two workers).
        await _eventually(posted, "the settlements were not posted")
        await _billing_api_calls(
            http, gateway_url, admin, stripe_stub, made["key"], made["portal_url"]
        )
        await admin.call("POST", "/admin/v1/reconciliation-runs", 201, json={})

        # The fleet gauges' refresh reads what Postgres holds now.
        outstanding = await app_pool.fetchval("SELECT sum(balance_millicredits) FROM accounts")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

        async def gauge_is_current() -> bool:
            value = await _metric(http, metrics_url, "creditgate_outstanding_millicredits")
            return value == outstanding

        await _eventually(gauge_is_current, "the fleet gauges were not refreshed")

    # The service's daily run, as the role: the advisory lock, the check and the insert.
    daily = DailyReconciliation(app_pool, redis)
    assert await daily.run_once() is not None
    assert await daily.run_once() is None  # today's run is recorded
    users = await app_pool.fetch(
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database()"
    )
    assert {row["usename"] for row in users} == {APP_ROLE}


async def test_serve_runs_as_creditgate_app_without_a_permission_error(
    fresh_database: str,
    redis_url: str,
    sim: Simulator,
    stripe_stub: StripeStub,
    tmp_path: Path,
) -> None:
    base_env = {**os.environ, "REDIS_URL": redis_url, "UPSTREAM_API_KEY": "sk-upstream"}
    # The owner migrates, then lets the role log in: docker-compose.yml's `migrate` service.
    _cli({**base_env, "DATABASE_URL": fresh_database}, "migrate")
    password = secrets.token_hex(16)
    await asyncio.to_thread(_let_the_role_log_in, fresh_database, password)
    app_url = str(URL(fresh_database).with_user(APP_ROLE).with_password(password))
    app_env = {**base_env, "DATABASE_URL": app_url}
    # What an operator runs in the gateway's container (as the role, like the service).
    _cli(app_env, "seed")
    made = _cli(app_env, "admin", "create-token", "--role", "admin", "--name", "ops")
    token = orjson.loads(made)["token"]

    port, admin_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **app_env,
        "UPSTREAM_BASE_URL": sim.base_url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ADMIN_PORT": str(admin_port),
        # A free port of its own (never the default 9464): the fleet gauges are read there.
        "METRICS_PORT": str(metrics_port),
        "METRICS_DB_REFRESH_S": "1",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "PURCHASES_ENABLED": "true",
        "STRIPE_API_KEY": TEST_API_KEY,
        "STRIPE_API_BASE": stripe_stub.base_url,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
    }
    err = tmp_path / "serve.err"
    async with asyncpg.create_pool(app_url, min_size=1, max_size=2) as app_pool:
        redis = aioredis.from_url(redis_url)
        process = await start_serve(env, tmp_path / "serve.out", err)
        try:
            await _exercise(app_pool, redis, stripe_stub, token, port, admin_port, metrics_port)
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 30)
            await redis.aclose()

        stderr = await asyncio.to_thread(err.read_text)
        assert process.returncode == 0, stderr
        assert not _PERMISSION_ERROR.search(stderr), stderr
        # The append-only tables: the role is refused before any trigger runs.
        for statement in (
            "UPDATE audit_log SET actor_name = 'someone else'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
            "UPDATE ledger_entries SET amount_millicredits = 0",
            "DELETE FROM ledger_entries",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await app_pool.execute(statement)
        assert await app_pool.fetchval("SELECT count(*) FROM audit_log") > 10

    # What an operator runs in the gateway's container besides: reconciliation and reports.
    assert orjson.loads(_cli(app_env, "reconcile"))["ok"] is True
    month = f"{datetime.now(UTC):%Y-%m}"
    for report in ("liability", "revenue"):
        assert _cli(app_env, "report", report, "--month", month).count(b"\n") > 1
