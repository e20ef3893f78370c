"""A plan's pick checked on real engines: does the deployment `staircase plan` picks meet
the SLOs live, and does the next smaller one miss them, as the simulator predicts?

On these CPUs: the bundled model on `vllm serve` replicas of one core each (the profile
fitted on such replicas in `calibration/data/cpu-avx2-pool-apart/`), MoA 3 + aggregator,
held-out AlpacaEval prompts at a Poisson rate. Both deployments run live (one replica on
one core; two replicas on one core each); then the plan sizes for the first live run's
own traffic (``--workload run --trace <live run>``: its arrival times and recorded
query and answer lengths, no file made for it), and the SLO attainment of each live run
is set beside the plan's prediction. About 15 minutes on 2 cores. ``--plan-only``: the
plan again on the live runs already in ``--out``.

    .venv/bin/python benchmarks/plan_live_check.py                # writes results/plan-live/
    .venv/bin/python benchmarks/plan_live_check.py --requests 8 --out /tmp/pl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
    if not args.plan_only:
        live_step(args)
    compare(args, plan_step(args))
    return 0


def _common(args) -> list[str]:
    return ["--max-tokens", str(args.max_tokens), "--policies", args.policy, "--redundancy", "1"]


def plan_step(args) -> dict[int, dict[str, float]]:
    """The plan on the first live run's traffic; returns each simulated size's SLO attainment."""
    out, slos = args.out, args.slo
    plan = run(STAIRCASE + ["plan", "--profile", str(PROFILE), "--deployment", str(out / "deployment-1.json"),
                            "--workload", "run", "--trace", str(out / "live-1"), "--routers", args.router,
                            "--max-engines", "2", "--no-goodput", "--workers", "1", "--format", "json",
                            "--out", str(out / "plan"), *sum([["--slo", s] for s in slos], []), *_common(args)],
               out / "plan.log")
    frontier = pd.read_csv(out / "plan" / "frontier.csv")
    predicted = {int(r.engines): {s: r[f"attainment {s}"] for s in slos} for _, r in frontier.iterrows()}
    print(json.dumps({"plan": json.loads(plan.stdout)["policies"], "predicted": predicted}, indent=1, default=str))
    return predicted


def live_step(args) -> None:
    """Both deployments live, the same prompts at the same arrival times."""
    for n in (1, 2):
        run(STAIRCASE + ["live", "--config", str(args.out / f"engines-{n}.json"), "--deployment",
                         str(args.out / f"deployment-{n}.json"), "--prompts", "alpaca_eval", "--skip", str(args.skip),
                         "--requests", str(args.requests), "--rate", str(args.rate), "--seed", str(args.seed),
                         "--no-progress", "--no-figure", "--out", str(args.out / f"live-{n}"), *_common(args)],
            args.out / f"live-{n}.log")


def compare(args, predicted: dict) -> None:
    """Each live run's SLO attainment beside the plan's (check.csv)."""
    out, slos, rows = args.out, args.slo, []
    for n in (1, 2):
        for policy, att in live_attainment(out / f"live-{n}", slos).items():
            rows.append({"replicas": n, "policy": policy, **{f"live {s}": v for s, v in att.items()},
                         **{f"sim {s}": predicted.get(n, {}).get(s) for s in slos}})
    table = pd.DataFrame(rows)
    table.to_csv(out / "check.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    raise SystemExit(main())
