#!/usr/bin/env bash
# Simulated vs live on a pool: two `vllm serve` replicas of the bundled model (one core
# each on a 2-core machine) behind least-loaded and behind round-robin, MoA 3 +
# aggregator, wait-all and the staircase (both layouts, r = 1), held-out AlpacaEval
# prompts (#8-15, which calibration never saw) at concurrency 1 and 4; the replicas
# calibrated in the same sitting (`staircase calibrate --deployment`), then every run
# replayed on its deployment (`staircase validate`). About 30 min on 2 cores.
# PROBE=together probes the replicas at once (needs a core to spare for this process: not on 2 cores).
#
#   bash benchmarks/pool_validation.sh                 # writes results/pool-validation/
#   OUT=/tmp/pv REQUESTS=4 bash benchmarks/pool_validation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/pool-validation}"
REQUESTS="${REQUESTS:-8}"
mkdir -p "$OUT"
cat > "$OUT/engines.json" <<'JSON'
{"engines": {"cpu": {"kind": "serve", "model": "smollm2"}},
 "slots": {"proposers": ["cpu"], "aggregator": "cpu"}}
JSON
for router in least-loaded round-robin; do
  cat > "$OUT/two-$router.json" <<JSON
{"pools": {"cpu": {"model": "cpu", "replicas": 2, "router": "$router"}},
 "slots": {"proposers": ["cpu"], "aggregator": "cpu"}}
JSON
done
S=.venv/bin/staircase
$S calibrate --config "$OUT/engines.json" --deployment "$OUT/two-least-loaded.json" --probes standard \
  --out "$OUT/calibrate" --profile-out "$OUT/profile.json" --no-progress --probe-replicas "${PROBE:-apart}"
for router in least-loaded round-robin; do
  for c in 1 4; do
    $S live --config "$OUT/engines.json" --deployment "$OUT/two-$router.json" --prompts alpaca_eval --skip 8 \
      --requests "$REQUESTS" --concurrency "$c" --max-tokens 64 --policies wait-all,staircase --redundancy 1 \
      --out "$OUT/live-$router-c$c" --no-progress
  done
done
$S validate "$OUT"/live-* --profile "$OUT/profile.json" --out "$OUT/validation" | tee "$OUT/validation.txt"
