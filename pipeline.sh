#!/usr/bin/env bash
# The six stages in order.
#   bash pipeline.sh toy                 # embedded toy city, CPU, minutes (DATA, WORK from the environment)
#   bash pipeline.sh toy-ablations       # after toy: Tables 1-4 in miniature, 5 seeds, paired intervals (~2 h)
#   bash pipeline.sh toy-instance        # after toy: Table 2's instance row in miniature (Mask R-CNN, mask AP)
#   bash pipeline.sh cityscapes ROOT     # paper scale on one GPU: Tables 1 and 2 (pre-training on 89,250 frames)
#   bash pipeline.sh cityscapes-ablation ROOT   # Tables 3 and 4 (2975 annotated frames, 100 epochs, 1/16, 6k)
#   bash pipeline.sh kitti RAW SEMANTICS # KITTI raw drives + data_semantics (5-fold fine-tuning)
#   SCALE=smoke bash pipeline.sh <paper preset> ...   # the same commands with tiny budgets: minutes on a CPU
# A second run skips what is done (each stage skips finished outputs).
set -euo pipefail
cd "$(dirname "$0")"
preset="${1:-toy}"
PY="${PYTHON:-python}"
SCALE="${SCALE:-paper}"
[ "$SCALE" = paper ] || [ "$SCALE" = smoke ] || { echo "pipeline.sh: SCALE=paper (default) or smoke" >&2; exit 2; }

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
  $PY report.py toy "$WORK"
elif [ "$preset" = "toy-ablations" ]; then
  # Tables 1 to 4 in miniature, after `bash pipeline.sh toy`, each variant with the seeds $SEEDS (default 0-4),
  # $JOBS runs side by side (default 2) at one thread each: ours (depth regions, M 4, E 2 4, lambda 0.5) against
  # no copy-paste (--paste-times 0 0), felzenszwalb and gt proposals, lambda 1, the released InfoMap setting
  # (--preferred-modules 10) and random initialization; each pre-trained as the toy swav run, then clustered and
  # fine-tuned as in the toy run. report.py prints each variant's mean, std and the 95 % interval of its
  # difference to ours paired by seed, one line per claim of the paper, and draws docs/ablations.png.
  DATA="${DATA:-data/toycity}"
  WORK="${WORK:-runs/toy}"
  ABL="$WORK/ablations"
  SEEDS="${SEEDS:-0 1 2 3 4}"
  JOBS="${JOBS:-2}"  # one per core
  [ -d "$WORK/disp" ] && [ -d "$WORK/regions" ] || { echo "pipeline.sh: run 'bash pipeline.sh toy' first" >&2; exit 2; }
  for method in felzenszwalb gt; do
    $PY group.py --work "$ABL/proposals_$method" --data "$DATA" --split train --size 192 384 --method "$method" \
      --workers 2
  done
  $PY group.py --work "$ABL/proposals_released-infomap" --data "$DATA" --split train --size 192 384 \
    --segments 2500 --preferred-modules 10 --disp-dir "$WORK/disp" --workers 2
  variant() {  # NAME SEED: pre-train (copypaste, swav_dense), cluster, fine-tune into $ABL/NAME_seedSEED
    local w="$ABL/$1_seed$2" regions="$WORK/regions" paste="2 4" lam=0.5
    case "$1" in
      no-copy-paste) paste="0 0" ;;
      felzenszwalb|gt|released-infomap) regions="$ABL/proposals_$1/regions" ;;
      lam1) lam=1 ;;
      random-init)
        OMP_NUM_THREADS=1 $PY cluster.py --work "$w" --model "$WORK/swav/model.pt" --init-random --seed "$2" \
          --data "$DATA" --dataset toycity --split val --clusters 9 --no-amp
        OMP_NUM_THREADS=1 $PY finetune.py --work "$w" --data "$DATA" --dataset toycity --init scratch \
          --arch resnet18 --fraction 0.25 --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0 --seed "$2" \
          --resume
        return ;;
    esac
    $PY copypaste.py --work "$w" --data "$DATA" --split train --size 192 384 --mix 4 --paste-times $paste \
      --epochs 10 --workers 1 --seed "$2" --disp-dir "$WORK/disp" --regions-dir "$regions" --no-progress
    OMP_NUM_THREADS=1 $PY swav_dense.py --work "$w" --arch resnet18 --input-size 96 192 --num-prototypes 100 \
      --pixel-samples 1000 --region-samples 1000 --steps 150 --lam "$lam" --workers 0 --device cpu --no-amp \
      --log-every 50 --seed "$2" --no-progress --resume
    OMP_NUM_THREADS=1 $PY cluster.py --work "$w" --data "$DATA" --dataset toycity --split val --clusters 9 --no-amp
    OMP_NUM_THREADS=1 $PY finetune.py --work "$w" --data "$DATA" --dataset toycity --init swav --arch resnet18 \
      --fraction 0.25 --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0 --seed "$2" --resume
  }
  NAMES="depth no-copy-paste felzenszwalb gt lam1 released-infomap random-init"
  for name in $NAMES; do
    for seed in $SEEDS; do
      [ -f "$ABL/${name}_seed$seed.done" ] && continue  # finished in an earlier, interrupted run
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done  # set -e stops a failing run early
      ( variant "$name" "$seed" > "$ABL/${name}_seed$seed.log" 2>&1; touch "$ABL/${name}_seed$seed.done" ) &
    done
  done
  wait
  for name in $NAMES; do
    for seed in $SEEDS; do
      [ -f "$ABL/${name}_seed$seed.done" ] || { echo "pipeline.sh: $name seed $seed failed, see" \
        "$ABL/${name}_seed$seed.log" >&2; exit 1; }
    done
  done
  $PY report.py ablations "$ABL" --plot docs/ablations.png
  $PY report.py toy "$WORK"  # the toy table again, now with Table 1 from these seeds
elif [ "$preset" = "toy-instance" ]; then
  # Table 2's instance row in miniature, after `bash pipeline.sh toy` (its WORK/swav/model.pt): Mask R-CNN
  # (finetune.py --task instance) from the swav pre-training and from scratch, seeds 0 and 1, mask AP and AP50 on
  # toy val (183 cars and 243 persons, most of them tiny: median 21 and 3 pixels). Budget (detectron2's recipe: 24k
  # iterations of batch 8): the 20 train frames, 100 iterations of batch 2 at the native 192 x 384 only (the
  # default 0.78..1 scales would shrink the small instances further), lr 0.005 and warmup 20 (0.01 with warmup 40
  # gave about the same at 80 iterations; an earlier try at 0.01 went NaN), 64 RoIs per image (the mask head's cost
  # scales with them), fp32; the two seeds side by side, one thread each (~4.5 s an iteration; 18 min in all).
  # Seed 0 from swav is WORK/finetune_instance, the others WORK/finetune_instance_*.
  DATA="${DATA:-data/toycity}"
  WORK="${WORK:-runs/toy}"
  [ -f "$WORK/swav/model.pt" ] || { echo "pipeline.sh: run 'bash pipeline.sh toy' first" >&2; exit 2; }
  ARCH=$($PY -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['arch'])" "$WORK/swav/model.pt")
  instance() {  # init seed
    local out="$WORK/finetune_instance"; [ "$1" = swav ] || out="${out}_scratch"; [ "$2" = 0 ] || out="${out}_seed$2"
    OMP_NUM_THREADS=1 $PY finetune.py --work "$WORK" --data "$DATA" --dataset toycity --task instance --init "$1" \
      --arch "$ARCH" --iters 100 --batch-size 2 --lr 0.005 --warmup-iters 20 --rois-per-image 64 --instance-scales 1 \
      --no-amp --workers 0 --seed "$2" --no-progress --out "$out" > "$out.log" 2>&1
  }
  for init in swav scratch; do
    instance "$init" 0 & p0=$!
    instance "$init" 1 & p1=$!
    wait $p0 && wait $p1 || { echo "pipeline.sh: toy-instance from $init failed, see $WORK/finetune_instance*.log" >&2
                              exit 1; }
  done
  $PY report.py instance "$WORK"
elif [ "$preset" = "cityscapes" ] || [ "$preset" = "cityscapes-ablation" ]; then
  # Cityscapes (PAPER_NOTES.md: 2975 train sequences x 30 frames = 89,250 left images, 500 val, 384 x 768, one
  # GPU). `cityscapes`: the main results, pre-training on the 89,250 sequence frames (leftImg8bit_sequence,
  # --sequence) for 25 epochs, Tables 1 and 2. `cityscapes-ablation`: Tables 3 and 4, pre-training on the 2975
  # annotated train frames for 100 epochs and fine-tuning on 1/16 of train for 6k iterations.
  DATA="${2:?usage: bash pipeline.sh $preset ROOT}"
  WORK="${WORK:-runs/$preset}"
  # ===== budgets: the paper's, or (SCALE=smoke) tiny ones for the same commands =====
  # DEPTH_BUDGET: depth training size, length, batch; SIZE: the working size of every later stage; LIMIT: the
  # frames of the per-frame stages; SEGMENTS: SLIC superpixels (scaled with the pixel count); SWAV_BUDGET: length
  # and points per canvas; FT_BUDGET: fine-tuning iterations, batch, crop. NO_AMP: smoke runs on a CPU in fp32
  # (bf16 autocast is ~6x slower there: swav_dense 2 steps 148 s against 25 s), the one non-budget change
  if [ "$SCALE" = smoke ]; then
    DEPTH_BUDGET="--size 64 128 --steps 2 --batch-size 2"; SIZE="64 128"; LIMIT="--limit 48"; SEGMENTS=300
    SWAV_BUDGET="--steps 2 --pixel-samples 500 --region-samples 500"; NO_AMP="--no-amp"
    FT_BUDGET="--iters 2 --batch-size 2 --crop 64 128"
    INSTANCE_BUDGET="--iters 2 --batch-size 1 --warmup-iters 1 --rois-per-image 16"
  elif [ "$preset" = cityscapes ]; then
    DEPTH_BUDGET="--size 192 512 --epochs 20 --batch-size 12"; SIZE="384 768"; LIMIT=""; SEGMENTS=10000
    SWAV_BUDGET="--epochs 25 --pixel-samples 4000 --region-samples 7200"; NO_AMP=""
    FT_BUDGET="--iters 80000 --batch-size 8 --crop 384 768"; INSTANCE_BUDGET=""
  else
    DEPTH_BUDGET="--size 192 512 --epochs 20 --batch-size 12"; SIZE="384 768"; LIMIT=""; SEGMENTS=10000
    SWAV_BUDGET="--epochs 100 --pixel-samples 4000 --region-samples 7200"; NO_AMP=""
    FT_BUDGET="--iters 6000 --batch-size 8 --crop 384 768"; INSTANCE_BUDGET=""
  fi
  if [ "$preset" = cityscapes ]; then
    FRAMES="--split train --sequence"; FRACTION=1  # the 89,250 video frames; fine-tuning on all of train
  else
    FRAMES="--split train"; FRACTION=0.0625        # the 2975 annotated frames; fine-tuning on 1/16 of train
  fi
  # ===== depth (cityscapes) =====
  # stage 1, Monodepth2 on the train video sequences (leftImg8bit_sequence): bottom quarter cropped (ego car),
  # 192 x 512, frames 0 -2 +2 (17 Hz), ResNet-18, batch 12, Adam 1e-4, 20 epochs (x0.1 after 15), AMP; then the
  # disparity of the pre-training frames and of val at the later stages' 384 x 768 (full frame); depth metrics
  # on val against the SGM disparity (bottom quarter ignored). Add --weights FILE for ImageNet init.
  $PY depth.py train --data "$DATA" --work "$WORK" --crop-bottom 0.25 --frame-offset 2 $DEPTH_BUDGET --resume $NO_AMP
  $PY depth.py predict --work "$WORK" --data "$DATA" $FRAMES --size $SIZE $LIMIT $NO_AMP
  $PY depth.py predict --work "$WORK" --data "$DATA" --split val --size $SIZE $NO_AMP
  $PY depth.py eval --work "$WORK" --data "$DATA" --split val --crop-bottom 0.25
  # ===== group (cityscapes) =====
  # stage 2 at paper scale: 384 x 768, 10000 superpixels, each sequence's camera JSON; val too, for --eval
  $PY group.py --work "$WORK" --data "$DATA" $FRAMES --size $SIZE --segments $SEGMENTS --workers "$(nproc)" $LIMIT
  $PY group.py --work "$WORK" --data "$DATA" --split val --size $SIZE --segments $SEGMENTS --workers "$(nproc)"
  $PY group.py --eval --work "$WORK" --data "$DATA" --split val
  # ===== copypaste (cityscapes) =====
  # stage 3 (M 8, E 2 4, 384 x 768): a saved sample is ~33 MB (16 canvases + int32 labels), so 25 epochs of the
  # 11,156 samples of 89,250 frames would fill ~9 TB; only previews are written and swav_dense.py builds the same
  # samples on the fly (--on-the-fly, copypaste.CopyPasteDataset, same seeds).
  $PY copypaste.py --work "$WORK" --data "$DATA" $FRAMES --size $SIZE --mix 8 --paste-times 2 4 --epochs 0 \
    --preview 8 $LIMIT
  # ===== swav_dense (cityscapes) =====
  # stage 4, Sec 3.4: ResNet-50 from scratch, FPN + semantic head + projector, K 1000, 4000 pixel + 7200 region
  # points per canvas, lambda 0.5, SGD lr 0.1, 2 warm-up epochs, batch 1 sample = 16 canvases, one GPU, AMP fp16;
  # 25 epochs of 89,250 / 8 = 11,156 samples (ablation: 100 epochs of the 371 samples of 2975 frames); samples
  # built on the fly in DataLoader workers; checkpoints every 500 steps and epoch: the same command continues.
  # ImageNet-initialised run (Table 1 "IN"): add --init imagenet --backbone-weights resnet50.pth (local file).
  swav() {  # WORK_DIR REGIONS_DIR MIX "E1 E2" [FLAGS]: pre-train, cluster on val (Table 1 / 4), fine-tune (2 / 3 / 4)
    $PY swav_dense.py --work "$1" --on-the-fly --data "$DATA" $FRAMES --size $SIZE --disp-dir "$WORK/disp" \
      --regions-dir "$2" --mix "$3" --paste-times $4 --arch resnet50 $SWAV_BUDGET --workers "$(nproc)" --resume \
      $LIMIT $NO_AMP ${5:-}
    # ===== cluster (cityscapes) =====
    # stage 5, Table 1: Cityscapes val at 768 x 384, 19 trainIds, Hungarian on -IoU
    $PY cluster.py --work "$1" --data "$DATA" --split val --size $SIZE --save-pred --pca 8 $NO_AMP
    # ===== finetune (cityscapes) =====
    # stage 6: Table 2 fine-tunes on all of train (its schedule is in the unavailable supplement: 80k iterations
    # of batch 8, mmsegmentation's semantic-FPN Cityscapes schedule); ablations: 1/16 of train, 6k iterations
    $PY finetune.py --work "$1" --data "$DATA" --init swav --fraction "$FRACTION" $FT_BUDGET --size $SIZE $NO_AMP
  }
  if [ "$preset" = cityscapes ]; then
    swav "$WORK" "$WORK/regions" 8 "2 4"
    $PY cluster.py --work "$WORK" --data "$DATA" --split val --protocol picie --out "$WORK/cluster_picie" $NO_AMP
    $PY finetune.py --work "$WORK" --data "$DATA" --init scratch --arch resnet50 --fraction 1 $FT_BUDGET \
      --size $SIZE --out "$WORK/finetune_scratch" $NO_AMP
    # Table 2's lambda 1 rows: the same pre-training with pixel-level positives only (Eqn 7, lambda 1), its
    # semantic fine-tuning, and instance segmentation: Mask R-CNN from its ResNet-50 + FPN (detectron2's
    # Cityscapes recipe: 24k iterations of batch 8, lr 0.01), mask AP and AP50 on val
    swav "$WORK/lam1" "$WORK/regions" 8 "2 4" "--lam 1"
    $PY finetune.py --work "$WORK/lam1" --data "$DATA" --task instance --init swav $INSTANCE_BUDGET --size $SIZE \
      $NO_AMP
    # Tables 1 and 2, KITTI columns (the Cityscapes-trained network): KITTI=.../data_semantics
    if [ -n "${KITTI:-}" ]; then
      $PY cluster.py --work "$WORK" --data "$KITTI" --dataset kitti --out "$WORK/cluster_kitti" $NO_AMP
      $PY finetune.py --work "$WORK" --data "$KITTI" --dataset kitti --init swav --folds 5 $FT_BUDGET \
        --out "$WORK/finetune_kitti" $NO_AMP
    fi
  else
    # Table 3: proposals color-only (Felzenszwalb, the stand-in for owt-ucm) / ours / ground truth, M 8;
    # Table 4: M 0 (no copy-paste), 2, 4, 8 with our proposals; lambda 0.5; one pre-training each
    for method in felzenszwalb gt; do
      $PY group.py --work "$WORK/proposals_$method" --data "$DATA" $FRAMES --size $SIZE --method "$method" \
        --workers "$(nproc)" $LIMIT
    done
    swav "$WORK" "$WORK/regions" 8 "2 4"
    swav "$WORK/M4" "$WORK/regions" 4 "2 4"
    swav "$WORK/M2" "$WORK/regions" 2 "2 4"
    swav "$WORK/M0" "$WORK/regions" 8 "0 0"
    swav "$WORK/felzenszwalb" "$WORK/proposals_felzenszwalb/regions" 8 "2 4"
    swav "$WORK/gt" "$WORK/proposals_gt/regions" 8 "2 4"
  fi
elif [ "$preset" = "kitti" ]; then
  # KITTI (PAPER_NOTES.md: 71 raw drives, 42,382 left images, 200 annotated training images, 384 x 1280):
  # pre-training on every raw drive, clustering on data_semantics/training (Table 1's KITTI column), 5-fold
  # fine-tuning on its 200 labelled images (Table 2's KITTI column; the stage writes the folds' mean and std).
  RAW="${2:?usage: bash pipeline.sh kitti RAW SEMANTICS}"
  SEMANTICS="${3:?usage: bash pipeline.sh kitti RAW SEMANTICS}"
  WORK="${WORK:-runs/kitti}"
  # ===== budgets: the paper's, or (SCALE=smoke) tiny ones for the same commands =====
  if [ "$SCALE" = smoke ]; then
    DEPTH_BUDGET="--size 64 224 --steps 2 --batch-size 2"; SIZE="96 320"; LIMIT="--limit 48"; SEGMENTS=300
    SWAV_BUDGET="--steps 2 --pixel-samples 500 --region-samples 500"; NO_AMP="--no-amp"
    FT_BUDGET="--iters 2 --batch-size 2 --crop 96 320"
  else
    DEPTH_BUDGET="--size 192 640 --epochs 20 --batch-size 12"; SIZE="384 1280"; LIMIT=""; SEGMENTS=10000
    SWAV_BUDGET="--epochs 25 --pixel-samples 4000 --region-samples 7200"; NO_AMP=""
    FT_BUDGET="--iters 6000 --batch-size 8 --crop 384 768"
  fi
  # ===== depth (kitti) =====
  # stage 1, Monodepth2's KITTI recipe: 192 x 640, frames 0 -1 +1 (10 Hz), no crop, batch 12, 20 epochs; the
  # intrinsics of each date's calib_cam_to_cam.txt (P_rect_02); disparity of every frame at 384 x 1280.
  # (No depth metrics: KITTI's ground truth is in the velodyne scans, which this project does not read.)
  $PY depth.py train --data "$RAW" --dataset kitti --work "$WORK" --frame-offset 1 $DEPTH_BUDGET --resume $NO_AMP
  $PY depth.py predict --work "$WORK" --data "$RAW" --dataset kitti --size $SIZE $LIMIT $NO_AMP
  # ===== group (kitti) =====
  # stage 2: 384 x 1280, the released code's 10000 superpixels, each date's calibration
  $PY group.py --work "$WORK" --data "$RAW" --dataset kitti --size $SIZE --segments $SEGMENTS --workers "$(nproc)" \
    $LIMIT
  # ===== copypaste, swav_dense (kitti) =====
  # stages 3 and 4 as on Cityscapes (M 8, E 2 4, ResNet-50, K 1000, lambda 0.5) at 384 x 1280; the paper gives
  # no KITTI epoch count: 25, its Cityscapes one (42,382 / 8 = 5297 samples per epoch)
  $PY copypaste.py --work "$WORK" --data "$RAW" --dataset kitti --size $SIZE --mix 8 --paste-times 2 4 --epochs 0 \
    --preview 8 $LIMIT
  $PY swav_dense.py --work "$WORK" --on-the-fly --data "$RAW" --dataset kitti --size $SIZE --mix 8 \
    --paste-times 2 4 --arch resnet50 $SWAV_BUDGET --workers "$(nproc)" --resume $LIMIT $NO_AMP
  # ===== cluster (kitti) =====
  # stage 5: the 200 data_semantics training images at 1280 x 384, 19 trainIds, Hungarian on -IoU
  $PY cluster.py --work "$WORK" --data "$SEMANTICS" --dataset kitti --split training --size $SIZE --save-pred \
    --pca 8 $NO_AMP
  # ===== finetune (kitti) =====
  # stage 6: 5-fold cross-validation over the 200 labelled images (every fold in turn, then the folds' mean and
  # std in WORK/finetune/metrics.json); iterations: the paper's ablation count (its KITTI schedule is unknown)
  $PY finetune.py --work "$WORK" --data "$SEMANTICS" --dataset kitti --init swav --folds 5 $FT_BUDGET --size $SIZE \
    $NO_AMP
else
  echo "usage: bash pipeline.sh toy | toy-ablations | toy-instance | cityscapes ROOT | cityscapes-ablation ROOT |" \
    "kitti RAW SEMANTICS" >&2
  exit 2
fi
