"""The money path end to end: races, crashes and disconnects never lose or double a charge."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import openai
import pytest

from billing.metering.pricing import charge_millicredits, worst_case_millicredits
from devtools.localservices import free_port
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys
from tests.harness import GatewayHarness

MESSAGES = [{"role": "user", "content": "Say hello a hundred times."}]


async def test_race_fifty_requests_balance_for_k_exactly_k_succeed(gw: GatewayHarness, sim):
    k = 7
    card = gw.rate_cards.get("gpt-4o-mini")
    prompt = gw.app[gateway_keys.TOKENS].count_chat_prompt(MESSAGES, "gpt-4o-mini")
    hold = worst_case_millicredits(
        card, prompt_tokens=prompt, max_output_tokens=100, rounding_mode=gw.settings.rounding_mode
    )
    account, key = await gw.create_account(k * hold + hold - 1)
    # Slow answers: every reserve happens before any settlement releases balance.
    sim.set_default(Scenario(chunks=100, delay_s=0.005, prompt_tokens=prompt))
    client = gw.client(key)

    async def one():
        return await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=100
        )

    results = await asyncio.gather(*(one() for _ in range(50)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError) and r.status_code == 402]
    assert len(ok) == k
    assert len(refused) == 50 - k
    assert len(sim.requests) == k
    await gw.settled()
    balance = await gw.balance(account)
    assert balance == k * hold + hold - 1 - k * hold
    assert balance >= 0
    assert await gw.ledger_sum(account) == balance
    state = await gw.state(account)
    assert (state.held_millicredits, state.pending_millicredits) == (0, 0)


async def test_client_disconnect_mid_stream_charges_generated_and_releases_hold(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=200, delay_s=0.02))
    seen = 0
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gw.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            request_id = response.headers["x-request-id"]
            async for line in response.content:
                if b'"content":" hello"' in line:
                    seen += 1
                if seen == 5:
                    break
            response.close()
    await sim.wait_for_disconnects(1, timeout_s=10)
    assert sim.requests[-1].chunks_sent < 200
    await gw.settled()
    usage = await gw.usage(request_id)
    assert usage is not None
    assert usage["status"] == "client_disconnected"
    assert usage["usage_source"] == "estimated"
    generated = usage["completion_tokens"]
    assert 5 <= generated <= sim.requests[-1].chunks_sent
    card = gw.rate_cards.get("gpt-4o-mini")
    expected = charge_millicredits(
        card, prompt_tokens=usage["prompt_tokens"], completion_tokens=generated
    )
    assert usage["charged_millicredits"] == expected
    assert await gw.balance(account) == 1_000_000 - expected
    state = await gw.state(account)
    assert state.held_millicredits == 0


def _serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "creditgate.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(b"READY"), line
    return process


@pytest.mark.parametrize("writer_enabled", [False, True])
async def test_gateway_sigkill_after_delivery_charges_each_response_once(
    make_gateway, sim, writer_enabled
):
    # A harness only for accounts and assertions; the gateway under test is a subprocess.
    gw = await make_gateway(settlement_poster_enabled=False)
    account, key = await gw.create_account(50_000_000)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": gw.settings.database_url,
        "REDIS_URL": gw.settings.redis_url,
        "UPSTREAM_BASE_URL": sim.base_url,
        "UPSTREAM_API_KEY": "sk-upstream-operator",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ADMIN_PORT": str(free_port()),
        "METRICS_PORT": "0",  # never the default 9464 (a shared machine)
        "WORKERS": "1",  # SIGKILL below is the crash of the one serving process
        "SETTLEMENT_CLAIM_IDLE_MS": "300",
        "SETTLEMENT_POSTER_ENABLED": "true" if writer_enabled else "false",
    }
    process = await asyncio.to_thread(_serve, env)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    request_ids: list[str] = []
    try:
        for i in range(20):
            if i % 2:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
                )
                raw.parse()
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, stream=True
                )
                async for _ in raw.parse():
                    pass
            request_ids.append(raw.headers["x-request-id"])
    finally:
        process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.communicate)
        await client.close()
    # Restart with the poster on: it claims what the dead process read and posts the rest.
    env["SETTLEMENT_POSTER_ENABLED"] = "true"
    env["PORT"] = str(free_port())
    env["ADMIN_PORT"] = str(free_port())
    process = await asyncio.to_thread(_serve, env)
    try:
        await gw.settled(timeout_s=20)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.communicate, timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.communicate)
            raise AssertionError("creditgate serve did not stop within 40 s of SIGTERM") from None
    rows = await gw.pool.fetch(
        "SELECT request_id, charged_millicredits FROM usage_events WHERE account_id = $1",
        account,
    )
    assert sorted(r["request_id"] for r in rows) == sorted(request_ids)
    deductions = await gw.pool.fetch(
        "SELECT reference, amount_millicredits FROM ledger_entries "
        "WHERE account_id = $1 AND entry_type = 'deduction'",
        account,
    )
    assert sorted(d["reference"] for d in deductions) == sorted(request_ids)
    charged = sum(r["charged_millicredits"] for r in rows)
    assert charged > 0
    assert -sum(d["amount_millicredits"] for d in deductions) == charged
    assert await gw.balance(account) == 50_000_000 - charged
    assert await gw.ledger_sum(account) == await gw.balance(account)


async def test_client_disconnect_while_upstream_stalls_stops_upstream_at_once(gw, sim):
    account, key = await gw.create_account(1_000_000)
    sim.push(Scenario(chunks=50, hang_after_chunks=3))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            gw.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {key}"},
        )
        request_id = response.headers["x-request-id"]
        seen = 0
        async for line in response.content:
            seen += b'"content":" hello"' in line
            if seen == 3:
                break
        response.close()
    # The gateway is waiting on a silent upstream; the disconnect must still reach it.
    await sim.wait_for_disconnects(1, timeout_s=10)
    await gw.settled()
    usage = await gw.usage(request_id)
    assert usage["status"] == "client_disconnected"
    assert usage["completion_tokens"] == 3
    assert (await gw.state(account)).held_millicredits == 0
    assert await gw.balance(account) == 1_000_000 - usage["charged_millicredits"]
