"""Live against simulated: percentiles, relative errors and Wasserstein distances per metric,
where a request's time goes (phases), and the targets a profile must meet."""

from __future__ import annotations


import numpy as np
import pandas as pd
import scipy.stats



METRICS = {"ttft_s": "TTFT (s)", "e2e_s": "E2E (s)", "tpot_s": "ITL, mean per request (s)",
           "output_tokens_per_s": "output tokens/s", "prompt_tokens": "prompt tokens per request",
           "cached_tokens": "cached tokens per request"}


TIMING_METRICS = ("ttft_s", "e2e_s", "tpot_s", "output_tokens_per_s")


PERCENTILES = (50, 90, 99)


TARGETS = {("ttft_s", 50): 0.10, ("ttft_s", 90): 0.15, ("e2e_s", 50): 0.10}  # |relative error| at most


PHASES = {  # where a request's time goes, from chunk rows (``phase_samples``)
    "source_first_token_s": "proposers: call sent -> first token (queue + overhead + prefill)",
    "source_decode_s": "proposers: seconds per token after the first chunk (decode at the batch they met)",
    "final_wait_s": "aggregator: request arrival -> its first call sent (waiting for proposers)",
    "final_first_token_s": "aggregator: each call sent -> its first token (its prefills)",
    "final_decode_s": "aggregator: seconds per token after each call's first chunk",
}


def compare(live: dict[str, pd.DataFrame], sim: dict[str, pd.DataFrame], run_label: str) -> pd.DataFrame:
    """One row per (policy, metric): live and simulated percentiles, relative errors,
    Wasserstein distance."""
    rows = []
    for name, sreq in sim.items():
        lreq = live[name]
        lok = lreq[lreq["outcome"] == "ok"]
        sok = sreq[sreq["outcome"] == "ok"]
        for metric in METRICS:
            rows.append(_error_row(run_label, name, metric, lok[metric].to_numpy(float), sok[metric].to_numpy(float)))
    return pd.DataFrame(rows)


def _error_row(run_label: str, policy: str, metric: str, lv: np.ndarray, sv: np.ndarray) -> dict:
    """Live vs simulated samples of one metric: percentiles, relative errors, W1."""
    lv, sv = lv[np.isfinite(lv)], sv[np.isfinite(sv)]
    row = {"run": run_label, "policy": policy, "metric": metric, "live_n": len(lv), "sim_n": len(sv)}
    for q in PERCENTILES:
        lq = float(np.percentile(lv, q)) if len(lv) else float("nan")
        sq = float(np.percentile(sv, q)) if len(sv) else float("nan")
        row[f"live_p{q}"], row[f"sim_p{q}"] = lq, sq
        row[f"rel_err_p{q}"] = (sq - lq) / lq if lq else float("nan")
    w = float(scipy.stats.wasserstein_distance(lv, sv)) if len(lv) and len(sv) else float("nan")
    row["wasserstein"] = w
    row["wasserstein_rel"] = w / float(np.mean(np.abs(lv))) if len(lv) and np.mean(np.abs(lv)) else float("nan")
    return row


def phase_samples(chunks: pd.DataFrame, requests: pd.DataFrame) -> dict[str, np.ndarray]:
    """Samples of each of ``PHASES`` from one policy's chunk and request rows (a
    ``replicate`` column, where present, keeps simulated replicates apart)."""
    keys = ["replicate", "request_id"] if "replicate" in chunks.columns else ["request_id"]
    c = chunks.sort_values([*keys, "node", "call", "chunk_index"])
    first = ~c.duplicated([*keys, "node", "call"])  # each call's first chunk
    later = c[~first]
    src = c["stage"] == 0
    fin = c["user_visible"].astype(bool)
    calls = c[first]
    arrival = requests.set_index(keys)["arrival_s"]
    final_first_call = calls[fin[first] & (calls["call"] == 0)]
    sent = final_first_call.set_index(keys)["sent_s"]
    first_token = calls["first_token_s"] - calls["sent_s"]
    per_token = (later["end_s"] - later["sent_s"]) / later["tokens"]
    return {
        "source_first_token_s": first_token[src[first]].to_numpy(float),
        "source_decode_s": per_token[src[~first]].to_numpy(float),
        "final_wait_s": (sent - arrival.reindex(sent.index)).to_numpy(float),
        "final_first_token_s": first_token[fin[first]].to_numpy(float),
        "final_decode_s": per_token[fin[~first]].to_numpy(float),
    }


def compare_phases(live_chunks: dict[str, pd.DataFrame], live_reqs: dict[str, pd.DataFrame],
                   sim: dict[str, tuple[pd.DataFrame, pd.DataFrame]], run_label: str) -> pd.DataFrame:
    """``compare``'s rows for the ``PHASES`` of every policy: where the error comes from."""
    rows = []
    for name, (sreq, schunks) in sim.items():
        lp = phase_samples(live_chunks[name], live_reqs[name])
        sp = phase_samples(schunks, sreq)
        rows += [_error_row(run_label, name, phase, lp[phase], sp[phase]) for phase in PHASES]
    return pd.DataFrame(rows)


def target_checks(table: pd.DataFrame) -> pd.DataFrame:
    """Pass/fail of the TTFT targets per run and policy."""
    rows = []
    for (metric, q), limit in TARGETS.items():
        sel = table[table["metric"] == metric]
        for _, r in sel.iterrows():
            err = r[f"rel_err_p{q}"]
            rows.append({"run": r["run"], "policy": r["policy"], "timing": r.get("timing", "calibrated"),
                         "target": f"|{metric} p{q} error| <= {limit:.0%}", "rel_err": err,
                         "pass": bool(abs(err) <= limit)})
    return pd.DataFrame(rows)


