"""Figures of a quality run: latency against quality per policy (one panel per metric,
a point per policy with its 95 % interval), and the probe's retention curve against the
proposer context the aggregator's first token is written from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from staircase.plotting import pyplot, save_figure

from .run import REFERENCE




def _log_x(ax) -> None:
    """A log x axis labelled 0.2, 0.5, 1, 2, 5 ... (no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_quality(summary: pd.DataFrame, metrics: pd.DataFrame, path: Path) -> Path:
    """TTFT p50 (x, log) against each metric's mean (y) with its interval."""
    plt, sns = pyplot()
    names = list(dict.fromkeys(metrics["metric"])) or ["(no scores)"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    palette = dict(zip(summary.index, sns.color_palette("tab10", len(summary.index))))
    for ax, metric in zip(axes.flat, names):
        m = metrics[metrics["metric"] == metric].set_index("policy")
        for policy, row in m.iterrows():
            x = summary.loc[policy].get("ttft_p50_s", np.nan) if policy in summary.index else np.nan
            ax.errorbar([x], [row["mean"]], yerr=[[row["mean"] - row["low"]], [row["high"] - row["mean"]]],
                        fmt="o", capsize=4, color=palette.get(policy), label=policy)
        if REFERENCE in m.index and metric != "agreement":
            ax.axhspan(m.loc[REFERENCE, "low"], m.loc[REFERENCE, "high"], color="grey", alpha=0.15)
        elif metric == "agreement" and len(m):
            noise = m["baseline"].iloc[0]
            if noise in m.index:
                ax.axhspan(m.loc[noise, "low"], m.loc[noise, "high"], color="grey", alpha=0.15)
        if metric == "exact_match" and len(m) and m["high"].max() < 0.15:
            ax.text(0.5, 0.5, "near 0 for every policy: the model is too small\nfor GSM8K; read agreement and retention",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="firebrick")
        _log_x(ax)
        ax.set_xlabel("TTFT p50 (s, log; real sets)")
        ax.set_title(metric + ("  (band: noise floor)" if metric == "agreement" else "  (band: wait-all)"))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels) or 1), frameon=False)
    return save_figure(fig, path, dpi=110, rect=(0, 0.06, 1, 1))


def plot_retention(table: pd.DataFrame, path: Path) -> Path:
    """Key retention per position against the context tokens read before the first
    aggregator token (probe traces), one line per position; wait-all reads everything."""
    plt, sns = pyplot()
    t = table[table["metric"].str.startswith("retention") | (table["metric"] == "false_key")].copy()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    if len(t):
        t["position"] = t["metric"].str.replace("retention:", "", regex=False)
        t = t.sort_values("context_tokens_p50")
        for position, g in t.groupby("position", sort=False):
            ax.errorbar(g["context_tokens_p50"], g["mean"], yerr=[g["mean"] - g["low"], g["high"] - g["mean"]],
                        marker="o", capsize=3, label=position)
        ax.legend(title="key position", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _log_x(ax)
    ax.set_xlabel("proposer tokens the aggregator read before its first token (p50, log)")
    ax.set_ylabel("answers carrying the key")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Late-key retention against the context read before answering")
    return save_figure(fig, path, dpi=110)
