"""Capacity planning: per policy, the cheapest deployment whose simulated run of the
whole workload meets every SLO.

A plan starts from a *unit*: one copy of the deployment (by default one pool per
engine model of the profile, as many replicas as slots use it; or a deployment file).
For each policy and router it

1. measures what one unit serves (wait-all's closed-loop capacity, ``staircase.sim.capacity``)
   and starts at the number of units the workload's average rate needs;
2. finds the fewest whole units that meet the SLOs (galloping up or down from there
   and bisecting the last step), simulating the whole workload at its own arrival times each time
   (SLO attainment over every request, so bursts count: never the average load);
3. trims each pool on its own, dearest model first (galloping down its replicas with
   the others held), in passes until no pool can give up one replica, since a policy
   may need more of one model and less of another.

A size is met when any of the policy's candidates meets every SLO: the policy as
named, and with ``tune`` > 0 the best of a search of its kind's knobs (``run_search``,
NSGA-II with the SLOs as constraints) at the starting size. Every simulation is a
``staircase.search.run.evaluate`` of a ``Scenario`` (the deployment and the SLOs in it), kept in
the plan folder's ``evaluations.jsonl`` (a rerun of the same plan reads them back) and
run on the search's executors (processes or Ray). All policies' searches advance in
lockstep, one batch per step, so the answer does not depend on where a batch runs.
Then, on the cheapest deployment found, each policy's goodput: the highest arrival
rate (the workload's own arrivals compressed or stretched) that still meets the SLOs.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Generator, Mapping

from staircase.deployment import ROUTERS, Deployment, deployment_from_dict
from staircase.errors import ConfigError
from staircase.policies import Policy, PolicyConfig
from staircase.progress import progress as progress_bar
from staircase.topology import Topology

from staircase.sim.capacity import busiest, capacity
from staircase.sim.profile import Profile, load_profile
from staircase.workload import Workload, make_requests

from staircase.search.objectives import SLO
from staircase.search.run import Scenario, SearchConfig, Store, executor, read_evaluations, run_search
from staircase.search.space import SearchSpace

Counts = dict  # pool name -> replicas
Point = object  # what a job asks to have evaluated next (replica counts, or a rate multiplier)


@dataclass
class PlanConfig:
    topology: Topology
    profile: str | None
    workload: Workload
    max_tokens: int
    slos: list[SLO]
    policies: list[Policy]  # the policies compared, by name (each a job of its own)
    unit: Deployment  # one copy of the deployment; replicas scale in whole copies, then per pool
    costs: Mapping[str, float]  # engine model -> cost per engine-hour
    routers: list[str] = field(default_factory=lambda: ["affinity"])
    seed: int = 0
    tune: int = 0  # candidates of each policy's kind searched at the starting size (0: as named)
    max_engines: int = 512
    goodput: bool = True
    workers: int = 0
    ray: str | None = None
    faults: dict | None = None  # failure rates per call (``staircase.sim.faults``), in every simulation of the plan

    def check(self) -> None:
        if not self.slos:
            raise ConfigError("slo", None, "at least one SLO, e.g. ttft_p90<=2")
        if not self.policies:
            raise ConfigError("policies", "", "at least one policy")
        for r in self.routers:
            if r not in ROUTERS and r != "unit":
                raise ConfigError("routers", r, "unit (the unit's own routers), " + ", ".join(ROUTERS))
        models = {p.model for p in self.unit.pools.values()}
        for m, c in self.costs.items():
            if m not in models:
                raise ConfigError("cost", m, "an engine model of the deployment: " + ", ".join(sorted(models)))
            if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
                raise ConfigError(f"cost.{m}", c, "a cost per engine-hour >= 0")
        for name in ("tune", "max_engines"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "tune" else 1):
                raise ConfigError(name.replace("_", "-"), v, "an integer >= " + ("0" if name == "tune" else "1"))
        if self.unit.engines > self.max_engines:
            raise ConfigError("max-engines", self.max_engines, f"at least one unit ({self.unit.engines} engines)")

    def cost(self, deployment: Deployment) -> float:
        """Cost per hour of ``deployment`` (an engine model without a stated cost: 1)."""
        return sum(p.replicas * float(self.costs.get(p.model, 1.0)) for p in deployment.pools.values())

    def dearest_first(self) -> list[str]:
        """The unit's pools, the dearest engine model first (trimmed first)."""
        pools = list(self.unit.pools.values())
        return [p.name for p in sorted(pools, key=lambda p: -float(self.costs.get(p.model, 1.0)))]


def unit_deployment(profile: Profile, topology: Topology, router: str = "affinity") -> Deployment:
    """One copy of the profile's deployment as pools: with ``engine_sharing: one`` one
    shared engine; per slot, a pool per proposer model (as many replicas as proposer
    slots run it) and the aggregator's pool."""
    if profile.engine_sharing == "one":
        return sized(Deployment.one(profile.aggregator_engine), {"shared": 1}, router)
    slots = sorted({n.slot for n in topology.nodes if n.slot != "aggregator"}, key=lambda s: int(s[9:]))
    models = list(dict.fromkeys(profile.proposer_engines))
    used = [profile.proposer_engines[int(s[9:]) % len(profile.proposer_engines)] for s in slots]
    pools = {m: {"model": m, "replicas": used.count(m), "router": router} for m in models if used.count(m)}
    pools["aggregator"] = {"model": profile.aggregator_engine, "replicas": 1, "router": router}
    return deployment_from_dict({"pools": pools, "slots": {"proposers": used, "aggregator": "aggregator"}},
                                list(profile.engines))  # proposer-i on used[i]: the profile's own mapping


def sized(unit: Deployment, counts: Counts, router: str) -> Deployment:
    """The unit with these replica counts, every pool behind ``router`` ("unit": as the unit)."""
    raw = unit.to_dict()
    for name, p in raw["pools"].items():
        p["replicas"] = int(counts[name])
        if router != "unit":
            p["router"] = router
    return deployment_from_dict(raw)


def scaled_workload(w: Workload, factor: float) -> Workload:
    """The workload's arrivals ``factor`` x as fast (the trace compressed, or the rate raised)."""
    if w.kind == "azure":
        return replace(w, time_scale=w.time_scale * factor)
    return replace(w, rate_per_s=w.rate_per_s * factor)


def offered_rate(w: Workload, seed: int) -> float:
    """The workload's average arrival rate (``staircase.sim.capacity.busiest``'s average)."""
    return busiest([r.arrival_s for r in make_requests(w, seed)])["average_per_s"]


# ----------------------------------------------------------------------- searches as generators
def size_search(unit: Deployment, start: int, max_engines: int, dearest_first: list[str]) -> Generator:
    """Yields replica counts to try and is sent whether they met the SLOs; returns the
    cheapest counts met (None: nothing up to ``max_engines``). Whole units first, from
    ``start`` units (the capacity estimate), then each pool on its own, in passes until
    no pool can give up one replica with the others as they ended; both gallop
    away from where they stand (steps 1, 2, 4, ...) and bisect the last step, since
    the answer is usually near and a deployment far too small is slow to simulate."""
    base = {p.name: p.replicas for p in unit.pools.values()}
    most = max(1, max_engines // unit.engines)
    k = yield from _gallop(lambda k: {n: r * k for n, r in base.items()}, min(max(1, start), most), 1, most)
    if k is None:
        return None
    counts, changed = {n: r * k for n, r in base.items()}, True
    while changed:  # until no pool can give up a replica with the others as they ended
        before = dict(counts)
        for pool in dearest_first:
            counts[pool] = yield from _gallop(lambda n: counts | {pool: n}, counts[pool], 1, counts[pool], known=True)
        changed = counts != before
    return counts


def _gallop(point, at: int, least: int, most: int, known: bool = False) -> Generator:
    """The smallest n in [least, most] whose ``point(n)`` is met (met is monotone in n),
    searched from ``at`` (``known``: ``at`` is met already); None when ``most`` is not met."""
    ok = known or (yield point(at))
    lo, hi, step = (None, at, 1) if ok else (at, None, 1)
    while lo is None and hi > least:  # met at hi: step down
        n = max(least, hi - step)
        lo, hi = (lo, n) if (yield point(n)) else (n, hi)
        step *= 2
    while hi is None:  # not met at lo: step up
        if lo >= most:
            return None
        n = min(most, lo + step)
        lo, hi = (lo, n) if (yield point(n)) else (n, None)
        step *= 2
    lo = least - 1 if lo is None else lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if (yield point(mid)) else (mid, hi)
    return hi


def rate_search(steps: int = 4, reach: int = 6) -> Generator:
    """Yields arrival-rate factors to try and is sent whether they met the SLOs; returns
    the highest factor met (within a factor 2^(1/2^steps)); 0.0 when none down to 2^-reach."""
    lo, hi = (1.0, None) if (yield 1.0) else (None, 1.0)
    for _ in range(reach):
        if lo is not None and hi is not None:
            break
        f = 2 * lo if hi is None else hi / 2
        lo, hi = (f, hi) if (yield f) else (lo, f)
    if lo is None or hi is None:
        return lo or 0.0
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if (yield mid) else (lo, mid)
    return lo


def lockstep(jobs: Mapping[str, Generator], judge: Callable[[dict[str, Point]], dict[str, bool]],
             bar=None) -> dict[str, object]:
    """Run generator searches together: each step, every job's next point is judged in
    one batch (``judge``: job -> point -> met?). Returns each job's result."""
    pending = {name: next(gen) for name, gen in jobs.items()}
    results: dict[str, object] = {}
    while pending:
        verdicts = judge(pending)
        nxt = {}
        for name, ok in verdicts.items():
            try:
                nxt[name] = jobs[name].send(ok)
            except StopIteration as stop:
                results[name] = stop.value
        if bar is not None:
            bar.update(len(pending))
        pending = nxt
    return results


def idle_check(c: PlanConfig, requests: int = 40) -> dict[str, str]:
    """Each policy on one idle unit (a closed loop of one user): the SLOs it misses
    even there, which no number of engines mends. All policies missing: an error."""
    from staircase.sim.simulate import simulate

    profile = load_profile(c.profile)
    sample = replace(c.workload, requests=min(requests, c.workload.requests))
    reqs = [replace(r, arrival_s=float("nan")) for r in make_requests(sample, c.seed)]
    hopeless, fastest = {}, {}
    for p in c.policies:
        t = simulate(c.topology, p, reqs, profile, seed=c.seed, max_tokens=c.max_tokens, keep_chunks=False,
                     progress=False, concurrency=1, deployment=c.unit, fault_rates=c.faults)
        missed = [s for s in c.slos if s.attainment(t.requests) < s.share]
        for s in c.slos:
            fastest[str(s)] = max(fastest.get(str(s), 0.0), s.attainment(t.requests))
        if missed:
            hopeless[p.name] = ", ".join(f"{s} (idle: {s.attainment(t.requests):.0%} of requests)" for s in missed)
    if len(hopeless) == len(c.policies):
        worst = min(c.slos, key=lambda s: fastest[str(s)] - s.share)
        raise ConfigError("slo", str(worst), f"a target some policy meets on idle engines (at best "
                          f"{fastest[str(worst)]:.0%} of requests meet it with no queue at all)")
    return hopeless



# ----------------------------------------------------------------------------- the planner
class Planner:
    """Evaluates a plan's points (policy candidates x deployments x workloads) through
    the search's store and executors, keeps a row per evaluation, and runs the searches."""

    def __init__(self, cfg: PlanConfig, folder: Path, progress: bool | None = None):
        cfg.check()
        self.cfg, self.folder, self.progress = cfg, folder, progress
        folder.mkdir(parents=True, exist_ok=True)
        self.store = Store(folder)
        self.ex = executor(cfg.workers or os.cpu_count() or 1, cfg.ray)
        self.candidates: dict[str, list[PolicyConfig]] = {p.name: [p.config()] for p in cfg.policies}
        self.rows: list[dict] = []

    def close(self) -> None:
        self.ex.close()
        self.store.close()

    def scenario(self, deployment: Deployment, factor: float = 1.0) -> Scenario:
        c = self.cfg
        w = scaled_workload(c.workload, factor)
        return Scenario(f"{deployment.engines}-engines@{factor:.4g}x", c.profile, c.topology.config(), asdict(w),
                        c.max_tokens, c.seed, deployment=deployment.to_dict(), slos=tuple(str(s) for s in c.slos),
                        faults=dict(c.faults) if c.faults else None)

    def evaluate(self, pairs: list[tuple[PolicyConfig, Scenario]]) -> list[dict]:
        """Metrics of each (candidate, scenario): read back from the store, or simulated
        (all new ones in one batch on the executor)."""
        tasks, seen = [], set()
        for config, scen in pairs:
            k = (config.key(), scen.key())
            if k not in self.store.done and k not in seen:
                seen.add(k)
                tasks.append((k, config.to_dict(), asdict(scen)))
        for (k, config, _), metrics in self.ex.run(tasks):
            self.store.add(k[0], k[1], config, metrics)
        return [self.store.done[(config.key(), scen.key())] for config, scen in pairs]

    def margin(self, metrics: dict) -> float:
        """How far the run clears its tightest SLO (share of requests; < 0: missed)."""
        if "error" in metrics:
            return -math.inf
        return min(-s.violation(metrics) for s in self.cfg.slos)

    def judge(self, pending: dict[str, Point], point_of: Callable[[str, Point], tuple[str, Scenario]],
              kind: str) -> dict[str, bool]:
        """A point is met when any of its policy's candidates meets every SLO there."""
        pairs, owners = [], []
        for job, point in pending.items():
            policy, scen = point_of(job, point)
            for config in self.candidates[policy]:
                pairs.append((config, scen))
                owners.append((job, policy, point, scen))
        verdicts = {job: False for job in pending}
        for (config, _), (job, policy, point, scen), m in zip(pairs, owners, self.evaluate(pairs)):
            margin = self.margin(m)
            verdicts[job] |= margin >= 0
            self.rows.append(self._row(kind, job, policy, point, scen, config, m, margin))
        return verdicts

    def _row(self, kind, job, policy, point, scen, config, metrics, margin) -> dict:
        d = deployment_from_dict(scen.deployment)
        row = {"search": kind, "job": job, "policy": policy, "router": job.split("@")[-1], "engines": d.engines,
               "cost_per_hour": self.cfg.cost(d), "rate_factor": point if kind == "goodput" else 1.0,
               "replicas": ",".join(f"{n}={p.replicas}" for n, p in d.pools.items()), "config": config.key(),
               "met": margin >= 0, "margin": margin, "stopped_early": "stopped_s" in metrics}
        for s in self.cfg.slos:
            row[f"attainment {s}"] = metrics.get(s.metric, math.nan)
        for k in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "prefilled_tokens_mean", "errors", "wall_s"):
            row[k] = metrics.get(k, math.nan)
        return row

    # ------------------------------------------------------------------ steps of a plan
    def start_units(self) -> tuple[int, float, float]:
        """(units the average rate needs, one unit's capacity, the offered rate)."""
        c = self.cfg
        cap = capacity(c.topology, load_profile(c.profile), c.workload, max_tokens=c.max_tokens, seed=c.seed,
                       deployment=c.unit)
        offered = offered_rate(c.workload, c.seed)
        return max(1, math.ceil(offered / cap)), cap, offered

    def tune(self, policy, start: Deployment) -> None:
        """Search the knobs of ``policy``'s kind at the starting size (SLOs as constraints)
        and add its best two feasible configs to the policy's candidates."""
        from staircase.policies import POLICY_KINDS, config_from_dict

        c = self.cfg
        if not c.tune or not POLICY_KINDS[policy.config().kind].KNOBS:
            return
        space = SearchSpace([policy.config().kind], c.topology)
        scfg = SearchConfig(space, [self.scenario(start)], ["ttft_p90", "prefilled"], list(c.slos), "nsga", c.tune,
                            min(16, c.tune), c.seed, c.workers, c.ray, baselines=False)
        folder = self.folder / "tune" / policy.name
        study = run_search(scfg, folder, progress=self.progress)
        done = read_evaluations(folder)
        found = []
        for t in study.get_trials(deepcopy=False):
            m = done.get((t.user_attrs.get("key"), scfg.scenarios[0].key()))
            if m is not None and self.margin(m) >= 0:
                found.append((self.margin(m), t.user_attrs["key"], config_from_dict(t.user_attrs["config"])))
        best = [cfg for _, _, cfg in sorted(found, key=lambda x: (-x[0], x[1]))]
        known = {x.key() for x in self.candidates[policy.name]}
        self.candidates[policy.name] += [x for x in best if x.key() not in known][:2]

    def size(self, policies: list, start: int) -> dict[str, Deployment | None]:
        """The cheapest deployment met, per (policy, router) job ``<policy>@<router>``."""
        c = self.cfg
        jobs = {f"{p.name}@{r}": size_search(c.unit, start, c.max_engines, c.dearest_first())
                for p in policies for r in c.routers}
        point = lambda job, counts: (job.rsplit("@", 1)[0], self.scenario(sized(c.unit, counts, job.rsplit("@", 1)[1])))  # noqa: E731
        bar = progress_bar(None, "plan: sizing", self.progress, unit="run")
        try:
            found = lockstep(jobs, lambda pending: self.judge(pending, point, "size"), bar)
        finally:
            bar.close()
        return {job: sized(c.unit, counts, job.rsplit("@", 1)[1]) if counts else None for job, counts in found.items()}

    def goodput(self, policies: list, deployment: Deployment) -> dict[str, float]:
        """Per policy, the highest factor on the workload's arrival rate that still meets
        every SLO on ``deployment``."""
        jobs = {f"{p.name}@goodput": rate_search() for p in policies}
        point = lambda job, f: (job.rsplit("@", 1)[0], self.scenario(deployment, f))  # noqa: E731
        bar = progress_bar(None, "plan: goodput", self.progress, unit="run")
        try:
            found = lockstep(jobs, lambda pending: self.judge(pending, point, "goodput"), bar)
        finally:
            bar.close()
        return {job.rsplit("@", 1)[0]: f for job, f in found.items()}

    def best_at(self, policy: str, deployment: Deployment) -> tuple[PolicyConfig, dict]:
        """The candidate of ``policy`` with the widest margin on ``deployment``, and its metrics."""
        scen = self.scenario(deployment)
        pairs = [(x, scen) for x in self.candidates[policy]]
        scored = [(self.margin(m), i, x, m) for i, ((x, _), m) in enumerate(zip(pairs, self.evaluate(pairs)))]
        margin, _, config, metrics = max(scored, key=lambda t: (t[0], -t[1]))
        return config, metrics


def run_plan(cfg: PlanConfig, folder: Path, progress: bool | None = None) -> dict:
    """The plan: per policy the cheapest deployment met (or why none is), goodput on the
    cheapest of them, and every evaluation as a row (``result["rows"]``)."""
    cfg.check()
    hopeless = idle_check(cfg)  # an SLO no policy meets on idle engines: an error before any folder is written
    planner = Planner(cfg, folder, progress)
    try:
        start, cap, offered = planner.start_units()
        able = [p for p in cfg.policies if p.name not in hopeless]
        first = sized(cfg.unit, {p.name: p.replicas * start for p in cfg.unit.pools.values()}, cfg.routers[0])
        for p in able:
            planner.tune(p, first)
        found = planner.size(able, start)
        winners = {p.name: _winner(planner, p.name, found, hopeless.get(p.name)) for p in cfg.policies}
        met = [(w["cost_per_hour"], w["engines"], name) for name, w in winners.items() if w["met"]]
        cheapest = min(met)[2] if met else None
        goodput = planner.goodput(able, deployment_from_dict(winners[cheapest]["deployment"])) \
            if cfg.goodput and cheapest else {}
    finally:
        planner.close()
    for name, f in goodput.items():
        winners[name]["goodput_per_s"] = f * offered
    return {"offered_per_s": offered, "unit_capacity_per_s": cap, "start_units": start, "cheapest": cheapest,
            "goodput_on": cheapest, "policies": winners, "rows": planner.rows}


def _winner(planner: Planner, policy: str, found: dict, hopeless: str | None) -> dict:
    """A policy's cheapest deployment over the routers (ties: fewer engines, then the
    routers' order), its best candidate there and what its run shows."""
    cfg = planner.cfg
    options = [(cfg.cost(d), d.engines, i, d) for i, r in enumerate(cfg.routers) if (d := found.get(f"{policy}@{r}"))]
    if not options:
        why = f"misses {hopeless} even on one idle unit" if hopeless else \
            f"no deployment of up to {cfg.max_engines} engines meets every SLO"
        return {"met": False, "why": why}
    cost, engines, i, d = min(options, key=lambda o: o[:3])
    config, m = planner.best_at(policy, d)
    return {"met": True, "cost_per_hour": cost, "engines": engines, "router": cfg.routers[i],
            "deployment": d.to_dict(), "config": config.to_dict() | {"name": policy},
            "attainment": {str(s): m.get(s.metric) for s in cfg.slos},
            "ttft_p90_s": m.get("ttft_p90_s"), "e2e_p50_s": m.get("e2e_p50_s"),
            "prefilled_tokens_per_request": m.get("prefilled_tokens_mean"),
            "prompt_tokens_per_request": m.get("prompt_tokens_mean"), "pools": m.get("pools", [])}
