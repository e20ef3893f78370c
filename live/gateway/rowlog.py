"""Rolling trace files for a long-running server (``staircase serve``).

A server's rows cannot wait for the end of a run: ``RowLog.flush`` moves the rows of
finished requests off the runner's ``Recorder`` into parquet parts,
``traces/<policy>.part-<n>.requests.parquet`` and ``.chunks.parquet`` (the chunk
rows of requests still running stay until they end), a part rolling over to the next
at 1,000 requests or 10 minutes, and rewrites ``config.json`` with the counts so far.
Memory stays bounded however long the server runs, a crash loses at most one flush
interval, and ``staircase validate`` reads the parts of a policy as one trace
(``staircase.calibration.runs.load_live_run``).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import pandas as pd

from staircase.driver import Recorder
from staircase.record import write_record
from staircase.trace import CHUNK_COLUMNS, REQUEST_COLUMNS, frame, read_chunks, read_requests

PART = re.compile(r"^(?P<policy>.+?)(\.worker-(?P<worker>\d+))?\.part-(?P<n>\d+)\.requests\.parquet$")


def mean_rate(times: list[float], count: int | None = None) -> float:
    """Arrivals per second over ``times`` (sorted; ``count`` arrivals between the first and
    the last, default ``len(times)``); 1.0 when that says nothing (one arrival, no span).
    A run recorded at given arrivals is replayed by `staircase validate` as an open loop."""
    n = len(times) if count is None else count
    span = times[-1] - times[0] if times else 0.0
    return round((n - 1) / span, 6) if n > 1 and span > 0 else 1.0


def safe_name(policy: str) -> str:
    """A policy name as a file name (as ``staircase.trace.Trace.write`` spells it)."""
    return policy.replace("/", "_")


class RowLog:
    """The results folder of a server: config.json and the rolling trace parts. A part
    grows (rewritten whole, atomically, at each flush) until it holds ``part_requests``
    requests or is ``part_s`` seconds old; the next flush starts a new one. Memory holds
    the open part's rows only. ``worker`` (``staircase serve --workers``): this process's
    number; its parts are ``<policy>.worker-<k>.part-<n>``, its config
    ``workers/<k>/config.json`` with its first and last arrival (``arrivals_s``), which
    the parent merges (``staircase.live.gateway.workers.merge_configs``)."""

    def __init__(self, folder: Path, recorder: Recorder, config: dict, part_requests: int = 1000,
                 part_s: float = 600.0, worker: int | None = None):
        self.folder, self.recorder, self.worker = Path(folder), recorder, worker
        self.stem = "" if worker is None else f".worker-{worker}"
        self.traces = self.folder / "traces"
        self.traces.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.part_requests, self.part_s = part_requests, part_s
        self.parts = 0
        self.open: tuple[list, list] | None = None  # the open part's (request rows, chunk rows)
        self.opened = 0.0
        self.written = {"requests": 0, "chunks": 0}
        self.arrivals: list[float] = []  # first and last arrival seen (the observed rate)
        self._lock = threading.Lock()
        self.write_config()

    def write_config(self, **more) -> None:
        self.config |= more | {"rows_written": dict(self.written), "parts": self.parts}
        if self.worker is None:
            write_record(self.folder, self.config)  # atomically: a reader never sees half a file
        else:
            write_record(self.folder / "workers" / str(self.worker),
                         self.config | {"worker": self.worker, "arrivals_s": self.arrivals})

    def flush(self, **more) -> int:
        """Move the finished requests' rows into the open part and write it; returns how
        many requests moved."""
        done, chunks = self.take()
        self.write(done, chunks, **more)
        return len(done)

    async def flush_async(self) -> int:
        """``flush`` with the writing in a worker thread: the event loop only moves the
        rows (a part's rewrite takes tens of milliseconds it would otherwise hold up every
        stream for)."""
        done, chunks = self.take()
        await asyncio.to_thread(self.write, done, chunks)
        return len(done)

    def take(self) -> tuple[list, list]:
        """The finished requests' rows and their chunks, moved off the recorder (on the
        loop that appends to it)."""
        rec = self.recorder
        done = rec.requests[:]
        if not done:
            return [], []
        keys = {(r.policy, r.request_id) for r in done}
        chunks = [c for c in rec.chunks if (c.policy, c.request_id) in keys]
        rec.requests.clear()  # (no await in between: nothing was appended meanwhile)
        rec.chunks[:] = [c for c in rec.chunks if (c.policy, c.request_id) not in keys]
        return done, chunks

    def write(self, done: list, chunks: list, **more) -> None:
        """Write rows ``take`` moved (one writer at a time: a stop's last flush waits for a
        flush still writing)."""
        with self._lock:
            if done:
                self._write_part(done, chunks)
                self._count(done, chunks)
            if done or more:  # an open loop at the observed rate (how `staircase validate` replays the arrivals)
                first, last = self.arrivals or (0.0, 0.0)
                self.write_config(rate=mean_rate([first, last], self.written["requests"]), **more)

    def _write_part(self, done: list, chunks: list) -> None:
        full = self.open is not None and (len(self.open[0]) >= self.part_requests
                                          or time.monotonic() - self.opened >= self.part_s)
        if self.open is None or full:
            self.parts += 1
            self.open, self.opened = ([], []), time.monotonic()
        self.open[0].extend(done)
        self.open[1].extend(chunks)
        requests, all_chunks = self.open
        for policy in sorted({r.policy for r in requests}):
            stem = self.traces / f"{safe_name(policy)}{self.stem}.part-{self.parts:05d}"
            for rows, columns, kind in ((requests, REQUEST_COLUMNS, "requests"), (all_chunks, CHUNK_COLUMNS, "chunks")):
                tmp = Path(f"{stem}.{kind}.parquet.tmp")
                frame([r for r in rows if r.policy == policy], columns).to_parquet(tmp, index=False)
                tmp.replace(f"{stem}.{kind}.parquet")

    def _count(self, done: list, chunks: list) -> None:
        self.written["requests"] += len(done)
        self.written["chunks"] += len(chunks)
        times = [r.arrival_s for r in done] + self.arrivals
        self.arrivals = [min(times), max(times)]


def read_parts(traces: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """policy -> (request rows, chunk rows) of every part in a ``traces`` folder."""
    out: dict[str, tuple[list, list]] = {}
    for f in sorted(Path(traces).glob("*.part-*.requests.parquet")):
        req = read_requests(f)
        if not len(req):
            continue
        ch = read_chunks(f.with_name(f.name.replace(".requests.", ".chunks.")))
        reqs, chunks = out.setdefault(str(req["policy"].iloc[0]), ([], []))
        reqs.append(req)
        chunks.append(ch)
    return {p: (pd.concat(r, ignore_index=True), pd.concat(c, ignore_index=True)) for p, (r, c) in out.items()}
