"""A finished search as tables, the Pareto front per scenario, the best policy under
the constraints with the command lines that reproduce it, and a figure."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from .objectives import METRICS, value
from .run import SearchConfig, baseline_configs, read_evaluations


def evaluations(study, cfg: SearchConfig, folder: Path) -> pd.DataFrame:
    """One row per (candidate, scenario): the trial, the config, feasibility, metrics."""
    done = read_evaluations(folder)
    rows = []
    paper = {c.key(): name for c, name in zip(baseline_configs(cfg.space.topology), ("wait-all", "paper"))}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("key")
        if key is None:
            continue
        for s in cfg.scenarios:
            m = done.get((key, s.key()))
            if m is None or "error" in m:
                continue
            row = {"trial": t.number, "key": key, "kind": t.user_attrs["config"]["kind"],
                   "config": json.dumps(t.user_attrs["config"], sort_keys=True), "scenario": s.name,
                   "reference": paper.get(key, ""), "feasible": all(c.violation(m) <= 0 for c in cfg.constraints)}
            row |= {name: value(m, name) for name in METRICS}
            row["overloaded"] = bool(m.get("overloaded"))
            rows.append(row)
    df = pd.DataFrame(rows)
    return df.drop_duplicates(["key", "scenario"]).reset_index(drop=True) if len(df) else df


def pareto(df: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """Feasible rows no other feasible row beats on every objective, per scenario."""
    out = []
    for _, g in df[df["feasible"]].groupby("scenario", sort=False):
        signs = np.array([1.0 if METRICS[o][1] == "minimize" else -1.0 for o in objectives])
        v = g[objectives].to_numpy(float) * signs
        keep = [not np.any(np.all(v <= v[i], axis=1) & np.any(v < v[i], axis=1)) for i in range(len(v))]
        out.append(g[keep])
    return pd.concat(out, ignore_index=True) if out else df.iloc[:0]


def best(df: pd.DataFrame, metric: str) -> pd.Series | None:
    """The candidate feasible in every scenario with the best worst-case ``metric``."""
    if not len(df):
        return None
    sign = 1.0 if METRICS[metric][1] == "minimize" else -1.0
    per = df.groupby("key").agg(feasible=("feasible", "all"), n=("scenario", "nunique"),
                                worst=(metric, lambda s: (s * sign).max()))
    per = per[per["feasible"] & (per["n"] == df["scenario"].nunique())]
    if not len(per):
        return None
    key = per["worst"].idxmin()
    return df[df["key"] == key].iloc[0]


def topology_args(topo: dict) -> list[str]:
    """The command-line options that rebuild a topology (``Topology.config()``)."""
    return [f"--topology={topo['kind']}"] + [f"--{k}={v}" for k, v in topo.items() if k != "kind"]


def faults_args(faults: dict | None) -> list[str]:
    """``--faults`` for these failure rates (none: no option)."""
    return [f"--faults={','.join(f'{k}={v:g}' for k, v in faults.items())}"] if faults else []


def commands(config: dict, cfg: SearchConfig, scenario) -> dict:
    """The ``staircase sim`` and ``staircase live`` command lines that run this policy
    (beside wait-all) on the scenario's deployment and traffic."""
    policy = json.dumps(config | {"name": "search-best"}, sort_keys=True)
    topo_args = topology_args(scenario.topology)
    w = scenario.workload
    load = [f"--load={scenario.load:g}"] if scenario.load is not None else (
        [f"--rate={w['rate_per_s']:g}"] if w["kind"] in ("poisson", "gamma") else [])
    sim = (["staircase", "sim"] + ([f"--profile={scenario.profile}"] if scenario.profile else []) + topo_args
           + [f"--max-tokens={scenario.max_tokens}", f"--workload={w['kind']}", f"--requests={w['requests']}",
              f"--query-tokens={w['query_tokens']}", f"--output-tokens={w['output_tokens']}"] + load
           + [f"--seed={scenario.seed}", "--policies=wait-all", f"--policy-config={policy}"]
           + faults_args(scenario.faults))
    live = (["staircase", "live"] + topo_args + [f"--max-tokens={scenario.max_tokens}", "--policies=wait-all",
                                                 f"--policy-config={policy}"])
    return {"sim": shlex.join(sim), "live": shlex.join(live) + "  # plus your engines: --model/--url/--config"}


def plot(df: pd.DataFrame, front: pd.DataFrame, objectives: list[str], path: Path) -> Path:
    """Per scenario: every candidate on the first two objectives, the front marked."""
    from staircase.plotting import pyplot, save_figure

    plt, sns = pyplot()

    x, y = objectives[0], objectives[1] if len(objectives) > 1 else "context_p50"
    scen = list(dict.fromkeys(df["scenario"]))
    fig, axes = plt.subplots(1, len(scen), figsize=(5.5 * len(scen), 4.5), squeeze=False)
    for ax, name in zip(axes[0], scen):
        d = df[df["scenario"] == name]
        sns.scatterplot(data=d, x=x, y=y, hue="kind", style="feasible", ax=ax, s=28, alpha=0.7)
        f = front[front["scenario"] == name].sort_values(x)
        ax.plot(f[x], f[y], color="black", lw=1, marker="o", ms=4, label="Pareto front")
        for ref in ("wait-all", "paper"):
            r = d[d["reference"] == ref]
            if len(r):
                ax.annotate(ref, (r[x].iloc[0], r[y].iloc[0]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_title(name)
        if x.startswith(("ttft", "e2e", "stall")) and (d[x] > 0).all():
            ax.set_xscale("log")  # references (wait-all) sit far from the staircases
        ax.set_xlabel(f"{x}: {METRICS[x][2]}", fontsize=8)
        ax.set_ylabel(f"{y}: {METRICS[y][2]}", fontsize=8)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=100)


def write_report(study, cfg: SearchConfig, folder: Path, minimise: str, figure: bool = True) -> dict:
    """evaluations.parquet, pareto.csv, best.json (and pareto.png); returns best.json's content."""
    df = evaluations(study, cfg, folder)
    front = pareto(df, cfg.objectives) if len(df) else df
    df.to_parquet(folder / "evaluations.parquet", index=False)
    front.to_csv(folder / "pareto.csv", index=False)
    top = best(df, minimise)
    result = {"minimise": minimise, "constraints": [str(c) for c in cfg.constraints], "objectives": cfg.objectives,
              "evaluated": int(df["key"].nunique()) if len(df) else 0,
              "pareto_sizes": front.groupby("scenario").size().to_dict() if len(front) else {}}
    if top is not None:
        config = json.loads(top["config"])
        rows = df[df["key"] == top["key"]]
        refs = df[df["reference"] != ""]
        result |= {"best": config, "best_metrics": _metrics_by_scenario(rows),
                   "references": {r: _metrics_by_scenario(refs[refs["reference"] == r]) for r in ("wait-all", "paper")},
                   "commands": commands(config, cfg, cfg.scenarios[0])}
    (folder / "best.json").write_text(json.dumps(result, indent=1, default=_json) + "\n")
    if figure and len(df):
        plot(df, front, cfg.objectives, folder / "pareto.png")
    return result


def _metrics_by_scenario(rows: pd.DataFrame) -> dict:
    return {r["scenario"]: {m: (None if math.isnan(r[m]) else round(float(r[m]), 4)) for m in METRICS}
            for _, r in rows.iterrows()}


def _json(v):
    return v.item() if hasattr(v, "item") else str(v)
