"""``staircase search``: which policy, for these engines and this traffic.

With no arguments it runs the embedded default: the bundled CPU profile, MoA with 3
proposers and one aggregator, 200 Poisson requests of the default shape at 0.3 and 0.7
of the deployment's measured capacity, staircase and wait-all candidates (schedules,
redundancy, scope, layout, tolerance), NSGA-II over 256 candidates, objectives TTFT p90,
longest stall p50, E2E p50 and prefilled tokens, under the constraint that the first
answer token reads at least 16 proposer tokens. About a minute on 2 cores.

Results (the folder given with --out resumes an interrupted search: finished
evaluations are never redone): evaluations.parquet (every candidate x scenario),
pareto.csv (the front per scenario), best.json (the best policy under the constraints,
the references wait-all and the paper's staircase, and the `staircase sim` / `live`
command lines that reproduce it), pareto.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from staircase.cli import (add_topology_arguments, add_topology_policy_arguments, build_topology, results_folder,
                           seed_type, topology_and_policies)
from staircase.deployment import ROUTERS, load_deployment
from staircase.errors import ConfigError
from staircase.policies import POLICY_KINDS
from staircase.runconfig import parse_float_list

from sim.faults import parse_fault_rates
from sim.profile import load_profile
from sim.workload import WORKLOAD_KINDS, Workload, read_azure

OPEN_LOOP = [k for k in WORKLOAD_KINDS if k != "closed"]

from .objectives import DEFAULT_OBJECTIVES, METRICS, SLO, SLO_HELP, Constraint, QualityCurve, check_objectives
from .plan import PlanConfig, run_plan, unit_deployment
from .report import faults_args, topology_args, write_report
from .run import METHODS, SearchConfig, make_scenarios, run_search
from .space import SearchSpace, parse_fix, parse_range


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search policies on the simulator (no arguments: the embedded default)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_topology_arguments(p)
    g = p.add_argument_group("deployment and traffic (one scenario per profile x workload x load)")
    g.add_argument("--profile", default="default", help="comma list of engine profiles (bundled names or JSON files)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--workload", default="poisson",
                   help="comma list of: " + ", ".join(OPEN_LOOP) + " (one scenario set per workload)")
    g.add_argument("--requests", type=int, default=200, help="requests per evaluation")
    g.add_argument("--load", default="0.3,0.7", help="comma list of loads, fractions of the measured capacity")
    g.add_argument("--query-tokens", type=int, default=120)
    g.add_argument("--output-tokens", type=int, default=128)
    g.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation")
    g.add_argument("--trace", default=None, help="azure: trace CSV (default: the bundled copy)")
    g.add_argument("--faults", default=None, metavar="KEY=RATE,...",
                   help="calls that fail at random in every scenario, e.g. 'proposers=0.05' (`staircase sim --help`), "
                        "so the search weighs redundancy against failure rates")
    _space_arguments(p)
    p.set_defaults(func=run)


def _space_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search space")
    g.add_argument("--kinds", default="staircase,wait-all",
                   help=f"comma list of the policy kinds whose knobs are searched: {', '.join(POLICY_KINDS)}")
    g.add_argument("--fix", action="append", default=[], metavar="KIND.KNOB=VALUE",
                   help="pin a knob, e.g. staircase.layout=prefix-cache, staircase.proposer_schedule=8,128,256")
    g.add_argument("--range", action="append", default=[], metavar="KIND.KNOB=LOW..HIGH",
                   help="narrow a knob, e.g. staircase.redundancy=0..1 (schedules: chunk sizes)")
    g = p.add_argument_group("objectives")
    g.add_argument("--objectives", default=",".join(DEFAULT_OBJECTIVES),
                   help="comma list of: " + ", ".join(f"{k} ({v[1][:3]})" for k, v in METRICS.items()))
    g.add_argument("--constraint", action="append", default=None, metavar="METRIC<=X",
                   help="repeatable; default: context_p50>=16; 'none' for none")
    g.add_argument("--minimise", default=None, help="what 'best' means (default: the first objective)")
    g.add_argument("--quality-table", default=None, metavar="FILE[:METRIC]",
                   help="a `staircase quality` quality_table.csv: adds the metric quality (METRIC, default agreement, "
                        "interpolated at each run's context_p50) for objectives and constraints, e.g. "
                        "--constraint 'quality>=0.9'")
    g = p.add_argument_group("method and scale")
    g.add_argument("--method", choices=METHODS, default="nsga")
    g.add_argument("--budget", type=int, default=256, help="candidates to evaluate (grid: at least its size)")
    g.add_argument("--grid-points", type=int, default=3, help="grid: values per numeric knob")
    g.add_argument("--batch", type=int, default=16, help="candidates asked at once (results do not depend on workers)")
    g.add_argument("--workers", type=int, default=0, help="processes (0: every core)")
    g.add_argument("--ray", default=None, metavar="auto|ADDRESS", help="evaluate on a Ray cluster instead")
    g.add_argument("--seed", type=seed_type, default=0)
    g.add_argument("--out", default=None, help="results folder (an existing one resumes its search)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--format", choices=("table", "json"), default="table")
    g.add_argument("--no-figure", action="store_true")


def config_from_args(args: argparse.Namespace) -> tuple[SearchConfig, str]:
    """Everything checked before any work: space, objectives, constraints, then the scenarios."""
    topology = build_topology(args)
    space = SearchSpace(args.kinds.split(","), topology, dict(parse_fix(f) for f in args.fix),
                        dict(parse_range(r) for r in args.range))
    objectives = check_objectives(args.objectives.split(","))
    limit = max((len(n.upstream) for n in topology.nodes if n.is_final), default=0) * args.max_tokens
    texts = args.constraint if args.constraint is not None else ["context_p50>=16"]
    constraints = [Constraint.parse(c, limit) for c in texts if c != "none"]
    minimise = args.minimise or objectives[0]
    if minimise not in METRICS:
        raise ConfigError("minimise", minimise, ", ".join(METRICS))
    loads = parse_float_list(args.load, "load") if args.load else None
    kinds = [k.strip() for k in args.workload.split(",") if k.strip()]
    for k in kinds:
        if k not in OPEN_LOOP:
            raise ConfigError("workload", k, ", ".join(OPEN_LOOP))
    workload = [Workload(k, args.requests, 1.0, args.cv, 8, args.query_tokens, args.output_tokens, trace=args.trace)
                for k in kinds]
    profiles = [None if p == "default" else p for p in args.profile.split(",")]
    scenarios = make_scenarios(profiles, topology, workload, loads, max_tokens=args.max_tokens, seed=args.seed,
                               faults=parse_fault_rates(args.faults))
    cfg = SearchConfig(space, scenarios, objectives, constraints, args.method, args.budget, args.batch, args.seed,
                       args.workers, args.ray, args.grid_points,
                       quality=QualityCurve.from_table(args.quality_table) if args.quality_table else None)
    cfg.check()
    return cfg, minimise


def run(args: argparse.Namespace) -> int:

    cfg, minimise = config_from_args(args)
    folder = Path(args.out) if args.out else results_folder(argparse.Namespace(out=None), "search")
    study = run_search(cfg, folder, progress=args.progress)
    result = write_report(study, cfg, folder, minimise, figure=not args.no_figure)
    result["results"] = str(folder)
    if args.format == "json":
        print(json.dumps(result, indent=1, default=str))
        return 0
    print(_table(result))
    print(f"\nresults: {folder}/ (evaluations.parquet, pareto.csv, best.json"
          + ("" if args.no_figure else ", pareto.png") + ")")
    return 0


def _table(result: dict) -> str:
    cols = ["ttft_p50", "ttft_p90", "stall_p50", "e2e_p50", "prefilled", "context_p50"]
    lines = [f"evaluated {result['evaluated']} policies; Pareto front sizes: {result['pareto_sizes']}",
             f"best under {' and '.join(result['constraints']) or 'no constraint'}, minimising {result['minimise']}:"]
    if "best" not in result:
        lines.append("  none meets the constraints in every scenario (see pareto.csv, evaluations.parquet)")
        return "\n".join(lines)
    lines.append("  " + json.dumps(result["best"], sort_keys=True))
    lines.append("| scenario | policy | " + " | ".join(cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for name, per in [("search-best", result["best_metrics"])] + list(result["references"].items()):
        for scen, m in per.items():
            lines.append(f"| {scen} | {name} | " + " | ".join(_fmt(m[c]) for c in cols) + " |")
    lines.append("\nreproduce it:\n  " + result["commands"]["sim"] + "\n  " + result["commands"]["live"])
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"



# ------------------------------------------------------------------------ staircase plan
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


def register_plan(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="the cheapest deployment that meets latency SLOs, per policy "
                                           "(no arguments: the embedded default)",
                              description=PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_topology_policy_arguments(p, PLAN_POLICIES, "1", proposers=3)
    _traffic_arguments(p)
    _target_arguments(p)
    _search_arguments(p)
    p.set_defaults(func=run_plan_command)


def _traffic_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("traffic")
    g.add_argument("--workload", choices=("poisson", "gamma", "azure"), default="poisson",
                   help="Poisson or gamma arrivals at --rate, or the Azure conversation trace at its own times")
    g.add_argument("--requests", type=int, default=None,
                   help="requests simulated per deployment (default: 200; azure: the whole trace)")
    g.add_argument("--rate", type=float, default=0.5, help="arrivals per second (poisson, gamma)")
    g.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation of inter-arrival times")
    g.add_argument("--query-tokens", type=int, default=120, help="median query length (synthetic workloads)")
    g.add_argument("--output-tokens", type=int, default=128, help="median answer length (synthetic workloads)")
    g.add_argument("--trace", default=None, help="azure: a trace CSV (default: the bundled Azure conversation hour)")
    g.add_argument("--time-scale", type=float, default=1.0, help="azure: divide arrival times by this")


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
    g.add_argument("--out", default=None, help="results folder (default: results/plan-<UTC timestamp>); a rerun "
                                               "into the same folder reads its finished simulations back")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: only when stderr is a terminal)")
    g.add_argument("--format", choices=("table", "json"), default="table")
    g.add_argument("--no-figure", action="store_true", help="skip frontier.png")


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
    requests = args.requests or (len(read_azure(args.trace)) if args.workload == "azure" else 200)
    workload = Workload(args.workload, requests, args.rate, args.cv, 8, args.query_tokens, args.output_tokens,
                        trace=args.trace, time_scale=args.time_scale)
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
    from .plan_report import table, write_plan

    cfg = plan_config_from_args(args)
    folder = Path(args.out) if args.out else results_folder(argparse.Namespace(out=None), "plan")
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
        [f"--time-scale={w.time_scale:g}"] if w.kind == "azure" else
        [f"--rate={w.rate_per_s:g}", f"--query-tokens={w.query_tokens}", f"--output-tokens={w.output_tokens}"]
        + ([f"--cv={w.cv:g}"] if w.kind == "gamma" else []))
    policy = ["--policies=", f"--policy-config={json.dumps(winner['config'], sort_keys=True)}"]
    dep = f"--deployment={folder / f'deployment-{name}.json'}"
    sim = ["staircase", "sim"] + ([f"--profile={cfg.profile}"] if cfg.profile else []) + topo_args + [
        f"--max-tokens={cfg.max_tokens}"] + traffic + [dep, f"--seed={cfg.seed}", "--summary-only"] + policy + \
        faults_args(cfg.faults)
    live = ["staircase", "live", "--config=ENGINES.json", dep] + topo_args + [f"--max-tokens={cfg.max_tokens}"] + policy
    return {"sim": shlex.join(sim), "live": shlex.join(live) + "  # ENGINES.json: an engine spec per pool model"}
