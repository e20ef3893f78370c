"""`staircase serve --workers N` (live/gateway/workers.py): N gateway processes on one port
on replay engines, their rows and /metrics merged; the merge of the workers' configs;
the refusal of engines a worker cannot share."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi", reason="staircase serve needs the live extra (make test installs it)")

from serving import ServeProcess  # noqa: E402
from test_serve import ANSWER, replay_config  # noqa: E402

POLICY = "staircase-prefix-cache-r1"


def test_two_workers_answer_on_one_port_and_their_rows_and_metrics_merge(tmp_path):
    srv = ServeProcess(["--config", replay_config(tmp_path, tokens_per_s=60.0), "--redundancy", "1",
                        "--workers", "2", "--flush-s", "1"], tmp_path / "out")
    try:
        def ask(i: int) -> dict:
            r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120,
                           json={"model": "staircase", "messages": [{"role": "user", "content": f"q{i}"}]})
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(12)))
        metrics = srv.metrics()
    finally:
        rc = srv.stop()
    assert rc == 0, srv.text()[-3000:]
    assert "staircase serve (2 workers): http://127.0.0.1" in srv.text()
    assert all(a["choices"][0]["message"]["content"] == ANSWER for a in answers)
    ids = sorted(int(a["id"].rsplit("-", 1)[1]) for a in answers)
    assert len(set(ids)) == 12  # worker k numbers k, k + 2, ...: no two answers share an id
    # whichever worker answered the scrape counted every worker's requests
    assert metrics[f'staircase_requests_total{{outcome="ok",policy="{POLICY}"}}'] == 12
    assert metrics[f'staircase_ttft_seconds_count{{policy="{POLICY}"}}'] == 12
    assert metrics["staircase_requests_in_flight"] == 0
    out = srv.out
    config = json.loads((out / "config.json").read_text())
    assert config["workers"] == 2 and config["rows_written"]["requests"] == 12 and config["rate"] > 0
    assert "worker" not in config and "arrivals_s" not in config
    from staircase.live.gateway.rowlog import read_parts

    requests, chunks = read_parts(out / "traces")[POLICY]
    assert sorted(requests.request_id) == ids and set(chunks.request_id) == set(ids)
    assert (out / "summary.csv").exists() and sorted(p.name for p in (out / "workers").iterdir()) == ["0", "1"]
    assert all(".worker-" in p.name for p in (out / "traces").glob("*.parquet"))


def test_the_parent_merges_the_workers_configs(tmp_path):
    from staircase.live.gateway.workers import merge_configs
    from staircase.record import write_record

    base = {"command": "serve", "rows_written": {}, "parts": 0}
    for k, (requests, span, stopped) in enumerate([(3, [1.0, 3.0], 2), (2, [2.0, 5.0], 1)]):
        write_record(tmp_path / "workers" / str(k), base | {
            "worker": k, "rows_written": {"requests": requests, "chunks": 10 * requests}, "parts": 1,
            "arrivals_s": span, "stopped": {"in_flight_at_stop": stopped, "ok": stopped, "error": 0, "cancelled": 0}})
    stopped = merge_configs(tmp_path, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rows_written"] == {"requests": 5, "chunks": 50} and config["parts"] == 2
    assert config["rate"] == pytest.approx(4 / 4.0)  # 5 arrivals from 1.0 s to 5.0 s
    assert stopped == {"in_flight_at_stop": 3, "ok": 3, "error": 0, "cancelled": 0} == config["stopped"]
    assert "worker" not in config and "arrivals_s" not in config and config["workers"] == 2


def test_workers_refuse_engines_that_each_worker_would_load(tmp_path):
    done = subprocess.run([sys.executable, "-m", "staircase", "serve", "--workers", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "workers: got 2; allowed: 1 while engines local are not http or replay engines" in done.stderr
    done = subprocess.run([sys.executable, "-m", "staircase", "serve", "--workers", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "workers: got 0; allowed: an integer >= 1" in done.stderr
