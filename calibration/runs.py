"""A live run as the calibration reads it: its results folder (rows numbered per policy), the
checks that a profile fits it (the model, the machine), its deployment, and the tokenizer a
replay counts its prompts with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from staircase.sim.profile import Profile
from staircase.machine import differences as machine_differences
from staircase.machine import label as machine_label
from staircase.deployment import Deployment, deployment_from_dict
from staircase.errors import ConfigError
from staircase.record import read_record
from staircase.prompts import TokenizerCount
from staircase.trace import read_chunks, read_requests


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


