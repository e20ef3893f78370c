"""Routers compared: TTFT p90 and cached prompt tokens per aggregator step against load,
per router, for wait-all and the staircase (prefix-cache layout, r = 2 as the name gives), simulated on
the H100 engines of the GPU kernel database (h100-moa).

The deployment: MoA with 6 proposers over three proposer pools (8B, 32B, 70B; two
replicas each) and an aggregator pool of two replicas, every pool behind the same
router. Load is a fraction of the least-loaded deployment's capacity (measured once,
wait-all in a closed loop), so every router sees the same arrivals at each load.
Writes ``routers.csv`` and ``routers.png`` to ``--out``.

    python benchmarks/bench_routers.py                          # 5 routers x 5 loads x 2 policies
    python benchmarks/bench_routers.py --requests 100 --loads 0.3,0.8 --out /tmp/routers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

POLICIES = ("wait-all", "staircase-prefix-cache")


def deployment(router: str):
    from staircase.deployment import deployment_from_dict

    pools = {name: {"model": model, "replicas": 2, "router": router}
             for name, model in (("p8", "qwen3-8b"), ("p32", "qwen3-32b-tp2"), ("p70", "llama-70b-tp4"),
                                 ("agg", "llama-70b-tp4-agg"))}
    return deployment_from_dict({"pools": pools, "slots": {"proposers": ["p8", "p32", "p70"], "aggregator": "agg"}})


def one_point(router: str, load: float, capacity: float, requests: int, seed: int) -> list[dict]:
    from staircase.sim.profile import load_profile
    from staircase.sim.simulate import simulate
    from staircase.workload import Workload
    from staircase.policies import make_policies
    from staircase.report import pool_frame
    from staircase.topology import moa

    dep, rows = deployment(router), []
    workload = Workload("poisson", requests, load * capacity, output_tokens=256)
    for policy in make_policies(list(POLICIES)):
        t = simulate(moa(6), policy, workload, load_profile("h100-moa"), seed=seed, max_tokens=512,
                     deployment=dep, progress=False)
        agg = pool_frame({policy.name: t}, dep.engine_pools()).set_index("pool").loc["agg"]
        ok = t.requests[t.requests["outcome"] == "ok"]
        rows.append({"router": router, "load": load, "policy": policy.name, "requests": len(ok),
                     "ttft_p50_s": float(ok["ttft_s"].quantile(0.5)), "ttft_p90_s": float(ok["ttft_s"].quantile(0.9)),
                     "cached_tokens_per_aggregator_step": float(agg["cached_tokens_per_final_step"]),
                     "aggregator_utilisation": float(agg["utilisation_mean"])})
    return rows


def plot(df: pd.DataFrame, path: Path) -> Path:
    from staircase.plotting import pyplot, save_figure

    plt, sns = pyplot()
    fig, axes = plt.subplots(2, len(POLICIES), figsize=(6 * len(POLICIES), 8), squeeze=False)
    for j, policy in enumerate(df["policy"].unique()):
        d = df[df["policy"] == policy]
        for i, (metric, label) in enumerate((("ttft_p90_s", "TTFT p90 (s, log)"),
                                             ("cached_tokens_per_aggregator_step", "cached tokens per aggregator step"))):
            ax = axes[i][j]
            sns.lineplot(data=d, x="load", y=metric, hue="router", style="router", markers=True, ax=ax)
            ax.set_ylabel(label)
            ax.set_xlabel("load (fraction of the least-loaded deployment's capacity)")
            if metric == "ttft_p90_s":
                ax.set_yscale("log")
                ax.set_title(policy)
    fig.suptitle("Routers compared (simulated, H100 engines (h100-moa), MoA 6 + aggregator, 2 replicas per pool)")
    return save_figure(fig, path, dpi=100)


def main() -> int:
    from staircase.sim.capacity import capacity
    from staircase.sim.profile import load_profile
    from staircase.workload import Workload
    from staircase.deployment import ROUTERS
    from staircase.machine import describe_cpu, label
    from staircase.progress import progress
    from staircase.topology import moa

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routers", default=",".join(ROUTERS), help="comma list of routers")
    ap.add_argument("--loads", default="0.2,0.4,0.6,0.8,0.95", help="comma list of loads")
    ap.add_argument("--requests", type=int, default=300, help="requests per point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/routers"))
    args = ap.parse_args()
    routers = args.routers.split(",")
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown:
        ap.error(f"--routers: got {unknown[0]!r}; allowed: {', '.join(ROUTERS)}")
    loads = [float(x) for x in args.loads.split(",")]
    started = time.perf_counter()
    cap = capacity(moa(6), load_profile("h100-moa"), Workload("poisson", args.requests, 1.0, output_tokens=256),
                   max_tokens=512, seed=args.seed, deployment=deployment("least-loaded"))
    rows, bar = [], progress(len(routers) * len(loads), "routers x loads", None)
    for router in routers:
        for load in loads:
            rows += one_point(router, load, cap, args.requests, args.seed)
            bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "routers.csv", index=False)
    plot(df, args.out / "routers.png")
    meta = {"capacity_per_s": cap, "requests": args.requests, "seed": args.seed, "machine": describe_cpu(),
            "wall_s": round(time.perf_counter() - started, 1)}
    (args.out / "routers.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\ncapacity {cap:.3g} requests/s; {meta['wall_s']} s on {label(meta['machine'])}; results: {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
