#!/usr/bin/env bash
# The paper's headline on real engines here: 3 proposers + aggregator (one shared
# in-process vLLM CPU engine with SmolLM2-135M-Instruct), 20 MT-Bench prompts,
# wait-all vs staircase (paper schedule, r = 0 and 2, both layouts), one run.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/staircase live --proposers 3 --requests "${REQUESTS:-20}" --prompts mt_bench \
  --policies wait-all,staircase --redundancy 0,2 --max-tokens "${MAX_TOKENS:-128}" \
  --out "${OUT:-results/bench-live}" "$@"
