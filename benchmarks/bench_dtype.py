"""bfloat16 against float32 for vLLM's CPU build on this machine: prefill and decode speed.

One in-process engine on all cores (enforce-eager, prefix cache off), the bundled
SmolLM2-135M-Instruct, each dtype in a fresh process:

- prefill: a 999-token prompt, 1 output token, 3 times (median tokens/s, first run
  discarded as warm-up);
- decode, 1 stream: 128 tokens with ``ignore_eos``, tokens/s after the first token;
- decode, 8 streams: 8 concurrent 64-token answers, tokens/s over the batch.

Prints a table and writes ``benchmarks/results/dtype-<cpu isa>-<UTC time>.json`` with
the CPU named. ``staircase.live.machine.engine_settings`` picks the default dtype per CPU kind
from these figures.

    python benchmarks/bench_dtype.py                  # bfloat16 and float32
    python benchmarks/bench_dtype.py --dtypes float32 --prefill-tokens 500
    python benchmarks/bench_dtype.py --emulate-avx2   # torch/oneDNN kernels capped at AVX2
                                                      # (an approximation of an AVX2-only CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(__file__).parent / "results"


def measure(dtype: str, prefill_tokens: int) -> dict:
    """Prefill and decode rates of SmolLM2 in one dtype (run in its own process)."""
    import asyncio

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from staircase.live.engines import VLLMEngine
    from staircase.live.model import smollm2_folder

    engine = VLLMEngine(smollm2_folder(), dtype=dtype, enable_prefix_caching=False)
    return asyncio.run(_measure(engine, dtype, prefill_tokens))


def _user(text: str):
    from staircase.prompts import ApproxTokenizer, TextPieces, query_piece, source_prompt

    return source_prompt(query_piece(text, None, ApproxTokenizer()), TextPieces())


async def _timed(engine, prompt, max_tokens: int, key: str) -> tuple[float, float, float, int]:
    """(sent, first token, end, tokens) of one call, EOS ignored."""
    from staircase.live.engines import Sampling

    sent, first, n = time.perf_counter(), None, 0
    async for d in engine.stream(key, prompt, max_tokens, Sampling(seed=None, ignore_eos=True)):
        if d.tokens and first is None:
            first = time.perf_counter()
        n += d.tokens
    return sent, first, time.perf_counter(), n


async def _measure(engine, dtype: str, prefill_tokens: int) -> dict:
    import asyncio
    import statistics

    await engine.start()
    tok = engine.tokenizer
    words = " ".join(f"item{i} is a short note about streaming aggregation" for i in range(2000))
    body = tok.decode(tok.encode(words, add_special_tokens=False)[:prefill_tokens])
    out = {"dtype": dtype}
    rates = []
    for i in range(4):
        sent, first, _, _ = await _timed(engine, _user(f"{i} {body}"), 1, f"p{i}")
        rates.append(prefill_tokens / (first - sent))
    out["prefill_tokens_per_s"] = round(statistics.median(rates[1:]), 1)
    sent, first, end, n = await _timed(engine, _user("Write a long story about a lighthouse."), 128, "d1")
    out["decode_1_tokens_per_s"] = round((n - 1) / (end - first), 1)
    runs = await asyncio.gather(*(_timed(engine, _user(f"Story {i} about a lighthouse."), 64, f"d8-{i}")
                                  for i in range(8)))
    start = max(r[1] for r in runs)  # all admitted and decoding
    tokens_after = sum(r[3] for r in runs) - 8
    out["decode_8_tokens_per_s"] = round(tokens_after / (max(r[2] for r in runs) - min(r[1] for r in runs)), 1)
    out["decode_8_admit_spread_s"] = round(start - min(r[1] for r in runs), 3)
    await engine.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prefill-tokens", type=int, default=999)
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="cap torch and oneDNN at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): an approximation "
                         "of an AVX2-only CPU; vLLM's own kernels may still use what the CPU has")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.prefill_tokens)))
        return 0
    from staircase.live.machine import describe

    machine = describe()
    env = dict(os.environ)
    emulated = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"} if args.emulate_avx2 else {}
    env.update(emulated)
    rows = []
    for dtype in args.dtypes.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", dtype, "--prefill-tokens", str(args.prefill_tokens)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    _report(machine, emulated, rows, args.prefill_tokens)
    return 0


def _report(machine: dict, emulated: dict, rows: list[dict], prefill_tokens: int) -> None:
    """Print the table and write it, with the machine, to benchmarks/results/."""
    from staircase.live.machine import engine_settings

    print(f"machine: {machine['cpu_model']} ({machine['cpu_isa']}, flags {' '.join(machine['cpu_flags'])}, "
          f"{machine['cores']} cores){' with torch/oneDNN capped at AVX2' if emulated else ''}")
    print(f"{'dtype':<10} {'prefill tok/s':>14} {'decode 1 tok/s':>15} {'decode 8 tok/s':>15}")
    for r in rows:
        print(f"{r['dtype']:<10} {r['prefill_tokens_per_s']:>14} {r['decode_1_tokens_per_s']:>15} "
              f"{r['decode_8_tokens_per_s']:>15}")
    print(f"default here: {engine_settings(machine=machine)}")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = OUT / f"dtype-{machine['cpu_isa']}{'-emulated-avx2' if emulated else ''}-{stamp}.json"
    path.write_text(json.dumps({"machine": machine, "emulated": emulated, "prefill_tokens": prefill_tokens,
                                "rows": rows,
                                "default": engine_settings(machine=machine)}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
