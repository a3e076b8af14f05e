"""What a test scripts and what it reads back.

:class:`Scenario` says how the simulator answers a request; :class:`ReceivedRequest` records
what arrived and how its answer ended; :func:`approximate_prompt_tokens` is the prompt-token
estimate reported when a scenario names none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from multidict import CIMultiDictProxy


@dataclass(frozen=True, eq=False, kw_only=True)
class Scenario:
    """How the simulator answers one request (or every request, as the default).

    Attributes:
        chunks: content chunks generated; each is one completion token. A request's
            ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` caps it
            (then ``finish_reason`` is ``"length"``).
        chunk_text: the text of every chunk. The default, ``" hello"``, is exactly one token
            in both o200k_base and cl100k_base, so counting the output with tiktoken gives
            ``chunks``.
        delay_s: seconds before each content chunk (a non-streamed answer waits the sum).
        prompt_tokens: reported prompt/input tokens; ``None`` estimates from the request.
        usage: replaces the whole reported usage object, verbatim.
        cached_tokens: ``prompt_tokens_details.cached_tokens`` (``input_tokens_details`` for
            Responses).
        reasoning_tokens: hidden reasoning tokens, added to the completion tokens.
        fail_status: answer this HTTP status in OpenAI's error envelope before any output.
        fail_message: the error message of ``fail_status`` and mid-stream errors.
        fail_after_chunks: stop after ``min(fail_after_chunks, chunks)`` content chunks,
            before the final chunk and the usage: by closing the connection
            (``fail_mode="disconnect"``) or by sending an SSE error event and ending the
            stream (``"error_event"``). A non-streamed request gets its connection closed, or a 500.
        hang: never answer; wait until the client goes away.
        hang_after_chunks: stream this many content chunks, then stall until the client goes.
        omit_usage: report no usage at all, as an upstream that ignores ``stream_options``.
        stream_trailer: raw bytes sent right after a chat/completions stream's ``[DONE]``, in
            the same write (e.g. ``b": bye\n\n"``, an SSE comment), as a sloppy upstream might.
        stream_trailer_delay_s: send ``stream_trailer`` in a write of its own, this many
            seconds after the one that ends with ``[DONE]`` (``None``: in the same write).
        disconnect_after_stream: cut the connection after a whole stream's last write
            instead of ending its chunked body (an upstream that breaks after ``[DONE]``).
        raw_answer: answer 200 with exactly these bytes, in one write, instead of a
            generated answer: the JSON body of a non-streamed request, the event stream of a
            streamed one. For shapes nothing else scripts: a body that is not JSON, fields
            of the wrong type, numbers orjson cannot write.
    """

    chunks: int = 16
    chunk_text: str = " hello"
    delay_s: float = 0.0
    prompt_tokens: int | None = None
    usage: dict[str, Any] | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    fail_status: int | None = None
    fail_message: str = "The simulated upstream failed."
    fail_after_chunks: int | None = None
    fail_mode: Literal["disconnect", "error_event"] = "disconnect"
    hang: bool = False
    hang_after_chunks: int | None = None
    omit_usage: bool = False
    stream_trailer: bytes = b""
    stream_trailer_delay_s: float | None = None
    disconnect_after_stream: bool = False
    raw_answer: bytes | None = None


@dataclass(kw_only=True)
class ReceivedRequest:
    """One request as the simulator saw it, for assertions.

    Attributes:
        json: the parsed body; ``None`` for a GET or a body that is not JSON.
        outcome: ``"pending"``, ``"completed"``, ``"rejected"`` (401/400), ``"failed"``
            (scripted failure), or ``"disconnected"`` (the client went away first).
        chunks_sent: content chunks streamed (or, not streamed, generated) before the outcome.
    """

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    json: Any
    outcome: str = "pending"
    chunks_sent: int = 0

    @property
    def api_key(self) -> str | None:
        """The bearer token that reached the upstream, or ``None``."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return (token.strip() or None) if scheme.lower() == "bearer" else None


def approximate_prompt_tokens(prompt: object) -> int:
    """``1 + characters // 4`` over every string in ``prompt``; a token id counts as 4.

    Cheap and deterministic, not a tokenization; tests that need exact numbers set
    ``Scenario.prompt_tokens`` or ``Scenario.usage``.
    """
    return 1 + _characters(prompt) // 4


def _characters(value: object) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_characters(item) for item in value)
    if isinstance(value, dict):
        return sum(_characters(item) for item in value.values())
    return 0
