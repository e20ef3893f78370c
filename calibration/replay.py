"""A live run replayed in the simulator: its topology and policies, the same requests (query
tokens, arrival times or users), every node's answer length, several noise replicates."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from staircase.sim.profile import Profile
from staircase.sim.simulate import simulate
from staircase.workload import Request
from staircase.errors import ConfigError
from staircase.record import topology_and_policies

from .runs import LiveRun, run_deployment


def replay(run: LiveRun, profile: Profile, *, replicates: int = 3, seed: int = 0, tokenizer=None,
           policies: Sequence[str] | None = None, with_chunks: bool = False):
    """Simulated request rows per policy (replicates stacked, column ``replicate``);
    with ``with_chunks=True`` (request rows, chunk rows) per policy, for diagnosis."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ConfigError("replicates", replicates, "an integer >= 1")
    cfg = run.config
    topology, built = topology_and_policies(cfg)
    by_name = {p.name: p for p in built}
    concurrency = None if cfg.get("rate") else int(cfg.get("concurrency") or 1)
    deployment = run_deployment(run)  # the run's pools and routers, simulated alike
    out = {}
    for name, req in run.requests.items():
        if policies is not None and name not in policies:
            continue
        if name not in by_name:
            raise ConfigError("policy", name, f"a policy the recorded arguments build: {', '.join(by_name)}")
        requests, lengths = _replayed_requests(run, name, req, topology, concurrency)
        frames = []
        for k in range(replicates):
            t = simulate(topology, by_name[name], requests, profile, seed=seed + k, max_tokens=int(cfg["max_tokens"]),
                         concurrency=concurrency, node_lengths=lengths, tokenizer=tokenizer, keep_chunks=with_chunks,
                         progress=False, deployment=deployment)
            frames.append((t.requests.assign(replicate=k), t.chunks.assign(replicate=k) if with_chunks else None))
        reqs = pd.concat([f[0] for f in frames], ignore_index=True)
        out[name] = (reqs, pd.concat([f[1] for f in frames], ignore_index=True)) if with_chunks else reqs
    return out


def _replayed_requests(run: LiveRun, name: str, req: pd.DataFrame, topology, concurrency: int | None):
    """(requests, node -> answer length per request) of one policy's live rows: the
    recorded arrivals (open loop) and query tokens, and each node's recorded tokens."""
    req = req.sort_values("request_id").reset_index(drop=True)
    n = len(req)
    if list(req["request_id"]) != list(range(n)):
        raise ConfigError(f"{run.folder.name}/{name} request ids", list(req["request_id"])[:5],
                          "0, 1, ... (one row per request)")
    tokens = run.chunks[name].groupby(["node", "request_id"])["tokens"].sum()
    lengths = {}
    for node in topology.nodes:
        per = np.ones(n, dtype=np.int64)
        if node.id in tokens.index.get_level_values(0):
            got = tokens.loc[node.id]
            per[got.index.to_numpy()] = got.to_numpy()
        if node.is_final:
            per = np.maximum(per, req["output_tokens"].to_numpy())
        lengths[node.id] = per
    arrivals = req["arrival_s"].to_numpy(float) - float(req["arrival_s"].min())
    requests = [Request(i, float(arrivals[i]) if concurrency is None else float("nan"),
                        int(req["query_tokens"][i]), int(lengths[topology.final.id][i])) for i in range(n)]
    return requests, lengths


