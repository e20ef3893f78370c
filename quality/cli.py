"""``staircase quality``: does the staircase keep the answer right? Latency and quality
side by side, on real engines, with bootstrap 95 % intervals paired by prompt.

For each prompt it runs wait-all (the reference), wait-all again with the aggregator
under another sampling seed (the noise floor: what resampling the final answer alone
changes, the proposals the same; --noise-scope all resamples every node), and each
policy under test, on the
same engines with the same seeds, and scores every answer:

  exact_match           GSM8K: the answer's last number equals the number after ####
  reference_similarity  AlpacaEval: similarity (all-MiniLM-L6-v2, offline) to the reference output
  agreement             similarity to wait-all's answer to the same prompt (noise floor beside it)
  retention:<position>  late-key probe: replay proposers carry "The secret code is NNNN." early,
                        in the middle or last; the real aggregator answers "What is the secret code?"
  false_key             the probe's control items with no key (should be 0)
  judge                 optional: pairwise win rate against wait-all, both orders (0.5 = as good)

The default run (7 min 48 s on an AMD EPYC with AVX2, 2 cores) is sized to reach a conclusion: the
two replayed sets where the answer comes last and wait-all has signal (30 GSM8K replay
items, 5 probe items per key position), the paper's staircase with first chunks 8 and 32
tokens (proposers' and aggregator's; the rest of the schedule the paper's) and the
lead-in staircase. Each (policy, metric) is found to drop, hold (a drop of --effect ruled
out) or be inconclusive (no signal, or too few items: the verdict says how many would
do). Add the real sets with --sets gsm8k,alpaca_eval,gsm8k_replay,probe.
Results: answers.jsonl (every answer text), items.jsonl, scores.csv, summary.csv/.json,
quality_table.csv (per policy and metric, with the context read at the first token: a
constraint table for the policy search), quality_vs_latency.png, retention_vs_context.png,
traces/. Tiny models (the bundled SmolLM2-135M) score near 0 on GSM8K: read agreement and
retention where exact match has no signal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from staircase.cli import HelpFormatter, add_output_arguments, parse_int_list, results_folder, seed_type
from staircase.errors import ConfigError
from staircase.record import read_record, run_record, write_record
from staircase.policies import LAYOUTS, make_policies, policy_from_dict
from staircase.runconfig import policies_from_option
from staircase.topology import moa

from .data import POSITIONS
from .sets import SETS, replayed
from .run import QualitySpec, first_chunk_policies


def register(subparsers: argparse._SubParsersAction) -> None:
    from staircase.live.engines import add_engine_arguments

    p = subparsers.add_parser("quality", help="score answers of policies against wait-all (exact match, similarity, "
                                              "late-key retention, judge) beside their latency",
                              description=__doc__, formatter_class=HelpFormatter)
    add_engine_arguments(p)
    g = p.add_argument_group("what is scored")
    g.add_argument("--sets", default="gsm8k_replay,probe", help=f"comma list of {', '.join(SETS)}")
    g.add_argument("--prompts", type=int, default=30,
                   help="items per GSM8K/AlpacaEval set (real GSM8K, AlpacaEval, the GSM8K replay set)")
    g.add_argument("--skip", type=int, default=0, help="start after this many prompts of each real set")
    g.add_argument("--probe-items", type=int, default=5, help="probe items per key position")
    g.add_argument("--positions", default=",".join(POSITIONS), help=f"probe key positions: {', '.join(POSITIONS)}")
    g.add_argument("--replay-tokens-per-s", type=float, default=30.0, help="probe: the replay proposers' token rate")
    _add_policy_arguments(p)
    g = p.add_argument_group("sampling and load")
    g.add_argument("--max-tokens", type=int, default=128, help="max tokens of every answer (real sets)")
    g.add_argument("--probe-max-tokens", type=int, default=32, help="max tokens of the aggregator's probe answer")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (MoA uses 0.7)")
    g.add_argument("--greedy", action="store_true", help="temperature 0: wait-all is deterministic")
    g.add_argument("--seed", type=seed_type, default=0)
    g.add_argument("--noise-seed", type=seed_type, default=1, help="seed of wait-all's repeat (the noise floor)")
    g.add_argument("--noise-scope", choices=("aggregator", "all"), default="aggregator",
                   help="the repeat resamples the aggregator alone (same proposals; default) or every node")
    g.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight (closed loop; latency figures are at this load)")
    g.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    g.add_argument("--effect", type=float, default=0.1,
                   help="the score drop that matters: a metric 'holds' when its paired interval rules out a drop "
                        "this large, and has signal when wait-all scores at least this far from its worst")
    _add_judge_arguments(p)
    p.add_argument("--rescore", type=Path, metavar="FOLDER",
                   help="score a finished (or interrupted) run's folder again, without engines: its config.json "
                        "and traces/ (the options of the run come from its config; --resamples may change)")
    add_output_arguments(p, "quality")
    p.set_defaults(func=run)


def _add_judge_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optional LLM judge (off by default)")
    g.add_argument("--judge-url", help="OpenAI-compatible endpoint of the judge model")
    g.add_argument("--judge-model", default="model", help="--judge-url: the served model name")
    g.add_argument("--judge-api-key-env", help="--judge-url: environment variable holding the API key")
    g.add_argument("--judge-local", action="store_true", help="the aggregator's own engine judges (weak, but real)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def _add_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policies (wait-all and its noise-floor repeat always run)")
    g.add_argument("--first-chunks", default="8,32",
                   help="one paper staircase per first chunk (proposers' and aggregator's); '' for none")
    g.add_argument("--redundancy", type=int, default=1, help="redundancy r of those staircase policies")
    g.add_argument("--layout", choices=LAYOUTS, default="standard", help="prompt layout of those policies")
    g.add_argument("--policies", default="staircase-lead-in",
                   help="more policies by name (as `staircase live --policies`; '' for none)")
    g.add_argument("--policy-config", action="append", default=[], metavar="JSON", help="one more policy as data")
    g.add_argument("--proposers", type=int, default=3, help="MoA proposers")


def spec_from_args(args: argparse.Namespace) -> QualitySpec:
    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    positions = tuple(s.strip() for s in args.positions.split(",") if s.strip())
    return QualitySpec(sets=sets, prompts=args.prompts, skip=args.skip, probe_items=args.probe_items,
                       positions=positions, proposers=args.proposers, max_tokens=args.max_tokens,
                       probe_max_tokens=args.probe_max_tokens, temperature=0.0 if args.greedy else args.temperature,
                       seed=args.seed, noise_seed=args.noise_seed, noise_scope=args.noise_scope,
                       replay_tokens_per_s=args.replay_tokens_per_s, concurrency=args.concurrency,
                       resamples=args.resamples, effect=args.effect).check()


def policies_from_args(args: argparse.Namespace) -> list:
    firsts = parse_int_list(args.first_chunks, "first-chunks", 1) if args.first_chunks.strip() else []
    policies = first_chunk_policies(firsts, args.redundancy, args.layout)
    names = [n for n in args.policies.split(",") if n.strip()]
    policies += make_policies(names, redundancies=[args.redundancy]) if names else []
    policies += [p for text in args.policy_config for p in policies_from_option(text)]
    topology = moa(args.proposers)
    for policy in policies:
        policy.validate_for(topology)
    return policies


def judge_engine(args: argparse.Namespace, engines: dict):
    if args.judge_url and args.judge_local:
        raise ConfigError("judge", "--judge-url and --judge-local", "one judge")
    if args.judge_local:
        return engines["aggregator"]
    if args.judge_url:
        from staircase.live.engines import HTTPEngine, check_url

        check_url("judge-url", args.judge_url)
        return HTTPEngine(args.judge_url, args.judge_model, name="judge", api_key_env=args.judge_api_key_env)
    return None


def run(args: argparse.Namespace) -> int:
    from staircase.live.engines import EngineOptions, open_engines

    if args.rescore is not None:
        return rescore(args)
    spec = spec_from_args(args)
    policies = policies_from_args(args)
    topology = moa(spec.proposers)
    raw = EngineOptions.from_mapping(vars(args)).to_config()
    folder = results_folder(args, "quality")
    config = run_record("quality", None, policies, spec=spec.describe(), engines=raw,
                        judge=args.judge_url or ("local" if args.judge_local else None))
    started = time.perf_counter()
    with open_engines(raw, topology, dtype=args.dtype) as engines:
        judge = judge_engine(args, engines.slots)
        config.update(engines.machine)
        _write_config(folder, config)  # first, so an interrupted run can be rescored
        collected = _collect(engines.slots, spec, policies, judge, args, folder)
    config.update(runs=collected.runs, collect_wall_s=round(time.perf_counter() - started, 1))
    return _score_and_write(args, folder, spec, policies, collected, config)


def _write_config(folder: Path, config: dict) -> None:
    write_record(folder, config)


def rescore(args: argparse.Namespace) -> int:
    """Score a run's folder again from its config.json and traces/ (no engines)."""
    from .run import QualitySpec, load_collected

    config = read_record(args.rescore, "rescore", ("quality",))
    spec = QualitySpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    spec.resamples, spec.effect = args.resamples, args.effect
    policies = [policy_from_dict(p) for p in config["policies"]]
    collected = load_collected(args.rescore / "traces", spec, policies)
    if (args.rescore / "judge.csv").is_file():
        import pandas as pd

        collected.judged = pd.read_csv(args.rescore / "judge.csv")
    config["runs"] = collected.runs
    args.out = args.out or args.rescore
    return _score_and_write(args, args.out, spec, policies, collected, config)


def _collect(engines, spec, policies, judge, args, folder: Path):
    from .run import collect_sync

    t0 = time.perf_counter()
    def keep(kind: str, trace) -> None:  # as each run ends, so an interrupted run loses nothing finished
        from .report import write_trace

        write_trace(trace, folder / "traces", kind)

    try:
        collected = collect_sync(engines, spec, policies, judge=judge, progress=args.progress, on_trace=keep)
    except KeyboardInterrupt:
        print(f"interrupted: nothing scored; the finished runs (answer texts in answer_text) are in {folder}/traces",
              file=sys.stderr)
        raise
    print(f"collected {len(collected.answers)} answers of {len(collected.runs)} policies in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return collected


def _score_and_write(args, folder: Path, spec: QualitySpec, policies, collected, config: dict) -> int:
    from . import report
    from .scores import Embedder

    items = {it.prompt_id: it for it in spec.items()}
    embedder = Embedder() if not all(replayed(s) for s in spec.sets) else None
    scores = report.score_answers(collected.answers, items, embedder)
    summary, metrics = report.summarize(collected, scores, spec)
    lines = report.verdict(summary, spec, metrics)
    table = report.quality_table(collected, metrics, {p.name: p for p in policies})
    paths = report.write(folder, collected, scores, summary, metrics, table, lines, config, figure=not args.no_figure)
    with open(folder / "items.jsonl", "w") as fh:
        for it in items.values():
            fh.write(json.dumps(asdict(it), ensure_ascii=False) + "\n")
    if args.format == "json":
        out = report.summary_json(summary, metrics, lines)
        out["results"] = str(folder)
        print(json.dumps(out, indent=2))
    else:
        print(format_summary(summary))
        print("\n" + "\n".join(lines))
        print(f"\nresults: {folder}/ ({', '.join(p.name for p in paths.values())}, items.jsonl)")
    return 0


def format_summary(summary) -> str:
    """The per-policy table: latency, then each metric as mean [95 % interval]."""
    df = summary.copy()
    out = df[[c for c in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "longest_stall_p50_s", "context_tokens_p50")
              if c in df]].round(3)
    for col in df.columns:
        if f"{col}_ci" in df.columns:
            out[col] = [f"{v:.2f} {ci}" if v == v else "-" for v, ci in zip(df[col], df[f"{col}_ci"])]
    for col in ("drops", "inconclusive"):
        out[col] = df[col].replace("", "-")
    return out.to_string()
