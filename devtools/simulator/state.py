"""What the simulator app holds: the scenario queue, received requests, disconnects.

:class:`SimulatorState` is reached from a handler as ``app[SIMULATOR_STATE]``; a
:class:`~devtools.simulator.runner.Simulator` is one, so tests script and assert on it directly.
"""

from __future__ import annotations

import array
import asyncio
import base64
import itertools
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

import orjson
from aiohttp import web

from devtools.simulator.scenario import ReceivedRequest, Scenario
from devtools.simulator.shapes import _Script

DEFAULT_MODELS: Final = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
)
DEFAULT_EMBEDDING_DIMENSIONS: Final = 16
MAX_EMBEDDING_DIMENSIONS: Final = 4096


class SimulatorState:
    """Everything the simulator app holds: scenarios, received requests, disconnects.

    Reach it as ``app[SIMULATOR_STATE]``; a :class:`Simulator` is one. Arguments as for
    :func:`create_simulator_app`.

    Attributes:
        disconnects: answers abandoned because the client went away before they ended.
    """

    def __init__(
        self,
        default: Scenario | None = None,
        *,
        require_auth: bool = True,
        models: Sequence[str] = DEFAULT_MODELS,
        max_recorded: int = 10_000,
        embedding_dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS,
    ) -> None:
        self.require_auth = require_auth
        self.embedding_dimensions = embedding_dimensions
        self.disconnects = 0
        self._default = _Script(default or Scenario())
        self._queue: deque[_Script] = deque()
        self._recorded: deque[ReceivedRequest] = deque(maxlen=max_recorded)
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._vectors: dict[tuple[int, bool], bytes] = {}
        models_list = [
            {"id": model, "object": "model", "created": 1_715_367_049, "owned_by": "simulator"}
            for model in models
        ]
        self.models_body = orjson.dumps({"object": "list", "data": models_list})
        self.model_bodies = {entry["id"]: orjson.dumps(entry) for entry in models_list}

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Requests received, oldest first (the last ``max_recorded`` of them)."""
        return list(self._recorded)

    def push(self, *scenarios: Scenario) -> None:
        """Queue scenarios for the next requests, one each, in order; then the default."""
        self._queue.extend(_Script(scenario) for scenario in scenarios)

    def set_default(self, scenario: Scenario) -> None:
        """Answer requests with ``scenario`` whenever the queue is empty."""
        self._default = _Script(scenario)

    def clear(self) -> None:
        """Forget queued scenarios, received requests and the disconnect count."""
        self._queue.clear()
        self._recorded.clear()
        self.disconnects = 0

    async def wait_until(self, predicate: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checked whenever a request arrives or ends.

        Raises:
            TimeoutError: still false after ``timeout_s`` seconds.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_disconnects(self, count: int = 1, *, timeout_s: float = 5.0) -> None:
        """Wait until at least ``count`` clients went away mid-answer."""
        await self.wait_until(lambda: self.disconnects >= count, timeout_s=timeout_s)

    def next_script(self) -> _Script:
        return self._queue.popleft() if self._queue else self._default

    def next_id(self, prefix: str) -> bytes:
        return orjson.dumps(f"{prefix}{next(self._ids):012d}")

    def record(self, record: ReceivedRequest) -> None:
        self._recorded.append(record)
        self._changed.set()

    def conclude(self, record: ReceivedRequest, outcome: str) -> None:
        """Set a pending request's outcome; a client gone first counts as a disconnect."""
        if record.outcome != "pending":
            return
        record.outcome = outcome
        if outcome == "disconnected":
            self.disconnects += 1
        self._changed.set()

    def vector(self, dimensions: int, as_base64: bool) -> bytes:
        """One embedding as JSON bytes: a float list, or base64 of little-endian float32."""
        key = (dimensions, as_base64)
        if key not in self._vectors:
            # Multiples of 1/16 survive the float32 round trip of base64 exactly.
            values = [((i % 16) - 8) / 16 for i in range(dimensions)]
            if as_base64:
                packed = array.array("f", values)
                if sys.byteorder == "big":
                    packed.byteswap()
                self._vectors[key] = orjson.dumps(base64.b64encode(packed.tobytes()).decode())
            else:
                self._vectors[key] = orjson.dumps(values)
        return self._vectors[key]


SIMULATOR_STATE: Final = web.AppKey("simulator_state", SimulatorState)
