"""Load as a fraction of what the deployment can serve.

``capacity``: completed requests per simulated second of a topology on a profile's
engines, measured with the reference policy (wait-all, standard MoA) in a closed loop
with enough users to keep every engine's batch full. ``at_load`` sets an open-loop
workload's arrival rate (Poisson, gamma) or the Azure trace's time scale so that
requests arrive at ``load`` x that capacity; every policy then sees the same arrivals.
``overload`` tells from a finished trace whether requests queued without bound.
``busiest`` finds the busiest window of a workload's arrivals: a trace can be at half
of capacity on average and far above it for minutes, and queues build in those minutes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from staircase.errors import ConfigError
from staircase.policies import WaitAllPolicy
from staircase.topology import Topology

from .profile import Profile
from staircase.workload import Workload, make_requests


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


def busiest(arrivals, window_s: float | None = None) -> dict:
    """The busiest window of ``arrivals`` (seconds): its start, length and arrival rate,
    beside the average rate. ``window_s`` None: a minute, or long enough to hold about
    100 arrivals at the average rate when that is longer (a shorter window of a sparse
    workload measures Poisson noise, not bursts)."""
    a = np.sort(np.asarray([x for x in arrivals if x == x], dtype=float))
    span = float(a[-1] - a[0]) if len(a) > 1 else 0.0
    average = (len(a) - 1) / span if span > 0 else math.nan
    if window_s is None:
        window_s = max(60.0, 100.0 / average) if average > 0 else 60.0
    if not span > window_s:  # the whole run fits in one window: the average is the busiest
        return {"window_s": window_s, "start_s": float(a[0]) if len(a) else math.nan,
                "average_per_s": average, "busiest_per_s": average}
    counts = np.searchsorted(a, a + window_s, side="left") - np.arange(len(a))
    counts = counts[a + window_s <= a[-1]]  # whole windows only
    i = int(np.argmax(counts))
    return {"window_s": window_s, "start_s": float(a[i]), "average_per_s": average,
            "busiest_per_s": float(counts[i] / window_s)}


def load_report(workload: Workload, load: float, capacity_per_s: float, seed: int = 0) -> dict:
    """What ``--load`` states of a workload set to ``load`` x capacity: the average and the
    busiest window's load (arrival rate / capacity)."""
    peak = busiest([r.arrival_s for r in make_requests(workload, seed)])
    return {"load": load, "capacity_per_s": capacity_per_s, "offered_per_s": peak["average_per_s"],
            "average_load": peak["average_per_s"] / capacity_per_s,
            "busiest_window_s": peak["window_s"], "busiest_start_s": peak["start_s"],
            "busiest_per_s": peak["busiest_per_s"], "busiest_load": peak["busiest_per_s"] / capacity_per_s}


def burst_warning(report: dict) -> str | None:
    """A sentence when the busiest window arrives faster than the deployment serves."""
    if not report["busiest_load"] > 1:
        return None
    return (f"bursts: load {report['average_load']:.2f} on average, but in the busiest {report['busiest_window_s']:.0f} s "
            f"(from t = {report['busiest_start_s']:.0f} s) requests arrive at {report['busiest_per_s']:.3g}/s, "
            f"{report['busiest_load']:.2f} x the measured capacity ({report['capacity_per_s']:.3g}/s): queues build "
            "there; judge the run by its SLO attainment over the whole trace, not by its average load")
