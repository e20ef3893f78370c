"""What ``staircase plan`` writes and prints: plan.json, one deployment file per policy,
frontier.csv (every simulated deployment), frontier.png (cost against SLO attainment)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from staircase.report import format_frame

from .run import PlanConfig


def write_plan(folder: Path, cfg: PlanConfig, result: dict, figure: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(result["rows"])
    paths = [folder / "plan.json", folder / "frontier.csv"]
    rows.to_csv(paths[1], index=False)
    inputs = {"topology": cfg.topology.config(), "profile": cfg.profile, "workload": cfg.workload.describe(),
              "max_tokens": cfg.max_tokens, "slos": [str(s) for s in cfg.slos], "costs": dict(cfg.costs),
              "unit": cfg.unit.to_dict(), "routers": cfg.routers, "seed": cfg.seed, "tune": cfg.tune,
              "max_engines": cfg.max_engines, "policies": [p.describe() for p in cfg.policies], "faults": cfg.faults}
    out = {k: v for k, v in result.items() if k != "rows"} | {"inputs": inputs}
    paths[0].write_text(json.dumps(out, indent=1, default=_json) + "\n")
    for name, w in result["policies"].items():
        if w["met"]:
            path = folder / f"deployment-{name}.json"
            path.write_text(json.dumps(w["deployment"], indent=1) + "\n")
            paths.append(path)
    if figure and len(rows):
        paths.append(plot(rows[rows["search"] == "size"], cfg, result, folder / "frontier.png"))
    return paths


def _json(v):
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def plot(rows: pd.DataFrame, cfg: PlanConfig, result: dict, path: Path) -> Path:
    """Cost per hour against each SLO's attainment: every simulated deployment (runs
    stopped early show the attainment they had reached, a lower bound), a step per policy
    through the best reached at or below each cost; the SLO's share dashed."""
    from staircase.plotting import pyplot, save_figure

    plt, sns = pyplot()
    fig, axes = plt.subplots(1, len(cfg.slos), figsize=(5.5 * len(cfg.slos), 4.2), squeeze=False)
    for ax, slo in zip(axes[0], cfg.slos):
        col = f"attainment {slo}"
        sns.scatterplot(data=rows, x="cost_per_hour", y=col, hue="policy", style="met", ax=ax, alpha=0.7)
        for i, (name, g) in enumerate(rows.groupby("policy", sort=False)):  # the best reached at or below each cost
            g = g.sort_values("cost_per_hour")
            ax.step(g["cost_per_hour"], g[col].cummax(), where="post", color=sns.color_palette()[i], lw=1)
        ax.axhline(slo.share, ls="--", color="grey", lw=1)
        for name, w in result["policies"].items():
            if w["met"]:
                ax.axvline(w["cost_per_hour"], ls=":", lw=1, color="black", alpha=0.4)
        ax.set(xlabel="cost per hour", ylabel=f"share of requests with {slo.family} <= {slo.bound:g} s",
               title=str(slo), ylim=(0, 1.02))
    fig.suptitle("staircase plan: SLO attainment against deployment cost (dotted: each policy's cheapest)")
    return save_figure(fig, path, dpi=120)


def table(cfg: PlanConfig, result: dict) -> str:
    """Per policy: the cheapest deployment, its cost, why (prefill, occupancy, queueing), goodput."""
    lines = [f"offered {result['offered_per_s']:.3g} requests/s; one unit ({cfg.unit.engines} engines) serves "
             f"{result['unit_capacity_per_s']:.3g}/s with wait-all; SLOs: {', '.join(map(str, cfg.slos))}", ""]
    rows, notes = [], []
    for name, w in result["policies"].items():
        if not w["met"]:
            notes.append(f"{name}: {w['why']}")
            continue
        pools = w.get("pools") or []
        rows.append({"policy": name, "engines": w["engines"], "cost/h": w["cost_per_hour"], "router": w["router"],
                     "replicas": " ".join(f"{p}={d['replicas']}" for p, d in w["deployment"]["pools"].items()),
                     **{s: w["attainment"][s] for s in w["attainment"]},
                     "prefill tok/req": w["prefilled_tokens_per_request"],
                     "util mean": _mean(pools, "utilisation_mean"), "queue wait s": _mean(pools, "queue_wait_mean_s"),
                     "goodput/s": w.get("goodput_per_s", math.nan)})
    if rows:
        lines.append(format_frame(pd.DataFrame(rows)))
    lines += notes
    if result.get("cheapest"):
        lines.append(f"\ncheapest: {result['cheapest']}" + ("; goodput measured on its deployment"
                                                             if cfg.goodput else ""))
    for name, cmd in result.get("commands", {}).items():
        lines.append(f"\n{name}:\n  {cmd['sim']}")
    return "\n".join(lines)


def _mean(pools: list[dict], key: str) -> float:
    vals = [p[key] for p in pools if p.get(key) is not None]
    return sum(vals) / len(vals) if vals else math.nan
