"""The gateway's metrics after scripted traffic: each moves by exactly what the requests and
their usage rows in Postgres say (``gateway.traffic_metrics``, ``gateway.integrity_metrics``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devtools.localservices import free_port
from devtools.simulator import Scenario
from gateway import appkeys as gateway_keys
from gateway.traffic_metrics import upstream_cost_nano_usd
from gateway.usage import Usage
from runtime import appkeys
from runtime.supervision import cancel_and_wait, supervise
from tests.harness import GatewayHarness

HI = [{"role": "user", "content": "hi"}]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gw: GatewayHarness) -> Samples:
    """Every sample of the gateway app's registry, parsed from Prometheus's text format."""
    text = generate_latest(gw.app[appkeys.METRICS]).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_metrics_after_scripted_traffic_move_by_exactly_the_usage_rows(gw, sim) -> None:
    _, key = await gw.create_account(10_000_000)
    _, poor_key = await gw.create_account(5)
    client = gw.client(key)
    before = scrape(gw)

    sim.push(Scenario(prompt_tokens=1_000, cached_tokens=400))
    chat = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    streamed_id = stream.response.headers["x-request-id"]
    assert [chunk async for chunk in stream]
    embedding = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="some text"
    )
    with pytest.raises(openai.APIStatusError) as refused:
        await gw.client(poor_key).chat.completions.create(
            model="gpt-4o", messages=HI, max_tokens=100
        )
    assert refused.value.status_code == 402
    await gw.settled()
    after = scrape(gw)

    request_ids = [chat.headers["x-request-id"], streamed_id, embedding.headers["x-request-id"]]
    rows = await gw.pool.fetch(
        "SELECT * FROM usage_events WHERE request_id = ANY($1::text[])", request_ids
    )
    assert len(rows) == 3

    def requests(endpoint: str, model: str, status: str) -> float:
        return moved(
            before,
            after,
            "creditgate_requests_total",
            endpoint=endpoint,
            model=model,
            status=status,
        )

    assert requests("chat.completions", "gpt-4o-mini", "200") == 2
    assert requests("embeddings", "text-embedding-3-small", "200") == 1
    assert requests("chat.completions", "gpt-4o", "402") == 1
    assert (
        moved(before, after, "creditgate_payment_required_total", reason="insufficient_credits")
        == 1
    )

    tokens: Counter[tuple[str, str]] = Counter()
    deducted: Counter[str] = Counter()
    cost_nano_usd: Counter[str] = Counter()
    for row in rows:
        model = row["model"]
        tokens[model, "input"] += row["prompt_tokens"] - row["cached_tokens"]
        tokens[model, "cached_input"] += row["cached_tokens"]
        tokens[model, "output"] += row["completion_tokens"]
        deducted[model] += row["charged_millicredits"]
        usage = Usage(row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"])
        cost_nano_usd[model] += upstream_cost_nano_usd(gw.rate_cards.get(model), usage)
    assert tokens["gpt-4o-mini", "cached_input"] == 400
    for (model, kind), count in tokens.items():
        assert moved(before, after, "creditgate_tokens_total", model=model, type=kind) == count
    for model, charged in deducted.items():
        assert charged > 0
        assert moved(before, after, "creditgate_deducted_millicredits_total", model=model) == (
            charged
        )
        cost_usd = moved(before, after, "creditgate_upstream_cost_usd_total", model=model)
        assert cost_nano_usd[model] > 0
        assert round(cost_usd * 1_000_000_000) == cost_nano_usd[model]

    for name in ("creditgate_request_duration_seconds", "creditgate_time_to_first_byte_seconds"):
        assert moved(before, after, name + "_count", endpoint="chat.completions") == 3
        assert moved(before, after, name + "_count", endpoint="embeddings") == 1
    upstream = "creditgate_upstream_duration_seconds_count"
    assert moved(before, after, upstream, endpoint="chat.completions") == 2  # not the 402
    assert moved(before, after, upstream, endpoint="embeddings") == 1

    assert value(after, "creditgate_holds_open") == 0
    assert value(after, "creditgate_held_millicredits") == 0
    assert moved(before, after, "creditgate_settlements_posted_total") == 3
    batches = moved(before, after, "creditgate_settlement_batches_total", outcome="posted")
    assert 1 <= batches <= 3
    assert moved(before, after, "creditgate_settlement_batch_duration_seconds_count") == batches


async def test_holds_open_counts_a_hold_until_it_settles(gw, sim) -> None:
    _, key = await gw.create_account(10_000_000)
    sim.push(Scenario(chunks=3, delay_s=0.3))
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True, max_tokens=100
    )
    chunks = aiter(stream)
    await anext(chunks)
    # The first chunk is out, the rest not generated yet: the hold is open.
    samples = scrape(gw)
    assert value(samples, "creditgate_holds_open") == 1
    assert value(samples, "creditgate_held_millicredits") > 0
    assert [chunk async for chunk in chunks]
    await _until(lambda: _holds_open_is(gw, 0))


async def _holds_open_is(gw: GatewayHarness, count: int) -> bool:
    return value(scrape(gw), "creditgate_holds_open") == count


async def test_holds_expired_counts_a_hold_voided_by_the_sweeper(gw) -> None:
    account, _ = await gw.create_account(1_000_000)
    before = value(scrape(gw), "creditgate_holds_expired_total")
    await gw.holds.reserve(account, 700, request_id="expiring", ttl_s=0.001)

    async def expired() -> bool:
        return value(scrape(gw), "creditgate_holds_expired_total") == before + 1

    await _until(expired)  # the gateway's sweeper runs every 0.2 s here
    assert (await gw.state(account)).held_millicredits == 0


async def test_restarts_count_a_supervised_loop_that_raised(gw) -> None:
    failures = [RuntimeError("boom")]

    async def run() -> None:
        if failures:
            raise failures.pop()
        await asyncio.Event().wait()

    task = asyncio.create_task(
        supervise(
            "flaky-loop",
            run,
            initial_backoff_s=0.01,
            restarts=gw.app[appkeys.TASK_RESTARTS],
        )
    )
    try:

        async def restarted() -> bool:
            return (
                not failures
                and value(
                    scrape(gw), "creditgate_background_task_restarts_total", task="flaky-loop"
                )
                == 1
            )

        await _until(restarted)
    finally:
        await cancel_and_wait(task)


async def test_dependency_up_is_0_for_a_redis_that_does_not_answer(gw) -> None:
    integrity = gw.app[gateway_keys.INTEGRITY]
    await integrity.probe_dependencies(gw.pool, gw.redis)
    samples = scrape(gw)
    assert value(samples, "creditgate_dependency_up", dependency="postgres") == 1
    assert value(samples, "creditgate_dependency_up", dependency="redis") == 1

    closed = aioredis.from_url(f"redis://127.0.0.1:{free_port()}")
    try:
        await integrity.probe_dependencies(gw.pool, closed)
    finally:
        await closed.aclose()
    samples = scrape(gw)
    assert value(samples, "creditgate_dependency_up", dependency="redis") == 0
    assert value(samples, "creditgate_dependency_up", dependency="postgres") == 1


async def test_settlement_backlog_counts_unposted_outbox_entries(make_gateway, sim) -> None:
    gw = await make_gateway(settlement_poster_enabled=False)
    _, key = await gw.create_account(1_000_000)
    client = gw.client(key)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    await asyncio.sleep(0.05)  # the oldest entry is at least this old
    await gw.app[gateway_keys.INTEGRITY].read_settlement_backlog(gw.redis)
    samples = scrape(gw)
    assert value(samples, "creditgate_settlement_backlog_entries") == 2
    assert 0.05 <= value(samples, "creditgate_settlement_oldest_unposted_age_seconds") < 60


async def test_client_gone_mid_stream_counts_499_and_its_charge(gw, sim) -> None:
    _, key = await gw.create_account(10_000_000)
    before = scrape(gw)
    sim.push(Scenario(chunks=5, hang_after_chunks=2))
    stream = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True, max_tokens=100
    )
    request_id = stream.response.headers["x-request-id"]
    await anext(aiter(stream))
    await stream.close()  # the upstream stalls; the client leaves

    async def counted() -> bool:
        return (
            value(
                scrape(gw),
                "creditgate_requests_total",
                endpoint="chat.completions",
                model="gpt-4o-mini",
                status="499",
            )
            == 1
        )

    await _until(counted)
    await gw.settled()
    row = await gw.usage(request_id)
    assert row["status"] == "client_disconnected"
    after = scrape(gw)
    deducted = moved(before, after, "creditgate_deducted_millicredits_total", model="gpt-4o-mini")
    assert deducted == row["charged_millicredits"] > 0
    assert value(after, "creditgate_holds_open") == 0


async def test_checkout_answers_are_counted_by_status(gw) -> None:
    """The purchase availability SLO reads the checkout route's answers: a refusal (401) and
    a 503 (no Stripe configured here) each count once, under their status."""
    _, key = await gw.create_account(0)
    before = scrape(gw)
    statuses = []
    async with aiohttp.ClientSession(gw.base_url.removesuffix("/v1")) as session:
        for bearer in (key, "sk-not-a-key"):
            async with session.post(
                "/api/billing/checkout",
                json={"packageCode": "starter"},
                headers={"Authorization": f"Bearer {bearer}"},
            ) as response:
                statuses.append(response.status)
    after = scrape(gw)
    assert statuses == [503, 401]
    for status in ("401", "503"):
        assert moved(before, after, "creditgate_checkout_requests_total", status=status) == 1
