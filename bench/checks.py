"""One request of each kind before measuring: a fast wrong answer is not a result.

Checks that the non-streamed answer is a 200 with the simulator's usage, and that the
streamed answer carries every content chunk, ends with ``[DONE]`` and, as the client did not
set ``stream_options.include_usage``, holds no usage chunk (the gateway asks the upstream for
one and must hide it).
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Whether one request was answered correctly; ``detail`` says what was seen."""

    ok: bool
    detail: str


def post(url: str, body: bytes, api_key: str) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` as JSON to a loopback ``url``; returns status, headers and the body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=_TIMEOUT_S)
    try:
        conn.request(
            "POST",
            parts.path,
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def check_chat(url: str, body: bytes, api_key: str, *, chunks: int) -> CheckResult:
    """A non-streamed chat completion: 200, ``chunks`` completion tokens in its usage."""
    try:
        status, _headers, data = post(url, body, api_key)
    except OSError as exc:
        return CheckResult(False, f"request failed: {exc!r}")
    if status != 200:
        return CheckResult(False, f"status {status}: {data[:500]!r}")
    try:
        usage = json.loads(data)["usage"]
    except (ValueError, KeyError, TypeError):
        return CheckResult(False, f"no usage in the answer: {data[:500]!r}")
    if usage.get("completion_tokens") != chunks:
        return CheckResult(False, f"completion_tokens {usage.get('completion_tokens')}")
    return CheckResult(True, f"200, usage {usage['prompt_tokens']}+{chunks} tokens")


def check_stream(url: str, body: bytes, api_key: str, *, chunks: int) -> CheckResult:
    """A streamed chat completion without ``include_usage``: all ``chunks`` content deltas,
    ``[DONE]`` last, and no usage chunk."""
    try:
        status, headers, data = post(url, body, api_key)
    except OSError as exc:
        return CheckResult(False, f"request failed: {exc!r}")
    if status != 200:
        return CheckResult(False, f"status {status}: {data[:500]!r}")
    events = [e for e in data.split(b"\n\n") if e.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        return CheckResult(False, f"does not end with [DONE]: {data[-300:]!r}")
    content = 0
    for event in events[:-1]:
        obj = _event_json(event)
        if obj is None:
            return CheckResult(False, f"not a JSON data event: {event[:300]!r}")
        if obj.get("usage"):
            return CheckResult(False, f"usage chunk reached a client that did not ask: {event!r}")
        if "error" in obj:
            return CheckResult(False, f"error event: {event[:300]!r}")
        for choice in obj.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                content += 1
    if content != chunks:
        return CheckResult(False, f"{content} content chunks, expected {chunks}")
    kind = headers.get("Content-Type", "?")
    return CheckResult(True, f"200 {kind}, {content} chunks, [DONE], no usage chunk")


def _event_json(event: bytes) -> dict[str, Any] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data: "):
            try:
                obj = json.loads(line[6:])
            except ValueError:
                return None
            return obj if isinstance(obj, dict) else None
    return None
