#!/usr/bin/env bash
# The six stages in order.
#   bash pipeline.sh toy                 # embedded toy city, CPU, minutes (DATA, WORK from the environment)
#   bash pipeline.sh cityscapes ROOT     # paper scale on one GPU
# A second run skips what is done (each stage skips finished outputs).
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-toy}"
PY="${PYTHON:-python}"

need() {  # stop with a clear message when a stage script does not exist yet
  [ -f "$1" ] || { echo "pipeline.sh: stage $1 is not implemented yet; stopping here." >&2; exit 2; }
}

if [ "$preset" = "toy" ]; then
  DATA="${DATA:-data/toycity}"
  WORK="${WORK:-runs/toy}"
  [ -f "$DATA/.complete" ] || $PY toycity.py --out "$DATA"
  # ===== depth (toy) =====
  # ===== group (toy) =====
  # ===== copypaste (toy) =====
  # ===== swav_dense (toy) =====
  # ===== cluster (toy) =====
  # ===== finetune (toy) =====
  # ===== results (toy) =====
elif [ "$preset" = "cityscapes" ]; then
  DATA="${2:?usage: bash pipeline.sh cityscapes ROOT}"
  WORK="${WORK:-runs/cityscapes}"
  # ===== depth (cityscapes) =====
  # ===== group (cityscapes) =====
  # ===== copypaste (cityscapes) =====
  # ===== swav_dense (cityscapes) =====
  # ===== cluster (cityscapes) =====
  # ===== finetune (cityscapes) =====
else
  echo "usage: bash pipeline.sh toy | cityscapes ROOT" >&2
  exit 2
fi
