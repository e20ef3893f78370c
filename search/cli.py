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

from staircase.cli import (HelpFormatter, add_output_arguments, add_topology_arguments, add_workload_arguments,
                           build_topology,
                           results_folder, seed_type,
                           workload_from_args)
from staircase.errors import ConfigError
from staircase.policies import POLICY_KINDS
from staircase.runconfig import parse_float_list

from staircase.sim.faults import parse_fault_rates
from staircase.workload import WORKLOAD_KINDS

OPEN_LOOP = [k for k in WORKLOAD_KINDS if k != "closed"]
DEFAULT_CONSTRAINT = "context_p50>=16"  # proposer tokens the first answer token reads (not a quality measure)

from .objectives import DEFAULT_OBJECTIVES, METRICS, Constraint, QualityCurve, check_objectives
from .report import write_report
from .run import METHODS, SearchConfig, make_scenarios, run_search
from .space import SearchSpace, parse_fix, parse_range


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="search policies on the simulator (no arguments: the embedded default)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_topology_arguments(p)
    g = p.add_argument_group("deployment and traffic (one scenario per profile x workload x load)")
    g.add_argument("--profile", default="default", help="comma list of engine profiles (bundled names or JSON files)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--load", default="0.3,0.7", help="comma list of loads, fractions of the measured capacity")
    g.add_argument("--faults", default=None, metavar="KEY=RATE,...",
                   help="calls that fail at random in every scenario, e.g. 'proposers=0.05' (`staircase sim --help`), "
                        "so the search weighs redundancy against failure rates")
    add_workload_arguments(p, OPEN_LOOP, title="traffic", many=True, rate=None, requests_help="requests per evaluation")
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
                   help="repeatable; default: context_p50>=16 (a floor on the context the first token reads, not "
                        "on quality: see --quality-table); 'none' for none")
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
    add_output_arguments(g, "search", out_help="; an existing one resumes its search", json_help="the best policy",
                         figure="pareto.png", progress=True)


def config_from_args(args: argparse.Namespace) -> tuple[SearchConfig, str]:
    """Everything checked before any work: space, objectives, constraints, then the scenarios."""
    topology = build_topology(args)
    space = SearchSpace(args.kinds.split(","), topology, dict(parse_fix(f) for f in args.fix),
                        dict(parse_range(r) for r in args.range))
    objectives = check_objectives(args.objectives.split(","))
    limit = max((len(n.upstream) for n in topology.nodes if n.is_final), default=0) * args.max_tokens
    texts = args.constraint if args.constraint is not None else [DEFAULT_CONSTRAINT]
    constraints = [Constraint.parse(c, limit) for c in texts if c != "none"]
    minimise = args.minimise or objectives[0]
    if minimise not in METRICS:
        raise ConfigError("minimise", minimise, ", ".join(METRICS))
    loads = parse_float_list(args.load, "load") if args.load else None
    kinds = [k.strip() for k in args.workload.split(",") if k.strip()]
    for k in kinds:
        if k not in OPEN_LOOP:
            raise ConfigError("workload", k, ", ".join(OPEN_LOOP))
    workload = [workload_from_args(args, kind=k) for k in kinds]
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
    folder = results_folder(args, "search")
    study = run_search(cfg, folder, progress=args.progress)
    result = write_report(study, cfg, folder, minimise, figure=not args.no_figure)
    result["results"] = str(folder)
    if args.format == "json":
        print(json.dumps(result, indent=1, default=str))
        return 0
    print(_table(result))
    if args.constraint is None and not args.quality_table:
        print(f"\nnote: the default constraint {DEFAULT_CONSTRAINT} is a floor on context, not on quality: the "
              "project's late-key probe (docs/results.md, Quality) keeps 0.1/0.2/0.0 of early/middle/last keys "
              "with 16 proposer tokens read at the first token; constrain on measured quality with "
              "--quality-table and --constraint 'quality>=X'")
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
