"""Fit vLLM's overhead terms (calibration/gpu.py, OVERHEADS) on the held-in rows.

The held-in rows: the published vLLM 0.12.0 runs of Qwen3-32B bf16 at TP 2 on H100
(aic-silicon-h100.csv), not KV-limited. Per row, the TPOT the database's steps leave
unexplained (measured - predicted without overheads) is fitted as
per_step + per_seq * concurrency (least squares).

    .venv/bin/python benchmarks/published/fit_overheads.py
"""

from pathlib import Path

import numpy as np

from staircase.calibration.published import check_published, read_published

HERE = Path(__file__).parent


def main() -> None:
    t = read_published(HERE / "aic-silicon-h100.csv")
    held = t[(t.source == "aic-silicon/vllm-0.12.0") & (t.tp == 2) & (t.precision == "bf16")]
    r = check_published(held, overheads=False)
    r = r[~r.kv_limited]
    X = np.column_stack([np.ones(len(r)), r.concurrency])
    c, *_ = np.linalg.lstsq(X, (r.tpot_ms - r.pred_tpot_ms).to_numpy(), rcond=None)
    print(f"{len(r)} held-in points: per_step_s = {c[0] / 1000:.5f}, per_seq_step_s = {c[1] / 1000:.6f}")


if __name__ == "__main__":
    main()
