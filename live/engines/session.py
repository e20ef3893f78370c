"""A consumer's steps as one engine request that keeps taking input: the ``session`` layout.

vLLM (0.32 and later) takes an async generator of ``StreamingInput`` as a request's
prompt: the request stays open after each input's answer, keeps its KV cache, and the
next input is appended to everything it has read and written so far. The ``session``
layout's prompts are append-only (prompt k + output k is a prefix of prompt k+1,
``staircase.prompts``), so step k+1 sends only the tokens its prompt adds: no step
re-reads, and no prefix-cache block rounding or eviction decides what is prefilled again.

One detail of vLLM's sessions: the last token sampled in a step is streamed out but not
kept in the session (it was never fed back through the model), so each later step
sends it again, first.

What vLLM 0.32 does not allow in a session: n > 1, ``FINAL_ONLY`` outputs, stop strings,
pooling models, prompt embeddings. The HTTP server has no such endpoint (its realtime
API streams audio only), so sessions need the in-process engine (``VLLMEngine``).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from staircase.prompts import Prompt

from .base import Delta, Engine, EngineError, Sampling


class VLLMSession:
    """One consumer node's session on a ``VLLMEngine``; its steps run one at a time."""

    def __init__(self, engine: Engine, request_id: str):  # a VLLMEngine (staircase.live.engines.inprocess)
        self.engine = engine
        self.request_id = request_id
        self.inputs: asyncio.Queue = asyncio.Queue()  # StreamingInput, then None: no more input
        self.outputs: asyncio.Queue = asyncio.Queue()  # RequestOutput, EngineError, or None at the end
        self.task: asyncio.Task | None = None
        self.text = ""  # the session's context as text: rendered prompts and the outputs since
        self.ids: list[int] = []  # its tokens, as sent and sampled (the last sampled one included)

    async def _input_stream(self):
        while (item := await self.inputs.get()) is not None:
            yield item

    async def _pump(self, params) -> None:
        try:
            async for out in self.engine.llm.generate(self._input_stream(), params, request_id=self.request_id):
                self.outputs.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # vLLM raises many kinds
            self.outputs.put_nowait(EngineError(f"session error: {type(err).__name__}: {str(err)[:120]}"))
        self.outputs.put_nowait(None)

    def _send(self, prompt: Prompt, params, last: bool) -> tuple[int, int | None]:
        """Queue the step's input; (the context's tokens, the tokens already in the session)."""
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt

        text = self.engine.render(prompt)
        if self.task is not None and not (self.ids and text.startswith(self.text)):
            raise EngineError("session: the prompt does not extend the session (the chat template is not "
                              "append-only, or the layout is not)")
        new = self.engine.tokenizer.encode(text[len(self.text):], add_special_tokens=False)
        if self.task is None:
            sent, kept = new, None  # the first step: vLLM's prefix cache says what it had, on the first output
        else:
            sent, kept = [self.ids[-1], *new], len(self.ids) - 1
        # a copy: vLLM extends the token list it is given in place
        self.inputs.put_nowait(StreamingInput(TokensPrompt(prompt_token_ids=list(sent)), params))
        if last:
            self.inputs.put_nowait(None)
        if self.task is None:
            self.task = asyncio.create_task(self._pump(params))
        self.text = text
        self.ids += new
        return len(self.ids), kept

    async def stream(self, prompt: Prompt, max_tokens: int, sampling: Sampling, last: bool) -> AsyncIterator[Delta]:
        """One step: send what ``prompt`` adds to the session, stream the step's answer.
        ``last``: no step follows (the session ends with this one)."""
        prompt_tokens, kept = self._send(prompt, self.engine.params(max_tokens, sampling), last)
        first = True
        while True:
            out = await self.outputs.get()
            if out is None:
                raise EngineError("session ended before the step's answer")
            if isinstance(out, EngineError):
                raise out
            c = out.outputs[0]
            delta = Delta(c.text, len(c.token_ids), c.finish_reason)
            if first:
                delta.prompt_tokens = prompt_tokens
                delta.cached_tokens = kept if kept is not None else out.num_cached_tokens or 0
                first = False
            self.text += c.text
            self.ids += c.token_ids
            if c.finish_reason is not None and c.finish_reason not in ("stop", "length"):
                raise EngineError(f"finished: {c.finish_reason}")
            yield delta
            if c.finish_reason is not None:
                return

    async def close(self) -> None:
        """End the session now (its request is aborted on the engine if still open)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.engine.abort(self.request_id)
