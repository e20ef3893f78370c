"""Rolling trace files for a long-running server (``staircase serve``).

A server's rows cannot wait for the end of a run: ``RowLog.flush`` moves the rows of
finished requests off the runner's ``Recorder`` into new parquet parts,
``traces/<policy>.part-<n>.requests.parquet`` and ``.chunks.parquet`` (the chunk
rows of requests still running stay until they end), and rewrites ``config.json``
with the counts so far. Memory stays bounded however long the server runs, a crash
loses at most one flush interval, and ``staircase validate`` reads the parts of a
policy as one trace (``calibration.validate.load_live_run``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from staircase.driver import Recorder
from staircase.trace import CHUNK_COLUMNS, REQUEST_COLUMNS, frame, read_chunks, read_requests

PART = re.compile(r"^(?P<policy>.+)\.part-(?P<n>\d+)\.requests\.parquet$")


def safe_name(policy: str) -> str:
    """A policy name as a file name (as ``staircase.trace.Trace.write`` spells it)."""
    return policy.replace("/", "_")


class RowLog:
    """The results folder of a server: config.json and the rolling trace parts."""

    def __init__(self, folder: Path, recorder: Recorder, config: dict):
        self.folder, self.recorder = Path(folder), recorder
        self.traces = self.folder / "traces"
        self.traces.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.parts = 0
        self.written = {"requests": 0, "chunks": 0}
        self.arrivals: list[float] = []  # first and last arrival seen (the observed rate)
        self.write_config()

    def write_config(self, **more) -> None:
        self.config |= more | {"rows_written": dict(self.written), "parts": self.parts}
        tmp = self.folder / "config.json.tmp"
        tmp.write_text(json.dumps(self.config, indent=2, default=str) + "\n")
        tmp.replace(self.folder / "config.json")  # a reader never sees half a file

    def flush(self, **more) -> int:
        """Write the finished requests' rows as new parts; returns how many requests."""
        rec = self.recorder
        done = rec.requests[:]
        if not done:
            if more:
                self.write_config(**more)
            return 0
        keys = {(r.policy, r.request_id) for r in done}
        chunks = [c for c in rec.chunks if (c.policy, c.request_id) in keys]
        del rec.requests[:len(done)]  # rows appended meanwhile stay (nothing awaits in between: one thread)
        rec.chunks[:] = [c for c in rec.chunks if (c.policy, c.request_id) not in keys]
        self.parts += 1
        for policy in sorted({r.policy for r in done}):
            stem = self.traces / f"{safe_name(policy)}.part-{self.parts:05d}"
            frame([r for r in done if r.policy == policy], REQUEST_COLUMNS).to_parquet(
                f"{stem}.requests.parquet", index=False)
            frame([c for c in chunks if c.policy == policy], CHUNK_COLUMNS).to_parquet(
                f"{stem}.chunks.parquet", index=False)
        self.written["requests"] += len(done)
        self.written["chunks"] += len(chunks)
        times = [r.arrival_s for r in done] + self.arrivals
        self.arrivals = [min(times), max(times)]
        span, n = self.arrivals[1] - self.arrivals[0], self.written["requests"]
        # an open loop at the observed rate (how `staircase validate` replays the arrivals)
        self.write_config(rate=round((n - 1) / span, 6) if n > 1 and span > 0 else 1.0, **more)
        return len(done)


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
