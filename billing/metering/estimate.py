"""Worst-case token estimates for OpenAI-shaped request bodies.

The hold placed before forwarding is the price of ``prompt_tokens`` (counted with tiktoken,
chat-format overhead included) plus every output token the request may produce:
``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens`` (or the rate card's
``max_output_tokens`` when the client sent none, and never above it), times ``n``. Tool
definitions and a structured-output schema (``response_format`` / ``text.format`` of type
``json_schema``) are part of the prompt, counted as their compact JSON text.
Source: docs/design.md, "A request's life", step 2.

Each endpoint's ``Estimator`` sizes a body in steps, cheapest first, so that the gateway can
refuse what the balance cannot cover before it tokenizes a large prompt:
``output_tokens`` checks the body's shape and reads the output allowance (no tokenizing),
``prompt_tokens_lower_bound`` bounds the prompt from below in bounded work,
``prompt_tokens_upper_bound`` bounds it from above with no tokenizing (each text's UTF-8
length, see ``TokenCounter``), and ``prompt_tokens`` counts it with tiktoken (CPU-bound: safe
to run in a worker thread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from billing.metering.pricing import RateCard
from billing.metering.tokens import TokenCounter, UncountableInputError

Body = dict[str, Any]


class EstimateError(ValueError):
    """The body has a field of the wrong shape; ``param`` names it (the gateway answers 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Estimate:
    """Token upper bounds for one request.

    Attributes:
        prompt_tokens: tokens of the input as the upstream will count them (our count), or
            an upper bound of that count when ``prompt_counted`` is False.
        max_completion_tokens: the most output tokens the request can be billed for.
        prompt_counted: ``prompt_tokens`` is the count (tiktoken), not the upper bound.
    """

    prompt_tokens: int
    max_completion_tokens: int
    prompt_counted: bool = True


@dataclass(frozen=True, slots=True)
class Estimator:
    """How one endpoint's body is sized. Call ``output_tokens`` first: it checks the shape
    the other two rely on.

    Attributes:
        output_tokens: ``(body, card)`` -> the output allowance in tokens; raises
            ``EstimateError`` for a body of the wrong shape. No tokenizing.
        prompt_tokens_lower_bound: ``(body, card, tokens)`` -> at most ``prompt_tokens``,
            in bounded work whatever the body's size.
        prompt_tokens: ``(body, card, tokens)`` -> the prompt's tokens (tiktoken); raises
            ``EstimateError`` for a field that cannot be counted.
        prompt_tokens_upper_bound: ``(body, card, tokens)`` -> at least ``prompt_tokens``,
            with no tokenizing (linear in the body's text, a few µs for 64 kB); raises as
            ``prompt_tokens``.
    """

    output_tokens: Callable[[Body, RateCard], int]
    prompt_tokens_lower_bound: Callable[[Body, RateCard, TokenCounter], int]
    prompt_tokens: Callable[[Body, RateCard, TokenCounter], int]
    prompt_tokens_upper_bound: Callable[[Body, RateCard, TokenCounter], int]

    def estimate(self, body: Body, rate_card: RateCard, tokens: TokenCounter) -> Estimate:
        """All steps at once, in the caller's thread.

        Raises:
            EstimateError: a field of the wrong shape, or one that cannot be counted.
        """
        out = self.output_tokens(body, rate_card)
        return Estimate(self.prompt_tokens(body, rate_card, tokens), out)


def _positive_int(body: Body, *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"'{name}' must be a positive integer", name)
        return value
    return None


def _choices(body: Body) -> int:
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


def _input(body: Body) -> str | list[Any]:
    data = body.get("input")
    if data is None or not isinstance(data, str | list):
        raise EstimateError("'input' must be a string or an array", "input")
    return data


# -- /v1/chat/completions: messages (+ tools, response_format), max_completion_tokens|max_tokens,
# n


def _chat_output(body: Body, rate_card: RateCard) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EstimateError("'messages' must be a non-empty array", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise EstimateError("each message must be an object", "messages")
    out = _output_cap(_positive_int(body, "max_completion_tokens", "max_tokens"), rate_card)
    return out * _choices(body)


def _chat_prompt_lower_bound(body: Body, rate_card: RateCard, tokens: TokenCounter) -> int:
    return tokens.chat_prompt_lower_bound(body["messages"], rate_card.model)


def _chat_prompt(
    body: Body, rate_card: RateCard, tokens: TokenCounter, *, exact: bool = True
) -> int:
    model = rate_card.model
    tools, tools_param = body.get("tools"), "tools"
    if not tools:
        tools, tools_param = body.get("functions"), "functions"
    try:
        return tokens.count_chat_prompt(
            body["messages"], model, tools=tools, tools_param=tools_param, exact=exact
        ) + tokens.count_json(
            _json_schema(body.get("response_format")), model, param="response_format", exact=exact
        )
    except UncountableInputError as exc:
        raise EstimateError(str(exc), exc.param) from None


def _json_schema(response_format: object) -> object:
    """A structured-output format (``{"type": "json_schema", ...}``: chat's
    ``response_format``, Responses' ``text.format``), which the upstream adds to the prompt;
    None for any other value."""
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return response_format
    return None


CHAT = Estimator(
    _chat_output, _chat_prompt_lower_bound, _chat_prompt, partial(_chat_prompt, exact=False)
)


# -- /v1/completions: prompt (string, strings or token arrays), max_tokens, n, best_of ------


def _completions_output(body: Body, rate_card: RateCard) -> int:
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str | list):
        raise EstimateError("'prompt' must be a string or an array", "prompt")
    prompts = (
        len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    )
    out = _output_cap(_positive_int(body, "max_tokens"), rate_card)
    best_of = body.get("best_of")
    n = max(_choices(body), best_of if isinstance(best_of, int) and best_of > 0 else 1)
    return out * n * prompts


def _completions_prompt_lower_bound(body: Body, rate_card: RateCard, tokens: TokenCounter) -> int:
    return tokens.prompt_lower_bound(body.get("prompt", ""), rate_card.model)


def _completions_prompt(
    body: Body, rate_card: RateCard, tokens: TokenCounter, *, exact: bool = True
) -> int:
    return tokens.count_completions_prompt(body.get("prompt", ""), rate_card.model, exact=exact)


COMPLETIONS = Estimator(
    _completions_output,
    _completions_prompt_lower_bound,
    _completions_prompt,
    partial(_completions_prompt, exact=False),
)


# -- /v1/responses: input (+ instructions, tools, text.format), max_output_tokens ------------


def _responses_output(body: Body, rate_card: RateCard) -> int:
    _input(body)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise EstimateError("'instructions' must be a string", "instructions")
    return _output_cap(_positive_int(body, "max_output_tokens"), rate_card)


def _responses_prompt_lower_bound(body: Body, rate_card: RateCard, tokens: TokenCounter) -> int:
    return tokens.responses_input_lower_bound(
        body["input"], rate_card.model, instructions=body.get("instructions")
    )


def _responses_prompt(
    body: Body, rate_card: RateCard, tokens: TokenCounter, *, exact: bool = True
) -> int:
    text = body.get("text")
    text_format = text.get("format") if isinstance(text, dict) else None
    try:
        return tokens.count_responses_input(
            body["input"],
            rate_card.model,
            instructions=body.get("instructions"),
            tools=body.get("tools"),
            exact=exact,
        ) + tokens.count_json(_json_schema(text_format), rate_card.model, param="text", exact=exact)
    except UncountableInputError as exc:
        raise EstimateError(str(exc), exc.param) from None


RESPONSES = Estimator(
    _responses_output,
    _responses_prompt_lower_bound,
    _responses_prompt,
    partial(_responses_prompt, exact=False),
)


# -- /v1/embeddings: input only; no output tokens -------------------------------------------


def _embeddings_output(body: Body, rate_card: RateCard) -> int:
    _input(body)
    return 0


def _embeddings_prompt_lower_bound(body: Body, rate_card: RateCard, tokens: TokenCounter) -> int:
    return tokens.prompt_lower_bound(body["input"], rate_card.model)


def _embeddings_prompt(
    body: Body, rate_card: RateCard, tokens: TokenCounter, *, exact: bool = True
) -> int:
    return tokens.count_embeddings_input(body["input"], rate_card.model, exact=exact)


EMBEDDINGS = Estimator(
    _embeddings_output,
    _embeddings_prompt_lower_bound,
    _embeddings_prompt,
    partial(_embeddings_prompt, exact=False),
)
