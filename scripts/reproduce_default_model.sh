#!/usr/bin/env bash
# Rebuild the bundled default model (E13) from scratch on CPU:
#   three members of the default recipe on one split (seeds 0, 1, 2; split seed 0), the independent
#   input gate on the first, the ensemble (mean log-odds, calibrated on validation), the ONNX graph.
# Each step is skipped when its output exists, and each member's training resumes from its last
# checkpoint, so a killed run loses at most one epoch of one member. Exits non-zero on any failure.
#
#   scripts/reproduce_default_model.sh DATA_ROOT [OUT]     (make reproduce-model DATA=...)
set -euo pipefail
DATA=${1:?usage: $0 DATA_ROOT [OUT]}
OUT=${2:-runs/reproduce}
P=${PNEUMOSCAN:-.venv/bin/pneumoscan}
for seed in 0 1 2; do
  run=$OUT/seed$seed
  [ -f "$run/bundle/model.json" ] && continue
  resume=()
  [ -f "$run/checkpoints/last.ckpt" ] && resume=(--resume)
  "$P" train --data "$DATA" --out "$run" --seed "$seed" --split-seed 0 "${resume[@]}"
done
[ -f "$OUT/seed0-gated/model.json" ] || "$P" fit-gate --data "$DATA" --model "$OUT/seed0/bundle" --out "$OUT/seed0-gated"
"$P" ensemble "$OUT/seed0-gated" "$OUT/seed1/bundle" "$OUT/seed2/bundle" --data "$DATA" --out "$OUT/ensemble"
"$P" export --model "$OUT/ensemble" --data "$DATA"
echo "bundle: $OUT/ensemble (evaluate it with: $P evaluate --data $DATA --split test --model $OUT/ensemble)"
