"""Real engines behind one async streaming interface, one module per kind.

- ``base``: the interface (``Engine``), ``Delta``, ``Sampling``, ``EngineError``.
- ``inprocess``: ``VLLMEngine`` (kind ``vllm``), vLLM's ``AsyncLLM`` in this process;
  ``session``: a consumer's steps as one vLLM streaming-input request on it.
- ``http_engine``: ``HTTPEngine`` (kind ``http``), any OpenAI-compatible endpoint.
- ``serve``: ``ServeEngine`` (kind ``serve``), a ``vllm serve`` process the engine owns.
- ``replay``: ``ReplayEngine`` (kind ``replay``), given answers streamed at a given rate.
- ``config``: engines and slots as data (``EngineOptions``, ``engines_from_config``).
- ``factory``: ``open_engines``, the one context manager that starts and stops them.
"""

from .base import Delta, Engine, EngineError, Sampling, render_chat
from .config import (ENGINE_KINDS, EngineOptions, EngineSet, add_deployment_argument, add_engine_arguments, build_engine,
                     cores_for, engines_from_config, model_path)
from .factory import open_engines, quiet_vllm_logs
from .http_engine import HTTPEngine, check_url
from .inprocess import VLLMEngine, cpu_engine_env, cpu_scheduler_args
from .replay import ReplayEngine, load_answers, replay_from_spec
from .serve import ServeEngine, VLLMServer, free_port
from .session import VLLMSession

__all__ = ["Delta", "Engine", "EngineError", "Sampling", "render_chat", "ENGINE_KINDS", "EngineOptions", "EngineSet",
           "add_deployment_argument", "add_engine_arguments", "build_engine", "cores_for", "engines_from_config", "model_path", "open_engines",
           "quiet_vllm_logs", "HTTPEngine", "check_url", "VLLMEngine", "cpu_engine_env", "cpu_scheduler_args",
           "ReplayEngine", "load_answers", "replay_from_spec", "ServeEngine", "VLLMServer", "free_port",
           "VLLMSession"]
