"""Running the simulator: in-process for tests and benchmarks, or as a process.

:class:`Simulator` starts it on a free loopback port and is its state; ``main`` is
``python -m devtools.simulator``, which prints a banner saying every answer is canned.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from aiohttp import web

from devtools.simulator.scenario import Scenario
from devtools.simulator.server import _build_app, create_simulator_app
from devtools.simulator.state import DEFAULT_MODELS, SimulatorState


class Simulator(SimulatorState):
    """The simulator on a free loopback port, started and stopped by a test or benchmark.

    It is the app's state, so scripting and assertions go straight to it::

        async with Simulator() as sim:
            client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test")
            sim.push(Scenario(chunks=3, fail_after_chunks=1))
            ...
            assert sim.requests[-1].api_key == "sk-test"
            await sim.wait_for_disconnects(1)
    """

    def __init__(
        self,
        default: Scenario | None = None,
        *,
        require_auth: bool = True,
        models: Sequence[str] = DEFAULT_MODELS,
        max_recorded: int = 10_000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Build the app; nothing listens until :meth:`start`. ``port=0`` picks a free one."""
        super().__init__(
            default, require_auth=require_auth, models=models, max_recorded=max_recorded
        )
        self.app = _build_app(self)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, the ``base_url`` for the ``openai`` client."""
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        """Listen on ``host:port``; after this, :attr:`port` is the bound port."""
        # A short shutdown_timeout: stop() must not wait a minute for scripted hangs.
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and cancel answers still running. Safe to call twice."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _banner(base_url: str, require_auth: bool) -> str:
    rule = "!" * 78
    auth = "any 'Authorization: Bearer <token>'" if require_auth else "no authentication"
    return "\n".join(
        [
            rule,
            "!!  SIMULATED UPSTREAM: every answer is canned text, no model is called.",
            f"!!  OpenAI-compatible API at {base_url} ({auth}).",
            "!!  Set UPSTREAM_BASE_URL and UPSTREAM_API_KEY for a real provider.",
            rule,
        ]
    )


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m devtools.simulator``: serve the simulator until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.simulator",
        description="A local, fake OpenAI-compatible upstream for development and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--chunks", type=int, default=16, help="content chunks per answer")
    parser.add_argument("--chunk-text", default=" hello", help="text of every chunk")
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds before each chunk")
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a key")
    args = parser.parse_args(None if argv is None else list(argv))
    app = create_simulator_app(
        Scenario(chunks=args.chunks, chunk_text=args.chunk_text, delay_s=args.delay_s),
        require_auth=not args.no_auth,
        max_recorded=0,
    )
    print(_banner(f"http://{args.host}:{args.port}/v1", not args.no_auth), file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        loop=loop,
    )
