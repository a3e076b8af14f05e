"""A gateway on a Redis Cluster (``REDIS_CLUSTER=true``) under concurrent paid traffic while a
replica is promoted (``CLUSTER FAILOVER``) and a busy shard's slot is migrated: the money
invariants hold afterwards.

- per account, balance == sum of its ledger entries, never below zero;
- every answer the client got whole (200) is charged exactly once: one usage event and one
  deduction of the same amount for its ``x-request-id``;
- nothing left in Redis: no hold, no deadline, no ``held`` or ``pending``, no outbox entry.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import openai
import pytest

from billing.metering.redis_keys import account_key, deadlines_keys, holds_key
from devtools.localservices import LocalRedisCluster
from devtools.simulator import Scenario, Simulator
from tests.cluster import topology
from tests.harness import GatewayHarness

MESSAGES = [{"role": "user", "content": "Say hello a few times."}]
ACCOUNTS = 20
REQUESTS = 200
CONCURRENCY = 16
OPENING_MILLICREDITS = 10_000_000


@dataclass
class Load:
    """Paid requests over ``accounts``, alternating plain and streamed; what came back."""

    gw: GatewayHarness
    accounts: list[tuple[int, str]]
    answered: list[tuple[str, float]] = field(default_factory=list)  # (request id, when)
    failures: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, *, at_least: int, until: asyncio.Future[None]) -> None:
        """Send at least ``at_least`` requests, and go on until ``until`` is done."""
        clients = {key: self.gw.client(key, timeout=30) for _, key in self.accounts}

        async def worker(index: int) -> None:
            while self.sent < at_least or not until.done():
                number = self.sent
                self.sent += 1
                _, key = self.accounts[number % len(self.accounts)]
                await self.one(clients[key], streamed=bool((number + index) % 2))

        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))

    async def one(self, client: openai.AsyncOpenAI, *, streamed: bool) -> None:
        kwargs = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 20}
        try:
            if streamed:
                raw = await client.chat.completions.with_raw_response.create(
                    **kwargs, stream=True, stream_options={"include_usage": True}
                )
                events = [event async for event in raw.parse()]
                # Whole: the usage chunk, which comes just before [DONE], arrived.
                if not events or events[-1].usage is None:
                    raise ValueError("stream ended without its usage")
            else:
                raw = await client.chat.completions.with_raw_response.create(**kwargs)
                raw.parse()
        except openai.APIStatusError as exc:
            self._fail(f"status {exc.status_code}")
            return
        except Exception as exc:  # a cut stream, a connection error: not delivered whole
            self._fail(type(exc).__name__)
            return
        self.answered.append((raw.headers["x-request-id"], time.monotonic()))
        async with self.progress:
            self.progress.notify_all()

    def _fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    async def wait_answered(self, count: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.answered) >= count)


async def _redis_leftovers(gw: GatewayHarness, account_ids: list[int]) -> list[str]:
    """What Redis still holds of the traffic: holds, deadlines, held/pending, outbox."""
    problems = []
    async with gw.redis.pipeline(transaction=False) as pipe:
        for account_id in account_ids:
            pipe.hlen(holds_key(account_id))
            pipe.hmget(account_key(account_id), ["held", "pending"])
        for key in deadlines_keys():
            pipe.zcard(key)
        replies = await pipe.execute()
    for i, account_id in enumerate(account_ids):
        holds, (held, pending) = replies[2 * i], replies[2 * i + 1]
        if holds or int(held or 0) or int(pending or 0):
            problems.append(f"account {account_id}: {holds} holds, held {held}, pending {pending}")
    deadlines = sum(replies[2 * len(account_ids) :])
    if deadlines:
        problems.append(f"{deadlines} hold deadlines left")
    try:
        await gw.settled(timeout_s=0.1)
    except TimeoutError as exc:
        problems.append(str(exc))
    return problems


async def _wait_quiet(gw: GatewayHarness, account_ids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while problems := await _redis_leftovers(gw, account_ids):
        if time.monotonic() > deadline:
            raise AssertionError("Redis not settled:\n  " + "\n  ".join(problems))
        await asyncio.sleep(0.2)


@pytest.mark.timeout(180)
async def test_paid_traffic_through_a_failover_and_a_slot_migration_is_charged_once(
    make_gateway, cluster_url: str, redis_cluster: LocalRedisCluster, sim: Simulator
):
    gw = await make_gateway(redis_url=cluster_url, redis_cluster=True)
    sim.set_default(Scenario(chunks=8, delay_s=0.005))
    accounts = [await gw.create_account(OPENING_MILLICREDITS) for _ in range(ACCOUNTS)]
    account_ids = [account_id for account_id, _ in accounts]
    # Two busy shards (every account gets a tenth of the traffic): one whose master fails
    # over, one whose slot moves to another master.
    failing_slot = await topology.key_slot(redis_cluster, account_key(account_ids[0]))
    moving_slot = await topology.key_slot(redis_cluster, account_key(account_ids[1]))
    failing_master = await topology.owner(redis_cluster, failing_slot)
    moving_from = await topology.owner(redis_cluster, moving_slot)

    load = Load(gw, accounts)
    marks: dict[str, float] = {}

    async def disrupt() -> None:
        await load.wait_answered(40)
        marks["failover"] = time.monotonic()
        promoted = await topology.fail_over(redis_cluster, failing_master)
        assert (await topology.owner(redis_cluster, failing_slot)).port == promoted.port
        await load.wait_answered(len(load.answered) + 30)
        marks["migration"] = time.monotonic()
        moved_to = await topology.migrate_slot(redis_cluster, moving_slot)
        assert moved_to.port != moving_from.port
        marks["after"] = time.monotonic()
        await load.wait_answered(len(load.answered) + 30)

    disruption = asyncio.ensure_future(disrupt())
    await asyncio.wait_for(load.run(at_least=REQUESTS, until=disruption), 150)
    await disruption  # its own assertions

    answered_after = [rid for rid, at in load.answered if at > marks["after"]]
    print(
        f"[cluster] {load.sent} sent, {len(load.answered)} answered "
        f"({len(answered_after)} after both changes), failures {load.failures}"
    )
    assert len(answered_after) >= 30  # the gateway serves on the new topology
    await _wait_quiet(gw, account_ids, timeout_s=40)

    request_ids = [rid for rid, _ in load.answered]
    rows = await gw.pool.fetch(
        """
        SELECT u.request_id, count(*) AS usage_rows, min(u.charged_millicredits) AS charged,
               (SELECT array_agg(e.amount_millicredits) FROM ledger_entries e
                 WHERE e.idempotency_key = 'usage:' || u.request_id) AS deductions
          FROM usage_events u
         WHERE u.request_id = ANY($1::text[])
         GROUP BY u.request_id
        """,
        request_ids,
    )
    found = {row["request_id"]: row for row in rows}
    assert set(found) == set(request_ids), "answered requests without a usage event"
    for row in rows:
        assert row["usage_rows"] == 1, row
        assert row["charged"] > 0, row
        assert row["deductions"] == [-row["charged"]], row
    for account_id in account_ids:
        balance = await gw.balance(account_id)
        assert 0 <= balance < OPENING_MILLICREDITS
        assert await gw.ledger_sum(account_id) == balance
