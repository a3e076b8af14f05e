"""The one verdict every fault case ends with (issue 11, "A fault suite in CI").

After the fault is over:

1. the gateway serves paid requests again, plain and streamed, without a restart; the
   recovery time is printed (and listed at the end of the pytest run);
2. the money settles: the outbox is empty, every account's ``pending`` is zero, and no hold is
   left past its deadline (waited for, bounded);
3. per account, balance == sum of its ledger entries, and no balance is negative;
4. every completed response is charged exactly once at the exact amount: its ``x-request-id``
   has one usage event and one deduction of the same amount, and for an honest upstream that
   amount is the rate card's price of the usage the client saw.

Every problem found is collected and reported together in one AssertionError.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from billing.metering.backlog import read_outbox_backlog
from billing.metering.holds import parse_hold_value
from billing.metering.pricing import charge_millicredits
from billing.metering.redis_keys import account_key, deadlines_keys, holds_key
from tests.faults.stack import FaultStack
from tests.faults.traffic import MAX_TOKENS, Completed, Traffic

RECOVERY_TIMES: list[tuple[str, float]] = []
# A hold is overdue once its deadline is this far past: the sweeper runs every 0.2 s here.
_OVERDUE_GRACE_MS = 2_000
_TRAFFIC_AFTER_RECOVERY_S = 0.5


async def assert_verdict(
    stack: FaultStack,
    traffic: Traffic,
    *,
    case: str,
    fault_ended_at: float,
    recovery_timeout_s: float = 60.0,
    settle_timeout_s: float = 30.0,
) -> Traffic:
    """Assert the verdict for one case; ``fault_ended_at`` is ``time.monotonic()`` when the
    fault was lifted. Returns ``traffic`` for a case's own further assertions."""
    # Measured while the background traffic still runs, then a little more traffic after it.
    await traffic.wait_serving(timeout_s=recovery_timeout_s)
    recovery_s = time.monotonic() - fault_ended_at
    RECOVERY_TIMES.append((case, recovery_s))
    print(f"[faults] {case}: serving again {recovery_s:.2f} s after the fault ended")
    await asyncio.sleep(_TRAFFIC_AFTER_RECOVERY_S)
    await traffic.stop()
    problems = await _wait_settled(stack, settle_timeout_s)
    problems += await _ledger_problems(stack)
    problems += await _charge_problems(stack, traffic.completed, traffic.partial)
    completed = len(traffic.completed)
    hostile = sum(1 for c in traffic.completed if not honest_usage(c.usage))
    print(
        f"[faults] {case}: {completed} completed ({hostile} with untrusted usage), "
        f"{len(traffic.partial)} cut, failures {dict(traffic.failures)}"
    )
    assert not problems, (
        f"{case}: {len(problems)} problem(s) over {completed} completed responses "
        f"(failures: {dict(traffic.failures)}):\n  - " + "\n  - ".join(problems[:40])
    )
    assert completed > 0, f"{case}: no response completed"
    return traffic


async def _wait_settled(stack: FaultStack, timeout_s: float) -> list[str]:
    """Wait until the outbox is empty, ``pending`` is zero and no hold is overdue; the
    remaining problems when ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            problems = await _redis_problems(stack)
        except Exception as exc:
            problems = [f"Redis not readable: {exc!r}"]
        if not problems or time.monotonic() > deadline:
            return problems
        await asyncio.sleep(0.2)


async def _redis_problems(stack: FaultStack) -> list[str]:
    problems: list[str] = []
    outbox = (await read_outbox_backlog(stack.redis)).entries
    if outbox:
        problems.append(f"outbox not drained: {outbox} entries")
    now_ms = int(time.time() * 1000)
    async with stack.redis.pipeline(transaction=False) as pipe:
        for key in deadlines_keys():
            pipe.zrangebyscore(key, "-inf", now_ms - _OVERDUE_GRACE_MS, withscores=True)
        overdue = [member for shard in await pipe.execute() for member in shard]
    if overdue:
        problems.append(f"{len(overdue)} hold(s) past their deadline, e.g. {overdue[:3]}")
    for row in await stack.pool.fetch("SELECT id FROM accounts ORDER BY id"):
        account_id = row["id"]
        state: dict[str, Any] = await stack.redis.hgetall(account_key(account_id))
        pending = int(state.get("pending", 0))
        if pending:
            problems.append(f"account {account_id}: pending {pending} mc not drained")
        # A hold the deadline index lost would escape the sweeper: read the holds themselves.
        holds: dict[str, str] = await stack.redis.hgetall(holds_key(account_id))
        stale = [
            rid
            for rid, value in holds.items()
            if parse_hold_value(value).deadline_ms < now_ms - _OVERDUE_GRACE_MS
        ]
        if stale:
            problems.append(f"account {account_id}: {len(stale)} hold(s) overdue, {stale[:3]}")
    return problems


async def _ledger_problems(stack: FaultStack) -> list[str]:
    rows = await stack.pool.fetch(
        "SELECT a.id, a.balance_millicredits AS balance, "
        "COALESCE((SELECT sum(amount_millicredits) FROM ledger_entries e "
        "WHERE e.account_id = a.id), 0) AS entries FROM accounts a ORDER BY a.id"
    )
    problems = []
    for row in rows:
        if row["balance"] != row["entries"]:
            problems.append(
                f"account {row['id']}: balance {row['balance']} != ledger sum {row['entries']}"
            )
        if row["balance"] < 0:
            problems.append(f"account {row['id']}: negative balance {row['balance']}")
    return problems


async def _charge_problems(
    stack: FaultStack, completed: list[Completed], partial: list[Completed]
) -> list[str]:
    ids = [c.request_id for c in [*completed, *partial]]
    usage_rows = {
        r["request_id"]: r
        for r in await stack.pool.fetch(
            "SELECT * FROM usage_events WHERE request_id = ANY($1::text[])", ids
        )
    }
    deductions: dict[str, list[int]] = {}
    for row in await stack.pool.fetch(
        "SELECT reference, amount_millicredits FROM ledger_entries "
        "WHERE entry_type = 'deduction' AND reference = ANY($1::text[])",
        ids,
    ):
        deductions.setdefault(row["reference"], []).append(row["amount_millicredits"])
    problems: list[str] = []
    for done in completed:
        problem = _charge_problem(stack, done, usage_rows.get(done.request_id), deductions)
        if problem:
            problems.append(f"{done.request_id} ({_kind(done)}): {problem}")
    for cut in partial:
        problem = _partial_problem(cut, usage_rows.get(cut.request_id), deductions)
        if problem:
            problems.append(f"{cut.request_id} ({_kind(cut)}, cut): {problem}")
    return problems


def _partial_problem(cut: Completed, usage: Any, deductions: dict[str, list[int]]) -> str | None:
    """An answer the client got part of: charged once for what was delivered (> 0)."""
    if usage is None:
        return "delivered bytes never charged (no usage event)"
    charged = usage["charged_millicredits"]
    if charged <= 0:
        return f"delivered bytes charged {charged} mc"
    taken = deductions.get(cut.request_id, [])
    if taken != [-charged]:
        return f"usage charged {charged} mc but deductions are {taken}"
    return None


def honest_usage(usage: dict[str, Any] | None) -> bool:
    """Usage an honest upstream could report for the suite's requests: integer counts, the
    completion within ``MAX_TOKENS``, the prompt within a few thousand tokens."""
    if not isinstance(usage, dict):
        return False
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        type(prompt) is int
        and type(completion) is int
        and 0 <= prompt <= 2_000
        and 0 <= completion <= MAX_TOKENS
    )


def _kind(done: Completed) -> str:
    return ("streamed" if done.streamed else "plain") + ("" if done.trusted else ", hostile")


def _charge_problem(
    stack: FaultStack, done: Completed, usage: Any, deductions: dict[str, list[int]]
) -> str | None:
    if usage is None:
        return "completed but never charged (no usage event)"
    charged = usage["charged_millicredits"]
    taken = deductions.get(done.request_id, [])
    if charged and taken != [-charged]:
        return f"usage charged {charged} mc but deductions are {taken}"
    if not done.trusted and not honest_usage(done.usage):
        if usage["usage_source"] == "upstream":
            return f"untrusted usage {done.usage} billed as reported"
        return None if charged > 0 else "delivered answer charged 0"
    if done.usage is None:
        return "the client saw no usage"
    cached = (done.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    expected = charge_millicredits(
        stack.rate_cards[done.model],
        prompt_tokens=done.usage["prompt_tokens"],
        completion_tokens=done.usage["completion_tokens"],
        cached_tokens=cached,
    )
    seen = (done.usage["prompt_tokens"], done.usage["completion_tokens"])
    recorded = (usage["prompt_tokens"], usage["completion_tokens"])
    if recorded != seen:
        return f"usage row says {recorded} tokens, the client saw {seen}"
    if charged != expected:
        return f"charged {charged} mc, expected {expected} mc"
    if usage["status"] != "completed":
        return f"status {usage['status']!r} for a completed response"
    return None
