"""``staircase serve``: the gateway, the live runner behind an OpenAI-compatible API.

- ``server``: admission (``--max-in-flight``, 429 with Retry-After), runs, shutdown;
- ``app``: the FastAPI routes (chat completions streamed or whole, models, health, /metrics);
- ``api``: the wire format (requests, chunks, errors naming the parameter);
- ``metrics``: the Prometheus metrics;
- ``rowlog``: the rolling parquet parts of the rows, and config.json as the server runs;
- ``serving``: uvicorn and the process's life (signals, the summary at the end).
"""
