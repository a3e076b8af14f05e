"""Prometheus metrics, served as ``GET /metrics`` on a port of their own (``METRICS_PORT``),
never on the proxy's.

The counters live where the work happens, as plain integers on the process's stats objects
(``gateway.usage.UsageStats``, ``billing.metering.posting.PosterStats``, ...): bumping one
costs the hot path an attribute increment, no lock and no label lookup. ``StatsCollector``
reads them when Prometheus scrapes. A new counter is one more ``CounterReading`` in the list
the service builds (``creditgate.serve.process_counters``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True, slots=True)
class CounterReading:
    """One counter read from a stats object at scrape time.

    Attributes:
        name: the metric's name without the ``_total`` suffix Prometheus adds, e.g.
            ``creditgate_usage_clamped``.
        documentation: the HELP text.
        read: the counter's current value (called on the event loop's thread, where the
            stats objects are written, so no value is read half-written).
    """

    name: str
    documentation: str
    read: Callable[[], int]


@dataclass(frozen=True, slots=True)
class LabelledReading:
    """A counter or gauge with one label, read from stats objects at scrape time.

    Attributes:
        name: as ``CounterReading.name`` (a gauge's is its whole name).
        label: the label's name, e.g. ``service``.
        read: ``{label value: value}`` now (on the event loop's thread).
        gauge: a gauge (a value now), not a counter.
    """

    name: str
    documentation: str
    label: str
    read: Callable[[], Mapping[str, int]]
    gauge: bool = False


class StatsCollector(Collector):
    """A Prometheus collector of ``CounterReading``s and ``LabelledReading``s."""

    def __init__(
        self, counters: Sequence[CounterReading], labelled: Sequence[LabelledReading] = ()
    ) -> None:
        self._counters = tuple(counters)
        self._labelled = tuple(labelled)

    def collect(self) -> Iterator[Metric]:
        """Each counter with its value now."""
        for counter in self._counters:
            yield CounterMetricFamily(counter.name, counter.documentation, value=counter.read())
        for reading in self._labelled:
            family_type = GaugeMetricFamily if reading.gauge else CounterMetricFamily
            family = family_type(reading.name, reading.documentation, labels=[reading.label])
            for label_value, value in reading.read().items():
                family.add_metric([label_value], value)
            yield family


class RegistriesCollector(Collector):
    """Every metric of other registries (each app's ``runtime.appkeys.METRICS``), so one
    ``/metrics`` answers for all the apps of a process."""

    def __init__(self, registries: Sequence[CollectorRegistry]) -> None:
        self._registries = tuple(registries)

    def collect(self) -> Iterator[Metric]:
        """Each registry's metrics, in order."""
        for registry in self._registries:
            yield from registry.collect()


def metrics_registry(
    counters: Sequence[CounterReading],
    labelled: Sequence[LabelledReading] = (),
    registries: Sequence[CollectorRegistry] = (),
) -> CollectorRegistry:
    """A registry of its own holding ``counters``, ``labelled`` and everything in
    ``registries`` (not prometheus_client's global one: no state at import time, and one
    registry per process and test)."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(counters, labelled))
    if registries:
        registry.register(RegistriesCollector(registries))
    return registry


def create_metrics_app(registry: CollectorRegistry) -> web.Application:
    """The metrics service: ``GET /metrics`` in Prometheus's text format, nothing else."""

    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    return app
