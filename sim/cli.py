"""``staircase sim``: compare policies on simulated engines.

With no arguments it runs the embedded default: MoA with 3 proposers and one
aggregator on one shared engine, wait-all vs staircase (paper schedule, r=1, both
prompt layouts) vs a single model, 200 Poisson requests at 0.1/s, answers of up to
128 tokens, with the bundled profile (calibrated on vLLM's CPU build with
SmolLM2-135M, the setup of `staircase live` here). `--profile illustrative-gpu`
gives hand-set GPU-class engines of three sizes instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from staircase.machine import label
from staircase.cli import (HelpFormatter, add_output_arguments, add_topology_policy_arguments, add_workload_arguments,
                           finish_run,
                           seed_type, topology_and_policies, workload_from_args)
from staircase.deployment import load_deployment
from staircase.record import run_record
from staircase.report import pool_frame, summary_frame

from .capacity import at_load, burst_warning, capacity, load_report, overload
from .profile import default_profile_path, load_profile
from .simulate import simulate_policies
from staircase.workload import WORKLOAD_KINDS

DEFAULT_POLICIES = "wait-all,staircase,single"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim", help="simulate policies on SimPy engines (no arguments: the embedded default)",
        description=__doc__, formatter_class=HelpFormatter)
    add_topology_policy_arguments(p, DEFAULT_POLICIES, "1", proposers=3)
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=128,
                   help="max tokens of every node's answer (the paper's MoA uses 512 on GPUs)")
    g = add_workload_arguments(p, WORKLOAD_KINDS)
    g.add_argument("--load", type=float, default=None,
                   help="arrivals at this fraction of the deployment's capacity (requests/s wait-all completes in "
                        "a closed loop on these engines, measured first); sets --rate, or the azure time scale; "
                        "the busiest window's load is reported beside it (a warning when it passes 1)")
    g = p.add_argument_group("simulation")
    g.add_argument("--profile", default=None,
                   help=f"engine profile: a JSON file or a bundled name (default, illustrative-gpu); "
                        f"default: {default_profile_path().name}")
    g.add_argument("--deployment", default=None, metavar="FILE",
                   help="pools of engine replicas behind routers (JSON or YAML; staircase/deployment.py), their "
                        "models from the profile; default: the profile's engine sharing")
    g.add_argument("--faults", default=None, metavar="KEY=RATE,...",
                   help="calls that fail at random, e.g. 'proposers=0.05': a rate per call for proposers, aggregator, "
                        "a slot or a pool; a failing call breaks at a uniform token (the same calls in every policy)")
    g.add_argument("--seed", type=seed_type, default=0, help="random seed; a run is a pure function of its inputs and seed")
    g.add_argument("--no-noise", action="store_true", help="turn the profile's noise off")
    g.add_argument("--summary-only", action="store_true", help="keep no per-chunk rows (large runs)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only when stderr is a terminal)")
    add_output_arguments(p, "sim")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    topology, policies = topology_and_policies(args)
    workload = workload_from_args(args)
    profile = load_profile(args.profile)
    deployment = load_deployment(args.deployment, models=list(profile.engines)) if args.deployment else None
    load = None
    if args.load is not None:
        cap = capacity(topology, profile, workload, max_tokens=args.max_tokens, seed=args.seed, deployment=deployment)
        workload = at_load(workload, args.load, cap)
        load = load_report(workload, args.load, cap, args.seed)
        print(f"load {args.load:g} of capacity {cap:.3g}/s; the arrivals drawn average {load['average_load']:.2f}, "
              f"the busiest {load['busiest_window_s']:.0f} s {load['busiest_load']:.2f}", file=sys.stderr)
        if why := burst_warning(load):
            print(f"warning: {why}", file=sys.stderr)
    started = time.perf_counter()
    traces = simulate_policies(topology, policies, workload, profile, seed=args.seed, max_tokens=args.max_tokens,
                               noise=not args.no_noise, keep_chunks=not args.summary_only, progress=args.progress,
                               deployment=deployment, fault_rates=args.faults)
    wall_s = time.perf_counter() - started
    summary = summary_frame(traces)
    overloaded = {name: why for name, t in traces.items() if (why := overload(t.requests))}
    for name, why in overloaded.items():
        print(f"warning: {name}: {why}", file=sys.stderr)
    config = _run_config(args, topology, policies, workload, profile) | {
        "wall_s": round(wall_s, 3), "overloaded": overloaded} | ({"load": load} if load else {}) | (
        {"deployment": deployment.to_dict()} if deployment else {})
    if args.format == "table":
        database = {e.get("provenance", {}).get("database") for e in profile.raw.get("engines", {}).values()
                    if isinstance(e, dict) and isinstance(e.get("provenance"), dict)} - {None}
        if profile.calibrated:
            print(f"profile {profile.name}: calibrated on {label(profile.machine)}; it predicts that machine\n")
        elif database:
            print(f"profile {profile.name}: GPU engines from a kernel database ({', '.join(sorted(database))}), "
                  "not calibrated on your engines; `staircase validate --published` states its error\n")
        else:
            print(f"note: profile '{profile.name}' is not calibrated; figures show shapes, not a deployment.\n")
    tables = {"pools": pool_frame(traces, deployment.engine_pools())} if deployment else {}
    return finish_run(args, "sim", traces, summary, config, tables)


def _run_config(args: argparse.Namespace, topology, policies, workload, profile) -> dict:
    """What config.json records of a simulated run."""
    return run_record(
        "sim", topology, policies,
        topology_args={"kind": args.topology, "proposers": args.proposers, "layers": args.layers,
                       "agents": args.agents, "rounds": args.rounds},
        workload=workload.describe(),
        profile={"path": profile.source, "name": profile.name, "calibrated": profile.calibrated,
                 "note": profile.note, "machine": profile.machine},
        seed=args.seed, max_tokens=args.max_tokens, noise=not args.no_noise,
        summary_only=args.summary_only, fault_rates=args.faults,
    )


EMULATE_DOC = """``staircase emulate``: a fleet of emulated OpenAI-compatible engines on loopback, timed by
an engine profile in real time (the simulator's engine model: continuous batching,
prefill, the prefix cache, KV limits), for load tests and chaos runs at GPU speed
without GPUs. Not for fidelity: there is no model; tokens are words, every answer is
max_tokens words long.

    staircase emulate                                     # h100-moa's 4 engines, one replica each
    staircase emulate --deployment benchmarks/results/plan-azure-h100/deployment-staircase-prefix-cache-r2.json
    staircase serve --config <out>/engines.json --deployment <out>/deployment.json --proposers 6

Each engine answers at http://HOST:PORT/<engine>/v1 (completions and chat completions,
streamed with usage, vLLM's token_ids and cached tokens); /metrics has vLLM's metric
names per engine. <out>/engines.json and <out>/deployment.json point `staircase live`
and `staircase serve` at the fleet; at the stop (Ctrl-C, SIGTERM) <out>/calls.csv holds
every call's timing (arrived, admitted, first and last token due and written, tokens).
"""


def register_emulate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("emulate", help="emulated GPU engines on loopback, timed by a profile (load tests)",
                              description=EMULATE_DOC, formatter_class=HelpFormatter)
    p.add_argument("--profile", default="h100-moa", help="engine profile: a JSON file or a bundled name")
    p.add_argument("--deployment", default=None, metavar="FILE",
                   help="pools of replicas of the profile's engines (JSON or YAML; a plan's deployment file); "
                        "default: --replicas of every profile engine")
    p.add_argument("--replicas", type=int, default=1, help="replicas of each profile engine, without --deployment")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed event (vLLM's --stream-interval)")
    p.add_argument("--record-writes", action="store_true",
                   help="keep every write's time per call (GET /emulator/calls: writes), for a benchmark's "
                        "per-token delays")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the profile's noise")
    p.add_argument("--no-noise", action="store_true", help="turn the profile's noise off")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/emulate-<UTC timestamp>)")
    p.set_defaults(func=run_emulate)


def run_emulate(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from staircase.cli import results_folder
    from .emulate import client_config, fleet_models

    profile = load_profile(args.profile)
    deployment = load_deployment(args.deployment, models=list(profile.engines)) if args.deployment else None
    models = fleet_models(profile, deployment, args.replicas)
    out = results_folder(args, "emulate")
    out.mkdir(parents=True, exist_ok=True)
    config, pools = client_config(models, f"http://{args.host}:{args.port}", profile, deployment)
    (out / "engines.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "deployment.json").write_text(json.dumps(pools, indent=1) + "\n")
    try:
        import uvloop  # (vLLM's dependency, here with the live extra): a cheaper loop
    except ImportError:
        asyncio.run(_emulate(args, profile, models, out))
    else:
        uvloop.run(_emulate(args, profile, models, out))
    return 0


async def _emulate(args, profile, models, out) -> None:
    import asyncio
    import signal

    from .emulate import Fleet, write_calls
    from .emulate_http import serve_fleet

    fleet, runner = await serve_fleet(lambda clock: Fleet(models, clock, seed=args.seed, noise=not args.no_noise,
                                                          stream_interval=args.stream_interval,
                                                          record_writes=args.record_writes),
                                      args.host, args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"emulating {len(models)} engines of profile {profile.name} at http://{args.host}:{args.port}/<engine>/v1 "
          f"({', '.join(list(models)[:4])}{', ...' if len(models) > 4 else ''}); "
          f"staircase serve --config {out}/engines.json --deployment {out}/deployment.json", flush=True)
    await stop.wait()
    await runner.cleanup()
    write_calls(out / "calls.csv", fleet.calls)
    print(f"{len(fleet.calls)} calls; timing in {out / 'calls.csv'}; the clock ran at most "
          f"{fleet.clock.lag_s_max * 1000:.1f} ms late", flush=True)
