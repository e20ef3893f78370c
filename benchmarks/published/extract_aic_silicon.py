"""Extract the measured end-to-end runs that ship inside aiconfigurator-core 0.12.0
(``aiconfigurator_core/systems/silicon_sample.csv``: TTFT and TPOT of real serving runs,
per engine, GPU, model, TP, input/output length and concurrency) into the published-run
table format of ``staircase validate --published`` (calibration/published.py).

Kept: H100 SXM, aggregated serving (prefill and decode on the same GPUs), the dense
models the issue asks for (Llama-3.1 8B/70B, Qwen3-32B), vLLM, SGLang and TensorRT-LLM.
Rows whose precision column is empty name a bf16 checkpoint (Qwen/Qwen3-32B,
meta-llama/Llama-3.1-8B-Instruct): bf16 is assumed and said so in ``notes``.

    .venv/bin/python benchmarks/published/extract_aic_silicon.py   # writes aic-silicon-h100.csv
"""

from pathlib import Path

import aiconfigurator_core
import pandas as pd

HERE = Path(__file__).parent
SRC = Path(aiconfigurator_core.__file__).parent / "systems" / "silicon_sample.csv"
DB_MODEL = {"meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Meta-Llama-3.1-8B",
            "meta-llama/Llama-3.1-70B": "meta-llama/Meta-Llama-3.1-70B",
            "Qwen/Qwen3-32B": "Qwen/Qwen3-32B"}
URL = "https://pypi.org/project/aiconfigurator-core/0.12.0/ (aiconfigurator_core/systems/silicon_sample.csv)"


def main() -> None:
    d = pd.read_csv(SRC)
    d = d[(d.system == "h100_sxm") & (d["mode"] == "agg") & d.model_path.isin(DB_MODEL)
          & d.backend.isin(["vllm", "sglang", "trtllm"]) & d.batch_size.notna() & d.tp_size.notna()]
    out = pd.DataFrame({
        "source": "aic-silicon/" + d.backend + "-" + d.backend_version.fillna("unstated").astype(str),
        "url": URL, "retrieved": "2026-12-07", "gpu": d.system, "engine": d.backend,
        "engine_version": d.backend_version, "model": d.model_path, "db_model": d.model_path.map(DB_MODEL),
        "tp": d.tp_size.astype(int), "precision": d.precision.fillna("bf16"),
        "isl": d.isl.astype(int), "osl": d.osl.astype(int), "concurrency": d.batch_size.astype(int),
        "ttft_ms": d.silicon_ttft_ms.round(3), "tpot_ms": d.silicon_tpot_ms.round(4), "itl_ms": None,
        "output_tok_s": None, "statistic": "as recorded by the source (not stated: mean or median)",
        "notes": d.silicon_data_source.str.replace(",", ";").str.slice(0, 160)
        + d.precision.isna().map({True: " | precision empty: bf16 assumed", False: ""}),
    })
    out = out.sort_values(["engine", "db_model", "tp", "isl", "osl", "concurrency"]).drop_duplicates(
        ["engine", "engine_version", "db_model", "tp", "precision", "isl", "osl", "concurrency"])
    path = HERE / "aic-silicon-h100.csv"
    out.to_csv(path, index=False)
    print(f"{len(out)} rows -> {path}")
    print(out.groupby(["source", "db_model", "precision"]).size().to_string())


if __name__ == "__main__":
    main()
