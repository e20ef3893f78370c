"""Which machine: the CPU (model, the instruction-set level that matters to vLLM's CPU
kernels, cores) as runs and profiles record it, and how to compare two records.
Detection of a GPU and the engine settings that follow live in ``staircase.live.machine``."""

from __future__ import annotations

import os
import platform

# instruction-set levels, fastest bf16 first, each with the /proc/cpuinfo flag that shows it
ISA_FLAGS = (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"))
KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def cpu_isa(flags) -> str:
    """``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` or ``other``."""
    return next((isa for isa, flag in ISA_FLAGS if flag in flags), "other")


def _cpuinfo() -> dict:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:
                    break  # the first processor is enough
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    return fields


def describe_cpu() -> dict:
    """This machine's CPU: ``cpu_model``, ``cpu_family``, ``cpu_isa``, ``cpu_flags`` (the
    ones that matter), ``cores``, ``arch``."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {"cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": info.get("cpu family"), "cpu_isa": cpu_isa(flags),
            "cpu_flags": sorted(f for f in KEY_FLAGS if f in flags), "cores": os.cpu_count(),
            "arch": platform.machine()}


def label(machine: dict | None) -> str:
    """One line: ``AMD EPYC (avx512_bf16, 2 cores)`` or ``NVIDIA H100 80GB HBM3 (cuda)``."""
    if not machine:
        return "an unrecorded machine"
    if machine.get("gpu"):
        return f"{machine['gpu']} (cuda)"
    family = f", family {machine['cpu_family']}" if machine.get("cpu_family") else ""
    return f"{machine.get('cpu_model') or 'a CPU'} ({machine.get('cpu_isa', '?')}{family}, {machine.get('cores', '?')} cores)"


def differences(a: dict | None, b: dict | None) -> list[str]:
    """What differs between two recorded machines in ways that change an engine's speed
    (GPU, CPU model, family, instruction-set level, cores); fields either record lacks
    are not compared, and [] when either is unrecorded."""
    if not a or not b:
        return []
    keys = ("gpu",) if (a.get("gpu") or b.get("gpu")) else ("cpu_model", "cpu_family", "cpu_isa", "cores")
    return [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys
            if k == "gpu" or (a.get(k) is not None and b.get(k) is not None) if a.get(k) != b.get(k)]
