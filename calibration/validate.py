"""Replay live runs in the simulator and measure how far simulated is from live.

A live results folder (``staircase live``) holds, per policy, every request's arrival
time and query tokens and every call's chunks. The replay gives the simulator the
same topology and policies (rebuilt from the recorded command-line arguments), the
same requests (query tokens; arrival times in an open loop, the same number of users
in a closed loop), the same answer length for every node of every request, and the
same ``max_tokens``; the engine timing comes from the profile. Several replicates
(different noise seeds) are pooled.

Per run, policy and metric the comparison gives live and simulated p50/p90/p99,
their relative errors ((sim - live) / live) and the Wasserstein distance between the
two distributions (also relative to the live mean).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.stats

from staircase.sim.profile import EngineModel, Profile
from staircase.sim.simulate import simulate
from staircase.sim.workload import Request
from staircase.machine import differences as machine_differences
from staircase.machine import label as machine_label
from staircase.deployment import Deployment, deployment_from_dict
from staircase.errors import ConfigError
from staircase.record import read_record, topology_and_policies
from staircase.metrics import weighted_percentile
from staircase.prompts import TokenizerCount
from staircase.trace import read_chunks, read_requests

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
SPEED_TOLERANCE = 0.10  # warn when a run decodes more than 10 % off the profile


class ValidationWarning(UserWarning):
    pass


@dataclass
class LiveRun:
    folder: Path
    config: dict
    requests: dict[str, pd.DataFrame]  # policy -> request rows
    chunks: dict[str, pd.DataFrame]

    @property
    def label(self) -> str:
        c = self.config
        load = f"rate {c['rate']:g}/s" if c.get("rate") else f"concurrency {c.get('concurrency', 1)}"
        prompts = c.get("prompts", "?")
        if c.get("skip"):
            prompts += f" #{c['skip']}-{c['skip'] + c.get('requests', 0) - 1}"
        return f"{self.folder.name} ({prompts}, {load})"


def load_live_run(folder: Path | str) -> LiveRun:
    folder = Path(folder)
    config = read_record(folder, "live run", ("live", "serve"))
    if "topology_config" not in config and "cli_args" not in config:
        raise ConfigError(f"{folder / 'config.json'}.topology_config", None,
                          "the recorded topology and policies (runs of this version)")
    requests, chunks = {}, {}
    for f in sorted((folder / "traces").glob("*.requests.parquet")):  # a server's parts join per policy
        req = read_requests(f)
        ch_path = f.with_name(f.name.replace(".requests.", ".chunks."))
        if not ch_path.is_file():
            raise ConfigError("trace", str(ch_path), "the chunk trace next to each request trace")
        if not len(req):
            continue
        name = str(req["policy"].iloc[0])
        requests.setdefault(name, []).append(req)
        chunks.setdefault(name, []).append(read_chunks(ch_path))
    if not requests:
        raise ConfigError("live run", str(folder), "a results folder with traces/*.requests.parquet")
    for name in list(requests):
        requests[name], chunks[name] = _numbered(pd.concat(requests[name], ignore_index=True),
                                                 pd.concat(chunks[name], ignore_index=True))
    return LiveRun(folder, config, requests, chunks)


def _numbered(req: pd.DataFrame, chunks: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One policy's rows with its requests numbered 0, 1, ... in the order of their ids (a
    server numbers requests across its policies); rows already so numbered are kept."""
    req = req.sort_values("request_id", kind="stable").reset_index(drop=True)
    ids = req["request_id"].to_numpy()
    if req["request_id"].duplicated().any() or (ids == np.arange(len(ids))).all():
        return req, chunks  # (duplicates: the replay's own check names them)
    new = pd.Series(np.arange(len(ids)), index=ids)
    chunks = chunks[chunks["request_id"].isin(new.index)]
    return (req.assign(request_id=np.arange(len(ids))),
            chunks.assign(request_id=new.loc[chunks["request_id"].to_numpy()].to_numpy()))


def check_profile_model(profile: Profile, run: LiveRun, allow_other_model: bool = False) -> list[str]:
    """The profile must describe the model(s) the live run used. Raises (or warns, with
    ``allow_other_model``); returns warnings about weaker problems."""
    notes = []
    if not profile.calibrated:
        notes.append(f"profile {profile.name} is not calibrated: expect large errors")
    live_models = sorted(set((run.config.get("engine_models") or {}).values()))
    prof_models = sorted({str(e.get("model")) for e in profile.raw.get("engines", {}).values() if e.get("model")})
    if not live_models:
        notes.append(f"live run {run.folder.name} records no engine models: cannot check the profile's model")
    elif not prof_models:
        notes.append(f"profile {profile.name} records no model: cannot check it fits {', '.join(live_models)}")
    elif set(live_models) - set(prof_models):
        msg = (f"profile {profile.name} was fitted on {', '.join(prof_models)}, the live run "
               f"{run.folder.name} used {', '.join(live_models)}")
        if not allow_other_model:
            raise ConfigError("profile", msg, "a profile calibrated on the run's model (or --allow-other-model)")
        notes.append(msg)
    slot_engines = run.config.get("slot_engines") or {}
    live_sharing = "one" if len(set(slot_engines.values())) == 1 else "per-slot"
    if slot_engines and live_sharing != profile.engine_sharing and not run.config.get("deployment"):
        notes.append(f"live run used engine sharing {live_sharing!r}, profile says {profile.engine_sharing!r}")
    return notes + check_machine(profile, run)


def check_machine(profile: Profile, run: LiveRun) -> list[str]:
    """Warnings when the live run's machine or engine dtype differs from the profile's
    (a profile predicts the machine it was calibrated on)."""
    notes = []
    diffs = machine_differences(profile.machine, run.config.get("machine"))
    if diffs:
        notes.append(f"live run {run.folder.name} ran on {machine_label(run.config.get('machine'))}, profile "
                     f"{profile.name} was calibrated on {machine_label(profile.machine)} ({'; '.join(diffs)}): "
                     "the errors include the machine's difference; calibrate on this machine")
    dtypes = lambda rec: sorted({s.get("dtype") for s in (rec.get("engine_settings") or {}).values()} - {None})
    live_dt, prof_dt = dtypes(run.config), dtypes(profile.raw)
    if live_dt and prof_dt and live_dt != prof_dt:
        notes.append(f"live run {run.folder.name} ran engines in {', '.join(live_dt)}, profile {profile.name} was "
                     f"calibrated in {', '.join(prof_dt)}")
    return notes


def run_deployment(run: LiveRun) -> Deployment | None:
    """The deployment a run recorded (``staircase live --deployment``), else None."""
    raw = run.config.get("deployment")
    return deployment_from_dict(raw) if raw else None


def _engine_models(run: LiveRun, profile: Profile) -> dict[str, EngineModel] | None:
    """Each engine of the run -> the profile model that predicts it: a deployment's
    replicas their pool's model; a run on one engine the aggregator's; None otherwise."""
    dep = run_deployment(run)
    if dep is not None:  # a deployment's replicas are named ``<pool>/<i>`` (``Deployment.engine_pools``)
        return {e: profile.engines[dep.pools[pool].model] for e, pool in dep.engine_pools().items()
                if dep.pools[pool].model in profile.engines}
    slot_engines = run.config.get("slot_engines") or {}
    if len(set(slot_engines.values())) > 1:
        return None
    engines = {str(e) for c in run.chunks.values() for e in c["engine"].unique()}
    return {e: profile.engine_for_slot("aggregator")[1] for e in engines}


def decode_speed(run: LiveRun, profile: Profile) -> dict | None:
    """How fast the run's engines worked compared with the profile, phase by phase: the
    tokens-weighted median of measured / profile iteration time over the run's
    prefill-free decode intervals, and the median of measured / profile first-token
    wait over the calls that had an engine to themselves (the fit's own observations,
    each engine with its own batches; NaN where the run has none). Far from 1, the
    engines or the machine ran at another speed than at calibration, and every error
    includes that drift. None for runs on several engines without a deployment, or
    with neither kind of observation."""
    from .fit import RunGroup, observations

    models = _engine_models(run, profile)
    if not models:
        return None
    ratios, weights, pre_ratios = [], [], []
    for name, chunks in run.chunks.items():
        group = [RunGroup(f"{run.folder.name}/{name}", name, chunks)]
        for engine, model in models.items():
            try:
                obs = observations(group, engine)
            except ConfigError:
                continue
            dec, pre = obs.decode, obs.prefill
            if len(dec):
                pred = (model.decode_base_s + model.decode_per_seq_s * dec["batch"].to_numpy(float)
                        + model.decode_per_context_token_s * dec["context"].to_numpy(float))
                ratios.extend(dec["per_token_s"].to_numpy(float) / pred)
                weights.extend(dec["tokens"].to_numpy(float))
            if len(pre):
                p = pre["uncached"].to_numpy(float)
                pred = model.request_overhead_s + model.prefill_s(p, p * p)
                pre_ratios.extend(pre["wait_s"].to_numpy(float) / pred)
    if not ratios and not pre_ratios:
        return None
    return {"decode_time_ratio": weighted_percentile(ratios, 50, weights) if ratios else float("nan"),
            "intervals": len(ratios),
            "prefill_time_ratio": float(np.median(pre_ratios)) if pre_ratios else float("nan"),
            "prefills": len(pre_ratios)}


def at_speed(profile: Profile, speed: dict | None) -> Profile | None:
    """The profile with every engine's decode and prefill times scaled by a run's measured
    speed (``decode_speed``): what the simulator predicts had it known the engines'
    speed in that run. None without a measured speed."""
    if speed is None:
        return None
    dec, pre = speed["decode_time_ratio"], speed["prefill_time_ratio"]
    dec, pre = (dec if dec == dec else 1.0), (pre if pre == pre else 1.0)
    scaled = {n: replace(m, decode_base_s=m.decode_base_s * dec, decode_per_seq_s=m.decode_per_seq_s * dec,
                         decode_per_context_token_s=m.decode_per_context_token_s * dec,
                         prefill_base_s=m.prefill_base_s * pre, prefill_per_token_s=m.prefill_per_token_s * pre,
                         prefill_per_token2_s=m.prefill_per_token2_s * pre,
                         prefill_per_token_cached_s=m.prefill_per_token_cached_s * pre)
              for n, m in profile.engines.items()}
    return replace(profile, name=f"{profile.name} at the run's speed", engines=scaled)


def speed_note(run: LiveRun, profile: Profile, speed: dict | None) -> str | None:
    """A warning when either phase ran more than SPEED_TOLERANCE off the profile,
    naming the CPU of each side."""
    if speed is None:
        return None
    off = [f"{phase} at {speed[k]:.2f} x the profile's time ({speed[n]} {what})"
           for phase, k, n, what in (("prefilled", "prefill_time_ratio", "prefills", "first-token waits"),
                                     ("decoded", "decode_time_ratio", "intervals", "intervals"))
           if speed[k] == speed[k] and abs(speed[k] - 1) > SPEED_TOLERANCE]
    if not off:
        return None
    return (f"live run {run.folder.name} {' and '.join(off)}, on {machine_label(run.config.get('machine'))}; profile "
            f"{profile.name} was calibrated on {machine_label(profile.machine)}: the engine or machine ran at another "
            "speed than at calibration, and the errors include that drift")


def run_topology_and_policies(cfg: dict):
    """The topology and policies a run recorded (``staircase.record.topology_and_policies``)."""
    return topology_and_policies(cfg)


def replay(run: LiveRun, profile: Profile, *, replicates: int = 3, seed: int = 0, tokenizer=None,
           policies: Sequence[str] | None = None, with_chunks: bool = False):
    """Simulated request rows per policy (replicates stacked, column ``replicate``);
    with ``with_chunks=True`` (request rows, chunk rows) per policy, for diagnosis."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ConfigError("replicates", replicates, "an integer >= 1")
    cfg = run.config
    topology, built = run_topology_and_policies(cfg)
    by_name = {p.name: p for p in built}
    concurrency = None if cfg.get("rate") else int(cfg.get("concurrency") or 1)
    deployment = run_deployment(run)  # the run's pools and routers, simulated alike
    out = {}
    for name, req in run.requests.items():
        if policies is not None and name not in policies:
            continue
        if name not in by_name:
            raise ConfigError("policy", name, f"a policy the recorded arguments build: {', '.join(by_name)}")
        requests, lengths = _replayed_requests(run, name, req, topology, concurrency)
        frames = []
        for k in range(replicates):
            t = simulate(topology, by_name[name], requests, profile, seed=seed + k, max_tokens=int(cfg["max_tokens"]),
                         concurrency=concurrency, node_lengths=lengths, tokenizer=tokenizer, keep_chunks=with_chunks,
                         progress=False, deployment=deployment)
            frames.append((t.requests.assign(replicate=k), t.chunks.assign(replicate=k) if with_chunks else None))
        reqs = pd.concat([f[0] for f in frames], ignore_index=True)
        out[name] = (reqs, pd.concat([f[1] for f in frames], ignore_index=True)) if with_chunks else reqs
    return out


def _replayed_requests(run: LiveRun, name: str, req: pd.DataFrame, topology, concurrency: int | None):
    """(requests, node -> answer length per request) of one policy's live rows: the
    recorded arrivals (open loop) and query tokens, and each node's recorded tokens."""
    req = req.sort_values("request_id").reset_index(drop=True)
    n = len(req)
    if list(req["request_id"]) != list(range(n)):
        raise ConfigError(f"{run.folder.name}/{name} request ids", list(req["request_id"])[:5],
                          "0, 1, ... (one row per request)")
    tokens = run.chunks[name].groupby(["node", "request_id"])["tokens"].sum()
    lengths = {}
    for node in topology.nodes:
        per = np.ones(n, dtype=np.int64)
        if node.id in tokens.index.get_level_values(0):
            got = tokens.loc[node.id]
            per[got.index.to_numpy()] = got.to_numpy()
        if node.is_final:
            per = np.maximum(per, req["output_tokens"].to_numpy())
        lengths[node.id] = per
    arrivals = req["arrival_s"].to_numpy(float) - float(req["arrival_s"].min())
    requests = [Request(i, float(arrivals[i]) if concurrency is None else float("nan"),
                        int(req["query_tokens"][i]), int(lengths[topology.final.id][i])) for i in range(n)]
    return requests, lengths


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


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def approx_or_model_tokenizer(run: LiveRun, choice: str = "auto"):
    """The tokenizer the simulator counts fixed prompt texts with: ``approx``, a model
    folder, or ``auto`` (the run's model folder in the staircase cache if present)."""
    if choice == "approx":
        return None
    folder = None
    if choice == "auto":
        from staircase.live.model import cache_root

        for model in (run.config.get("engine_models") or {}).values():
            cand = cache_root() / "models" / model
            if _has_tokenizer(cand):
                folder = cand
                break
        if folder is None:
            return None
    else:
        folder = Path(choice)
        if not _has_tokenizer(folder):
            raise ConfigError("tokenizer", choice, "auto, approx or a model folder with a tokenizer")
    from transformers import AutoTokenizer

    try:
        return TokenizerCount(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError, KeyError, TypeError) as err:  # a folder whose tokenizer files do not load
        raise ConfigError("tokenizer", choice, f"a model folder whose tokenizer loads ({type(err).__name__})") from None


def validate(runs: Sequence[LiveRun], profile: Profile, *, replicates: int = 3, seed: int = 0, tokenizer: str = "auto",
             allow_other_model: bool = False, figures_folder: Path | None = None):
    """(comparison table, target checks, notes, figure paths) over live runs. Each run is
    replayed with the profile as calibrated (``timing`` "calibrated") and, where the
    run's engine speed was measured, again with the profile at that speed (``timing``
    "at run speed"): the gap between the two is how much of the error the engines'
    drift since calibration explains."""
    tables, notes, figures = [], [], []
    for i, run in enumerate(runs):
        run_notes = check_profile_model(profile, run, allow_other_model)
        speed = decode_speed(run, profile)
        if (note := speed_note(run, profile, speed)) is not None:
            run_notes.append(note)
        for note in run_notes:
            warnings.warn(note, ValidationWarning, stacklevel=2)
            notes.append(note)
        tok = approx_or_model_tokenizer(run, tokenizer)
        sim = replay(run, profile, replicates=replicates, seed=seed, tokenizer=tok, with_chunks=True)
        sim_requests = {name: reqs for name, (reqs, _) in sim.items()}
        table = pd.concat([compare(run.requests, sim_requests, run.label),
                           compare_phases(run.chunks, run.requests, sim, run.label)], ignore_index=True)
        table["timing"] = "calibrated"
        if (fast := at_speed(profile, speed)) is not None:
            again = replay(run, fast, replicates=replicates, seed=seed, tokenizer=tok)
            table = pd.concat([table, compare(run.requests, again, run.label).assign(timing="at run speed")],
                              ignore_index=True)
        table["decode_time_ratio"] = speed["decode_time_ratio"] if speed else float("nan")
        table["prefill_time_ratio"] = speed["prefill_time_ratio"] if speed else float("nan")
        tables.append(table)
        if figures_folder is not None:
            figures_folder.mkdir(parents=True, exist_ok=True)
            figures.append(plot_cdfs(run.requests, sim_requests, figures_folder / f"cdf_{i}_{run.folder.name}.png",
                                     f"{run.label}: live vs simulated ({profile.name})"))
    table = pd.concat(tables, ignore_index=True)
    return table, target_checks(table), notes, figures
