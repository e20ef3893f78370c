"""A `staircase serve` process for the tests: started on a free port of 127.0.0.1,
ready once /health answers, stopped with SIGTERM (its output kept for the asserts),
and the Prometheus samples of its /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from staircase.live.engines import free_port


class ServeProcess:
    def __init__(self, args: list[str], out: Path, env: dict | None = None, ready_s: float = 900):
        self.port = free_port()
        self.out = out
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "staircase", "serve", "--port", str(self.port), "--out", str(out), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=out.parent)
        self.log = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._wait_ready(ready_s)

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.log.extend(chunk)

    def text(self) -> str:
        return bytes(self.log).decode(errors="replace")

    def _wait_ready(self, limit_s: float) -> None:
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"staircase serve exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise AssertionError(f"staircase serve not ready in {limit_s} s:\n{self.text()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value of every sample (comments left out)."""
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def stop(self, timeout_s: float = 300) -> int:
        """SIGTERM, then wait for the process (killed past ``timeout_s``); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.reader.join(30)
        return self.proc.returncode


def wait_for(check, limit_s: float, every_s: float = 0.2):
    """Poll ``check()`` until it returns something true (returned) or ``limit_s`` passes (None)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    return None
