"""``creditgate serve`` with ``WORKERS``: the parent, its workers on shared ports, the
restart of a dead worker, the graceful stop, and the fleet-wide lease of the hold sweeper
(``creditgate.workers``, ``runtime.lease``; docs/design.md, "Workers")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from billing import ledger
from billing.metering.holds import HoldStore
from devtools.localservices import free_port
from devtools.simulator import Scenario, Simulator
from gateway.app import HOLD_SWEEPER_LEASE
from runtime.lease import LEASE_LOCK_CLASS, Lease, lease_key, leased
from runtime.settings import ConfigError, Settings
from tests.harness import create_account_with_key, seed_database, serve_env, start_serve

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
LEASE_HELD = ("creditgate_lease_held", f"lease={HOLD_SWEEPER_LEASE}")
HOLDS_EXPIRED = ("creditgate_holds_expired_total", "")


def _free_port_pair(taken: set[int]) -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` were both free a moment ago and neither is
    in ``taken`` (the ports the fleet's other listeners were given).

    Taken below the kernel's ephemeral range (``ip_local_port_range``): there no outgoing
    connection (the workers' own to Redis and Postgres) can take ``p + 1`` before the second
    worker binds it, which once failed its start in CI."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    while True:
        port = rng.randrange(max(1024, ephemeral_low - 12_000), ephemeral_low - 1)
        if {port, port + 1} & taken:
            continue
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _children(pid: int) -> set[int]:
    """The worker processes of ``pid``: its children (proc(5): ``task/<tid>/children``) that
    multiprocessing spawned (not its resource tracker)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(c) for c in (task / "children").read_text().split())
    return {child for child in children if b"spawn_main" in _cmdline(child)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


async def _scrape(session: aiohttp.ClientSession, port: int) -> dict[tuple[str, str], float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return {
        (name, ",".join(f"{k}={v}" for k, v in sorted(labels.items()))): value
        for family in text_string_to_metric_families(text)
        for name, labels, value, *_ in family.samples
    }


def _requests_answered(scrape: dict[tuple[str, str], float]) -> float:
    return sum(v for (name, _), v in scrape.items() if name == "creditgate_requests_total")


async def _chat_on_new_connections(port: int, key: str, count: int) -> list[int]:
    """``count`` chat requests, each on a connection of its own; their statuses."""
    connector = aiohttp.TCPConnector(force_close=True)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        statuses = []
        for _ in range(count):
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT
            ) as response:
                await response.read()
                statuses.append(response.status)
        return statuses


async def _funded_key(database_url: str, credits_millicredits: int = 50_000_000) -> tuple[int, str]:
    conn = await asyncpg.connect(database_url)
    try:
        return await create_account_with_key(conn, credits_millicredits)
    finally:
        await conn.close()


async def _until(condition, what: str, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    """Poll ``await condition()`` until it is truthy; returns it (fails after ``timeout_s``)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _fleet(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator, **settings: str
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, int]]:
    """``creditgate serve`` (WORKERS=2 unless ``settings`` says otherwise), its gateway port
    and its METRICS_PORT; stopped with SIGTERM (then SIGKILL) on the way out.
    ``METRICS_PORT="pair"``: two free ports from it on (worker i on METRICS_PORT + i)."""
    await seed_database(database_url)
    port = free_port()
    env = serve_env(database_url, redis_url, sim.base_url, port, **{"WORKERS": "2", **settings})
    if env["METRICS_PORT"] == "pair":
        env["METRICS_PORT"] = str(_free_port_pair({port, int(env["ADMIN_PORT"])}))
    process = await start_serve(env, tmp_path / "serve.out", tmp_path / "serve.err")
    try:
        yield process, port, int(env["METRICS_PORT"])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 60)
            except subprocess.TimeoutExpired:
                os.killpg(os.getpgid(process.pid), signal.SIGKILL)
                process.kill()


async def test_two_workers_share_the_port_and_both_answer(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """WORKERS=2: a parent with two worker processes; requests on new connections are spread
    over both (each worker's /metrics, on METRICS_PORT and METRICS_PORT + 1, counts some)."""
    _, key = await _funded_key(database_url)
    async with _fleet(tmp_path, database_url, redis_url, sim, METRICS_PORT="pair") as (
        process,
        port,
        metrics_port,
    ):
        workers = _children(process.pid)
        assert len(workers) == 2
        assert "workers=2" in (tmp_path / "serve.out").read_text()
        assert await _chat_on_new_connections(port, key, 40) == [200] * 40
        async with aiohttp.ClientSession() as session:
            answered = [
                _requests_answered(await _scrape(session, metrics_port + i)) for i in (0, 1)
            ]
    assert sum(answered) == 40
    assert all(count > 0 for count in answered), answered


async def test_a_killed_worker_is_restarted_and_service_goes_on(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """kill -9 of one worker: the parent starts a new one; every request is answered."""
    _, key = await _funded_key(database_url)
    async with _fleet(tmp_path, database_url, redis_url, sim) as (process, port, _):
        before = _children(process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        async def victim_gone() -> bool:
            # The parent saw it die: its descriptors, listening sockets included, are closed
            # (the parent's sentinel is a pipe the worker's descriptor table held).
            return f"(pid {victim}) died" in (tmp_path / "serve.err").read_text()

        await _until(victim_gone, "the killed worker to exit")
        # Before its replacement is up, the other worker answers every new connection.
        assert await _chat_on_new_connections(port, key, 10) == [200] * 10

        async def replaced() -> bool:
            now = _children(process.pid)
            return len(now) == 2 and victim not in now

        await _until(replaced, "a new worker")

        async def new_worker_ready() -> bool:
            return (tmp_path / "serve.err").read_text().count("ready (pid") >= 3

        await _until(new_worker_ready, "the new worker to be ready")
        assert await _chat_on_new_connections(port, key, 20) == [200] * 20
        assert process.poll() is None
    err = (tmp_path / "serve.err").read_text()
    assert f"(pid {victim}) died with status -9" in err


async def test_sigterm_during_a_stream_lets_it_finish_and_charges_it_once(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator, make_gateway
) -> None:
    """SIGTERM to the parent while a stream is in flight: the stream completes, the workers
    and the parent exit 0, and the request is charged once (one usage row; balance == the sum
    of the ledger entries == opening - charge)."""
    opening = 50_000_000
    async with _fleet(tmp_path, database_url, redis_url, sim, SHUTDOWN_TIMEOUT_S="15") as (
        process,
        port,
        _,
    ):
        account, key = await _funded_key(database_url, opening)
        sim.push(Scenario(chunks=20, delay_s=0.1))
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0
        )
        try:
            raw = await client.chat.completions.with_raw_response.create(
                **CHAT | {"max_tokens": 50}, stream=True
            )
            request_id = raw.headers["x-request-id"]
            text = []
            async for chunk in raw.parse():
                if not text:
                    process.send_signal(signal.SIGTERM)
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
        finally:
            await client.close()
        assert "".join(text) == " hello" * 20
        assert await asyncio.to_thread(process.wait, 60) == 0
    err = (tmp_path / "serve.err").read_text()
    assert err.count("exited with status 0") == 2, err[-3000:]
    assert "killed" not in err
    gw = await make_gateway()  # posts whatever the stopping worker left in the outbox
    await gw.settled()
    rows = await gw.pool.fetch("SELECT * FROM usage_events WHERE request_id = $1", request_id)
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["usage_source"]) == ("completed", "upstream")
    assert rows[0]["charged_millicredits"] > 0
    assert await gw.balance(account) == await gw.ledger_sum(account)
    assert await gw.balance(account) == opening - rows[0]["charged_millicredits"]


async def test_a_stream_longer_than_shutdown_timeout_is_cut_and_charged_once(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator, make_gateway
) -> None:
    """SHUTDOWN_TIMEOUT_S=1 and a 10 s stream: SIGTERM cuts it after about a second (not the
    30 s once hard-coded); what was forwarded is charged once, as a client disconnect."""
    opening = 50_000_000
    async with _fleet(tmp_path, database_url, redis_url, sim, SHUTDOWN_TIMEOUT_S="1") as (
        process,
        port,
        _,
    ):
        account, key = await _funded_key(database_url, opening)
        sim.push(Scenario(chunks=50, delay_s=0.2))
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0
        )
        text: list[str] = []
        try:
            raw = await client.chat.completions.with_raw_response.create(
                **CHAT | {"max_tokens": 100}, stream=True
            )
            request_id = raw.headers["x-request-id"]
            with contextlib.suppress(openai.APIError, aiohttp.ClientError):
                async for chunk in raw.parse():
                    if not text:
                        process.send_signal(signal.SIGTERM)
                    if chunk.choices and chunk.choices[0].delta.content:
                        text.append(chunk.choices[0].delta.content)
        finally:
            await client.close()
        assert 0 < len(text) < 50
        assert await asyncio.to_thread(process.wait, 60) == 0
    gw = await make_gateway()
    await gw.settled()
    rows = await gw.pool.fetch("SELECT * FROM usage_events WHERE request_id = $1", request_id)
    assert len(rows) == 1
    assert rows[0]["status"] == "client_disconnected"
    assert await gw.balance(account) == await gw.ledger_sum(account)
    assert await gw.balance(account) == opening - rows[0]["charged_millicredits"]


async def _lease_holder(database_url: str) -> int | None:
    """The pid (from its ``application_name``) of the process holding the sweeper's lease."""
    conn = await asyncpg.connect(database_url)
    try:
        names = await conn.fetch(
            """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
                      SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid""",
            LEASE_LOCK_CLASS,
            lease_key(HOLD_SWEEPER_LEASE) & 0xFFFFFFFF,
        )
    finally:
        await conn.close()
    assert len(names) <= 1
    return int(names[0][0].split(" pid ")[1].split()[0]) if names else None


async def _expiring_hold(database_url: str, redis_url: str, account: int) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        holds = HoldStore(client, lambda a: ledger.posted_balance(pool, a))
        await holds.reserve(account, 1_000, request_id=str(uuid.uuid4()), ttl_s=0.5)
    finally:
        await client.aclose()
        await pool.close()


async def test_the_hold_sweeper_runs_in_one_worker_and_moves_when_its_holder_dies(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """One worker holds the sweeper's lease (the advisory lock, creditgate_lease_held) and
    voids expired holds; the other does not sweep. kill -9 of the holder: another worker takes
    the lease and sweeps."""
    account, _ = await _funded_key(database_url)
    async with (
        _fleet(
            tmp_path,
            database_url,
            redis_url,
            sim,
            METRICS_PORT="pair",
            SWEEP_INTERVAL_S="0.2",
        ) as (process, _, metrics_port),
        aiohttp.ClientSession() as session,
    ):
        workers = _children(process.pid)
        holder = await _until(lambda: _lease_holder(database_url), "a lease holder")
        assert holder in workers

        async def scrapes() -> list[dict[tuple[str, str], float]]:
            return [await _scrape(session, metrics_port + i) for i in (0, 1)]

        await _expiring_hold(database_url, redis_url, account)

        async def swept() -> list[dict[tuple[str, str], float]] | None:
            both = await scrapes()
            return both if sum(s.get(HOLDS_EXPIRED, 0) for s in both) == 1 else None

        both = await _until(swept, "the expired hold to be voided")
        assert sorted(s[LEASE_HELD] for s in both) == [0, 1]
        # The worker that swept is the one that holds the lease.
        assert [s.get(HOLDS_EXPIRED, 0) for s in both] == [s[LEASE_HELD] for s in both]

        os.kill(holder, signal.SIGKILL)

        async def new_holder() -> int | None:
            pid = await _lease_holder(database_url)
            return pid if pid not in (None, holder) else None

        successor = await _until(new_holder, "another worker to take the lease")
        assert successor in _children(process.pid)
        await _expiring_hold(database_url, redis_url, account)

        async def swept_again() -> bool:
            total = 0.0
            for i in (0, 1):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    total += (await _scrape(session, metrics_port + i)).get(HOLDS_EXPIRED, 0)
            # The killed holder's count died with it: one void since, in the successor.
            return total >= 1 and await _lease_holder(database_url) == successor

        await _until(swept_again, "the successor to void the second expired hold")
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        redis_client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            holds = HoldStore(redis_client, lambda a: ledger.posted_balance(pool, a))
            assert (await holds.account_state(account)).held_millicredits == 0
        finally:
            await redis_client.aclose()
            await pool.close()


async def test_a_lease_has_one_holder_and_passes_on_when_it_is_released(
    database_url: str,
) -> None:
    first, second = Lease(database_url, "test-lease"), Lease(database_url, "test-lease")
    other = Lease(database_url, "another-lease")
    try:
        assert await first.held()
        assert await first.held()  # asked again by its holder: still held
        assert not await second.held()
        assert await other.held()  # a lease of another name is another lock
        await first.close()
        assert await second.held()
        assert not await first.held()
    finally:
        for lease in (first, second, other):
            await lease.close()


async def test_leased_work_runs_everywhere_only_when_asked_while_postgres_is_unreachable() -> None:
    """Postgres unreachable: nobody can hold the lease; the sweeper's kind of work
    (``run_when_unreachable``) runs anyway, other leased work does not."""
    unreachable = Lease(f"postgresql://nobody@127.0.0.1:{free_port()}/none", "x", timeout_s=1)
    runs: list[str] = []

    async def step(name: str) -> None:
        runs.append(name)

    await leased(unreachable, lambda: step("sweeper"), run_when_unreachable=True)()
    await leased(unreachable, lambda: step("other"))()
    assert runs == ["sweeper"]
    assert (unreachable.holding, unreachable.reachable) == (False, False)
    await unreachable.close()


async def test_workers_1_serves_in_one_process_without_a_parent(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """WORKERS=1 is the single process of before: no child process, it answers itself."""
    _, key = await _funded_key(database_url)
    async with _fleet(tmp_path, database_url, redis_url, sim, WORKERS="1") as (process, port, _):
        assert _children(process.pid) == set()
        assert await _chat_on_new_connections(port, key, 3) == [200] * 3
        assert "workers=1" in (tmp_path / "serve.out").read_text()


async def test_a_worker_that_cannot_start_stops_the_fleet_with_one_json_error(
    database_url: str, redis_url: str, sim: Simulator
) -> None:
    """Postgres unreachable: the workers fail at start-up; the parent prints one JSON error
    naming the cause and exits 1, leaving no process behind."""
    env = serve_env(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        redis_url,
        sim.base_url,
        free_port(),
        WORKERS="2",
        POSTGRES_CONNECT_TIMEOUT_S="1",
    )
    served = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "creditgate.cli", "serve"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert served.returncode == 1
    answer = orjson.loads(served.stdout)
    assert answer["type"] == "WorkerStartupError"
    assert "could not start" in answer["error"]
    assert "READY" not in served.stdout.decode()


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie, or reaped)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


async def test_workers_stop_when_their_parent_is_killed(
    tmp_path: Path, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """kill -9 of the parent: each worker sees its parent's sentinel close and stops as on
    SIGTERM (no worker is left serving without a parent to restart or stop it)."""
    async with _fleet(tmp_path, database_url, redis_url, sim) as (process, _, _):
        workers = _children(process.pid)
        assert len(workers) == 2
        process.kill()
        await asyncio.to_thread(process.wait, 10)

        async def all_gone() -> bool:
            return all(_gone(pid) for pid in workers)

        await _until(all_gone, "the workers to stop")
    assert (tmp_path / "serve.err").read_text().count("the parent process died; stopping") == 2


REQUIRED = {
    "DATABASE_URL": "postgresql://cg@127.0.0.1:5432/cg",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "UPSTREAM_API_KEY": "sk-upstream",
}


def test_settings_workers_default_to_the_usable_cores_and_shutdown_to_30_s() -> None:
    settings = Settings.from_env(REQUIRED)
    assert settings.workers == len(os.sched_getaffinity(0))
    assert settings.shutdown_timeout_s == 30.0
    chosen = Settings.from_env(REQUIRED | {"WORKERS": "3", "SHUTDOWN_TIMEOUT_S": "2.5"})
    assert (chosen.workers, chosen.shutdown_timeout_s) == (3, 2.5)


@pytest.mark.parametrize(
    "env",
    [
        {"WORKERS": "0"},
        {"WORKERS": "many"},
        {"SHUTDOWN_TIMEOUT_S": "0"},
        {"WORKERS": "3", "METRICS_PORT": "8079"},  # worker 1 would take PORT (8080)
        {"WORKERS": "2", "METRICS_PORT": "65535"},  # worker 1 would have no port
    ],
    ids=["no-workers", "not-a-number", "no-shutdown-time", "metrics-on-port", "past-65535"],
)
def test_settings_refuse_bad_worker_settings(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(REQUIRED | env)
    assert len(info.value.problems) == 1
    assert any(name in info.value.problems[0] for name in env)
