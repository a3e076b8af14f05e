"""Does settlement keep up? One long run against the gateway, watching its outbox.

``bench/paired.py --sustain SECONDS`` ends with this: wrk loads the gateway alone (streamed
chat at c=N) for SECONDS while this samples, once a second, the settlement outbox (``XLEN``
over every ``cg:v2:{sNN}:settlements`` shard: settlements not yet posted to Postgres) and counts the
``usage_events`` rows written during the run. A poster that keeps up holds the backlog to
about one batch cycle's worth (the poster lingers ~20 ms between small batches, and a
Postgres commit waits for its fsync), with no upward trend; one that does not shows a backlog
growing with time. The short paired runs cannot tell the two apart: the poster runs in the
gateway process and each run is only seconds long.

It reports the settlement rate: ``usage_events`` rows posted per second during the run (what
the writer kept up with), and during the drain after it (what one writer posts flat out while
a backlog is left: the outbox's rows over the seconds it took to empty). With
``bench/paired.py --sustain SECONDS --workers N`` the gateway runs ``WORKERS=N`` (issue 15:
each worker has its own poster); a gateway without that setting ignores it and runs one
process. Give the workers cores of their own (``--no-pin``, or a machine with more cores):
pinned, the whole gateway shares the one proxy core.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import stack
import wrkload

_SAMPLE_S = 1.0
# A backlog this long at the end of the run takes the poster several batches to drain: its
# rate then is the writer's; a shorter one drains within a poll or two and says nothing.
_DRAIN_RATE_MIN_ROWS = 2_000


@dataclass
class Sustained:
    """What one sustained run showed.

    Attributes:
        requests: what wrk completed; ``requests_per_s`` per second.
        backlog: the outbox length, sampled once a second during the run.
        posted_share: ``usage_events`` rows written during the run per request completed.
        drained_s: seconds after the run until the outbox was empty (None: not within 30 s).
        posted_per_s: ``usage_events`` rows written per second during the run.
        drain_posted_per_s: rows written per second from the end of the run until the outbox
            was empty (None: it did not empty, or too little was left to tell,
            ``_DRAIN_RATE_MIN_ROWS``).
        workers: the ``WORKERS`` the gateway was started with (None: its default).
    """

    seconds: int
    connections: int
    workers: int | None = None
    requests: int = 0
    requests_per_s: float = 0.0
    backlog: list[int] = field(default_factory=list)
    posted_share: float = 0.0
    drained_s: float | None = None
    posted_per_s: float = 0.0
    drain_posted_per_s: float | None = None

    def halves(self) -> tuple[float, float]:
        """Median backlog over the first and the second half of the run."""
        half = len(self.backlog) // 2
        if half == 0:
            return 0.0, 0.0
        return statistics.median(self.backlog[:half]), statistics.median(self.backlog[half:])

    def render(self) -> str:
        """Three lines for the report."""
        first, second = self.halves()
        peak = max(self.backlog, default=0)
        drained = "not within 30 s" if self.drained_s is None else f"{self.drained_s:.1f} s"
        workers = "default" if self.workers is None else str(self.workers)
        drain_rate = (
            "- (no backlog to measure)"
            if self.drain_posted_per_s is None
            else f"{self.drain_posted_per_s:,.0f}/s"
        )
        return (
            f"sustained gateway stream c={self.connections} for {self.seconds} s, WORKERS "
            f"{workers}: {self.requests_per_s:,.0f} req/s, {self.posted_share:.0%} posted to "
            f"Postgres during the run\n"
            f"  settlements posted: {self.posted_per_s:,.0f}/s during the run, {drain_rate} "
            f"draining the backlog after it\n"
            f"  outbox backlog sampled every {_SAMPLE_S:.0f} s: median {first:,.0f} in the "
            f"first half, {second:,.0f} in the second, max {peak:,}\n"
            f"  empty again {drained} after the run"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "halves_median": self.halves()}


def run_sustained(
    url: str,
    script: Any,
    gateway: stack.GatewayStack,
    *,
    seconds: int,
    connections: int,
    load_cpu: int | None,
    workers: int | None = None,
) -> Sustained:
    """Load the gateway for ``seconds`` and watch its outbox (see the module docstring).

    Raises:
        wrkload.WrkError, stack.StackError: wrk or a service failed.
    """
    result = Sustained(seconds, connections, workers)
    rows_before = gateway.usage_rows()
    started = time.monotonic()
    outcome: dict[str, Any] = {}

    def load() -> None:
        try:
            outcome["run"] = wrkload.run(
                url, script, connections=connections, duration_s=seconds, cpu=load_cpu
            )
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=load, name="sustained-wrk", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(_SAMPLE_S)
        if worker.is_alive():
            result.backlog.append(gateway.backlog().length)
    if "error" in outcome:
        raise outcome["error"]
    done: wrkload.WrkResult = outcome["run"]
    rows_after_run = gateway.usage_rows()
    rows_during = rows_after_run - rows_before
    result.posted_per_s = rows_during / (time.monotonic() - started)
    result.requests = done.requests
    result.requests_per_s = done.requests_per_s
    result.posted_share = rows_during / done.requests if done.requests else 0.0
    started = time.monotonic()
    while time.monotonic() - started < 30:
        backlog = gateway.backlog()
        if backlog.length == 0 and backlog.pending == 0:
            drained_s = time.monotonic() - started
            result.drained_s = round(drained_s, 1)
            left = gateway.usage_rows() - rows_after_run
            if left >= _DRAIN_RATE_MIN_ROWS and drained_s > 0:
                result.drain_posted_per_s = round(left / drained_s, 1)
            break
        time.sleep(0.1)
    return result
