"""Property-based test of the spend counters over real Redis and Postgres.

A Hypothesis ``RuleBasedStateMachine`` places holds for two keys of one account, some under an
account daily cap (which loads the counters from Postgres the first time) and some without
caps, and settles (at, below or above the hold, sometimes twice) or voids them. A model
predicts each answer (admitted or refused by the cap) and the counters: a field that exists
counts every hold placed since it was loaded, moved to its charge when settled, and taken off
when voided; a hold placed before its field existed adds its whole charge at its settle.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from billing import api_keys, ledger
from billing.errors import SpendCapExceededError
from billing.metering.holds import HoldStore
from billing.metering.redis_keys import spend_key
from billing.spend_controls import spend_windows, window_spend
from tests.billing.money import grant, usage_payload

_T = TypeVar("_T")
CAP = 12_000


@dataclass
class Open:
    key_id: int
    amount: int
    counted: dict[str, bool]


class SpendMachine(RuleBasedStateMachine):
    def __init__(self, database_url: str, redis_url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self._run(self._open(database_url, redis_url))
        self.open: dict[str, Open] = {}
        self.settled: set[str] = set()
        # The model of the day's fields ("a", "k:<id>"); None: missing. The month's mirror it
        # (loaded together, moved together).
        self.fields: dict[str, int | None] = {"a": None}
        self.serial = 0

    async def _open(self, database_url: str, redis_url: str) -> None:
        self.pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        self.redis = aioredis.from_url(redis_url, decode_responses=True)
        await self.redis.flushall()
        pool = self.pool
        self.holds = HoldStore(
            self.redis,
            lambda account_id: ledger.posted_balance(pool, account_id),
            load_spend=lambda a, k, w: window_spend(pool, a, k, w),
        )
        async with self.pool.acquire() as conn:
            self.account = await ledger.create_account(conn, f"{uuid.uuid4().hex}@example.com")
            self.keys = [
                (await api_keys.create_api_key(conn, self.account))[1].id for _ in range(2)
            ]
        await grant(self.pool, self.account, 100_000_000, holds=self.holds)
        self.windows = spend_windows(int(time.time() * 1000))

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self._run(self.pool.close())
        self._run(self.redis.aclose())
        self._run(self.loop.shutdown_asyncgens())
        self.loop.close()

    @initialize()
    def start(self) -> None:
        for key_id in self.keys:
            self.fields[f"k:{key_id}"] = None

    @rule(key=st.integers(0, 1), amount=st.integers(0, 3_000), capped=st.booleans())
    def reserve(self, key: int, amount: int, capped: bool) -> None:
        key_id = self.keys[key]
        kf = f"k:{key_id}"
        self.serial += 1
        request_id = f"r{self.serial}"
        if capped and self.fields["a"] is None:  # LOAD_SPEND: Postgres has posted nothing
            self.fields["a"] = 0
            if self.fields[kf] is None:
                self.fields[kf] = 0
        refused = capped and (self.fields["a"] or 0) + amount > CAP
        try:
            self._run(
                self.holds.reserve(
                    self.account,
                    amount,
                    request_id=request_id,
                    api_key_id=key_id,
                    started_ms=self.windows.day_start_ms + 1,
                    window_caps=(CAP, None, None, None) if capped else None,
                )
            )
        except SpendCapExceededError as exc:
            assert refused
            assert exc.spent_millicredits == self.fields["a"]
            return
        assert not refused
        counted = {f: self.fields[f] is not None and amount > 0 for f in ("a", kf)}
        for f, yes in counted.items():
            if yes:
                self.fields[f] = (self.fields[f] or 0) + amount
        self.open[request_id] = Open(key_id, amount, counted)

    def _move(self, hold: Open, counted_delta: int, uncounted_delta: int | None) -> None:
        for f, yes in hold.counted.items():
            value = self.fields[f]
            if value is None:
                continue
            if yes:
                self.fields[f] = value + counted_delta
            elif uncounted_delta is not None:
                self.fields[f] = value + uncounted_delta

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 10_000), cost=st.integers(0, 4_000), twice=st.booleans())
    def settle(self, pick: int, cost: int, twice: bool) -> None:
        request_id = sorted(self.open)[pick % len(self.open)]
        hold = self.open.pop(request_id)
        for _ in range(2 if twice else 1):
            payload = usage_payload(
                request_id=request_id, account_id=self.account, cost_millicredits=cost
            )
            settled = self._run(
                self.holds.settle(
                    self.account, request_id=request_id, cost_millicredits=cost, payload=payload
                )
            )
            assert settled.charged_millicredits == cost  # the balance covers any overrun
        self._move(hold, cost - hold.amount, cost)
        self.settled.add(request_id)

    @precondition(lambda self: self.open)
    @rule(pick=st.integers(0, 10_000))
    def void(self, pick: int) -> None:
        request_id = sorted(self.open)[pick % len(self.open)]
        hold = self.open.pop(request_id)
        released = self._run(self.holds.void(self.account, request_id=request_id))
        assert released == hold.amount
        self._move(hold, -hold.amount, None)

    @invariant()
    def counters_match_the_model(self) -> None:
        for window, window_id in (("d", self.windows.day_id), ("m", self.windows.month_id)):
            names = list(self.fields)
            values = self._run(self.redis.hmget(spend_key(self.account, window, window_id), names))
            actual = {n: None if v is None else int(v) for n, v in zip(names, values, strict=True)}
            # A key field is only loaded with the account's here, so the month mirrors the day.
            assert actual == self.fields

    @invariant()
    def held_is_the_open_holds(self) -> None:
        state = self._run(self.holds.account_state(self.account))
        assert state.held_millicredits == sum(h.amount for h in self.open.values())


@pytest.mark.timeout(600)
def test_spend_counters_state_machine(database_url: str, redis_url: str) -> None:
    run_state_machine_as_test(
        lambda: SpendMachine(database_url, redis_url),
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
