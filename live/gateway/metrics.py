"""What ``staircase serve`` exposes at ``/metrics`` (Prometheus text format).

Per policy: histograms of time to first token, inter-token latency (the gap between
streamed pieces of the answer, per token), end-to-end latency and the longest stall of
each request; requests by outcome; inputs lost by reason. Server-wide: requests in
flight, requests refused (429 past the queue bound, 503 while stopping), and per
engine the calls the runner has in flight on it (``staircase_engine_calls_in_flight``)
and, where the engine can say (in-process vLLM), the requests the engine itself is
running (``staircase_engine_running_requests``).

Under ``staircase serve --workers`` (``multiprocess``) the values live in
prometheus-client's multiprocess files and a scrape reads every worker's: counters and
histograms summed, the in-flight gauges summed over live workers; the calls per engine
are then sampled each second (``sample_engines``) rather than read at the scrape.
"""

from __future__ import annotations

import math
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from staircase.trace import RequestRow

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


def lost_reasons(lost: str) -> list[str]:
    """``"L0.p0: stalled 12s; L0.p1: http 503"`` -> ``["stalled", "http 503"]``: the reasons
    without their figures, so the label's values stay few."""
    out = []
    for part in filter(None, (p.strip() for p in lost.split(";"))):
        reason = part.split(": ", 1)[-1]
        reason = re.sub(r"\s*\d+(\.\d+)?s\b", "", reason)  # durations: "stalled 12.5s" -> "stalled"
        out.append(re.sub(r"\s+", " ", reason.split(" (")[0]).strip() or "unknown")
    return out


class _EngineCollector:
    """Per-engine gauges read at scrape time from the runner's replicas."""

    def __init__(self, runner):
        self.runner = runner

    def collect(self):
        calls = GaugeMetricFamily("staircase_engine_calls_in_flight", "calls the runner has in flight on an engine",
                                  labels=["engine"])
        running = GaugeMetricFamily("staircase_engine_running_requests",
                                    "requests the engine itself reports running (in-process vLLM)", labels=["engine"])
        for replica in self.runner.replicas.values():
            calls.add_metric([replica.name], replica.in_flight)
            own = replica.engine.running_requests()
            if own is not None:
                running.add_metric([replica.name], own)
        yield calls
        yield running


class ServerMetrics:
    def __init__(self, runner, multiprocess: bool = False):
        self.runner, self.multiprocess = runner, multiprocess
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("staircase_ttft_seconds", "time to the answer's first token", ["policy"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("staircase_itl_seconds", "gap between streamed tokens of the answer", ["policy"],
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("staircase_e2e_seconds", "time to the answer's last token", ["policy"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.stall = Histogram("staircase_longest_stall_seconds", "each request's longest gap between tokens",
                               ["policy"], buckets=ITL_BUCKETS, registry=r)
        self.requests = Counter("staircase_requests", "requests ended, by outcome (ok, error)",
                                ["policy", "outcome"], registry=r)
        self.lost = Counter("staircase_inputs_lost", "inputs lost on the way (the answer went on without them)",
                            ["policy", "reason"], registry=r)
        self.refused = Counter("staircase_requests_refused", "requests refused before they ran",
                               ["reason"], registry=r)
        self.in_flight = Gauge("staircase_requests_in_flight", "requests admitted and not ended", registry=r,
                               multiprocess_mode="livesum")
        if multiprocess:
            self.engine_calls = Gauge("staircase_engine_calls_in_flight", "calls the runner has in flight on an "
                                      "engine (sampled each second per worker)", ["engine"], registry=r,
                                      multiprocess_mode="livesum")
        else:
            r.register(_EngineCollector(runner))

    def sample_engines(self) -> None:
        """The calls in flight per engine into the shared gauge (multiprocess only)."""
        for replica in self.runner.replicas.values():
            self.engine_calls.labels(replica.name).set(replica.in_flight)

    def exposition(self) -> bytes:
        """The scrape's text: this process's registry, or every worker's (multiprocess)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        self.sample_engines()
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def delta(self, policy: str, gap_s: float, tokens: int) -> None:
        """A streamed piece of ``tokens`` tokens, ``gap_s`` after the previous one."""
        per = gap_s / max(tokens, 1)
        hist = self.itl.labels(policy)
        for _ in range(max(tokens, 1)):
            hist.observe(per)

    def ended(self, row: RequestRow) -> None:
        self.requests.labels(row.policy, row.outcome).inc()
        for reason in lost_reasons(row.lost or ""):
            self.lost.labels(row.policy, reason).inc()
        for hist, value in ((self.ttft, row.ttft_s), (self.e2e, row.e2e_s), (self.stall, row.longest_stall_s)):
            if value is not None and math.isfinite(value):
                hist.labels(row.policy).observe(value)
