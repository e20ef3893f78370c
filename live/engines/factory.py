"""One way to start and stop the engines of a run, for every command.

``open_engines`` checks the config, builds its engines, starts the processes the
engines own (``Engine.OWNS_PROCESS``: ``serve``) and announces the machine and each engine's settings; on the
way out, however the block ends (an error, Ctrl-C), it stops those processes. Engines
that live in this process (``vllm``, ``http``, ``replay``) start in the caller's event
loop (``LiveRunner.start``) and are closed there.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

from staircase.deployment import Deployment
from staircase.topology import Topology

from ..machine import announce_machine
from .config import EngineSet, engines_from_config


def quiet_vllm_logs() -> None:
    """Keep stdout for the table or the JSON object: vLLM logs to stderr, warnings only."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


@contextmanager
def open_engines(raw: dict, topology: Topology, dtype: str | None = None,
                 deployment: Deployment | None = None) -> Iterator[EngineSet]:
    """The engines of ``raw`` (as pools of replicas, with ``deployment``) with their
    processes running; ``.machine`` holds what ``config.json`` records (``machine``,
    ``engine_settings``)."""
    quiet_vllm_logs()
    engines = engines_from_config(raw, topology, dtype, deployment)
    owned = [e for e in engines.used if e.OWNS_PROCESS]
    try:
        if owned:  # together: a pool's replicas start in the time of one
            with ThreadPoolExecutor(len(owned)) as pool:
                for done in [pool.submit(engine.launch) for engine in owned]:
                    done.result()
        engines.machine = announce_machine(engines.used)
        yield engines
    finally:
        for engine in owned:
            engine.terminate()
