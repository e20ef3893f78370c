"""`staircase serve` under overload: arrivals at twice its capacity for a while. Does it
answer 429 past its bound (--max-in-flight) instead of queueing, keep its memory
bounded, answer /health within a second throughout, and end every request it accepted?

Capacity is measured first on the same server: --max-in-flight users in a closed loop
for --probe-s seconds (requests finished per second). Then Poisson arrivals at
--factor x that rate for --seconds, every request sent to 127.0.0.1 only; /health is
polled every 0.25 s and the server's memory (its process and children: the in-process
engine's core) every second.

    .venv/bin/python benchmarks/serve_overload.py                          # bundled model, ~4 min on 2 cores
    .venv/bin/python benchmarks/serve_overload.py --config replay.json --seconds 10 --probe-s 5

Prints one JSON object (also <out>/overload.json): capacity, sent, 200s, 429s, other
statuses, accepted requests that did not end (must be 0), slowest /health, peak RSS
and RSS before the overload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "staircase", "messages": [{"role": "user", "content": "Name three uses of copper."}]}


def start(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "staircase", "serve", "--port", str(port), "--max-in-flight",
           str(args.max_in_flight), "--max-tokens", str(args.max_tokens), "--out", str(args.out / "serve")]
    cmd += ["--config", str(args.config)] if args.config else []
    args.out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(args.out / "serve.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    end = time.monotonic() + 900
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"staircase serve did not start: {args.out / 'serve.log'}")


async def capacity(client: httpx.AsyncClient, url: str, users: int, seconds: float) -> float:
    """Requests finished per second by ``users`` in a closed loop for ``seconds``."""
    done, end = [], time.monotonic() + seconds
    t0 = time.monotonic()

    async def user():
        while time.monotonic() < end:
            r = await client.post(url, json=BODY)
            if r.status_code == 200:
                done.append(time.monotonic())
    await asyncio.gather(*(user() for _ in range(users)))
    return len(done) / (time.monotonic() - t0)


async def watch(base: str, pid: int, stop: asyncio.Event, out: dict) -> None:
    """/health latency every 0.25 s, the server's RSS (with children) every second."""
    proc, last_mem = psutil.Process(pid), 0.0
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                await c.get(f"{base}/health")
                out["health_max_s"] = max(out["health_max_s"], time.perf_counter() - t)
            except httpx.HTTPError:
                out["health_failures"] += 1
            if time.monotonic() - last_mem >= 1:
                rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                out["rss_peak_mb"], last_mem = max(out["rss_peak_mb"], rss / 2**20), time.monotonic()
            await asyncio.sleep(0.25)


async def overload(client: httpx.AsyncClient, url: str, rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at ``rate`` for ``seconds``; every accepted request awaited to its end."""
    rng, statuses, tasks = random.Random(seed), {}, []

    async def one():
        try:
            r = await client.post(url, json=BODY)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        except httpx.HTTPError as err:
            statuses[type(err).__name__] = statuses.get(type(err).__name__, 0) + 1
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(rng.expovariate(rate))
    done, pending = await asyncio.wait(tasks, timeout=900)
    return {"sent": len(tasks), "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "not_ended": len(pending)}


async def measure(args, port: int, pid: int) -> dict:
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        cap = await capacity(client, url, args.max_in_flight, args.probe_s)
        proc = psutil.Process(pid)
        before = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
        seen = {"health_max_s": 0.0, "health_failures": 0, "rss_peak_mb": before}
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(base, pid, stop, seen))
        result = await overload(client, url, args.factor * cap, args.seconds, args.seed)
        stop.set()
        await watcher
    return {"capacity_per_s": round(cap, 4), "arrival_rate_per_s": round(args.factor * cap, 4),
            "seconds": args.seconds, "max_in_flight": args.max_in_flight, **result,
            "health_max_s": round(seen["health_max_s"], 4), "health_failures": seen["health_failures"],
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(seen["rss_peak_mb"], 1)}


def main() -> int:
    from staircase.live.engines import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="engines config (default: the bundled model)")
    p.add_argument("--max-in-flight", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--probe-s", type=float, default=40.0, help="how long capacity is measured")
    p.add_argument("--factor", type=float, default=2.0, help="arrivals at this multiple of capacity")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "serve-overload")
    args = p.parse_args()
    port = free_port()
    proc = start(args, port)
    try:
        result = asyncio.run(measure(args, port, proc.pid))
    finally:
        proc.terminate()
        proc.wait(300)
    result["cpu"] = _cpu()
    (args.out / "overload.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


def _cpu() -> str:
    from staircase.machine import describe_cpu, label

    return label(describe_cpu())


if __name__ == "__main__":
    sys.exit(main())
