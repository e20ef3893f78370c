"""The frontier: first-token time as a multiple of `single` (the aggregator model alone)
against each quality score, for policies that start the answer earlier and earlier.

Two halves, the same policy objects in both:

- **simulator**, the paper's shape (H100 profile from the GPU kernel database (h100-moa), 6 proposers, r = 2,
  512-token answers, Poisson 0.4/s, 300-token answers): each policy's TTFT p50 over
  `single`'s;
- **live** on the CPU engines (the bundled SmolLM2-135M as the aggregator, replayed
  proposals): `staircase quality` on the sets where the answer comes last (the GSM8K
  replay set; the late-key probe), each policy's TTFT p50 over `single`'s measured in
  the same run, and each score with its paired interval and finding (drops / holds /
  inconclusive) against wait-all.

Policies: `single`, the lead-in staircase at time budgets (`--lead-ins`, seconds: 0 =
from the query alone), the paper's staircase with first chunks 8 and 32, the TTFT-target
staircase (`--ttft-targets`), wait-all (the reference, always run). Writes frontier.csv, frontier.json, frontier.png and the quality
run's folder under --out; --report-only rebuilds them from a finished folder.

    .venv/bin/python benchmarks/frontier.py                       # about 10 min on 2 cores
    .venv/bin/python benchmarks/frontier.py --items 100 --probe-items 10 --ttft-targets 1.5,2.5,3.5
    .venv/bin/python benchmarks/frontier.py --report-only --out benchmarks/results/frontier
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent

from staircase.sim.profile import load_profile  # noqa: E402
from staircase.sim.simulate import simulate  # noqa: E402
from staircase.workload import Workload  # noqa: E402
from staircase.policies import LeadInStaircasePolicy, SinglePolicy, StaircasePolicy  # noqa: E402
from staircase.policies import TTFTTargetStaircasePolicy, WaitAllPolicy, policy_from_dict  # noqa: E402
from staircase.runconfig import parse_float_list  # noqa: E402
from staircase.policies import PAPER_AGGREGATOR_SCHEDULE, PAPER_PROPOSER_SCHEDULE  # noqa: E402
from staircase.topology import moa  # noqa: E402

METRICS = ("replay_exact_match", "retention:last", "retention:early")


def policies(lead_ins: list[float], targets: list[float], r: int) -> list:
    """The policies on the frontier, from the earliest first token to the latest (wait-all
    is the quality harness's own reference): single, lead-ins, the paper's staircase with
    first chunks 8 and 32, TTFT targets (the first step as late as the target allows)."""
    out = [SinglePolicy()]
    out += [LeadInStaircasePolicy(lead_in_s=s, redundancy=r, name=f"lead-in-{s:g}s") for s in lead_ins]
    out += [StaircasePolicy((k, *PAPER_PROPOSER_SCHEDULE[1:]), (k, *PAPER_AGGREGATOR_SCHEDULE[1:]), r, "first",
                            "prefix-cache", name=f"staircase-first{k}") for k in (8, 32)]
    out += [TTFTTargetStaircasePolicy(ttft_target_s=t, first_token_s=0.3, redundancy=r, name=f"ttft-{t:g}s")
            for t in targets]
    return out


def sim_multiples(pols: list, requests: int, seed: int) -> dict[str, float]:
    """TTFT p50 over single's in the paper-shaped scenario (r = 2 there)."""
    wl = Workload("poisson", requests=requests, rate_per_s=0.4, output_tokens=300)
    profile, topo = load_profile("h100-moa"), moa(6)
    p50 = {}
    for p in [*pols, WaitAllPolicy()]:
        config = p.config().to_dict() | ({"redundancy": 2} if "redundancy" in p.PARAMS else {})
        t = simulate(topo, policy_from_dict(config), wl, profile, seed=seed, max_tokens=512, progress=False,
                     keep_chunks=False)
        p50[p.name] = float(t.requests.loc[t.requests["outcome"] == "ok", "ttft_s"].median())
    return {name: v / p50["single"] for name, v in p50.items()}


def run_quality(pols: list, args) -> Path:
    """`staircase quality` on the replayed sets with these policies; its folder."""
    folder = args.out / "quality"
    cmd = [sys.executable, "-m", "staircase", "quality", "--sets", "gsm8k_replay,probe", "--prompts", str(args.items),
           "--probe-items", str(args.probe_items), "--positions", "early,last,absent", "--first-chunks", "",
           "--greedy", "--replay-tokens-per-s", str(args.replay_tokens_per_s), "--concurrency", "4",
           "--probe-max-tokens", str(args.answer_tokens), "--out", str(folder), "--format", "json"]
    for p in pols:
        cmd += ["--policy-config", json.dumps(p.config().to_dict())]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return folder


def frontier_table(folder: Path, sim: dict[str, float]) -> pd.DataFrame:
    """One row per (policy, metric): live TTFT p50 and its multiple of single's, the
    simulator's multiple, the score with its interval and the finding."""
    summary = json.loads((folder / "summary.json").read_text())["policies"]
    single = summary["single"]["ttft_p50_s"]
    rows = []
    for name, entry in summary.items():
        if name.startswith("wait-all-seed"):
            continue
        for metric in METRICS:
            m = entry["metrics"].get(metric)
            if m is None:
                continue
            rows.append({"policy": name, "live_ttft_p50_s": entry["ttft_p50_s"],
                         "live_multiple": entry["ttft_p50_s"] / single, "sim_multiple": sim.get(name, math.nan),
                         "metric": metric, "mean": m["mean"], "low": m["low"], "high": m["high"],
                         "finding": m.get("finding") or ("reference" if name == "wait-all" else ""),
                         "why": m.get("why") or ""})
    return pd.DataFrame(rows).sort_values(["metric", "live_multiple"]).reset_index(drop=True)


def where_quality_drops(table: pd.DataFrame) -> dict[str, dict]:
    """Per metric: the smallest live multiple at which a policy holds (nothing faster
    holds), and the fastest policy that drops."""
    out = {}
    for metric, g in table.groupby("metric"):
        holds = g[g["finding"] == "holds"]
        drops = g[g["finding"] == "drops"]
        out[metric] = {"first_holding_multiple": float(holds["live_multiple"].min()) if len(holds) else None,
                       "first_holding_policy": holds.iloc[0]["policy"] if len(holds) else None,
                       "holding_within_2x": sorted(holds.loc[holds["live_multiple"] <= 2, "policy"]),
                       "slowest_dropping_multiple": float(drops["live_multiple"].max()) if len(drops) else None}
    return out


def plot(table: pd.DataFrame, path: Path) -> Path:
    from staircase.plotting import pyplot, save_figure

    plt, _ = pyplot()

    metrics = [m for m in METRICS if m in set(table["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    colors = {"holds": "tab:green", "drops": "tab:red", "inconclusive": "tab:gray", "reference": "black"}
    for ax, metric in zip(axes[0], metrics):
        g = table[table["metric"] == metric]
        ref = g[g["policy"] == "wait-all"]
        if len(ref):
            ax.axhspan(ref["low"].iloc[0], ref["high"].iloc[0], color="black", alpha=0.08, label="wait-all 95 %")
        for _, r in g.iterrows():
            ax.errorbar(r["live_multiple"], r["mean"], yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]],
                        fmt="o", color=colors.get(r["finding"], "tab:blue"), capsize=3)
            ax.annotate(r["policy"], (r["live_multiple"], r["mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axvline(2.0, ls="--", color="tab:blue", lw=1, label="2x single")
        ax.set_xscale("log")
        ax.set(xlabel="TTFT p50 / single's (live, CPU)", ylabel=metric, ylim=(-0.05, 1.05), title=metric)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("green holds, red drops, grey cannot tell (paired 95 % vs wait-all)", fontsize=9)
    return save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "frontier", help="results folder")
    ap.add_argument("--lead-ins", default="0", help="lead-in time budgets in seconds (comma list; a budget past "
                                                   "the staircase's first step changes little: it goes then)")
    ap.add_argument("--ttft-targets", default="2,3", help="staircase-ttft targets in seconds (comma list)")
    ap.add_argument("--redundancy", type=int, default=1, help="r of the staircase policies live (the sim uses 2)")
    ap.add_argument("--items", type=int, default=40, help="GSM8K replay items")
    ap.add_argument("--probe-items", type=int, default=5, help="late-key probe items per position")
    ap.add_argument("--answer-tokens", type=int, default=32, help="the aggregator's answer cap")
    ap.add_argument("--replay-tokens-per-s", type=float, default=60.0, help="the replayed proposers' rate")
    ap.add_argument("--sim-requests", type=int, default=300, help="requests per simulated policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and figure from --out")
    args = ap.parse_args(argv)
    lead_ins, targets = (parse_float_list(text, field) if text.strip() else []
                         for text, field in ((args.lead_ins, "lead-ins"), (args.ttft_targets, "ttft-targets")))
    pols = policies(lead_ins, targets, args.redundancy)
    args.out.mkdir(parents=True, exist_ok=True)
    sim = sim_multiples(pols, args.sim_requests, args.seed)
    folder = args.out / "quality" if args.report_only else run_quality(pols, args)
    table = frontier_table(folder, sim)
    table.to_csv(args.out / "frontier.csv", index=False)
    found = where_quality_drops(table)
    (args.out / "frontier.json").write_text(json.dumps({"sim_multiples": sim, "metrics": found}, indent=2) + "\n")
    plot(table, args.out / "frontier.png")
    cols = ["policy", "metric", "sim_multiple", "live_multiple", "mean", "low", "high", "finding"]
    print(table[cols].round(3).to_string(index=False))
    print(json.dumps(found, indent=2))
    print(f"results: {args.out}/ (frontier.csv, frontier.json, frontier.png, quality/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
