"""``staircase calibrate``: probe live engines and fit a simulator profile.

Calibrate, live (engines as in ``staircase live``: ``--model``, ``--url`` or ``--config``)::

    staircase calibrate --probes standard --profile-out my-profile.json

or fit only, from results folders already recorded (probes or ``staircase live`` runs)::

    staircase calibrate --traces results/calibrate-... results/live-...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import warnings
from pathlib import Path

import pandas as pd

from staircase.cli import HelpFormatter, results_folder, seed_type
from staircase.deployment import load_deployment
from staircase.errors import ConfigError
from staircase.record import run_record, write_record

from .fit import RunGroup, build_profile, fit_lengths, load_runs
from .probes import probe_set, run_probes
from .figures import plot_fit
from .fit import fit_all, fit_units, profile_note, replica_models
from .report import fit_table, print_validation

HELP_CAL = "probe live engines (or read traces) and fit a simulator profile"
HELP_VAL = "replay live runs in the simulator: live vs simulated percentiles, errors, CDFs"
VALIDATE_DOC = """``staircase validate``: replay live runs in the simulator and report how far it is.

Validate a profile against held-out live runs (other prompts, other policies or
concurrency than the calibration saw)::

    staircase validate results/live-A results/live-B --profile my-profile.json

or a GPU profile against published runs (a table of load points)::

    staircase validate --published benchmarks/published/nim-h100.csv
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from staircase.live.engines import add_deployment_argument, add_engine_arguments

    p = subparsers.add_parser("calibrate", help=HELP_CAL, description=__doc__,
                              formatter_class=HelpFormatter)
    add_engine_arguments(p)
    g = p.add_argument_group("deployment (every replica probed, one fit per pool model)")
    add_deployment_argument(g)
    g.add_argument("--probe-replicas", choices=("apart", "together"), default="apart",
                   help="probe the engines one after another, or all at once (replicas that share a machine's memory "
                        "slow each other; but where they take every core, this process has none left to time their "
                        "tokens and the decode fit fails: together only with cores to spare)")
    g = p.add_argument_group("calibration")
    g.add_argument("--probes", default="standard", choices=("standard", "small"),
                   help="designed probe set (standard: ~2 min on 2 CPU cores with SmolLM2-135M; small: tests)")
    g.add_argument("--traces", type=Path, nargs="+",
                   help="fit from these results folders instead of probing (or in addition, with --probe-too)")
    g.add_argument("--probe-too", action="store_true", help="with --traces: also run the probes and fit on both")
    g.add_argument("--engine", help="fit only this engine (traces naming several engines need it)")
    g.add_argument("--name", help="profile name (default: calibrated-<model>)")
    g.add_argument("--profile-out", type=Path, help="also write the profile here (e.g. staircase/data/profiles/default.json)")
    g.add_argument("--no-quadratic", action="store_true", help="fit prefill as a + bP (no P^2 term)")
    g.add_argument("--max-batch-size", type=int, default=256, help="when the engine cannot report it")
    g.add_argument("--kv-cache-tokens", type=int, default=40960, help="when the engine cannot report it")
    g.add_argument("--block-size-tokens", type=int, default=32, help="when the engine cannot report it")
    g.add_argument("--seed", type=seed_type, default=0)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--out", type=Path, help="results folder (default: results/calibrate-<UTC timestamp>)")
    g.add_argument("--no-figure", action="store_true", help="skip the fit figure")
    p.set_defaults(func=run_calibrate)
    _register_validate(subparsers)


def _register_validate(subparsers: argparse._SubParsersAction) -> None:
    v = subparsers.add_parser("validate", help=HELP_VAL, description=VALIDATE_DOC,
                              formatter_class=HelpFormatter)
    v.add_argument("runs", type=Path, nargs="*", help="`staircase live` results folders (held out from calibration)")
    v.add_argument("--published", type=Path, metavar="CSV",
                   help="instead of live runs: a table of published GPU runs (benchmarks/published/*.csv); each "
                        "load point predicted by an engine built from the GPU kernel database, printed against "
                        "what was measured (calibration/published.py has the columns)")
    v.add_argument("--profile", default=None, help="profile JSON or bundled name (default: the bundled default)")
    v.add_argument("--replicates", type=int, default=5, help="simulated runs per live run (noise seeds), pooled")
    v.add_argument("--seed", type=seed_type, default=0)
    v.add_argument("--tokenizer", default="auto",
                   help="how the simulator counts fixed prompt texts: auto (the run's model if cached), approx, or a folder")
    v.add_argument("--allow-other-model", action="store_true",
                   help="validate a profile fitted on another model (a warning instead of an error)")
    v.add_argument("--format", choices=("table", "json"), default="table")
    v.add_argument("--out", type=Path, help="results folder (default: results/validate-<UTC timestamp>)")
    v.add_argument("--no-figure", action="store_true", help="skip the CDF figures")
    v.set_defaults(func=run_validate)


# ------------------------------------------------------------------ profile

HELP_PROFILE = "write GPU engine profiles from a measured kernel database (offline, seconds)"
PROFILE_DOC = """Write a simulator profile of GPU engines from NVIDIA AIConfigurator's measured kernel
database (aiconfigurator-core): step times fitted over batch 1-256 and contexts to 32k
tokens, the fit's error, the KV cache the GPU's memory leaves, the engine's chunked-prefill
budget and sequence cap, the overhead terms the database omits, and the provenance.

One engine for every slot::

    staircase profile --gpu h100_sxm --backend vllm --model meta-llama/Meta-Llama-3.1-70B --tp 4 \\
        --out h100-llama70b.json

MoA engines of several models, one per slot (--model and --tp repeat; the last is the aggregator)::

    staircase profile --gpu h100_sxm --model Qwen/Qwen3-8B --model Qwen/Qwen3-32B \\
        --model meta-llama/Meta-Llama-3.1-70B --model meta-llama/Meta-Llama-3.1-70B \\
        --tp 1 --tp 2 --tp 4 --tp 4 --aggregator last --out h100-moa.json
"""


def register_profile(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help=HELP_PROFILE, description=PROFILE_DOC,
                              formatter_class=HelpFormatter)
    p.add_argument("--gpu", default="h100_sxm", help="GPU type of the database (default h100_sxm; --list-gpus)")
    p.add_argument("--backend", default="vllm", help="serving engine: vllm, sglang, trtllm (default vllm)")
    p.add_argument("--model", action="append", help="model id of the database's configs (repeat for several "
                                                     "engines; --list-models)")
    p.add_argument("--tp", action="append", type=int, help="tensor parallel size per --model (one value: all)")
    p.add_argument("--precision", default="bf16", help="bf16 or fp8 (weights and KV cache)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's fraction of GPU memory")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (chunked prefill; default: the engine's default for the GPU)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running sequences (default: the engine's)")
    p.add_argument("--engine-name", action="append", help="a name per --model for its engine (default: "
                                                          "<gpu>-<engine>-<model>-tp<N>)")
    p.add_argument("--aggregator", default="last", help="which engine is the aggregator: last, or its name")
    p.add_argument("--name", help="profile name (default: the --out file's stem)")
    p.add_argument("--out", type=Path, help="profile JSON to write (required unless listing)")
    p.add_argument("--list-gpus", action="store_true", help="print the database's GPU types and exit")
    p.add_argument("--list-models", action="store_true", help="print the database's model ids and exit")
    p.set_defaults(func=run_profile)


def _profile_specs(args: argparse.Namespace) -> list:
    """One engine spec per --model (with its --tp and --engine-name); a repeated engine
    (a MoA's proposer and its aggregator) gets a slot of its own."""
    from .gpu import GPUEngineSpec

    models = args.model or ["Qwen/Qwen3-8B"]
    tps = args.tp or [1]
    if len(tps) == 1:
        tps = tps * len(models)
    if len(tps) != len(models):
        raise ConfigError("tp", tps, f"one value, or one per --model ({len(models)})")
    names = args.engine_name or [None] * len(models)
    if len(names) != len(models):
        raise ConfigError("engine_name", names, f"one per --model ({len(models)})")
    specs, seen = [], {}
    for model, tp, name in zip(models, tps, names):
        spec = GPUEngineSpec(args.gpu, args.backend, model, tp, args.precision, name=name,
                             gpu_memory_utilization=args.gpu_memory_utilization,
                             max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
        n = seen.get(spec.label, 0)
        seen[spec.label] = n + 1
        if n:
            spec = GPUEngineSpec(**{**spec.__dict__, "name": f"{spec.label}-{n + 1}"})
        specs.append(spec)
    return specs


def run_profile(args: argparse.Namespace) -> int:
    from .gpu import build_profile, fit_summary, supported_gpus, supported_models

    if args.list_gpus or args.list_models:
        print("\n".join(supported_gpus() if args.list_gpus else supported_models()))
        return 0
    if args.out is None:
        raise ConfigError("out", None, "a path for the profile JSON (e.g. --out h100.json)")
    specs = _profile_specs(args)
    labels = [s.label for s in specs]
    if args.aggregator == "last":
        aggregator = labels[-1]
    elif args.aggregator in labels:
        aggregator = args.aggregator
    else:
        raise ConfigError("aggregator", args.aggregator, "last, or one of " + ", ".join(labels))
    proposers = [x for x in labels if x != aggregator] or [aggregator]
    profile = build_profile(specs, proposers, aggregator, args.name or args.out.stem)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    rows = pd.DataFrame(fit_summary(profile))
    print(rows.round(2).to_string(index=False))
    print(f"\nfit error: against the database's own step predictions over batch 1-256, context to 32k tokens\n"
          f"profile: {args.out} (slots: proposers {', '.join(proposers)}; aggregator {aggregator})")
    return 0


# ------------------------------------------------------------------ calibrate


def _probe_live(args, folder: Path) -> dict:
    """Probe every engine of the config; returns the run's config record."""
    from staircase.live.engines import EngineOptions, open_engines
    from staircase.topology import moa

    raw = EngineOptions.from_mapping(vars(args)).to_config()
    deployment = load_deployment(args.deployment) if args.deployment else None
    n_prop = len((raw.get("slots") or {}).get("proposers") or [1]) if isinstance(raw, dict) else 1
    if deployment is not None:
        n_prop = len(deployment.proposers)
    probes = probe_set(args.probes)
    together = args.probe_replicas == "together"
    record = run_record("calibrate", engines=raw, probes=args.probes, seed=args.seed, probed_together=together)
    with open_engines(raw, moa(max(1, n_prop)), dtype=args.dtype, deployment=deployment) as engines:
        folder.mkdir(parents=True, exist_ok=True)  # once the engines run: bad options leave no folder
        record |= engines.machine
        if deployment is not None:  # replicas <pool>/<i> and their pools' models: one fit per model
            record["deployment"] = engines.deployment.to_dict()

        caps, models = asyncio.run(_probe_each(engines.used, probes, folder, args, together))
    record |= {"engine_models": models, "capacity": caps,
               "slot_engines": {slot: e.name for slot, e in engines.slots.items()}}
    write_record(folder, record)
    return record


async def _probe_each(engines: list, probes, folder: Path, args: argparse.Namespace, together: bool):
    """Probe every engine, one after another or all at once; (capacities, models) by name."""
    caps, models = {}, {}

    async def one(engine):
        try:
            await run_probes(engine, probes, folder, seed=args.seed, progress=args.progress)
            caps[engine.name] = engine.capacity()
            models[engine.name] = engine.model_id
        finally:
            await engine.close()

    if together:
        await asyncio.gather(*(one(e) for e in engines))
    else:
        for engine in engines:
            await one(engine)
    return caps, models




def run_calibrate(args: argparse.Namespace) -> int:
    folder = args.out or results_folder(args, "calibrate")
    for name in ("max_batch_size", "kv_cache_tokens", "block_size_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(name.replace("_", "-"), getattr(args, name), "an integer >= 1")
    groups: list[RunGroup] = load_runs(args.traces) if args.traces else []  # check inputs before probing
    record = {}
    if not args.traces or args.probe_too:
        record = _probe_live(args, folder)
        groups = load_runs([folder]) + groups
    groups = [g for g in groups if not g.policy.startswith("warmup")]
    units, proposers, aggregator = fit_units(groups, args.engine, probed=bool(record))
    names = list(units)
    fits = fit_all(groups, units, quadratic=not args.no_quadratic)
    sharing = "one" if len(set(proposers + [aggregator])) == 1 else "per-slot"
    model = next((f.model for f in fits.values() if f.model), "unknown-model")
    # the machine the probes ran on: this one when probing, else what the traces recorded
    recorded = record if record.get("machine") else next((g.config for g in groups if g.config.get("machine")), {})
    machine_rec = {k: recorded[k] for k in ("machine", "engine_settings") if recorded.get(k)}
    profile = build_profile(fits, proposers, aggregator, name=args.name or f"calibrated-{model}",
                            note=profile_note(fits, machine_rec), engine_sharing=sharing,
                            capacity=_capacities(groups, names, args), proposer_factor=fit_lengths(groups),
                            extra=machine_rec)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(profile, indent=1) + "\n"
    (folder / "profile.json").write_text(text)
    if args.profile_out:
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        args.profile_out.write_text(text)
    if not args.no_figure:
        plot_fit(fits, folder / "fit.png")
    print(fit_table(fits))
    print(f"\nprofile: {folder / 'profile.json'}" + (f" and {args.profile_out}" if args.profile_out else ""))
    return 0














def _capacities(groups: list[RunGroup], names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """What each engine reported when probed (config.json of the probe folder, freshly
    written or recorded), else the command line's values."""
    caps = {}
    models = replica_models(groups)
    for e in names:
        asked = [r for r, m in models.items() if m == e] or [e]  # a model: what its first replica reported
        found = next((g.config["capacity"][a] for g in groups for a in asked if a in (g.config.get("capacity") or {})),
                     {})
        caps[e] = {k: found.get(k, getattr(args, k)) for k in ("max_batch_size", "kv_cache_tokens", "block_size_tokens")}
    return caps








# ------------------------------------------------------------------- validate


def run_validate(args: argparse.Namespace) -> int:
    from staircase.sim.profile import load_profile

    from .runs import load_live_run
    from .validate import validate

    if _inputs_of_validate(args) == "published":
        return _run_published(args)

    runs = [load_live_run(r) for r in args.runs]  # all inputs checked before any simulation
    profile = load_profile(args.profile)
    if args.replicates < 1:  # an argument error comes before any check of the runs against the profile
        raise ConfigError("replicates", args.replicates, "an integer >= 1")
    folder = args.out or results_folder(args, "validate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table, checks, notes, figures = validate(runs, profile, replicates=args.replicates, seed=args.seed,
                                                 tokenizer=args.tokenizer, allow_other_model=args.allow_other_model,
                                                 figures_folder=None if args.no_figure else folder)
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "validation.csv", index=False)
    checks.to_csv(folder / "targets.csv", index=False)
    result = {"profile": profile.name, "profile_source": profile.source, "runs": [str(r) for r in args.runs],
              "replicates": args.replicates, "seed": args.seed, "notes": notes,
              "targets": checks.to_dict(orient="records"), "rows": table.to_dict(orient="records"),
              "figures": [str(f) for f in figures]}
    (folder / "validation.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.format == "json":
        result["results"] = str(folder)
        print(json.dumps(result, indent=1, default=float))
        return 0
    print_validation(table, checks)
    print(f"\nresults: {folder}/ (validation.csv, validation.json, targets.csv"
          + (", cdf_*.png)" if figures else ")"))
    return 0


def _inputs_of_validate(args: argparse.Namespace) -> str:
    """``published`` or ``runs``: which of the two inputs validate was given (exactly one)."""
    if args.published is not None:
        if args.runs:
            raise ConfigError("runs", [str(r) for r in args.runs], "none with --published (one or the other)")
        return "published"
    if not args.runs:
        raise ConfigError("runs", [], "one or more `staircase live` results folders, or --published CSV")
    return "runs"


def _run_published(args: argparse.Namespace) -> int:
    from staircase.progress import progress

    from .published import TARGETS, check_published, plot_published, read_published, summarise

    table = read_published(args.published)  # every row checked before any engine is built
    folder = args.out or results_folder(args, "validate")
    bar = progress(len(table), "load points", None, unit="point")

    def ticking(rows):
        for row in rows:
            yield row
            bar.update()

    result = check_published(table, progress=ticking)
    bar.close()
    summary = summarise(result)
    folder.mkdir(parents=True, exist_ok=True)
    result.to_csv(folder / "published.csv", index=False)
    summary.to_csv(folder / "published_summary.csv", index=False)
    figures = [] if args.no_figure else [str(plot_published(result, folder / "published.png"))]
    out = {"published": str(args.published), "targets_abs_err": TARGETS, "summary": summary.to_dict(orient="records"),
           "figures": figures}
    (folder / "published.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    if args.format == "json":
        out["results"] = str(folder)
        print(json.dumps(out, indent=1, default=float))
        return 0
    cols = ["source", "tp", "precision", "isl", "osl", "concurrency", "ttft_ms", "pred_ttft_ms", "tpot_ms",
            "pred_tpot_ms", "output_tok_s", "pred_output_tok_s"]
    shown = result[cols].copy()
    for m in ("ttft_ms", "tpot_ms", "output_tok_s"):
        shown[f"err_{m[:-3] if m.endswith('_ms') else m}_%"] = (100 * result[f"err_{m}"]).round(1)
    print(shown.round(1).to_string(index=False) if len(shown) <= 60 else shown.round(1).head(60).to_string(
        index=False) + f"\n... {len(shown) - 60} more rows in published.csv")
    print("\nper source (|predicted / measured - 1|):")
    print(summary.round(1).to_string(index=False))
    print(f"\nresults: {folder}/ (published.csv, published_summary.csv, published.json"
          + (", published.png)" if figures else ")"))
    return 0




