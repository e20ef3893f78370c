"""The engine interface: one model behind an async streaming interface, the deltas it
streams, the sampling settings of a call, and the error a failed call raises.

Errors while streaming raise ``EngineError`` with a short reason (``http 503``,
``malformed stream``, ``connection lost``) that ends up in traces; the live runner's
watchdog adds ``stalled Ns`` and ``no first token in Ns`` (``staircase.live.watchdog``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from staircase.errors import ConfigError
from staircase.prompts import Prompt, TokenizerCount


class EngineError(Exception):
    """A call failed; ``reason`` is short and goes into the trace."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Delta:
    text: str
    tokens: int
    finish_reason: str | None = None  # "stop" or "length" on the last delta
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    ignore_eos: bool = False  # generate max_tokens whatever the model says (calibration probes)


class Engine(ABC):
    """One model behind a streaming interface. Several topology slots may share one."""

    name: str
    SESSIONS = False  # keeps a request open for more input (``open_session``; the ``session`` layout)

    OWNS_PROCESS = False  # True: launch() starts a process of the engine's own, terminate() stops it

    def launch(self) -> None:
        """Start the engine's own process, if it has one (``open_engines`` calls it)."""

    def terminate(self) -> None:
        """Stop the engine's own process, if it has one (``open_engines`` calls it on the way out)."""

    async def start(self) -> None: ...

    @abstractmethod
    def stream(self, request_id: str, prompt: Prompt, max_tokens: int, sampling: Sampling) -> AsyncIterator[Delta]:
        """Stream the answer's deltas; raises EngineError."""

    async def abort(self, request_id: str) -> None: ...

    def open_session(self, request_id: str):
        """A consumer's steps as one request that takes more input (engines with ``SESSIONS``):
        a ``staircase.live.engines.session`` object with ``stream(prompt, max_tokens, sampling, last)`` and
        ``close()``."""
        raise ConfigError("layout", "session", f"an engine that keeps sessions open (in-process vLLM); "
                                               f"{self.name} ({type(self).__name__}) does not")

    async def healthy(self) -> bool:
        """Whether the engine says it is alive (asked before the final node's call is
        given up as stalled). Engines that cannot tell say yes."""
        return True

    @property
    def model_id(self) -> str:
        """What model answers (a folder's name, a served model name): profiles and
        traces record it so a profile is not used for another model unnoticed."""
        return Path(str(getattr(self, "model", "unknown"))).name

    def running_requests(self) -> int | None:
        """Requests the engine itself says it is running (unfinished), where it can say
        without a round trip (in-process vLLM); None otherwise."""
        return None

    def capacity(self) -> dict:
        """Engine limits a simulator profile needs (max_batch_size, kv_cache_tokens,
        block_size_tokens), where the engine can say; {} otherwise."""
        return {}

    async def reset_cache(self) -> None:
        """Empty the prefix cache (between policies, so one policy's prompts do not warm
        the cache for the next)."""

    async def close(self) -> None: ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` by the engine's tokenizer once started (about 4 characters
        per token without one, as ``staircase.prompts.ApproxTokenizer``)."""
        return TokenizerCount(getattr(self, "tokenizer", None)).count(text)

    count = count_tokens  # an engine is the scheduler's Tokenizer for its own prompts

    def render(self, prompt: Prompt) -> str:
        """The prompt as text through the model's chat template."""
        return render_chat(self.tokenizer, prompt)


def render_chat(tokenizer, prompt: Prompt) -> str:
    chat = prompt.as_chat()
    if prompt.continue_final and not chat[-1]["content"]:
        return tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    if prompt.continue_final:
        return tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


