"""Sample the gateway with py-spy while it is under load, and name its hot spots.

Two samplers watch the same run: one writes a flame graph (SVG) to look at, the other folded
stacks (``--format raw``) that :func:`hot_spots` reads. They pause the process for each sample
(py-spy's default): slower by a few percent, but every stack is whole. ``--nonblocking``
would read stacks as they change and record many cut short, which skews inclusive shares.
The profiled runs are extra runs, never the measured ones. py-spy drops idle samples (the
event loop waiting in epoll) unless told otherwise, so the shares are of busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_RATE_HZ = 100
_GRACE_S = 30.0
_LINE_NUMBER = re.compile(r":\d+\)$")
# Frames of our own code, for the inclusive view (py-spy already shortened the paths).
_OWN_CODE = re.compile(r"\((?:.*/)?(?:gateway|billing|creditgate|admin_api|runtime)/[^/]+\.py\)$")
# Frames in nearly every sample say nothing; nor do the process's entry points.
_WRAPPER_PERCENT = 95.0
_ENTRY_POINTS = ("(creditgate/cli.py)", "(creditgate/serve.py)")
# A sample whose top frame is asyncio's Runner.run was in uvloop's C event loop.
_EVENT_LOOP_FRAME = "Runner.run (asyncio/runners.py)"
_LIBRARY_PREFIX = re.compile(r"^.*/(?:site-packages|lib/python3\.\d+)/")
_REPO_PREFIX = str(Path(__file__).resolve().parent.parent) + "/"


@dataclass(frozen=True, slots=True)
class Profile:
    """Where a profiled run's outputs went, and how many samples it took."""

    svg: Path
    folded: Path
    samples: int


def py_spy_executable() -> str | None:
    """py-spy beside this interpreter (the venv's), else on PATH, else None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def start_samplers(
    pid: int, *, duration_s: int, out_dir: Path, name: str, cpu: int | None
) -> list[subprocess.Popen[bytes]]:
    """Start the two py-spy samplers on ``pid`` for ``duration_s`` seconds.

    Writes ``out_dir/<name>.svg`` and ``out_dir/<name>.folded``. py-spy needs ptrace rights
    (root, or CAP_SYS_PTRACE); without them it exits with an error the caller reports.
    """
    executable = py_spy_executable()
    if executable is None:
        raise FileNotFoundError("py-spy is not installed (pip install -e '.[dev]')")
    samplers = []
    for fmt, suffix in (("flamegraph", "svg"), ("raw", "folded")):
        argv = [
            executable,
            "record",
            *("--pid", str(pid), "--duration", str(duration_s), "--rate", str(_RATE_HZ)),
            *("--format", fmt, "-o", str(out_dir / f"{name}.{suffix}")),
        ]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        log = (out_dir / f"{name}.{suffix}.log").open("wb")
        samplers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        log.close()
    return samplers


def finish_samplers(
    samplers: list[subprocess.Popen[bytes]], *, duration_s: int, out_dir: Path, name: str
) -> Profile:
    """Wait for the samplers (killed after ``duration_s`` + 30 s) and check their output.

    Raises:
        RuntimeError: a sampler failed; the message quotes its log.
    """
    for sampler in samplers:
        try:
            sampler.wait(timeout=duration_s + _GRACE_S)
        except subprocess.TimeoutExpired:
            sampler.kill()
            sampler.wait(timeout=_GRACE_S)
    svg, folded = out_dir / f"{name}.svg", out_dir / f"{name}.folded"
    for sampler, path in zip(samplers, (svg, folded), strict=True):
        if sampler.returncode != 0 or not path.is_file():
            log = Path(f"{path}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"py-spy ({path.name}) failed, status {sampler.returncode}:\n{log}")
    return Profile(svg, folded, sum(count for _stack, count in _stacks(folded)))


def hot_spots(folded: Path, *, top: int = 12) -> dict[str, Any]:
    """The busiest frames of a folded-stacks file, as (frame, percent of busy samples).

    Returns:
        ``self``: frames that were running (on top of the stack), any code;
        ``by_package``: self time summed per top-level package (aiohttp, redis, gateway...);
        ``inclusive``: frames of our own packages with everything they called, leaving out
        the entry points and wrappers present in nearly every sample.

    ``complete_percent`` is the share of samples whose stack reaches the entry point.
    """
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = complete = 0
    for stack, count in _stacks(folded):
        frames = [_short(_LINE_NUMBER.sub(")", frame)) for frame in stack.split(";")]
        total += count
        complete += count if frames[0].startswith("<module>") else 0
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            if _OWN_CODE.search(frame) and not frame.endswith(_ENTRY_POINTS):
                inclusive[frame] += count
    if total == 0:
        return {"self": [], "by_package": [], "inclusive": [], "complete_percent": 0.0}

    def share(counter: Counter[str], limit: int) -> list[tuple[str, float]]:
        ranked = [(frame, 100.0 * n / total) for frame, n in counter.most_common()]
        return [(frame, round(p, 1)) for frame, p in ranked if p < _WRAPPER_PERCENT][:limit]

    return {
        "self": share(own, top),
        "by_package": share(packages, top),
        "inclusive": share(inclusive, top),
        "complete_percent": round(100.0 * complete / total, 1),
    }


def _stacks(folded: Path) -> list[tuple[str, int]]:
    stacks = []
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack, int(count)))
    return stacks


def _package(frame: str) -> str:
    """The top-level package of a shortened frame: ``aiohttp``, ``gateway``, ``asyncio``..."""
    if frame == _EVENT_LOOP_FRAME:
        return "uvloop (C event loop)"
    _name, _, path = frame.partition(" (")
    return path.rstrip(")").split("/", 1)[0] or "?"


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/aiohttp/web.py)`` -> ``fn (aiohttp/web.py)``."""
    name, _, path = frame.partition(" (")
    path = path.rstrip(")")
    path = _LIBRARY_PREFIX.sub("", path.removeprefix(_REPO_PREFIX))
    return f"{name} ({path})" if path else name
