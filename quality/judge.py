"""An optional LLM judge, pairwise against the reference (wait-all), both orders.

As Arena-Hard and AlpacaEval do: the judge sees the question and two answers, A and B,
and names the better one; each pair is judged twice with the answers swapped, so a
judge that prefers a position cancels out. A policy's score on a prompt is its mean over
the two orders (win 1, loss 0; a verdict with neither letter counts 0.5 and is
counted as unparsed). 0.5 over all prompts means "as good as wait-all".

The judge is any ``staircase.live.engines.Engine``: an OpenAI-compatible endpoint
(``HTTPEngine``, ``--judge-url``) or the in-process engine itself (``--judge local``,
weak with a 135M model, but real).
"""

from __future__ import annotations

import asyncio
import re

import pandas as pd

from staircase.live.engines import Engine, EngineError, Sampling
from staircase.prompts import Message, Piece, Prompt, TokenizerCount

from .sets import replayed

JUDGE_SYSTEM = ("You are a fair judge. Compare two responses to the user's question and decide which one "
                "answers it better: more correct, helpful and complete.")
JUDGE_USER = ("Question:\n{question}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
              "Which response is better? Reply with one letter: A or B.")
VERDICT = re.compile(r"\b([AB])\b")


def judge_prompt(question: str, a: str, b: str) -> Prompt:
    counter = TokenizerCount()
    system, user = JUDGE_SYSTEM, JUDGE_USER.format(question=question, a=a or "(empty)", b=b or "(empty)")
    messages = [Message("system", [Piece(("judge-system",), counter.count(system), system)]),
                Message("user", [Piece(("judge-user",), counter.count(user), user)])]
    return Prompt(messages, sum(m.tokens for m in messages), 0)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or None: the first standalone A or B in the judge's reply."""
    m = VERDICT.search(text or "")
    return m.group(1) if m else None


async def _verdict(engine: Engine, tag: str, prompt: Prompt) -> str | None:
    parts = []
    try:
        async for delta in engine.stream(tag, prompt, 8, Sampling(temperature=0.0, seed=0)):
            parts.append(delta.text)
    except EngineError:
        return None
    return parse_verdict("".join(parts))


async def judge_pair(engine: Engine, tag: str, question: str, reference: str, answer: str) -> tuple[float, int]:
    """(score of ``answer`` against ``reference`` over both orders, unparsed verdicts)."""
    first, second = await asyncio.gather(_verdict(engine, f"{tag}-ab", judge_prompt(question, reference, answer)),
                                         _verdict(engine, f"{tag}-ba", judge_prompt(question, answer, reference)))
    wins = [{"B": 1.0, "A": 0.0}.get(first, 0.5), {"A": 1.0, "B": 0.0}.get(second, 0.5)]
    return sum(wins) / 2, (first is None) + (second is None)


async def judge_answers(engine: Engine, answers: pd.DataFrame, queries: dict[str, str], reference: str,
                        concurrency: int = 4) -> pd.DataFrame:
    """judge score per (policy, prompt_id) of every non-reference answer of the real sets."""
    ref = answers[answers["policy"] == reference].set_index("prompt_id")["answer_text"]
    todo = answers[(answers["policy"] != reference) & answers["prompt_id"].isin(ref.index)
                   & ~answers["set"].map(replayed).astype(bool)]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, row) -> dict:
        async with sem:
            score, unparsed = await judge_pair(engine, f"judge-{i}", queries[row.prompt_id], ref[row.prompt_id] or "",
                                               row.answer_text or "")
        return {"policy": row.policy, "prompt_id": row.prompt_id, "judge": score, "judge_unparsed": unparsed}

    rows = await asyncio.gather(*(one(i, r) for i, r in enumerate(todo.itertuples())))
    return pd.DataFrame(rows, columns=["policy", "prompt_id", "judge", "judge_unparsed"])
