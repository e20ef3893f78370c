"""The calibration's figures: live against simulated CDFs, and a profile's fits against the
points they were fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .compare import METRICS, TIMING_METRICS



def plot_cdfs(live: dict[str, pd.DataFrame], sim: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """Simulated vs live CDFs: one column per policy, one row per timing metric."""
    from staircase.plotting import pyplot, save_figure

    plt, sns = pyplot()

    names = list(sim)
    fig, axes = plt.subplots(len(TIMING_METRICS), len(names), figsize=(4.2 * len(names), 2.8 * len(TIMING_METRICS)),
                             squeeze=False)
    for j, name in enumerate(names):
        data = pd.concat([live[name].loc[live[name]["outcome"] == "ok"].assign(source="live"),
                          sim[name].loc[sim[name]["outcome"] == "ok"].assign(source="simulated")], ignore_index=True)
        for i, metric in enumerate(TIMING_METRICS):
            ax = axes[i][j]
            sns.ecdfplot(data=data, x=metric, hue="source", ax=ax, hue_order=["live", "simulated"])
            ax.set_xlabel(METRICS[metric])
            if i == 0:
                ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path, dpi=100)


def plot_fit(fits, path: Path) -> Path:
    """Measured points and fitted curves: first-token wait vs uncached tokens, and
    time per decode iteration vs batch size (coloured by context)."""
    from staircase.plotting import pyplot, save_figure

    plt, sns = pyplot()

    fig, axes = plt.subplots(len(fits), 2, figsize=(11, 4 * len(fits)), squeeze=False)
    for i, (e, f) in enumerate(fits.items()):
        pp, dp = f.data["prefill_points"], f.data["decode_points"]
        ax = axes[i][0]
        ax.scatter(pp["uncached_tokens"], np.array(pp["wait_s"]) * 1e3, s=14, label="measured")
        x = np.linspace(0, max(pp["uncached_tokens"]) * 1.05, 100)
        y = f.request_overhead_s + f.prefill["base"] + f.prefill["per_token"] * x + f.prefill["per_token2"] * x * x
        ax.plot(x, y * 1e3, color="C1", label="fit")
        ax.set_xlabel("uncached prompt tokens")
        ax.set_ylabel("first-token wait (ms)")
        ax.set_title(f"{e}: prefill + overhead")
        ax.legend()
        ax = axes[i][1]
        d = pd.DataFrame(dp)
        sns.scatterplot(data=d, x="batch", y=d["per_token_s"] * 1e3, hue="context", palette="viridis", ax=ax, s=16)
        b = np.linspace(max(0.5, d["batch"].min()), d["batch"].max(), 50)
        for ctx in np.quantile(d["context"], [0.1, 0.9]):
            ax.plot(b, (f.decode["base"] + f.decode["per_seq"] * b + f.decode["per_context_token"] * ctx) * 1e3,
                    label=f"fit, context {ctx:.0f}")
        ax.set_xlabel("batch size (time-averaged)")
        ax.set_ylabel("time per decode iteration (ms)")
        ax.set_title(f"{e}: decode")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=100)


