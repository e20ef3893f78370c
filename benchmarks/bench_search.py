"""Policy search at scale: 1,000 policies x 1,000 requests, timed, on processes over
every core, and (``--ray``) the same search on a local 2-worker Ray cluster, which
must give identical results for the same seed.

    python benchmarks/bench_search.py                 # 1000 x 1000, processes
    python benchmarks/bench_search.py --ray           # and on a local Ray cluster
    python benchmarks/bench_search.py --policies 100 --requests 200

Scenario: the bundled CPU profile, MoA 3 proposers + aggregator, Poisson arrivals at
0.5 of the measured capacity, answers up to 128 tokens; random search over staircase
and wait-all knobs (random: every candidate is a new draw, the cost is the simulator's).
Writes benchmarks/results/search-<cpu>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Ray on Linux maps 127.0.0.1 to the network address unless this is 0 (before Ray is imported):
# the local cluster and this driver stay on loopback
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

OUT = Path(__file__).parent / "results"


def _config(policies: int, requests: int, **kw):
    from staircase.search.run import SearchConfig, make_scenarios
    from staircase.search.space import SearchSpace
    from staircase.workload import Workload
    from staircase.topology import moa

    topo = moa(3)
    scen = make_scenarios([None], topo, Workload("poisson", requests, 1.0, query_tokens=120, output_tokens=128), [0.5],
                          max_tokens=128, seed=0)
    return SearchConfig(SearchSpace(["staircase", "wait-all"], topo), scen, ["ttft_p90", "stall_p50", "e2e_p50"],
                        method="random", budget=policies, batch=32, **kw)


def timed_search(folder: Path, policies: int, requests: int, **kw) -> tuple[float, list]:
    from staircase.search.run import run_search

    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    study = run_search(_config(policies, requests, **kw), folder, progress=True)
    return time.perf_counter() - started, [(t.user_attrs.get("key"), t.values) for t in study.trials]


def on_ray(folder: Path, policies: int, requests: int) -> tuple[float, list]:
    from staircase.live.engines import free_port

    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    subprocess.run([str(ray), "start", "--head", "--num-cpus=2", f"--port={port}", "--include-dashboard=false",
                    "--disable-usage-stats", "--node-ip-address=127.0.0.1"], check=True, capture_output=True,
                   env=dict(os.environ))
    try:
        return timed_search(folder, policies, requests, ray=f"127.0.0.1:{port}")
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--ray", action="store_true", help="also run it on a local 2-worker Ray cluster and compare")
    args = ap.parse_args()
    from staircase.machine import describe_cpu

    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    wall, local = timed_search(tmp / "processes", args.policies, args.requests, workers=os.cpu_count() or 1)
    row = {"policies": args.policies, "requests": args.requests, "cores": os.cpu_count(), "processes_wall_s": wall,
           "evaluations_per_s": args.policies / wall, "cpu": describe_cpu()}
    print(f"processes: {args.policies} policies x {args.requests} requests in {wall:.1f} s "
          f"({args.policies / wall:.2f} policies/s, {args.policies * args.requests / wall:,.0f} simulated requests/s)")
    if args.ray:
        ray_wall, remote = on_ray(tmp / "ray", args.policies, args.requests)
        row |= {"ray_wall_s": ray_wall, "ray_identical": remote == local}
        print(f"ray (local, 2 workers): {ray_wall:.1f} s; identical results: {remote == local}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"search-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(row, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
