"""The machine a live run or a calibration runs on, and engine settings that fit it.

``describe()`` is the CPU record of ``staircase.machine`` plus the GPU when there is
one; runs record it in their ``config.json`` and profiles in their ``machine`` key.
``engine_settings()`` picks the engine's dtype and CPU thread binding from it
(``benchmarks/bench_dtype.py`` measures; figures in ``benchmarks/results/dtype-*.json``
and the README):

- GPU: ``auto`` (the model's own dtype), no CPU thread binding.
- CPU with AMX (``amx_bf16``): bfloat16, about 5x faster to prefill than float32 (docs/guides/machines.md).
- CPU with AVX-512 BF16, no AMX (AMD Zen 4/5): bfloat16; measured on an AMD EPYC
  (family 26): prefill 1.6x, decode 1.3-1.4x faster than float32.
- CPU without native bf16 (AVX2, or AVX-512 without BF16): float32; bf16 is emulated
  there: prefill about 6x slower than float32 on an AVX2 AMD EPYC (docs/guides/machines.md), 3.3x
  slower with torch capped at AVX2 on the EPYC above.

``--dtype`` (or ``STAIRCASE_DTYPE``) overrides the choice.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache

from staircase.errors import ConfigError
from staircase.machine import describe_cpu

DTYPES = ("auto", "bfloat16", "float16", "float32")
DTYPE_BY_ISA = {"amx": "bfloat16", "avx512_bf16": "bfloat16", "avx512": "float32", "avx2": "float32",
                "other": "float32"}


def _gpu_name() -> str | None:
    """The first CUDA device's name (None on a CPU-only machine or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


@lru_cache(maxsize=1)
def describe() -> dict:
    """This machine, as runs and profiles record it."""
    gpu = _gpu_name()
    return {"platform": "cuda" if gpu else "cpu", "gpu": gpu, **describe_cpu()}


def engine_settings(dtype: str | None = None, machine: dict | None = None) -> dict:
    """``{"dtype", "dtype_reason", "cpu_threads_bind"}`` for a vLLM engine on this
    machine (``cpu_threads_bind`` None on a GPU). ``dtype`` or the ``STAIRCASE_DTYPE``
    environment variable overrides the dtype."""
    machine = machine or describe()
    chosen = dtype or os.environ.get("STAIRCASE_DTYPE") or None
    if chosen is not None and chosen not in DTYPES:
        raise ConfigError("dtype", chosen, ", ".join(DTYPES))
    if machine.get("gpu"):
        auto, why, bind = "auto", f"GPU {machine['gpu']}: the model's own dtype", None
    else:
        isa = machine.get("cpu_isa", "other")
        auto = DTYPE_BY_ISA.get(isa, "float32")
        why = f"CPU {isa}: " + ("native bf16" if auto == "bfloat16" else "no native bf16, float32 is faster")
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or f"0-{max(0, (machine.get('cores') or 1) - 1)}"
    if chosen is not None:
        why = f"set by the user (the default here: {auto}, {why})"
    return {"dtype": chosen or auto, "dtype_reason": why, "cpu_threads_bind": bind}


def engine_settings_of(engines) -> dict:
    """engine name -> the settings it was built with (dtype and why, CPU threads), for
    the engines that have them (vllm, serve)."""
    return {e.name: e.settings for e in engines if getattr(e, "settings", None)}


def announce_machine(engines) -> dict:
    """Print the machine and each engine's settings on stderr; returns the record that
    config.json keeps (``machine``, ``engine_settings``)."""
    from staircase.machine import label

    machine = describe()
    settings = engine_settings_of({id(e): e for e in engines}.values())
    print(f"machine: {label(machine)}", file=sys.stderr, flush=True)
    for name, s in settings.items():
        bind = f", CPU threads {s['cpu_threads_bind']}" if s.get("cpu_threads_bind") else ""
        print(f"engine {name}: dtype {s['dtype']} ({s['dtype_reason']}){bind}", file=sys.stderr, flush=True)
    return {"machine": machine, "engine_settings": settings}
