#!/usr/bin/env bash
# Rebuild the bundled fast model (D1) from scratch on CPU: one EfficientNet-Lite0 distilled from
# the bundled default (E13) on E13's split, then calibrated, gated and exported by the same
# command. A killed run resumes from its last checkpoint. Exits non-zero on any failure.
#
#   scripts/reproduce_fast_model.sh DATA_ROOT [OUT]     (make reproduce-fast-model DATA=...)
set -euo pipefail
DATA=${1:?usage: $0 DATA_ROOT [OUT]}
OUT=${2:-runs/reproduce-fast}
P=${PNEUMOSCAN:-.venv/bin/pneumoscan}
if [ ! -f "$OUT/bundle/model.json" ]; then
  resume=()
  [ -f "$OUT/checkpoints/last.ckpt" ] && resume=(--resume)
  "$P" distill --teacher src/pneumoscan/default_model --data "$DATA" --out "$OUT" --seed 0 --split-seed 0 \
    --population "Kermany et al. (2018) chest X-ray set: paediatric patients aged 1-5, anterior-posterior views, one centre (Guangzhou Women and Children's Medical Center)." \
    "${resume[@]}"
fi
echo "bundle: $OUT/bundle (evaluate it with: $P evaluate --data $DATA --split validation --model $OUT/bundle)"
