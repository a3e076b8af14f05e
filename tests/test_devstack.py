"""``make run``'s simulated Stripe: started by ``devtools.devstack`` as a process, its
Checkout page, and its webhook deliveries (signed, retried on failure, given up and logged)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from admin_api.app import create_admin_app
from billing import ledger
from billing.admin_tokens import Role, create_admin_token
from billing.audit import CLI_ACTOR
from devtools import devstack
from devtools.localservices import free_port
from devtools.stripe_sim import StripeStub
from runtime import appkeys
from runtime.settings import Settings
from tests.harness import seed_database

SESSION_PARAMS = {
    "mode": "payment",
    "line_items[0][quantity]": "1",
    "line_items[0][price_data][currency]": "usd",
    "line_items[0][price_data][unit_amount]": "4999",
    "line_items[0][price_data][product_data][name]": "Professional: 52,490 credits",
    "success_url": "http://shop.test/credits?purchase=pur_1&session_id={CHECKOUT_SESSION_ID}",
    "cancel_url": "http://shop.test/credits?purchase=pur_1&checkout=cancelled",
}


class WebhookReceiver:
    """The admin service's webhook path on a loopback port: answers ``statuses`` in turn
    (then 200) and records each delivery's body and ``Stripe-Signature``."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[bytes, str]] = []
        self.port = free_port()
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((await request.read(), request.headers["Stripe-Signature"]))
        self.arrived.set()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(30):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(*statuses: int) -> WebhookReceiver:
        receiver = WebhookReceiver(*statuses)
        app = web.Application()
        app.router.add_post("/stripe/webhook", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", receiver.port).start()
        runners.append(runner)
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


def test_options_read_the_stripe_key_and_the_stand_ins_port() -> None:
    options = devstack._Options.from_env({"STRIPE_SIM_PORT": "18091", "STRIPE_API_KEY": "sk_x"})
    assert (options.stripe_sim_port, options.stripe_api_key) == (18091, "sk_x")
    defaults = devstack._Options.from_env({"STRIPE_API_KEY": ""})
    assert (defaults.stripe_sim_port, defaults.stripe_api_key) == (8091, None)
    with pytest.raises(devstack.DevstackError, match="STRIPE_SIM_PORT must be a TCP port"):
        devstack._Options.from_env({"STRIPE_SIM_PORT": "99999"})


def test_options_read_the_simulated_upstreams_port() -> None:
    assert devstack._Options.from_env({"SIMULATOR_PORT": "18090"}).simulator_port == 18090
    assert devstack._Options.from_env({}).simulator_port == 8090
    with pytest.raises(devstack.DevstackError, match="SIMULATOR_PORT must be a TCP port"):
        devstack._Options.from_env({"SIMULATOR_PORT": "0"})


async def test_devstack_stand_in_pays_on_its_checkout_page_and_retries_the_webhook(
    receiver_factory: Any,
) -> None:
    receiver = await receiver_factory(500)
    port = free_port()
    with contextlib.ExitStack() as stack:
        env = await asyncio.to_thread(
            devstack.start_stripe_sim, stack, dict(os.environ), port, receiver.port
        )
        try:
            await _pay_and_cancel(env, receiver)
        finally:
            await asyncio.to_thread(stack.close)


async def _pay_and_cancel(env: dict[str, str], receiver: WebhookReceiver) -> None:
    assert env["STRIPE_API_BASE"].startswith("http://127.0.0.1:")
    assert env["STRIPE_WEBHOOK_SECRETS"].startswith("whsec_sim_")
    api = {"Authorization": f"Bearer {env['STRIPE_API_KEY']}"}
    async with aiohttp.ClientSession() as http:
        paid_session = await _create_session(http, env, api)
        async with http.get(paid_session["url"]) as response:
            page = await response.text()
        assert response.status == 200
        assert "Simulated Stripe: no real payment" in page
        assert "Professional: 52,490 credits" in page and "49.99 USD" in page
        async with http.post(paid_session["url"] + "/pay", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == (
                f"http://shop.test/credits?purchase=pur_1&session_id={paid_session['id']}"
            )
        await receiver.wait_for(2)
        events = [
            stripe.Webhook.construct_event(body, signature, env["STRIPE_WEBHOOK_SECRETS"])
            for body, signature in receiver.received
        ]
        assert [e["type"] for e in events] == ["checkout.session.completed"] * 2
        assert events[0]["id"] == events[1]["id"]
        obj = events[1]["data"]["object"]
        assert (obj["id"], obj["payment_status"]) == (paid_session["id"], "paid")

        cancelled = await _create_session(http, env, api)
        async with http.post(cancelled["url"] + "/cancel", allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == SESSION_PARAMS["cancel_url"]
        async with http.get(
            f"{env['STRIPE_API_BASE']}/v1/checkout/sessions/{cancelled['id']}", headers=api
        ) as response:
            assert (await response.json())["status"] == "open"
    assert len(receiver.received) == 2


async def _create_session(
    http: aiohttp.ClientSession, env: dict[str, str], api: dict[str, str]
) -> dict[str, Any]:
    async with http.post(
        f"{env['STRIPE_API_BASE']}/v1/checkout/sessions", data=SESSION_PARAMS, headers=api
    ) as response:
        assert response.status == 200, await response.text()
        session: dict[str, Any] = await response.json()
    assert session["url"] == f"{env['STRIPE_API_BASE']}/checkout/{session['id']}"
    return session


async def test_stand_in_gives_up_on_a_dead_webhook_url_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = StripeStub(
        webhook_url=f"http://127.0.0.1:{free_port()}/stripe/webhook", retry_delays_s=(0, 0)
    )
    await stub.start()
    try:
        session = stub.create_session(
            {
                "line_items": [{"price_data": {"unit_amount": "999", "currency": "usd"}}],
                "success_url": "http://shop.test/ok?s={CHECKOUT_SESSION_ID}",
            }
        )
        with caplog.at_level(logging.WARNING, logger="devtools.stripe_sim"):
            async with aiohttp.ClientSession() as http:
                for _ in range(2):  # a double click pays, and notifies, once
                    async with http.post(
                        session["url"] + "/pay", allow_redirects=False
                    ) as response:
                        assert response.status == 303
                async with http.get(session["url"]) as response:
                    assert "This session is already paid" in await response.text()
            await stub.wait_for_deliveries()
    finally:
        await stub.stop()

    [delivery] = stub.deliveries
    assert not delivery.delivered
    assert len(delivery.attempts) == 3
    assert all(isinstance(a, str) and "ClientConnectorError" in a for a in delivery.attempts)
    assert f"{delivery.event_id} not delivered after 3 attempts" in caplog.text
    assert stub.session(session["id"])["payment_status"] == "paid"


async def test_stand_in_asynchronous_pay_completes_unpaid_then_settles(
    receiver_factory: Any,
) -> None:
    receiver = await receiver_factory()
    stub = StripeStub(webhook_url=f"http://127.0.0.1:{receiver.port}/stripe/webhook")
    stub.async_settle_delay_s = 0.2
    await stub.start()
    try:
        session = stub.create_session(
            {
                "line_items": [{"price_data": {"unit_amount": "999", "currency": "usd"}}],
                "success_url": "http://shop.test/ok",
            }
        )
        async with (
            aiohttp.ClientSession() as http,
            http.post(session["url"] + "/pay", allow_redirects=False) as response,
        ):
            assert response.status == 303
        assert stub.session(session["id"])["payment_status"] == "unpaid"
        await stub.wait_for_deliveries()
    finally:
        await stub.stop()

    events = [
        stripe.Webhook.construct_event(body, signature, stub.webhook_secret)
        for body, signature in receiver.received
    ]
    assert [(e["type"], e["data"]["object"]["payment_status"]) for e in events] == [
        ("checkout.session.completed", "unpaid"),
        ("checkout.session.async_payment_succeeded", "paid"),
    ]


def test_banner_says_which_stripe_payments_use(capsys: pytest.CaptureFixture[str]) -> None:
    simulated = devstack._Options.from_env({})
    devstack._print_payments({"STRIPE_API_BASE": "http://127.0.0.1:8091"}, simulated)
    test_mode = devstack._Options.from_env({"STRIPE_API_KEY": "sk_test_abc"})
    devstack._print_payments({}, test_mode)
    live_mode = devstack._Options.from_env({"STRIPE_API_KEY": "sk_live_abc"})
    devstack._print_payments({"STRIPE_WEBHOOK_SECRETS": "whsec_x"}, live_mode)

    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line]
    assert lines[0] == (
        "Payments: simulated Stripe at http://127.0.0.1:8091 (no real money; Pay and Cancel "
        "on its Checkout page)"
    )
    assert lines[1].startswith("Payments: Stripe test mode (STRIPE_API_KEY is set); ")
    assert "STRIPE_WEBHOOK_SECRETS is not set" in lines[1]
    assert lines[2].startswith("Payments: Stripe LIVE mode: real money")
    assert "stripe listen --forward-to http://127.0.0.1:8081/stripe/webhook" in lines[2]


def test_credits_page_without_portal_links_prints_the_page_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = devstack._Options.from_env({"PORT": "18080", "ADMIN_PORT": str(free_port())})

    devstack._print_credits_page(1, "cg_admin_x", options)

    out = capsys.readouterr().out
    assert out.startswith(
        "Credits page: http://127.0.0.1:18080/credits (sign in there with the demo API key; "
        "no portal link: "
    )


async def test_credits_page_prints_a_link_and_a_working_command_for_a_new_one(
    database_url: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed_database(database_url)
    options = devstack._Options.from_env({"PORT": "18080", "ADMIN_PORT": str(free_port())})
    settings = Settings(database_url=database_url, redis_url=redis_url, upstream_api_key="sk-x")
    runner = web.AppRunner(create_admin_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", options.admin_port).start()
    try:
        pool = runner.app[appkeys.DB_POOL]
        async with pool.acquire() as conn:
            account_id = await ledger.create_account(conn, "demo@example.com")
            token, _ = await create_admin_token(conn, CLI_ACTOR, role=Role.OPERATOR, name="t")

        await asyncio.to_thread(devstack._print_credits_page, account_id, token, options)

        out = capsys.readouterr().out
        assert "/credits/portal/" in out
        assert "Continue to your" in out
        command = out.split("A new link: ", 1)[1].strip()
        curl = await asyncio.create_subprocess_shell(
            command.replace("\\\n", " ") + " -s -o /dev/null -w '%{http_code}'",
            env={**os.environ, "ADMIN_TOKEN": token},
            stdout=asyncio.subprocess.PIPE,
        )
        status, _ = await curl.communicate()
        assert status.decode() == "201"
    finally:
        await runner.cleanup()
