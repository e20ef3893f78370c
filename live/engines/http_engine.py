"""``HTTPEngine`` (kind ``http``): an OpenAI-compatible server (``/v1/completions``, or
``/v1/chat/completions`` when no local tokenizer renders the chat template), SSE
streaming with usage; a vLLM server also gives token ids per delta and cached tokens
(``usage.prompt_tokens_details``). The API key is read from an environment variable
named in the config and never written anywhere."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import AsyncIterator

from staircase.errors import ConfigError
from staircase.prompts import Prompt

from .base import Delta, Engine, EngineError, Sampling


def check_url(field: str, value: object) -> str:
    """A base URL (``http://`` or ``https://``), or a ConfigError naming ``field``."""
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(field, value, "an http:// or https:// base URL")
    return value


class HTTPEngine(Engine):
    """An OpenAI-compatible streaming endpoint."""

    def __init__(self, base_url: str, model: str, name: str = "http", api_key_env: str | None = None,
                 tokenizer_path: str | Path | None = None, connect_timeout_s: float = 5.0,
                 stall_timeout_s: float | None = None, retries: int = 3, backoff_s: float = 0.25):
        """``stall_timeout_s``: a socket read timeout of the stream (None: none; the live
        runner's watchdog tells slow from dead, ``staircase.live.watchdog``). A 429 or 503
        (a server that sheds load, before any token) is tried again up to ``retries``
        times, after the server's ``Retry-After`` when it sends one (capped at
        ``RETRY_AFTER_MAX_S``), else ``backoff_s`` doubling; the watchdog's first-token
        limit bounds the whole wait."""
        check_url("url", base_url)
        # the server's root; a base URL ending in /v1 (what OpenAI clients take) means the same server
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.name = name
        self.api_key_env = api_key_env
        if api_key_env and not os.environ.get(api_key_env):
            raise ConfigError("api_key_env", api_key_env, "the name of a set environment variable holding the key")
        self.tokenizer_path = tokenizer_path
        self.tokenizer = None
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.session = None

    async def start(self) -> None:
        import aiohttp

        if self.tokenizer_path is not None and self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
        if self.session is None:
            # no bound on connections (aiohttp's default, 100 per session, would queue a busy engine's calls
            # inside this process); the engine's own scheduler is what queues them
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(
                total=None, connect=self.connect_timeout_s, sock_read=self.stall_timeout_s))
        try:
            async with self.session.get(f"{self.base_url}/v1/models", headers=self._headers()) as resp:
                if resp.status >= 500:
                    raise EngineError(f"http {resp.status} from /v1/models")
        except EngineError:
            raise
        except Exception as err:
            await self.close()
            raise ConfigError("url", self.base_url, f"a reachable OpenAI-compatible server ({type(err).__name__})") from None

    def _headers(self) -> dict:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def model_id(self) -> str:
        return Path(str(self.tokenizer_path)).name if self.tokenizer_path else str(self.model)

    async def stream(self, request_id: str, prompt: Prompt, max_tokens: int, sampling: Sampling) -> AsyncIterator[Delta]:
        import aiohttp

        url, body = self._request(prompt, max_tokens, sampling)
        reader = _StreamReader()
        headers = self._headers() | {"X-Request-Id": request_id}
        try:
            for attempt in range(self.retries + 1):
                async with self.session.post(url, json=body, headers=headers) as resp:
                    if resp.status in RETRY_STATUS and attempt < self.retries:
                        await asyncio.sleep(retry_delay(resp.headers.get("Retry-After"), attempt, self.backoff_s))
                        continue  # (no token came yet: nothing to undo; the watchdog's first-token limit still runs)
                    if resp.status != 200:
                        raise EngineError(f"http {resp.status}")
                    async for event in _sse_events(resp):
                        delta = reader.delta(event)
                        if delta is not None:
                            yield delta
                    break
        except (EngineError, asyncio.CancelledError):
            raise
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise EngineError(f"stalled {self.stall_timeout_s:g}s") from None
        except aiohttp.ClientPayloadError:
            raise EngineError("truncated stream") from None
        except aiohttp.ClientError as err:
            raise EngineError(f"connection lost ({type(err).__name__})") from None
        if reader.finish not in ("stop", "length"):
            raise EngineError("truncated stream" if reader.finish is None else f"finished: {reader.finish}")
        yield Delta("", 0, reader.finish, cached_tokens=reader.late_cached)

    def _request(self, prompt: Prompt, max_tokens: int, sampling: Sampling) -> tuple[str, dict]:
        """(url, JSON body) of a streaming completion: the completions API with our own
        rendering when the tokenizer is known, else the chat API."""
        body: dict = {"model": self.model, "max_tokens": max_tokens, "temperature": sampling.temperature,
                      "top_p": sampling.top_p, "stream": True,
                      "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                      "return_token_ids": True}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension of the OpenAI API
        if self.tokenizer is not None:
            return f"{self.base_url}/v1/completions", body | {"prompt": self.render(prompt)}
        chat = prompt.as_chat()
        if prompt.continue_final and not chat[-1]["content"]:
            chat = chat[:-1]
        elif prompt.continue_final:
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        return f"{self.base_url}/v1/chat/completions", body | {"messages": chat}

    async def healthy(self) -> bool:
        """``/health`` answers 200 (vLLM), or ``/v1/models`` does (other servers), within
        the connect timeout."""
        import aiohttp

        if self.session is None:
            return False
        timeout = aiohttp.ClientTimeout(total=max(self.connect_timeout_s, 1.0))
        for path in ("/health", "/v1/models"):
            try:
                async with self.session.get(f"{self.base_url}{path}", headers=self._headers(), timeout=timeout) as resp:
                    if resp.status == 200:
                        return True
                    if resp.status != 404:
                        return False
            except Exception:
                return False
        return False

    async def reset_cache(self) -> None:
        """vLLM servers in dev mode (``VLLMServer`` sets it) expose /reset_prefix_cache;
        other servers keep their cache."""
        try:
            async with self.session.post(f"{self.base_url}/reset_prefix_cache", headers=self._headers()) as resp:
                await resp.read()
        except Exception:
            pass

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


RETRY_STATUS = (429, 503)
RETRY_AFTER_MAX_S = 10.0


def retry_delay(retry_after: str | None, attempt: int, backoff_s: float) -> float:
    """Seconds before the next try: the server's ``Retry-After`` (seconds; an HTTP date
    counts as none) up to ``RETRY_AFTER_MAX_S``, else ``backoff_s * 2**attempt``."""
    try:
        given = float(retry_after) if retry_after is not None else None
    except ValueError:
        given = None
    if given is not None and given >= 0:
        return min(given, RETRY_AFTER_MAX_S)
    return backoff_s * 2 ** attempt


async def _sse_events(resp) -> AsyncIterator[dict]:
    """The JSON events of a server-sent-events response, up to ``[DONE]``, by the whole
    grammar: an event is its ``data:`` lines (joined by newlines) up to a blank line;
    ``event:`` names it (``error``: the server's error), ``id:``, ``retry:``, unknown
    fields and comment lines (``:``) are read and ignored. Data that is not JSON, or an
    error event (``event: error`` or an ``error`` object), raises EngineError; data cut off
    before its blank line is a truncated stream."""
    data: list[str] = []
    kind = ""
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            if line[0] != ":":
                field, _, value = line.partition(":")
                value = value[1:] if value[:1] == " " else value
                if field == "data":
                    data.append(value)
                elif field == "event":
                    kind = value
            continue
        if not data:  # a blank line ends an event; without data there is none
            kind = ""
            continue
        text, data = data[0] if len(data) == 1 else "\n".join(data), []
        if text == "[DONE]":
            return
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            raise EngineError("malformed stream") from None
        if kind == "error" or not isinstance(event, dict) or "error" in event:
            raise EngineError(f"server error: {str(event.get('error', event) if isinstance(event, dict) else event)[:100]}")
        kind = ""
        yield event
    if data and data != ["[DONE]"]:
        raise EngineError("truncated stream")


class _StreamReader:
    """Turns a completion stream's events into deltas: tokens from ``token_ids`` (else
    usage counts, else one per non-empty text), the prompt's and cached tokens from the
    usage seen up to the first delta with tokens (a chat stream's first event, the role,
    carries usage but no token), the finish reason from the last choice that has one."""

    __slots__ = ("tokens_seen", "usage", "finish", "late_cached")

    def __init__(self):
        self.tokens_seen = 0
        self.usage: dict | None = {}  # None once the first delta carried it
        self.finish: str | None = None
        self.late_cached: int | None = None  # cached tokens the stream's last usage gives (vLLM's server)

    def delta(self, event: dict) -> Delta | None:
        usage = event.get("usage") or {}
        if usage and self.usage is not None:
            self.usage = usage
        elif usage.get("prompt_tokens_details"):  # vLLM's server reports cached tokens in the final usage alone
            self.late_cached = usage["prompt_tokens_details"].get("cached_tokens")
        choices = event.get("choices") or []
        if not choices:
            return None
        ch = choices[0]
        self.finish = ch.get("finish_reason") or self.finish
        text = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content") or ""
        ids = ch.get("token_ids")
        if ids is not None:
            n = len(ids)
        elif usage.get("completion_tokens") is not None:
            n = usage["completion_tokens"] - self.tokens_seen
        else:
            n = 1 if text else 0
        if n <= 0:
            return None
        self.tokens_seen += n
        delta = Delta(text or "", n, None)
        if self.usage is not None:
            if self.usage:
                delta.prompt_tokens = self.usage.get("prompt_tokens")
                delta.cached_tokens = (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            self.usage = None
        return delta


