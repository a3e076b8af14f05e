"""Every metric named in a Grafana panel (grafana/dashboards/*.json) or a Prometheus rule
(prometheus/rules/*.yml) is one the service exports: the PromQL is parsed (promql-parser)
and its metric names compared with a live scrape of a ``creditgate serve`` subprocess.

A name is defined when a recording rule records it, when Prometheus itself makes it for every
target (``up``), or when the scrape has it: a family ``x`` is ``x`` for a gauge, ``x_total``
for a counter and ``x_bucket``/``x_sum``/``x_count`` for a histogram.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devtools.localservices import free_port
from devtools.simulator import Simulator
from tests.harness import create_account_with_key, seed_database, serve_env, start_serve

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
# Made by Prometheus for every scrape target, not by the service.
SCRAPE_SERIES = frozenset({"up"})
# Grafana's interval variables, replaced by a duration so the expression parses as PromQL.
GRAFANA_VARIABLE = re.compile(r"\$__(rate_interval|interval|range)\b")


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """``(where, expr)`` of every target of every panel (rows' nested panels too)."""
    for path in DASHBOARDS:
        stack = list(json.loads(path.read_text())["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']}", target["expr"]


def rules() -> Iterator[tuple[str, dict[str, str]]]:
    """``(file name, rule)`` of every rule of every group."""
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                yield path.name, rule


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (by name or by a ``__name__`` equality)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                names.update(
                    matcher.value
                    for matcher in node.matchers.matchers
                    if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal
                )

    promql_parser.walk(promql_parser.parse(GRAFANA_VARIABLE.sub("5m", expr)), visit)
    return names


def matcher_labels(expr: str) -> dict[str, set[str]]:
    """For each metric name selected by name, the label names its matchers test."""
    labels: dict[str, set[str]] = {}

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            labels.setdefault(node.name, set()).update(
                matcher.name for matcher in node.matchers.matchers if matcher.name != "__name__"
            )

    promql_parser.walk(promql_parser.parse(GRAFANA_VARIABLE.sub("5m", expr)), visit)
    return labels


def all_exprs() -> Iterator[tuple[str, str]]:
    """``(where, expr)`` of every dashboard target and every rule."""
    yield from dashboard_exprs()
    for file_name, rule in rules():
        yield f"{file_name}: {rule.get('record') or rule.get('alert')}", rule["expr"]


def referenced_names() -> dict[str, set[str]]:
    """Every metric name the dashboards and the rules read, with where it is read."""
    used: dict[str, set[str]] = {}
    for where, expr in all_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used


def exported_names(text: str) -> dict[str, set[str]]:
    """The series names a scrape in Prometheus's text format can hold, by family type, each
    with the label names its samples carry (plus ``job`` and ``instance``, which Prometheus
    adds)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, {"job", "instance"})
        for sample in family.samples:
            names.setdefault(sample.name, {"job", "instance"}).update(sample.labels)
    return names


def test_metric_names_follows_selectors_inside_functions_and_binary_operators() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="1"}[$__rate_interval])))'
        " / on (job) group_left max without (instance) (b offset 1d)"
        ' > 3 * avg_over_time(c:d:rate5m[1h]) and {__name__="e", y=~".+"} or vector(1)'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:d:rate5m", "e"}
    assert matcher_labels(expr) == {"a_bucket": {"x"}, "b": set(), "c:d:rate5m": set()}


def test_the_dashboards_and_rules_read_metrics_and_use_the_prometheus_datasource() -> None:
    assert len(DASHBOARDS) == 3 and RULE_FILES
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["schemaVersion"] == 39
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["type"] in {"timeseries", "stat", "table"}, panel["title"]
            assert panel["datasource"]["uid"] == "prometheus", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "prometheus", panel["title"]
    assert all(metric_names(expr) for _, expr in dashboard_exprs())


# --- the live scrape ------------------------------------------------------------------------


async def _key_with(database_url: str, credits_millicredits: int) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        _, key = await create_account_with_key(conn, credits_millicredits, name="drift")
    finally:
        await conn.close()
    return key


@pytest.fixture
async def served(database_url: str, redis_url: str, sim: Simulator, tmp_path: Path):
    """``(gateway base URL, metrics URL)`` of a ``creditgate serve`` subprocess."""
    await seed_database(database_url)
    port, metrics_port = free_port(), free_port()
    env = serve_env(
        database_url,
        redis_url,
        sim.base_url,
        port,
        METRICS_PORT=str(metrics_port),
        PURCHASES_ENABLED="false",
    )
    # A recorded reconciliation run: its gauges are exported once the refresh loop has read it.
    reconciled = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-P", "-m", "creditgate.cli", "reconcile"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    process = await start_serve(env, tmp_path / "serve.out", tmp_path / "serve.err")
    try:
        yield f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()


async def _scrape_after_the_fleet_refresh(metrics_url: str) -> dict[str, set[str]]:
    """The names of a scrape taken once the fleet gauges' first read from Postgres is in
    (``creditgate_outstanding_millicredits`` appears), or after 10 s."""
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(metrics_url) as response:
                assert response.status == 200
                scraped = exported_names(await response.text())
            if "creditgate_outstanding_millicredits" in scraped or time.monotonic() > deadline:
                return scraped
            await asyncio.sleep(0.1)


async def test_every_metric_in_a_dashboard_or_rule_is_exported_or_recorded(
    served: tuple[str, str], database_url: str
) -> None:
    base_url, metrics_url = served
    # A little traffic: a paid request and a 402.
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    paid = await _key_with(database_url, 10_000_000)
    async with openai.AsyncOpenAI(api_key=paid, base_url=base_url, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    broke = await _key_with(database_url, 0)
    async with openai.AsyncOpenAI(api_key=broke, base_url=base_url, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert refused.value.status_code == 402
    # A checkout (purchases are off here: 503), for creditgate_checkout_requests_total{status}.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url.removesuffix("/v1") + "/api/billing/checkout",
            json={"packageCode": "starter"},
            headers={"Authorization": f"Bearer {paid}"},
        ) as response,
    ):
        assert response.status == 503
    scraped = await _scrape_after_the_fleet_refresh(metrics_url)

    recorded = {rule["record"] for _, rule in rules() if "record" in rule}
    missing = {
        name: sorted(where)
        for name, where in sorted(referenced_names().items())
        if name not in scraped.keys() | recorded | SCRAPE_SERIES
    }
    assert not missing, "read by a dashboard or a rule but not exported:\n" + "\n".join(
        f"{name}  ({'; '.join(where)})" for name, where in missing.items()
    )
    # A matcher on a label the metric does not have selects nothing, silently.
    unknown_labels = {
        f"{name}{{{label}}}  ({where})"
        for where, expr in all_exprs()
        for name, labels in matcher_labels(expr).items()
        if name in scraped
        for label in labels - scraped[name]
    }
    assert not unknown_labels, "matchers on labels the metric has not:\n" + "\n".join(
        sorted(unknown_labels)
    )
