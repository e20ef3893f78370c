"""``staircase plan``: how many engines a workload needs, per policy, to meet its SLOs
(the command; the planner is ``staircase.plan.run``, its files ``staircase.plan.report``)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from staircase.cli import (HelpFormatter, add_output_arguments, add_topology_policy_arguments, add_workload_arguments,
                           results_folder, seed_type,
                           topology_and_policies, workload_from_args)
from staircase.deployment import ROUTERS, load_deployment
from staircase.errors import ConfigError

from staircase.search.objectives import SLO, SLO_HELP
from staircase.search.report import faults_args, topology_args
from staircase.sim.faults import parse_fault_rates
from staircase.sim.profile import load_profile
from staircase.workload import read_arrivals, read_azure

from .run import PlanConfig, run_plan, unit_deployment

PLAN_HELP = """``staircase plan``: how many engines a workload needs, per policy, to meet its SLOs.

With no arguments it runs the embedded default: the bundled CPU profile (one shared
engine per copy), MoA with 3 proposers and one aggregator, 200 Poisson requests at
0.5/s, SLOs TTFT p90 <= 2 s and E2E p50 <= 60 s, wait-all against the paper's
staircase (prefix-cache layout, r = 1) and the smooth staircase, behind the affinity
router. Seconds on 2 cores.

For each policy (and each router of --routers) it simulates the whole workload at its
own arrival times on growing deployments: whole copies of the unit first, then each
pool trimmed on its own, the dearest model first. A deployment meets the SLOs when the
stated share of all requests (failed ones count as misses) is within each bound: SLO
attainment over the whole trace, so bursts count, never the average load. With
--tune N each policy's knobs are searched first (N candidates, NSGA-II with the SLOs as
constraints). Then, on the cheapest deployment found, each policy's goodput: the
highest arrival rate that still meets the SLOs.

Results: plan.json (per policy: the cheapest deployment, its cost per hour, policy
config, SLO attainment, prefill per request, pool utilisation and queue wait, goodput,
and the `staircase sim` / `live` commands that reproduce it), deployment-<policy>.json,
frontier.csv (every deployment simulated), frontier.png (cost against SLO attainment),
evaluations.jsonl (a rerun with the same --out reads its simulations back).
"""
PLAN_POLICIES = "wait-all,staircase-prefix-cache,staircase-smooth"
PLAN_SLOS = ("ttft_p90<=2", "e2e_p50<=60")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="the cheapest deployment that meets latency SLOs, per policy "
                                           "(no arguments: the embedded default)",
                              description=PLAN_HELP, formatter_class=HelpFormatter)
    add_topology_policy_arguments(p, PLAN_POLICIES, "1", proposers=3)
    _traffic_arguments(p)
    _target_arguments(p)
    _search_arguments(p)
    p.set_defaults(func=run_plan_command)


def _traffic_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p, ("poisson", "gamma", "azure", "run"), title="traffic", rate=0.5, requests=None,
                           requests_help="requests simulated per deployment (default: 200; azure, run: the whole "
                                         "trace)")


def _target_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("targets and engines")
    g.add_argument("--slo", action="append", default=None, metavar="SLO",
                   help=f"repeatable; {SLO_HELP}; default: {' and '.join(PLAN_SLOS)}")
    g.add_argument("--profile", default=None, help="engine profile: a JSON file or a bundled name (default, "
                                                   "illustrative-gpu)")
    g.add_argument("--deployment", default=None, metavar="FILE",
                   help="the unit: one copy of the deployment (pools, slots, routers) that the plan scales; "
                        "default: one pool per engine model of the profile, as many replicas as slots use it")
    g.add_argument("--cost", action="append", default=[], metavar="MODEL=PER_HOUR",
                   help="cost of one engine of MODEL per hour (repeatable; a model not given costs 1)")
    g.add_argument("--routers", default="affinity",
                   help=f"comma list of routers tried for every pool: {', '.join(ROUTERS)}, or unit (the unit "
                        "file's own)")
    g.add_argument("--max-tokens", type=int, default=128, help="max tokens of every node's answer")
    g.add_argument("--max-engines", type=int, default=512, help="largest deployment tried")
    g.add_argument("--faults", default=None, metavar="KEY=RATE,...",
                   help="calls that fail at random in every simulation, e.g. 'proposers=0.05' (`staircase sim "
                        "--help`): failed requests count as SLO misses")


def _search_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search")
    g.add_argument("--tune", type=int, default=0, metavar="N",
                   help="search N candidates of each policy kind's knobs at the starting size first (0: the "
                        "policies as named)")
    g.add_argument("--no-goodput", action="store_true", help="skip the goodput search")
    g.add_argument("--workers", type=int, default=0, help="processes (0: every core)")
    g.add_argument("--ray", default=None, metavar="auto|ADDRESS", help="simulate on a Ray cluster instead")
    g.add_argument("--seed", type=seed_type, default=0, help="random seed (arrivals, lengths, noise: the same for all)")
    add_output_arguments(g, "plan", out_help="; a rerun into the same folder reads its finished simulations back",
                         json_help="per policy its cheapest deployment", figure="frontier.png", progress=True)


def parse_costs(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        model, sep, value = item.partition("=")
        try:
            out[model.strip()] = float(value)
        except ValueError:
            raise ConfigError("cost", item, "MODEL=PER_HOUR, e.g. large-70b=8") from None
        if not sep or not model.strip():
            raise ConfigError("cost", item, "MODEL=PER_HOUR, e.g. large-70b=8")
    return out


def plan_config_from_args(args: argparse.Namespace) -> PlanConfig:
    """Everything checked before any simulation."""
    topology, policies = topology_and_policies(args)
    slos = [SLO.parse(s) for s in (args.slo or PLAN_SLOS)]
    profile = load_profile(args.profile)
    whole = {"azure": lambda: len(read_azure(args.trace)),  # (run without --trace: the Workload says what is missing)
             "run": lambda: len(read_arrivals(args.trace)) if args.trace else 200}
    workload = workload_from_args(args, requests=args.requests or whole.get(args.workload, lambda: 200)())
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    if args.deployment:
        unit = load_deployment(args.deployment, models=list(profile.engines))
    else:
        unit = unit_deployment(profile, topology, routers[0] if routers and routers[0] in ROUTERS else "affinity")
    cfg = PlanConfig(topology, args.profile, workload, args.max_tokens, slos, policies, unit, parse_costs(args.cost),
                     routers or ["<none>"], args.seed, args.tune, args.max_engines, not args.no_goodput,
                     args.workers, args.ray, parse_fault_rates(args.faults) or None)
    cfg.check()
    return cfg


def run_plan_command(args: argparse.Namespace) -> int:
    from .report import table, write_plan

    cfg = plan_config_from_args(args)
    folder = results_folder(args, "plan")
    result = run_plan(cfg, folder, progress=args.progress)
    result["commands"] = {name: plan_commands(cfg, w, name, folder) for name, w in result["policies"].items() if w["met"]}
    paths = write_plan(folder, cfg, result, figure=not args.no_figure)
    if args.format == "json":
        print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"results": str(folder)}, indent=1,
                         default=str))
    else:
        print(table(cfg, result))
        print(f"\nresults: {folder}/ ({', '.join(p.name for p in paths)})")
    return 0


def plan_commands(cfg: PlanConfig, winner: dict, name: str, folder: Path) -> dict:
    """The `staircase sim` and `staircase live` command lines that run the policy on its
    deployment (the file the plan writes)."""
    topo_args = topology_args(cfg.topology.config())
    w = cfg.workload
    traffic = [f"--workload={w.kind}", f"--requests={w.requests}"] + (
        [f"--trace={w.trace}"] if w.trace else []) + (
        [f"--time-scale={w.time_scale:g}"] if w.kind in ("azure", "run") else
        [f"--rate={w.rate_per_s:g}", f"--query-tokens={w.query_tokens}", f"--output-tokens={w.output_tokens}"]
        + ([f"--cv={w.cv:g}"] if w.kind == "gamma" else []))
    policy = ["--policies=", f"--policy-config={json.dumps(winner['config'], sort_keys=True)}"]
    dep = f"--deployment={folder / f'deployment-{name}.json'}"
    sim = ["staircase", "sim"] + ([f"--profile={cfg.profile}"] if cfg.profile else []) + topo_args + [
        f"--max-tokens={cfg.max_tokens}"] + traffic + [dep, f"--seed={cfg.seed}", "--summary-only"] + policy + \
        faults_args(cfg.faults)
    live = ["staircase", "live", "--config=ENGINES.json", dep] + topo_args + [f"--max-tokens={cfg.max_tokens}"] + policy
    return {"sim": shlex.join(sim), "live": shlex.join(live) + "  # ENGINES.json: an engine spec per pool model"}
