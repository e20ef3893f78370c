"""`staircase serve` on replay engines (live/engines/replay.py: given answers streamed at
a set pace, no model): the OpenAI client streamed and not, policies by name, errors in
OpenAI's shape, 429 past the bound, API keys, a client that disconnects, SIGTERM with
requests in flight, and schemathesis against the server's own OpenAPI schema. The same
server on real vLLM engines: tests/test_serve_live.py. Only 127.0.0.1, servers the
tests start themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi", reason="staircase serve needs the live extra (make test installs it)")

from serving import ServeProcess, wait_for  # noqa: E402

ANSWER = ("The sky looks blue because the air scatters the short blue wavelengths of sunlight far more than the "
          "long red ones, so blue light reaches the eye from every part of the sky.")


def replay_config(tmp_path, tokens_per_s: float = 400.0) -> str:
    path = tmp_path / "engines.json"
    path.write_text(json.dumps({"engines": {"r": {"kind": "replay", "default_answer": ANSWER,
                                                  "tokens_per_s": tokens_per_s, "first_token_s": 0.02}},
                                "slots": {"proposers": ["r"], "aggregator": "r"}}))
    return str(path)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-fast")
    srv = ServeProcess(["--config", replay_config(tmp), "--policies", "wait-all,staircase-prefix-cache",
                        "--redundancy", "1", "--max-in-flight", "8"], tmp / "out")
    yield srv
    srv.stop()


def client(srv: ServeProcess, **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{srv.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def ask(content: str = "Why is the sky blue?") -> list[dict]:
    return [{"role": "user", "content": content}]


def test_the_official_client_streamed_and_not(fast):
    c = client(fast)
    whole = c.chat.completions.create(model="staircase", messages=ask())
    assert whole.choices[0].message.content.startswith("The sky looks blue")
    assert whole.usage.completion_tokens > 10 and whole.usage.prompt_tokens > 0
    assert whole.usage.model_extra["staircase"]["policy"] == "wait-all"  # the first policy is the default
    pieces, usage = [], None
    for chunk in c.chat.completions.create(model="staircase", messages=ask(), stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"policy": "staircase-prefix-cache-r1"}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) > 10 and "".join(pieces) == whole.choices[0].message.content == ANSWER
    assert usage.model_extra["staircase"]["policy"] == "staircase-prefix-cache-r1"
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.model_extra["staircase"]["calls"] > whole.usage.model_extra["staircase"]["calls"]  # its steps
    # a policy's name as model picks it too; /v1/models lists the served name and every policy
    assert client(fast).models.list().data[0].id == "staircase"
    named = c.chat.completions.create(model="staircase-prefix-cache-r1", messages=ask())
    assert named.usage.model_extra["staircase"]["policy"] == "staircase-prefix-cache-r1"


@pytest.mark.parametrize("body, status, param, needle", [
    ({"model": "gpt-x", "messages": ask()}, 404, "model", "allowed: staircase, wait-all"),
    ({"model": "staircase", "messages": ask(), "policy": "nope"}, 400, "policy", "allowed: wait-all"),
    ({"model": "staircase", "messages": []}, 400, "messages", "at least 1"),
    ({"model": "staircase", "messages": ask(), "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "staircase", "messages": ask(), "max_tokens": 99999}, 400, "max_tokens", "allowed: 1..2048"),
    ({"model": "staircase", "messages": ask(), "n": 2}, 400, "n", "less than or equal to 1"),
    ({"model": "staircase", "messages": [{"role": "user", "content": "  "}]}, 400, "messages", "no text"),
    ({"model": "staircase", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "'user'"),
    # fields the gateway cannot honour are refused, not ignored
    ({"model": "staircase", "messages": ask(), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools", "not supported"),
    ({"model": "staircase", "messages": ask(), "response_format": {"type": "json_object"}}, 400, "response_format",
     "not supported"),
    ({"model": "staircase", "messages": ask(), "logprobs": True}, 400, "logprobs", "not supported"),
    ({"model": "staircase", "messages": ask(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
])
def test_bad_requests_get_openai_errors_naming_the_parameter(fast, body, status, param, needle):
    r = httpx.post(f"{fast.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"] and err["type"]
    assert "Traceback" not in r.text


def test_stop_ends_the_answer_before_the_stop_string_streamed_and_not(fast):
    """``stop`` honoured: the answer ends before the first stop string (left out), finish
    reason ``stop``, streamed (the string may span deltas) or whole; harmless values of
    the refused fields (``logprobs: false``, ``tool_choice: "none"``) pass."""
    c = client(fast)
    whole = c.chat.completions.create(model="staircase", messages=ask(), stop=["blue", "zzz"], logprobs=False)
    assert whole.choices[0].message.content == "The sky looks " and whole.choices[0].finish_reason == "stop"
    pieces, finish = [], None
    for chunk in c.chat.completions.create(model="staircase", messages=ask(), stream=True, stop="short blue",
                                           tool_choice="none"):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == ANSWER[:ANSWER.index("short blue")] and finish == "stop"
    unstopped = c.chat.completions.create(model="staircase", messages=ask(), stop="no such words")
    assert unstopped.choices[0].message.content == ANSWER


def test_a_body_that_is_not_json_is_a_400(fast):
    r = httpx.post(f"{fast.url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_the_metrics_count_what_was_served(fast):
    client(fast).chat.completions.create(model="staircase", messages=ask())
    m = fast.metrics()
    assert m['staircase_requests_total{outcome="ok",policy="wait-all"}'] >= 1
    assert m['staircase_ttft_seconds_count{policy="wait-all"}'] >= 1
    assert m['staircase_itl_seconds_count{policy="wait-all"}'] > 10
    assert m["staircase_requests_in_flight"] == 0 and m['staircase_engine_calls_in_flight{engine="r"}'] == 0


@pytest.fixture()
def slow(tmp_path):
    srv = ServeProcess(["--config", replay_config(tmp_path, tokens_per_s=15.0), "--max-in-flight", "2",
                        "--grace-s", "60", "--flush-s", "1"], tmp_path / "out", env={"STAIRCASE_API_KEY": "sekrit-42"})
    yield srv
    srv.stop()


def stream_in_thread(srv: ServeProcess, results: list, key: str = "sekrit-42") -> threading.Thread:
    def go():
        try:
            got = list(client(srv, api_key=key).chat.completions.create(model="staircase", messages=ask(),
                                                                       stream=True))
            results.append("".join(c.choices[0].delta.content or "" for c in got if c.choices))
        except Exception as err:  # noqa: BLE001 - the test asserts on it
            results.append(err)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_keys_overload_disconnects_and_sigterm(slow, tmp_path):
    """One slow server: the API key, 429 past --max-in-flight, a client that goes away
    mid-stream (its calls cancelled on the engine), then SIGTERM with requests in flight
    (they finish within the grace; every row is on disk)."""
    from openai import APIConnectionError, AuthenticationError, RateLimitError

    with pytest.raises(AuthenticationError):
        client(slow, api_key="wrong").chat.completions.create(model="staircase", messages=ask())
    # a client that disconnects after the first piece: the request ends, its calls are cancelled
    with httpx.stream("POST", f"{slow.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": "Bearer sekrit-42"},
                      json={"model": "staircase", "messages": ask(), "stream": True}) as r:
        next(r.iter_lines())
    gone = wait_for(lambda: slow.metrics().get('staircase_requests_total{outcome="error",policy='
                                               '"staircase-prefix-cache-r1"}'), 30)
    assert gone == 1
    m = slow.metrics()
    assert m['staircase_engine_calls_in_flight{engine="r"}'] == 0 and m["staircase_requests_in_flight"] == 0
    # two in flight fill the bound: the third gets 429 with Retry-After
    results: list = []
    threads = [stream_in_thread(slow, results) for _ in range(2)]
    assert wait_for(lambda: slow.metrics()["staircase_requests_in_flight"] == 2, 30)
    with pytest.raises(RateLimitError) as over:
        client(slow, api_key="sekrit-42").chat.completions.create(model="staircase", messages=ask())
    assert over.value.response.headers["retry-after"] == "1" and "--max-in-flight 2" in over.value.message
    # SIGTERM now: both streams still finish (grace 60 s), then the rows are written
    assert slow.stop() is not None
    for t in threads:
        t.join(60)
    assert results == [ANSWER, ANSWER] or all(isinstance(r, str) and r.startswith("The sky") for r in results), results
    _rows_after_stop(slow)
    assert "sekrit-42" not in slow.text()
    with pytest.raises(APIConnectionError):  # nothing listens any more
        client(slow, api_key="sekrit-42", timeout=60).chat.completions.create(model="staircase", messages=ask())


def _rows_after_stop(srv: ServeProcess) -> None:
    from staircase.calibration.runs import load_live_run

    config = json.loads((srv.out / "config.json").read_text())
    assert config["command"] == "serve" and config["stopped"] == {"in_flight_at_stop": 2, "ok": 2, "error": 0,
                                                                "cancelled": 0}
    run = load_live_run(srv.out)  # what `staircase validate` reads
    req = run.requests["staircase-prefix-cache-r1"]
    assert len(req) == 3 and list(req["request_id"]) == [0, 1, 2]
    assert sorted(req["outcome"]) == ["error", "ok", "ok"]
    assert (req.loc[req["outcome"] == "error", "error"] == "cancelled: client disconnected").all()
    assert (srv.out / "summary.csv").is_file() and "stopped" in srv.text()
    assert config["rate"] > 0  # the observed arrival rate: validate replays an open loop at the arrivals
    done = subprocess.run([sys.executable, "-m", "staircase", "validate", str(srv.out), "--allow-other-model",
                           "--replicates", "1", "--out", str(srv.out.parent / "validate")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "staircase-prefix-cache-r1" in done.stdout, done.stderr[-2000:]


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(fast):
    """Property-based requests from the server's own OpenAPI schema (valid and not):
    no 5xx, every response matches the schema, status codes are documented."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)

    schema = schemathesis.openapi.from_url(f"{fast.url}/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    tried: dict = {}
    statuses: dict = {}

    def fuzz(strategy, key: str) -> None:
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def run(case):
            response = case.call_and_validate(checks=checks, timeout=60)
            tried[key] = tried.get(key, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        run()

    def served(case):  # a valid request for the served model, to reach the engines (random names get 404)
        if isinstance(case.body, dict):
            case.body = {**case.body, "model": "staircase"}
        return case

    for operation in schema.get_all_operations():
        op = operation.ok()
        post = op.method.upper() == "POST"
        # valid requests, and (where there is a body to break) requests that break the schema
        for mode in schemathesis.GenerationMode if post else [schemathesis.GenerationMode.POSITIVE]:
            fuzz(op.as_strategy(generation_mode=mode), f"{op.label} {mode.value}")
        if post:
            fuzz(op.as_strategy().map(served), f"{op.label} served model")
    assert tried.get("POST /v1/chat/completions positive", 0) >= 20, tried
    assert tried.get("POST /v1/chat/completions negative", 0) >= 10, tried
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 10 and statuses.get(404, 0) >= 1, statuses
    print(f"schemathesis examples per operation: {tried}; statuses: {statuses}")


def test_a_bug_in_a_run_ends_its_stream_with_an_error_not_a_hang(tmp_path):
    """In process (FastAPI's test client): a run that raises ends the event stream with
    an error event and [DONE], and a plain request with a 500 in OpenAI's shape; no
    traceback reaches the client."""
    from fastapi.testclient import TestClient

    from staircase.live.engines import engines_from_config
    from staircase.live.gateway.rowlog import RowLog
    from staircase.live.runner import LiveRunner
    from staircase.live.gateway.server import StaircaseServer
    from staircase.live.gateway.app import create_app
    from staircase.policies import StaircasePolicy
    from staircase.topology import moa

    topology = moa(3)
    engines = engines_from_config(json.loads(open(replay_config(tmp_path)).read()), topology)
    runner = LiveRunner(engines.slots, topology, deployment=engines.deployment, pools=engines.pools)
    server = StaircaseServer(runner, [StaircasePolicy(redundancy=1)], rowlog=RowLog(tmp_path / "out", runner.recorder,
                                                                                      {"command": "serve"}))

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    runner.run_request = broken
    with TestClient(create_app(server), raise_server_exceptions=False) as c:
        body = {"model": "staircase", "messages": ask()}
        streamed = c.post("/v1/chat/completions", json=body | {"stream": True})
        assert streamed.status_code == 200 and "internal error (RuntimeError)" in streamed.text
        assert streamed.text.endswith("data: [DONE]\n\n")
        plain = c.post("/v1/chat/completions", json=body)
        assert plain.status_code == 500 and plain.json()["error"]["message"] == "internal error (RuntimeError)"
        assert "Traceback" not in plain.text + streamed.text and "a bug" not in plain.text
        assert c.get("/health").json()["requests_in_flight"] == 0


def test_overload_at_twice_capacity_is_refused_and_every_accepted_request_ends(tmp_path):
    """benchmarks/serve_overload.py, small: capacity measured, then arrivals at twice it;
    past the bound the server answers 429 (nothing else), /health keeps answering, the
    memory is measured, and every accepted request ends."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "serve_overload.py"), "--config",
                        replay_config(tmp_path, tokens_per_s=40.0), "--max-in-flight", "2", "--probe-s", "4",
                        "--seconds", "8", "--out", str(tmp_path / "overload")],
                       capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["capacity_per_s"] > 0 and got["sent"] >= 4
    assert set(got["statuses"]) <= {"200", "429"} and got["statuses"].get("429", 0) >= 1, got
    assert got["not_ended"] == 0 and got["health_failures"] == 0
    assert got["health_max_s"] < 5  # (the figure, 1 s, is the benchmark's to report; no timing margins here)
    assert got["rss_peak_mb"] >= got["rss_before_mb"] > 0


def test_row_parts_roll_over_and_running_requests_keep_their_chunks(tmp_path):
    from staircase.live.gateway.rowlog import RowLog, read_parts
    from staircase.driver import Recorder
    from staircase.trace import ChunkRow, RequestRow, read_requests

    def request(i):
        return RequestRow(i, "p", 2.0 * i, 5, "ok", "", "", 0.1, 1.0, 0.01, 10, 10.0, 0.1, 0, 4, 100, 0, 8.0, None, "a")

    def chunk(i):
        return ChunkRow(i, "p", "agg", "aggregator", 1, "e", 0, 0, 10, 100, 0, 0.0, 0.1, 1.0, True, "a")
    rec = Recorder()
    log = RowLog(tmp_path, rec, {"command": "serve"}, part_requests=2)
    rec.chunks += [chunk(0), chunk(1)]
    rec.requests.append(request(0))  # request 1 still runs
    assert log.flush() == 1 and rec.chunks == [chunk(1)] and rec.requests == []
    rec.requests.append(request(1))
    assert log.flush() == 1 and rec.chunks == []  # the open part grows to its 2 requests
    rec.requests.append(request(2))
    rec.chunks.append(chunk(2))
    assert log.flush() == 1  # a new part
    first = read_requests(tmp_path / "traces" / "p.part-00001.requests.parquet")
    assert list(first["request_id"]) == [0, 1]
    req, chunks = read_parts(tmp_path / "traces")["p"]
    assert sorted(req["request_id"]) == [0, 1, 2] and sorted(chunks["request_id"]) == [0, 1, 2]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["parts"] == 2 and config["rows_written"] == {"requests": 3, "chunks": 3} and config["rate"] == 0.5


def test_a_live_run_replays_given_arrivals_for_a_paired_comparison(tmp_path, monkeypatch):
    """`staircase live --arrivals`: the arrivals of a file or of another run's rows (a
    server's), so a live run and a served run see the same traffic."""
    import asyncio

    from staircase.workload import read_arrivals as load_arrivals
    from staircase.live.engines import engines_from_config
    from staircase.live.gateway.rowlog import RowLog
    from staircase.live.runner import LiveRunner
    from staircase.driver import Recorder
    from staircase.errors import ConfigError
    from staircase.policies import StaircasePolicy
    from staircase.topology import moa
    from staircase.trace import RequestRow

    rec = Recorder()
    log = RowLog(tmp_path / "served", rec, {"command": "serve"})
    for i, t in enumerate([10.0, 10.5, 11.75]):
        rec.requests.append(RequestRow(i, "p", t, 5, "ok", "", "", 0.1, 1.0, 0.01, 10, 10.0, 0.1, 0, 4, 100, 0, 8.0,
                                       None, "a"))
    log.flush()
    assert load_arrivals(tmp_path / "served") == [0.0, 0.5, 1.75]
    (tmp_path / "times.txt").write_text("0\n0.25\n0.5\n")
    given = load_arrivals(tmp_path / "times.txt")
    topology = moa(3)
    engines = engines_from_config(json.loads(open(replay_config(tmp_path)).read()), topology)
    runner = LiveRunner(engines.slots, topology, deployment=engines.deployment, pools=engines.pools)
    trace = asyncio.run(runner.run_policy(StaircasePolicy(redundancy=1), ["a", "b", "c"], arrivals=given))
    got = trace.requests.sort_values("request_id")["arrival_s"].to_numpy()
    assert (got >= given).all() and (got - given < 0.2).all() and (trace.requests["outcome"] == "ok").all()
    with pytest.raises(ConfigError, match="at least one per request"):
        asyncio.run(runner.run_policy(StaircasePolicy(redundancy=1), ["a", "b", "c", "d"], arrivals=given))
    with pytest.raises(ConfigError, match="arrivals"):
        load_arrivals(tmp_path / "nowhere")


def test_a_searchs_best_policy_runs_in_sim_live_and_serve(tmp_path):
    """The serve guide's headline path, end to end: a real `staircase search` writes
    best.json; `sim`, `live` (replay engines) and `serve` each run that policy from the file
    (--policy-config); the server answers under --served-model-name, with the key named by
    --server-key-env."""
    from openai import AuthenticationError, OpenAI

    def staircase(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "staircase", *args], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    staircase("search", "--budget", "6", "--requests", "20", "--fix", "staircase.layout=prefix-cache",
              "--out", "search", "--no-figure", "--no-progress")
    best = str(tmp_path / "search" / "best.json")
    policy = json.loads(Path(best).read_text())["best"]
    sim = json.loads(staircase("sim", "--requests", "10", "--policies", "", "--policy-config", best,
                               "--summary-only", "--no-figure", "--format", "json", "--out", "sim"))["policies"]
    assert len(sim) == 1 and next(iter(sim.values()))["errors"] == 0
    live = json.loads(staircase("live", "--config", replay_config(tmp_path), "--requests", "1", "--policies", "",
                                "--policy-config", best, "--no-figure", "--no-progress", "--format", "json",
                                "--out", "live"))["policies"]
    assert list(live) == list(sim) and next(iter(live.values()))["errors"] == 0
    recorded = json.loads((tmp_path / "live" / "config.json").read_text())["policies"][0]
    assert {k: recorded[k] for k in policy} == policy  # the run ran the searched policy itself
    srv = ServeProcess(["--config", replay_config(tmp_path), "--policies", "", "--policy-config", best,
                        "--served-model-name", "my-moa", "--server-key-env", "MY_GATEWAY_KEY"], tmp_path / "out",
                       env={"MY_GATEWAY_KEY": "k-123"})
    try:
        ok = OpenAI(base_url=f"{srv.url}/v1", api_key="k-123", max_retries=0)
        assert [m.id for m in ok.models.list().data][0] == "my-moa"
        answer = ok.chat.completions.create(model="my-moa", messages=ask())
        assert answer.choices[0].message.content == ANSWER
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{srv.url}/v1", api_key="STAIRCASE_API_KEY", max_retries=0).models.list()
    finally:
        srv.stop()


def test_the_http_judge_is_asked_both_orders_of_every_pair(tmp_path):
    """`staircase quality --judge-url`: an OpenAI-compatible judge (here `staircase serve`
    answering "A" to everything, a judge that always prefers the first position) is asked
    both orders of every answer against wait-all's, every verdict parses, and a position
    preference cancels out (0.5). The URL may end in /v1, as OpenAI clients take it."""
    import pandas as pd

    judge_engines = tmp_path / "judge.json"
    judge_engines.write_text(json.dumps({"engines": {"j": {"kind": "replay", "default_answer": "A is better.",
                                                           "tokens_per_s": 400.0, "first_token_s": 0.01}},
                                         "slots": {"proposers": ["j"], "aggregator": "j"}}))
    judge = ServeProcess(["--config", str(judge_engines), "--policies", "single", "--flush-s", "1"], tmp_path / "judge")
    try:
        done = subprocess.run([sys.executable, "-m", "staircase", "quality", "--config", replay_config(tmp_path),
                               "--sets", "alpaca_eval", "--prompts", "2", "--judge-url", f"{judge.url}/v1",
                               "--judge-model", "staircase", "--no-figure", "--out", str(tmp_path / "q")],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        judged = judge.metrics()['staircase_requests_total{outcome="ok",policy="single"}']
    finally:
        judge.stop()
    verdicts = pd.read_csv(tmp_path / "q" / "judge.csv")
    assert len(verdicts) >= 2 * 3 and (verdicts["judge_unparsed"] == 0).all(), verdicts
    assert (verdicts["judge"] == 0.5).all()  # "A" in both orders: once for each side
    assert judged == 2 * len(verdicts)  # both orders of every pair went to the judge
