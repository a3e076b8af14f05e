"""The paired benchmark's rounds and their report: what one round measured and the figures
derived from it, the per-round tables, the summary (medians over rounds against the targets),
the gateway's settlement check, and the JSON file. ``bench/paired.py`` does the measuring.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import checks
import report
import run
from sustain import Sustained

if TYPE_CHECKING:
    from paired import Options

SIDES = ("passthrough", "gateway")
# Run name -> (request body, concurrency; None: --connections), in the order they are run:
# the small prompt's runs. A prompt of N tokens (``--prompt-tokens``) adds the same runs on
# its own bodies, named ``chat@N``, ``stream@N``, ``latency@N`` (``runs_for``).
RUNS: dict[str, tuple[str, int | None]] = {
    "chat": ("chat", None),
    "stream": ("stream", None),
    "latency": ("chat", 1),
}


def sized(name: str, prompt_tokens: int) -> str:
    """A run's or a body's name for a prompt of ``prompt_tokens`` (0: the small prompt's)."""
    return f"{name}@{prompt_tokens}" if prompt_tokens else name


def runs_for(prompt_sizes: Sequence[int]) -> dict[str, tuple[str, int | None]]:
    """Every run for the prompt sizes, in the order they are run (``RUNS`` per size)."""
    return {
        sized(name, size): (sized(kind, size), concurrency)
        for size in prompt_sizes
        for name, (kind, concurrency) in RUNS.items()
    }


# How long to wait, before a run, for the gateway's outbox to empty; past it the run goes ahead.
SETTLE_LIMIT_S = 10.0


@dataclass
class Round:
    """One round: every run against both sides, back to back.

    Attributes:
        first: the side loaded first in every pair of this round.
        sides: per side, ``run.Bench``'s record of its runs (keyed by run name).
        steal_percent: per side and run, the share of the proxy core's time stolen by the
            hypervisor during the run.
        settle_wait_s: per side and run, how long the gateway's outbox took to empty after it.
        cpu_us_settled: per side and run, the proxy's CPU µs per request from the start of
            the run until the gateway's outbox was empty again: the cost with settlement.
    """

    number: int
    first: str
    sides: dict[str, report.TargetResult]
    runs: dict[str, tuple[str, int | None]] = field(default_factory=lambda: dict(RUNS))
    steal_percent: dict[str, dict[str, float]] = field(default_factory=dict)
    settle_wait_s: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_us_settled: dict[str, dict[str, float]] = field(default_factory=dict)

    def rps(self, side: str, run_name: str) -> float | None:
        """Requests/s of one run, None when it did not happen."""
        found = self.sides[side].runs.get(run_name)
        return found.requests_per_s if found else None

    def throughput_ratio(self, run_name: str) -> float | None:
        """Gateway req/s over pass-through req/s."""
        return _ratio(self.rps("gateway", run_name), self.rps("passthrough", run_name))

    def cpu_us(self, side: str, run_name: str, *, settled: bool = False) -> float | None:
        """The proxy's CPU µs per request during the run (``settled``: until the gateway's
        outbox was empty again)."""
        if settled:
            return self.cpu_us_settled.get(side, {}).get(run_name)
        return self.sides[side].proxy_cpu_us_per_request.get(run_name)

    def cpu_ratio(self, run_name: str, *, settled: bool = False) -> float | None:
        """Pass-through CPU per request over the gateway's (equals the req/s ratio when both
        proxies had their core to themselves)."""
        return _ratio(
            self.cpu_us("passthrough", run_name, settled=settled),
            self.cpu_us("gateway", run_name, settled=settled),
        )

    def settled_in_run(self, run_name: str) -> float | None:
        """``usage_events`` rows the gateway wrote during the run per request it completed:
        near 1 when settlement keeps up with the load."""
        found = self.sides["gateway"].runs.get(run_name)
        rows = self.sides["gateway"].settlement.get(run_name, {}).get("usage_rows")
        return _ratio(rows, found.requests if found else None)

    def latency_ms(self, side: str, key: str, run_name: str = "latency") -> float | None:
        """A latency percentile (``p50``, ``p99``, ...) of one run, in ms."""
        found = self.sides[side].runs.get(run_name)
        return found.latency_us[key] / 1000 if found else None

    def added_p50_ms(self, run_name: str = "latency") -> float | None:
        """The c=1 p50 of the gateway minus the pass-through's, in ms."""
        gateway = self.latency_ms("gateway", "p50", run_name)
        passthrough = self.latency_ms("passthrough", "p50", run_name)
        return None if gateway is None or passthrough is None else gateway - passthrough

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything measured in this round."""
        return {
            "round": self.number,
            "first": self.first,
            "throughput_ratio": {r: self.throughput_ratio(r) for r in self.runs},
            "cpu_ratio": {r: self.cpu_ratio(r) for r in self.runs},
            "cpu_ratio_settled": {r: self.cpu_ratio(r, settled=True) for r in self.runs},
            "settled_in_run": {r: self.settled_in_run(r) for r in self.runs},
            "added_p50_ms": {r: self.added_p50_ms(r) for r, (_, c) in self.runs.items() if c == 1},
            "sides": {
                side: {
                    "runs": {name: found.to_json() for name, found in result.runs.items()},
                    "proxy_cpu_us_per_request": result.proxy_cpu_us_per_request,
                    "proxy_cpu_percent": result.proxy_cpu_percent,
                    "upstream_cpu_percent": result.upstream_cpu_percent,
                    "cores_busy_percent": result.cores_busy_percent,
                    "steal_percent": self.steal_percent.get(side, {}),
                    "settle_wait_s": self.settle_wait_s.get(side, {}),
                    "cpu_us_per_request_settled": self.cpu_us_settled.get(side, {}),
                    "settlement": result.settlement,
                }
                for side, result in self.sides.items()
            },
        }


@dataclass
class Outcome:
    """Everything the measurement produced; ``error`` set when it stopped early."""

    checks: dict[str, dict[str, checks.CheckResult]] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    settlement: dict[str, Any] = field(default_factory=dict)
    gateway_cut_bound: int = 0
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    sustained: Sustained | None = None


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spread:
    """The median, min and max of one figure over the rounds that have it."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread | None:
        """None when no round has the figure."""
        found = [v for v in values if v is not None]
        if not found:
            return None
        return cls(statistics.median(found), min(found), max(found), len(found))


def summary(rounds: Sequence[Round], options: Options) -> list[dict[str, Any]]:
    """The paired figures over the rounds, each with its target and verdict."""
    out = []
    for size in options.prompt_tokens:
        out += _size_summary(rounds, options, size)
    return out


def _size_summary(rounds: Sequence[Round], options: Options, size: int) -> list[dict[str, Any]]:
    """``summary``'s figures for the prompt of ``size`` tokens (0: the small prompt)."""
    c = options.connections
    chat, stream, latency = sized("chat", size), sized("stream", size), sized("latency", size)
    prompt = f"{size}-token prompt" if size else "small prompt"
    figures: list[tuple[str, Callable[[Round], float | None]]] = [
        (f"{prompt}: c={c} chat req/s gateway/passthrough", lambda r: r.throughput_ratio(chat)),
        (
            f"{prompt}: c={c} stream req/s gateway/passthrough",
            lambda r: r.throughput_ratio(stream),
        ),
        (f"{prompt}: c={c} chat CPU/req passthrough/gateway", lambda r: r.cpu_ratio(chat)),
        (f"{prompt}: c={c} stream CPU/req passthrough/gateway", lambda r: r.cpu_ratio(stream)),
        (
            f"  {prompt}: the same, settlement catch-up included, chat",
            lambda r: r.cpu_ratio(chat, settled=True),
        ),
        (
            f"  {prompt}: the same, settlement catch-up included, stream",
            lambda r: r.cpu_ratio(stream, settled=True),
        ),
    ]
    ratio_goal = report.TARGET_THROUGHPUT_RATIO
    out = []
    for label, figure in figures:
        spread = Spread.of([figure(r) for r in rounds])
        out.append(
            {
                "figure": label.strip(),
                "label": label,
                "unit": "%",
                "spread": asdict(spread) if spread else None,
                "target": f">= {ratio_goal:.0%}",
                "ok": spread is not None and spread.median >= ratio_goal,
            }
        )
    spread = Spread.of([r.added_p50_ms(latency) for r in rounds])
    p50_goal = report.TARGET_ADDED_P50_MS
    out.append(
        {
            "figure": f"{prompt}: c=1 p50 gateway - passthrough",
            "label": f"{prompt}: c=1 p50 gateway - passthrough",
            "unit": "ms",
            "spread": asdict(spread) if spread else None,
            "target": f"<= {p50_goal} ms",
            "ok": spread is not None and spread.median <= p50_goal,
        }
    )
    return out


def render_round(current: Round, options: Options, total: int) -> str:
    """One round as a table: both sides of every run, and the paired figures (pt: the
    pass-through, gw: the gateway, +settle: CPU until the gateway's outbox was empty)."""

    def count(value: float | None) -> str:
        return _fmt(value, "{:.0f}")

    def percent(value: float | None) -> str:
        return _fmt(value, "{:.0%}")

    def both(values: dict[str, dict[str, float]], run_name: str) -> str:
        return "/".join(count(values.get(side, {}).get(run_name)) for side in SIDES)

    def latency(side: str, run_name: str) -> str:
        p50 = current.latency_ms(side, "p50", run_name)
        p99 = current.latency_ms(side, "p99", run_name)
        return "-" if p50 is None or p99 is None else f"{p50:.2f}/{p99:.2f}"

    def errors(run_name: str) -> str:
        found = [current.sides[side].runs.get(run_name) for side in SIDES]
        return "/".join("-" if f is None else str(f.failed) for f in found)

    def added(run_name: str) -> str:
        concurrency = current.runs[run_name][1]
        return _fmt(current.added_p50_ms(run_name), "{:+.3f}") if concurrency == 1 else "-"

    columns: list[tuple[str, int, Callable[[str], str]]] = [
        ("req/s pt", 9, lambda n: count(current.rps("passthrough", n))),
        ("gw", 6, lambda n: count(current.rps("gateway", n))),
        ("gw/pt", 7, lambda n: percent(current.throughput_ratio(n))),
        ("us/req pt", 11, lambda n: count(current.cpu_us("passthrough", n))),
        ("gw", 6, lambda n: count(current.cpu_us("gateway", n))),
        ("pt/gw", 7, lambda n: percent(current.cpu_ratio(n))),
        ("+settle pt", 12, lambda n: count(current.cpu_us("passthrough", n, settled=True))),
        ("gw", 6, lambda n: count(current.cpu_us("gateway", n, settled=True))),
        ("pt/gw", 7, lambda n: percent(current.cpu_ratio(n, settled=True))),
        ("p50/p99 ms pt", 16, lambda n: latency("passthrough", n)),
        ("gw", 14, lambda n: latency("gateway", n)),
        ("+p50 ms", 9, added),
        ("steal% pt/gw", 14, lambda n: both(current.steal_percent, n)),
        ("errors", 8, errors),
    ]
    lines = [
        f"round {current.number}/{total}, {current.first} first",
        "  " + f"{'run':<19}" + "".join(f"{title:>{width}}" for title, width, _ in columns),
    ]
    for run_name, (_kind, concurrency) in current.runs.items():
        label = f"{run_name} c={concurrency or options.connections}"
        cells = "".join(f"{cell(run_name):>{width}}" for _, width, cell in columns)
        lines.append(f"  {label:<19}{cells}")
    return "\n".join(lines)


def render_summary(outcome: Outcome, options: Options) -> str:
    """The medians over rounds with targets and verdicts, the medians of the raw figures, and
    the gateway's settlement check."""
    rounds = outcome.rounds
    lines = [f"summary over {len(rounds)} round(s): median (min..max)"]
    rows = summary(rounds, options)
    width = max(len(row["label"]) for row in rows) + 2
    for row in rows:
        spread = row["spread"]
        if spread is None:
            value = "-"
        elif row["unit"] == "%":
            value = f"{spread['median']:.0%} ({spread['low']:.0%}..{spread['high']:.0%})"
        else:
            value = f"{spread['median']:+.3f} ms ({spread['low']:+.3f}..{spread['high']:+.3f})"
        verdict = "ok" if row["ok"] else "MISSED"
        lines.append(f"  {row['label']:<{width}}{value:<30}{row['target']}: {verdict}")
    lines.append(render_medians(rounds, options))
    failed = {
        s: sum(found.failed for r in rounds for found in r.sides[s].runs.values()) for s in SIDES
    }
    if any(failed.values()):
        lines.append(
            f"  WARNING: wrk counted errors (non-2xx + socket): passthrough {failed['passthrough']}"
            f", gateway {failed['gateway']}"
        )
    if outcome.settlement:
        lines.append("")
        lines.append(render_settlement(outcome))
    return "\n".join(lines)


def render_medians(rounds: Sequence[Round], options: Options) -> str:
    """Each run's raw figures, passthrough/gateway, each the median over the rounds."""

    def pair(run_name: str, figure: Callable[[Round, str], float | None], pattern: str) -> str:
        found = [_median([figure(r, side) for r in rounds]) for side in SIDES]
        return "/".join(_fmt(value, pattern) for value in found)

    columns: list[tuple[str, int, Callable[[str], str]]] = [
        ("req/s", 12, lambda n: pair(n, lambda r, side: r.rps(side, n), "{:.0f}")),
        ("CPU us/req", 12, lambda n: pair(n, lambda r, side: r.cpu_us(side, n), "{:.0f}")),
        (
            "+settle",
            12,
            lambda n: pair(n, lambda r, side: r.cpu_us(side, n, settled=True), "{:.0f}"),
        ),
        ("p50 ms", 14, lambda n: pair(n, lambda r, side: r.latency_ms(side, "p50", n), "{:.2f}")),
        ("p99 ms", 14, lambda n: pair(n, lambda r, side: r.latency_ms(side, "p99", n), "{:.2f}")),
        (
            "steal%",
            9,
            lambda n: pair(n, lambda r, side: r.steal_percent.get(side, {}).get(n), "{:.0f}"),
        ),
        (
            "gw settled in run",
            19,
            lambda n: _fmt(_median([r.settled_in_run(n) for r in rounds]), "{:.0%}"),
        ),
    ]
    lines = [
        f"  {'medians, pt/gw':<21}" + "".join(f"{title:>{width}}" for title, width, _ in columns)
    ]
    for run_name, (_kind, concurrency) in options.runs.items():
        label = f"{run_name} c={concurrency or options.connections}"
        cells = "".join(f"{cell(run_name):>{width}}" for _, width, cell in columns)
        lines.append(f"    {label:<19}{cells}")
    return "\n".join(lines)


def render_settlement(outcome: Outcome) -> str:
    """The gateway's settlement check: ``usage_events`` rows against the requests clients
    completed, the outbox right after each run, and after the last (``run.Bench.drain``)."""
    totals = outcome.settlement
    rows, completed = totals["usage_rows"], totals["requests_completed_by_clients"]
    extra = rows - completed
    verdict = "ok" if 0 <= extra <= outcome.gateway_cut_bound else "CHECK"
    by_kind = ", ".join(f"{k} {v}" for k, v in totals["usage_by_source_status"].items())
    after_runs = [
        found["outbox_after_run"]
        for r in outcome.rounds
        for found in r.sides["gateway"].settlement.values()
    ]
    waits = [w for r in outcome.rounds for w in r.settle_wait_s.get("gateway", {}).values()]
    end, later = totals["outbox_at_end"], totals["outbox_later"]
    empty = later["xlen"] == 0 and later["pending"] == 0
    lines = [
        "gateway settlement (usage_events in Postgres, the sharded outbox streams in Redis)",
        f"  usage_events: {rows} rows for {completed} requests clients completed, {extra:+d} "
        f"(expected 0..+{outcome.gateway_cut_bound}: wrk cuts up to c in flight per run, the "
        f"gateway settles them): {verdict}; {by_kind or 'no rows'}",
    ]
    if after_runs and waits:
        lines.append(
            f"  outbox right after each gateway run: up to XLEN "
            f"{max(a['xlen'] for a in after_runs)}, pending {max(a['pending'] for a in after_runs)}"
            f"; empty again within {max(waits):.1f} s each time"
            + ("" if max(waits) < SETTLE_LIMIT_S else f" (NOT within {SETTLE_LIMIT_S:.0f} s)")
        )
    lines.append(
        f"  after the last run: XLEN {end['xlen']}, pending {end['pending']}; "
        f"{totals['later_s']:.0f} s later: XLEN {later['xlen']}, pending {later['pending']}: "
        + ("ok" if empty else "NOT empty")
    )
    return "\n".join(lines)


def print_report(outcome: Outcome, options: Options, meta: dict[str, Any]) -> None:
    """The checks, the summary, notes and errors; and the JSON file unless ``--no-save``."""
    print()
    for side, found in outcome.checks.items():
        for kind, check in found.items():
            if not check.ok:
                print(f"{side} {kind} check FAILED: {check.detail}")
    if outcome.rounds:
        print(render_summary(outcome, options))
    if outcome.sustained is not None:
        print("\n" + outcome.sustained.render())
    for note in outcome.notes:
        print("\nnote: " + note)
    if outcome.error:
        print(f"\nstopped early ({len(outcome.rounds)} of {options.rounds} rounds):")
        print(outcome.error)
    if options.save and (outcome.rounds or outcome.error):
        document = {
            "meta": meta,
            "options": asdict(options),
            "checks": {
                side: {kind: asdict(check) for kind, check in found.items()}
                for side, found in outcome.checks.items()
            },
            "summary": summary(outcome.rounds, options),
            "rounds": [r.to_json() for r in outcome.rounds],
            "settlement": outcome.settlement,
            "gateway_cut_bound": outcome.gateway_cut_bound,
            "notes": outcome.notes,
            "error": outcome.error,
            "sustained": outcome.sustained.to_json() if outcome.sustained else None,
        }
        run.save_json("paired", document)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator
