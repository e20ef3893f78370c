"""Evaluation sets as objects of one interface: each set owns its items, how an answer
is scored, which of its metrics are better lower, and whether its proposals are real
engine answers or replayed texts. ``QUALITY_SETS`` lists them by name; the harness
(``staircase.quality.run``) and the report (``staircase.quality.report``) read the sets only through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, Sequence

from .data import Item, alpaca_items, gsm8k_items, gsm8k_replay_items, probe_items
from .scores import exact_match, key_retained, stated_answer


class ItemOptions(Protocol):
    """What a set's items depend on (``QualitySpec`` has these fields)."""

    prompts: int
    skip: int
    probe_items: int
    positions: Sequence[str]
    proposers: int
    seed: int


class QualitySet(ABC):
    """One evaluation set."""

    name: str
    REPLAYED = False  # True: the proposers replay each item's proposals; the aggregator is the real engine
    REFERENCE_SIMILARITY = False  # True: answers are scored by similarity to the item's reference text
    LOWER_IS_BETTER: tuple[str, ...] = ()  # metrics where less is better (every other: more is better)

    @abstractmethod
    def items(self, options: ItemOptions) -> list[Item]:
        """The set's items for a run."""

    def scores(self, answer_text: str, item: Item) -> list[tuple[str, float]]:
        """(metric, value) of one answer that need no embedding model (none by default)."""
        return []


class GSM8K(QualitySet):
    """Grade-school maths; the answer's last number against the reference's."""

    name = "gsm8k"

    def items(self, options: ItemOptions) -> list[Item]:
        return gsm8k_items(options.prompts, options.skip)

    def scores(self, answer_text: str, item: Item) -> list[tuple[str, float]]:
        return [("exact_match", exact_match(answer_text, item.reference))]


class AlpacaEval(QualitySet):
    """Open instructions; similarity to the reference output."""

    name = "alpaca_eval"
    REFERENCE_SIMILARITY = True

    def items(self, options: ItemOptions) -> list[Item]:
        return alpaca_items(options.prompts, options.skip)


class LateKeyProbe(QualitySet):
    """Replayed proposals with a key early, in the middle, last, or absent; the real
    aggregator is asked for the key."""

    name = "probe"
    REPLAYED = True
    LOWER_IS_BETTER = ("false_key",)

    def items(self, options: ItemOptions) -> list[Item]:
        return probe_items(options.probe_items, tuple(options.positions), options.proposers, options.seed)

    def scores(self, answer_text: str, item: Item) -> list[tuple[str, float]]:
        metric = "false_key" if item.position == "absent" else f"retention:{item.position}"
        return [(metric, key_retained(answer_text, item.key))]


class GSM8KReplay(QualitySet):
    """Quality where the answer comes last: replayed worked GSM8K solutions (reasoning
    first, "The answer is N." last; a minority with a wrong number), the real aggregator
    asked to end with that line. Scored on the number it states (``stated_answer``)."""

    name = "gsm8k_replay"
    REPLAYED = True

    def items(self, options: ItemOptions) -> list[Item]:
        return gsm8k_replay_items(options.prompts, options.skip, options.proposers, options.seed)

    def scores(self, answer_text: str, item: Item) -> list[tuple[str, float]]:
        got = stated_answer(answer_text)
        return [("replay_exact_match", exact_match(got, item.reference) if got is not None else 0.0)]


QUALITY_SETS: dict[str, QualitySet] = {s.name: s for s in (GSM8K(), AlpacaEval(), LateKeyProbe(), GSM8KReplay())}
SETS = tuple(QUALITY_SETS)


def replayed(set_name: str) -> bool:
    """Whether a set's proposals are replayed (False for names that are not sets: ``judge``)."""
    found = QUALITY_SETS.get(set_name)
    return bool(found and found.REPLAYED)


def lower_is_better(metric: str) -> bool:
    return any(metric in s.LOWER_IS_BETTER for s in QUALITY_SETS.values())
