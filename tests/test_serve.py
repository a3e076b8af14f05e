"""``creditgate.serve``: the process settings applied once serving has started."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from billing.metering.redis_keys import outbox_key, shard_of
from creditgate.serve import GC_GEN0_THRESHOLD, run_services, tune_gc_for_serving
from devtools.localservices import free_port
from devtools.simulator import Simulator
from tests.harness import gateway_settings, seed_database


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_freezes_the_start_up_heap_and_raises_only_generation_0(restore_gc):
    gc.unfreeze()
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    tune_gc_for_serving()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
    assert GC_GEN0_THRESHOLD > before[0]


async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        name: float(value)
        for family in text_string_to_metric_families(text)
        for name, _labels, value, *_ in family.samples
    }


async def test_serve_exports_dead_letters_on_the_metrics_port_only(
    restore_gc, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """``creditgate serve`` answers /metrics on METRICS_PORT, and the dead-letter counter
    moves when its settlement poster dead-letters an entry; the proxy port has no /metrics."""
    await seed_database(database_url)
    settings = gateway_settings(
        database_url, redis_url, sim.base_url, admin_port=free_port(), metrics_port=free_port()
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(run_services(settings, stop))
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    name = "creditgate_settlements_dead_lettered_total"
    try:
        async with aiohttp.ClientSession() as session:
            while True:  # until the sites are up
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    before = await _scrape(session, url)
                    break
                await asyncio.sleep(0.05)
            assert before[name] == 0
            assert before["creditgate_usage_clamped_total"] == 0
            assert before["creditgate_usage_unusable_total"] == 0

            client = aioredis.from_url(redis_url, decode_responses=True)
            try:
                await client.xadd(
                    outbox_key(shard_of(1)), {"p": "not a record", "c": "1", "a": "1"}
                )
            finally:
                await client.aclose()
            while True:  # until the poster met the entry
                after = await _scrape(session, url)
                if after[name]:
                    break
                await asyncio.sleep(0.05)
            assert after[name] == 1

            proxy = f"http://127.0.0.1:{settings.port}/metrics"
            async with session.get(proxy) as response:
                assert response.status == 404
    finally:
        stop.set()
        await serving


async def _scrape_labelled(
    session: aiohttp.ClientSession, url: str
) -> dict[tuple[str, str], float]:
    async with session.get(url) as response:
        text = await response.text()
    return {
        (name, ",".join(f"{k}={v}" for k, v in sorted(labels.items()))): float(value)
        for family in text_string_to_metric_families(text)
        for name, labels, value, *_ in family.samples
    }


async def _until(session: aiohttp.ClientSession, url: str, key: tuple[str, str], value: float):
    """Scrape until ``key`` reads ``value`` (the test's timeout fails it otherwise)."""
    while True:
        if (await _scrape_labelled(session, url)).get(key) == value:
            return
        await asyncio.sleep(0.05)


async def test_serve_exports_the_edge_connection_counters(
    restore_gc, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """Open, refused (the cap) and timed-out (header and body deadlines) connections of the
    gateway show on /metrics; before, /metrics had none of them."""
    await seed_database(database_url)
    settings = gateway_settings(
        database_url,
        redis_url,
        sim.base_url,
        admin_port=free_port(),
        metrics_port=free_port(),
        http_max_connections=1,
        http_header_timeout_s=0.3,
        http_body_timeout_s=0.3,
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(run_services(settings, stop))
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    opened = ("creditgate_http_connections_open", "service=gateway")
    try:
        async with aiohttp.ClientSession() as session:
            while True:  # until the sites are up
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    before = await _scrape_labelled(session, url)
                    break
                await asyncio.sleep(0.05)
            assert before[opened] == 0
            assert before[("creditgate_http_connections_open", "service=admin")] == 0

            _, silent = await asyncio.open_connection("127.0.0.1", settings.port)
            await _until(session, url, opened, 1)
            _, refused = await asyncio.open_connection("127.0.0.1", settings.port)
            await _until(
                session, url, ("creditgate_http_connections_refused_total", "service=gateway"), 1
            )
            # The silent connection sends no header: the header deadline closes it.
            await _until(
                session, url, ("creditgate_http_connections_timed_out_total", "stage=header"), 1
            )
            await _until(session, url, opened, 0)
            _, slow_body = await asyncio.open_connection("127.0.0.1", settings.port)
            slow_body.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
            )
            await _until(
                session, url, ("creditgate_http_connections_timed_out_total", "stage=body"), 1
            )
            for writer in (silent, refused, slow_body):
                writer.close()
    finally:
        stop.set()
        await serving


async def test_serve_exports_each_family_once_with_the_process_collector(
    restore_gc, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """One scrape of serve's combined registry (both apps, the process counters, the edge):
    no family twice (the purchases and the task restarts are shared by both apps and exported
    by one), and the process's CPU, memory and descriptors are there."""
    await seed_database(database_url)
    settings = gateway_settings(
        database_url, redis_url, sim.base_url, admin_port=free_port(), metrics_port=free_port()
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(run_services(settings, stop))
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            while True:  # until the sites are up
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(url) as response:
                        text = await response.text()
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await serving
    families = Counter(family.name for family in text_string_to_metric_families(text))
    assert [name for name, count in families.items() if count > 1] == []
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "creditgate_background_task_restarts",
        "creditgate_purchases",
        "creditgate_purchased_millicredits",
        "creditgate_requests",
    ):
        assert families[name] == 1, name
    assert "process_cpu_seconds_total" in text


async def test_serve_binds_metrics_to_metrics_host_not_host(
    restore_gc, database_url: str, redis_url: str, sim: Simulator
) -> None:
    """METRICS_HOST, not HOST, is where /metrics listens: on 127.0.0.2 here (loopback too),
    and nothing on HOST's 127.0.0.1 at that port."""
    await seed_database(database_url)
    settings = gateway_settings(
        database_url,
        redis_url,
        sim.base_url,
        admin_port=free_port(),
        metrics_port=free_port(),
        metrics_host="127.0.0.2",
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(run_services(settings, stop))
    try:
        async with aiohttp.ClientSession() as session:
            while True:  # until the sites are up (the test's timeout fails it otherwise)
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    scraped = await _scrape(
                        session, f"http://127.0.0.2:{settings.metrics_port}/metrics"
                    )
                    break
                await asyncio.sleep(0.05)
            assert "creditgate_settlements_dead_lettered_total" in scraped
            with pytest.raises(aiohttp.ClientConnectionError):
                await _scrape(session, f"http://127.0.0.1:{settings.metrics_port}/metrics")
    finally:
        stop.set()
        await serving
