"""``staircase serve --workers N``: N gateway processes on one port.

The parent binds the port once and starts N worker processes (``spawn``) that accept on
that one socket; each worker is a whole ``staircase serve`` (its own runner, routers,
watchdog and HTTP engine sessions) and the kernel hands each new connection to whichever
worker accepts first. What is merged, and how:

- **rows**: worker k writes its parts as ``traces/<policy>.worker-<k>.part-<n>...``,
  its config as ``workers/<k>/config.json``; request ids are unique across workers
  (worker k numbers k, k + N, k + 2N, ...) and every worker's clock starts at the
  parent's, so ``read_parts`` (``staircase validate``) reads the parts as one trace. At
  the stop the parent writes ``config.json`` with the rows and parts of all, the rate
  over all arrivals and how each worker's requests in flight ended, then the summary.
- **metrics**: prometheus-client's multiprocess mode (a scratch folder the parent makes
  and removes): counters and histograms summed over workers, requests in flight and
  calls in flight per engine summed over the live workers (each worker samples its
  engines' calls every second); any worker answers ``/metrics`` for all.

What is not shared: each worker's routers see only its own calls, paces and outlier
ejections are learnt per worker, a request's calls all stay in the worker that took it.
Only engines reached over HTTP (``http``) or replayed (``replay``) can be shared: a
``vllm`` or ``serve`` engine would load its model once per worker. SIGTERM or Ctrl-C to
the parent stops every worker as one ``staircase serve`` stops (``--grace-s``); a worker
that exits on its own stops the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from staircase.errors import ConfigError
from staircase.jsonio import read_json
from staircase.record import write_record

from .rowlog import mean_rate

SHAREABLE = ("http", "replay")


def check_shareable(workers: int, raw: dict) -> None:
    """``--workers`` above 1 only on engines every worker can reach (``SHAREABLE``)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("workers", workers, "an integer >= 1")
    kinds = {name: spec.get("kind") for name, spec in raw.get("engines", {}).items() if isinstance(spec, dict)}
    own = sorted(name for name, kind in kinds.items() if kind not in SHAREABLE)
    if workers > 1 and own:
        raise ConfigError("workers", workers, f"1 while engines {', '.join(own)} are not http or replay engines "
                          "(a vllm or serve engine would load its model once per worker: run it as `vllm serve` "
                          "and name it as an http engine)")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket the workers share (an address in use is a named error here, once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError("port", port, f"a free port on {host} ({err.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_workers(args, workers: int, folder: Path, serve_one) -> None:
    """Run ``workers`` gateways on ``args.host:args.port`` until SIGTERM or Ctrl-C; each
    worker runs ``serve_one(args, worker=...)`` (a module's function: it is pickled)."""
    sock = bind(args.host, args.port)
    scratch = tempfile.mkdtemp(prefix="staircase-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = scratch  # the workers inherit it before prometheus is imported
    ctx = multiprocessing.get_context("spawn")
    inbox = ctx.Queue()
    epoch = time.perf_counter()
    procs = [ctx.Process(target=worker_main, args=(serve_one, args, k, workers, sock, epoch, inbox, os.getpid()),
                         name=f"staircase-serve-{k}") for k in range(workers)]
    stop = _Stop(procs)
    try:
        for proc in procs:
            proc.start()
        _await_ready(procs, inbox, folder, workers)
        while not stop.asked and all(p.is_alive() for p in procs):
            time.sleep(0.2)
    finally:
        stop.all(args.grace_s)
        sock.close()
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(scratch, ignore_errors=True)
    stopped = merge_configs(folder, workers)
    from .serving import write_summary

    write_summary(folder, stopped)


class _Stop:
    """SIGTERM and SIGINT to the parent: every worker gets one SIGTERM (the workers have
    a process group of their own, so a terminal's Ctrl-C reaches only the parent)."""

    def __init__(self, procs: list):
        self.procs, self.asked = procs, False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._ask)

    def _ask(self, _sig, _frame) -> None:
        self.asked = True

    def all(self, grace_s: float) -> None:
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 30
        for proc in self.procs:
            if proc.pid is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()


def _await_ready(procs: list, inbox, folder: Path, workers: int) -> None:
    """Wait for every worker's engines; the first that fails stops the start (its error)."""
    ready: dict[int, str] = {}
    while len(ready) < workers:
        try:
            kind, k, what = inbox.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                raise ConfigError("workers", workers, f"workers that start ({dead[0].name} exited with "
                                  f"{dead[0].exitcode} before it was ready)")
            continue
        if kind == "failed":
            raise what
        ready[k] = what
    first = read_json(folder / "workers" / "0" / "config.json", "workers/0/config.json")
    config = {k: v for k, v in first.items() if k not in ("worker", "arrivals_s")}
    write_record(folder, config | {"workers": workers})
    print(ready[0].replace("staircase serve:", f"staircase serve ({workers} workers):", 1), flush=True)


def merge_configs(folder: Path, workers: int) -> dict:
    """``config.json`` over every worker's: rows and parts summed, the rate over all their
    arrivals, the stop's outcomes summed. Returns the merged stop summary."""
    paths = [folder / "workers" / str(k) / "config.json" for k in range(workers)]
    configs = [read_json(p, f"workers/{p.parent.name}/config.json") for p in paths if p.exists()]
    if not configs:
        return {}
    merged = dict(configs[0]) | {"workers": workers}
    merged["rows_written"] = {key: sum(c["rows_written"][key] for c in configs) for key in ("requests", "chunks")}
    merged["parts"] = sum(c["parts"] for c in configs)
    spans = [c["arrivals_s"] for c in configs if c.get("arrivals_s")]
    if spans:
        merged["rate"] = mean_rate([min(s[0] for s in spans), max(s[1] for s in spans)],
                                   merged["rows_written"]["requests"])
    stopped = [c["stopped"] for c in configs if isinstance(c.get("stopped"), dict)]
    merged["stopped"] = {key: sum(s.get(key) or 0 for s in stopped) for key in stopped[0]} if stopped else {}
    merged.pop("arrivals_s", None)
    merged.pop("worker", None)
    write_record(folder, merged)
    return merged["stopped"]


def worker_main(serve_one, args, k: int, workers: int, sock: socket.socket, epoch: float, inbox,
                parent: int) -> None:
    """One worker: a whole ``staircase serve`` on the shared socket; it tells the parent
    when its engines are up (the ready line) or why they are not."""
    os.setpgrp()
    try:
        serve_one(args, worker=Worker(k, workers, sock, epoch, parent, inbox))
    except Exception as err:  # noqa: BLE001 (the parent names it: a worker has no terminal of its own)
        inbox.put(("failed", k, err if _pickles(err) else ConfigError("workers", k, str(err))))
        raise SystemExit(1) from None


def _pickles(err: Exception) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return True
    except Exception:  # noqa: BLE001
        return False


class Worker:
    """What a worker process knows of its place: ``k`` of ``n``, the socket, the shared
    clock's start, the parent (a worker whose parent is gone stops)."""

    def __init__(self, k: int, n: int, sock: socket.socket, epoch: float, parent: int, inbox):
        self.k, self.n, self.sock, self.epoch, self.parent, self.inbox = k, n, sock, epoch, parent, inbox

    def ready(self, message: str, **_print) -> None:
        self.inbox.put(("ready", self.k, message))

    def orphaned(self) -> bool:
        return os.getppid() != self.parent


