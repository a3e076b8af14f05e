"""A local OpenAI-compatible upstream: scripted, fast, and loudly fake.

Used three ways:

- ``make run`` without a real upstream key: ``python -m devtools.simulator --port 8090``
  prints a banner saying every answer is canned, then serves ``/v1``.
- Tests: :class:`Simulator` starts it in-process on a free loopback port; tests script each
  request with a :class:`Scenario` (chunks, delays, usage, errors, hangs, disconnects) and
  assert on the requests it received and on the clients that went away.
- Benchmarks: responses are rendered to JSON bytes when a scenario is set or pushed; a request
  only fills a few holes (id, model, usage) and joins bytes, and its prompt tokens are a
  character count, never a tokenization.

Endpoints (OpenAI's shapes): ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/responses`` (each streamed or not), ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /v1/models/{id}``.

Usage it reports, unless ``Scenario.usage`` replaces the whole object: prompt tokens are
``Scenario.prompt_tokens`` or ``1 + characters // 4`` of the request's prompt text (the
common four-characters-per-token rule); completion tokens are the content chunks sent (each
chunk is one token) plus ``Scenario.reasoning_tokens``. Streams carry usage only when the
request asked with ``stream_options.include_usage`` (Responses streams always do, in
``response.completed``), as OpenAI's do.

Modules: :mod:`.scenario` (what a test scripts and reads back), :mod:`.shapes` (OpenAI's
response formats, pre-rendered to bytes), :mod:`.state` (what the app holds), :mod:`.server`
(the aiohttp app and its handlers), :mod:`.runner` (:class:`Simulator` and ``main``).
"""

from devtools.simulator.runner import Simulator, main
from devtools.simulator.scenario import ReceivedRequest, Scenario, approximate_prompt_tokens
from devtools.simulator.server import create_simulator_app
from devtools.simulator.state import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    DEFAULT_MODELS,
    MAX_EMBEDDING_DIMENSIONS,
    SIMULATOR_STATE,
    SimulatorState,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "DEFAULT_MODELS",
    "MAX_EMBEDDING_DIMENSIONS",
    "SIMULATOR_STATE",
    "ReceivedRequest",
    "Scenario",
    "Simulator",
    "SimulatorState",
    "approximate_prompt_tokens",
    "create_simulator_app",
    "main",
]
