"""DATABASE_REPLICA_URL: read traffic (the Credits page's lists, exports, statements) reads
the replica's pool; the balance and the money path stay on DATABASE_URL. The "replica" here is
a second database on the same server holding other rows, so a route shows which it read."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest

from devtools.localservices import PostgresServer, free_port
from tests.conftest import _execute, _run_in_thread
from tests.gateway.billing_world import BillingClient, insert_usage, key_id
from tests.harness import create_account_with_key


@pytest.fixture
def replica_url(pg_server: PostgresServer, template_database: str) -> Iterator[str]:
    """A migrated database of its own, standing in for a streaming replica."""
    name = f"r_{uuid.uuid4().hex}"
    create = f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'
    _run_in_thread(_execute(pg_server.dsn, create))
    yield pg_server.dsn_for(name)
    _run_in_thread(_execute(pg_server.dsn, f'DROP DATABASE "{name}" WITH (FORCE)'))


async def test_read_routes_use_the_replica_and_the_balance_the_primary(
    make_gateway, replica_url: str
) -> None:
    gw = await make_gateway(database_replica_url=replica_url)
    account_id, key = await gw.create_account(5_000)
    client = BillingClient(gw, key)
    started = datetime.now(UTC)
    await insert_usage(
        gw.pool, account_id, await key_id(gw.pool, account_id), count=2, started_at=started
    )
    replica = await asyncpg.connect(replica_url)
    try:
        # The same account id on the replica, with other rows and another balance.
        async with replica.transaction():
            replica_account, _ = await create_account_with_key(replica, 9_000)
        assert replica_account == account_id
        await insert_usage(replica, account_id, None, count=3, started_at=started)
    finally:
        await replica.close()

    _, usage = await client.get("/api/billing/usage")
    _, ledger = await client.get("/api/billing/ledger")
    _, me = await client.get("/api/billing/me")
    _, statement = await client.get(f"/api/billing/statements/{started:%Y-%m}")
    export = await client.get("/api/billing/usage", format="csv")

    assert len(usage["data"]) == 3
    assert [row["amountMillicredits"] for row in ledger["data"]] == ["9000"]
    assert len(me["recentUsage"]) == 3
    assert me["balanceMillicredits"] == "5000"  # the balance: the primary's
    assert statement["closingBalanceMillicredits"] == "9000"
    assert export[0] == 200 and export[1].count(b"\n") == 1 + 3


async def test_a_replica_that_is_down_fails_its_reads_not_the_service(make_gateway) -> None:
    """The service starts without its replica; the read routes answer 503 (the envelope of
    Postgres down) while the balance and the money path go on."""
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/replica"
    gw = await make_gateway(database_replica_url=down)
    _, key = await gw.create_account(5_000_000)
    client = BillingClient(gw, key)

    status, usage = await client.get("/api/billing/usage")
    answer = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )

    assert status == 503
    assert usage["error"]["code"] == "billing_unavailable"
    assert answer.choices[0].message.content
