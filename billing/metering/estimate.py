"""Worst-case token estimates for OpenAI-shaped request bodies.

The hold placed before forwarding is the price of ``prompt_tokens`` (counted with tiktoken,
chat-format overhead included) plus every output token the request may produce:
``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens`` (or the rate card's
``max_output_tokens`` when the client sent none, and never above it), times ``n``.
Source: docs/design.md, "A request's life", step 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.metering.pricing import RateCard
from billing.metering.tokens import TokenCounter


class EstimateError(ValueError):
    """The body has a field of the wrong shape; ``param`` names it (the gateway answers 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Estimate:
    """Token upper bounds for one request.

    Attributes:
        prompt_tokens: tokens of the input as the upstream will count them (our count).
        max_completion_tokens: the most output tokens the request can be billed for.
    """

    prompt_tokens: int
    max_completion_tokens: int


def _positive_int(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"'{name}' must be a positive integer", name)
        return value
    return None


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n > 128:
        raise EstimateError("'n' must be an integer from 1 to 128", "n")
    return n


def _output_cap(requested: int | None, rate_card: RateCard) -> int:
    if requested is None:
        return rate_card.max_output_tokens
    return min(requested, rate_card.max_output_tokens)


def estimate_chat(body: dict[str, Any], rate_card: RateCard, tokens: TokenCounter) -> Estimate:
    """``/v1/chat/completions``: messages (+ tools), max_completion_tokens|max_tokens, n."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EstimateError("'messages' must be a non-empty array", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise EstimateError("each message must be an object", "messages")
    tools = body.get("tools") or body.get("functions")
    prompt = tokens.count_chat_prompt(messages, rate_card.model, tools=tools)
    out = _output_cap(_positive_int(body, "max_completion_tokens", "max_tokens"), rate_card)
    return Estimate(prompt, out * _choices(body))


def estimate_completions(
    body: dict[str, Any], rate_card: RateCard, tokens: TokenCounter
) -> Estimate:
    """``/v1/completions``: prompt (string, strings or token arrays), max_tokens, n, best_of."""
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str | list):
        raise EstimateError("'prompt' must be a string or an array", "prompt")
    prompts = (
        len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    )
    count = tokens.count_completions_prompt(prompt, rate_card.model)
    out = _output_cap(_positive_int(body, "max_tokens"), rate_card)
    best_of = body.get("best_of")
    n = max(_choices(body), best_of if isinstance(best_of, int) and best_of > 0 else 1)
    return Estimate(count, out * n * prompts)


def estimate_responses(body: dict[str, Any], rate_card: RateCard, tokens: TokenCounter) -> Estimate:
    """``/v1/responses``: input (+ instructions), max_output_tokens."""
    data = body.get("input")
    if data is None or not isinstance(data, str | list):
        raise EstimateError("'input' must be a string or an array", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise EstimateError("'instructions' must be a string", "instructions")
    count = tokens.count_responses_input(
        data, rate_card.model, instructions=instructions, tools=body.get("tools")
    )
    out = _output_cap(_positive_int(body, "max_output_tokens"), rate_card)
    return Estimate(count, out)


def estimate_embeddings(
    body: dict[str, Any], rate_card: RateCard, tokens: TokenCounter
) -> Estimate:
    """``/v1/embeddings``: input only; no output tokens."""
    data = body.get("input")
    if data is None or not isinstance(data, str | list):
        raise EstimateError("'input' must be a string or an array", "input")
    return Estimate(tokens.count_embeddings_input(data, rate_card.model), 0)
