"""`staircase serve`'s own cost at production rates, on a fleet of emulated GPU engines.

`staircase emulate` serves the engines of a deployment (default: the plan's Azure H100
deployment, 7 engines of `h100-moa`) in real time; `staircase serve` runs MoA 6 + 1 with
the staircase (r = 2, proposers of 512 tokens, answers of 256) in front of it; this
script is the load client, on the same cores: closed loops of N users and the Azure
conversation hour's arrivals at 1x, 2x, 4x its rate, 200-word prompts.

Per request it splits the latency the client sees from the engines' own: the emulator
records when every call arrived and when each of its writes left (one clock, the
machine's monotonic one), so

- added TTFT = (the request's first call reaching an engine - the client's send)
  + (the first answer token reaching the client - the aggregator writing it): the
  gateway's edges. Its reaction inside (a proposer's chunk -> the aggregator's next
  call) counts as the engines' share here;
- added ITL = for each answer token after the first, its delay to the client minus the
  previous token's (delay = client receipt - the engine's write);
- the gateway's CPU seconds per streamed token (every token of every call it read,
  plus the answer's it wrote) and its resident memory, from /proc.

    .venv/bin/python benchmarks/gateway_scale.py                          # ~6 min
    .venv/bin/python benchmarks/gateway_scale.py --users 8 --azure '' --duration 10 --out /tmp/gs

Targets (the issue's): added TTFT p50 <= 5 ms, p99 <= 25 ms, added ITL p99 <= 10 ms.
Writes <out>/gateway-scale.json and .csv, and keeps the emulator's and server's folders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STAIRCASE = [sys.executable, "-m", "staircase"]
DEPLOYMENT = ROOT / "benchmarks/results/plan-azure-h100/deployment-staircase-prefix-cache-r2.json"
TARGETS = {"added_ttft_p50_ms": 5.0, "added_ttft_p99_ms": 25.0, "added_itl_p99_ms": 10.0}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(url: str, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not start: see {log}\n{log.read_text()[-2000:]}")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)


def start_fleet(args, out: Path, workers: int = 1) -> tuple[subprocess.Popen, subprocess.Popen, int, int]:
    """(emulator, server, emulator port, server port), both answering."""
    emu_port, srv_port = free_port(), free_port()
    fleet = ["--deployment", str(args.deployment)] if args.deployment else ["--replicas", "1"]
    emu = start([*STAIRCASE, "emulate", "--profile", args.profile, *fleet, "--port", str(emu_port),
                 "--record-writes", "--out", str(out / "emulate")], out / "emulate.log")
    wait_until(f"http://127.0.0.1:{emu_port}/metrics", emu, "staircase emulate", out / "emulate.log")
    cmd = [*STAIRCASE, "serve", "--config", str(out / "emulate/engines.json"),
           "--deployment", str(out / "emulate/deployment.json"), "--proposers", str(args.proposers),
           "--policies", args.policy, "--redundancy", str(args.redundancy), "--max-tokens", str(args.proposer_tokens),
           "--answer-tokens", str(args.answer_tokens), "--max-in-flight", "4096", "--port", str(srv_port),
           "--workers", str(workers), "--out", str(out / "serve"), *args.serve_args.split()]
    srv = start(cmd, out / "serve.log")
    wait_until(f"http://127.0.0.1:{srv_port}/health", srv, "staircase serve", out / "serve.log")
    return emu, srv, emu_port, srv_port


class Client:
    """The load client: streamed chat completions, every answer token's arrival kept."""

    def __init__(self, url: str, args, model: str = "staircase", headers: dict | None = None, **body):
        """``body``: more fields of each request (e.g. ``max_tokens``)."""
        self.url, self.args, self.model, self.headers, self.body = url, args, model, headers or {}, body
        self.prompt = " ".join(f"w{i % 97}" for i in range(args.prompt_words))
        self.results: list[dict] = []

    async def one(self, session, k: int) -> None:
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"q{k} {self.prompt}"}], **self.body}
        r = {"sent_s": time.monotonic(), "tokens_s": [], "job": None, "status": 0, "error": ""}
        try:
            async with session.post(self.url, json=body, headers=self.headers) as resp:
                r["status"] = resp.status
                async for raw in resp.content:
                    if not raw.startswith(b"data: {"):
                        continue
                    now = time.monotonic()
                    event = json.loads(raw[6:])
                    if "error" in event:
                        r["error"] = str(event["error"].get("message"))[:80]
                        continue
                    if r["job"] is None and event.get("id", "").startswith("chatcmpl-staircase-"):
                        r["job"] = int(event["id"].rsplit("-", 1)[1])
                    for ch in event.get("choices") or ():
                        n = (ch.get("delta") or {}).get("content", "").count(" x")
                        r["tokens_s"].extend([now] * n)
        except Exception as err:  # a failed request is a row too
            r["error"] = type(err).__name__
        r["end_s"] = time.monotonic()
        self.results.append(r)

    async def closed(self, users: int, duration_s: float) -> None:
        import aiohttp

        end = time.monotonic() + duration_s
        counter = iter(range(10**9))

        async def user(session):
            while time.monotonic() < end:
                await self.one(session, next(counter))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            await asyncio.gather(*(user(session) for _ in range(users)))

    async def open(self, arrivals: list[float]) -> None:
        import aiohttp

        t0, tasks = time.monotonic(), []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            for k, at in enumerate(arrivals):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                tasks.append(asyncio.create_task(self.one(session, k)))
            await asyncio.gather(*tasks)


def azure_arrivals(scale: float, duration_s: float) -> list[float]:
    from staircase.workload import Workload, arrival_times

    times = arrival_times(Workload(kind="azure", requests=100_000, time_scale=scale), 0)
    return [t for t in times if t < duration_s]


def gateway_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, resident MiB) of a process and its children (``serve --workers``)."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    cpu = sum(t.user + t.system for t in (p.cpu_times() for p in procs))
    return cpu, sum(p.memory_info().rss for p in procs) / 2**20


def fetch_calls(emu_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{emu_port}/emulator/calls?clear=1", timeout=60) as r:
        return json.load(r)


def split(results: list[dict], calls: list[dict], final_node: str) -> dict:
    """Per request, the gateway's added TTFT and ITLs (module docstring) from the client's
    times and the emulator's calls."""
    by_job: dict[int, list[dict]] = {}
    for c in calls:
        tag, node, _ = c["request_id"].rsplit("-", 2)
        c["node"] = node
        by_job.setdefault(int(tag.rsplit("-", 2)[1]), []).append(c)
    added_ttft, added_itl, delay, engine_ttft, inbound = [], [], [], [], []
    for r in results:
        mine = by_job.get(r["job"])
        if not mine or not r["tokens_s"]:
            continue
        final = sorted((c for c in mine if c["node"] == final_node and c["writes"]), key=lambda c: c["arrived_s"])
        if not final:
            continue
        written = [t for c in final for t, n in _per_token(c["writes"])]
        first_in = min(c["arrived_s"] for c in mine)
        inbound.append(first_in - r["sent_s"])
        added_ttft.append(inbound[-1] + (r["tokens_s"][0] - written[0]))
        engine_ttft.append(final[0]["first_due_s"] - first_in)
        d = [a - b for a, b in zip(r["tokens_s"], written)]
        delay += d
        added_itl += [d[i] - d[i - 1] for i in range(1, len(d))]
    return {"added_ttft": added_ttft, "added_itl": added_itl, "delay": delay, "engine_ttft": engine_ttft,
            "inbound": inbound}


def _per_token(writes: list) -> list[tuple[float, int]]:
    """(time, index) of every token of a call, from its flat [time, tokens so far, ...] writes."""
    out, before = [], 0
    for t, total in zip(writes[::2], writes[1::2]):
        total = int(total)
        out += [(t, i) for i in range(before, total)]
        before = total
    return out


def busiest_share(ok: list[dict], workers: int) -> float:
    """The share of the answered requests the busiest worker took (worker k numbers its
    requests k, k + n, ...: the completion id says which)."""
    jobs = [r["job"] % workers for r in ok if r["job"] is not None]
    return float(np.bincount(jobs, minlength=workers).max() / len(jobs)) if jobs else math.nan


def highest_within(df: pd.DataFrame) -> dict:
    """Per worker count: the highest request rate of a point within the targets (None: none was)."""
    return {int(w): (float(g[g.within_targets].requests_per_s.max()) if g.within_targets.any() else None)
            for w, g in df.groupby("workers")}


def pct(xs, q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if len(xs) else math.nan


def summarize(point: dict, client: Client, calls: dict, cpu_s: tuple[float, float], rss_mib: float,
              final_node: str) -> dict:
    """One point's row; ``cpu_s`` is the gateway's and the emulator's CPU seconds over it."""
    ok = [r for r in client.results if r["status"] == 200 and not r["error"] and r["tokens_s"]]
    parts = split(ok, calls["calls"], final_node)
    ttft = [r["tokens_s"][0] - r["sent_s"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["tokens_s"], r["tokens_s"][1:])]
    e2e = [r["end_s"] - r["sent_s"] for r in ok]
    span = max(r["end_s"] for r in client.results) - min(r["sent_s"] for r in client.results)
    streamed = sum(c["output_tokens"] for c in calls["calls"]) + sum(len(r["tokens_s"]) for r in ok)
    row = point | {
        "requests": len(client.results), "ok": len(ok), "requests_per_s": len(ok) / span,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_mean_ms": float(np.mean(itl)) * 1000,
        "e2e_p50_s": pct(e2e, 50) / 1000, "engine_ttft_p50_ms": pct(parts["engine_ttft"], 50),
        "added_ttft_p50_ms": pct(parts["added_ttft"], 50), "added_ttft_p99_ms": pct(parts["added_ttft"], 99),
        "added_itl_p50_ms": pct(parts["added_itl"], 50), "added_itl_p99_ms": pct(parts["added_itl"], 99),
        "inbound_p50_ms": pct(parts["inbound"], 50), "inbound_p99_ms": pct(parts["inbound"], 99),
        "delay_p50_ms": pct(parts["delay"], 50), "delay_p99_ms": pct(parts["delay"], 99),
        "tokens_streamed_per_s": streamed / span, "gateway_cpu_us_per_token": cpu_s[0] / max(1, streamed) * 1e6,
        "gateway_cpu_share": cpu_s[0] / span, "emulator_cpu_share": cpu_s[1] / span, "gateway_rss_mib": rss_mib,
        "emulator_lag_ms_max": calls["lag_s_max"] * 1000, "matched": len(parts["added_ttft"]),
        "busiest_worker_share": busiest_share(ok, point.get("workers", 1))}
    row["within_targets"] = bool(all(row[k] <= v for k, v in TARGETS.items()))
    return row


async def run_point(point: dict, args, srv_port: int, emu_port: int, srv_pid: int, emu_pid: int) -> dict:
    client = Client(f"http://127.0.0.1:{srv_port}/v1/chat/completions", args)
    cpu0, _ = gateway_usage(srv_pid)
    emu0, _ = gateway_usage(emu_pid)
    if point["load"] == "closed":
        await client.closed(point["users"], args.duration)
    else:
        await client.open(azure_arrivals(point["scale"], args.duration))
    cpu1, rss = gateway_usage(srv_pid)
    emu1, _ = gateway_usage(emu_pid)
    await asyncio.sleep(0.5)  # the last calls' records
    calls = await asyncio.to_thread(fetch_calls, emu_port)
    return summarize(point, client, calls, (cpu1 - cpu0, emu1 - emu0), rss, args.final_node)


def points(args) -> list[dict]:
    out = [{"load": "closed", "users": int(u), "scale": None} for u in args.users.split(",") if u]
    out += [{"load": "azure", "users": None, "scale": float(s)} for s in args.azure.split(",") if s]
    return out


COLUMNS = ["workers", "load", "users", "scale", "ok", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_mean_ms", "e2e_p50_s",
           "added_ttft_p50_ms", "added_ttft_p99_ms", "added_itl_p99_ms", "gateway_cpu_us_per_token",
           "gateway_cpu_share", "gateway_rss_mib", "emulator_cpu_share", "emulator_lag_ms_max", "busiest_worker_share", "within_targets"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="8,32,96", help="closed-loop user counts, comma-separated ('' for none)")
    p.add_argument("--azure", default="1,2,4", help="Azure-hour rate multiples, comma-separated ('' for none)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load per point")
    p.add_argument("--profile", default="h100-moa")
    p.add_argument("--deployment", type=Path, default=DEPLOYMENT, help="the fleet's pools (a plan's deployment)")
    p.add_argument("--policy", default="staircase-prefix-cache")
    p.add_argument("--redundancy", type=int, default=2)
    p.add_argument("--proposers", type=int, default=6)
    p.add_argument("--proposer-tokens", type=int, default=512)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--final-node", default="agg", help="the topology's final node (whose tokens are the answer)")
    p.add_argument("--workers", default="1", help="gateway processes (`serve --workers`), comma-separated: each "
                   "count runs every point on a fresh fleet, e.g. '1,2'")
    p.add_argument("--serve-args", default="", help="more `staircase serve` options")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def run_fleet(args, out: Path, workers: int) -> list[dict]:
    """Every point on a fresh emulator and a server of ``workers`` processes."""
    out.mkdir(parents=True, exist_ok=True)
    emu, srv, emu_port, srv_port = start_fleet(args, out, workers)
    rows = []
    try:
        for point in points(args):
            row = asyncio.run(run_point(point | {"workers": workers}, args, srv_port, emu_port, srv.pid, emu.pid))
            rows.append(row)
            print(pd.DataFrame(rows)[COLUMNS].tail(1).to_string(index=False, float_format=lambda v: f"{v:.3g}"),
                  flush=True)
    finally:
        for proc in (srv, emu):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in (srv, emu):
            proc.wait(90)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or ROOT / "results" / f"gateway-scale-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    for workers in counts:
        rows += run_fleet(args, out if len(counts) == 1 else out / f"workers-{workers}", workers)
    df = pd.DataFrame(rows)
    df.to_csv(out / "gateway-scale.csv", index=False)
    from staircase.machine import describe_cpu as describe

    (out / "gateway-scale.json").write_text(json.dumps(
        {"machine": describe(), "targets": TARGETS, "args": {k: str(v) for k, v in vars(args).items()},
         "highest_within_targets_req_per_s": highest_within(df), "rows": rows}, indent=1) + "\n")
    print(df[COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"highest rate within the targets, by workers: {highest_within(df)}")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
