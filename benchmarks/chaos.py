"""Chaos run: live requests while faults strike at random moments. Does every request
end (finished, or an error naming its lost inputs, within the request timeout), are
every ended request's rows on disk, and does nothing hang?

MoA with three proposers and an aggregator, the staircase at r = 1 (one lost input is
ridden out). Each proposer runs on its own vLLM server (``VLLMServer``, 127.0.0.1);
proposer 0 is reached through a proxy (``staircase.live.chaos.ChaosProxy``); the aggregator is
an in-process engine. From a seed (``staircase.live.chaos.draw_faults``), at Poisson moments:

- kill: a proposer server SIGKILLed, then started again on its port;
- freeze: a proposer server SIGSTOPped for 2-20 s (its calls lost past the stall
  limits, or slow but alive below them), then SIGCONT;
- http503 / http429: the proxy answers the next 1-4 calls so;
- cut: the proxy cuts the next 1-4 streams off after 3 events;
- once, the aggregator's engine core frozen for longer than the request timeout: the
  requests it holds fail with that reason and the rest go on once it thaws.

Rows are flushed to disk every second as requests end (``staircase.live.gateway.rowlog.RowLog``), then
read back: an ended request without its rows is a row lost. A request that outlives
its timeout by 30 s counts as hung.

    .venv/bin/python benchmarks/chaos.py                     # 100 requests, ~10 min on 2 cores
    .venv/bin/python benchmarks/chaos.py --requests 10 --every-s 4 --request-timeout-s 20

Prints the table and one JSON object (also <out>/chaos.json); <out>/faults.csv logs
every fault, <out>/timeline.png shows requests and faults, <out>/traces the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from staircase.live.chaos import AGGREGATOR_FREEZE, KINDS, ChaosProxy, Fault, ProcessFaults, draw_faults  # noqa: E402
from staircase.cli import seed_type  # noqa: E402
from staircase.runconfig import parse_float_list  # noqa: E402

HANG_GRACE_S = 30.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=100, help="live requests (default 100)")
    p.add_argument("--rate", type=float, default=0.25,
                   help="Poisson arrivals per second (default 0.25; 0: a closed loop of --concurrency users)")
    p.add_argument("--concurrency", type=int, default=4, help="users in a closed loop with --rate 0 (default 4)")
    p.add_argument("--max-out", type=int, default=1,
                   help="proposer servers out (killed or frozen) at a time at most: a kill or freeze past it is "
                        "skipped (default 1: what r = 1 rides out; 0: no limit)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer and per proposal (default 32)")
    p.add_argument("--prompts", default="alpaca_eval", help="mt_bench, alpaca_eval or a JSONL file")
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the fault plan (default 0)")
    p.add_argument("--every-s", type=float, default=8.0, help="mean seconds between faults (default 8)")
    p.add_argument("--faults-for-s", type=float, default=None,
                   help="inject proposer faults only in the first N s (default: the whole run)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"fault kinds (default {','.join(KINDS)})")
    p.add_argument("--freeze-s", default="2,20", help="shortest,longest proposer freeze in s (default 2,20)")
    p.add_argument("--request-timeout-s", type=float, default=60.0, help="a request's whole budget (default 60)")
    p.add_argument("--aggregator-freeze-at-s", type=float, default=30.0,
                   help="when the aggregator's engine freezes, s from the start (default 30; < 0: never)")
    p.add_argument("--aggregator-freeze-s", type=float, default=None,
                   help="how long (default: the request timeout + 10 s)")
    p.add_argument("--gap-floor-s", type=float, default=5.0, help="stall limit floor between tokens (default 5)")
    p.add_argument("--first-token-floor-s", type=float, default=15.0,
                   help="stall limit floor before a first token (default 15)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chaos", help="results folder")
    return p.parse_args(argv)


def plan(args) -> list[Fault]:
    """The run's fault plan (checks the options first: bad ones fail before engines start)."""
    from staircase.errors import ConfigError

    for name, low in (("requests", 1), ("concurrency", 1), ("rate", 0), ("max_out", 0), ("request_timeout_s", 1e-9)):
        if not getattr(args, name) >= low:
            raise ConfigError(name, getattr(args, name), f"a number >= {low:g}")
    freeze = parse_float_list(args.freeze_s, "freeze_s")
    if len(freeze) != 2:
        raise ConfigError("freeze_s", args.freeze_s, "two numbers: shortest,longest")
    horizon = args.faults_for_s or 10 * args.request_timeout_s + 20 * args.requests  # (else past any run's end)
    faults = draw_faults(args.seed, horizon, args.every_s, [k for k in args.kinds.split(",") if k], tuple(freeze))
    if args.aggregator_freeze_at_s >= 0:
        length = args.aggregator_freeze_s or args.request_timeout_s + 10.0
        faults.append(Fault(args.aggregator_freeze_at_s, AGGREGATOR_FREEZE, duration_s=length))
    return faults


def start_servers(model, count: int) -> dict:
    """``count`` proposer servers started together, server i bound to core i mod cores."""
    import os

    from staircase.live.engines.serve import VLLMServer

    cores = os.cpu_count() or 1
    servers = {f"server-{i}": VLLMServer(model, threads=str(i % cores)) for i in range(count)}
    with ThreadPoolExecutor(count) as pool:
        for done in [pool.submit(s.start) for s in servers.values()]:
            done.result()
    return servers


def runner_of(args, model, servers: dict, proxy: ChaosProxy):
    from staircase.live.engines import HTTPEngine, VLLMEngine
    from staircase.live.runner import LiveRunner
    from staircase.live.watchdog import StallLimits
    from staircase.topology import moa

    names = list(servers)
    slots = {"proposer-0": HTTPEngine(proxy.url, "model", name="p0-via-proxy", tokenizer_path=model)}
    slots |= {f"proposer-{i}": servers[names[i]].engine(name=f"p{i}") for i in range(1, len(names))}
    slots["aggregator"] = VLLMEngine(model, name="aggregator")
    stall = StallLimits(gap_floor_s=args.gap_floor_s, first_token_floor_s=args.first_token_floor_s)
    return LiveRunner(slots, moa(len(names)), max_tokens=args.max_tokens, stall=stall,
                      request_timeout_s=args.request_timeout_s, seed=args.seed)


async def one_request(runner, policy, i: int, query: str, hang_s: float) -> dict:
    """One request's record: when it was sent and ended, its outcome, and whether it
    outlived ``hang_s`` (hung: its task cancelled)."""
    t = time.monotonic()
    try:
        row = await asyncio.wait_for(runner.run_request(policy, i, query, f"chaos/{i}"), hang_s)
        outcome, error = row.outcome, row.error
    except asyncio.TimeoutError:
        outcome, error = "hung", ""
    return {"request_id": i, "sent_s": t, "took_s": time.monotonic() - t, "outcome": outcome, "error": error,
            "hung": outcome == "hung"}


async def requests_loop(runner, policy, queries: list[str], args, hang_s: float) -> list[dict]:
    """Poisson arrivals at ``args.rate`` per second (seeded), or ``args.concurrency``
    users in a closed loop when the rate is 0."""
    if args.rate > 0:
        from staircase.workload import Workload, arrival_times

        t0, arrivals = time.monotonic(), arrival_times(Workload("poisson", len(queries), args.rate), args.seed)

        async def arrive(i: int, q: str) -> dict:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
            return await one_request(runner, policy, i, q, hang_s)
        return list(await asyncio.gather(*(arrive(i, q) for i, q in enumerate(queries))))
    todo, ended = list(enumerate(queries))[::-1], []

    async def user():
        while todo:
            ended.append(await one_request(runner, policy, *todo.pop(), hang_s))
    await asyncio.gather(*(user() for _ in range(args.concurrency)))
    return ended


async def after_thaw(runner, policy, query: str, request_id: int, faults, fault_plan: list[Fault]) -> dict | None:
    """One more request once the aggregator has thawed (and the requests loop ended), with
    no request timeout: that the run goes on after the freeze, whatever the machine's
    speed (on a slow machine no request of the loop may finish inside its timeout)."""
    thaws = [f.at_s + f.duration_s for f in fault_plan if f.kind == AGGREGATOR_FREEZE]
    if not thaws:
        return None
    await asyncio.sleep(max(0.0, faults.t0 + max(thaws) + 1.0 - time.monotonic()))
    budget, runner.request_timeout_s = runner.request_timeout_s, None
    t = time.monotonic()
    try:
        row = await runner.run_request(policy, request_id, query, "chaos/after-thaw")
    finally:
        runner.request_timeout_s = budget
    return {"request_id": request_id, "outcome": row.outcome, "error": row.error,
            "took_s": round(time.monotonic() - t, 3)}


async def flush_every_second(rowlog) -> None:
    while True:
        await asyncio.sleep(1.0)
        rowlog.flush()


async def run(args, model, servers: dict, fault_plan: list[Fault]) -> tuple[list[dict], list[dict], dict, dict | None]:
    """The requests under ``fault_plan``; (request records, fault records, proxy counts,
    the request sent after the aggregator thawed)."""
    from staircase.live.prompts import load_prompts
    from staircase.live.gateway.rowlog import RowLog
    from staircase.policies import StaircasePolicy

    names = list(servers)
    proxy = await ChaosProxy(servers[names[0]].url).start()
    runner = runner_of(args, model, servers, proxy)
    policy = StaircasePolicy(redundancy=1)
    queries = load_prompts(args.prompts, args.requests)
    rowlog = RowLog(args.out, runner.recorder, {"command": "chaos", "args": vars(args), "policy": policy.describe()})
    await runner.start()
    faults = ProcessFaults(servers, proxy, proxied=names[0], max_out=args.max_out or None)
    background = [asyncio.ensure_future(flush_every_second(rowlog)), asyncio.ensure_future(faults.run(fault_plan))]
    try:
        ended = await requests_loop(runner, policy, queries, args, args.request_timeout_s + HANG_GRACE_S)
        probe = await after_thaw(runner, policy, queries[0], len(queries), faults, fault_plan)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await faults.stop()
        rowlog.flush()
        await runner.close()
        await proxy.close()
    t0 = faults.t0
    for r in ended:
        r["sent_s"] = round(r["sent_s"] - t0, 3)
    return ended, faults.table(), {"calls": proxy.calls, **proxy.done}, probe


def lost_reason(reason: str) -> str:
    """A loss's reason without its limit's seconds: "stalled 3s" -> "stalled"."""
    return re.sub(r"\s*(in\s+)?\d+(\.\d+)?s$", "", reason.strip())


def request_kind(error: str) -> str:
    if not error:
        return "finished"
    if "timed out after" in error:
        return "failed at the request timeout"
    if "cannot go on" in error and re.search(r"L\d+\.p\d+ \(", error):
        return "failed naming its lost inputs"
    return "failed otherwise"


def check_rows(ended: list[dict], traces: Path) -> tuple[dict, Counter]:
    """Ended requests against their rows on disk: (counts, inputs lost by reason)."""
    from staircase.live.gateway.rowlog import read_parts

    import pandas as pd

    parts = read_parts(traces)
    requests = [r for r, _ in parts.values()]
    chunks = [c for _, c in parts.values()]
    req = pd.concat(requests, ignore_index=True) if requests else pd.DataFrame(columns=["request_id"])
    req = req[req["request_id"].isin([r["request_id"] for r in ended])]  # (the after-thaw request: its own check)
    ch = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=["request_id", "node", "tokens"])
    on_disk = Counter(req["request_id"])
    finished_ids = {r["request_id"] for r in ended if not r["hung"]}
    answer = ch[ch["node"] == "agg"].groupby("request_id")["tokens"].sum() if len(ch) else {}
    short = [int(r.request_id) for r in req.itertuples() if r.outcome == "ok"
             and int(answer.get(r.request_id, 0)) != int(r.output_tokens)]
    reasons = Counter(lost_reason(item.split(": ", 1)[1]) for text in req.get("lost", []) if text
                      for item in str(text).split("; ") if ": " in item)
    counts = {"rows_lost": len(finished_ids - set(on_disk)), "rows_twice": sum(n > 1 for n in on_disk.values()),
              "answers_without_their_chunks": len(short), "rows_on_disk": int(len(req))}
    return counts, reasons


def summarize(args, ended: list[dict], faults: list[dict], proxy: dict, probe: dict | None = None) -> dict:
    counts, reasons = check_rows(ended, args.out / "traces")
    kinds = Counter(request_kind(r["error"]) if not r["hung"] else "hung" for r in ended)
    injected = Counter(f["kind"] for f in faults if f["injected"])
    done = [r["took_s"] for r in ended if not r["hung"]]
    thawed = max((f["at_s"] + f["duration_s"] for f in faults if f["kind"] == AGGREGATOR_FREEZE and f["injected"]),
                 default=None)
    after = None if thawed is None else sum(r["outcome"] == "ok" and r["sent_s"] + r["took_s"] > thawed for r in ended)
    return {"requests": args.requests, "ended": len(ended), "finished_after_aggregator_thawed": after,
            "finished": kinds["finished"], "failed_naming_lost_inputs": kinds["failed naming its lost inputs"],
            "failed_at_request_timeout": kinds["failed at the request timeout"],
            "failed_otherwise": kinds["failed otherwise"], "hung": kinds["hung"],
            "not_ended": args.requests - len(ended), **counts,
            "faults_injected": dict(injected), "faults_skipped": sum(not f["injected"] for f in faults),
            "proxy_calls": proxy.get("calls", 0), "proxy_faults_delivered": {k: v for k, v in proxy.items() if k != "calls"},
            "inputs_lost": sum(reasons.values()), "inputs_lost_by_reason": dict(reasons.most_common()),
            "request_timeout_s": args.request_timeout_s, "slowest_request_s": round(max(done, default=0.0), 3),
            "over_timeout": sum(t > args.request_timeout_s + 5.0 for t in done),
            "errors": dict(Counter(r["error"][:90] for r in ended if r["error"]).most_common(8)),
            "after_thaw": probe}


def table(s: dict) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in s["faults_injected"].items()) or "none"
    delivered = ", ".join(f"{k} {v}" for k, v in s["proxy_faults_delivered"].items()) or "none"
    lost = ", ".join(f"{k} {v}" for k, v in s["inputs_lost_by_reason"].items()) or "none"
    return "\n".join([
        f"faults injected: {faults}; {s['faults_skipped']} skipped (another server out, or none up: faults.csv)",
        f"proxy calls answered with a fault: {delivered} (of {s['proxy_calls']} calls)",
        f"requests: {s['requests']}; finished {s['finished']}; failed naming lost inputs "
        f"{s['failed_naming_lost_inputs']}; failed at the request timeout {s['failed_at_request_timeout']}; "
        f"failed otherwise {s['failed_otherwise']}; hung {s['hung']}; not ended {s['not_ended']}; "
        f"finished after the aggregator thawed {s['finished_after_aggregator_thawed']}",
        f"rows on disk {s['rows_on_disk']}; rows lost {s['rows_lost']}; answers without their chunks "
        f"{s['answers_without_their_chunks']}",
        f"inputs lost {s['inputs_lost']}: {lost}",
        f"slowest request {s['slowest_request_s']:.1f} s (request timeout {s['request_timeout_s']:g} s)"])


COLORS = {"finished": "tab:green", "failed naming its lost inputs": "tab:orange",
          "failed at the request timeout": "tab:red", "failed otherwise": "tab:purple", "hung": "black"}


def plot_timeline(ended: list[dict], faults: list[dict], path: Path) -> Path:
    """Requests as bars (sent to ended, coloured by outcome) over the faults: freezes as
    spans, kills as lines (dotted until the server answered again), bursts as ticks."""
    from staircase.plotting import pyplot, save_figure

    plt, _ = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(11, 5.5))
    for r in ended:
        kind = "hung" if r["hung"] else request_kind(r["error"])
        ax.barh(r["request_id"], r["took_s"], left=r["sent_s"], color=COLORS[kind], height=0.8)
    top = max((r["request_id"] for r in ended), default=0) + 1
    marks = {"kill": "tab:gray", "freeze": "tab:blue", AGGREGATOR_FREEZE: "tab:red"}
    for f in (f for f in faults if f["injected"]):
        if f["kind"] in ("freeze", AGGREGATOR_FREEZE):
            ax.axvspan(f["at_s"], f["at_s"] + f["duration_s"], color=marks[f["kind"]], alpha=0.12)
        elif f["kind"] == "kill":
            ax.axvline(f["at_s"], color=marks["kill"], lw=1.2)
            ax.hlines(top + 1, f["at_s"], f["at_s"] + f["duration_s"], color=marks["kill"], linestyles=":")
        else:
            ax.plot(f["at_s"], top + 2, marker="v", color="black")
            ax.annotate(f["kind"], (f["at_s"], top + 2), fontsize=7, rotation=60, xytext=(2, 4),
                        textcoords="offset points")
    handles = [Patch(color=c, label=label) for label, c in COLORS.items()] + [
        Patch(color=marks["freeze"], alpha=0.12, label="proposer frozen"),
        Patch(color=marks[AGGREGATOR_FREEZE], alpha=0.12, label="aggregator frozen"),
        Line2D([], [], color=marks["kill"], label="proposer killed (dotted: starting again)"),
        Line2D([], [], color="black", marker="v", lw=0, label="proxy burst")]
    ax.set(xlabel="seconds from the start", ylabel="request", xlim=(0, None))
    ax.set_title("Chaos run: requests and faults", pad=34)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path, dpi=120)


def write(args, ended: list[dict], faults: list[dict], summary: dict) -> None:
    import pandas as pd

    pd.DataFrame(faults, columns=["at_s", "kind", "target", "injected", "duration_s", "calls", "note"]).to_csv(
        args.out / "faults.csv", index=False)
    pd.DataFrame(ended).sort_values("request_id").to_csv(args.out / "requests.csv", index=False)
    (args.out / "chaos.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_timeline(ended, faults, args.out / "timeline.png")


def main(argv=None) -> int:
    from staircase.live.engines.factory import quiet_vllm_logs
    from staircase.live.model import smollm2_folder
    from staircase.errors import ConfigError

    args = parse_args(argv)
    try:
        fault_plan = plan(args)  # bad options fail here, before any engine starts
        model = Path(args.model) if args.model else smollm2_folder()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    quiet_vllm_logs()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    servers = start_servers(model, 3)
    try:
        ended, faults, proxy, probe = asyncio.run(run(args, model, servers, fault_plan))
    finally:
        for server in servers.values():
            server.stop()
    summary = summarize(args, ended, faults, proxy, probe) | {"wall_s": round(time.monotonic() - started, 1)}
    write(args, ended, faults, summary)
    print(table(summary), file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
