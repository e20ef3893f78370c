"""A hundred thousand histories: the scheduler's stateful tests (tests/test_scheduler_stateful.py,
beside this script, which imports it) as a benchmark. Each history is a random valid policy (every kind, adaptive ones
included) on a random MoA or debate topology, driven through up to ``--steps`` random
events (chunk arrivals in any order, finishes, failures: faults, timers) and checked
after every step against the reference model's invariants. The test suite runs 300;
this runs ``--histories`` in ``--workers`` processes and prints the count, the time and
the violations (0, or the first one hypothesis found, shrunk).

    .venv/bin/python tests/bench_histories.py                      # 100,000 histories
    .venv/bin/python tests/bench_histories.py --histories 2000     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 2000  # histories per task (hypothesis runs them as one test, then the next task starts afresh)


def _run(n: int, steps: int) -> dict:
    """``n`` histories in this process: (histories, steps taken, violation or None)."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    from test_scheduler_stateful import SchedulerMachine

    count = {"histories": n, "machines_built": 0, "steps": 0}  # hypothesis runs n valid histories (fewer: a violation)

    class Counted(SchedulerMachine):
        def __init__(self):
            super().__init__()
            count["machines_built"] += 1  # valid histories, and the draws hypothesis discards

        def check_invariants(self, settings_, output, runtimes):  # called after every step
            count["steps"] += 1
            return super().check_invariants(settings_, output, runtimes)

    started = time.perf_counter()
    try:
        run_state_machine_as_test(Counted, settings=settings(
            max_examples=n, stateful_step_count=steps, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
        violation = None
    except Exception as err:  # a violated invariant or a crash: hypothesis has shrunk it (or tried to)
        text = traceback.format_exc(limit=4)
        # the steps that led there (hypothesis's notes) and the assertion itself, which ends the first line block
        violation = f"{type(err).__name__}: {str(err)[:2000]}\n...\n{text[-4000:]}"
    return count | {"violation": violation, "seconds": time.perf_counter() - started}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=40, help="most events per history")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "histories")
    args = p.parse_args()
    from staircase.machine import describe_cpu

    tasks = [min(CHUNK, args.histories - i) for i in range(0, args.histories, CHUNK)]
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        for i, r in enumerate(pool.map(_run, tasks, [args.steps] * len(tasks))):
            results.append(r)
            print(f"task {i + 1}/{len(tasks)}: {r['histories']} histories, {r['steps']} steps, "
                  f"{r['seconds']:.0f} s, violation: {'none' if r['violation'] is None else 'YES'}",
                  file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    out = {"histories": sum(r["histories"] for r in results), "machines_built": sum(r["machines_built"] for r in results),
           "steps": sum(r["steps"] for r in results),
           "violations": sum(r["violation"] is not None for r in results), "minutes": round(wall / 60, 2),
           "workers": args.workers, "machine": describe_cpu(),
           "first_violation": next((r["violation"] for r in results if r["violation"]), None)}
    print(json.dumps(out, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    (args.out / f"histories-{stamp}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 1 if out["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
