"""Simulator speed and memory: simulated requests per wall-second on one core.

MoA with 6 proposers + aggregator, continuous batching, Poisson arrivals at a fraction
(``--load``, default 0.5) of the engines' capacity, summary-only mode (no per-chunk
rows). Capacity is measured first: completed requests per simulated second in a
closed loop with many users. Each size runs in a fresh process so its peak memory
(max RSS) is its own. Each row says whether the hot path ran compiled (setup.py,
staircase/compiled.py; ``STAIRCASE_PURE=1`` times the Python source).

    python benchmarks/bench_sim.py                       # 10,000 and 100,000 requests
    python benchmarks/bench_sim.py --requests 1000,10000 --policies wait-all
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

TARGET_REQ_PER_S = 2000
TARGET_PEAK_MB = 2048


def one_run(policy_name: str, requests: int, rate: float, seed: int) -> dict:
    from staircase.sim.profile import load_profile
    from staircase.sim.simulate import simulate
    from staircase.workload import Workload
    from staircase.policies import make_policies
    from staircase.topology import moa

    policy = next(p for p in make_policies(["wait-all", "staircase"]) if p.name == policy_name)
    workload = Workload("poisson", requests=requests, rate_per_s=rate)
    started = time.perf_counter()
    # the hand-set toy profile: a speed workload only (its history of figures is on it), no GPU answer
    trace = simulate(moa(6), policy, workload, load_profile("illustrative-gpu"), seed=seed, keep_chunks=False, progress=False)
    wall = time.perf_counter() - started
    r = trace.requests
    return {"policy": policy_name, "requests": requests, "rate_per_s": rate, "wall_s": wall,
            "requests_per_wall_s": requests / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ok": int((r["outcome"] == "ok").sum()), "ttft_p50_s": float(r["ttft_s"].median()),
            "e2e_p50_s": float(r["e2e_s"].median()),
            "decode_intervals": sum(e["decode_intervals"] for e in trace.meta["engines"].values()),
            "prefills": sum(e["prefills"] for e in trace.meta["engines"].values()),
            "hot_path": _hot_path()}


def _hot_path() -> str:
    """``compiled`` when every module of the compiled hot path runs its build, else how the others run."""
    try:
        from staircase import compiled
    except ImportError:  # a checkout from before the compiled hot path
        return "python"
    hows = set(compiled.report().values())
    return "compiled" if hows == {"compiled"} else ", ".join(sorted(hows))


def capacity(policy_name: str, seed: int) -> float:
    """Completed requests per simulated second with 256 closed-loop users."""
    from staircase.sim.profile import load_profile
    from staircase.sim.simulate import simulate
    from staircase.workload import Workload
    from staircase.policies import make_policies
    from staircase.topology import moa

    policy = next(p for p in make_policies(["wait-all", "staircase"]) if p.name == policy_name)
    trace = simulate(moa(6), policy, Workload("closed", requests=3000, concurrency=256), load_profile("illustrative-gpu"),
                     seed=seed, keep_chunks=False, progress=False)
    r = trace.requests
    steady = r.sort_values("arrival_s").iloc[500:]  # skip the start-up transient
    span = (steady["arrival_s"] + steady["e2e_s"]).max() - steady["arrival_s"].min()
    return float(len(steady) / span)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", default="10000,100000", help="comma list of request counts")
    ap.add_argument("--policies", default="staircase-prefix-cache-r2,wait-all",
                    help="comma list: staircase-prefix-cache-r2, staircase-standard-r2, wait-all")
    ap.add_argument("--load", type=float, default=0.5, help="arrival rate as a fraction of capacity")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON results file (default: results/bench-sim-<ts>.json)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        policy, n, rate, seed = args.child
        print(json.dumps(one_run(policy, int(n), float(rate), int(seed))))
        return 0
    rows = []
    for policy in args.policies.split(","):
        cap = capacity(policy, args.seed)
        rate = args.load * cap
        print(f"{policy}: capacity {cap:.3f} requests/s simulated; Poisson at {rate:.3f}/s ({args.load:.0%})",
              flush=True)
        for n in [int(x) for x in args.requests.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--child", policy, str(n), repr(rate), str(args.seed)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"capacity_per_s": cap}
            rows.append(row)
            print(f"  {n:>7} requests: {row['wall_s']:7.1f} s wall, {row['requests_per_wall_s']:6.0f} req/s "
                  f"(target {TARGET_REQ_PER_S}), peak RSS {row['peak_rss_mb']:6.0f} MB (target < {TARGET_PEAK_MB}), "
                  f"TTFT p50 {row['ttft_p50_s']:.3f} s, {row['ok']} ok; hot path {row['hot_path']}", flush=True)
    for policy in args.policies.split(","):
        mine = [r for r in rows if r["policy"] == policy]
        if len(mine) >= 2:
            a, b = mine[0], mine[-1]
            print(f"{policy}: {a['requests']} -> {b['requests']} requests: wall x{b['wall_s'] / a['wall_s']:.2f} "
                  f"for x{b['requests'] / a['requests']:.0f} requests; req/s ratio {b['requests_per_wall_s'] / a['requests_per_wall_s']:.2f}; "
                  f"peak RSS ratio {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")
    path = args.out or Path("results") / f"bench-sim-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
