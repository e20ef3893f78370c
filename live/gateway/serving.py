"""``staircase serve``: run the chosen policy for real traffic behind the OpenAI
chat-completions API, on the live runner (the engines, driver, policies, routers and
watchdog of ``staircase live``).

    staircase serve                                   # bundled model, MoA 3 + aggregator, paper staircase r=1
    staircase serve --policy-config results/search-X/best.json --deployment pools.json --config engines.json

Then point any OpenAI client at http://127.0.0.1:8000/v1 (model "staircase"):

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    for chunk in client.chat.completions.create(model="staircase", stream=True,
            messages=[{"role": "user", "content": "Why is the sky blue?"}]):
        print(chunk.choices[0].delta.content or "", end="")

Routes: POST /v1/chat/completions (streamed as server-sent events, with a final usage
chunk when stream_options.include_usage is set; or one JSON answer), GET /v1/models,
GET /health, GET /metrics (Prometheus: TTFT, inter-token latency, E2E and longest stall
per policy, requests in flight, inputs lost by reason, calls in flight per engine).
Every policy given (--policies, --policy-config) is registered; the first is the
default, a request picks another by its name as model or with the extension field
"policy" (the official client: extra_body={"policy": "..."}). A request's
max_tokens caps the answer (the final node); proposers answer up to --max-tokens.
The request's temperature, top_p and seed apply to every call it makes.

At the edges: a malformed request gets a 400 in OpenAI's error shape naming the
parameter; a client that disconnects cancels every call of its request on every
engine; past --max-in-flight requests get 429 with Retry-After; SIGTERM or Ctrl-C
stops accepting, gives requests in flight --grace-s to end, cancels the rest and
writes the rows. With the API key's environment variable set (--server-key-env,
default STAIRCASE_API_KEY) clients must send it as a bearer token; it is never logged.

Rows: every request's chunk and request rows go to rolling parquet parts under
<out>/traces/ every --flush-s seconds, with config.json, so `staircase validate <out>`
replays a server's log in the simulator like a `staircase live` run; summary.csv and
ttft_by_policy.png are written at the stop.
"""

from __future__ import annotations

import json
from pathlib import Path

import uvicorn

from staircase.errors import ConfigError
from staircase.report import plot_ttft, summary_frame, summary_json
from staircase.trace import Trace

from .rowlog import read_parts

SERVE_DOC = __doc__


def ready_message(host: str, port: int, server, folder: Path) -> str:
    base = f"http://{host}:{port}/v1"
    return (f"staircase serve: {base} (model {server.settings.model_name!r}; policies: {', '.join(server.policies)}; "
            f"default {server.default.name})\n"
            f"  metrics: http://{host}:{port}/metrics   rows: {folder}/traces/\n"
            f"  try: curl -N {base}/chat/completions -H 'Content-Type: application/json' -d "
            f"'{{\"model\": \"{server.settings.model_name}\", \"stream\": true, "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}}]}}'")


class _Uvicorn(uvicorn.Server):
    """uvicorn's server; a stop signal also closes the staircase server's door at once
    (new requests 503, /health says stopping) while uvicorn waits for the open ones."""

    def __init__(self, config: uvicorn.Config, server, worker=None):
        super().__init__(config)
        self.staircase, self.worker = server, worker

    async def on_tick(self, counter: int) -> bool:
        if self.worker is not None and self.worker.orphaned() and not self.should_exit:  # the parent is gone
            self.staircase.stop_admitting()
            self.should_exit = True
        return bool(self.staircase.failed) or await super().on_tick(counter)

    def handle_exit(self, sig, frame) -> None:
        self.staircase.stop_admitting()
        super().handle_exit(sig, frame)


def run_uvicorn(app, server, host: str, port: int, worker=None) -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C (uvicorn re-raises the signal after the stop);
    an engine that did not start is raised here (a one-line error). A ``worker``
    (``staircase.live.gateway.workers.Worker``) accepts on the socket its parent bound."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=server.settings.grace_s)
    _Uvicorn(config, server, worker).run(sockets=None if worker is None else [worker.sock])
    if isinstance(server.failed, ConfigError):
        raise server.failed
    if server.failed is not None:
        raise ConfigError("engines", str(server.failed), "engines that start (see the engine's log)")


def write_summary(folder: Path, stopped: dict) -> None:
    """At the stop: summary.csv, summary.json and ttft_by_policy.png from every part written."""
    parts = read_parts(Path(folder) / "traces")
    traces = {name: Trace(name, req, ch, {}) for name, (req, ch) in parts.items()}
    if not traces:
        print(f"staircase serve: stopped ({json.dumps(stopped)}); no requests served", flush=True)
        return
    summary = summary_frame(traces)
    summary.to_csv(folder / "summary.csv")
    (folder / "summary.json").write_text(json.dumps(summary_json(summary), indent=2) + "\n")
    plot_ttft(traces, folder / "ttft_by_policy.png")
    served = sum(len(t.requests) for t in traces.values())
    print(f"staircase serve: stopped ({json.dumps(stopped)}); {served} requests' rows in {folder}/", flush=True)
