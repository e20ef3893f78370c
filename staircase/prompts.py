"""Prompt layouts, built from pieces whose token counts are known.

A prompt is a list of chat messages; each message is a list of ``Piece``s (a key that
identifies the text, its token count, and the text where there is one; the simulator
runs without text). Chat-template markup is modelled as pieces too (``HEADER_TOKENS``
per message, ``END_TOKENS`` per closed message), so token counts and prefix-cache
reuse come from the same structure.

Layouts of a consumer (aggregator, later-layer proposer, debate agent):

- ``standard``: the MoA aggregate-and-synthesize prompt, rebuilt each step: the
  instruction and numbered input texts (each growing in place), the query, then the
  consumer's own partial answer as an open assistant turn. Reuse of the previous
  prompt stops inside the first input slot that grew.
- ``prefix-cache``: append-only. Instruction and query first; then, per round, one
  user turn with each input's new text and one assistant turn with the consumer's
  own chunk. A round with no new input text continues the open assistant turn.
  Prompt k + output k is a prefix of prompt k+1, so the engine's prefix cache hits
  on everything but the new tokens. The cost: a label per input per round and a
  turn's markup per round.
- ``session``: the prefix-cache layout's prompts (``Prompt.session`` set), for runners
  that carry a consumer's steps as one session on the engine (vLLM's streaming input):
  prompt k + output k is a prefix of prompt k+1, so step k+1 sends only what it adds
  and nothing already read is prefilled again, whatever the cache holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Sequence

HEADER_TOKENS = 3  # e.g. "<|im_start|>assistant\n"
END_TOKENS = 2  # e.g. "<|im_end|>\n"

SOURCE_SYSTEM = "You are a helpful assistant."
MOA_SYSTEM = (
    "You have been given responses from several models to the user's latest query. "
    "Synthesize them into one accurate, well-structured, high-quality answer. Do not simply "
    "repeat them: weigh them critically, as some may be wrong or biased."
)
MOA_STREAM_SYSTEM = MOA_SYSTEM + (
    " The responses arrive in parts, round by round; after each round continue your answer "
    "exactly where you left off, without repeating yourself."
)
MAD_SYSTEM = (
    "You are one of several agents debating the user's question. Read the other agents' "
    "latest answers, reason about them, and give your updated answer."
)
MAD_STREAM_SYSTEM = MAD_SYSTEM + (
    " Their answers arrive in parts, round by round; after each round continue your answer "
    "exactly where you left off."
)
LEAD_IN_ROUND = (
    " No responses have arrived yet. Begin with one short sentence that restates the question; "
    "do not answer it yet: the answer comes once the responses arrive."
)  # a consumer's step written before any input text (the lead-in policy's first step)
JUDGE_SYSTEM = (
    "You are the judge of a debate between agents. Read their final answers and give the "
    "single best answer to the user's question."
)


class Tokenizer(Protocol):
    def count(self, text: str) -> int: ...


class ApproxTokenizer:
    """Fast approximate counter: about four characters per token (English text, BPE)."""

    chars_per_token = 4.0

    def count(self, text: str) -> int:
        return math.ceil(len(text) / self.chars_per_token) if text else 0


_APPROX = ApproxTokenizer()


class TokenizerCount:
    """The one adapter from a model's tokenizer (anything with ``encode``, e.g. a
    Hugging Face tokenizer) to the scheduler's ``Tokenizer``; without one, counts as
    ``ApproxTokenizer`` does."""

    __slots__ = ("encoder",)

    def __init__(self, encoder=None):
        self.encoder = encoder

    def count(self, text: str) -> int:
        if self.encoder is None:
            return _APPROX.count(text)
        return len(self.encoder.encode(text, add_special_tokens=False)) if text else 0


class Piece(NamedTuple):
    """A run of text with a known token count; ``key`` identifies it across prompts."""

    key: tuple
    tokens: int
    text: str | None = None


@dataclass
class Message:
    role: str
    pieces: list[Piece] = field(default_factory=list)
    closed: bool = True

    @property
    def tokens(self) -> int:
        return HEADER_TOKENS + sum([p.tokens for p in self.pieces]) + (END_TOKENS if self.closed else 0)

    def text(self) -> str:
        return "".join(p.text or "" for p in self.pieces)


@dataclass
class Prompt:
    """What one ``Generate`` sends. ``tokens`` is the layout's estimate; a live runner
    renders ``messages`` with the model's chat template and counts for itself.
    ``reuse_prefix_tokens``: leading tokens identical to this node's previous prompt
    plus its output (what a prefix cache can serve); ``shared_prefix_tokens``: leading
    tokens identical across requests (the system instruction). ``session``: the
    node's steps form one engine session (``session`` layout): a runner that keeps one
    sends only the tokens past ``reuse_prefix_tokens``."""

    messages: list[Message]
    tokens: int
    shared_prefix_tokens: int
    reuse_prefix_tokens: int = 0
    session: bool = False

    @property
    def continue_final(self) -> bool:
        return bool(self.messages) and self.messages[-1].role == "assistant" and not self.messages[-1].closed

    def keyed(self) -> list[tuple[tuple, int]]:
        """(key, tokens) of every piece, markup included, in order."""
        return _keyed(self.messages)

    def as_chat(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def render(self) -> str:
        """ChatML rendering (for display and the approximate path)."""
        parts = []
        for m in self.messages:
            parts.append(f"<|im_start|>{m.role}\n{m.text()}")
            if m.closed:
                parts.append("<|im_end|>\n")
        return "".join(parts)


def _keyed(messages: Sequence[Message]) -> list[tuple[tuple, int]]:
    out: list[tuple[tuple, int]] = []
    for i, m in enumerate(messages):
        out.append((("hdr", i, m.role), HEADER_TOKENS))
        out.extend((p.key, p.tokens) for p in m.pieces)
        if m.closed:
            out.append((("end", i), END_TOKENS))
    return out


def common_prefix_tokens(a: Sequence[tuple[tuple, int]], b: Sequence[tuple[tuple, int]]) -> int:
    total = 0
    for (ka, ta), (kb, _) in zip(a, b):
        if ka != kb:
            break
        total += ta
    return total


class TextPieces:
    """Pieces for fixed strings (instructions, labels), counted once per text."""

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or ApproxTokenizer()
        self._cache: dict[str, Piece] = {}

    def __call__(self, text: str) -> Piece:
        piece = self._cache.get(text)
        if piece is None:
            piece = Piece(("txt", text), self.tokenizer.count(text), text)
            self._cache[text] = piece
        return piece


def query_piece(text: str | None, tokens: int | None, tokenizer: Tokenizer) -> Piece:
    if tokens is None:
        tokens = tokenizer.count(text or "")
    return Piece(("query",), int(tokens), text)


def source_prompt(query: Piece, texts: TextPieces) -> Prompt:
    """A node that reads only the query (stage-0 proposer, round-0 agent, single)."""
    msgs = [Message("system", [texts(SOURCE_SYSTEM)]), Message("user", [query]), Message("assistant", closed=False)]
    shared = msgs[0].tokens
    return Prompt(msgs, sum(m.tokens for m in msgs), shared)


class ConsumerPrompts:
    """The successive prompts of one consumer node, in one layout.

    Call ``next(inputs)`` with every input's pieces so far to get the prompt of the
    next call; call ``add_output(piece)`` for each chunk the node generates."""

    def __init__(self, layout: str, role: str, query: Piece, input_ids: Sequence[str],
                 self_index: int, texts: TextPieces):
        self.layout = layout
        self.role = role
        self.query = query
        self.input_ids = tuple(input_ids)
        self.self_index = self_index
        self.texts = texts
        self.own: list[Piece] = []
        self._previous: list[tuple[tuple, int]] = []  # standard: keyed previous prompt
        self._previous_tokens = 0  # prefix-cache: tokens of the previous prompt
        self._own_at_previous = 0
        # prefix-cache layout: the persistent message list and what each input has shown
        self._messages: list[Message] = []
        self._shown = [0] * len(self.input_ids)

    def _label(self, i: int) -> str:
        if self.role == "agent":
            who = f"Agent {i + 1}" + (" (you, previous round)" if i == self.self_index else "")
            return f"\n[{who}]: "
        if self.role == "judge":
            return f"\n[Agent {i + 1}]: "
        return f"\n[Model {i + 1}]: "

    def _system(self) -> str:
        streaming = self.layout != "standard"
        if self.role == "agent":
            return MAD_STREAM_SYSTEM if streaming else MAD_SYSTEM
        if self.role == "judge":
            return JUDGE_SYSTEM
        return MOA_STREAM_SYSTEM if streaming else MOA_SYSTEM

    def add_output(self, piece: Piece) -> None:
        self.own.append(piece)
        if self.layout != "standard":
            self._messages[-1].pieces.append(piece)

    def next(self, inputs: Sequence[Sequence[Piece]]) -> Prompt:
        own_since = self.own[self._own_at_previous:]
        self._own_at_previous = len(self.own)
        if self.layout != "standard":
            before = self._previous_tokens
            messages, added = self._append_round(inputs)
            # Append-only by construction (the stateful tests check it against the keys):
            # the previous prompt and the output since are reused whole.
            own_tokens = sum(p.tokens for p in own_since)
            tokens = before + own_tokens + added
            reuse = before + own_tokens if before else 0
            self._previous_tokens = tokens
            # Only the open last message changes later; the earlier ones are final.
            last = messages[-1]
            snapshot = messages[:-1] + [Message(last.role, list(last.pieces), last.closed)]
            return Prompt(snapshot, tokens, HEADER_TOKENS + messages[0].pieces[0].tokens, reuse,
                          self.layout == "session")
        messages = self._standard(inputs)
        keyed = _keyed(messages)
        previous = self._previous + [(p.key, p.tokens) for p in own_since]
        reuse = common_prefix_tokens(keyed, previous) if self._previous else 0
        self._previous = keyed
        return Prompt(messages, sum(t for _, t in keyed), HEADER_TOKENS + messages[0].pieces[0].tokens, reuse)

    def _standard(self, inputs: Sequence[Sequence[Piece]]) -> list[Message]:
        t = self.texts
        if self.role == "proposer" or self.role == "aggregator":
            system = [t(self._system()), t("\nResponses from models:")]
            if not any(inputs):
                system.append(t(LEAD_IN_ROUND))
            for i, pieces in enumerate(inputs):
                system.append(t(self._label(i)))
                system.extend(pieces)
            return [Message("system", system), Message("user", [self.query]),
                    Message("assistant", list(self.own), closed=False)]
        user = [self.query, t("\n\nLatest answers:")] + ([] if any(inputs) else [t(LEAD_IN_ROUND)])
        for i, pieces in enumerate(inputs):
            user.append(t(self._label(i)))
            user.extend(pieces)
        user.append(t("\n\nGive your updated answer."))
        return [Message("system", [t(self._system())]), Message("user", user),
                Message("assistant", list(self.own), closed=False)]

    def _append_round(self, inputs: Sequence[Sequence[Piece]]) -> tuple[list[Message], int]:
        """Append this step's round; returns the messages and the tokens added."""
        t = self.texts
        added = 0
        if not self._messages:
            self._messages = [Message("system", [t(self._system())]), Message("user", [self.query])]
            added = sum(m.tokens for m in self._messages)
        new: list[Piece] = []
        for i, pieces in enumerate(inputs):
            if len(pieces) > self._shown[i]:
                new.append(t(self._label(i)))
                new.extend(pieces[self._shown[i]:])
                self._shown[i] = len(pieces)
        if new or self._messages[-1].role != "assistant":
            if self._messages[-1].role == "assistant":
                self._messages[-1].closed = True
                added += END_TOKENS
            round_no = sum(1 for m in self._messages if m.role == "assistant") + 1
            lead_in = [] if new or any(self._shown) else [t(LEAD_IN_ROUND)]
            user = Message("user", [t(f"Round {round_no}:")] + new + lead_in)
            self._messages += [user, Message("assistant", closed=False)]
            added += user.tokens + HEADER_TOKENS
        return self._messages, added
