"""The prompt's upper bound (``exact=False``, each text's UTF-8 length): never below the
count, for adversarial texts and every input shape the estimators size.

The bound rests on two facts of both vocabularies, checked here rather than assumed: every
token is at least one byte, and all 256 single bytes are tokens (byte-level BPE: a text's
tokens are a split of its UTF-8 bytes).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.metering.estimate import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Estimator
from billing.metering.pricing import RateCard
from billing.metering.tokens import CL100K_BASE, O200K_BASE, TokenCounter, utf8_bytes

MODEL_BY_ENCODING = {O200K_BASE: "gpt-4o-mini", CL100K_BASE: "gpt-4"}
MODELS = list(MODEL_BY_ENCODING.values())

ADVERSARIAL_TEXTS = [
    "",
    " ",
    "a",
    "日本語のテキストと中文文本，以及한국어 텍스트。" * 40,
    "𠀀𠀁𠀂𪚥𰻞" * 50,  # CJK extension planes: 4 bytes a character
    "🎉🚀👩‍👩‍👧‍👦🏳️‍🌈" * 60,
    "0123456789" * 300,
    "3.14159265358979323846" * 50,
    " " * 5000,
    "\n" * 3000 + "\t" * 3000,
    " \r\n \r\n\t\t  \u00a0\u2003\u3000" * 200,
    "<|endoftext|><|endofprompt|><|fim_prefix|>" * 30,
    "\x00\x01\x02\x7f\x80\xff" * 100,
    "\ud800\udc00x\udfff",  # surrogates a JSON body cannot carry, but a str can
    "aaaa" * 4000,
    "Größenordnung über Ärger; naïve café résumé " * 80,
    "ÅÅ\u0301\u0301\u0301" * 400,  # combining marks
]


def _random_text(seed: int, length: int) -> str:
    """Code points from every plane: a text tiktoken never saw. No surrogates: a parsed
    JSON body never holds one (orjson refuses a lone one and joins a pair)."""
    rng = random.Random(seed)
    points = (rng.randrange(0x110000) for _ in range(length))
    return "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)


def _random_bytes_text(seed: int, length: int) -> str:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(length)).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.load()


def _card(model: str) -> RateCard:
    return RateCard(
        id=1,
        model=model,
        input_millicredits_per_1k_tokens=1,
        cached_input_millicredits_per_1k_tokens=None,
        output_millicredits_per_1k_tokens=1,
        max_output_tokens=100,
        effective_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


@pytest.mark.parametrize("name", [O200K_BASE, CL100K_BASE])
def test_vocabulary_is_byte_level(counter, name):
    """Every token is >= 1 byte and every single byte is a token: a text of b UTF-8 bytes
    splits into at most b tokens."""
    values = counter.encoding_for_model(MODEL_BY_ENCODING[name]).token_byte_values()
    assert min(map(len, values)) >= 1
    assert {value for value in values if len(value) == 1} == {bytes([b]) for b in range(256)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "text",
    [
        *ADVERSARIAL_TEXTS,
        _random_text(1, 3000),
        _random_text(2, 20_000),  # long enough for the encode_to_numpy path
        _random_bytes_text(3, 5000),
    ],
)
def test_text_bound_at_least_the_count(counter, model, text):
    assert utf8_bytes(text) >= counter.count_text(text, model)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400), model=st.sampled_from(MODELS))
def test_text_bound_at_least_the_count_property(counter, text, model):
    assert utf8_bytes(text) >= counter.count_text(text, model)


def test_utf8_bytes_is_the_encoded_length():
    for text in ADVERSARIAL_TEXTS:
        assert utf8_bytes(text) == len(text.encode("utf-8", "surrogatepass"))


_CJK, _EMOJI, _DIGITS = ADVERSARIAL_TEXTS[3], ADVERSARIAL_TEXTS[5], ADVERSARIAL_TEXTS[6]
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_天气",
            "description": _EMOJI,
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}},
        },
    }
]
_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [_DIGITS]}}}

CHAT_BODIES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": text}]} for text in ADVERSARIAL_TEXTS
] + [
    {
        "messages": [
            {"role": "system", "content": _CJK, "name": "sys_名前"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": _EMOJI},
                    {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "refusal", "refusal": _DIGITS},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": _CJK}}
                ],
                "function_call": {"name": "g", "arguments": "{}"},
                "refusal": " " * 300,
            },
            {"role": "tool", "tool_call_id": "c1", "content": "\n" * 500},
        ],
        "tools": _TOOLS,
        "response_format": _SCHEMA,
    },
    {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
]
RESPONSES_BODIES: list[dict[str, Any]] = [
    {"input": text, "instructions": ADVERSARIAL_TEXTS[-1]} for text in ADVERSARIAL_TEXTS
] + [
    {
        "input": [
            _EMOJI,
            {"role": "user", "content": _CJK},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": _DIGITS}],
            },
            {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]},
            {"type": "function_call", "name": "f", "arguments": _CJK, "call_id": "c"},
            {"type": "function_call_output", "call_id": "c", "output": _EMOJI},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": _DIGITS}]},
        ],
        "tools": _TOOLS,
        "text": {"format": _SCHEMA},
    }
]
PROMPT_SHAPES: list[Any] = [
    *ADVERSARIAL_TEXTS,
    list(ADVERSARIAL_TEXTS),
    [1, 2, 3, 100_000],
    [[1, 2, 3], [4, 5]],
]


def _cases() -> list[tuple[str, Estimator, dict[str, Any]]]:
    cases = [("chat", CHAT, body) for body in CHAT_BODIES]
    cases += [("responses", RESPONSES, body) for body in RESPONSES_BODIES]
    cases += [("completions", COMPLETIONS, {"prompt": prompt}) for prompt in PROMPT_SHAPES]
    cases += [("embeddings", EMBEDDINGS, {"input": prompt}) for prompt in PROMPT_SHAPES]
    return cases


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("endpoint", "estimator", "body"), _cases(), ids=[f"{c[0]}-{i}" for i, c in enumerate(_cases())]
)
def test_prompt_upper_bound_at_least_the_count(counter, model, endpoint, estimator, body):
    body = {**body, "model": model}
    card = _card(model)
    estimator.output_tokens(body, card)  # the shape check the other steps rely on
    count = estimator.prompt_tokens(body, card, counter)
    bound = estimator.prompt_tokens_upper_bound(body, card, counter)
    assert bound >= count
    assert estimator.prompt_tokens_lower_bound(body, card, counter) <= count


@settings(max_examples=100, deadline=None)
@given(
    contents=st.lists(st.text(max_size=200), min_size=1, max_size=5),
    names=st.lists(st.text(min_size=1, max_size=20), max_size=5),
    model=st.sampled_from(MODELS),
)
def test_chat_upper_bound_property(counter, contents, names, model):
    messages: list[dict[str, Any]] = [{"role": "user", "content": c} for c in contents]
    for message, name in zip(messages, names, strict=False):
        message["name"] = name
    body = {"model": model, "messages": messages}
    card = _card(model)
    assert CHAT.prompt_tokens_upper_bound(body, card, counter) >= CHAT.prompt_tokens(
        body, card, counter
    )
