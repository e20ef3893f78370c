"""Designed probes for a calibration run, driven through the live runner.

Each probe set is a list of ``Probe`` groups; a group runs the ``single`` policy (one
call per request on the engine under test) over queries of designed token lengths:

- ``prefill``: one call at a time over a ladder of prompt lengths (cache misses),
  a few output tokens: the first-token wait against uncached prompt tokens.
- ``cache-hit``: the same queries again without emptying the prefix cache: the
  same prompts, mostly served from cache, so the wait at few uncached tokens.
- ``cache-extend``: the first of those queries again, each followed by 128 or 384 new
  tokens: new tokens after a cached prefix of 0 to 1,344 tokens, whose attention over
  it costs more the longer the prefix (measured here: 0.18 us per new x cached token).
- ``decode-c<c>-short`` / ``-long``: ``c`` requests sent at once, all with short
  (48-token) or all with long (1024-token) prompts, so batch size and batch
  context vary independently; a fixed number of output tokens (end-of-sequence ignored), cut into 8-token
  chunks: decode iteration time against batch size and context. The levels should
  reach the batch sizes of the work the profile will simulate (an MoA with 3
  proposers at 4 requests in flight runs about 12 sequences at once); the fit
  extrapolates linearly beyond them.

Queries are cut from the bundled prompt sets to an exact token count with the
engine's own tokenizer, each with a distinct lead so no two share a cached prefix.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from staircase.errors import ConfigError


@dataclass(frozen=True)
class Probe:
    name: str
    prompt_tokens: tuple[int, ...]  # one query per entry, in order
    max_tokens: int
    concurrency: int = 1
    reset_cache: bool = True
    same_queries_as: str | None = None  # reuse another group's queries (cache hits)
    extends: str | None = None  # another group's queries, each followed by ``prompt_tokens[i]`` more tokens
    chunk_tokens: int = 8  # the trace's chunk size: one decode observation per chunk


def probe_set(kind: str) -> list[Probe]:
    """``standard`` (a few minutes on 2 CPU cores with SmolLM2-135M) or ``small``
    (tests: well under a minute)."""
    if kind == "standard":
        ladder = (16, 96, 256, 512, 896, 1344, 1792)  # under the CPU build's 2048-token step budget
        probes = [Probe("prefill", ladder + ladder, 4),
                  Probe("cache-hit", ladder + ladder, 4, reset_cache=False, same_queries_as="prefill"),
                  # new tokens after a cached prefix: their attention over it (prefill_s.per_token_cached)
                  Probe("cache-extend", (128, 384) * 3, 4, reset_cache=False, extends="prefill")]
        # short and long prompts at each level, so batch size and batch context vary apart
        for c in (1, 4, 8, 16):
            for kind, tokens in (("short", 48), ("long", 1024)):
                n = 3 if c == 1 else c
                probes.append(Probe(f"decode-c{c}-{kind}", (tokens,) * n, 64, concurrency=c))
        return probes
    if kind == "small":
        ladder = (16, 200, 600)
        return [Probe("prefill", ladder + ladder, 2),
                Probe("cache-hit", ladder, 2, reset_cache=False, same_queries_as="prefill"),
                Probe("cache-extend", (64, 128), 2, reset_cache=False, extends="prefill"),
                Probe("decode-c1", (64,), 24), Probe("decode-c3", (64, 400, 64), 24, concurrency=3)]
    raise ConfigError("probes", kind, "standard or small")


def probe_queries(probe: Probe, count_tokens, cut_tokens, source_texts: list[str], lead: str) -> list[str]:
    """Queries of the probe's token lengths (``count_tokens(text)``,
    ``cut_tokens(text, n)`` from the engine's tokenizer)."""
    pool = " ".join(source_texts)
    out = []
    for i, n in enumerate(probe.prompt_tokens):
        head = f"[{lead} {i}] "
        body = pool
        while count_tokens(head + body) < n:
            body = body + " " + pool
        out.append(cut_tokens(head + body, n))
    return out


def _cutter(engine):
    """``cut(text, n)``: the first n tokens of text, by the engine's tokenizer (about 4
    characters per token without one, as ``Engine.count_tokens`` counts)."""
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        return lambda text, n: text[: 4 * n]
    return lambda text, n: tok.decode(tok.encode(text, add_special_tokens=False)[:n])


async def run_probes(engine, probes, folder: Path, *, seed: int = 0, progress: bool | None = None) -> list[Path]:
    """Run the probe groups on one engine; writes ``traces/probe-<engine>-<group>.*``."""
    from staircase.live.engines import Sampling
    from staircase.live.prompts import load_prompts
    from staircase.live.runner import LiveRunner
    from staircase.policies import SinglePolicy
    from staircase.topology import moa

    runner = LiveRunner({"proposer-0": engine, "aggregator": engine}, moa(1), max_tokens=8,
                        sampling=Sampling(temperature=0.7, seed=seed, ignore_eos=True))
    await runner.start()
    count, cut = engine.count_tokens, _cutter(engine)
    pool = load_prompts("mt_bench")
    await runner.run_policy(SinglePolicy(name="warmup"), ["Say hello."], progress=False)  # first-call costs, not kept
    queries: dict[str, list[str]] = {}
    paths = []
    for probe in probes:
        qs = queries[probe.same_queries_as][: len(probe.prompt_tokens)] if probe.same_queries_as else \
            probe_queries(probe, count, cut, pool, f"{engine.name}/{probe.name}")
        if probe.extends:  # the other group's queries, each with the tokens just cut after it
            qs = [f"{q}\n{more}" for q, more in zip(queries[probe.extends], qs)]
        queries[probe.name] = qs
        t0 = time.perf_counter()
        # (a file name: a pool replica's engine name, ``pool/i``, holds a slash)
        policy = SinglePolicy([probe.chunk_tokens], name=f"probe-{engine.name.replace('/', '-')}-{probe.name}")
        trace = await runner.run_policy(policy, qs, concurrency=probe.concurrency, seed=seed, progress=progress,
                                        reset_cache=probe.reset_cache, max_tokens=probe.max_tokens)
        print(f"probe {engine.name}/{probe.name}: {len(qs)} requests in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        paths += trace.write(folder / "traces")
    return paths
