"""Benchmark the gateway against the same fast local upstream, directly and through proxies.

    .venv/bin/python bench/run.py              # 10 s per run
    .venv/bin/python bench/run.py --quick      # 3 s per run, a smoke test
    .venv/bin/python bench/run.py --profile    # plus py-spy flame graphs of the gateway

Three targets, one upstream (``python -m devtools.simulator``, answers pre-rendered, N chunks):

1. ``direct``: wrk straight to the simulator, the baseline.
2. ``passthrough``: ``bench/passthrough.py``, a bare aiohttp proxy, the ceiling for the stack.
3. ``gateway``: ``creditgate serve`` with full billing, on real PostgreSQL (fsync on) and
   Redis (append-only file), with a funded account and key made by the CLI.

For each: the latency added at concurrency 1 (p50/p99 against direct) on a non-streamed chat
completion, and requests/s at concurrency 32 for non-streamed and streamed chat (without
``stream_options.include_usage``: the gateway must ask for usage and hide it). For the gateway
also the settlement rate into Postgres (``usage_events`` rows/s during each run) and the outbox
backlog (``XLEN``/``XPENDING`` summed over every shard's outbox stream) at the end and a few
seconds later.

Each proxy under test runs alone on one core (``--proxy-cpu``, default 0); the simulator, wrk,
PostgreSQL, Redis and this script share the other (``--load-cpu``, default 1): this process
pins itself there first, so everything it starts inherits it. Everything listens on 127.0.0.1,
every wait has a deadline, and every process started is stopped before exit.

The targets are measured one after another, minutes apart, so on a machine whose speed drifts
(a shared VM) their ratios drift too: ``bench/paired.py`` measures the pass-through and the
gateway in interleaved pairs, round by round, for a fair gateway/pass-through comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import checks
import procs
import profiling
import report
import stack
import wrkload

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CHAT_PATH = "/v1/chat/completions"
UPSTREAM_KEY = "sk-bench"
START_TIMEOUT_S = 60.0
DRAIN_LIMIT_S = 30.0
_QUIET_BUSY_PERCENT = 10.0
# What stops one measurement (a target's, or the paired run) but not the whole program.
MEASUREMENT_ERRORS = (procs.ProcessError, stack.StackError, wrkload.WrkError, OSError, RuntimeError)


@dataclass(frozen=True, slots=True)
class Options:
    """What to run; see ``--help``."""

    duration_s: int
    warmup_s: int
    connections: int
    chunks: int
    model: str
    proxy_cpu: int | None
    load_cpu: int | None
    targets: tuple[str, ...]
    profile: bool
    drain_wait_s: float
    save: bool
    keep: bool


def request_bodies(model: str) -> dict[str, bytes]:
    """The two request bodies: a non-streamed and a streamed chat completion, no
    ``max_tokens`` (the gateway holds the model's output cap), no ``stream_options``."""
    chat = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello, twenty times, in a single line."},
        ],
    }
    return {
        "chat": json.dumps(chat).encode(),
        "stream": json.dumps({**chat, "stream": True}).encode(),
    }


# --- measuring one target --------------------------------------------------------------------


class Bench:
    """The measurement steps shared by every target."""

    def __init__(self, options: Options, work_dir: Path, upstream: procs.Service) -> None:
        self.options = options
        self.work_dir = work_dir
        self.upstream = upstream
        self.bodies = request_bodies(options.model)

    def check(self, url: str, api_key: str) -> dict[str, checks.CheckResult]:
        """One non-streamed and one streamed chat completion, each checked for a whole answer."""
        chunks = self.options.chunks
        return {
            "chat": checks.check_chat(url, self.bodies["chat"], api_key, chunks=chunks),
            "stream": checks.check_stream(url, self.bodies["stream"], api_key, chunks=chunks),
        }

    def measure(
        self,
        name: str,
        base_url: str,
        api_key: str,
        *,
        proxy: procs.Service | None,
        gateway: stack.GatewayStack | None = None,
    ) -> report.TargetResult:
        """Check, warm up, then run c=1 latency and c=N chat and stream throughput."""
        opts = self.options
        result = report.TargetResult(name)
        url = base_url + CHAT_PATH
        result.checks = self.check(url, api_key)
        if not result.checks["chat"].ok:
            result.error = f"non-streamed check failed: {result.checks['chat'].detail}"
            return result
        scripts = {
            kind: wrkload.write_script(
                self.work_dir / f"{name}-{kind}.lua", body=body, api_key=api_key
            )
            for kind, body in self.bodies.items()
        }
        sent = 2  # the checks
        for kind in ("chat", "stream"):
            warm = wrkload.run(
                url, scripts[kind], connections=8, duration_s=opts.warmup_s, cpu=opts.load_cpu
            )
            sent += warm.requests
        plan = (
            ("latency", "chat", 1),
            ("chat", "chat", opts.connections),
            ("stream", "stream", opts.connections),
        )
        for run_name, kind, connections in plan:
            run = self.timed_run(
                result, run_name, url, scripts[kind], connections, proxy=proxy, gateway=gateway
            )
            sent += run.requests
        if gateway:
            result.settlement["totals"] = self.drain(gateway, requests_completed=sent)
        return result

    def timed_run(
        self,
        result: report.TargetResult,
        run_name: str,
        url: str,
        script: Path,
        connections: int,
        *,
        proxy: procs.Service | None,
        gateway: stack.GatewayStack | None,
    ) -> wrkload.WrkResult:
        """One measured wrk run, with the CPU it cost and (gateway) the rows it settled."""
        rows_before = gateway.usage_rows() if gateway else 0
        proxy_cpu = procs.cpu_seconds(proxy.pid) if proxy else 0.0
        upstream_cpu = procs.cpu_seconds(self.upstream.pid)
        cores = procs.core_busy_ticks()
        started = time.monotonic()
        run = wrkload.run(
            url,
            script,
            connections=connections,
            duration_s=self.options.duration_s,
            cpu=self.options.load_cpu,
        )
        elapsed = time.monotonic() - started
        result.runs[run_name] = run
        result.cores_busy_percent[run_name] = procs.core_busy_percent(
            cores, procs.core_busy_ticks()
        )
        used = procs.cpu_seconds(self.upstream.pid) - upstream_cpu
        result.upstream_cpu_percent[run_name] = round(100 * used / elapsed, 1)
        if proxy:
            used = procs.cpu_seconds(proxy.pid) - proxy_cpu
            result.proxy_cpu_percent[run_name] = round(100 * used / elapsed, 1)
            if run.requests:
                result.proxy_cpu_us_per_request[run_name] = round(1e6 * used / run.requests)
        if gateway:
            rows = gateway.usage_rows() - rows_before
            backlog = gateway.backlog()
            result.settlement[run_name] = {
                "usage_rows": rows,
                "usage_rows_per_s": round(rows / elapsed, 1),
                "requests_per_s": round(run.requests_per_s, 1),
                "outbox_after_run": {"xlen": backlog.length, "pending": backlog.pending},
            }
        return run

    def drain(self, gateway: stack.GatewayStack, *, requests_completed: int) -> dict[str, Any]:
        """The outbox at the end, ``drain_wait_s`` later, and when it emptied (if it did)."""
        at_end = gateway.backlog()
        time.sleep(self.options.drain_wait_s)
        later = gateway.backlog()
        drained_after_s: float | None = None
        started = time.monotonic()
        while time.monotonic() - started < DRAIN_LIMIT_S:
            backlog = gateway.backlog()
            if backlog.length == 0 and backlog.pending == 0:
                drained_after_s = round(self.options.drain_wait_s + time.monotonic() - started, 2)
                break
            time.sleep(0.1)
        return {
            "outbox_at_end": {"xlen": at_end.length, "pending": at_end.pending},
            "outbox_later": {"xlen": later.length, "pending": later.pending},
            "later_s": self.options.drain_wait_s,
            "drain_limit_s": self.options.drain_wait_s + DRAIN_LIMIT_S,
            "drained_after_s": drained_after_s,
            "usage_rows": gateway.usage_rows(),
            "usage_by_source_status": gateway.usage_by_source(),
            "requests_completed_by_clients": requests_completed,
        }

    def profile(self, name: str, base_url: str, api_key: str, pid: int) -> dict[str, Any]:
        """Extra c=N chat and stream runs under py-spy (not the measured runs)."""
        opts = self.options
        RESULTS_DIR.mkdir(exist_ok=True)
        url = base_url + CHAT_PATH
        found: dict[str, Any] = {}
        for kind, body in self.bodies.items():
            script = wrkload.write_script(
                self.work_dir / f"{name}-profile-{kind}.lua", body=body, api_key=api_key
            )
            label = f"{name}-{kind}"
            samplers = profiling.start_samplers(
                pid, duration_s=opts.duration_s, out_dir=RESULTS_DIR, name=label, cpu=opts.load_cpu
            )
            run = wrkload.run(
                url, script, connections=opts.connections, duration_s=opts.duration_s,
                cpu=opts.load_cpu,
            )  # fmt: skip
            profile = profiling.finish_samplers(
                samplers, duration_s=opts.duration_s, out_dir=RESULTS_DIR, name=label
            )
            found[kind] = {
                "requests_per_s_while_sampled": round(run.requests_per_s, 1),
                "svg": str(profile.svg.relative_to(REPO)),
                "folded": str(profile.folded.relative_to(REPO)),
                "samples": profile.samples,
                **profiling.hot_spots(profile.folded),
            }
        return found


# --- the three targets -----------------------------------------------------------------------


def start_simulator(port: int, chunks: int, log_dir: Path, cpu: int | None) -> procs.Service:
    """``python -m devtools.simulator`` on 127.0.0.1:``port``, ``chunks`` chunks per answer."""
    argv = [sys.executable, "-m", "devtools.simulator", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--chunks", str(chunks)]
    return procs.start("simulator", argv, log_dir=log_dir, cpu=cpu, cwd=REPO)


def start_passthrough(port: int, sim_port: int, log_dir: Path, cpu: int | None) -> procs.Service:
    """``bench/passthrough.py`` on 127.0.0.1:``port``, in front of the simulator."""
    argv = [sys.executable, str(BENCH_DIR / "passthrough.py"), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--upstream", f"http://127.0.0.1:{sim_port}"]
    argv += ["--api-key", UPSTREAM_KEY]
    return procs.start("passthrough", argv, log_dir=log_dir, cpu=cpu, cwd=REPO)


def start_gateway(env: dict[str, str], log_dir: Path, cpu: int | None) -> procs.Service:
    """``creditgate serve`` with ``env`` (``GatewayStack.gateway_env``)."""
    command = [stack.creditgate_executable(), "serve"]
    return procs.start("gateway", command, log_dir=log_dir, cpu=cpu, env=env, cwd=REPO)


def run_passthrough(bench: Bench, sim_port: int, port: int) -> report.TargetResult:
    """Start ``bench/passthrough.py`` on the proxy core, measure it, stop it."""
    proxy = start_passthrough(port, sim_port, bench.work_dir, bench.options.proxy_cpu)
    try:
        procs.wait_for_line(proxy, "READY", timeout_s=START_TIMEOUT_S)
        base_url = f"http://127.0.0.1:{port}"
        result = bench.measure("passthrough", base_url, "sk-client-ignored", proxy=proxy)
        if bench.options.profile and result.error is None:
            try:
                result.profile = bench.profile("passthrough", base_url, "sk-x", proxy.pid)
            except (OSError, RuntimeError, wrkload.WrkError) as exc:
                result.notes.append(f"profiling failed: {exc}")
        return result
    finally:
        procs.stop(proxy)


def run_gateway(bench: Bench, sim_port: int, port: int, admin_port: int) -> report.TargetResult:
    """PostgreSQL, Redis, a funded key, then ``creditgate serve`` on the proxy core."""
    opts = bench.options
    services = stack.start_stack(bench.work_dir / "services")
    gateway: procs.Service | None = None
    result = report.TargetResult("gateway")
    try:
        env = services.gateway_env(
            upstream_base_url=f"http://127.0.0.1:{sim_port}/v1", port=port, admin_port=admin_port
        )
        stack.provision(services, env)
        gateway = start_gateway(env, bench.work_dir, opts.proxy_cpu)
        procs.wait_for_line(gateway, "READY", timeout_s=START_TIMEOUT_S)
        base_url = f"http://127.0.0.1:{port}"
        result = bench.measure(
            "gateway", base_url, services.api_key, proxy=gateway, gateway=services
        )
        if opts.profile and result.error is None:
            try:
                result.profile = bench.profile("gateway", base_url, services.api_key, gateway.pid)
            except (OSError, RuntimeError, wrkload.WrkError) as exc:
                result.notes.append(f"profiling failed: {exc}")
    except (procs.ProcessError, stack.StackError, wrkload.WrkError, OSError) as exc:
        # Kept here rather than in main() so the gateway's log summary joins the error.
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if gateway is not None:
            status = procs.stop(gateway)
            note_gateway_log(result, gateway, status)
        services.stop()
    return result


def note_gateway_log(
    result: report.TargetResult, gateway: procs.Service, status: int | None
) -> None:
    """Add the gateway's exit status and a summary of what it logged to the result's notes."""
    lines = gateway.stderr_path.read_text(errors="replace").splitlines()
    if status not in (0, None):
        result.notes.append(f"gateway exited with status {status}")
    errors = sum(" ERROR " in line for line in lines)
    warnings = sum(" WARNING " in line for line in lines)
    if errors or warnings:
        kinds = "".join(
            f"\n  {count} x {kind}" for kind, count in _tracebacks(lines).most_common(10)
        )
        result.notes.append(
            f"gateway logged {errors} errors and {warnings} warnings "
            f"({gateway.stderr_path.name} is kept with --keep); tracebacks:{kinds or ' none'}"
        )
    if result.error:
        result.error += "\n--- gateway stderr (tail) ---\n" + gateway.stderr_tail()


def _tracebacks(lines: list[str]) -> Counter[str]:
    """Each distinct traceback as ``Exception: message (at our deepest frame)``, counted."""
    found: Counter[str] = Counter()
    frame = ""
    inside = False
    for line in lines:
        if line.startswith("Traceback"):
            inside, frame = True, ""
        elif inside and line.startswith("  File ") and str(REPO) in line and ".venv" not in line:
            path, _, rest = line.strip()[len('File "') :].partition('", line ')
            number, _, function = rest.partition(", in ")
            frame = f"{Path(path).relative_to(REPO)}:{number} in {function}"
        elif inside and line and not line.startswith(" "):
            if not line.startswith(("During handling", "The above exception")):
                found[f"{line} (at {frame or '?'})"] += 1
                inside = False
    return found


# --- main ------------------------------------------------------------------------------------


def parse_options(argv: Sequence[str] | None) -> Options:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up: a smoke test")
    parser.add_argument("--connections", type=int, default=32, help="concurrency of the c=N runs")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--model", default="gpt-4o-mini", help="a model on the default rate card")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core of the proxy under test")
    parser.add_argument("--load-cpu", type=int, default=1, help="core of everything else")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    parser.add_argument(
        "--targets", default=",".join(report.TARGETS), help="comma-separated subset"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway (extra runs)")
    parser.add_argument(
        "--drain-wait", type=float, default=3.0, help="seconds before re-reading the outbox"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = set(targets) - set(report.TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    proxy_cpu, load_cpu = pinned_cores(args)
    return Options(
        duration_s=3 if args.quick else args.duration,
        warmup_s=1 if args.quick else 2,
        connections=args.connections,
        chunks=args.chunks,
        model=args.model,
        proxy_cpu=proxy_cpu,
        load_cpu=load_cpu,
        targets=targets,
        profile=args.profile,
        drain_wait_s=2.0 if args.quick else args.drain_wait,
        save=not args.no_save,
        keep=args.keep,
    )


def pinned_cores(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """``--proxy-cpu`` and ``--load-cpu``; (None, None) with ``--no-pin``, or with a warning when
    they are not two usable cores."""
    cpus = os.sched_getaffinity(0)
    usable = {args.proxy_cpu, args.load_cpu} <= cpus and args.proxy_cpu != args.load_cpu
    if not args.no_pin and not usable:
        print(
            f"warning: cores {args.proxy_cpu} and {args.load_cpu} are not two usable cores "
            f"(have {sorted(cpus)}); nothing is pinned",
            file=sys.stderr,
        )
    return (args.proxy_cpu, args.load_cpu) if usable and not args.no_pin else (None, None)


def _budget_s(options: Options) -> int:
    """An upper bound on the whole run: setup allowances plus every run's duration + grace."""
    runs = 3 + (2 if options.profile else 0)
    per_target = runs * (options.duration_s + 5) + 2 * (options.warmup_s + 5) + 120
    return 120 + len(options.targets) * per_target


class BudgetExceededError(Exception):
    """The whole benchmark overran its time budget (not an OSError: nothing may catch it
    as one target's failure and carry on)."""


def on_alarm(signum: int, frame: object) -> None:
    raise BudgetExceededError("the benchmark overran its time budget; stopping everything")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every target was measured, else 1."""
    options = parse_options(argv)
    if missing := procs.missing_load_tools():
        print(missing, file=sys.stderr)
        return 1
    if options.load_cpu is not None:
        procs.pin_self(options.load_cpu)  # children (simulator, wrk, Postgres, Redis) inherit
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(_budget_s(options))
    meta = environment(options)
    print(header(options, meta), flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="creditgate-bench-"))
    work_dir.chmod(0o755)  # PostgreSQL runs as the postgres user and must enter it
    results: dict[str, report.TargetResult] = {}
    sim_port, passthrough_port, gateway_port, admin_port = stack.free_ports(4)
    simulator = start_simulator(sim_port, options.chunks, work_dir, options.load_cpu)
    try:
        procs.wait_for_port(simulator, sim_port, timeout_s=START_TIMEOUT_S)
        bench = Bench(options, work_dir, simulator)
        sim_url = f"http://127.0.0.1:{sim_port}"
        for name in report.TARGETS:
            if name not in options.targets:
                continue
            print(f"measuring {name} ...", flush=True)
            try:
                if name == "direct":
                    results[name] = bench.measure(name, sim_url, UPSTREAM_KEY, proxy=None)
                elif name == "passthrough":
                    results[name] = run_passthrough(bench, sim_port, passthrough_port)
                else:
                    results[name] = run_gateway(bench, sim_port, gateway_port, admin_port)
            except MEASUREMENT_ERRORS as exc:
                results[name] = report.TargetResult(name, error=f"{type(exc).__name__}: {exc}")
            if results[name].error:
                print(f"  {name} FAILED: {results[name].error}", flush=True)
    finally:
        signal.alarm(0)
        procs.stop(simulator)
        if options.keep:
            print(f"logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    _print_report(results, options, meta)
    return 0 if results and not any(r.error for r in results.values()) else 1


def _print_report(
    results: dict[str, report.TargetResult], options: Options, meta: dict[str, Any]
) -> None:
    print()
    print(report.render_table(results, connections=options.connections))
    for result in results.values():
        for name, check in result.checks.items():
            if not check.ok:
                print(f"\n{result.name} {name} check: {check.detail}")
    gateway = results.get("gateway")
    if gateway:
        if gateway.settlement:
            print("\n" + report.render_settlement(gateway))
        for note in gateway.notes:
            print("\nnote: " + note)
    for result in results.values():
        if result.profile:
            print("\n" + report.render_profile(result, connections=options.connections))
    for result in results.values():
        if result.error:
            print(f"\n{result.name} could not be measured:\n{result.error}")
    if options.save:
        save_json("bench", report.to_json(results, dataclasses.asdict(options), meta))


def save_json(prefix: str, document: dict[str, Any]) -> None:
    """Write ``document`` to ``bench/results/<prefix>-<UTC time>.json`` and say so."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{prefix}-{stamp}.json"
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nresults written to {path.relative_to(REPO)}")


def environment(options: Options) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "background_busy_percent": _background_busy(),
    }


def _background_busy(seconds: float = 1.0) -> dict[int, float]:
    """Each core's busy share over ``seconds`` before we start anything: other people's load."""
    before = procs.core_busy_ticks()
    time.sleep(seconds)
    return procs.core_busy_percent(before, procs.core_busy_ticks())


def header(options: Options, meta: dict[str, Any]) -> str:
    pinning = (
        f"proxy under test on core {options.proxy_cpu}; simulator, wrk, PostgreSQL, Redis "
        f"on core {options.load_cpu}"
        if options.proxy_cpu is not None
        else "nothing pinned"
    )
    load = ", ".join(f"{x:.2f}" for x in meta["loadavg_at_start"])
    busy = meta["background_busy_percent"]
    idle = ", ".join(f"core {core} {share:.0f}%" for core, share in sorted(busy.items()))
    text = (
        f"creditgate bench @ {meta['git_commit'] or '?'}: {options.duration_s} s per run, "
        f"{options.chunks}-chunk answers, {options.model}, c=1 latency, "
        f"c={options.connections} throughput\n{pinning}\n"
        f"before starting: load average {load}; busy {idle}"
    )
    if any(share > _QUIET_BUSY_PERCENT for share in busy.values()):
        text += (
            "\nWARNING: the machine is not quiet; latency and req/s will be noisy "
            "(proxy CPU us/req is the steadiest figure)"
        )
    return text


if __name__ == "__main__":
    raise SystemExit(main())
