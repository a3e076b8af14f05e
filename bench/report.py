"""The benchmark's results: what was measured on each target, and how it is printed.

``TargetResult`` holds one target's numbers; the ``render_*`` functions turn them into the
plain-text report (with the goals printed beside the numbers, never asserted) and
``to_json`` into the document saved under ``bench/results/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import checks
import wrkload

TARGETS = ("direct", "passthrough", "gateway")
# What the gateway should reach (printed beside the results, never asserted).
TARGET_THROUGHPUT_RATIO = 0.60
TARGET_ADDED_P50_MS = 0.5


@dataclass
class TargetResult:
    """Everything measured on one target; ``error`` set when it could not be measured."""

    name: str
    checks: dict[str, checks.CheckResult] = field(default_factory=dict)
    runs: dict[str, wrkload.WrkResult] = field(default_factory=dict)
    proxy_cpu_percent: dict[str, float] = field(default_factory=dict)
    proxy_cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    upstream_cpu_percent: dict[str, float] = field(default_factory=dict)
    cores_busy_percent: dict[str, dict[int, float]] = field(default_factory=dict)
    settlement: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def render_table(results: dict[str, TargetResult], *, connections: int) -> str:
    """The results as a plain-text table with the targets beside them."""
    names = [n for n in TARGETS if n in results]

    def latency(name: str, key: str) -> float | None:
        run = results[name].runs.get("latency") if name in results else None
        return run.latency_us[key] if run else None

    def added(name: str, key: str) -> float | None:
        own, base = latency(name, key), latency("direct", key)
        return None if own is None or base is None or name == "direct" else own - base

    def rps(name: str, kind: str) -> float | None:
        run = results[name].runs.get(kind) if name in results else None
        return run.requests_per_s if run else None

    def both(values: dict[str, float]) -> str:
        got = [values.get(kind) for kind in ("chat", "stream")]
        return "/".join("-" if v is None else f"{v:.0f}" for v in got)

    def checks_cell(name: str) -> str:
        found = results[name].checks.values()
        return "/".join("ok" if c.ok else "FAIL" for c in found) or "-"

    def cpu_per_request(name: str, kind: str) -> float | None:
        return results[name].proxy_cpu_us_per_request.get(kind) if name in results else None

    c = connections
    rows: list[tuple[str, list[str], str]] = [
        ("check chat/stream", [checks_cell(n) for n in names], ""),
        ("c=1 chat min ms", [_ms(latency(n, "min")) for n in names], ""),
        ("c=1 chat p50 ms", [_ms(latency(n, "p50")) for n in names], ""),
        ("c=1 chat p99 ms", [_ms(latency(n, "p99")) for n in names], ""),
        (
            "added p50 vs direct ms",
            [_ms(added(n, "p50"), sign=True) for n in names],
            _latency_target(added("gateway", "p50"), added("passthrough", "p50")),
        ),
        ("added p99 vs direct ms", [_ms(added(n, "p99"), sign=True) for n in names], ""),
    ]
    for kind in ("chat", "stream"):
        rows.append(
            (
                f"c={c} {kind} req/s",
                [_count(rps(n, kind)) for n in names],
                _throughput_target(rps("gateway", kind), rps("passthrough", kind)),
            )
        )
    for kind in ("chat", "stream"):
        rows.append(
            (
                f"proxy CPU us/req c={c} {kind}",
                [_count(cpu_per_request(n, kind)) for n in names],
                _cpu_ratio(cpu_per_request("gateway", kind), cpu_per_request("passthrough", kind)),
            )
        )
    rows += [
        (
            "errors (non-2xx+socket)",
            [str(sum(r.failed for r in results[n].runs.values())) for n in names],
            "",
        ),
        ("proxy CPU % chat/stream", [both(results[n].proxy_cpu_percent) for n in names], ""),
        ("upstream CPU % chat/stream", [both(results[n].upstream_cpu_percent) for n in names], ""),
    ]
    cores = sorted(
        {core for r in results.values() for v in r.cores_busy_percent.values() for core in v}
    )
    for core in cores:
        cells = [
            both({run: busy.get(core, 0.0) for run, busy in results[n].cores_busy_percent.items()})
            for n in names
        ]
        rows.append((f"core {core} busy % chat/stream", cells, ""))

    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{n:>13}" for n in names) + "   target"]
    for label, cells, target in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{c:>13}" for c in cells) + f"   {target}")
    return "\n".join(lines)


def _ms(us: float | None, *, sign: bool = False) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:+.3f}" if sign else f"{us / 1000:.3f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _latency_target(gateway: float | None, passthrough: float | None) -> str:
    if gateway is None or passthrough is None:
        return f"gateway p50 <= passthrough's + {TARGET_ADDED_P50_MS} ms"
    gap_ms = (gateway - passthrough) / 1000
    verdict = "ok" if gap_ms <= TARGET_ADDED_P50_MS else "MISSED"
    return f"gateway - passthrough = {gap_ms:+.3f} ms (<= {TARGET_ADDED_P50_MS}): {verdict}"


def _cpu_ratio(gateway: float | None, passthrough: float | None) -> str:
    if gateway is None or not passthrough:
        return ""
    return f"passthrough/gateway = {passthrough / gateway:.0%} (the req/s ratio on a quiet core)"


def _throughput_target(gateway: float | None, passthrough: float | None) -> str:
    if gateway is None or not passthrough:
        return f"gateway >= {TARGET_THROUGHPUT_RATIO:.0%} of passthrough"
    ratio = gateway / passthrough
    verdict = "ok" if ratio >= TARGET_THROUGHPUT_RATIO else "MISSED"
    return f"gateway/passthrough = {ratio:.0%} (>= {TARGET_THROUGHPUT_RATIO:.0%}): {verdict}"


def render_settlement(result: TargetResult) -> str:
    """The gateway's settlement section: rows/s per run and the outbox backlog."""
    s = result.settlement
    if not s:
        return ""
    lines = [
        "gateway settlement into Postgres (usage_events) and outbox (every shard's stream)",
        f"  {'run':<9}{'req/s':>9}{'rows/s':>9}{'rows/req':>10}   outbox after run (XLEN/pending)",
    ]
    for run_name in ("latency", "chat", "stream"):
        if run_name not in s:
            continue
        r = s[run_name]
        ratio = r["usage_rows_per_s"] / r["requests_per_s"] if r["requests_per_s"] else 0.0
        lines.append(
            f"  {run_name:<9}{r['requests_per_s']:>9.0f}{r['usage_rows_per_s']:>9.0f}"
            f"{ratio:>10.2f}   {r['outbox_after_run']['xlen']}/{r['outbox_after_run']['pending']}"
        )
    t = s.get("totals")
    if t:
        end, later = t["outbox_at_end"], t["outbox_later"]
        drained = (
            f"empty {t['drained_after_s']} s after the last run"
            if t["drained_after_s"] is not None
            else f"NOT drained {t['drain_limit_s']:.0f} s after the last run"
        )
        lines.append(
            f"  outbox at end: XLEN {end['xlen']}, pending {end['pending']}; "
            f"{t['later_s']:.0f} s later: XLEN {later['xlen']}, pending {later['pending']}; "
            f"{drained}"
        )
        by_kind = ", ".join(f"{k} {v}" for k, v in t["usage_by_source_status"].items())
        lines.append(
            f"  usage_events: {t['usage_rows']} rows for {t['requests_completed_by_clients']} "
            f"requests wrk completed (wrk cuts up to c in flight per run); {by_kind}"
        )
    return "\n".join(lines)


def render_profile(result: TargetResult, *, connections: int) -> str:
    """Hot spots from the py-spy runs."""
    lines = []
    for kind, p in result.profile.items():
        lines.append(
            f"py-spy, {result.name}, {kind} at c={connections} ({p['samples']} busy samples, "
            f"{p['requests_per_s_while_sampled']:.0f} req/s while sampled, "
            f"{p['complete_percent']:.0f}% whole stacks): {p['svg']}"
        )
        sections = (
            ("self time by package", "by_package"),
            ("self time (frame on top of the stack)", "self"),
            ("inclusive time, our code", "inclusive"),
        )
        for title, key in sections:
            lines.append(f"  {title}:")
            lines += [f"    {share:5.1f}%  {frame}" for frame, share in p[key]]
    return "\n".join(lines)


def to_json(
    results: dict[str, TargetResult], options: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """Everything, for ``bench/results/*.json``."""
    out: dict[str, Any] = {"meta": meta, "options": options, "targets": {}}
    for name, r in results.items():
        out["targets"][name] = {
            "error": r.error,
            "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in r.checks.items()},
            "runs": {k: run.to_json() for k, run in r.runs.items()},
            "proxy_cpu_percent": r.proxy_cpu_percent,
            "proxy_cpu_us_per_request": r.proxy_cpu_us_per_request,
            "upstream_cpu_percent": r.upstream_cpu_percent,
            "cores_busy_percent": r.cores_busy_percent,
            "settlement": r.settlement,
            "profile": r.profile,
            "notes": r.notes,
        }
    return out
