"""The adaptive staircase policies against the paper's fixed schedule and wait-all, in
the simulator: the paper's shape (6 proposers of three sizes on the H100 (h100-moa)
profile, 512-token answers), Poisson arrivals at a fraction of wait-all's capacity and
the bundled Azure conversation trace at the same fraction, then a load sweep.

Per policy and scenario: TTFT p50/p90, E2E p50, longest stall after the first token
(p50, p90), stalls over 0.5 s per request, prompt tokens prefilled. Tables (markdown
and CSV) and the load-sweep figure go to ``--out``.

    python benchmarks/bench_adaptive.py                          # about a minute
    python benchmarks/bench_adaptive.py --requests 3000 --loads 0.1,0.3,0.5,0.7,0.9,1.0,1.1,1.2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent

from staircase.sim.capacity import at_load, capacity  # noqa: E402
from staircase.sim.profile import load_profile  # noqa: E402
from staircase.sim.simulate import simulate  # noqa: E402
from staircase.workload import Workload  # noqa: E402
from staircase.policies import LoadAwareStaircasePolicy, SmoothStaircasePolicy, StragglerStaircasePolicy  # noqa: E402
from staircase.policies import StaircasePolicy, WaitAllPolicy  # noqa: E402
from staircase.progress import progress  # noqa: E402
from staircase.topology import moa  # noqa: E402


def policies(r: int) -> list:
    return [WaitAllPolicy(), StaircasePolicy(redundancy=r, name=f"paper-r{r}"),
            SmoothStaircasePolicy(redundancy=r), StragglerStaircasePolicy(redundancy=r),
            LoadAwareStaircasePolicy(redundancy=r)]


def metrics(trace) -> dict:
    r = trace.requests
    ok = r[r["outcome"] == "ok"]
    return {"ttft_p50_s": ok["ttft_s"].median(), "ttft_p90_s": ok["ttft_s"].quantile(0.9),
            "e2e_p50_s": ok["e2e_s"].median(), "stall_p50_s": ok["longest_stall_s"].median(),
            "stall_p90_s": ok["longest_stall_s"].quantile(0.9),
            "stalls_over_0.5s_per_request": ok["stalls_over_threshold"].mean(),
            "prefilled_tokens_per_request": (r["prompt_tokens"] - r["cached_tokens"]).mean(),
            "errors": int((r["outcome"] != "ok").sum())}


def run(workloads: dict, args, bar) -> pd.DataFrame:
    profile, topo = load_profile("h100-moa"), moa(6)
    rows = []
    for label, wl in workloads.items():
        for p in policies(args.redundancy):
            t = simulate(topo, p, wl, profile, seed=args.seed, max_tokens=512, keep_chunks=False, progress=False)
            rows.append({"scenario": label, "policy": p.name} | metrics(t))
            bar.update(1)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def plot_sweep(sweep: pd.DataFrame, path: Path) -> None:
    from staircase.plotting import pyplot, save_figure

    plt, sns = pyplot()

    long = sweep.melt(id_vars=["load", "policy"], value_vars=["ttft_p50_s", "e2e_p50_s", "stall_p50_s"],
                      var_name="metric", value_name="seconds")
    g = sns.relplot(data=long, x="load", y="seconds", hue="policy", col="metric", kind="line", marker="o",
                    facet_kws={"sharey": False}, height=3.2)
    g.set(yscale="log")
    g.set_xlabels("load (fraction of wait-all's capacity)")
    g.figure.suptitle("MoA 6 proposers, H100 profile from the GPU kernel database (h100-moa), 512-token answers", y=1.03)
    save_figure(g.figure, path, dpi=120, tight_bbox=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="requests per scenario")
    ap.add_argument("--load", type=float, default=0.5, help="the Poisson and Azure scenarios' load")
    ap.add_argument("--loads", default="0.1,0.3,0.5,0.7,0.9,1.0,1.2", help="the sweep's loads")
    ap.add_argument("--redundancy", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adaptive")
    args = ap.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    base = Workload("poisson", requests=args.requests, output_tokens=512)
    cap = capacity(moa(6), load_profile("h100-moa"), base, max_tokens=512, seed=args.seed)
    azure = Workload("azure", requests=args.requests)
    azure_cap = capacity(moa(6), load_profile("h100-moa"), azure, max_tokens=512, seed=args.seed)
    print(f"wait-all capacity: {cap:.3f} requests/s (Poisson, 512-token answers), {azure_cap:.3f} (Azure lengths)")
    bar = progress(len(policies(args.redundancy)) * (2 + len(loads)), "bench-adaptive", None, unit="run")
    main_table = run({f"poisson@{args.load:g}": at_load(base, args.load, cap),
                      f"azure@{args.load:g}": at_load(azure, args.load, azure_cap)}, args, bar)
    sweep = run({load: at_load(base, load, cap) for load in loads}, args, bar).rename(columns={"scenario": "load"})
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    main_table.to_csv(args.out / "policies.csv", index=False)
    sweep.to_csv(args.out / "load_sweep.csv", index=False)
    plot_sweep(sweep, args.out / "load_sweep.png")
    for name, frame in (("policies", main_table), ("load sweep", sweep)):
        print(f"\n## {name}\n")
        print(markdown(frame))
    print(f"\nresults: {args.out}/ (policies.csv, load_sweep.csv, load_sweep.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
