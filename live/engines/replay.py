"""A replay engine: streams given answer texts at a given token rate through the same
``Engine`` interface as the real ones.

Uses: quality experiments with fixed proposals (the late-key probe of ``staircase
quality``), and feeding a real aggregator realistic proposals recorded from a stronger
model without running it. The answer to a call is looked up by the prompt's first user
message (the query, as a proposer sees it); a prompt that continues an open assistant
turn gets the rest of the answer after what the prompt's assistant turns already hold.

Timing: the first token ``first_token_s`` after the call, then one token every
``1 / tokens_per_s`` seconds, on an absolute schedule (no drift). Tokens are the
tokenizer's when one is given (anything with ``encode`` / ``decode``, or a model folder),
otherwise pieces of at most four characters (``ApproxTokenizer``'s rate).

In a ``staircase live`` config::

    {"kind": "replay", "answers": "answers.jsonl", "tokens_per_s": 30, "first_token_s": 0.05}

``answers.jsonl``: one ``{"query": ..., "answer": ...}`` object per line. With
``"default_answer": "..."`` every query the file lacks gets that text (the file may
then be left out): a stand-in engine that answers anything, for fast checks of what
sits around the engines (``staircase serve``'s schema tests).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping

from staircase.errors import ConfigError
from staircase.jsonio import read_jsonl
from staircase.prompts import Prompt
from staircase.spec import Field, ObjectSpec

from .base import Delta, Engine, EngineError, Sampling

_APPROX_PIECES = re.compile(r"\s*\S{1,4}|\s+$")
TOKENS_PER_S = Field("tokens_per_s", "float", 30.0, low=0.0, open_low=True)
FIRST_TOKEN_S = Field("first_token_s", "float", 0.05, low=0.0)
ANSWERS_FILE = "the path of a JSONL file of {\"query\": ..., \"answer\": ...} lines (or a default_answer)"
# A replay entry's fields, declared once: replay_from_spec's checks and the engines JSON Schema's entry
# (beyond them: answers or a default answer, and the answers file's lines).
REPLAY = ObjectSpec((Field("answers", "str", allowed=ANSWERS_FILE),
                     Field("default_answer", "str", nullable=True, nonblank=True, allowed="a non-empty string"),
                     TOKENS_PER_S, FIRST_TOKEN_S,
                     Field("tokenizer", "str", nullable=True, allowed="a tokenizer folder's path")), open=True)


class ReplayEngine(Engine):
    def __init__(self, answers: Mapping[str, str] | Callable[[str], str | None], name: str = "replay",
                 tokens_per_s: float = TOKENS_PER_S.default, first_token_s: float = FIRST_TOKEN_S.default,
                 tokenizer=None, model: str = "replay"):
        self.answers = answers
        self.name = name
        self.tokens_per_s = TOKENS_PER_S.check(tokens_per_s)
        self.first_token_s = FIRST_TOKEN_S.check(first_token_s)
        self.tokenizer = tokenizer
        self.model = model

    async def start(self) -> None:
        if isinstance(self.tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer))

    def answer_for(self, prompt: Prompt) -> str:
        query = next((m.text() for m in prompt.messages if m.role == "user"), "")
        text = self.answers(query) if callable(self.answers) else self.answers.get(query)
        if text is None:
            raise EngineError(f"replay: no answer for query {query[:40]!r}")
        if prompt.continue_final:  # the answer so far: every assistant turn (the prefix-cache layout splits it)
            partial = "".join(m.text() for m in prompt.messages if m.role == "assistant")
            text = text[len(partial):] if text.startswith(partial) else text
        return text

    def pieces(self, text: str) -> list[str]:
        """The answer cut into tokens (each piece one token)."""
        if self.tokenizer is None:
            return _APPROX_PIECES.findall(text)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        out, done = [], ""
        for i in range(1, len(ids) + 1):  # prefix decoding keeps multi-byte characters whole
            now = self.tokenizer.decode(ids[:i])
            out.append(now[len(done):])
            done = now
        return out

    async def stream(self, request_id: str, prompt: Prompt, max_tokens: int, sampling: Sampling) -> AsyncIterator[Delta]:
        pieces = self.pieces(self.answer_for(prompt))
        finish = "length" if len(pieces) > max_tokens else "stop"
        pieces = pieces[:max_tokens] or [""]
        loop = asyncio.get_running_loop()
        t0 = loop.time() + self.first_token_s
        for i, piece in enumerate(pieces):
            await asyncio.sleep(max(0.0, t0 + i / self.tokens_per_s - loop.time()))
            last = i == len(pieces) - 1
            delta = Delta(piece, 1 if piece else 0, finish if last else None)
            if i == 0:
                delta.prompt_tokens, delta.cached_tokens = self.count_tokens(prompt.render()), 0
            yield delta


def load_answers(path: str | Path, field: str = "answers") -> dict[str, str]:
    """query -> answer from a JSONL file of ``{"query": ..., "answer": ...}`` lines."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, str(path), "an existing JSONL file of {\"query\": ..., \"answer\": ...} lines")
    out: dict[str, str] = {}
    for i, row in enumerate(read_jsonl(path, field), 1):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not isinstance(row.get("answer"), str):
            raise ConfigError(f"{field} row {i}", str(row)[:60], "an object with string fields query and answer")
        out[row["query"]] = row["answer"]
    if not out:
        raise ConfigError(field, str(path), "at least one answer")
    return out


def replay_from_spec(name: str, spec: dict) -> ReplayEngine:
    """A replay engine from a ``staircase live`` config entry (its fields checked: ``REPLAY``)."""
    where = f"config.engines.{name}"
    entry = REPLAY.check(spec, where)
    path, default = entry["answers"], entry["default_answer"]
    if path is None and default is None:
        raise ConfigError(f"{where}.answers", None, ANSWERS_FILE)
    answers = load_answers(path, f"{where}.answers") if path is not None else {}
    if default is not None:
        answers = (lambda table: lambda query: table.get(query, default))(answers)
    return ReplayEngine(answers, name=name, tokens_per_s=entry["tokens_per_s"], first_token_s=entry["first_token_s"],
                        tokenizer=entry["tokenizer"])
