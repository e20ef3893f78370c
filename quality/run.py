"""The quality harness's runs: every policy on the same engines with the same seeds.

For each policy (the reference, wait-all, first), the real sets (GSM8K, AlpacaEval)
run on the real engines, and the late-key probe runs with replay proposers
(``staircase.live.engines.ReplayEngine``: each proposer streams its fixed proposal) and the real
aggregator. The noise floor is the reference policy again under another sampling seed
(``noise_seed``; by default for the aggregator alone, so the proposals are the same:
what resampling the final answer changes; ``noise_scope="all"`` resamples every node).
Request ``i`` gets the same seeds under
every policy (``LiveRunner`` derives a call's seed from the run seed, the request and
the node), so the proposers of request ``i`` sample alike whatever the policy.

``collect`` returns every answer (one row per policy and prompt, with its latency);
``staircase.quality.report`` scores and summarises them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import pandas as pd

from staircase.live.engines import Engine, Sampling
from staircase.live.engines import ReplayEngine
from staircase.live.runner import LiveRunner
from staircase.errors import ConfigError
from staircase.policies import (PAPER_AGGREGATOR_SCHEDULE, PAPER_PROPOSER_SCHEDULE, LAYOUTS, Policy, StaircasePolicy,
                              WaitAllPolicy)
from staircase.topology import Topology, moa
from staircase.trace import Trace

from .judge import judge_answers
from .data import POSITIONS, Item, check_positions
from .sets import QUALITY_SETS, SETS, replayed

REFERENCE = "wait-all"
NOISE_SCOPES = ("aggregator", "all")
PROPOSAL_CAP = 1024  # tokens: the probe's replay proposals stream whole (about 170 tokens each)
ANSWER_COLUMNS = ("set", "prompt_id", "policy", "outcome", "answer_text", "ttft_s", "e2e_s", "longest_stall_s",
                  "context_tokens", "output_tokens", "prompt_tokens")


@dataclass
class QualitySpec:
    """What the harness runs (``staircase quality``'s options, as data)."""

    sets: tuple[str, ...] = SETS
    prompts: int = 10  # per real set (GSM8K, AlpacaEval)
    skip: int = 0
    probe_items: int = 3  # per probe position
    positions: tuple[str, ...] = POSITIONS
    proposers: int = 3
    max_tokens: int = 128
    probe_max_tokens: int = 32  # the aggregator's probe answer (the replay proposals stream whole)
    temperature: float = 0.7
    seed: int = 0
    noise_seed: int = 1
    noise_scope: str = "aggregator"  # the noise run resamples the aggregator alone, or "all" nodes
    replay_tokens_per_s: float = 30.0
    concurrency: int = 1
    resamples: int = 2000
    effect: float = 0.1  # the drop that matters: the verdict's signal and power (staircase.quality.report)

    def check(self) -> "QualitySpec":
        unknown = [s for s in self.sets if s not in SETS]
        if unknown or not self.sets:
            raise ConfigError("sets", ",".join(self.sets), f"a comma list of {', '.join(SETS)}")
        for name in ("prompts", "probe_items", "proposers", "max_tokens", "probe_max_tokens", "concurrency",
                     "resamples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(name.replace("_", "-"), getattr(self, name), "an integer >= 1")
        if self.noise_seed == self.seed:
            raise ConfigError("noise-seed", self.noise_seed, f"a seed other than --seed ({self.seed})")
        if self.noise_scope not in NOISE_SCOPES:
            raise ConfigError("noise-scope", self.noise_scope, ", ".join(NOISE_SCOPES))
        if not self.temperature >= 0:
            raise ConfigError("temperature", self.temperature, "a number >= 0 (0: greedy)")
        if not (isinstance(self.effect, (int, float)) and 0 < self.effect < 1):
            raise ConfigError("effect", self.effect, "a number in (0, 1): the score drop that matters")
        if not self.replay_tokens_per_s > 0:
            raise ConfigError("replay-tokens-per-s", self.replay_tokens_per_s, "a number > 0")
        check_positions(tuple(self.positions))
        return self

    def items(self) -> list[Item]:
        """The items of every set of the run, in the sets' order (``QUALITY_SETS``)."""
        return [item for name, s in QUALITY_SETS.items() if name in self.sets for item in s.items(self)]

    def describe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def first_chunk_policies(first_chunks: Sequence[int], redundancy: int = 1, layout: str = "standard") -> list[Policy]:
    """The paper's staircase with its first chunk (proposers' and aggregator's) set to
    each of ``first_chunks``, the rest of the schedules the paper's."""
    if layout not in LAYOUTS:
        raise ConfigError("layout", layout, ", ".join(LAYOUTS))
    out = []
    for k in first_chunks:
        if not isinstance(k, int) or k < 1:
            raise ConfigError("first-chunks", k, "integers >= 1")
        out.append(StaircasePolicy((k, *PAPER_PROPOSER_SCHEDULE[1:]), (k, *PAPER_AGGREGATOR_SCHEDULE[1:]),
                                   redundancy, "first", layout, name=f"staircase-first{k}"))
    return out


@dataclass
class Collected:
    """Every answer, and the traces of the real sets and of the probe per policy."""

    answers: pd.DataFrame
    traces: dict[str, Trace] = field(default_factory=dict)
    probe_traces: dict[str, Trace] = field(default_factory=dict)
    runs: list[tuple[str, int]] = field(default_factory=list)  # (policy, sampling seed), in run order
    judged: pd.DataFrame | None = None  # judge score per (policy, prompt_id), when a judge ran


def runs_of(spec: QualitySpec, policies: Sequence[Policy]) -> list[tuple[Policy, int]]:
    """(policy, seed) in run order: the reference, its noise-floor repeat, the others."""
    names = [p.name for p in policies]
    noise = noise_name(spec)
    if REFERENCE in names or noise in names or len(set(names)) != len(names):
        raise ConfigError("policies", names, f"distinct names other than {REFERENCE} and {noise} (the harness adds them)")
    reference = WaitAllPolicy(name=REFERENCE)
    return [(reference, spec.seed), (WaitAllPolicy(name=noise), spec.noise_seed)] + [(p, spec.seed) for p in policies]


def noise_name(spec: QualitySpec) -> str:
    return f"{REFERENCE}-seed{spec.noise_seed}"


def probe_engines(items: Sequence[Item], proposers: int, aggregator: Engine, tokens_per_s: float) -> dict:
    """slot -> engine for the probe: proposer i replays its proposal of each probe item."""
    slots: dict[str, Engine] = {}
    for i in range(proposers):
        answers = {it.query: it.proposals[i] for it in items}
        slots[f"proposer-{i}"] = ReplayEngine(answers, name=f"replay-{i}", tokens_per_s=tokens_per_s,
                                              tokenizer=getattr(aggregator, "tokenizer", None))
    slots["aggregator"] = aggregator
    return slots


async def collect(engines: dict[str, Engine], spec: QualitySpec, policies: Sequence[Policy],
                  topology: Topology | None = None, progress: bool | None = None,
                  judge: Engine | None = None, on_trace=None) -> Collected:
    """Run every policy (after the reference and its noise-floor repeat) on the items of
    ``spec``. ``engines``: slot -> started engine for the real sets; the replayed sets
    (the probe, the GSM8K replay set) use the aggregator's engine with replay proposers,
    their traces kept as the "probe" kind. ``judge`` (started): judges every answer
    of the real sets against the reference's (``staircase.quality.judge``). ``on_trace(kind,
    trace)`` is called as each policy's run of a kind ("real", "probe") ends (the CLI
    writes it, so an interrupted run keeps what it finished)."""
    spec.check()
    topology = topology or moa(spec.proposers)
    items = spec.items()
    real = [it for it in items if not replayed(it.set)]
    probe = [it for it in items if replayed(it.set)]
    if probe and (topology.kind != "moa" or topology.params.get("layers") != 1
                  or topology.params.get("proposers") != spec.proposers):
        raise ConfigError("topology", topology.describe(),
                          f"MoA with one layer of {spec.proposers} proposers for the probe set")
    sampling = Sampling(temperature=spec.temperature, seed=spec.seed)
    runners = _runners(engines, topology, spec, sampling, real, probe)
    out = Collected(pd.DataFrame(columns=list(ANSWER_COLUMNS)))
    for policy, seed in runs_of(spec, policies):
        for runner, its, max_tokens in runners:
            _seed_runner(runner, spec, sampling, policy.name, seed)
            trace = await runner.run_policy(policy, [it.query for it in its], concurrency=spec.concurrency,
                                            seed=seed, progress=progress, prompt_ids=[it.prompt_id for it in its],
                                            final_max_tokens=max_tokens)
            (out.probe_traces if its is probe else out.traces)[policy.name] = trace
            if on_trace is not None:
                on_trace("probe" if its is probe else "real", trace)
        out.runs.append((policy.name, seed))
    out.answers = answers_frame(out, {it.prompt_id: it.set for it in items})
    if judge is not None and real:
        out.judged = await judge_answers(judge, out.answers, {it.prompt_id: it.query for it in real}, REFERENCE,
                                         spec.concurrency)
    return out


def _seed_runner(runner: LiveRunner, spec: QualitySpec, sampling: Sampling, name: str, seed: int) -> None:
    """The run's seeds: the noise-floor run changes the aggregator's alone (same
    proposals: what resampling the final answer changes) or every node's."""
    if name == noise_name(spec) and spec.noise_scope == "aggregator":
        runner.sampling, runner.final_seed = replace(sampling, seed=spec.seed), seed
    else:
        runner.sampling, runner.final_seed = replace(sampling, seed=seed), None


def _runners(engines, topology: Topology, spec: QualitySpec, sampling: Sampling, real: list, probe: list) -> list:
    """(runner, items, the final node's max tokens) for the real sets and for the probe."""
    runners = []
    if real:
        runners.append((LiveRunner(engines, topology, max_tokens=spec.max_tokens, sampling=sampling), real,
                        spec.max_tokens))
    if probe:
        replay = probe_engines(probe, spec.proposers, engines["aggregator"], spec.replay_tokens_per_s)
        runners.append((LiveRunner(replay, topology, max_tokens=PROPOSAL_CAP, sampling=sampling), probe,
                        spec.probe_max_tokens))
    return runners


def answers_frame(collected: Collected, set_of: Mapping[str, str]) -> pd.DataFrame:
    """One row per answer (policy, prompt) from the request rows of the real sets' and
    the probe's traces; ``set_of``: prompt id -> the name of the set its item is from."""
    frames = []
    for t in [*collected.traces.values(), *collected.probe_traces.values()]:
        df = t.requests.copy()
        df["policy"] = t.policy
        df["set"] = df["prompt_id"].map(set_of)
        frames.append(df[list(ANSWER_COLUMNS)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ANSWER_COLUMNS))


def collect_sync(engines: dict[str, Engine], spec: QualitySpec, policies: Sequence[Policy], judge: Engine | None = None,
                 **kwargs) -> Collected:
    """``collect`` in its own event loop (engines and judge started and closed around it)."""
    async def main():
        unique = {id(e): e for e in [*engines.values(), *([judge] if judge else [])]}.values()
        try:
            for e in unique:
                await e.start()
            return await collect(engines, spec, policies, judge=judge, **kwargs)
        finally:
            for e in unique:
                await e.close()

    return asyncio.run(main())


def load_collected(folder: Path, spec: QualitySpec, policies: Sequence[Policy]) -> Collected:
    """A run's answers from its written traces (``staircase.quality.report.write_trace``): the
    runs that finished, in run order."""
    from staircase.trace import read_chunks, read_requests

    out = Collected(pd.DataFrame(columns=list(ANSWER_COLUMNS)))
    for policy, seed in runs_of(spec, policies):
        found = False
        for kind, suffix in (("real", ""), ("probe", ".probe")):
            path = folder / f"{policy.name}{suffix}.requests.parquet"
            if path.is_file():
                chunks = path.with_name(f"{policy.name}{suffix}.chunks.parquet")
                trace = Trace(policy.name, read_requests(path), read_chunks(chunks) if chunks.is_file() else None)
                (out.traces if kind == "real" else out.probe_traces)[policy.name] = trace
                found = True
        if found:
            out.runs.append((policy.name, seed))
    if not out.runs:
        raise ConfigError("rescore", str(folder), "a traces folder with at least one finished run")
    out.answers = answers_frame(out, {it.prompt_id: it.set for it in spec.items()})
    return out
