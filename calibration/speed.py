"""How fast a live run decoded against its profile, and the profile at that speed (a run on a
busier or slower machine than calibration's)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from staircase.sim.profile import EngineModel, Profile
from staircase.machine import label as machine_label
from staircase.errors import ConfigError
from staircase.metrics import weighted_percentile

from .runs import LiveRun, run_deployment


SPEED_TOLERANCE = 0.10  # warn when a run decodes more than 10 % off the profile


def _engine_models(run: LiveRun, profile: Profile) -> dict[str, EngineModel] | None:
    """Each engine of the run -> the profile model that predicts it: a deployment's
    replicas their pool's model; a run on one engine the aggregator's; None otherwise."""
    dep = run_deployment(run)
    if dep is not None:  # a deployment's replicas are named ``<pool>/<i>`` (``Deployment.engine_pools``)
        return {e: profile.engines[dep.pools[pool].model] for e, pool in dep.engine_pools().items()
                if dep.pools[pool].model in profile.engines}
    slot_engines = run.config.get("slot_engines") or {}
    if len(set(slot_engines.values())) > 1:
        return None
    engines = {str(e) for c in run.chunks.values() for e in c["engine"].unique()}
    return {e: profile.engine_for_slot("aggregator")[1] for e in engines}


def decode_speed(run: LiveRun, profile: Profile) -> dict | None:
    """How fast the run's engines worked compared with the profile, phase by phase: the
    tokens-weighted median of measured / profile iteration time over the run's
    prefill-free decode intervals, and the median of measured / profile first-token
    wait over the calls that had an engine to themselves (the fit's own observations,
    each engine with its own batches; NaN where the run has none). Far from 1, the
    engines or the machine ran at another speed than at calibration, and every error
    includes that drift. None for runs on several engines without a deployment, or
    with neither kind of observation."""
    from .fit import RunGroup, observations

    models = _engine_models(run, profile)
    if not models:
        return None
    ratios, weights, pre_ratios = [], [], []
    for name, chunks in run.chunks.items():
        group = [RunGroup(f"{run.folder.name}/{name}", name, chunks)]
        for engine, model in models.items():
            try:
                obs = observations(group, engine)
            except ConfigError:
                continue
            dec, pre = obs.decode, obs.prefill
            if len(dec):
                pred = (model.decode_base_s + model.decode_per_seq_s * dec["batch"].to_numpy(float)
                        + model.decode_per_context_token_s * dec["context"].to_numpy(float))
                ratios.extend(dec["per_token_s"].to_numpy(float) / pred)
                weights.extend(dec["tokens"].to_numpy(float))
            if len(pre):
                p = pre["uncached"].to_numpy(float)
                pred = model.request_overhead_s + model.prefill_s(p, p * p)
                pre_ratios.extend(pre["wait_s"].to_numpy(float) / pred)
    if not ratios and not pre_ratios:
        return None
    return {"decode_time_ratio": weighted_percentile(ratios, 50, weights) if ratios else float("nan"),
            "intervals": len(ratios),
            "prefill_time_ratio": float(np.median(pre_ratios)) if pre_ratios else float("nan"),
            "prefills": len(pre_ratios)}


def at_speed(profile: Profile, speed: dict | None) -> Profile | None:
    """The profile with every engine's decode and prefill times scaled by a run's measured
    speed (``decode_speed``): what the simulator predicts had it known the engines'
    speed in that run. None without a measured speed."""
    if speed is None:
        return None
    dec, pre = speed["decode_time_ratio"], speed["prefill_time_ratio"]
    dec, pre = (dec if dec == dec else 1.0), (pre if pre == pre else 1.0)
    scaled = {n: replace(m, decode_base_s=m.decode_base_s * dec, decode_per_seq_s=m.decode_per_seq_s * dec,
                         decode_per_context_token_s=m.decode_per_context_token_s * dec,
                         prefill_base_s=m.prefill_base_s * pre, prefill_per_token_s=m.prefill_per_token_s * pre,
                         prefill_per_token2_s=m.prefill_per_token2_s * pre,
                         prefill_per_token_cached_s=m.prefill_per_token_cached_s * pre)
              for n, m in profile.engines.items()}
    return replace(profile, name=f"{profile.name} at the run's speed", engines=scaled)


def speed_note(run: LiveRun, profile: Profile, speed: dict | None) -> str | None:
    """A warning when either phase ran more than SPEED_TOLERANCE off the profile,
    naming the CPU of each side."""
    if speed is None:
        return None
    off = [f"{phase} at {speed[k]:.2f} x the profile's time ({speed[n]} {what})"
           for phase, k, n, what in (("prefilled", "prefill_time_ratio", "prefills", "first-token waits"),
                                     ("decoded", "decode_time_ratio", "intervals", "intervals"))
           if speed[k] == speed[k] and abs(speed[k] - 1) > SPEED_TOLERANCE]
    if not off:
        return None
    return (f"live run {run.folder.name} {' and '.join(off)}, on {machine_label(run.config.get('machine'))}; profile "
            f"{profile.name} was calibrated on {machine_label(profile.machine)}: the engine or machine ran at another "
            "speed than at calibration, and the errors include that drift")


