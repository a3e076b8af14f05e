"""The key cache: concurrent requests with an uncached key share one Postgres lookup."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from billing import api_keys, ledger
from billing.errors import BillingUnavailableError
from gateway import auth
from gateway.auth import Identity, KeyAuthenticator
from runtime.errors import AuthenticationError


@pytest.fixture
def lookups(monkeypatch) -> list[str]:
    """Every key the authenticator looks up in Postgres (the real lookup, made slow enough
    that concurrent callers overlap)."""
    seen: list[str] = []
    real = auth.find_active_key

    async def counted(pool: asyncpg.Pool, key: str):
        seen.append(key)
        await asyncio.sleep(0.05)
        return await real(pool, key)

    monkeypatch.setattr(auth, "find_active_key", counted)
    return seen


async def _account_and_key(pool: asyncpg.Pool) -> tuple[int, str, int]:
    async with pool.acquire() as conn:
        account_id = await ledger.create_account(conn, "auth-cache@example.com")
        key, record = await api_keys.create_api_key(conn, account_id)
    return account_id, key, record.id


async def test_concurrent_requests_share_one_lookup_per_ttl(pool, lookups) -> None:
    account_id, key, key_id = await _account_and_key(pool)
    authenticator = KeyAuthenticator(pool, ttl_s=0.2)

    first = await asyncio.gather(*(authenticator.identify(key) for _ in range(20)))
    assert first == [Identity(key_id, account_id)] * 20
    assert lookups == [key]

    await asyncio.sleep(0.25)  # the entry expired: the next burst looks it up once more
    again = await asyncio.gather(*(authenticator.identify(key) for _ in range(20)))
    assert again == first
    assert lookups == [key, key]


async def test_unknown_keys_are_cached_and_shared_too(pool, lookups) -> None:
    authenticator = KeyAuthenticator(pool, ttl_s=5)
    answers = await asyncio.gather(*(authenticator.identify("cg_live_nope") for _ in range(5)))
    assert answers == [None] * 5
    assert await authenticator.identify("cg_live_nope") is None
    assert lookups == ["cg_live_nope"]


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(pool, lookups) -> None:
    account_id, key, key_id = await _account_and_key(pool)
    authenticator = KeyAuthenticator(pool)
    leaver = asyncio.ensure_future(authenticator.identify(key))
    stayer = asyncio.ensure_future(authenticator.identify(key))
    await asyncio.sleep(0.01)
    leaver.cancel()
    assert await stayer == Identity(key_id, account_id)
    assert leaver.cancelled()
    assert lookups == [key]


async def test_postgres_unreachable_fails_every_waiter_and_the_next_call_retries(
    database_url: str, lookups
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    _, key, _ = await _account_and_key(pool)
    authenticator = KeyAuthenticator(pool)
    await pool.close()

    results = await asyncio.gather(
        *(authenticator.identify(key) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, BillingUnavailableError) for r in results)
    with pytest.raises(BillingUnavailableError):
        await authenticator.identify(key)
    assert lookups == [key, key]  # a failure is not cached


def _traceback_depth(exc: BaseException) -> int:
    depth = 0
    tb = exc.__traceback__
    while tb is not None:
        depth += 1
        tb = tb.tb_next
    return depth


async def test_authenticate_without_key_raises_a_fresh_error_each_time() -> None:
    """A refusal keeps no earlier refusal's frames alive: each raise is a new exception whose
    traceback holds only its own call (a shared instance's grew by a frame per raise)."""
    from aiohttp.test_utils import make_mocked_request

    authenticator = KeyAuthenticator(None, ttl_s=5.0)  # type: ignore[arg-type]  # never queried
    raised: list[AuthenticationError] = []
    for _ in range(100):
        request = make_mocked_request("POST", "/v1/chat/completions")
        with pytest.raises(AuthenticationError) as info:
            await authenticator.authenticate(request)
        raised.append(info.value)
    assert len({id(exc) for exc in raised}) == len(raised)
    assert _traceback_depth(raised[-1]) == _traceback_depth(raised[0]) <= 3
    assert raised[-1].code == "missing_api_key"


async def test_backend_terminated_under_a_lookup_is_billing_unavailable(
    database_url: str, lookups
) -> None:
    """A pooled connection whose backend dies mid-lookup (pg_terminate_backend) fails the
    lookup as BillingUnavailableError (the gateway's 503 billing_unavailable), never a 500."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        _, key, _ = await _account_and_key(pool)
        authenticator = KeyAuthenticator(pool)
        killer = await asyncpg.connect(database_url)
        try:
            async with killer.transaction():
                # The lookup's query waits on this lock: its backend is killed mid-query.
                await killer.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
                lookup = asyncio.ensure_future(authenticator.identify(key))
                backend_pid = None
                while backend_pid is None:
                    await asyncio.sleep(0.01)
                    backend_pid = await killer.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    )
                assert await killer.fetchval("SELECT pg_terminate_backend($1)", backend_pid)
        finally:
            await killer.close()
        with pytest.raises(BillingUnavailableError):
            await lookup
        assert lookups == [key]
    finally:
        await pool.close()


async def test_forget_all_drops_cached_keys_so_a_revocation_lands(pool) -> None:
    account_id, key, key_id = await _account_and_key(pool)
    authenticator = KeyAuthenticator(pool, ttl_s=300)
    assert await authenticator.identify(key) == Identity(key_id, account_id)
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    assert await authenticator.identify(key) is not None  # cached for 300 s

    authenticator.forget_all()

    assert await authenticator.identify(key) is None


async def test_lookup_running_across_forget_all_is_not_cached(pool, lookups) -> None:
    # The lookup may have read the key just before its revocation committed: caching its
    # answer after forget_all would keep a revoked key working for the whole TTL.
    _, key, key_id = await _account_and_key(pool)
    authenticator = KeyAuthenticator(pool, ttl_s=300)
    first = asyncio.create_task(authenticator.identify(key))
    await asyncio.sleep(0)  # the lookup has started
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    authenticator.forget_all()
    await first  # answered from before the revocation (either way)

    assert await authenticator.identify(key) is None
    assert lookups == [key, key]
