"""Fixtures shared by the live test modules: one event loop, the bundled model and one
in-process vLLM engine per test session (start-up dominates test time; docs/guides/machines.md)."""

from __future__ import annotations

import asyncio
import os

import pytest


@pytest.fixture(scope="session")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def model_dir():
    from live.model import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def engine(loop, model_dir):
    from live.engines import VLLMEngine

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"  # the server, when there is one, takes core 1
    eng = VLLMEngine(model_dir, name="inproc")
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())
