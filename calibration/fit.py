"""Fit a simulator engine profile from live chunk traces.

What a live trace shows about an engine, per call (first chunk row of a call:
``sent_s``, ``first_token_s``, prompt and cached tokens) and per chunk (tokens between
``first_token_s`` or the previous chunk's end and ``end_s``):

- **Prefill + overhead.** For a call that had the engine to itself from sending to
  its first token (no other call of the same engine active in that window), the
  wait ``first_token_s - sent_s`` is ``overhead + prefill_s(P)`` with P its uncached
  prompt tokens. Fitted as ``a + b P + c P^2`` (non-negative least squares, soft-L1
  loss so a scheduling hiccup does not drag the line). The prefill produces the first
  token in one engine step, so the step's fixed cost (the decode base) goes to
  ``prefill_s.base`` and the rest of ``a`` to ``request_overhead_s``.
- **Decode iterations.** For each chunk interval with no other call's prefill in it,
  time per token = ``base + per_seq * B + per_context_token * C``, B and C being the
  time-averaged batch size and batch context over the interval, reconstructed from
  every call of the same engine in the same run (context grows linearly between a
  call's first token and its end).
- **Noise.** The ratios measured / fitted of both fits are the multiplicative noise the
  simulator draws; candidate distributions (``CANDIDATES``) are fitted by maximum
  likelihood with location 0 and the one with the best Kolmogorov-Smirnov p-value is
  kept. The table of candidates goes into the profile.

One fit is for one engine: traces whose chunk rows name several engines must say
which (``engine=``), and traces from different models cannot be mixed. Too few or too
uniform points (every prompt the same length, say) raise an error that says what
to add.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.stats

from staircase.errors import ConfigError
from staircase.record import read_record
from staircase.trace import read_chunks, read_requests
from staircase.deployment import Deployment, deployment_from_dict
from staircase.machine import label
from staircase.topology import proposer_slot_index

CANDIDATES = ("lognorm", "gamma", "weibull_min", "invgauss")
MIN_PREFILL_POINTS = 5
MIN_PREFILL_LENGTHS = 3
MIN_DECODE_POINTS = 5
MIN_NOISE_POINTS = 8
GAP_S = 1e-3  # two calls touching end-to-start within this do not overlap


class CalibrationWarning(UserWarning):
    """A fit went on but a parameter is weakly determined or fixed."""


# ----------------------------------------------------------------- trace input


@dataclass
class RunGroup:
    """The chunks of one policy's run: one clock, so overlaps between calls are real."""

    source: str
    policy: str
    chunks: pd.DataFrame
    requests: pd.DataFrame | None = None
    config: dict = field(default_factory=dict)

    @property
    def engine_models(self) -> dict[str, str]:
        return dict(self.config.get("engine_models") or {})


def load_runs(folders: Iterable[Path | str]) -> list[RunGroup]:
    """Every policy's trace of ``staircase live`` results folders (``config.json`` and
    ``traces/*.chunks.parquet``)."""
    groups: list[RunGroup] = []
    for folder in folders:
        folder = Path(folder)
        tdir = folder / "traces"
        files = sorted(tdir.glob("*.chunks.parquet")) if tdir.is_dir() else []
        if not files:
            raise ConfigError("traces", str(folder), "a results folder of `staircase live` with traces/*.chunks.parquet")
        config = read_record(folder, "traces") if (folder / "config.json").is_file() else {}
        for f in files:
            chunks = read_chunks(f)
            req_path = f.with_name(f.name.replace(".chunks.", ".requests."))
            requests = read_requests(req_path) if req_path.is_file() else None
            policy = str(chunks["policy"].iloc[0]) if len(chunks) else f.name.split(".")[0]
            groups.append(RunGroup(str(f), policy, chunks, requests, config))
    return groups


def calls_of(chunks: pd.DataFrame) -> pd.DataFrame:
    """One row per call: engine, sent_s, first_token_s (of its first chunk), end_s,
    prompt/cached tokens, tokens generated."""
    if not len(chunks):
        return pd.DataFrame(columns=["request_id", "node", "call", "engine", "sent_s", "first_token_s", "end_s",
                                     "prompt_tokens", "cached_tokens", "tokens"])
    c = chunks.sort_values(["request_id", "node", "call", "chunk_index"], kind="stable")
    g = c.groupby(["request_id", "node", "call"], sort=False)
    return pd.DataFrame({
        "engine": g["engine"].first(),
        "sent_s": g["sent_s"].first(),
        "first_token_s": g["first_token_s"].first(),
        "end_s": g["end_s"].max(),
        "prompt_tokens": g["prompt_tokens"].sum(),
        "cached_tokens": g["cached_tokens"].sum(),
        "tokens": g["tokens"].sum(),
    }).reset_index()


@dataclass
class Observations:
    engine: str
    prefill: pd.DataFrame  # source, prompt_tokens, cached_tokens, uncached, wait_s
    decode: pd.DataFrame  # source, tokens, batch, context, per_token_s
    sources: list[str]
    models: list[str]


def observations(groups: Sequence[RunGroup], engine: str | None = None,
                 replicas: Sequence[str] | None = None) -> Observations:
    """Prefill and decode observations of one engine from run groups; with ``replicas``,
    of one model over those engines (a pool's replicas, each engine's batches its own),
    named ``engine``."""
    names = sorted({str(e) for g in groups for e in g.chunks["engine"].unique()})
    if not names:
        raise ConfigError("traces", "no chunk rows", "traces with at least one call")
    if engine is None:
        if len(names) > 1:
            raise ConfigError("engine", f"traces name {len(names)} engines ({', '.join(names)})",
                              "one engine per fit: pass engine= (--engine) to pick one")
        engine = names[0]
    wanted = list(replicas) if replicas is not None else [engine]
    for name in wanted:
        if name not in names:
            raise ConfigError("engine", name, f"an engine named in the traces: {', '.join(names)}")
    models = sorted({g.engine_models.get(e) for g in groups for e in wanted if g.engine_models.get(e)})
    if len(models) > 1:
        raise ConfigError("traces", f"engine {engine} ran {len(models)} models ({', '.join(models)})",
                          "traces of one model per fit")
    pre_rows, dec_rows, sources = [], [], []
    for g in groups:
        all_calls = calls_of(g.chunks)
        for name in wanted:
            calls = all_calls[all_calls["engine"] == name]
            if not len(calls):
                continue
            sources.append(g.source)
            mine = g.chunks[g.chunks["engine"] == name]
            pre_rows.append(_prefill_points(calls).assign(source=g.source))
            dec_rows.append(_decode_points(mine, calls).assign(source=g.source))
    sources = list(dict.fromkeys(sources))
    prefill = pd.concat(pre_rows, ignore_index=True) if pre_rows else pd.DataFrame(
        columns=["prompt_tokens", "cached_tokens", "uncached", "wait_s", "source"])
    decode = pd.concat(dec_rows, ignore_index=True) if dec_rows else pd.DataFrame(
        columns=["tokens", "batch", "context", "per_token_s", "source"])
    return Observations(engine, prefill, decode, sources, models)


def _prefill_points(calls: pd.DataFrame) -> pd.DataFrame:
    sent = calls["sent_s"].to_numpy(float)
    first = calls["first_token_s"].to_numpy(float)
    end = calls["end_s"].to_numpy(float)
    ok = np.isfinite(first) & (first > sent)
    # another call j active (sent_j .. end_j) inside this call's wait (sent_i .. first_i)?
    overlap = (sent[None, :] < first[:, None] - GAP_S) & (end[None, :] > sent[:, None] + GAP_S)
    np.fill_diagonal(overlap, False)
    isolated = ok & ~overlap.any(axis=1)
    c = calls[isolated]
    return pd.DataFrame({"prompt_tokens": c["prompt_tokens"].to_numpy(int),
                         "cached_tokens": c["cached_tokens"].to_numpy(int),
                         "uncached": (c["prompt_tokens"] - c["cached_tokens"]).to_numpy(int),
                         "wait_s": (c["first_token_s"] - c["sent_s"]).to_numpy(float)})


def _decode_points(chunks: pd.DataFrame, calls: pd.DataFrame) -> pd.DataFrame:
    c = chunks.sort_values(["request_id", "node", "call", "chunk_index"], kind="stable")
    first_of_call = ~c.duplicated(["request_id", "node", "call"], keep="first")
    start = np.where(first_of_call, c["first_token_s"], c["sent_s"]).astype(float)
    n = np.where(first_of_call, c["tokens"] - 1, c["tokens"]).astype(float)
    end = c["end_s"].to_numpy(float)
    keep = (n >= 1) & (end > start) & np.isfinite(start)
    start, end, n = start[keep], end[keep], n[keep]
    if not len(start):
        return pd.DataFrame(columns=["tokens", "batch", "context", "per_token_s"])
    cs, cf, ce = (calls[k].to_numpy(float) for k in ("sent_s", "first_token_s", "end_s"))
    cp, ct = calls["prompt_tokens"].to_numpy(float), calls["tokens"].to_numpy(float)
    # another call's prefill wait inside the interval: the engine was not only decoding
    pre = (cs[None, :] < end[:, None] - GAP_S) & (cf[None, :] > start[:, None] + GAP_S)
    clean = ~pre.any(axis=1)
    dur = end - start
    lo = np.maximum(start[:, None], cf[None, :])
    hi = np.minimum(end[:, None], ce[None, :])
    ov = np.clip(hi - lo, 0, None)  # decode overlap with every call
    span = np.where(ce > cf, ce - cf, np.inf)
    mid = (lo + hi) / 2
    ctx = cp[None, :] + 1 + (ct[None, :] - 1) * np.clip((mid - cf[None, :]) / span[None, :], 0, 1)
    batch = ov.sum(axis=1) / dur
    context = (ov * ctx).sum(axis=1) / dur
    out = pd.DataFrame({"tokens": n.astype(int), "batch": batch, "context": context, "per_token_s": dur / n})
    return out[clean & (batch >= 0.5)].reset_index(drop=True)


# ------------------------------------------------------------------------ fits


@dataclass
class NoiseFit:
    dist: str | None
    params: dict
    candidates: list[dict]
    points: int

    def to_profile(self) -> dict | None:
        return None if self.dist is None else {"dist": self.dist, "params": self.params}


def fit_noise(ratios: np.ndarray) -> NoiseFit:
    """The best candidate for positive ratios (measured / fitted), by KS p-value."""
    r = np.asarray(ratios, float)
    r = r[np.isfinite(r) & (r > 0)]
    if len(r) < MIN_NOISE_POINTS:
        return NoiseFit(None, {}, [], len(r))
    table = []
    for name in CANDIDATES:
        dist = getattr(scipy.stats, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fitted = dist.fit(r, floc=0)
            except Exception:
                continue
        shapes = [s.strip() for s in dist.shapes.split(",")] if dist.shapes else []
        params = {k: float(v) for k, v in zip(shapes + ["loc", "scale"], fitted)}
        frozen = dist(**params)
        if not math.isfinite(float(frozen.mean())):
            continue
        ks = scipy.stats.kstest(r, frozen.cdf)
        loglik = float(np.sum(frozen.logpdf(r)))
        table.append({"dist": name, "params": params, "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
                      "aic": 2 * (len(params) - 1) - 2 * loglik, "mean": float(frozen.mean()), "std": float(frozen.std())})
    if not table:
        return NoiseFit(None, {}, [], len(r))
    table.sort(key=lambda t: (-t["ks_pvalue"], t["aic"]))
    best = table[0]
    return NoiseFit(best["dist"], best["params"], table, len(r))


def _robust_nnls(a: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Non-negative least squares with a soft-L1 loss (relative residuals)."""
    w = np.ones(len(y)) if w is None else w
    scale = np.maximum(np.abs(y), 1e-9)
    start = scipy.optimize.lsq_linear(a / scale[:, None], np.ones(len(y)), bounds=(0, np.inf)).x

    def resid(x):
        return np.sqrt(w) * (a @ x - y) / scale

    res = scipy.optimize.least_squares(resid, np.maximum(start, 0), bounds=(0, np.inf), loss="soft_l1", f_scale=0.1)
    return res.x


def _stats(y: np.ndarray, yhat: np.ndarray) -> dict:
    rel = (y - yhat) / y
    ss_res = float(np.sum((y - yhat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return {"points": int(len(y)), "rmse_s": float(np.sqrt(np.mean((y - yhat) ** 2))),
            "median_abs_rel_error": float(np.median(np.abs(rel))), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


@dataclass
class EngineFit:
    engine: str
    model: str | None
    prefill: dict  # base, per_token, per_token2
    decode: dict  # base, per_seq, per_context_token
    request_overhead_s: float
    noise: dict[str, NoiseFit]
    residuals: dict
    data: dict
    warnings: list[str]

    def profile_engine(self, max_batch_size: int = 256, kv_cache_tokens: int = 40000, block_size_tokens: int = 32) -> dict:
        return {
            "model": self.model,
            "prefill_s": self.prefill,
            "decode_iteration_s": self.decode,
            "request_overhead_s": self.request_overhead_s,
            "max_batch_size": int(max_batch_size),
            "kv_cache_tokens": int(kv_cache_tokens),
            "block_size_tokens": int(block_size_tokens),
            # the wait before a first token is fitted as one: overhead and prefill share its noise
            "noise": {"prefill": self.noise["prefill"].to_profile(), "decode": self.noise["decode"].to_profile(),
                      "overhead": self.noise["prefill"].to_profile()},
        }


def fit_engine(obs: Observations, quadratic: bool = True) -> EngineFit:
    """Fit one engine's coefficients and noise from its observations."""
    _check_enough(obs)
    notes: list[str] = []
    pre, dec = obs.prefill, obs.decode
    decode, yhat_dec = _fit_decode(obs.engine, dec, notes)  # first: its base is the fixed cost of one step
    prefill, overhead, yhat_pre = _fit_prefill(pre, decode["base"], quadratic, notes)
    w, y = pre["wait_s"].to_numpy(float), dec["per_token_s"].to_numpy(float)
    noise = {"prefill": fit_noise(w / yhat_pre), "decode": fit_noise(y / yhat_dec)}
    for k, nf in noise.items():
        if nf.dist is None:
            notes.append(f"{k} noise: {nf.points} points (< {MIN_NOISE_POINTS}): no noise fitted")
    for n in notes:
        warnings.warn(f"engine {obs.engine}: {n}", CalibrationWarning, stacklevel=2)
    residuals = {"prefill": _stats(w, yhat_pre), "decode": _stats(y, yhat_dec),
                 "noise_candidates": {k: nf.candidates for k, nf in noise.items()}}
    return EngineFit(obs.engine, obs.models[0] if obs.models else None, prefill, decode, overhead, noise,
                     residuals, _fit_points(obs), notes)


def _check_enough(obs: Observations) -> None:
    pre, dec = obs.prefill, obs.decode
    lengths = pre["uncached"].nunique() if len(pre) else 0
    if len(pre) < MIN_PREFILL_POINTS or lengths < MIN_PREFILL_LENGTHS:
        raise ConfigError("traces", f"{len(pre)} isolated first-token waits of engine {obs.engine} "
                          f"at {lengths} uncached prompt lengths",
                          f"at least {MIN_PREFILL_POINTS} calls at {MIN_PREFILL_LENGTHS} or more prompt lengths that "
                          "had the engine to themselves (run `staircase calibrate` probes, or give more traces)")
    if len(dec) < MIN_DECODE_POINTS:
        raise ConfigError("traces", f"{len(dec)} decode intervals of engine {obs.engine}",
                          f"at least {MIN_DECODE_POINTS} chunk intervals of 2 or more tokens with no prefill in them")


def _fit_decode(engine: str, dec, notes: list[str]) -> tuple[dict, np.ndarray]:
    """Decode iteration time = base + per_seq * batch + per_context_token * context
    (robust NNLS, token-weighted); a term whose variable did not vary is fixed at 0."""
    y = dec["per_token_s"].to_numpy(float)
    b = dec["batch"].to_numpy(float)
    c = dec["context"].to_numpy(float)
    cols = [np.ones_like(y), b, c]
    fixed = []
    if np.ptp(b) < 0.5:
        fixed.append("per_seq")
        notes.append(f"batch size did not vary (mean {b.mean():.2f}): decode per_seq fixed at 0; "
                     "add probes at several concurrency levels")
    if np.ptp(c) < 64:
        fixed.append("per_context_token")
        notes.append(f"batch context did not vary ({c.min():.0f}-{c.max():.0f} tokens): per_context_token fixed at 0")
    names = ["base", "per_seq", "per_context_token"]
    use = [i for i, n in enumerate(names) if n not in fixed]
    x = _robust_nnls(np.column_stack([cols[i] for i in use]), y, dec["tokens"].to_numpy(float))
    decode = dict.fromkeys(names, 0.0)
    for i, v in zip(use, x):
        decode[names[i]] = float(v)
    if decode["base"] + decode["per_seq"] <= 0:
        raise ConfigError("traces", f"decode fit of engine {engine} gave zero step time",
                          "decode intervals with positive durations")
    return decode, decode["base"] + decode["per_seq"] * b + decode["per_context_token"] * c


def _fit_prefill(pre, decode_base: float, quadratic: bool, notes: list[str]) -> tuple[dict, float, np.ndarray]:
    """First-token wait = intercept + per_token * p (+ per_token2 * p^2) (+ per_token_cached
    * p * k, k the cached tokens, where calls with new tokens after a cached prefix were
    seen): the intercept is the step's fixed cost (at most decode's) plus the overhead."""
    p, k = pre["uncached"].to_numpy(float), pre["cached_tokens"].to_numpy(float)
    cross = (p * k) if np.count_nonzero(p * k >= 16 * 256) >= 3 else None  # enough calls with both
    terms = [np.ones_like(p), p] + ([p * p] if quadratic else []) + ([cross] if cross is not None else [])
    coef = _robust_nnls(np.column_stack(terms), pre["wait_s"].to_numpy(float))
    intercept, slope = float(coef[0]), float(coef[1])
    quad = float(coef[2]) if quadratic else 0.0
    per_cached = float(coef[-1]) if cross is not None else 0.0
    prefill_base = min(intercept, decode_base)
    if slope <= 0:
        notes.append("prefill time did not grow with prompt length: per_token is 0; add longer prompts")
    prefill = {"base": prefill_base, "per_token": slope, "per_token2": quad, "per_token_cached": per_cached}
    return prefill, intercept - prefill_base, intercept + slope * p + quad * p * p + per_cached * p * k


def _fit_points(obs: Observations) -> dict:
    """The points a fit used (kept in the profile, for plots and for checking it)."""
    pre, dec = obs.prefill, obs.decode
    p, w = pre["uncached"].to_numpy(float), pre["wait_s"].to_numpy(float)
    b, c, y = (dec[k].to_numpy(float) for k in ("batch", "context", "per_token_s"))
    return {
        "sources": obs.sources,
        "prefill_points": {"uncached_tokens": p.astype(int).tolist(), "wait_s": np.round(w, 5).tolist(),
                           "cached_tokens": pre["cached_tokens"].astype(int).tolist()},
        "decode_points": {"tokens": dec["tokens"].astype(int).tolist(), "batch": np.round(b, 3).tolist(),
                          "context": np.round(c, 1).tolist(), "per_token_s": np.round(y, 6).tolist()},
        "ranges": {"uncached_tokens": [int(p.min()), int(p.max())], "batch": [float(b.min()), float(b.max())],
                   "context": [float(c.min()), float(c.max())]},
    }


def build_profile(fits: dict[str, EngineFit], proposers: Sequence[str], aggregator: str, *, name: str,
                  note: str, engine_sharing: str = "per-slot", capacity: dict[str, dict] | None = None,
                  proposer_factor: dict | None = None, extra: dict | None = None) -> dict:
    """A ``staircase-profile/1`` object from engine fits (checked by staircase.sim.profile)."""
    from staircase.sim.profile import SCHEMA, parse_profile

    capacity = capacity or {}
    raw = {
        "schema": SCHEMA,
        "name": name,
        "calibrated": True,
        "note": note,
        "engine_sharing": engine_sharing,
        "engines": {e: f.profile_engine(**capacity.get(e, {})) for e, f in fits.items()},
        "slots": {"proposers": list(proposers), "aggregator": aggregator},
        "lengths": {"proposer_factor": proposer_factor},
        "calibration": {e: {"residuals": f.residuals, "warnings": f.warnings, "data": f.data} for e, f in fits.items()},
        **(extra or {}),
    }
    parse_profile(raw, name)  # the simulator must accept what we write
    return raw


def fit_lengths(groups: Sequence[RunGroup]) -> dict | None:
    """Proposer answer length / final answer length over multi-node runs (the
    simulator's ``lengths.proposer_factor``); None without such runs."""
    ratios = []
    for g in groups:
        c = g.chunks
        if not len(c) or c["role"].nunique() < 2:
            continue
        tok = c.groupby(["request_id", "node", "role"])["tokens"].sum().reset_index()
        final = tok[tok["node"].isin(c.loc[c["user_visible"], "node"].unique())].set_index("request_id")["tokens"]
        props = tok[tok["role"] == "proposer"]
        for rid, t in zip(props["request_id"], props["tokens"]):
            if rid in final.index and final[rid] > 0:
                ratios.append(t / final[rid])
    nf = fit_noise(np.array(ratios))
    return nf.to_profile()


def slots_from(groups: list[RunGroup], engines: list[str]) -> tuple[list[str], str]:
    for g in groups:
        se = g.config.get("slot_engines") or {}
        if se and all(v in engines for v in se.values()):
            props = [se[k] for k in sorted((k for k in se if k != "aggregator"), key=proposer_slot_index)]
            return props or [se["aggregator"]], se["aggregator"]
    return [engines[0]], engines[0]


def engines_to_fit(groups: list[RunGroup], engine: str | None, probed: bool) -> list[str]:
    names = sorted({str(e) for g in groups for e in g.chunks["engine"].unique()})
    if engine:
        if engine not in names:
            raise ConfigError("engine", engine, f"an engine named in the traces: {', '.join(names)}")
        return [engine]
    if len(names) > 1 and not probed:
        # traces from another session: several engines must be asked for one by one
        raise ConfigError("engine", f"traces name {len(names)} engines ({', '.join(names)})",
                          "one engine per fit: pass --engine NAME")
    return names


def fit_units(groups: list[RunGroup], engine: str | None, probed: bool):
    """(what to fit -> its engines (None: itself), profile proposers, profile aggregator):
    a deployment's replicas as one fit per model, else engine by engine."""
    models = replica_models(groups)
    if models and not engine:
        units = {m: [r for r, rm in models.items() if rm == m] for m in dict.fromkeys(models.values())}
        return (units, *deployment_slots(groups))
    names = engines_to_fit(groups, engine, probed=probed)
    return ({n: None for n in names}, *slots_from(groups, names))


def recorded_deployment(groups: list[RunGroup]) -> Deployment | None:
    """The deployment a probe run recorded (``calibrate --deployment``), else None."""
    raw = next((g.config["deployment"] for g in groups if g.config.get("deployment")), None)
    return deployment_from_dict(raw) if raw else None


def replica_models(groups: list[RunGroup]) -> dict[str, str]:
    """Replica (``<pool>/<i>``) -> its pool's model, from the recorded deployment ({}: none)."""
    dep = recorded_deployment(groups)
    return {name: dep.pools[pool].model for name, pool in dep.engine_pools().items()} if dep else {}


def deployment_slots(groups: list[RunGroup]) -> tuple[list[str], str]:
    """The profile's slots from the recorded deployment: each slot's pool's model."""
    dep = recorded_deployment(groups)
    return [dep.pools[p].model for p in dep.proposers], dep.pools[dep.aggregator].model


def fit_all(groups: list[RunGroup], units: dict[str, list[str] | None], quadratic: bool) -> dict:
    """engine (or model) -> its fit over its engine (or its replicas); the fits' warnings
    printed on stderr."""
    fits = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for e, replicas in units.items():
            fits[e] = fit_engine(observations(groups, e, replicas), quadratic=quadratic)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return fits


def profile_note(fits: dict, machine_rec: dict) -> str:
    machine = f"{label(machine_rec.get('machine'))}, python {platform.python_version()}"
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Calibrated by `staircase calibrate` on {when} ({machine}) from "
            f"{sum(len(f.data['sources']) for f in fits.values())} trace files; engines: "
            + ", ".join(f"{e} = {f.model}" for e, f in fits.items())
            + ". Residuals, noise candidates and the fitted points are under `calibration`.")


