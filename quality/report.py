"""Scores, the per-policy summary with bootstrap intervals, the verdict, the quality
table for the search, figures and the results folder.

Metrics (one value per answer, then a mean with a 95 % interval over prompts):

- ``exact_match`` (GSM8K): the answer's last number equals the reference's.
- ``reference_similarity`` (AlpacaEval): similarity to the reference output.
- ``agreement`` (both real sets): similarity to the reference policy's (wait-all's)
  answer to the same prompt. The noise floor is the same score of wait-all run again
  under another seed: what sampling alone does.
- ``retention:<position>`` (probe): the key is in the answer; ``false_key`` is the
  same on the control items without a key (should be 0).
- ``judge`` (optional): pairwise win rate against wait-all, 0.5 = as good.

Each (policy, metric) gets one of three findings, against the baseline (wait-all; the
noise floor for ``agreement``; 0.5 for ``judge``), with ``effect`` the drop that matters
(``--effect``, 0.1 by default):

- **drops**: the paired difference's 95 % interval (prompt by prompt) lies wholly on
  the worse side of 0;
- **holds**: the metric has *signal* (the baseline's mean is at least ``effect`` from the
  metric's worst value, so a drop of ``effect`` could show) and *power* (the interval's
  worse end is within ``effect`` of 0: a drop of ``effect`` would have been seen);
- **inconclusive**: neither: no signal (the baseline at its floor, e.g. wait-all 0.00 on
  GSM8K with a 135M model) or an interval too wide (too few items; the line says about
  how many would do).

A policy *keeps quality* when it drops nowhere and holds on at least one metric other
than a control (``false_key``, which only says that nothing is invented); the
verdict names the one that keeps it at the lowest TTFT p50, and the metrics it could
not tell.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from staircase.record import run_record, write_record
from staircase.report import _clean, summary_frame

from .data import Item
from .run import REFERENCE, Collected, QualitySpec, noise_name
from .scores import Embedder
from .sets import QUALITY_SETS, lower_is_better, replayed
from .stats import mean_interval, paired_difference

LATENCY = ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "longest_stall_p50_s", "context_tokens_p50")


def score_answers(answers: pd.DataFrame, items: Mapping[str, Item], embedder: Embedder | None) -> pd.DataFrame:
    """Long frame (policy, prompt_id, set, metric, value): every score of every answer."""
    rows = []
    ok = answers.assign(answer_text=answers["answer_text"].where(answers["outcome"] == "ok", ""))
    for r in ok.itertuples():
        item = items[r.prompt_id]
        for metric, value in QUALITY_SETS[item.set].scores(r.answer_text, item):
            rows.append((r.policy, r.prompt_id, r.set, metric, value))
    scores = pd.DataFrame(rows, columns=["policy", "prompt_id", "set", "metric", "value"])
    if embedder is not None:
        scores = pd.concat([scores, _similarities(ok, items, embedder)], ignore_index=True)
    return scores


def _similarities(ok: pd.DataFrame, items: Mapping[str, Item], embedder: Embedder) -> pd.DataFrame:
    """reference_similarity (AlpacaEval) and agreement with wait-all (real sets)."""
    real = ok[~ok["set"].map(replayed).astype(bool)]
    ref = real[real["policy"] == REFERENCE].set_index("prompt_id")["answer_text"]
    frames = []
    alpaca = real[real["set"].map(lambda s: QUALITY_SETS[s].REFERENCE_SIMILARITY).astype(bool)]
    if len(alpaca):
        sims = embedder.similarity(list(alpaca["answer_text"]), [items[p].reference for p in alpaca["prompt_id"]])
        frames.append(alpaca[["policy", "prompt_id", "set"]].assign(metric="reference_similarity", value=sims))
    others = real[(real["policy"] != REFERENCE) & real["prompt_id"].isin(ref.index)]
    if len(others):
        sims = embedder.similarity(list(others["answer_text"]), [ref[p] for p in others["prompt_id"]])
        frames.append(others[["policy", "prompt_id", "set"]].assign(metric="agreement", value=sims))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["policy", "prompt_id", "set", "metric", "value"])


def _paired(scores: pd.DataFrame, metric: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    wide = scores[scores["metric"] == metric].pivot_table(index="prompt_id", columns="policy", values="value")
    if a not in wide or b not in wide:
        return np.array([]), np.array([])
    return wide[a].to_numpy(), wide[b].to_numpy()


EFFECT = 0.1  # the drop that matters, in the metric's units (scores are in [0, 1])


def metric_rows(scores: pd.DataFrame, policy: str, noise: str, resamples: int, effect: float = EFFECT) -> list[dict]:
    """Per metric: the policy's mean and interval, its paired difference from the
    baseline (wait-all; the noise floor for agreement; 0.5 for the judge), and the
    finding (``finding``: drops, holds or inconclusive; ``why``)."""
    out = []
    for metric in sorted(scores.loc[scores["policy"] == policy, "metric"].unique()):
        values = scores.loc[(scores["policy"] == policy) & (scores["metric"] == metric), "value"]
        own = mean_interval(values, resamples)
        if metric == "judge":
            diff, base, base_mean = mean_interval(values - 0.5, resamples), "even (0.5)", 0.5
        else:
            base = noise if metric == "agreement" else REFERENCE
            diff = paired_difference(*_paired(scores, metric, policy, base), resamples) if policy != base else None
            base_values = scores.loc[(scores["policy"] == base) & (scores["metric"] == metric), "value"]
            base_mean = float(base_values.mean()) if len(base_values) else math.nan
        sets = scores.loc[scores["metric"] == metric, "set"].unique()
        row = {"policy": policy, "metric": metric, "mean": own.mean, "low": own.low, "high": own.high, "n": own.n,
               "baseline": base, "baseline_mean": base_mean, "replayed": any(replayed(s) for s in sets)}
        if diff is not None:
            row.update(diff_mean=diff.mean, diff_low=diff.low, diff_high=diff.high)
            row.update(finding(metric, base_mean, diff, effect))
            row["drop"] = row["finding"] == "drops"
        out.append(row)
    return out


def finding(metric: str, base_mean: float, diff, effect: float) -> dict:
    """drops / holds / inconclusive for one paired difference (the module's rules)."""
    worse = 1.0 if lower_is_better(metric) else -1.0  # the sign of a worse score
    worst = 1.0 if lower_is_better(metric) else 0.0
    worse_end = diff.high if worse > 0 else diff.low  # the interval's end on the worse side
    if diff.n > 1 and (diff.low > 0 if worse > 0 else diff.high < 0):
        return {"finding": "drops",
                "why": f"paired interval [{diff.low:.2f}, {diff.high:.2f}] on the worse side of 0"}
    if math.isnan(base_mean) or abs(base_mean - worst) < effect:
        return {"finding": "inconclusive", "why": f"no signal: the baseline scores {base_mean:.2f}, within "
                                                   f"{effect:g} of the metric's worst ({worst:g})"}
    if diff.n > 1 and abs(worse_end) <= effect + 1e-12:
        return {"finding": "holds", "why": f"paired interval [{diff.low:.2f}, {diff.high:.2f}] within {effect:g}"}
    half = max(abs(diff.high - diff.low) / 2, 1e-9)
    need = math.ceil(diff.n * (half / effect) ** 2) if diff.n > 1 else 0
    more = f"; about {need} items would narrow it to +-{effect:g}" if need > diff.n else ""
    return {"finding": "inconclusive", "why": f"no power: paired interval [{diff.low:.2f}, {diff.high:.2f}] "
                                               f"from {diff.n} items is wider than {effect:g}{more}"}


def summarize(collected: Collected, scores: pd.DataFrame, spec: QualitySpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-policy summary: latency and each metric's mean [interval]; long metric rows)."""
    if collected.judged is not None and len(collected.judged):
        judged = collected.judged.assign(set="judge", metric="judge", value=collected.judged["judge"])
        scores = pd.concat([scores, judged[["policy", "prompt_id", "set", "metric", "value"]]], ignore_index=True)
    names = [name for name, _ in collected.runs]
    rows = [r for name in names for r in metric_rows(scores, name, noise_name(spec), spec.resamples, spec.effect)]
    metrics = pd.DataFrame(rows)
    traces = collected.traces or collected.probe_traces  # latency of the real sets; the probe's without them
    latency = summary_frame(traces) if traces else pd.DataFrame(index=names)
    summary = latency.reindex(names)[[c for c in LATENCY if c in latency]].copy()
    for r in rows:
        summary.loc[r["policy"], r["metric"]] = r["mean"]
        summary.loc[r["policy"], f"{r['metric']}_ci"] = f"[{r['low']:.2f}, {r['high']:.2f}]" if r["n"] else "-"
    found = metrics["finding"] if "finding" in metrics else pd.Series("", index=metrics.index)
    for column, kind in (("drops", "drops"), ("holds", "holds"), ("inconclusive", "inconclusive")):
        summary[column] = [", ".join(metrics.loc[found.eq(kind) & (metrics["policy"] == n), "metric"]) for n in names]
    summary.index.name = "policy"
    return summary, metrics


def verdict(summary: pd.DataFrame, spec: QualitySpec, metrics: pd.DataFrame | None = None) -> list[str]:
    """Plain lines: per policy, where quality drops, holds, and what the run cannot tell
    (with why, from ``metrics``); then which policy keeps quality at the lowest TTFT p50."""
    lines, keepers = [], []
    why = {} if metrics is None or "why" not in metrics else {
        (r.policy, r.metric): r.why for r in metrics.itertuples() if isinstance(r.why, str)}
    for name, row in summary.iterrows():
        if name in (REFERENCE, noise_name(spec)):
            continue
        parts = [f"drops on {row['drops']}" if row["drops"] else "no drop",
                 f"holds on {row['holds']}" if row["holds"] else "holds on no metric"]
        lines.append(f"{name}: {'; '.join(parts)}")
        lines += [f"  cannot tell {m}: {why.get((name, m), 'inconclusive')}"
                  for m in row["inconclusive"].split(", ") if m]
        scored = [m for m in row["holds"].split(", ") if m and not lower_is_better(m)]  # not a control (false_key)
        if not row["drops"] and scored:
            keepers.append((row.get("ttft_p50_s", math.nan), name, row["inconclusive"]))
    keepers = [k for k in keepers if not math.isnan(k[0])] or keepers
    ref = summary.loc[REFERENCE].get("ttft_p50_s", math.nan) if REFERENCE in summary.index else math.nan
    if keepers:
        ttft, name, unknown = min(keepers)
        lines.append(f"best: {name} keeps quality (within {spec.effect:g} of wait-all where the run can tell) at the "
                     f"lowest TTFT p50 ({ttft:.3f} s; wait-all {ref:.3f} s)"
                     + (f"; not shown on {unknown}" if unknown else ""))
    else:
        lines.append("best: no policy under test is shown to keep quality: each drops somewhere or the run cannot "
                     "tell on any metric (more items, or a set with signal)")
    return lines


def quality_table(collected: Collected, metrics: pd.DataFrame, policies_by_name: Mapping) -> pd.DataFrame:
    """Per (policy, metric): the proposers' first chunk, the context the aggregator's
    first token is written from (p50 tokens, from the traces of the set the metric comes
    from), and the score with its interval: the table a policy search can constrain on."""
    context = {}
    for traces, kind in ((collected.traces, "real"), (collected.probe_traces, "probe")):
        for name, t in traces.items():
            ok = t.requests[t.requests["outcome"] == "ok"]
            context[(name, kind)] = float(ok["context_tokens"].median()) if len(ok) else math.nan
    out = metrics.copy()
    kind = np.where(out["replayed"].astype(bool), "probe", "real")
    out["context_tokens_p50"] = [context.get((p, k), math.nan) for p, k in zip(out["policy"], kind)]
    out["first_chunk"] = [_first_chunk(policies_by_name.get(p)) for p in out["policy"]]
    cols = ["policy", "first_chunk", "context_tokens_p50", "metric", "mean", "low", "high", "n", "baseline",
            "baseline_mean", "diff_mean", "diff_low", "diff_high", "drop", "finding", "why"]
    return out.reindex(columns=cols)


def _first_chunk(policy) -> float:
    schedule = getattr(policy, "proposer_schedule", None)
    return float(schedule.sizes[0]) if schedule is not None else math.nan


def summary_json(summary: pd.DataFrame, metrics: pd.DataFrame, lines: list[str]) -> dict:
    policies = {}
    for name in summary.index:
        latency = {c: _clean(summary.loc[name, c]) for c in LATENCY if c in summary}
        rows = metrics[metrics["policy"] == name].drop(columns=["policy"])
        policies[str(name)] = {**latency, "metrics": {r["metric"]: {k: _clean(v) for k, v in r.items() if k != "metric"}
                                                      for r in rows.to_dict("records")}}
    return {"policies": policies, "verdict": lines}


def write(folder: Path, collected: Collected, scores: pd.DataFrame, summary: pd.DataFrame, metrics: pd.DataFrame,
          table: pd.DataFrame, lines: list[str], config: Mapping, figure: bool = True) -> dict[str, Path]:
    """The results folder: config, every answer text, scores, summary, table, figures."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"config": folder / "config.json", "answers": folder / "answers.jsonl", "scores": folder / "scores.csv",
             "summary": folder / "summary.csv", "json": folder / "summary.json",
             "table": folder / "quality_table.csv"}
    write_record(folder, run_record("quality") | dict(config))  # (a record's head, whoever called)
    collected.answers.to_json(paths["answers"], orient="records", lines=True, force_ascii=False)
    scores.to_csv(paths["scores"], index=False)
    summary.to_csv(paths["summary"])
    paths["json"].write_text(json.dumps(summary_json(summary, metrics, lines), indent=2) + "\n")
    table.to_csv(paths["table"], index=False)
    if collected.judged is not None:
        paths["judge"] = folder / "judge.csv"
        collected.judged.to_csv(paths["judge"], index=False)
    for kind, traces in (("real", collected.traces), ("probe", collected.probe_traces)):
        for t in traces.values():
            write_trace(t, folder / "traces", kind)
    if figure:
        from .figures import plot_quality, plot_retention

        paths["figure"] = plot_quality(summary, metrics, folder / "quality_vs_latency.png")
        if "probe" in set(scores["set"]):
            paths["retention"] = plot_retention(table, folder / "retention_vs_context.png")
    return paths


def write_trace(trace, folder: Path, kind: str) -> None:
    """A run's trace: ``<policy>.requests.parquet`` (real sets) or ``<policy>.probe.requests.parquet``."""
    if kind == "real":
        trace.write(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    trace.requests.to_parquet(folder / f"{trace.policy}.probe.requests.parquet", index=False)
    if trace.chunks is not None:
        trace.chunks.to_parquet(folder / f"{trace.policy}.probe.chunks.parquet", index=False)
