"""The gateway's traffic and money metrics, and its access log line: recorded once per billed
request where it ends (``gateway.proxy.handle_billed``), and at its settlement.

``TrafficMetrics`` owns every per-request metric of the gateway, registered on the app's own
registry (``runtime.appkeys.METRICS``). The hot path pays a handful of ``inc``/``observe``
calls on label children that are resolved once and kept in dicts keyed by their label values
(``labels()`` hashes and validates its arguments on every call).

Label values are bounded: ``model`` is a model that has a rate card (``other`` when the
request named none, or none we price); ``endpoint`` is one of ``gateway.proxy.ENDPOINTS``;
``status`` is an HTTP status code; ``reason`` is an error code of a 402 answer.

Counters are per process: several gateway processes are several scrape targets and PromQL
sums them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from billing.metering.pricing import RateCard

if TYPE_CHECKING:
    from prometheus_client.metrics import Counter as CounterChild
    from prometheus_client.metrics import Histogram as HistogramChild

    from gateway.usage import Usage

#: The model label of a request that named no model we price.
OTHER_MODEL = "other"

#: Seconds; a streamed answer can last minutes, so the buckets go past the default 10 s.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Token counts are per 1,000 at micro-USD rates: tokens x rate is in 1e-9 USD.
_NANO_USD_PER_USD = 1_000_000_000


class TrafficMetrics:
    """Every per-request metric of one gateway app (see the module docstring).

    Attributes:
        holds_open: holds this process placed and has not settled or voided yet.
        held_millicredits: the sum of those holds.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            "creditgate_requests",
            "Answers of billed routes, refusals included, by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"],
            registry=registry,
        )
        self._request_duration = Histogram(
            "creditgate_request_duration_seconds",
            "Billed requests from arrival to the last byte sent (streams included).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._upstream_duration = Histogram(
            "creditgate_upstream_duration_seconds",
            "Upstream requests from their start to the end of the upstream's body.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._ttfb = Histogram(
            "creditgate_time_to_first_byte_seconds",
            "Billed requests from arrival to the first body byte relayed to the client.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._tokens = Counter(
            "creditgate_tokens",
            "Tokens of settled usage by model and type: input (uncached prompt tokens), "
            "cached_input, output; the three add up to the request's tokens.",
            ["model", "type"],
            registry=registry,
        )
        self._deducted = Counter(
            "creditgate_deducted_millicredits",
            "Millicredits charged at settlement (exactly the settled charges).",
            ["model"],
            registry=registry,
        )
        self._upstream_cost = Counter(
            "creditgate_upstream_cost_usd",
            "What the upstream charges for the settled tokens, in USD, at the upstream prices "
            "of the rate card each request was charged at (cached input at the input price).",
            ["model"],
            registry=registry,
        )
        self._payment_required = Counter(
            "creditgate_payment_required",
            "402 answers by error code (insufficient_credits, spend_cap_exceeded, ...).",
            ["reason"],
            registry=registry,
        )
        self.holds_open = 0
        self.held_millicredits = 0
        Gauge(
            "creditgate_holds_open",
            "Holds this process placed and has not settled or voided yet.",
            registry=registry,
        ).set_function(lambda: self.holds_open)
        Gauge(
            "creditgate_held_millicredits",
            "Millicredits held by this process's open holds.",
            registry=registry,
        ).set_function(lambda: self.held_millicredits)
        self._request_children: dict[tuple[str, str, int], CounterChild] = {}
        self._latency_children: dict[str, tuple[HistogramChild, HistogramChild, HistogramChild]]
        self._latency_children = {}
        self._money_children: dict[str, tuple[CounterChild, ...]] = {}
        self._reason_children: dict[str, CounterChild] = {}

    # -- per request ----------------------------------------------------------------------

    def count_request(self, endpoint: str, model: str, status: int) -> None:
        """One answer of a billed route (``model``: one with a rate card, or ``other``)."""
        key = (endpoint, model, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(
                endpoint, model, str(status)
            )
        child.inc()

    def observe_latency(
        self, endpoint: str, *, total_s: float, first_byte_s: float, upstream_s: float | None
    ) -> None:
        """The latencies of one answered request, in seconds (``upstream_s`` None: the
        upstream was never asked, or never answered)."""
        children = self._latency_children.get(endpoint)
        if children is None:
            children = self._latency_children[endpoint] = (
                self._request_duration.labels(endpoint),
                self._ttfb.labels(endpoint),
                self._upstream_duration.labels(endpoint),
            )
        total, ttfb, upstream = children
        total.observe(total_s)
        ttfb.observe(first_byte_s)
        if upstream_s is not None:
            upstream.observe(upstream_s)

    def count_payment_required(self, reason: str) -> None:
        """One 402 answer with error code ``reason``."""
        child = self._reason_children.get(reason)
        if child is None:
            child = self._reason_children[reason] = self._payment_required.labels(reason)
        child.inc()

    def count_settlement(self, card: RateCard, usage: Usage, cost_millicredits: int) -> None:
        """A settlement's tokens, charge and upstream cost (``card``: the one it was
        charged at; its ``model`` is the label)."""
        children = self._money_children.get(card.model)
        if children is None:
            model = card.model
            children = self._money_children[model] = (
                self._tokens.labels(model, "input"),
                self._tokens.labels(model, "cached_input"),
                self._tokens.labels(model, "output"),
                self._deducted.labels(model),
                self._upstream_cost.labels(model),
            )
        uncached_in, cached_in, out, deducted, upstream_cost = children
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        uncached_in.inc(usage.prompt_tokens - cached)
        cached_in.inc(cached)
        out.inc(usage.completion_tokens)
        deducted.inc(cost_millicredits)
        upstream_cost.inc(upstream_cost_nano_usd(card, usage) / _NANO_USD_PER_USD)

    def hold_placed(self, amount_millicredits: int) -> None:
        """A hold of ``amount_millicredits`` was placed by this process."""
        self.holds_open += 1
        self.held_millicredits += amount_millicredits

    def hold_released(self, amount_millicredits: int) -> None:
        """A hold of this process was settled or voided."""
        self.holds_open -= 1
        self.held_millicredits -= amount_millicredits


def upstream_cost_nano_usd(card: RateCard, usage: Usage) -> int:
    """What the upstream charges for ``usage`` at ``card``'s upstream prices, in 1e-9 USD
    (exact: micro-USD per 1,000 tokens times tokens). Cached prompt tokens are priced at the
    input price; a card without upstream prices costs 0."""
    return (
        usage.prompt_tokens * card.upstream_input_microusd_per_1k_tokens
        + usage.completion_tokens * card.upstream_output_microusd_per_1k_tokens
    )
