#!/usr/bin/env bash
# The six stages in order.
#   bash pipeline.sh toy                 # embedded toy city, CPU, minutes (DATA, WORK from the environment)
#   bash pipeline.sh toy-ablations       # after toy: Tables 3 and 4 in miniature (copy-paste off, proposals)
#   bash pipeline.sh cityscapes ROOT     # paper scale on one GPU
# A second run skips what is done (each stage skips finished outputs).
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-toy}"
PY="${PYTHON:-python}"

if [ "$preset" = "toy" ]; then
  DATA="${DATA:-data/toycity}"
  WORK="${WORK:-runs/toy}"
  [ -f "$DATA/.complete" ] || $PY toycity.py --out "$DATA"
  # ===== depth (toy) =====
  # stage 1: Monodepth2 from scratch on the 20 train sequences (frames 0 -1 +1) at 64 x 128, batch 6, lr 3e-4
  # (the paper's 1e-4 learns too little in this budget), 600 steps with the x0.1 drop at 75 %; auto-masking off
  # (the toy city's flat-shaded road, walls and sky have near-zero identity error; README, departures); fp32
  # (--no-amp: bf16 autocast is 10x slower on CPUs without native bf16, e.g. this AMD EPYC). Then the
  # disparity of the annotated train (for group.py) and val frames at the toy city's 192 x 384, and depth metrics.
  $PY depth.py train --data "$DATA" --work "$WORK" --size 64 128 --frame-offset 1 --batch-size 6 --lr 3e-4 \
    --steps 600 --no-automask --workers 1 --log-every 50 --no-amp --resume
  for split in train val; do
    $PY depth.py predict --work "$WORK" --data "$DATA" --split "$split" --size 192 384 --no-amp
  done
  $PY depth.py eval --work "$WORK" --data "$DATA" --split val
  # ===== group (toy) =====
  # stage 2: depth regions of the annotated frames from WORK/disp (2500 superpixels at 192 x 384 = the paper's
  # superpixel size), then covering / purity against gtFine
  for split in train val; do
    $PY group.py --work "$WORK" --data "$DATA" --split "$split" --size 192 384 --segments 2500 --workers 2
  done
  $PY group.py --eval --work "$WORK" --data "$DATA" --split val
  # ===== copypaste (toy) =====
  # stage 3: cross-context samples from WORK/regions + WORK/disp of toy train (20 frames) at
  # 192 x 384: M 4 sources per sample (5 samples per epoch), paste times 2 4 (T 8), 10 epochs = 50 samples of 8
  # canvases (~4 MB each), 2 workers, previews of the first 2 in WORK/samples/preview
  $PY copypaste.py --work "$WORK" --data "$DATA" --split train --size 192 384 --mix 4 --paste-times 2 4 \
    --epochs 10 --workers 2 --preview 2
  # ===== swav_dense (toy) =====
  # stage 4: dense SwAV on the 50 toy samples (8 canvases each), ResNet-18, canvases fed at
  # 96 x 192 (labels and matrices stay exact), K 100, 1000 pixel + 1000 region points per canvas, lambda 0.5,
  # 150 steps = 30 epochs of 5 samples cycling through the 10 epoch folders (each sample seen 3 times), fp32
  # (bf16 autocast is slower on most CPUs), one thread
  OMP_NUM_THREADS=1 $PY swav_dense.py --work "$WORK" --arch resnet18 --input-size 96 192 --num-prototypes 100 \
    --pixel-samples 1000 --region-samples 1000 --steps 150 --workers 0 --device cpu --no-amp --log-every 25
  # ===== cluster (toy) =====
  # stage 5: prototypes -> 9 clusters (the toy city has 9 classes), toy val at its native 192 x 384,
  # Hungarian matching on -IoU; then the same clustering of a randomly initialised network of the same architecture
  $PY cluster.py --work "$WORK" --data "$DATA" --dataset toycity --split val --clusters 9 --save-pred --pca 4 --no-amp
  $PY cluster.py --work "$WORK" --data "$DATA" --dataset toycity --split val --clusters 9 --init-random --no-amp \
    --out "$WORK/cluster_random"
  # ===== finetune (toy) =====
  # stage 6: 1/4 of toy train (5 labelled images), 60 iterations of batch 4 on 96 x 192 crops,
  # fp32 (bf16 autocast is slower on most CPUs), from the swav model and from scratch (same architecture, same
  # budget), seeds 0 and 1; mIoU on toy val. Seed 0 from swav is WORK/finetune, the others WORK/finetune_*.
  ARCH=$($PY -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['arch'])" "$WORK/swav/model.pt")
  for seed in 0 1; do
    for init in swav scratch; do
      out="$WORK/finetune"; [ "$init" = swav ] || out="${out}_scratch"; [ "$seed" = 0 ] || out="${out}_seed$seed"
      $PY finetune.py --work "$WORK" --data "$DATA" --dataset toycity --init "$init" --arch "$ARCH" \
        --fraction 0.25 --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0 --seed "$seed" --out "$out"
    done
  done
  # ===== results (toy) =====
  $PY - "$WORK" <<'PYEOF'
import json, os, sys
work = sys.argv[1]
load = lambda *p: json.load(open(os.path.join(work, *p)))  # noqa: E731
mean = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
d, g = load("depth", "eval.json"), load("regions", "eval.json")
c, r = load("cluster", "metrics.json"), load("cluster_random", "metrics.json")
ft = {init: [load(f"finetune{'' if init == 'swav' else '_scratch'}{'' if s == 0 else f'_seed{s}'}", "metrics.json")
             for s in (0, 1)] for init in ("swav", "scratch")}
print("\n| result (toy city val) | value |\n|---|---|")
print(f"| depth.py: abs_rel / a1 | {d['abs_rel']:.3f} / {d['a1']:.3f} |")
print(f"| group.py: region purity / covering / regions per image | {g['purity']:.3f} / {g['covering']:.3f} / "
      f"{g['regions_per_image']:.1f} |")
print(f"| cluster.py: pixel accuracy / mIoU (pre-trained) | {100 * c['pixel_accuracy']:.2f} / {100 * c['miou']:.2f} |")
print(f"| cluster.py: pixel accuracy / mIoU (random init, same architecture) | {100 * r['pixel_accuracy']:.2f} / "
      f"{100 * r['miou']:.2f} |")
for init in ("swav", "scratch"):
    m = [x["miou"] for x in ft[init]]
    print(f"| finetune.py from {init}: mIoU, mean of seeds 0 and 1 ({', '.join(f'{100 * x:.2f}' for x in m)}) | "
          f"{mean(m):.2f} |")
PYEOF
elif [ "$preset" = "toy-ablations" ]; then
  # Tables 3 and 4 in miniature (lambda 0.5), after `bash pipeline.sh toy`: copy-paste on (depth regions, M 4,
  # E 2 4) against off (--paste-times 0 0), and proposals depth / felzenszwalb / gt; each pre-trained as the toy
  # swav run, then clustered and fine-tuned as in the toy run, seeds 0 and 1 (run side by side, one thread each).
  DATA="${DATA:-data/toycity}"
  WORK="${WORK:-runs/toy}"
  ABL="$WORK/ablations"
  [ -d "$WORK/disp" ] && [ -d "$WORK/regions" ] || { echo "pipeline.sh: run 'bash pipeline.sh toy' first" >&2; exit 2; }
  for method in felzenszwalb gt; do
    $PY group.py --work "$ABL/proposals_$method" --data "$DATA" --split train --size 192 384 --method "$method" \
      --workers 2
  done
  variant() {  # name regions_dir "E1 E2" seed
    local w="$ABL/$1_seed$4"
    $PY copypaste.py --work "$w" --data "$DATA" --split train --size 192 384 --mix 4 --paste-times $3 --epochs 10 \
      --workers 1 --seed "$4" --disp-dir "$WORK/disp" --regions-dir "$2"
    OMP_NUM_THREADS=1 $PY swav_dense.py --work "$w" --arch resnet18 --input-size 96 192 --num-prototypes 100 \
      --pixel-samples 1000 --region-samples 1000 --steps 150 --workers 0 --device cpu --no-amp --log-every 50 \
      --seed "$4" --no-progress
    OMP_NUM_THREADS=1 $PY cluster.py --work "$w" --data "$DATA" --dataset toycity --split val --clusters 9 --no-amp
    OMP_NUM_THREADS=1 $PY finetune.py --work "$w" --data "$DATA" --dataset toycity --init swav --arch resnet18 \
      --fraction 0.25 --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0 --seed "$4"
  }
  for v in "depth $WORK/regions 2_4" "no-copy-paste $WORK/regions 0_0" \
           "felzenszwalb $ABL/proposals_felzenszwalb/regions 2_4" "gt $ABL/proposals_gt/regions 2_4"; do
    set -- $v
    variant "$1" "$2" "${3/_/ }" 0 > "$ABL/$1_seed0.log" 2>&1 & p0=$!
    variant "$1" "$2" "${3/_/ }" 1 > "$ABL/$1_seed1.log" 2>&1 & p1=$!
    wait $p0 && wait $p1 || { echo "pipeline.sh: ablation $1 failed, see $ABL/$1_seed*.log" >&2; exit 1; }
  done
  $PY - "$ABL" <<'PYEOF'
import json, os, sys
abl = sys.argv[1]
print("\n| variant (toy city val) | clustering mIoU | clustering accuracy | fine-tuned mIoU |\n|---|---|---|---|")
for name in ("depth", "no-copy-paste", "felzenszwalb", "gt"):
    cell = lambda folder, key: [100 * json.load(open(os.path.join(abl, f"{name}_seed{s}", folder, "metrics.json")))[key]
                                for s in (0, 1)]  # noqa: E731
    fmt = lambda xs: f"{sum(xs) / 2:.2f} ({xs[0]:.2f}, {xs[1]:.2f})"  # noqa: E731
    print(f"| {name} | {fmt(cell('cluster', 'miou'))} | {fmt(cell('cluster', 'pixel_accuracy'))} | "
          f"{fmt(cell('finetune', 'miou'))} |")
PYEOF
elif [ "$preset" = "cityscapes" ]; then
  DATA="${2:?usage: bash pipeline.sh cityscapes ROOT}"
  WORK="${WORK:-runs/cityscapes}"
  # ===== depth (cityscapes) =====
  # stage 1, Monodepth2 on the train video sequences (leftImg8bit_sequence): bottom quarter
  # cropped (ego car), 192 x 512, frames 0 -2 +2 (17 Hz), ResNet-18, batch 12, Adam 1e-4, 20 epochs (x0.1 after
  # 15), AMP; then disparity of the annotated train and val frames at the later stages' 384 x 768 (full frame);
  # depth metrics on val against the SGM disparity (bottom quarter ignored). Add --weights FILE for ImageNet init.
  $PY depth.py train --data "$DATA" --work "$WORK" --size 192 512 --crop-bottom 0.25 --frame-offset 2 --resume
  for split in train val; do
    $PY depth.py predict --work "$WORK" --data "$DATA" --split "$split" --size 384 768
  done
  $PY depth.py eval --work "$WORK" --data "$DATA" --split val --crop-bottom 0.25
  # ===== group (cityscapes) =====
  # stage 2 at paper scale: 384 x 768, 10000 superpixels, the camera JSON's intrinsics
  for split in train val; do
    $PY group.py --work "$WORK" --data "$DATA" --split "$split" --size 384 768 --workers "$(nproc)"
  done
  $PY group.py --eval --work "$WORK" --data "$DATA" --split val
  # ===== copypaste (cityscapes) =====
  # stage 3 at paper scale (M 8, E 2 4, 384 x 768): a saved sample is ~33 MB (16 canvases +
  # int32 labels), so 25 epochs of 371 samples would fill ~300 GB; here only previews are written and
  # swav_dense.py builds the same samples on the fly (--on-the-fly, copypaste.CopyPasteDataset, same seeds).
  # To save epochs instead: add --epochs E --workers "$(nproc)".
  $PY copypaste.py --work "$WORK" --data "$DATA" --split train --size 384 768 --mix 8 --paste-times 2 4 \
    --epochs 0 --preview 8
  # ===== swav_dense (cityscapes) =====
  # stage 4, Sec 3.4: ResNet-50 from scratch, FPN + semantic head + projector, K 1000,
  # 4000 pixel + 7200 region points per canvas, lambda 0.5, SGD lr 0.1, 25 epochs of the 371 M = 8 samples of
  # Cityscapes train (2 warm-up), one GPU, AMP fp16; samples built on the fly by copypaste.CopyPasteDataset in
  # DataLoader workers; checkpoint every epoch and 500 steps, so the same command continues after a stop.
  # ImageNet-initialised run (Table 1 "IN"): add --init imagenet --backbone-weights resnet50.pth (local file).
  $PY swav_dense.py --work "$WORK" --on-the-fly --data "$DATA" --split train --size 384 768 --mix 8 \
    --paste-times 2 4 --arch resnet50 --epochs 25 --workers "$(nproc)" --resume
  # ===== cluster (cityscapes) =====
  # stage 5, Table 1: Cityscapes val at 768 x 384, 19 trainIds, Hungarian on -IoU; the PiCIE /
  # STEGO protocol for comparison; KITTI's 200 labelled images when KITTI=.../data_semantics is set
  $PY cluster.py --work "$WORK" --data "$DATA" --split val --save-pred --pca 8
  $PY cluster.py --work "$WORK" --data "$DATA" --split val --protocol picie --out "$WORK/cluster_picie"
  if [ -n "${KITTI:-}" ]; then
    $PY cluster.py --work "$WORK" --data "$KITTI" --dataset kitti --out "$WORK/cluster_kitti"
  fi
  # ===== finetune (cityscapes) =====
  # stage 6, ablation setting (Table 4): 1/16 of Cityscapes train, 6000 iterations, val mIoU;
  # from the swav model and from scratch; KITTI 5-fold cross-validation when KITTI is set
  $PY finetune.py --work "$WORK" --data "$DATA" --init swav --fraction 0.0625 --iters 6000 --eval-every 1000
  $PY finetune.py --work "$WORK" --data "$DATA" --init scratch --arch resnet50 --fraction 0.0625 --iters 6000 \
    --eval-every 1000 --out "$WORK/finetune_scratch"
  if [ -n "${KITTI:-}" ]; then
    for fold in 0 1 2 3 4; do
      $PY finetune.py --work "$WORK" --data "$KITTI" --dataset kitti --init swav --folds 5 --fold "$fold" \
        --iters 6000 --out "$WORK/finetune_kitti_fold$fold"
    done
  fi
else
  echo "usage: bash pipeline.sh toy | toy-ablations | cityscapes ROOT" >&2
  exit 2
fi
