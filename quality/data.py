"""The items the quality harness scores: GSM8K problems (exact match), AlpacaEval
instructions (similarity to the reference output), the late-key probe (fixed
proposals with a key fact at a chosen position; the real aggregator answers), and the
GSM8K replay set (the bundled worked solutions as proposals, reasoning first and the
number last, a minority of them with a wrong number; the real aggregator answers).

Every item has a ``prompt_id`` (``<set>/<index>``, the probe's ``probe/<position>/<i>``)
that pairs the answers of different policies for the bootstrap.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from staircase.bundled import data_file
from staircase.errors import ConfigError
from staircase.jsonio import read_json, read_jsonl

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
    proposals: tuple[str, ...] = field(default=())  # replayed sets: one text per proposer


def gsm8k_items(n: int, skip: int = 0) -> list[Item]:
    rows = _gsm8k_rows()
    _check_slice("gsm8k", n, skip, len(rows))
    out = []
    for i in range(skip, skip + n):
        reference = rows[i]["answer"].rsplit("####", 1)[1].strip()
        out.append(Item("gsm8k", f"gsm8k/{i}", rows[i]["question"] + GSM8K_INSTRUCTION, reference))
    return out


REPLAY_INSTRUCTION = ("\n\nReply with one line, \"The answer is N.\", where N is the final number that most of "
                      "the responses give.")
REPLAY_ANSWER = "The answer is {number}."
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: 2/2=<<2/2=1>>1


def _gsm8k_rows() -> list[dict]:
    return read_jsonl(data_file("gsm8k-test"), "gsm8k")


def worked_solution(answer: str) -> tuple[str, str]:
    """(the worked solution as a proposal: the reasoning, then "The answer is N.", and N)
    from a GSM8K answer field (annotations dropped)."""
    body, number = answer.rsplit("####", 1)
    number = number.strip().replace(",", "")
    return f"{_CALCULATOR.sub('', body).strip()}\n{REPLAY_ANSWER.format(number=number)}", number


def wrong_number(number: str, rng: random.Random) -> str:
    """Another number near ``number`` (an integer stays an integer, never negative)."""
    value = float(number)
    candidates = [value + d for d in (-3, -2, -1, 1, 2, 3, 10) if value + d >= 0]
    wrong = rng.choice(candidates)
    return str(int(wrong)) if wrong == int(wrong) else f"{wrong:g}"


def with_number(solution: str, number: str, wrong: str) -> str:
    """The solution with every standalone ``number`` replaced by ``wrong`` (its last
    computation and its answer line: a consistent wrong solution)."""
    forms = [(number, wrong)]
    if number.isdigit() and wrong.isdigit() and int(number) >= 1000:  # 70,000 in the reasoning, 70000 after ####
        forms.append((f"{int(number):,}", f"{int(wrong):,}"))
    for old, new in forms:
        solution = re.sub(rf"(?<![\d.,]){re.escape(old)}(?![\d]|,\d)", new, solution)
    return solution


def gsm8k_replay_items(n: int, skip: int = 0, proposers: int = 3, seed: int = 0) -> list[Item]:
    """GSM8K problems whose proposals are the bundled worked solution: ``(proposers - 1) // 2``
    of them (a minority, which proposers rotates from item to item) with the final number
    changed throughout; the reference is the right number (the majority's)."""
    rows = _gsm8k_rows()
    _check_slice("gsm8k_replay", n, skip, len(rows))
    rng = random.Random(seed)
    out = []
    for i in range(skip, skip + n):
        solution, number = worked_solution(rows[i]["answer"])
        wrong = {(i + k) % proposers for k in range((proposers - 1) // 2)}
        texts = tuple(with_number(solution, number, wrong_number(number, rng)) if p in wrong else solution
                      for p in range(proposers))
        out.append(Item("gsm8k_replay", f"gsm8k_replay/{i}", rows[i]["question"] + REPLAY_INSTRUCTION, number,
                        proposals=texts))
    return out


def _alpaca_rows() -> list[dict]:
    return read_json(data_file("alpaca-eval"), "alpaca_eval")


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
