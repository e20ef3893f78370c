"""A plan's pick checked on real engines: does the deployment `staircase plan` picks meet
the SLOs live, and does the next smaller one miss them, as the simulator predicts?

On these CPUs: the bundled model on `vllm serve` replicas of one core each (the profile
fitted on such replicas in `calibration/data/cpu-avx2-pool-apart/`), MoA 3 + aggregator,
held-out AlpacaEval prompts at a Poisson rate. The plan sees the live run's own
workload: a trace file with the same arrival times (the live runner's generator and
seed) and the prompts' token counts. Then both deployments run live (one replica on one
core; two replicas on one core each) and the SLO attainment of each live run is set
beside the plan's prediction. About 15 minutes on 2 cores.

    .venv/bin/python benchmarks/plan_live_check.py                # writes results/plan-live/
    .venv/bin/python benchmarks/plan_live_check.py --requests 8 --out /tmp/pl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STAIRCASE = [sys.executable, "-m", "staircase"]
PROFILE = ROOT / "calibration" / "data" / "cpu-avx2-pool-apart" / "profile.json"


def engines(replicas: int) -> dict:
    """The bundled model on `vllm serve`, one core per replica (cores 0 and 1)."""
    threads = [str(i) for i in range(replicas)]
    return {"engines": {"cpu": {"kind": "serve", "model": "smollm2", "threads": threads if replicas > 1 else "0"}},
            "slots": {"proposers": ["cpu"], "aggregator": "cpu"}}


def deployment(replicas: int, router: str) -> dict:
    return {"pools": {"cpu": {"model": "cpu", "replicas": replicas, "router": router}},
            "slots": {"proposers": ["cpu"], "aggregator": "cpu"}}


def trace_file(path: Path, args) -> Path:
    """The live run's workload as an Azure-format trace: its arrival times (the live
    runner's generator, ``staircase.live.runner``) and each prompt's token count."""
    from transformers import AutoTokenizer

    from staircase.live.model import smollm2_folder
    from staircase.live.prompts import load_prompts
    from staircase.live.runner import poisson_arrivals

    prompts = load_prompts("alpaca_eval", args.requests + args.skip)[args.skip:]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    arrivals = poisson_arrivals(len(prompts), args.rate, args.seed)
    t0 = datetime(2026, 1, 1)
    rows = [{"TIMESTAMP": (t0 + timedelta(seconds=a)).isoformat(sep=" "), "ContextTokens": len(tokenizer(p)["input_ids"]),
             "GeneratedTokens": args.max_tokens} for a, p in zip(arrivals, prompts)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out


def live_attainment(folder: Path, slos: list[str]) -> dict[str, float]:
    from staircase.search.objectives import SLO
    from staircase.trace import read_requests

    return {path.name.removesuffix(".requests.parquet"): {s: SLO.parse(s).attainment(read_requests(path)) for s in slos}
            for path in sorted((folder / "traces").glob("*.requests.parquet"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--skip", type=int, default=8, help="prompts calibration never saw start here")
    p.add_argument("--rate", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--slo", action="append", default=None)
    p.add_argument("--policy", default="staircase-prefix-cache")
    p.add_argument("--router", default="least-loaded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-only", action="store_true", help="the plan alone (no engines)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "plan-live")
    args = p.parse_args()
    args.slo = args.slo or ["ttft_p90<=3", "e2e_p50<=20"]
    args.out.mkdir(parents=True, exist_ok=True)
    for n in (1, 2):
        (args.out / f"deployment-{n}.json").write_text(json.dumps(deployment(n, args.router), indent=1))
        (args.out / f"engines-{n}.json").write_text(json.dumps(engines(n), indent=1))
    predicted = plan_step(args)
    if not args.plan_only:
        live_step(args, predicted)
    return 0


def _common(args) -> list[str]:
    return ["--max-tokens", str(args.max_tokens), "--policies", args.policy, "--redundancy", "1"]


def plan_step(args) -> dict[int, dict[str, float]]:
    """The plan on the live run's workload; returns each simulated size's SLO attainment."""
    out, slos = args.out, args.slo
    trace = trace_file(out / "workload.csv", args)
    plan = run(STAIRCASE + ["plan", "--profile", str(PROFILE), "--deployment", str(out / "deployment-1.json"),
                            "--workload", "azure", "--trace", str(trace), "--routers", args.router,
                            "--max-engines", "2", "--no-goodput", "--workers", "1", "--format", "json",
                            "--out", str(out / "plan"), *sum([["--slo", s] for s in slos], []), *_common(args)],
               out / "plan.log")
    frontier = pd.read_csv(out / "plan" / "frontier.csv")
    predicted = {int(r.engines): {s: r[f"attainment {s}"] for s in slos} for _, r in frontier.iterrows()}
    print(json.dumps({"plan": json.loads(plan.stdout)["policies"], "predicted": predicted}, indent=1, default=str))
    return predicted


def live_step(args, predicted: dict) -> None:
    """Both deployments live; each run's SLO attainment beside the plan's (check.csv)."""
    out, slos, rows = args.out, args.slo, []
    for n in (1, 2):
        folder = out / f"live-{n}"
        run(STAIRCASE + ["live", "--config", str(out / f"engines-{n}.json"), "--deployment",
                         str(out / f"deployment-{n}.json"), "--prompts", "alpaca_eval", "--skip", str(args.skip),
                         "--requests", str(args.requests), "--rate", str(args.rate), "--seed", str(args.seed),
                         "--no-progress", "--no-figure", "--out", str(folder), *_common(args)], out / f"live-{n}.log")
        for policy, att in live_attainment(folder, slos).items():
            rows.append({"replicas": n, "policy": policy, **{f"live {s}": v for s, v in att.items()},
                         **{f"sim {s}": predicted.get(n, {}).get(s) for s in slos}})
    table = pd.DataFrame(rows)
    table.to_csv(out / "check.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    raise SystemExit(main())
