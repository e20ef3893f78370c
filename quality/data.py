"""The items the quality harness scores: GSM8K problems (exact match), AlpacaEval
instructions (similarity to the reference output), and the late-key probe (fixed
proposals with a key fact at a chosen position; the real aggregator answers).

Every item has a ``prompt_id`` (``<set>/<index>``, the probe's ``probe/<position>/<i>``)
that pairs the answers of different policies for the bootstrap.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from live.prompts import DATA as LIVE_DATA
from staircase.errors import ConfigError

DATA = Path(__file__).parent / "data"
POSITIONS = ("early", "middle", "last", "absent")  # "absent": the control, no key anywhere
GSM8K_INSTRUCTION = "\n\nSolve the problem step by step, then give the final answer as a number on the last line."
PROBE_QUERY = "What is the secret code?"
PROBE_KEY = "The secret code is {code}."
PROBE_CHARS = 700  # about 170 tokens of proposal text (4 characters per token)


@dataclass(frozen=True)
class Item:
    set: str
    prompt_id: str
    query: str
    reference: str | None = None  # GSM8K: the number after ####; AlpacaEval: the reference output
    key: str | None = None  # probe: the code the answer should carry (None for the control)
    position: str | None = None  # probe: early, middle, last, absent
    proposals: tuple[str, ...] = field(default=())  # probe: one text per proposer


def gsm8k_items(n: int, skip: int = 0) -> list[Item]:
    with gzip.open(DATA / "gsm8k_test.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    _check_slice("gsm8k", n, skip, len(rows))
    out = []
    for i in range(skip, skip + n):
        reference = rows[i]["answer"].rsplit("####", 1)[1].strip()
        out.append(Item("gsm8k", f"gsm8k/{i}", rows[i]["question"] + GSM8K_INSTRUCTION, reference))
    return out


def _alpaca_rows() -> list[dict]:
    with gzip.open(LIVE_DATA / "alpaca_eval.json.gz", "rt") as fh:
        return json.load(fh)


def alpaca_items(n: int, skip: int = 0) -> list[Item]:
    rows = _alpaca_rows()
    _check_slice("alpaca_eval", n, skip, len(rows))
    return [Item("alpaca_eval", f"alpaca_eval/{i}", rows[i]["instruction"], rows[i]["output"])
            for i in range(skip, skip + n)]


def _check_slice(name: str, n: int, skip: int, size: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name} prompts", n, "an integer >= 1")
    if not isinstance(skip, int) or skip < 0 or skip + n > size:
        raise ConfigError(f"{name} skip", skip, f"an integer >= 0 with skip + prompts <= {size}")


def _sentences(text: str) -> list[str]:
    """Sentence-ish pieces (markdown lines and sentences), whitespace kept with them."""
    return [s for s in re.split(r"(?<=[.!?:])\s+|\n+", text) if s.strip()]


def filler(index: int, chars: int = PROBE_CHARS) -> list[str]:
    """About ``chars`` characters of real answer text, as sentences: AlpacaEval reference
    output number ``index`` from the end of the set (and the next ones if short)."""
    rows = _alpaca_rows()
    out: list[str] = []
    j = len(rows) - 1 - index
    while sum(len(s) + 1 for s in out) < chars and j >= 0:
        out += _sentences(rows[j]["output"])
        j -= 1
    kept, total = [], 0
    for s in out:
        if total >= chars:
            break
        kept.append(s)
        total += len(s) + 1
    return kept


def with_key(sentences: list[str], key_sentence: str | None, position: str) -> str:
    """The proposal: the key sentence after the first sentence (early), at the middle
    sentence boundary (middle), at the end (last), or nowhere (absent)."""
    s = list(sentences)
    if key_sentence is not None and position != "absent":
        at = {"early": 1, "middle": len(s) // 2, "last": len(s)}[position]
        s.insert(min(at, len(s)), key_sentence)
    return " ".join(s)


def check_positions(positions: tuple[str, ...]) -> None:
    unknown = [p for p in positions if p not in POSITIONS]
    if unknown or not positions:
        raise ConfigError("positions", ",".join(positions), f"a comma list of {', '.join(POSITIONS)}")


def probe_items(per_position: int, positions: tuple[str, ...] = POSITIONS[:3] + ("absent",), proposers: int = 3,
                seed: int = 0) -> list[Item]:
    """``per_position`` probe items at each position; each proposer's proposal is other
    real text, and the key (a random 4-digit code) sits in every proposal at the same
    position. The query asks for the code (each item's query is made unique by its
    number so replay engines can look the proposals up)."""
    check_positions(positions)
    if not isinstance(per_position, int) or per_position < 1:
        raise ConfigError("probe items", per_position, "an integer >= 1 per position")
    rng = random.Random(seed)
    out, n = [], 0
    for position in positions:
        for i in range(per_position):
            code = f"{rng.randrange(1000, 10000)}"
            key = PROBE_KEY.format(code=code)
            texts = tuple(with_key(filler(n * proposers + p), key, position) for p in range(proposers))
            query = f"{PROBE_QUERY} (Note {n + 1}.)"
            out.append(Item("probe", f"probe/{position}/{i}", query, None, code, position, texts))
            n += 1
    return out
