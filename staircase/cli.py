"""The ``staircase`` command's frame.

Subcommands live in the packages that own them (``sim``, ``live``, ``calibration``)
and are found through the ``staircase.commands`` entry-point group: each entry point
is a ``register(subparsers)`` function that adds a parser whose ``func(args)`` runs it.
The core never imports them by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from importlib.metadata import entry_points
from pathlib import Path
from typing import Mapping, Sequence

from .errors import StaircaseError
from .policies import Param, Policy, param, policy_names_help
from .report import format_frame, format_table, summary_json, write_results
from .runconfig import (TOPOLOGY_POLICY_KEYS, parse_int_list, topology_and_policies_from_values,  # noqa: F401
                        topology_from_values)
from .topology import TOPOLOGY_KINDS, Topology

ENTRY_POINT_GROUP = "staircase.commands"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's --help: the description as written, each option's default once
    (not where its help already names one, nor when it is unset: None, off, empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS)
        if "default" in text.lower() or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like our own errors
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="staircase",
        description="Staircase streaming for multi-agent LLM inference: simulate policies, search them, plan "
                    "capacity, run them live on vLLM engines or behind the OpenAI API, calibrate and validate the "
                    "simulator, profile GPU engines, measure answer quality. `staircase COMMAND --help` for each.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except StaircaseError as err:
        print(f"staircase {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"staircase {args.command}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------ helpers for subcommands
def seed_type(text: str) -> int:
    """argparse type of every --seed: an integer >= 0 (numpy's generators refuse the rest)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is an integer >= 0")
    return value


def add_output_arguments(parser, command: str, out_help: str = "", json_help: str = "key 'policies'",
                         figure: str = "the seaborn figure", progress: bool = False) -> None:
    """The output options every command that writes a results folder shares (``parser``: a
    parser or an argument group); ``results_folder`` reads --out."""
    if progress:
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="progress bars on stderr (default: only when stderr is a terminal)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help=f"stdout format: a table (default) or one JSON object ({json_help})")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default: results/{command}-<UTC timestamp>){out_help}")
    parser.add_argument("--no-figure", action="store_true", help=f"skip {figure}")


def results_folder(args: argparse.Namespace, command: str) -> Path:
    if args.out is not None:
        return args.out
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{command}-{stamp}"


def finish_run(args: argparse.Namespace, command: str, traces: Mapping, summary, config: Mapping,
               tables: Mapping | None = None) -> int:
    """Write the results folder and print the table or the JSON object; ``tables``: more
    frames by name (``<name>.csv``, printed after the summary, under the JSON key ``name``)."""
    folder = results_folder(args, command)
    tables = dict(tables or {})
    paths = write_results(folder, traces, summary, config, figure=not args.no_figure, tables=tables)
    if args.format == "json":
        out = summary_json(summary)
        out |= {key: json.loads(df.to_json(orient="records")) for key, df in tables.items()}
        out["results"] = str(folder)
        print(json.dumps(out, indent=2))
    else:
        print(format_table(summary))
        for key, df in tables.items():
            print(f"\n{key}:\n{format_frame(df)}")
        print(f"\nresults: {folder}/ ({', '.join(p.name for p in paths.values())})")
    return 0


def add_topology_policy_arguments(parser: argparse.ArgumentParser, policies: str, redundancy: str,
                                  proposers: int) -> None:
    """The topology and policy options shared by `sim` and `live`."""
    add_topology_arguments(parser, proposers)
    g = parser.add_argument_group("policies")
    g.add_argument("--policies", default=policies, help=policy_names_help())
    g.add_argument("--redundancy", default=redundancy,
                   help="redundancy r of staircase policies; a comma list gives one policy per value")
    for name in ("scope", "proposer_schedule", "aggregator_schedule", "max_wait_s", "ttft_target_s", "lead_in_s"):
        _add_param_option(g, param(name))
    g.add_argument("--policy-config", action="append", default=[], metavar="JSON|FILE",
                   help="one more policy as data, e.g. '{\"kind\": \"staircase\", \"redundancy\": 1}' (any kind and "
                        "parameter; `staircase search` prints these), or a best.json of `staircase search` or a "
                        "plan.json of `staircase plan` (its policies that met the SLOs); repeatable; --policies '' "
                        "for these alone")


def _add_param_option(group, spec: Param) -> None:
    """``--<name>`` for one policy parameter, its default and help from its declaration."""
    flag = "--" + spec.name.replace("_", "-")
    if spec.kind == "choice":
        group.add_argument(flag, choices=spec.choices, default=spec.default, help=spec.help)
    elif spec.kind == "schedule":
        group.add_argument(flag, default=",".join(map(str, spec.default)), help=spec.help)
    else:
        group.add_argument(flag, type=float if spec.kind == "float" else int, default=spec.default, help=spec.help)


WORKLOAD_HELP = {"poisson": "Poisson arrivals at --rate", "gamma": "gamma arrivals at --rate (burstier: --cv)",
                 "closed": "a closed loop of --concurrency users",
                 "azure": "the Azure conversation hour at its own times (or --trace CSV)",
                 "run": "another run's traffic: --trace a results folder (its arrivals and lengths) or a file of "
                        "seconds"}


def add_workload_arguments(parser: argparse.ArgumentParser, kinds: Sequence[str], *, title: str = "workload",
                           many: bool = False, rate: float | None = 0.1, requests: int | None = 200,
                           requests_help: str = "number of requests"):
    """The workload options (`sim`, `search`, `plan`), one ``staircase.workload.Workload``
    (``workload_from_args``); ``many``: ``--workload`` takes a comma list (one scenario set
    each); ``rate`` None: no --rate (the search sets loads). Returns the group."""
    g = parser.add_argument_group(title)
    what = "; ".join(f"{k}: {WORKLOAD_HELP[k]}" for k in kinds)
    if many:
        g.add_argument("--workload", default=kinds[0], help=f"comma list of: {what} (one scenario set each)")
    else:
        g.add_argument("--workload", choices=kinds, default=kinds[0], help=what)
    g.add_argument("--requests", type=int, default=requests, help=requests_help)
    if rate is not None:
        g.add_argument("--rate", type=float, default=rate, help="arrivals per second (poisson, gamma)")
    g.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation of inter-arrival times")
    if "closed" in kinds:
        g.add_argument("--concurrency", type=int, default=8, help="closed: number of users")
    g.add_argument("--query-tokens", type=int, default=120, help="median query length (synthetic workloads)")
    g.add_argument("--output-tokens", type=int, default=128, help="median answer length (synthetic workloads)")
    g.add_argument("--trace", default=None, help="azure: a trace CSV (default: the bundled Azure conversation hour); "
                                                 "run: a results folder or a file of arrival seconds")
    g.add_argument("--time-scale", type=float, default=1.0, help="azure, run: divide arrival times by this")
    return g


def workload_from_args(args: argparse.Namespace, kind: str | None = None, requests: int | None = None):
    """The ``Workload`` of `add_workload_arguments`' options (``kind``, ``requests``: instead of theirs)."""
    from .workload import Workload

    return Workload(kind or args.workload, args.requests if requests is None else requests, getattr(args, "rate", 1.0),
                    args.cv, getattr(args, "concurrency", 8), args.query_tokens, args.output_tokens, trace=args.trace,
                    time_scale=args.time_scale)


def add_topology_arguments(parser: argparse.ArgumentParser, proposers: int = 3) -> None:
    """The topology options (`sim`, `live`, `search`); ``build_topology`` reads them."""
    g = parser.add_argument_group("topology")
    g.add_argument("--topology", choices=TOPOLOGY_KINDS, default="moa",
                   help="moa: layers of proposers -> aggregator; mad: debate agents x rounds -> judge")
    g.add_argument("--proposers", type=int, default=proposers, help="MoA proposers per layer")
    g.add_argument("--layers", type=int, default=1, help="MoA proposer layers before the aggregator")
    g.add_argument("--agents", type=int, default=3, help="MAD agents per round")
    g.add_argument("--rounds", type=int, default=2, help="MAD rounds before the judge")


def build_topology(args: argparse.Namespace) -> Topology:
    """The topology `add_topology_arguments` parsed."""
    return topology_from_values(vars(args))


def topology_and_policies(args: argparse.Namespace) -> tuple[Topology, list[Policy]]:
    """Build and check what `add_topology_policy_arguments` parsed."""
    return topology_and_policies_from_values(vars(args))
