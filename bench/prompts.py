"""Realistic prompts for the benchmarks: English-like prose of a given token count.

Real traffic sends thousands of tokens per request, and the gateway sizes every prompt for
its hold; a benchmark of tiny prompts measures none of that. The text here is deterministic
(a seeded generator over a fixed vocabulary of common English words, in sentences and
paragraphs with capitals, commas and full stops), so runs compare like with like. It is
trimmed to the wanted count with tiktoken's ``o200k_base`` (the gateway's encoding for
gpt-4o-mini), the count the gateway itself would take.

    .venv/bin/python bench/prompts.py 2000     # print a 2,000-token prompt's statistics
"""

from __future__ import annotations

import json
import random
import sys
from functools import cache
from typing import Any

import tiktoken

from billing.metering.tokens import O200K_BASE, load_encoding

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we can their has been if more when "
    "will would who so no time people year way day man thing woman life child world school "
    "state family student group country problem hand part place case week company system "
    "program question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office "
    "door health person art war history party result change morning reason research girl "
    "guy moment air teacher force education foot boy age policy process music market sense "
    "nation plan college interest death experience effect class control care field "
    "development role effort rate heart drug show leader light voice wife police mind price "
    "report decision son view relationship town road arm difference value building action "
    "model season society tax director position player record paper space ground form event "
    "official matter center couple site project activity star table need court oil situation "
    "cost industry figure street image phone data picture practice piece land product doctor "
    "wall patient worker news test movie north love support technology step baby computer "
    "type attention film tree source organization hair window evidence population site "
    "describe develop consider appear provide continue include believe remember understand "
    "quickly carefully usually really almost already perhaps especially certainly probably "
    "important different general possible available national economic financial political "
    "international environmental significant particular individual traditional"
).split()
_PROMPT_SEED = 15
# The question after the text, so the prompt reads as a real request.
_QUESTION = "\n\nSummarize the text above in three sentences."


@cache
def _encoding() -> tiktoken.Encoding:
    return load_encoding(O200K_BASE)


def english_text(tokens: int, seed: int = _PROMPT_SEED) -> str:
    """Prose of exactly ``tokens`` tokens in ``o200k_base`` (0: the empty string)."""
    if tokens <= 0:
        return ""
    rng = random.Random(seed)
    sentences: list[str] = []
    words = 0
    while words < tokens * 1.2 + 20:  # common words are about one token each
        count = rng.randint(6, 22)
        chosen = rng.choices(_WORDS, k=count)
        if count > 10:
            chosen[rng.randint(3, count - 4)] += ","
        sentence = " ".join(chosen)
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        words += count
        if rng.random() < 0.15:
            sentences.append("\n\n")
    text = " ".join(sentences).replace(" \n\n ", "\n\n")
    encoding = _encoding()
    return encoding.decode(encoding.encode_ordinary(text)[:tokens])


def chat_bodies(model: str, prompt_tokens: int) -> dict[str, bytes]:
    """A non-streamed and a streamed chat completion whose user message is a
    ``prompt_tokens``-token text and a question (no ``max_tokens``, no ``stream_options``),
    as ``bench/run.py``'s small bodies are."""
    chat: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": english_text(prompt_tokens) + _QUESTION},
        ],
    }
    return {
        "chat": json.dumps(chat).encode(),
        "stream": json.dumps({**chat, "stream": True}).encode(),
    }


def main(argv: list[str]) -> int:
    """Print the statistics of each size's prompt."""
    encoding = _encoding()
    for size in (int(arg) for arg in argv or ["2000", "16000"]):
        text = english_text(size)
        body = chat_bodies("gpt-4o-mini", size)["chat"]
        print(
            f"{size} tokens: {len(encoding.encode_ordinary(text))} counted, {len(text)} chars "
            f"({len(text) / max(size, 1):.2f} per token), body {len(body)} bytes"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
