"""Replay live runs in the simulator and measure how far simulated is from live.

A live results folder (``staircase live``) holds, per policy, every request's arrival
time and query tokens and every call's chunks. The replay gives the simulator the
same topology and policies (rebuilt from the recorded command-line arguments), the
same requests (query tokens; arrival times in an open loop, the same number of users
in a closed loop), the same answer length for every node of every request, and the
same ``max_tokens``; the engine timing comes from the profile. Several replicates
(different noise seeds) are pooled.

Per run, policy and metric the comparison gives live and simulated p50/p90/p99,
their relative errors ((sim - live) / live) and the Wasserstein distance between the
two distributions (also relative to the live mean).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from staircase.sim.profile import Profile

from .compare import compare, compare_phases, target_checks
from .figures import plot_cdfs
from .replay import replay
from .runs import LiveRun, ValidationWarning, approx_or_model_tokenizer, check_profile_model
from .speed import at_speed, decode_speed, speed_note















































def validate(runs: Sequence[LiveRun], profile: Profile, *, replicates: int = 3, seed: int = 0, tokenizer: str = "auto",
             allow_other_model: bool = False, figures_folder: Path | None = None):
    """(comparison table, target checks, notes, figure paths) over live runs. Each run is
    replayed with the profile as calibrated (``timing`` "calibrated") and, where the
    run's engine speed was measured, again with the profile at that speed (``timing``
    "at run speed"): the gap between the two is how much of the error the engines'
    drift since calibration explains."""
    tables, notes, figures = [], [], []
    for i, run in enumerate(runs):
        run_notes = check_profile_model(profile, run, allow_other_model)
        speed = decode_speed(run, profile)
        if (note := speed_note(run, profile, speed)) is not None:
            run_notes.append(note)
        for note in run_notes:
            warnings.warn(note, ValidationWarning, stacklevel=2)
            notes.append(note)
        tok = approx_or_model_tokenizer(run, tokenizer)
        sim = replay(run, profile, replicates=replicates, seed=seed, tokenizer=tok, with_chunks=True)
        sim_requests = {name: reqs for name, (reqs, _) in sim.items()}
        table = pd.concat([compare(run.requests, sim_requests, run.label),
                           compare_phases(run.chunks, run.requests, sim, run.label)], ignore_index=True)
        table["timing"] = "calibrated"
        if (fast := at_speed(profile, speed)) is not None:
            again = replay(run, fast, replicates=replicates, seed=seed, tokenizer=tok)
            table = pd.concat([table, compare(run.requests, again, run.label).assign(timing="at run speed")],
                              ignore_index=True)
        table["decode_time_ratio"] = speed["decode_time_ratio"] if speed else float("nan")
        table["prefill_time_ratio"] = speed["prefill_time_ratio"] if speed else float("nan")
        tables.append(table)
        if figures_folder is not None:
            figures_folder.mkdir(parents=True, exist_ok=True)
            figures.append(plot_cdfs(run.requests, sim_requests, figures_folder / f"cdf_{i}_{run.folder.name}.png",
                                     f"{run.label}: live vs simulated ({profile.name})"))
    table = pd.concat(tables, ignore_index=True)
    return table, target_checks(table), notes, figures
