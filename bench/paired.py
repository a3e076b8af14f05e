"""A paired, interleaved A/B benchmark: the gateway against the bare pass-through, round by round.

    .venv/bin/python bench/paired.py                         # 5 rounds, 5 s per run
    .venv/bin/python bench/paired.py --rounds 2 --duration 2  # a smoke test
    .venv/bin/python bench/paired.py --prompt-tokens 0,2000,16000  # and realistic prompts

Why paired: ``bench/run.py`` measures the pass-through and, minutes later, the gateway. On a
shared VM (CPU steal, noisy neighbours) the machine's speed can change by 2x within minutes,
so the gateway/pass-through ratio of one such run says as much about the neighbours as about
the gateway (28% to 60% from run to run on the same code). Here both proxies are started once
and stay up for the whole measurement; only one is loaded at a time (the idle one costs
nothing), and each measurement of the gateway is paired with one of the pass-through taken
seconds apart, under the same conditions:

- for R rounds (``--rounds``), and in each round for each run (chat at c=N, stream at c=N,
  non-streamed chat at c=1; for each prompt size of ``--prompt-tokens``: 0 is the small
  prompt, N a realistic N-token prompt from ``bench/prompts.py``), wrk loads the pass-through
  and then the gateway back to back;
- which of the two goes first alternates from round to round, so a steady drift in the
  machine's speed favours each side equally often;
- after every run the gateway's settlement outbox is left to empty, so the settlement it
  still owes does not compete with the next run; the gateway's CPU per request is also given
  with that catch-up included (its settlement poster runs in the gateway process, and in a
  short run much of the settling can be left until after the run);
- every ratio is taken within one round, and the summary gives the median over rounds (with
  min and max): a round hit by a burst of steal moves the median little.

Measured per run, for both: requests/s, latency p50/p99, the proxy's CPU µs per request
(``/proc/<pid>/stat`` before and after, over the requests wrk completed) and the steal share of
the proxy's core (``/proc/stat``). Per round: gateway/pass-through req/s, pass-through/gateway
CPU per request, and the c=1 p50 the gateway adds over the pass-through. At the end, the
gateway's settlement check: ``usage_events`` rows against the requests completed, and the
outbox backlog a few seconds after the last run.

The pieces are ``bench/run.py``'s, with its placement: this process pins itself to
``--load-cpu`` (default 1) before starting anything, so the simulator, wrk, PostgreSQL and
Redis inherit that core; both proxies under test run on ``--proxy-cpu`` (default 0). Every
wait has a deadline, an alarm bounds the whole run, and every process started is stopped on
the way out (error, Ctrl-C and SIGTERM included). The tables, the summary and the JSON file
are ``bench/paired_report.py``'s.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs
import report
import run
import stack
import sustain
import wrkload
from paired_report import (
    SETTLE_LIMIT_S,
    SIDES,
    Outcome,
    Round,
    print_report,
    render_round,
    runs_for,
    sized,
)
from prompts import chat_bodies
from run import CHAT_PATH, Bench, request_bodies

_WARMUP_S = 2
_DRAIN_WAIT_S = 3.0
_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Options:
    """What to run; see ``--help``."""

    rounds: int
    duration_s: int
    connections: int
    chunks: int
    model: str
    proxy_cpu: int | None
    load_cpu: int | None
    save: bool
    keep: bool
    sustain_s: int = 0
    prompt_tokens: tuple[int, ...] = (0,)
    workers: int | None = None

    @property
    def runs(self) -> dict[str, tuple[str, int | None]]:
        """Every run of a round, in order (``paired_report.runs_for``)."""
        return runs_for(self.prompt_tokens)

    def for_run_py(self) -> run.Options:
        """The same settings as ``bench/run.py``'s options, for its ``Bench``."""
        return run.Options(
            duration_s=self.duration_s,
            warmup_s=_WARMUP_S,
            connections=self.connections,
            chunks=self.chunks,
            model=self.model,
            proxy_cpu=self.proxy_cpu,
            load_cpu=self.load_cpu,
            targets=SIDES,
            profile=False,
            drain_wait_s=_DRAIN_WAIT_S,
            save=self.save,
            keep=self.keep,
        )


@dataclass
class Target:
    """One proxy under test, up for the whole measurement.

    Attributes:
        completed: requests clients completed against it (checks, warm-ups, measured runs).
        cut_bound: the most requests wrk can have left in flight at the end of its runs (the
            sum of their concurrency): the gateway settles those too.
    """

    name: str
    base_url: str
    api_key: str
    service: procs.Service
    gateway: stack.GatewayStack | None = None
    scripts: dict[str, Path] = field(default_factory=dict)
    completed: int = 0
    cut_bound: int = 0

    @property
    def url(self) -> str:
        """The chat completions URL."""
        return self.base_url + CHAT_PATH


# --- measuring -------------------------------------------------------------------------------


class PairedBench:
    """Warm-up and rounds against two running targets, with ``run.Bench`` doing each run."""

    def __init__(self, options: Options, bench: Bench, targets: dict[str, Target]) -> None:
        self.options = options
        self.bench = bench
        self.targets = targets
        self.gateway = targets["gateway"].gateway

    def warm_up(self, outcome: Outcome) -> None:
        """Check one answer of each kind on both sides, then load each with wrk at c=8.

        Raises:
            RuntimeError: a side's non-streamed check failed (a fast wrong answer is no result).
        """
        for side in SIDES:
            target = self.targets[side]
            found = self.bench.check(target.url, target.api_key)
            outcome.checks[side] = found
            target.completed += 2
            if not found["chat"].ok:
                raise RuntimeError(f"{side}: non-streamed check failed: {found['chat'].detail}")
            for kind in target.scripts:
                warm = wrkload.run(
                    target.url,
                    target.scripts[kind],
                    connections=8,
                    duration_s=_WARMUP_S,
                    cpu=self.options.load_cpu,
                )
                target.completed += warm.requests
                target.cut_bound += 8
        self.settle()

    def measure_round(self, number: int) -> Round:
        """Every run against both sides, back to back; odd rounds start with the pass-through."""
        order = SIDES if number % 2 == 1 else SIDES[::-1]
        current = Round(
            number,
            order[0],
            {side: report.TargetResult(side) for side in SIDES},
            runs=self.options.runs,
        )
        for run_name, (kind, concurrency) in current.runs.items():
            for side in order:
                self._one_run(
                    current, side, run_name, kind, concurrency or self.options.connections
                )
        return current

    def _one_run(
        self, current: Round, side: str, run_name: str, kind: str, connections: int
    ) -> None:
        target = self.targets[side]
        cpu_before = procs.cpu_seconds(target.service.pid)
        steal_before = _steal_ticks(self.options.proxy_cpu)
        done = self.bench.timed_run(
            current.sides[side],
            run_name,
            target.url,
            target.scripts[kind],
            connections,
            proxy=target.service,
            gateway=target.gateway,
        )
        current.steal_percent.setdefault(side, {})[run_name] = _percent(
            steal_before, _steal_ticks(self.options.proxy_cpu)
        )
        current.settle_wait_s.setdefault(side, {})[run_name] = self.settle()
        if done.requests:
            used = procs.cpu_seconds(target.service.pid) - cpu_before
            current.cpu_us_settled.setdefault(side, {})[run_name] = round(
                1e6 * used / done.requests
            )
        target.completed += done.requests
        target.cut_bound += connections

    def settle(self) -> float:
        """Wait (at most ``SETTLE_LIMIT_S``) until the gateway's outbox is empty; returns the
        seconds waited."""
        if self.gateway is None:
            return 0.0
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_LIMIT_S:
            backlog = self.gateway.backlog()
            if backlog.length == 0 and backlog.pending == 0:
                break
            time.sleep(_POLL_S)
        return round(time.monotonic() - started, 2)

    def sustain(self) -> sustain.Sustained:
        """``bench/sustain.py``'s long run against the gateway (streamed chat at c=N)."""
        target = self.targets["gateway"]
        assert target.gateway is not None
        print(f"\nsustained run: gateway alone for {self.options.sustain_s} s ...", flush=True)
        found = sustain.run_sustained(
            target.url,
            target.scripts["stream"],
            target.gateway,
            seconds=self.options.sustain_s,
            connections=self.options.connections,
            load_cpu=self.options.load_cpu,
            workers=self.options.workers,
        )
        target.completed += found.requests
        target.cut_bound += self.options.connections
        return found

    def drain(self) -> dict[str, Any]:
        """``run.Bench``'s settlement totals: the outbox now and a few seconds later, and the
        ``usage_events`` rows against the requests clients completed."""
        if self.gateway is None:
            return {}
        completed = self.targets["gateway"].completed
        return self.bench.drain(self.gateway, requests_completed=completed)


@dataclass
class Running:
    """Every long-running process started, kept so ``stop_all`` stops each whatever failed."""

    simulator: procs.Service | None = None
    passthrough: procs.Service | None = None
    services: stack.GatewayStack | None = None
    gateway: procs.Service | None = None
    gateway_status: int | None = None

    def stop_all(self) -> list[str]:
        """Stop the gateway first (its services outlive it), then the pass-through, PostgreSQL
        and Redis, and the simulator; each is attempted even if another fails. Returns what
        went wrong."""
        problems: list[str] = []
        for service in (self.gateway, self.passthrough, self.services, self.simulator):
            if service is None:
                continue
            try:
                if isinstance(service, stack.GatewayStack):
                    service.stop()
                else:
                    status = procs.stop(service)
                    if service is self.gateway:
                        self.gateway_status = status
            except Exception as exc:  # keep stopping the others
                name = service.name if isinstance(service, procs.Service) else "postgres/redis"
                problems.append(f"stopping {name} failed: {type(exc).__name__}: {exc}")
        return problems


def start_everything(
    options: Options, work_dir: Path, running: Running
) -> tuple[procs.Service, dict[str, Target]]:
    """The simulator (load core), the pass-through (proxy core), PostgreSQL and Redis with a
    funded key (load core) and ``creditgate serve`` (proxy core), as ``bench/run.py`` starts
    them; each is recorded on ``running`` as soon as it exists. Returns both targets with their
    wrk scripts written, and the simulator.

    Raises:
        procs.ProcessError, stack.StackError, OSError, RuntimeError: something would not start.
    """
    sim_port, passthrough_port, gateway_port, admin_port = stack.free_ports(4)
    sim_url = f"http://127.0.0.1:{sim_port}"
    running.simulator = run.start_simulator(sim_port, options.chunks, work_dir, options.load_cpu)
    running.passthrough = run.start_passthrough(
        passthrough_port, sim_port, work_dir, options.proxy_cpu
    )
    running.services = stack.start_stack(work_dir / "services")
    env = running.services.gateway_env(
        upstream_base_url=f"{sim_url}/v1", port=gateway_port, admin_port=admin_port
    )
    if options.workers is not None:  # creditgate serve's process count (issue 15)
        env["WORKERS"] = str(options.workers)
    procs.wait_for_port(running.simulator, sim_port, timeout_s=run.START_TIMEOUT_S)
    stack.provision(running.services, env)
    running.gateway = run.start_gateway(env, work_dir, options.proxy_cpu)
    procs.wait_for_line(running.passthrough, "READY", timeout_s=run.START_TIMEOUT_S)
    procs.wait_for_line(running.gateway, "READY", timeout_s=run.START_TIMEOUT_S)
    targets = {
        "passthrough": Target(
            "passthrough",
            f"http://127.0.0.1:{passthrough_port}",
            "sk-client-ignored",
            running.passthrough,
        ),
        "gateway": Target(
            "gateway",
            f"http://127.0.0.1:{gateway_port}",
            running.services.api_key,
            running.gateway,
            gateway=running.services,
        ),
    }
    bodies = request_bodies(options.model)
    for size in (size for size in options.prompt_tokens if size):
        for kind, body in chat_bodies(options.model, size).items():
            bodies[sized(kind, size)] = body
    for target in targets.values():
        for kind, body in bodies.items():
            target.scripts[kind] = wrkload.write_script(
                work_dir / f"{target.name}-{kind}.lua", body=body, api_key=target.api_key
            )
    return running.simulator, targets


def _steal_ticks(core: int | None) -> tuple[int, int]:
    """(steal ticks, all ticks) since boot of ``core`` (None: all cores), from ``/proc/stat``
    (proc(5): the 8th value of a ``cpu`` line is the time stolen by the hypervisor)."""
    name = "cpu" if core is None else f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        label, *values = line.split()
        if label == name:
            ticks = [int(v) for v in values[:8]]
            return ticks[7] if len(ticks) == 8 else 0, sum(ticks)
    return 0, 0


def _percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    span = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / span, 1) if span > 0 else 0.0


# --- main ------------------------------------------------------------------------------------


def parse_options(argv: Sequence[str] | None) -> Options:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="bench/paired.py", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of paired runs")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=32, help="concurrency of the c=N runs")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--model", default="gpt-4o-mini", help="a model on the default rate card")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core of both proxies")
    parser.add_argument("--load-cpu", type=int, default=1, help="core of everything else")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument(
        "--sustain",
        type=int,
        default=0,
        metavar="SECONDS",
        help="end with one run this long against the gateway alone, watching its outbox "
        "(does settlement keep up? see bench/sustain.py)",
    )
    parser.add_argument(
        "--prompt-tokens",
        default="0",
        metavar="N,N,...",
        help="prompt sizes in tokens, each measured in every round: 0 is the small prompt, "
        "N a realistic N-token prompt (bench/prompts.py); e.g. 0,2000,16000",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="WORKERS for creditgate serve (default: unset, the gateway's own default)",
    )
    args = parser.parse_args(argv)
    try:
        prompt_tokens = tuple(dict.fromkeys(int(n) for n in args.prompt_tokens.split(",")))
    except ValueError:
        parser.error("--prompt-tokens takes comma-separated whole numbers, e.g. 0,2000,16000")
    if not prompt_tokens or min(prompt_tokens) < 0:
        parser.error("--prompt-tokens takes sizes of 0 or more")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    for name in ("rounds", "duration", "connections", "chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.sustain < 0:
        parser.error("--sustain must be 0 (none) or more seconds")
    proxy_cpu, load_cpu = run.pinned_cores(args)
    return Options(
        rounds=args.rounds,
        duration_s=args.duration,
        connections=args.connections,
        chunks=args.chunks,
        model=args.model,
        proxy_cpu=proxy_cpu,
        load_cpu=load_cpu,
        save=not args.no_save,
        keep=args.keep,
        sustain_s=args.sustain,
        prompt_tokens=prompt_tokens,
        workers=args.workers,
    )


def budget_s(options: Options) -> int:
    """An upper bound on the whole run: start-up, warm-ups, every run with its grace and
    settling allowance, and the final drain."""
    per_run = options.duration_s + 5 + SETTLE_LIMIT_S
    runs = options.rounds * len(options.runs) * len(SIDES)
    warm_ups = len(SIDES) * 2 * len(options.prompt_tokens) * (_WARMUP_S + 5)
    drain = _DRAIN_WAIT_S + run.DRAIN_LIMIT_S + 10
    sustain = options.sustain_s + 60 if options.sustain_s else 0
    return int(180 + warm_ups + runs * per_run + drain + sustain)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the paired benchmark; returns 0 when every round was measured, else 1."""
    options = parse_options(argv)
    if missing := procs.missing_load_tools():
        print(missing, file=sys.stderr)
        return 1
    if options.load_cpu is not None:
        procs.pin_self(options.load_cpu)  # children (simulator, wrk, Postgres, Redis) inherit
    run_options = options.for_run_py()
    signal.signal(signal.SIGALRM, run.on_alarm)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop everything, as on Ctrl-C
    signal.alarm(budget_s(options))
    meta = run.environment(run_options)
    print(
        f"paired A/B: {options.rounds} rounds of chat c={options.connections}, stream "
        f"c={options.connections} and latency c=1, passthrough and gateway back to back "
        f"(which goes first alternates)\n" + run.header(run_options, meta),
        flush=True,
    )
    work_dir = Path(tempfile.mkdtemp(prefix="creditgate-paired-"))
    work_dir.chmod(0o755)  # PostgreSQL runs as the postgres user and must enter it
    running = Running()
    outcome = Outcome()
    try:
        simulator, targets = start_everything(options, work_dir, running)
        paired = PairedBench(options, Bench(run_options, work_dir, simulator), targets)
        print("checks and warm-up ...", flush=True)
        paired.warm_up(outcome)
        for number in range(1, options.rounds + 1):
            outcome.rounds.append(paired.measure_round(number))
            print("\n" + render_round(outcome.rounds[-1], options, options.rounds), flush=True)
        if options.sustain_s:
            outcome.sustained = paired.sustain()
        outcome.gateway_cut_bound = targets["gateway"].cut_bound
        outcome.settlement = paired.drain()
    except (*run.MEASUREMENT_ERRORS, run.BudgetExceededError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        outcome.error = "interrupted"
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # let the clean-up finish
        print("stopping everything ...", flush=True)
        outcome.notes += running.stop_all()
        if running.gateway is not None:
            noted = report.TargetResult("gateway", error=outcome.error)
            run.note_gateway_log(noted, running.gateway, running.gateway_status)
            outcome.notes += noted.notes
            outcome.error = noted.error
        if options.keep:
            print(f"logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print_report(outcome, options, meta)
    complete = outcome.error is None and len(outcome.rounds) == options.rounds
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
