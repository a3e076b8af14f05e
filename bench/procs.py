"""Processes under test: start pinned to a core, wait until ready, measure CPU, stop.

Every wait has a deadline and every process started here is stopped by ``stop()`` (SIGTERM,
then SIGKILL), which the benchmark calls from ``finally`` blocks. Output goes to files so a
chatty process can never block on a full pipe, and so a failure can quote its stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_POLL_S = 0.05
_TAIL_LINES = 40
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessError(RuntimeError):
    """A process exited early or did not become ready in time; the message quotes its logs."""


@dataclass
class Service:
    """A started process and the files holding its stdout and stderr."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        """The process id (the program itself: ``taskset`` execs it)."""
        return self.process.pid

    def stderr_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines of stderr (and stdout, when stderr is empty)."""
        text = _read(self.stderr_path) or _read(self.stdout_path)
        return "\n".join(text.splitlines()[-lines:])


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    cpu: int | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start ``argv`` in its own process group, pinned to ``cpu`` with ``taskset`` (None: not
    pinned), with stdout and stderr in ``log_dir/<name>.out`` and ``.err``."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    stdout_path = log_dir / f"{name}.out"
    stderr_path = log_dir / f"{name}.err"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            process_group=0,
        )
    return Service(name, process, stdout_path, stderr_path)


def wait_for_line(service: Service, prefix: str, *, timeout_s: float) -> str:
    """Wait until a stdout line starts with ``prefix``; returns that line.

    Raises:
        ProcessError: the process exited, or ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for line in _read(service.stdout_path).splitlines():
            if line.startswith(prefix):
                return line
        _check_alive(service, f"before printing {prefix!r}")
        if time.monotonic() > deadline:
            raise ProcessError(
                f"{service.name} printed no {prefix!r} line within {timeout_s:.0f} s\n"
                f"--- stderr ---\n{service.stderr_tail()}"
            )
        time.sleep(_POLL_S)


def wait_for_port(service: Service, port: int, *, timeout_s: float) -> None:
    """Wait until 127.0.0.1:``port`` accepts TCP connections.

    Raises:
        ProcessError: the process exited, or ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        _check_alive(service, f"before listening on {port}")
        if time.monotonic() > deadline:
            raise ProcessError(
                f"{service.name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s\n"
                f"--- stderr ---\n{service.stderr_tail()}"
            )
        time.sleep(_POLL_S)


def stop(service: Service, *, timeout_s: float = 15.0) -> int | None:
    """SIGTERM the process group, SIGKILL it after ``timeout_s``; returns the exit status."""
    process = service.process
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
    return process.returncode


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far; 0 when it is gone.

    Source: proc(5), ``/proc/<pid>/stat`` fields 14 (utime) and 15 (stime), in clock ticks.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def core_busy_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, total ticks) since boot, from ``/proc/stat``'s ``cpuN`` lines
    (busy excludes idle and iowait)."""
    cores: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in values[:8]]
            idle = ticks[3] + ticks[4]
            cores[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return cores


def core_busy_percent(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    """Per core: percent of the interval between two ``core_busy_ticks()`` spent busy."""
    percent: dict[int, float] = {}
    for core, (busy, total) in after.items():
        busy0, total0 = before.get(core, (0, 0))
        span = total - total0
        percent[core] = round(100.0 * (busy - busy0) / span, 1) if span > 0 else 0.0
    return percent


def missing_load_tools() -> str | None:
    """What to install when ``wrk`` or ``taskset`` is missing (the load and the pinning every
    benchmark needs), or None when both are there."""
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            return f"{tool} not found: apt-get install -y wrk util-linux"
    return None


def pin_self(cpu: int) -> None:
    """Pin this process (and so every child it starts later) to core ``cpu``."""
    os.sched_setaffinity(0, {cpu})


def _check_alive(service: Service, what: str) -> None:
    code = service.process.poll()
    if code is not None:
        raise ProcessError(
            f"{service.name} exited with status {code} {what}\n"
            f"--- stderr ---\n{service.stderr_tail()}"
        )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
