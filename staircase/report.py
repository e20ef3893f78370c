"""Summary tables, JSON and figures: one code path for simulated and live runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import pandas as pd

from .metrics import summarize
from .record import write_record
from .trace import Trace

BASELINE = "wait-all"

# (column, header, scale) for the printed table
TABLE_COLUMNS = (
    ("ttft_p50_s", "TTFT p50 s", 1.0),
    ("ttft_p90_s", "TTFT p90 s", 1.0),
    ("e2e_p50_s", "E2E p50 s", 1.0),
    ("output_tokens_per_s_p50", "out tok/s p50", 1.0),
    ("longest_stall_p50_s", "stall p50 s", 1.0),
    ("prompt_tokens_mean", "prompt tok", 1.0),
    ("cached_tokens_mean", "cached tok", 1.0),
    ("ttft_p50_reduction_vs_wait_all", "TTFT cut vs wait-all", 100.0),
    ("errors", "errors", 1.0),
)


def summary_frame(traces: Mapping[str, Trace]) -> pd.DataFrame:
    rows = {name: summarize(t.requests, t.chunks) for name, t in traces.items()}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "policy"
    if BASELINE in df.index:
        base = df.loc[BASELINE, "ttft_p50_s"]
        df["ttft_p50_reduction_vs_wait_all"] = 1.0 - df["ttft_p50_s"] / base
    else:
        df["ttft_p50_reduction_vs_wait_all"] = math.nan
    return df


def format_table(summary: pd.DataFrame) -> str:
    headers = ["policy"] + [h for _, h, _ in TABLE_COLUMNS]
    rows = []
    for name, row in summary.iterrows():
        cells = [str(name)]
        for col, header, scale in TABLE_COLUMNS:
            v = row.get(col, math.nan)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
            elif col == "ttft_p50_reduction_vs_wait_all":
                cells.append(f"{v * scale:.1f} %")
            elif col in ("errors",) or col.endswith("tokens_mean"):
                cells.append(f"{v:.0f}")
            else:
                cells.append(f"{v:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _clean(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def summary_json(summary: pd.DataFrame, config: Mapping | None = None) -> dict:
    policies = {str(name): {k: _clean(v) for k, v in row.items()} for name, row in summary.iterrows()}
    out = {"policies": policies}
    if config is not None:
        out["config"] = config
    return out


def plot_ttft(traces: Mapping[str, Trace], path: Path) -> Path:
    """ECDF of TTFT per policy (left) and TTFT distributions as boxes (right)."""
    from .plotting import pyplot, save_figure

    plt, sns = pyplot()

    frames = [t.requests.loc[t.requests["outcome"] == "ok", ["ttft_s"]].assign(policy=name)
              for name, t in traces.items()]
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["ttft_s", "policy"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(data):
        sns.ecdfplot(data=data, x="ttft_s", hue="policy", ax=axes[0])
        sns.boxplot(data=data, y="policy", x="ttft_s", hue="policy", ax=axes[1], showfliers=False, legend=False)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("time to first token (s, log scale)")
    axes[0].set_title("TTFT, cumulative distribution")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("time to first token (s, log scale)")
    axes[1].set_title("TTFT by policy")
    return save_figure(fig, path, dpi=110)


def pool_frame(traces: Mapping[str, Trace], engine_pool: Mapping[str, str]) -> pd.DataFrame:
    """One row per policy and pool: replicas, calls, the final node's steps there and
    the cached prompt tokens per step, and, where the run's meta reports its engines
    (the simulator), utilisation (busy time / run time; mean and busiest replica), queue
    wait (call sent -> admitted; mean and the worst replica's p90) and KV tokens held
    (time-averaged per replica, and the peak). ``engine_pool``: engine name -> pool."""
    rows = []
    for name, t in traces.items():
        reports, end = t.meta.get("engines") or {}, float(t.meta.get("sim_end_s") or math.nan)
        c = t.chunks if t.chunks is not None else pd.DataFrame(columns=["request_id", "node", "call", "engine"])
        first = c[~c.duplicated(["request_id", "node", "call"])] if len(c) else c  # a row per call
        for pool in dict.fromkeys(engine_pool.values()):
            engines = [e for e, p in engine_pool.items() if p == pool]
            calls = first[first["engine"].isin(engines)] if len(first) else first
            steps = calls[calls["user_visible"].astype(bool)] if len(calls) else calls
            kept = len(c) > 0  # no chunk rows kept (summary only): no call counts
            row = {"policy": name, "pool": pool, "replicas": len(engines), "calls": len(calls) if kept else math.nan,
                   "final_steps": len(steps) if kept else math.nan,
                   "cached_tokens_per_final_step": float(steps["cached_tokens"].mean()) if len(steps) else math.nan}
            reps = [reports[e] for e in engines if "busy_s" in reports.get(e, {})]
            if reps and end > 0:
                busy = [r["busy_s"] / end for r in reps]
                admitted = sum(r["admitted"] for r in reps)
                row |= {"utilisation_mean": sum(busy) / len(busy), "utilisation_max": max(busy),
                        "queue_wait_mean_s": sum(r["queue_wait_mean_s"] * r["admitted"] for r in reps) / admitted
                        if admitted else 0.0,
                        "queue_wait_p90_worst_s": max(r["queue_wait_p90_s"] for r in reps),
                        "kv_tokens_mean": sum(r["kv_token_s"] for r in reps) / end / len(reps),
                        "kv_tokens_peak": max(r["kv_peak"] for r in reps)}
            rows.append(row)
    return pd.DataFrame(rows)


def format_frame(df: pd.DataFrame) -> str:
    """A plain text table of any frame (3 significant digits)."""
    cells = [[str(c) for c in df.columns]] + [
        [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(df.columns))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def write_results(folder: Path, traces: Mapping[str, Trace], summary: pd.DataFrame, config: Mapping,
                  figure: bool = True, tables: Mapping[str, pd.DataFrame] | None = None) -> dict[str, Path]:
    """A results folder: config.json, traces/*.parquet, summary.csv, summary.json, ttft.png,
    and ``<name>.csv`` per extra table."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, df in (tables or {}).items():
        paths[key] = folder / f"{key}.csv"
        df.to_csv(paths[key], index=False)
    paths["config"] = write_record(folder, config)
    for t in traces.values():
        t.write(folder / "traces")
    paths["traces"] = folder / "traces"
    paths["summary_csv"] = folder / "summary.csv"
    summary.to_csv(paths["summary_csv"])
    paths["summary_json"] = folder / "summary.json"
    paths["summary_json"].write_text(json.dumps(summary_json(summary), indent=2) + "\n")
    if figure:
        paths["figure"] = plot_ttft(traces, folder / "ttft_by_policy.png")
    return paths

