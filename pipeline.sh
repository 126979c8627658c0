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
  need group.py   # stage 2: depth regions of the annotated frames from WORK/disp (2500 superpixels at 192 x 384 =
  for split in train val; do   # the paper's superpixel size), then covering / purity against gtFine
    $PY group.py --work "$WORK" --data "$DATA" --split "$split" --size 192 384 --segments 2500 --workers 2
  done
  $PY group.py --eval --work "$WORK" --data "$DATA" --split val
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
  need group.py   # stage 2 at paper scale: 384 x 768, 10000 superpixels, the camera JSON's intrinsics
  for split in train val; do
    $PY group.py --work "$WORK" --data "$DATA" --split "$split" --size 384 768 --workers "$(nproc)"
  done
  $PY group.py --eval --work "$WORK" --data "$DATA" --split val
  # ===== copypaste (cityscapes) =====
  # ===== swav_dense (cityscapes) =====
  # ===== cluster (cityscapes) =====
  # ===== finetune (cityscapes) =====
else
  echo "usage: bash pipeline.sh toy | cityscapes ROOT" >&2
  exit 2
fi
