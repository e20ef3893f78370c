"""`staircase serve --policies single` side by side with LiteLLM's proxy, in one run.

One emulated engine (`staircase emulate`, the `h100-moa` profile's llama-70b-tp4, one
replica) and, in front of it in turn, nothing (the client talks to the engine: the
baseline), `staircase serve --policies single` (the request goes to the engine as it
is) and LiteLLM's proxy (an `openai/` model at the engine's URL). The same client
(`gateway_scale.Client`: streamed chat completions, 200-word prompts, 256-token answers,
closed loops of N users for `--duration` seconds) loads each; the three run one after
the other on the same cores, after a few warm-up requests each. Added latency is each gateway's percentile minus the
baseline's at the same load; CPU is the gateway's (its processes, from /proc) per
request and per streamed token. The ratio columns are staircase over LiteLLM.

LiteLLM is not a dependency of staircase: install it beside, in a virtual environment of
its own, and name its command. On 2026-12-08, from this project's package registry,
1.110.2's and 1.108.14's `proxy` extra did not install (no matching `litellm-proxy` /
`litellm-proxy-extras`) and 1.106.12's did; PyPI's `litellm-check` describes 1.107.0 as
a compromised release, so pin a version:

    python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]==1.106.12'
    .venv/bin/python benchmarks/gateway_anchor.py --litellm /tmp/litellm/bin/litellm   # ~5 min

Writes <out>/gateway-anchor.csv and .json (rows per gateway and load, the ratios, the
machine, the LiteLLM version).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_scale import ROOT, STAIRCASE, Client, free_port, gateway_usage, pct, start, wait_until  # noqa: E402

ENGINE = "llama-70b-tp4"
KEY = "sk-staircase-bench-0123456789abcdef"  # LiteLLM's proxy will not start without a master key


def start_litellm(args, out: Path, engine_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (out / "litellm.yaml").write_text(
        f"model_list:\n  - model_name: {ENGINE}\n    litellm_params:\n      model: openai/{ENGINE}\n"
        f"      api_base: {engine_url}/v1\n      api_key: none\n"
        "litellm_settings:\n  telemetry: false\n")
    env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    proc = subprocess.Popen([args.litellm, "--config", str(out / "litellm.yaml"), "--host", "127.0.0.1", "--port",
                             str(port), "--num_workers", "1"], stdout=open(out / "litellm.log", "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_until(f"http://127.0.0.1:{port}/health/liveliness", proc, "litellm", out / "litellm.log", 300)
    return proc, port


def start_staircase(args, out: Path, engine_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (out / "engines.json").write_text(json.dumps({"engines": {"m": {"kind": "http", "url": engine_url,
                                                                    "model": ENGINE}},
                                                  "slots": {"proposers": ["m"], "aggregator": "m"}}))
    proc = start([*STAIRCASE, "serve", "--config", str(out / "engines.json"), "--policies", "single",
                  "--proposers", "1", "--answer-tokens", str(args.answer_tokens), "--max-in-flight", "4096",
                  "--port", str(port), "--out", str(out / "serve")], out / "serve.log")
    wait_until(f"http://127.0.0.1:{port}/health", proc, "staircase serve", out / "serve.log")
    return proc, port


def measure(name: str, client: Client, users: int, args, pid: int | None) -> dict:
    cpu0 = gateway_usage(pid)[0] if pid else 0.0
    asyncio.run(client.closed(users, args.duration))
    cpu1, rss = gateway_usage(pid) if pid else (0.0, 0.0)
    ok = [r for r in client.results if r["status"] == 200 and not r["error"] and r["tokens_s"]]
    ttft = [r["tokens_s"][0] - r["sent_s"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["tokens_s"], r["tokens_s"][1:])]
    tokens = sum(len(r["tokens_s"]) for r in ok)
    span = max(r["end_s"] for r in client.results) - min(r["sent_s"] for r in client.results)
    return {"gateway": name, "users": users, "requests": len(client.results), "ok": len(ok),
            "requests_per_s": len(ok) / span, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "e2e_p50_s": pct([r["end_s"] - r["sent_s"] for r in ok], 50) / 1000,
            "cpu_ms_per_request": (cpu1 - cpu0) / max(1, len(ok)) * 1000,
            "cpu_us_per_token": (cpu1 - cpu0) / max(1, tokens) * 1e6, "cpu_share": (cpu1 - cpu0) / span,
            "rss_mib": rss}


def added(rows: list[dict]) -> pd.DataFrame:
    """Each gateway's figures minus the baseline's (``direct``) at the same load."""
    df = pd.DataFrame(rows)
    base = df[df.gateway == "direct"].set_index("users")
    for col in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        df["added_" + col] = df[col] - df.users.map(base[col])
    return df


def ratios(df: pd.DataFrame) -> list[dict]:
    out = []
    for users, g in df.groupby("users"):
        s, lite = g[g.gateway == "staircase"].iloc[0], g[g.gateway == "litellm"].iloc[0]
        out.append({"users": int(users), **{f"{col}_staircase_over_litellm": float(s[col] / lite[col]) for col in (
            "added_ttft_p50_ms", "added_ttft_p99_ms", "cpu_ms_per_request", "cpu_us_per_token")}})
    return out


def run(args, out: Path) -> list[dict]:
    emu_port = free_port()
    emu = start([*STAIRCASE, "emulate", "--profile", args.profile, "--replicas", "1", "--port", str(emu_port),
                 "--out", str(out / "emulate")], out / "emulate.log")
    wait_until(f"http://127.0.0.1:{emu_port}/metrics", emu, "staircase emulate", out / "emulate.log")
    engine_url = f"http://127.0.0.1:{emu_port}/{ENGINE}/0"
    procs, rows = [emu], []
    try:
        sc, sc_port = start_staircase(args, out, engine_url)
        procs.append(sc)
        lite, lite_port = start_litellm(args, out, engine_url)
        procs.append(lite)
        targets = [("direct", f"{engine_url}/v1/chat/completions", None, ENGINE, {}),
                   ("staircase", f"http://127.0.0.1:{sc_port}/v1/chat/completions", sc.pid, "staircase", {}),
                   ("litellm", f"http://127.0.0.1:{lite_port}/v1/chat/completions", lite.pid, ENGINE,
                    {"Authorization": f"Bearer {KEY}"})]
        for name, url, pid, model, headers in targets:  # warm-up, not counted (LiteLLM's first calls are slow)
            asyncio.run(Client(url, args, model, headers, max_tokens=16).closed(4, 3.0))
        for users in [int(u) for u in args.users.split(",")]:
            for name, url, pid, model, headers in targets:
                client = Client(url, args, model, headers, max_tokens=args.answer_tokens)
                rows.append(measure(name, client, users, args, pid))
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      flush=True)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(90)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--litellm", default=shutil.which("litellm"),
                   help="LiteLLM's proxy command (default: `litellm` on PATH); see above to install it")
    p.add_argument("--users", default="1,8,32", help="closed-loop user counts, comma-separated")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per gateway and user count")
    p.add_argument("--profile", default="h100-moa")
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.litellm or not Path(args.litellm).exists():
        p.error(f"--litellm: got {args.litellm!r}; allowed: the path of LiteLLM's `litellm` command "
                "(python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]==1.106.12')")
    return args


def litellm_version(command: str) -> str:
    python = Path(command).with_name("python")
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or ROOT / "results" / f"gateway-anchor-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    df = added(run(args, out))
    df.to_csv(out / "gateway-anchor.csv", index=False)
    from staircase.machine import describe_cpu

    summary = {"machine": describe_cpu(), "litellm": litellm_version(args.litellm), "date": f"{datetime.now():%F}",
               "args": {k: str(v) for k, v in vars(args).items()}, "ratios": ratios(df),
               "rows": json.loads(df.replace({np.nan: None}).to_json(orient="records"))}
    (out / "gateway-anchor.json").write_text(json.dumps(summary, indent=1) + "\n")
    cols = ["gateway", "users", "ok", "requests_per_s", "ttft_p50_ms", "added_ttft_p50_ms", "added_ttft_p99_ms",
            "added_itl_p99_ms", "cpu_ms_per_request", "cpu_us_per_token", "rss_mib"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(pd.DataFrame(summary["ratios"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
