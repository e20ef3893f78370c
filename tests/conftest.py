"""Fixtures shared by the live test modules: one event loop, the bundled model and one
in-process vLLM engine per test session (start-up dominates test time; docs/guides/machines.md)."""

from __future__ import annotations

import asyncio
import os

import pytest

# Ray on Linux maps 127.0.0.1 to the machine's network address (ray start --node-ip-address and
# ray.init alike) unless this is 0; set before anything (vLLM included) imports Ray, so the local
# cluster of tests/test_search.py and its driver stay on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="session")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def model_dir():
    from staircase.live.model import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def engine(loop, model_dir):
    from staircase.live.engines import VLLMEngine

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # the server, when there is one, takes core 1
    eng = VLLMEngine(model_dir, name="inproc")
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())
