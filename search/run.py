"""Running a search: scenarios, evaluations into a durable store, optuna's samplers.

A candidate (a ``PolicyConfig``) is evaluated on every scenario (profile, topology,
workload at a stated load, seed): one simulation each, with the scenario's seed, so
every candidate sees the same arrivals, lengths and noise streams (common random
numbers). Each evaluation is appended to ``evaluations.jsonl`` as it finishes and is
never redone (a resumed search, or a candidate proposed twice, reads it back);
optuna's study lives in ``study.journal`` (its journal storage). Candidates are asked
in fixed-size batches and told in order, so for a seed the results are the same
whether the batch runs in one process, a process pool or on a Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from staircase.deployment import deployment_from_dict
from staircase.errors import ConfigError
from staircase.jsonio import read_jsonl
from staircase.metrics import summarize
from staircase.policies import PAPER_AGGREGATOR_SCHEDULE, PAPER_PROPOSER_SCHEDULE, PolicyConfig, config_from_dict, config_of, policy_from_dict
from staircase.progress import progress as progress_bar
from staircase.report import pool_frame
from staircase.topology import Topology, topology_from_config

from staircase.sim.capacity import at_load, capacity, overload
from staircase.sim.profile import load_profile
from staircase.sim.simulate import simulate
from staircase.workload import Workload

from .objectives import SLO, Constraint, QualityCurve, slo_watch, check_objectives, directions, value
from .space import SearchSpace

METHODS = ("nsga", "tpe", "random", "grid")


@dataclass(frozen=True)
class Scenario:
    """One deployment and its traffic: what every candidate is simulated on."""

    name: str
    profile: str | None  # bundled name or JSON path (None: the bundled default)
    topology: dict  # Topology.config()
    workload: dict  # Workload fields, the arrival rate resolved from the load
    max_tokens: int
    seed: int
    load: float | None = None
    capacity_per_s: float | None = None
    deployment: dict | None = None  # Deployment.to_dict() (None: the profile's engine sharing)
    slos: tuple[str, ...] = ()  # SLO texts whose attainment the evaluation reports (``staircase plan``)
    faults: dict | None = None  # failure rates per call (``staircase.sim.faults``: proposers, aggregator, a slot or a pool)

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k not in ("deployment", "slos", "faults") or v}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def make_scenarios(profiles, topology: Topology, workload: Workload | list[Workload], loads, *, max_tokens: int,
                   seed: int, faults: dict | None = None) -> list[Scenario]:
    """One scenario per (profile, workload, load); ``loads`` None: each workload's own rate;
    ``faults``: failure rates per call in every scenario (``staircase.sim.faults``)."""
    workloads = workload if isinstance(workload, list) else [workload]
    out = []
    for prof in profiles:
        p = load_profile(prof)
        for wl in workloads:
            cap = capacity(topology, p, wl, max_tokens=max_tokens, seed=seed) if loads else None
            for load in loads or [None]:
                w = at_load(wl, load, cap) if load is not None else wl
                name = p.name + (f"/{wl.kind}" if len(workloads) > 1 else "") + (f"@{load:g}" if load is not None else "")
                out.append(Scenario(name, prof, topology.config(), asdict(w), max_tokens, seed, load, cap,
                                    faults=dict(faults) if faults else None))
    return out


@lru_cache(maxsize=8)
def _profile(source):
    return load_profile(source)


def evaluate(config: dict, scenario: dict) -> dict:
    """One candidate on one scenario: the simulator's summary (a worker's job)."""
    started = time.perf_counter()
    topology = topology_from_config(scenario["topology"])
    profile = _profile(scenario["profile"])
    try:
        policy = policy_from_dict(config)  # a sampled candidate may break a rule across knobs (min_chunk > max_chunk)
        deployment = deployment_from_dict(scenario["deployment"], list(profile.engines)) \
            if scenario.get("deployment") else None
        workload = Workload(**scenario["workload"])
        slos = [SLO.parse(text) for text in scenario.get("slos") or ()]
        trace = simulate(topology, policy, workload, profile, seed=scenario["seed"], max_tokens=scenario["max_tokens"],
                         keep_chunks=False, progress=False, deployment=deployment, fault_rates=scenario.get("faults"),
                         watch=slo_watch(slos, workload.requests) if slos else None)
    except ConfigError as err:
        return {"error": str(err)}
    out = summarize(trace.requests)
    out["overloaded"] = overload(trace.requests) is not None
    for slo in slos:  # requests a run stopped early never finished count as misses
        out[slo.metric] = slo.attainment(trace.requests, workload.requests)
    if "stopped_s" in trace.meta:
        out |= {"stopped_s": trace.meta["stopped_s"], "unfinished": trace.meta["unfinished"]}
    if deployment is not None:
        out["pools"] = json.loads(pool_frame({"run": trace}, deployment.engine_pools()).drop(
            columns=["policy", "calls", "final_steps", "cached_tokens_per_final_step"]).to_json(orient="records"))
    out["wall_s"] = time.perf_counter() - started
    return out


# ------------------------------------------------------------------- executors
class _Serial:
    def run(self, tasks):
        for t in tasks:
            yield t, evaluate(*t[1:])

    def close(self):
        pass


class _Processes:
    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(workers)

    def run(self, tasks):
        futures = {self.pool.submit(evaluate, *t[1:]): t for t in tasks}
        for f in as_completed(futures):
            yield futures[f], f.result()

    def close(self):
        self.pool.shutdown(cancel_futures=True)


class _Ray:
    def __init__(self, address: str):
        import ray

        self.ray = ray
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self.remote = ray.remote(evaluate)

    def run(self, tasks):
        pending = {self.remote.remote(*t[1:]): t for t in tasks}
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), self.ray.get(ref)

    def close(self):
        self.ray.shutdown()


def executor(workers: int, ray_address: str | None):
    if ray_address:
        return _Ray(ray_address)
    return _Serial() if workers <= 1 else _Processes(workers)


# ---------------------------------------------------------------------- store
class Store:
    """``evaluations.jsonl``: one line per (candidate, scenario), appended as each
    evaluation finishes (flushed), read back on resume."""

    def __init__(self, folder: Path):
        self.path = folder / "evaluations.jsonl"
        self.done = read_evaluations(folder)
        self._file = self.path.open("a")

    def add(self, key: str, scenario: str, config: dict, metrics: dict) -> None:
        self.done[(key, scenario)] = metrics
        self._file.write(json.dumps({"key": key, "scenario": scenario, "config": config, "metrics": metrics},
                                    default=float) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_evaluations(folder: Path) -> dict[tuple[str, str], dict]:
    """(candidate key, scenario key) -> metrics, from a search folder's store."""
    done: dict[tuple[str, str], dict] = {}
    path = folder / "evaluations.jsonl"
    if path.exists():  # a line cut short by a kill is left out: that evaluation is simply redone
        for row in read_jsonl(path, "evaluations", skip_bad=True):
            done[(row["key"], row["scenario"])] = row["metrics"]
    return done


# ----------------------------------------------------------------------- search
@dataclass
class SearchConfig:
    space: SearchSpace
    scenarios: list[Scenario]
    objectives: list[str]
    constraints: list[Constraint] = field(default_factory=list)
    method: str = "nsga"
    budget: int = 100
    batch: int = 16
    seed: int = 0
    workers: int = 0  # 0: every core
    ray: str | None = None
    grid_points: int = 3
    baselines: bool = True  # evaluate wait-all and the paper's staircase first
    quality: QualityCurve | None = None  # measured quality against context (the ``quality`` metric)

    def check(self) -> None:
        check_objectives(self.objectives)
        if self.method not in METHODS:
            raise ConfigError("method", self.method, ", ".join(METHODS))
        for name in ("budget", "batch", "grid_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, v, "an integer >= 1")
        if not self.scenarios:
            raise ConfigError("scenarios", self.scenarios, "at least one profile and load")
        uses = "quality" in self.objectives or any(c.metric == "quality" for c in self.constraints)
        if uses and self.quality is None:
            raise ConfigError("quality-table", None, "a quality_table.csv of `staircase quality` when an objective "
                              "or constraint names quality")


def baseline_configs(topology: Topology) -> list[PolicyConfig]:
    """The references every search reports against: wait-all and the paper's staircase
    (8,128,256 / 8,128,128, r = 2 or the most the fan-in allows, prefix-cache layout)."""
    r = max(0, min(2, topology.min_fan_in - 1))
    return [config_of("wait-all"),
            config_of("staircase", proposer_schedule=PAPER_PROPOSER_SCHEDULE,
                            aggregator_schedule=PAPER_AGGREGATOR_SCHEDULE, redundancy=r, scope="first",
                            layout="prefix-cache")]


def _sampler(cfg: SearchConfig):
    import optuna

    if cfg.method == "nsga":  # constraints: Trial.set_constraint (feasible when every value <= 0)
        pop = max(8, min(50, cfg.budget // 4))
        return optuna.samplers.NSGAIISampler(population_size=pop, seed=cfg.seed)
    if cfg.method == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _references(cfg: SearchConfig) -> list[PolicyConfig]:
    """The reference candidates evaluated first (wait-all, the paper's staircase), of the kinds searched."""
    return [c for c in baseline_configs(cfg.space.topology) if c.kind in cfg.space.kinds] if cfg.baselines else []


def search_budget(cfg: SearchConfig) -> int:
    """Candidates to evaluate: ``budget``, or for a grid no more than the grid (and the
    references) holds; a grid smaller than the budget is said on stderr, not filled up
    with random candidates."""
    if cfg.method != "grid":
        return cfg.budget
    size = len(cfg.space.grid(cfg.grid_points)) + len(_references(cfg))
    if size < cfg.budget:
        print(f"search: the grid holds {size} candidates (references included), fewer than --budget "
              f"{cfg.budget}: evaluating the grid alone", file=sys.stderr)
    return min(size, cfg.budget)


def open_study(cfg: SearchConfig, folder: Path):
    """Create or resume the study in ``folder``; a resumed search marks the trials an
    interruption left running as failed (their finished evaluations are in the store)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    study = optuna.create_study(study_name="search", storage=storage, load_if_exists=True,
                                directions=directions(cfg.objectives), sampler=_sampler(cfg))
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if not trials:
        first = _references(cfg)
        for c in first:
            study.enqueue_trial({}, user_attrs={"config": c.to_dict()})
        if cfg.method == "grid":
            grid = cfg.space.grid(cfg.grid_points)
            if len(grid) + len(first) > cfg.budget:
                raise ConfigError("budget", cfg.budget, f"at least the grid's {len(grid) + len(first)} points "
                                  "(or fix knobs, narrow ranges, lower --grid-points)")
            for params in grid:
                study.enqueue_trial(params)
    return study


def identity(cfg: SearchConfig) -> dict:
    """What makes a search the same search (budget, batch and workers may change on resume)."""
    return {"space": cfg.space.describe(), "kinds": cfg.space.kinds, "scenarios": [asdict(s) for s in cfg.scenarios],
            "objectives": cfg.objectives, "constraints": [str(c) for c in cfg.constraints], "method": cfg.method,
            "seed": cfg.seed, "grid_points": cfg.grid_points, "baselines": cfg.baselines,
            **({"quality": str(cfg.quality)} if cfg.quality is not None else {})}


def _same_search(cfg: SearchConfig, folder: Path) -> None:
    """``search.json`` records the search; a folder holding another one is not resumed."""
    path = folder / "search.json"
    mine = json.loads(json.dumps(identity(cfg), default=str))
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            raise ConfigError("out", str(folder), f"a new folder, or this folder's own search settings "
                              f"(it holds a search with other {', '.join(diff)})")
    else:
        path.write_text(json.dumps(mine, indent=1) + "\n")


def _finished(study) -> int:
    import optuna

    return sum(t.state == optuna.trial.TrialState.COMPLETE or "error" in t.user_attrs
               for t in study.get_trials(deepcopy=False))


def run_search(cfg: SearchConfig, folder: Path, progress: bool | None = None):
    """Run (or resume) the search in ``folder`` until ``budget`` candidates are done;
    returns the optuna study. Every evaluation is in ``folder/evaluations.jsonl``."""
    cfg.check()
    folder.mkdir(parents=True, exist_ok=True)
    _same_search(cfg, folder)
    study = open_study(cfg, folder)
    store = Store(folder)
    ex = executor(cfg.workers or os.cpu_count() or 1, cfg.ray)
    done = _finished(study)
    budget = search_budget(cfg)
    bar = progress_bar(budget, "search", progress, unit="policy")
    bar.update(min(done, budget))
    try:
        while done < budget:
            n = min(cfg.batch, budget - done)
            trials = [study.ask() for _ in range(n)]
            configs = [_candidate(cfg.space, t) for t in trials]
            _evaluate_batch(ex, store, configs, cfg.scenarios, cfg.quality)
            for trial, c in zip(trials, configs):
                _tell(study, trial, c, cfg, store)
            done += n
            bar.update(n)
    finally:
        bar.close()
        ex.close()
        store.close()
    return study


def _candidate(space: SearchSpace, trial) -> PolicyConfig:
    given = trial.user_attrs.get("config")
    config = config_from_dict(given) if given else space.suggest(trial)
    trial.set_user_attr("config", config.to_dict())
    trial.set_user_attr("key", config.key())
    return config


def _evaluate_batch(ex, store: Store, configs: list[PolicyConfig], scenarios: list[Scenario],
                    quality: QualityCurve | None = None) -> None:
    seen, tasks = set(), []
    for c in configs:
        for s in scenarios:
            k = (c.key(), s.key())
            if k not in store.done and k not in seen:
                seen.add(k)
                tasks.append((k, c.to_dict(), asdict(s)))
    for (k, config, _), metrics in ex.run(tasks):
        store.add(k[0], k[1], config, quality.augment(metrics) if quality is not None and "error" not in metrics
                  else metrics)


def _tell(study, trial, config: PolicyConfig, cfg: SearchConfig, store: Store) -> None:
    import optuna

    per = [store.done[(config.key(), s.key())] for s in cfg.scenarios]
    errors = [m["error"] for m in per if "error" in m]
    if errors:
        trial.set_user_attr("error", errors[0])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    values = []
    for name, direction in zip(cfg.objectives, directions(cfg.objectives)):  # the worst over scenarios
        vs = [value(m, name) for m in per]
        vs = [v if not math.isnan(v) else (math.inf if direction == "minimize" else -math.inf) for v in vs]
        values.append(max(vs) if direction == "minimize" else min(vs))
    for c in cfg.constraints:  # met when <= 0, in every scenario
        worst = max(c.violation(m) for m in per)
        trial.set_constraint(str(c), worst if math.isfinite(worst) else 1e300)
    study.tell(trial, values)
