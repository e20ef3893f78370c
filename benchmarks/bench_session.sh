#!/usr/bin/env bash
# The aggregator without re-prefill, live: one in-process vLLM CPU engine (SmolLM2-135M-Instruct) for
# 3 proposers + aggregator, MT-Bench prompts, r = 1: each staircase with its aggregator steps as new calls
# (prefix-cache layout) and as one streaming-input session (session layout), beside wait-all. The paper's
# schedule gives the aggregator two calls; the smooth policy's doubling aggregator steps give it about six.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/staircase live --proposers 3 --requests "${REQUESTS:-20}" --prompts mt_bench \
  --policies wait-all,staircase-prefix-cache,staircase-session,staircase-smooth --redundancy 1 \
  --policy-config '{"kind": "staircase-smooth", "redundancy": 1, "layout": "session", "name": "staircase-smooth-session-r1"}' \
  --max-tokens "${MAX_TOKENS:-128}" --out "${OUT:-results/bench-session}" "$@"
