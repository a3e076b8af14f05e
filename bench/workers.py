"""Worker scaling: ``creditgate serve`` with 1 worker against 2 workers, in the same run.

    .venv/bin/python bench/workers.py                          # 3 rounds, 10 s per run
    .venv/bin/python bench/workers.py --rounds 1 --duration 3  # a smoke test

Plain (non-streamed) chat completions at ``--connections`` (32) against the simulated upstream,
with full billing (PostgreSQL with fsync on, Redis with its append-only file). Both gateways
are started once, on ports of their own, against the same database, Redis and funded key: one
with ``WORKERS=1``, one with ``WORKERS=2``. Only one is loaded at a time (the idle one costs
a few background loops); in each round wrk loads both back to back, in alternating order, and
the outbox is left to empty before each run. The ratio is taken within a round; the summary
gives the median over rounds. The issue's target: 2 workers >= 1.6x one worker.

Placement on a 2-core machine (``--gateway-cpu`` 0, ``--load-cpu`` 1): this process pins itself
to the load core before starting anything, so the simulator, wrk, PostgreSQL and Redis inherit
it; the 1-worker gateway is pinned to the gateway core, alone there. The 2-worker gateway
needs both cores, so its second worker shares the load core with the load generator and the
upstream (they cannot be kept off a worker's core with two cores): its ratio is a lower bound
of what two free cores give. wrk runs one thread. Per run the report gives the gateway's CPU
µs per request (all its processes) and each core's busy share, so the load's share is seen,
and the machine's CPU per request (every core's busy time over the requests served): with
every core busy at that cost the machine serves at most ``cores * 1e6 / machine_us`` requests
per second, so the 1-worker run's ceiling ratio bounds what any number of workers can reach
while the load shares the machine.

Timings on a shared machine are noisy: read the ratio per round, and re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procs
import run
import stack
import wrkload

_WARMUP_S = 2
_DRAIN_LIMIT_S = 30.0
_POLL_S = 0.1
WORKER_COUNTS = (1, 2)


@dataclass(frozen=True, slots=True)
class Options:
    """What to run; see ``--help``."""

    rounds: int
    duration_s: int
    connections: int
    chunks: int
    gateway_cpu: int | None
    load_cpu: int | None
    all_cores: frozenset[int]


@dataclass
class Fleet:
    """One running ``creditgate serve`` and its gateway port."""

    workers: int
    service: procs.Service
    port: int

    def pids(self) -> list[int]:
        """The parent and every process it started (the workers)."""
        pid = self.service.pid
        children: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
        return [pid, *children]

    def cpu_seconds(self) -> float:
        """CPU seconds of the parent and its workers so far."""
        return sum(procs.cpu_seconds(pid) for pid in self.pids())


@dataclass
class Measurement:
    """One wrk run against one fleet."""

    requests_per_s: float
    failed: int
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None
    cores_busy_percent: dict[int, float] = field(default_factory=dict)
    machine_cpu_us_per_request: float | None = None
    """Every core's busy time during the run per request: the gateway's CPU and the load's
    (wrk, the simulator, PostgreSQL, Redis, the kernel's loopback traffic) together."""

    @property
    def ceiling_requests_per_s(self) -> float | None:
        """What this machine could serve at ``machine_cpu_us_per_request`` with every core
        busy: no number of workers goes beyond it while the load shares the machine."""
        if not self.machine_cpu_us_per_request:
            return None
        return len(self.cores_busy_percent) * 1e6 / self.machine_cpu_us_per_request


def start_fleet(
    services: stack.GatewayStack, workers: int, sim_port: int, options: Options, log_dir: Path
) -> Fleet:
    """``creditgate serve`` with ``WORKERS=workers`` on free ports; 1 worker pinned to the
    gateway core, more on every core."""
    port, admin_port = stack.free_ports(2)
    env = services.gateway_env(
        upstream_base_url=f"http://127.0.0.1:{sim_port}/v1", port=port, admin_port=admin_port
    )
    env |= {"WORKERS": str(workers), "ACCESS_LOG": "false"}
    argv = [stack.creditgate_executable(), "serve"]
    if workers > 1 and options.gateway_cpu is not None:
        cores = ",".join(str(core) for core in sorted(options.all_cores))
        argv = ["taskset", "-c", cores, *argv]  # undo this process's pin to the load core
    cpu = options.gateway_cpu if workers == 1 else None
    service = procs.start(
        f"gateway-{workers}w", argv, log_dir=log_dir, cpu=cpu, env=env, cwd=run.REPO
    )
    procs.wait_for_line(service, "READY", timeout_s=run.START_TIMEOUT_S)
    return Fleet(workers, service, port)


def wait_for_empty_outbox(services: stack.GatewayStack) -> None:
    """Until the settlement outbox is empty (``_DRAIN_LIMIT_S`` at most)."""
    deadline = time.monotonic() + _DRAIN_LIMIT_S
    while time.monotonic() < deadline:
        backlog = services.backlog()
        if backlog.length == 0 and backlog.pending == 0:
            return
        time.sleep(_POLL_S)


def measure(fleet: Fleet, script: Path, options: Options) -> Measurement:
    """One measured wrk run against ``fleet``, with the CPU it cost."""
    url = f"http://127.0.0.1:{fleet.port}{run.CHAT_PATH}"
    cpu_before = fleet.cpu_seconds()
    cores = procs.core_busy_ticks()
    result = wrkload.run(
        url,
        script,
        connections=options.connections,
        duration_s=options.duration_s,
        cpu=options.load_cpu,
    )
    used = fleet.cpu_seconds() - cpu_before
    busy = procs.core_busy_percent(cores, procs.core_busy_ticks())
    machine_s = sum(busy.values()) / 100 * options.duration_s
    return Measurement(
        requests_per_s=round(result.requests_per_s, 1),
        failed=result.failed,
        p50_ms=round(result.latency_us.get("p50", 0.0) / 1000, 2),
        p99_ms=round(result.latency_us.get("p99", 0.0) / 1000, 2),
        cpu_us_per_request=round(1e6 * used / result.requests) if result.requests else None,
        cores_busy_percent=busy,
        machine_cpu_us_per_request=(
            round(1e6 * machine_s / result.requests) if result.requests else None
        ),
    )


def run_rounds(
    fleets: dict[int, Fleet], services: stack.GatewayStack, script: Path, options: Options
) -> list[dict[int, Measurement]]:
    """``options.rounds`` rounds; in each, every fleet once, the order alternating."""
    for fleet in fleets.values():  # warm-up: connections, caches, the tokenizer
        wrkload.run(
            f"http://127.0.0.1:{fleet.port}{run.CHAT_PATH}",
            script,
            connections=8,
            duration_s=_WARMUP_S,
            cpu=options.load_cpu,
        )
    rounds: list[dict[int, Measurement]] = []
    for index in range(options.rounds):
        order = WORKER_COUNTS if index % 2 == 0 else tuple(reversed(WORKER_COUNTS))
        current: dict[int, Measurement] = {}
        for workers in order:
            wait_for_empty_outbox(services)
            current[workers] = measure(fleets[workers], script, options)
        rounds.append(current)
        print(render_round(index + 1, current), flush=True)
    return rounds


def render_round(number: int, measured: dict[int, Measurement]) -> str:
    """One line per fleet of a round, and the round's ratio."""
    lines = [f"round {number}:"]
    for workers in WORKER_COUNTS:
        m = measured[workers]
        lines.append(
            f"  {workers} worker(s): {m.requests_per_s:8.1f} req/s  p50 {m.p50_ms:6.2f} ms  "
            f"p99 {m.p99_ms:6.2f} ms  failed {m.failed}  gateway CPU "
            f"{m.cpu_us_per_request} us/req  cores busy {m.cores_busy_percent}"
        )
    one = measured[1]
    if one.ceiling_requests_per_s and one.requests_per_s:
        lines.append(
            f"  1 worker: machine CPU {one.machine_cpu_us_per_request} us/req (gateway "
            f"{one.cpu_us_per_request}, load and stores the rest); every core busy at that "
            f"cost: at most {one.ceiling_requests_per_s:.0f} req/s = "
            f"{one.ceiling_requests_per_s / one.requests_per_s:.2f}x one worker"
        )
    lines.append(f"  ratio 2/1: {_ratio(measured):.2f}x")
    return "\n".join(lines)


def _ratio(measured: dict[int, Measurement]) -> float:
    one = measured[1].requests_per_s
    return measured[2].requests_per_s / one if one else 0.0


def _ceiling_ratio(measured: dict[int, Measurement]) -> float:
    """The most any number of workers could give over one worker's run, on this machine at
    that run's CPU per request (``Measurement.ceiling_requests_per_s``)."""
    one = measured[1]
    ceiling = one.ceiling_requests_per_s
    return ceiling / one.requests_per_s if ceiling and one.requests_per_s else 0.0


def summary(rounds: list[dict[int, Measurement]], options: Options) -> dict[str, Any]:
    """The median ratio over rounds, with min and max, and the median req/s of each fleet."""
    ratios = [_ratio(r) for r in rounds]
    return {
        "connections": options.connections,
        "duration_s": options.duration_s,
        "rounds": len(rounds),
        "requests_per_s_median": {
            str(w): statistics.median(r[w].requests_per_s for r in rounds) for w in WORKER_COUNTS
        },
        "ratio_median": round(statistics.median(ratios), 2),
        "machine_cpu_us_per_request_median": {
            str(w): statistics.median(r[w].machine_cpu_us_per_request or 0 for r in rounds)
            for w in WORKER_COUNTS
        },
        "ceiling_ratio_median": round(statistics.median(_ceiling_ratio(r) for r in rounds), 2),
        "ratio_min": round(min(ratios), 2),
        "ratio_max": round(max(ratios), 2),
        "failed": sum(r[w].failed for r in rounds for w in WORKER_COUNTS),
        "placement": (
            f"load (wrk, simulator, PostgreSQL, Redis) on core {options.load_cpu}; 1 worker on "
            f"core {options.gateway_cpu}; 2 workers on every core"
            if options.load_cpu is not None
            else "nothing pinned"
        ),
    }


def parse_options(argv: Sequence[str] | None) -> Options:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="bench/workers.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each loads both fleets)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=32, help="wrk's concurrency")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--gateway-cpu", type=int, default=0, help="core of the 1-worker fleet")
    parser.add_argument("--load-cpu", type=int, default=1, help="core of everything else")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything")
    args = parser.parse_args(argv)
    args.proxy_cpu = args.gateway_cpu  # run.pinned_cores's name for it
    gateway_cpu, load_cpu = run.pinned_cores(args)
    return Options(
        rounds=max(1, args.rounds),
        duration_s=max(1, args.duration),
        connections=args.connections,
        chunks=args.chunks,
        gateway_cpu=gateway_cpu,
        load_cpu=load_cpu,
        all_cores=frozenset(os.sched_getaffinity(0)),  # read before this process pins itself
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every round was measured without failed requests."""
    options = parse_options(argv)
    if missing := procs.missing_load_tools():
        print(missing, file=sys.stderr)
        return 1
    if options.load_cpu is not None:
        procs.pin_self(options.load_cpu)  # the simulator, wrk, PostgreSQL and Redis inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work_dir = Path(tempfile.mkdtemp(prefix="creditgate-bench-workers-"))
    work_dir.chmod(0o755)  # PostgreSQL runs as the postgres user and must enter it
    sim_port = stack.free_ports(1)[0]
    started: list[procs.Service] = []
    services: stack.GatewayStack | None = None
    try:
        simulator = run.start_simulator(sim_port, options.chunks, work_dir, options.load_cpu)
        started.append(simulator)
        procs.wait_for_port(simulator, sim_port, timeout_s=run.START_TIMEOUT_S)
        services = stack.start_stack(work_dir / "services")
        setup_env = services.gateway_env(
            upstream_base_url=f"http://127.0.0.1:{sim_port}/v1", port=1, admin_port=1
        )
        stack.provision(services, setup_env)
        fleets: dict[int, Fleet] = {}
        for workers in WORKER_COUNTS:
            fleets[workers] = start_fleet(services, workers, sim_port, options, work_dir)
            started.append(fleets[workers].service)
        body = run.request_bodies("gpt-4o-mini")["chat"]
        script = wrkload.write_script(work_dir / "chat.lua", body=body, api_key=services.api_key)
        rounds = run_rounds(fleets, services, script, options)
        result = summary(rounds, options)
        print("summary:", result, flush=True)
        return 0 if result["failed"] == 0 else 1
    finally:
        for service in reversed(started):
            procs.stop(service, timeout_s=60)
        if services is not None:
            services.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
