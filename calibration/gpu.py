"""GPU engine profiles from a measured kernel database, offline, in seconds.

The database is NVIDIA AIConfigurator's (PyPI ``aiconfigurator-core``, Apache-2.0):
GEMM, attention and communication kernels measured per GPU and serving engine, and
step estimators built on them. For one model on one GPU type, engine and tensor
parallel size, this module asks the estimator for

- the time of a decode step over a grid of batch sizes and contexts,
- the time of a prefill over a grid of new and cached prompt tokens,
- the KV cache the GPU's memory leaves (vLLM and SGLang: a fraction of the total),

fits the profile's forms to them (``sim/profile.py``: decode ``a + b*B + c*C``, prefill
``a + b*P + c*P^2 + d*P*K``), weighting each point by its inverse so the error is
relative, and records the fit's error over the grid beside the coefficients, with the
provenance (package and database versions, GPU, engine and version, model, TP,
precision) and the engine's scheduler settings (``max_num_seqs``, the chunked-prefill
budget ``max_num_batched_tokens``).

What the database leaves out (the API server, tokenization, the scheduler's and the
sampler's time per step) goes in as named overhead terms (``OVERHEADS``), each with its
source; they are added into the coefficients and listed under ``overheads``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from staircase.errors import ConfigError

BACKENDS = ("vllm", "sglang", "trtllm")
PRECISIONS = ("bf16", "fp8")
TP_SIZES = (1, 2, 4, 8)
# Fit grid: what the profile's error is stated over.
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_CONTEXTS = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768)  # tokens per sequence
PREFILL_NEW = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PREFILL_CACHED = (0, 1024, 4096, 16384)
MAX_CONTEXT = 32768

# vLLM's own defaults for `vllm serve` on a GPU with >= 70 GiB that is not an A100
# (vllm/engine/arg_utils.py, _set_default_args / get_batch_defaults, vLLM 0.11-0.32):
# max_num_batched_tokens 8192, max_num_seqs 1024; on smaller GPUs and A100s: 2048 and 256.
# SGLang's chunked_prefill_size defaults to 8192 on GPUs of 80 GB and more (server_args.py).
SCHEDULER_DEFAULTS = {"vllm": (8192, 1024), "sglang": (8192, 1024), "trtllm": (8192, 1024)}
SMALL_GPU_SCHEDULER = (2048, 256)


@dataclass(frozen=True)
class Overhead:
    """A term the database omits, added to the profile: ``per_request_s`` to each call's
    overhead (API server, tokenization, the client's connection), ``per_step_s`` to each
    engine step (scheduler, sampler, detokenizer: the CPU side of a step)."""

    per_request_s: float
    per_step_s: float
    per_seq_step_s: float  # per running sequence per step: output processing, detokenizing, streaming
    source: str


# Taken from published measurements of the same engine, not from the database (the
# manual's GPU profiles guide). vLLM: the TPOT the database's steps leave unexplained in
# the published vLLM 0.12.0 runs of Qwen3-32B bf16 at TP 2 on H100 (26 load points,
# concurrency 8-128, not KV-limited; benchmarks/published/aic-silicon-h100.csv), fitted
# as a + b * concurrency by `benchmarks/published/fit_overheads.py`. Those 26 points are
# held in; every other row of the check is held out. The other engines: none fitted (0).
OVERHEADS = {
    "vllm": Overhead(0.0, 0.00283, 0.000115, "fitted on the published vLLM 0.12.0 Qwen3-32B TP2 H100 runs "
                     "(aic-silicon, 26 points; benchmarks/published/fit_overheads.py)"),
    "sglang": Overhead(0.0, 0.0, 0.0, "none fitted"),
    "trtllm": Overhead(0.0, 0.0, 0.0, "none fitted"),
}


@dataclass(frozen=True)
class GPUEngineSpec:
    """One engine to build: a model on a GPU type under a serving engine."""

    gpu: str
    backend: str
    model: str
    tp: int = 1
    precision: str = "bf16"
    name: str | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None  # None: the engine's default for this GPU
    max_num_seqs: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        short = self.model.split("/")[-1]
        return self.name or f"{self.gpu}-{self.backend}-{short}-tp{self.tp}"


def _aic():
    """The database package, imported quietly (it logs every table it loads)."""
    try:
        import aiconfigurator_core  # noqa: F401
        from aiconfigurator_core.sdk import perf_database
        from aiconfigurator_core.sdk.engine import EngineHandle
        from aiconfigurator_core.sdk.memory import estimate_kv_cache
    except ImportError:
        raise ConfigError("profile", "aiconfigurator-core", "installed: pip install 'aiconfigurator-core==0.12.0' "
                          "(make's install has it: the `profile` extra)") from None
    for name in ("aiconfigurator_core", "aiconfigurator"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return perf_database, EngineHandle, estimate_kv_cache


def database_folder() -> Path:
    import aiconfigurator_core

    return Path(aiconfigurator_core.__file__).parent


def supported_gpus() -> list[str]:
    perf_database, _, _ = _aic()
    with _quiet():
        return sorted(perf_database.get_supported_databases())


def supported_models() -> list[str]:
    """Model ids whose configuration ships in the package (no hub is reached)."""
    folder = database_folder() / "model_configs"
    names = set()
    for p in folder.glob("*_config.json"):
        stem = p.name[: -len("_config.json")]
        if stem.endswith("_hf_quant"):
            continue
        names.add(stem.replace("--", "/", 1))
    return sorted(names)


@contextlib.contextmanager
def _quiet():
    """The package prints its table loading to stdout and stderr: keep our output ours."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def backend_version(gpu: str, backend: str) -> str:
    perf_database, _, _ = _aic()
    with _quiet():
        slots = perf_database.get_version_slots(gpu, backend) or {}
    version = slots.get("current")
    if not version:
        have = [b for b in BACKENDS if (perf_database.get_version_slots(gpu, b) or {}).get("current")]
        raise ConfigError("backend", backend, f"an engine the database measured on {gpu}: {', '.join(have) or 'none'}")
    return version


def check_spec(spec: GPUEngineSpec) -> str:
    """Check a spec's fields against what the database holds; its engine version."""
    gpus = supported_gpus()
    if spec.gpu not in gpus:
        raise ConfigError("gpu", spec.gpu, ", ".join(gpus))
    if spec.backend not in BACKENDS:
        raise ConfigError("backend", spec.backend, ", ".join(BACKENDS))
    version = backend_version(spec.gpu, spec.backend)
    models = supported_models()
    if spec.model not in models:
        near = [m for m in models if spec.model.split("/")[-1].lower()[:6] in m.lower()]
        raise ConfigError("model", spec.model, "a model of the database's configs, e.g. "
                          + ", ".join(near[:8] or ["meta-llama/Meta-Llama-3.1-8B", "Qwen/Qwen3-8B",
                                                   "Qwen/Qwen3-32B", "meta-llama/Meta-Llama-3.1-70B"])
                          + " (all: staircase profile --list-models)")
    if spec.tp not in TP_SIZES:
        raise ConfigError("tp", spec.tp, ", ".join(map(str, TP_SIZES)))
    if spec.precision not in PRECISIONS:
        raise ConfigError("precision", spec.precision, ", ".join(PRECISIONS))
    if not 0.1 <= spec.gpu_memory_utilization <= 0.99:
        raise ConfigError("gpu_memory_utilization", spec.gpu_memory_utilization, "a fraction in [0.1, 0.99]")
    for key in ("max_num_batched_tokens", "max_num_seqs"):
        v = getattr(spec, key)
        if v is not None and (not isinstance(v, int) or v < 2):
            raise ConfigError(key, v, "an integer >= 2 (or absent: the engine's default)")
    return version


def _quant(precision: str) -> dict:
    return {} if precision == "bf16" else {"gemm_quant_mode": "fp8", "kvcache_quant_mode": "fp8"}


def _fit(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """Non-negative least squares on relative error; (coefficients, error summary)."""
    from scipy.optimize import nnls

    w = 1.0 / y
    coef, _ = nnls(X * w[:, None], y * w)
    rel = X @ coef / y - 1
    err = {"points": int(len(y)), "mape": float(np.mean(np.abs(rel))), "max_abs": float(np.max(np.abs(rel))),
           "bias": float(np.mean(rel))}
    return coef, err


def scheduler_settings(spec: GPUEngineSpec, memory_bytes: float) -> tuple[int, int]:
    budget, seqs = SCHEDULER_DEFAULTS[spec.backend]
    if spec.backend == "vllm" and (memory_bytes < 70 * 2**30 or spec.gpu.startswith("a100")):
        budget, seqs = SMALL_GPU_SCHEDULER
    return spec.max_num_batched_tokens or budget, spec.max_num_seqs or seqs


NO_OVERHEAD = Overhead(0.0, 0.0, 0.0, "none: the database's steps alone (asked for)")


def build_engine(spec: GPUEngineSpec, overheads: bool = True) -> dict:
    """One engine of a profile (``sim/profile.py``'s JSON) from the database, with its
    provenance, fit error and overhead terms (``overheads=False``: the database's steps
    alone, as ``benchmarks/published/fit_overheads.py`` fits the terms from)."""
    version = check_spec(spec)
    started = time.perf_counter()
    handle, kv = _compile(spec, version)
    budget, seqs = scheduler_settings(spec, kv["total_gpu_capacity_bytes"])
    kv_tokens = int(kv["total_kv_size_tokens"])
    if kv_tokens < MAX_CONTEXT // 8:
        raise ConfigError("tp", spec.tp, f"a tensor parallel size at which {spec.model} leaves KV cache on {spec.gpu} "
                          f"(at tp {spec.tp}: {kv_tokens} tokens); try tp {spec.tp * 2}")
    over = OVERHEADS[spec.backend] if overheads else NO_OVERHEAD
    with _quiet():
        decode, dec_err = _decode_fit(handle, kv_tokens)
        prefill, pre_err = _prefill_fit(handle)
    engine = {
        "prefill_s": {"base": prefill[0] + over.per_step_s, "per_token": prefill[1], "per_token2": prefill[2],
                      "per_token_cached": prefill[3]},
        "decode_iteration_s": {"base": decode[0] + over.per_step_s, "per_seq": decode[1] + over.per_seq_step_s,
                               "per_context_token": decode[2]},
        "request_overhead_s": over.per_request_s,
        "max_batch_size": seqs,
        "kv_cache_tokens": kv_tokens,
        "block_size_tokens": 16,
        "max_num_batched_tokens": budget,
        "noise": None,
        "provenance": _provenance(spec, version, kv, budget, seqs, time.perf_counter() - started),
        "fit_error": _fit_error(dec_err, pre_err),
        "overheads": {"per_request_s": over.per_request_s, "per_step_s": over.per_step_s,
                      "per_seq_step_s": over.per_seq_step_s, "source": over.source,
                      "note": "not in the database; per_step_s is in both bases above, per_seq_step_s in "
                              "decode per_seq, per_request_s is request_overhead_s"},
    }
    return engine


def _compile(spec: GPUEngineSpec, version: str):
    """(the database's engine handle, its KV estimate) for a checked spec."""
    _, EngineHandle, estimate_kv_cache = _aic()
    quant = _quant(spec.precision)
    with _quiet():
        try:
            handle = EngineHandle.compile(spec.model, spec.gpu, spec.backend, backend_version=version,
                                          tp_size=spec.tp, **quant)
        except Exception as err:  # the package's own message names what it could not build
            raise ConfigError("model", spec.model, f"a model the database can build on {spec.gpu}/{spec.backend} "
                              f"at tp {spec.tp}, {spec.precision} ({type(err).__name__}: {str(err)[:160]})") from None
        return handle, _kv(estimate_kv_cache, spec, version, quant)


def _provenance(spec: GPUEngineSpec, version: str, kv: dict, budget: int, seqs: int, took_s: float) -> dict:
    given = spec.max_num_batched_tokens is not None or spec.max_num_seqs is not None
    return {"source": "NVIDIA AIConfigurator kernel database (PyPI aiconfigurator-core, Apache-2.0)",
            "package": "aiconfigurator-core", "package_version": importlib.metadata.version("aiconfigurator-core"),
            "database": f"{spec.gpu}/{spec.backend}/{version}", "gpu": spec.gpu, "engine": spec.backend,
            "engine_version": version, "model": spec.model, "tp": spec.tp, "precision": spec.precision,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "kv_bytes_per_token": kv["kv_size_per_token_bytes"], "gpu_memory_bytes": kv["total_gpu_capacity_bytes"],
            "scheduler": {"max_num_batched_tokens": budget, "max_num_seqs": seqs,
                          "source": "given" if given else
                          "the engine's defaults for this GPU (vLLM arg_utils; SGLang server_args)"},
            "built_s": round(took_s, 2)}


def _fit_error(dec_err: dict, pre_err: dict) -> dict:
    return {"decode_iteration_s": {**dec_err, "grid": f"batch {DECODE_BATCHES[0]}-{DECODE_BATCHES[-1]}, context "
                                   f"{DECODE_CONTEXTS[0]}-{DECODE_CONTEXTS[-1]} tokens per sequence, within the KV "
                                   "cache"},
            "prefill_s": {**pre_err, "grid": f"new tokens {PREFILL_NEW[0]}-{PREFILL_NEW[-1]}, cached "
                          f"{PREFILL_CACHED[0]}-{PREFILL_CACHED[-1]}, total <= {MAX_CONTEXT}"},
            "against": "the database's own step predictions (predict_prefill_latency, decode_step_latency)"}


def _kv(estimate_kv_cache, spec: GPUEngineSpec, version: str, quant: dict) -> dict:
    kind = "of_free" if spec.backend == "trtllm" else "of_total"
    try:
        return estimate_kv_cache(spec.model, spec.gpu, spec.backend, version, max_num_tokens=8192,
                                 max_batch_size=256, memory_fraction_kind=kind,
                                 memory_fraction_value=spec.gpu_memory_utilization, tp_size=spec.tp, **quant)
    except Exception as err:
        raise ConfigError("tp", spec.tp, f"a tensor parallel size at which {spec.model} fits {spec.gpu} "
                          f"({type(err).__name__}: {str(err)[:160]})") from None


def _decode_fit(handle, kv_tokens: int) -> tuple[np.ndarray, dict]:
    X, y = [], []
    for b in DECODE_BATCHES:
        for c in DECODE_CONTEXTS:
            if b * c > kv_tokens:
                continue
            X.append([1.0, b, b * c])
            y.append(handle.decode_step_latency(b, c, 2) / 1000.0)
    return _fit(np.array(X), np.array(y))


def _prefill_fit(handle) -> tuple[np.ndarray, dict]:
    X, y = [], []
    for p in PREFILL_NEW:
        for k in PREFILL_CACHED:
            if p + k > MAX_CONTEXT:
                continue
            X.append([1.0, p, p * p, p * k])
            y.append(handle.predict_prefill_latency(1, p + k, k) / 1000.0)
    return _fit(np.array(X), np.array(y))


def build_profile(specs: list[GPUEngineSpec], proposers: list[str], aggregator: str, name: str,
                  note: str = "") -> dict:
    """A profile (``staircase-profile/1``) of one engine per spec; ``proposers`` and
    ``aggregator`` name the specs' labels (the slots)."""
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError("name", labels, "distinct engine names (give --name per engine)")
    engines = {s.label: build_engine(s) for s in specs}
    return {"schema": "staircase-profile/1", "name": name, "calibrated": False,
            "note": note or ("GPU engines from NVIDIA AIConfigurator's measured kernel database (aiconfigurator-core "
                             f"{importlib.metadata.version('aiconfigurator-core')}); each engine records its "
                             "provenance, its fit error against the database's step predictions, and the overhead "
                             "terms the database omits. Checked against published runs: staircase validate --published."),
            "engine_sharing": "per-slot", "engines": engines,
            "slots": {"proposers": proposers, "aggregator": aggregator}}


def fit_summary(profile: dict) -> list[dict]:
    """One row per engine: its fit errors (for printing)."""
    rows = []
    for name, e in profile["engines"].items():
        fe = e.get("fit_error") or {}
        rows.append({"engine": name, "decode_mape_pct": 100 * fe.get("decode_iteration_s", {}).get("mape", math.nan),
                     "decode_max_pct": 100 * fe.get("decode_iteration_s", {}).get("max_abs", math.nan),
                     "prefill_mape_pct": 100 * fe.get("prefill_s", {}).get("mape", math.nan),
                     "prefill_max_pct": 100 * fe.get("prefill_s", {}).get("max_abs", math.nan),
                     "kv_tokens": e["kv_cache_tokens"], "step_budget": e.get("max_num_batched_tokens", 0),
                     "max_seqs": e["max_batch_size"]})
    return rows
