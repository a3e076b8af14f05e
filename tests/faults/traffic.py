"""Paid mixed traffic through the official ``openai`` SDK, recorded for the verdict.

``Traffic`` runs a few workers, one account each, alternating streamed and plain chat
completions at a modest rate while a case injects its fault. Every response the client got
whole is a ``Completed`` (its ``x-request-id`` and the usage the client saw); everything else
is counted in ``failures`` by kind.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Any

import openai

from devtools.simulator import Scenario
from tests.faults.stack import FaultStack

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello a few times."}]
MAX_TOKENS = 20
# Streams last ~0.1 s, so a fault always catches some mid-answer.
DEFAULT_SCENARIO = Scenario(chunks=10, delay_s=0.01)
CLIENT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Completed:
    """A response the client received whole.

    Attributes:
        usage: the usage object the client saw (``None``: none was sent).
        trusted: the usage came from an honest upstream, so the charge must be exactly the rate
            card's price of it; False for hostile upstream answers (charged once, at a bound or
            an estimate).
    """

    request_id: str
    account_id: int
    model: str
    streamed: bool
    usage: dict[str, Any] | None
    trusted: bool = True


@dataclass
class Traffic:
    """Background traffic against one ``FaultStack``."""

    stack: FaultStack
    workers: int = 3
    pause_s: float = 0.05
    completed: list[Completed] = field(default_factory=list)
    # Answers the client got part of (content, then an error or a cut): charged once, > 0.
    partial: list[Completed] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    accounts: list[tuple[int, str]] = field(default_factory=list)
    _clients: dict[str, openai.AsyncOpenAI] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _running: bool = False
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    _in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Set whenever a response completes (a case waits on it to strike right after a delivery).
    delivered: asyncio.Event = field(default_factory=asyncio.Event)

    def client(self, key: str) -> openai.AsyncOpenAI:
        """The SDK for one key, pointed at the gateway (no retries: every call is one)."""
        if key not in self._clients:
            self._clients[key] = openai.AsyncOpenAI(
                base_url=self.stack.gateway.base_url,
                api_key=key,
                max_retries=0,
                timeout=CLIENT_TIMEOUT_S,
            )
        return self._clients[key]

    async def start(self) -> Traffic:
        self.stack.sim.set_default(DEFAULT_SCENARIO)
        for _ in range(self.workers - len(self.accounts)):
            self.accounts.append(await self.stack.create_account())
        self._running = True
        self._gate.set()
        self._tasks = [
            asyncio.create_task(self._work(account, key, index))
            for index, (account, key) in enumerate(self.accounts)
        ]
        return self

    async def stop(self) -> None:
        self._running = False
        self._gate.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLIENT_TIMEOUT_S + 10)
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        await self.stop()
        for client in self._clients.values():
            await client.close()

    async def _work(self, account_id: int, key: str, index: int) -> None:
        streamed = bool(index % 2)
        while self._running:
            await self._gate.wait()
            if not self._running:
                return
            self._in_flight += 1
            self._idle.clear()
            try:
                await self.one(account_id, key, streamed=streamed)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
            streamed = not streamed
            await asyncio.sleep(self.pause_s)

    async def one(self, account_id: int, key: str, *, streamed: bool) -> Completed | None:
        """One paid request; records and returns it if completed."""
        client = self.client(key)
        try:
            if streamed:
                done = await _streamed(client, account_id)
            else:
                done = await _plain(client, account_id)
        except openai.APIStatusError as exc:
            self.failures[f"status {exc.status_code}"] += 1
            return None
        except Exception as exc:
            self.failures[type(exc).__name__] += 1
            return None
        self.completed.append(done)
        self.delivered.set()
        return done

    async def quiesce(self) -> None:
        """Hold the workers and wait until none has a request in flight, so the simulator's
        scripted answers go to the case's own requests only."""
        self._gate.clear()
        if self._in_flight:
            await asyncio.wait_for(self._idle.wait(), CLIENT_TIMEOUT_S + 5)

    def resume(self) -> None:
        self._gate.set()

    async def probe(self, account_id: int, key: str, *, streamed: bool) -> Completed | None:
        """One paid request whose answer may be hostile: sent with the SDK, read raw (the SDK's
        models would refuse some shapes). A whole answer goes to ``completed`` (untrusted), an
        answer cut after some bytes to ``partial``."""
        client = self.client(key)
        kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        if streamed:
            kwargs |= {"stream": True, "stream_options": {"include_usage": True}}
        try:
            raw = await client.chat.completions.with_raw_response.create(**kwargs)
        except openai.APIStatusError as exc:
            self.failures[f"status {exc.status_code}"] += 1
            return None
        except Exception as exc:
            self.failures[type(exc).__name__] += 1
            return None
        request_id = raw.headers["x-request-id"]
        body = bytearray()
        try:
            async for piece in raw.http_response.aiter_bytes():
                body += piece
            whole, usage = _read_stream(bytes(body)) if streamed else _read_body(bytes(body))
        except Exception as exc:
            self.failures[type(exc).__name__] += 1
            whole, usage = False, None
        record = Completed(request_id, account_id, MODEL, streamed, usage, trusted=False)
        if whole:
            self.completed.append(record)
            return record
        if body:
            self.partial.append(record)
        else:
            self.failures["empty answer"] += 1
        return None

    async def wait_serving(self, *, timeout_s: float = 60.0) -> float:
        """Seconds until one plain and one streamed paid request both complete in a row."""
        if not self.accounts:
            self.accounts.append(await self.stack.create_account())
        account_id, key = self.accounts[0]
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            plain = await self.one(account_id, key, streamed=False)
            streamed = await self.one(account_id, key, streamed=True)
            if plain is not None and streamed is not None:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"the gateway did not serve again within {timeout_s} s "
            f"(failures so far: {dict(self.failures)})"
        )


async def _plain(client: openai.AsyncOpenAI, account_id: int) -> Completed:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS
    )
    completion = raw.parse()
    usage = completion.usage.model_dump() if completion.usage is not None else None
    return Completed(raw.headers["x-request-id"], account_id, MODEL, False, usage)


async def _streamed(client: openai.AsyncOpenAI, account_id: int) -> Completed:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    async for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return Completed(raw.headers["x-request-id"], account_id, MODEL, True, usage)


def _read_body(body: bytes) -> tuple[bool, dict[str, Any] | None]:
    """(whole, usage) of a plain answer: whole when it is a JSON object without ``error``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False, None
    if not isinstance(parsed, dict) or "error" in parsed:
        return False, None
    usage = parsed.get("usage")
    return True, usage if isinstance(usage, dict) else None


def _read_stream(body: bytes) -> tuple[bool, dict[str, Any] | None]:
    """(whole, usage) of an event stream: whole when it ends with ``[DONE]`` and carries no
    error event; usage from the last event that has one."""
    done = errored = False
    usage = None
    for event in body.split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                parsed = json.loads(payload)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                errored = errored or "error" in parsed
                if isinstance(parsed.get("usage"), dict):
                    usage = parsed["usage"]
    return done and not errored, usage
