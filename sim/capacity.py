"""Load as a fraction of what the deployment can serve.

``capacity``: completed requests per simulated second of a topology on a profile's
engines, measured with the reference policy (wait-all, standard MoA) in a closed loop
with enough users to keep every engine's batch full. ``at_load`` sets an open-loop
workload's arrival rate (Poisson, gamma) or the Azure trace's time scale so that
requests arrive at ``load`` x that capacity; every policy then sees the same arrivals.
``overload`` tells from a finished trace whether requests queued without bound.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from staircase.errors import ConfigError
from staircase.policies import WaitAllPolicy
from staircase.topology import Topology

from .profile import Profile
from .workload import Workload, make_requests


def capacity(topology: Topology, profile: Profile, workload: Workload, *, max_tokens: int, seed: int = 0,
             requests: int = 2000, deployment=None) -> float:
    """Requests per simulated second that wait-all completes with a closed loop of
    4 x the largest batch size users (times the most replicas of a pool, on a
    deployment), on the workload's query and answer lengths."""
    from .simulate import simulate

    replicas = max((p.replicas for p in deployment.pools.values()), default=1) if deployment else 1
    users = 4 * replicas * max(m.max_batch_size for m in profile.engines.values())
    n = max(requests, 4 * users)
    # the workload's lengths (synthetic, or the trace's), sent by a closed loop of users
    source = replace(workload, requests=n) if workload.kind == "azure" else \
        replace(workload, kind="closed", requests=n, concurrency=users)
    reqs = [replace(r, arrival_s=float("nan")) for r in make_requests(source, seed)]
    trace = simulate(topology, WaitAllPolicy(), reqs, profile, seed=seed, max_tokens=max_tokens, keep_chunks=False,
                     progress=False, concurrency=users, deployment=deployment)
    done = (trace.requests["arrival_s"] + trace.requests["e2e_s"]).sort_values().to_numpy()
    half = len(done) // 2  # the steady second half: past the start-up ramp
    return float((len(done) - half) / (done[-1] - done[half - 1]))


def at_load(workload: Workload, load: float, capacity_per_s: float) -> Workload:
    """The workload with arrivals at ``load`` x capacity (open loop only)."""
    if isinstance(load, bool) or not isinstance(load, (int, float)) or not load > 0:
        raise ConfigError("load", load, "a fraction of capacity > 0 (e.g. 0.5; above 1 overloads)")
    if workload.kind == "closed":
        raise ConfigError("load", load, "open-loop workloads (poisson, gamma, azure); a closed loop sets its own load")
    rate = load * capacity_per_s
    if workload.kind == "azure":
        reqs = make_requests(replace(workload, time_scale=1.0), 0)
        own = (len(reqs) - 1) / (reqs[-1].arrival_s - reqs[0].arrival_s)
        return replace(workload, time_scale=rate / own)
    return replace(workload, rate_per_s=rate)


def overload(requests: pd.DataFrame) -> str | None:
    """A sentence when the run's queue grew without bound (requests served more slowly
    than they arrived, and the last quarter waited far longer for a first token than
    the first quarter); None otherwise."""
    ok = requests[requests["outcome"] == "ok"].sort_values("arrival_s")
    if len(ok) < 20 or ok["arrival_s"].isna().any():
        return None
    arrive = ok["arrival_s"].to_numpy()
    ends = arrive + ok["e2e_s"].to_numpy()
    offered = (len(ok) - 1) / max(arrive[-1] - arrive[0], 1e-9)
    served = (len(ok) - 1) / max(ends.max() - arrive[0], 1e-9)
    quarter = len(ok) // 4
    ttft = ok["ttft_s"].to_numpy()
    first, last = float(np.median(ttft[:quarter])), float(np.median(ttft[-quarter:]))
    if served < 0.9 * offered and last > 2 * first:
        return (f"overloaded: requests arrived at {offered:.3g}/s and were served at {served:.3g}/s; "
                f"TTFT p50 grew from {first:.3g} s (first quarter) to {last:.3g} s (last quarter): "
                "the figures describe a growing queue (lower the rate, or use --load)")
    return None
