"""Stage 6: supervised fine-tuning of the pre-trained network for semantic or instance segmentation.

Paper Sec 4.2 and 4.3 (Tables 2-4): semantic (default): the pre-trained backbone, FPN and semantic head of
swav_dense.py (projector and prototypes dropped) + a new 1x1 classifier, x4 bilinear upsampling, cross-entropy on
19 trainIds; scores from cluster.py's metric code (pixel accuracy, per-class IoU, mIoU). --task instance (Table 2):
torchvision's Mask R-CNN with the pre-trained ResNet + FPN (semantic head dropped), new box and mask heads for the
8 Cityscapes instance classes; mask AP (0.5:0.95) and AP50 with pycocotools. Data: Cityscapes train/val, KITTI's
200 labelled images (5-fold cross-validation) or the toy city. Ablations: 1/16 (--fraction 0.0625), 6k iterations.

    swav_dense.py (WORK/swav/model.pt) -> finetune.py        (cluster.py: the metric functions)

| file                                 | meaning                                                           |
|--------------------------------------|-------------------------------------------------------------------|
| WORK/swav/model.pt (--init swav)     | backbone., fpn. (and head. for semantic) transferred              |
| DATA gtFine labelIds / instanceIds   | Cityscapes layout (also the toy city); KITTI semantic/, instance/ |
| OUT/checkpoint.pt, model.pt          | model, optimizer, scaler, iteration, args / arch, model, classes  |
| OUT/metrics.json, log.jsonl          | final scores (folds: per fold, mean, std) / steps and evaluations |
| OUT/pred/ (--save-pred, instance)    | Cityscapes instance-results format (see save_cityscapes_instances)|
OUT: --out, default WORK/finetune (semantic), WORK/finetune_instance (instance); folds: OUT/fold_<k>/.

    python finetune.py --work runs/cityscapes --data CITYSCAPES --init swav --fraction 0.0625 --iters 6000
    python finetune.py --work runs/cityscapes --data CITYSCAPES --task instance --init swav
    python finetune.py --work runs/cityscapes --data KITTI/data_semantics --dataset kitti --folds 5
Tiny (toy city, CPU; about a minute on 2 cores):
    python finetune.py --work runs/toy --data data/toycity --dataset toycity --init swav --fraction 0.25 \\
        --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0

Choices where the paper is silent (its supplement, with the schedule, could not be found), stated plainly
- Semantic: SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly decay (0.9) per iteration, batch 8, random scale
  [0.5, 2] of the base size (Cityscapes 384 x 768, KITTI 384 x 1280, toy native; --size), crop 384 x 768, flip.
- Instance: detectron2's configs/Cityscapes/mask_rcnn_R_50_FPN.yaml (commit 02b5c4e): SGD lr 0.01, batch 8,
  24k iterations, lr x0.1 at 18k (3/4), linear warmup 1000 iterations from 0.001, momentum 0.9, weight decay 1e-4
  (none on norm layers), short side chosen from 800..1024 step 32 of 1024 (scales of the native size), flip,
  test at native size, training images without instances skipped. BatchNorm: trainable (batch statistics, one
  GPU = SyncBN), no stage frozen, as self-supervised transfer does (MoCo's detectron2 configs: SyncBN, FREEZE_AT
  0): SwAV's statistics are its own, not ImageNet's that FrozenBN/FREEZE_AT 2 presume. FPN without norm
  (swav_dense.py's). Crowd/void regions are not GT (official: ignored); at most 100 detections per image.
- KITTI folds: labelled images sorted, permuted with --split-seed, dealt into --folds parts; --fold i runs one.
"""
import argparse
import contextlib
import io
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from tqdm import tqdm

from cluster import (IGNORE, IMAGENET_MEAN, TRAIN_CLASSES, confusion_matrix, labelids_to_trainids, list_eval_pairs,
                     normalize_images, print_scores, read_pair, scores_json, segmentation_scores)
from depth import (add_parallel_args, amp_dtype_for, atomic_write, fraction, image_size, nonnegative_int,
                   positive_float, positive_int, ranged, record_settings, restore_checkpoint, resume_log, run_main,
                   run_settings, seed_everything, setup_distributed, wrap_ddp)
from swav_dense import HEAD_DIM, RESNET_CHANNELS, build_model, load_backbone_weights, load_model

# ----- Constants (common practice for the semantic-FPN head; the paper's supplement is unavailable) -----
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
POLY_POWER = 0.9
BATCH_SIZE = 8
SCALE_RANGE = (0.5, 2.0)
CROP = (384, 768)             # (H, W)
ABLATION_ITERS = 6000         # Sec 4.3: 6k iterations on 1/16 of Cityscapes train
BASE_SIZE = {"cityscapes": (384, 768), "kitti": (384, 1280), "toycity": None}  # None = native size
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)  # image padding: 0 after ImageNet normalization
# Instance task: detectron2 configs/Cityscapes/mask_rcnn_R_50_FPN.yaml, config/defaults.py (commit 02b5c4e)
INSTANCE_LABEL_IDS = (24, 25, 26, 27, 28, 31, 32, 33)  # Cityscapes labelIds of the 8 evaluated instance classes
INSTANCE_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
INSTANCE_ITERS = 24000        # SOLVER.MAX_ITER
LR_STEP_AT, LR_GAMMA = 0.75, 0.1                 # SOLVER.STEPS (18000,) of 24000, SOLVER.GAMMA
WARMUP_ITERS, WARMUP_FACTOR = 1000, 1e-3         # SOLVER.WARMUP_ITERS, WARMUP_FACTOR (linear)
ROIS_PER_IMAGE = 512          # MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE (torchvision's default too)
INSTANCE_SCALES = tuple(m / 1024 for m in range(800, 1025, 32))  # INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST 1024
SCORE_KEYS = ("pixel_accuracy", "miou", "iou", "ap", "ap50", "ap_per_class", "ap50_per_class")  # averaged by folds


# ----- Pure functions: schedule, subsets, batches, augmentation, loss -----
def poly_lr(base_lr, iteration, total_iters, power=POLY_POWER):
    """Poly decay: base_lr * (1 - iteration / total_iters) ** power."""
    return base_lr * (1.0 - min(iteration, total_iters) / total_iters) ** power


def select_fraction(stems, fraction, seed):
    """A deterministic subset of round(fraction * N) (at least 1) stems: the first of a seeded permutation of
    the sorted stems, so that, for one seed, smaller fractions are subsets of larger ones. Returned sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: must be in (0, 1]")
    stems = sorted(stems)
    count = max(1, int(round(fraction * len(stems))))
    order = np.random.default_rng(seed).permutation(len(stems))
    return sorted(stems[i] for i in order[:count])


def kfold_split(stems, folds, fold, seed=0):
    """(train stems, held-out stems) of fold `fold` of `folds`: sorted stems permuted by seed, dealt in turn."""
    if not 0 <= fold < folds:
        raise ValueError(f"--fold {fold}: must be in 0..{folds - 1}")
    stems = sorted(stems)
    order = np.random.default_rng(seed).permutation(len(stems))
    held = {stems[i] for k, i in enumerate(order) if k % folds == fold}
    return [s for s in stems if s not in held], [s for s in stems if s in held]


def batch_indices(iteration, batch_size, num_items, seed):
    """Item indices of one iteration's batch: consecutive items of a stream of seeded per-epoch permutations.

    A pure function of (iteration, seed), so a resumed run sees exactly the batches of an uninterrupted one."""
    out = []
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, k = divmod(position, num_items)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(num_items)[k]))
    return out


def random_scale_crop_flip(image, label, base_size, scale_range, crop, flip, rng):
    """Training augmentation: resize to base_size * s (s uniform in scale_range; image bilinear, label nearest),
    pad (image with the ImageNet mean, label with 255) to at least the crop, random crop (H, W) = crop,
    horizontal flip with p 0.5.

    image uint8 (H, W, 3), label uint8 (H, W); rng: numpy Generator. Returns uint8 (ch, cw, 3), (ch, cw)."""
    s = rng.uniform(*scale_range)
    h, w = max(1, round(base_size[0] * s)), max(1, round(base_size[1] * s))
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    (ch, cw), (ph, pw) = crop, (max(crop[0] - h, 0), max(crop[1] - w, 0))
    padded = np.empty((h + ph, w + pw, 3), dtype=np.uint8)
    padded[:], padded[:h, :w] = PAD_RGB, image
    image, label = padded, np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    top, left = int(rng.integers(0, h + ph - ch + 1)), int(rng.integers(0, w + pw - cw + 1))
    image, label = image[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def segmentation_loss(logits, labels):
    """Cross-entropy over pixels, 255 ignored, in fp32 (zero, with a graph, when no pixel is labelled)."""
    if not (labels != IGNORE).any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE)


# ----- Network -----
class SegmentationNet(nn.Module):
    """swav_dense.py's backbone + FPN + semantic head (projector and prototypes removed) -> new 1x1 classifier
    -> x4 bilinear upsampling to the input size (the Panoptic-FPN semantic branch)."""

    def __init__(self, arch="resnet50", num_classes=len(TRAIN_CLASSES), head_dim=HEAD_DIM):
        super().__init__()
        self.arch = arch
        self.net = build_model(arch, num_prototypes=1, head_dim=head_dim)
        self.net.projector = None   # dropped: not part of the fine-tuned network (and not in its state_dict)
        self.net.prototypes = None
        self.classifier = nn.Conv2d(head_dim, num_classes, 1)

    def forward(self, x):
        """(B, 3, H, W) ImageNet-normalized -> (B, num_classes, H, W) logits."""
        logits = self.classifier(self.net.semantic_features(x))  # (B, C, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def transfer_swav_weights(seg_net, checkpoint, source="model.pt"):
    """Load a swav_dense.py model's backbone., fpn., head. tensors into seg_net.net (strict); projector. and
    prototypes. are dropped. Raises ValueError naming both architectures when they differ. Returns the keys."""
    if checkpoint.get("arch") != seg_net.arch:
        raise ValueError(f"{source} was pre-trained with arch {checkpoint.get('arch')!r}, but this network is "
                         f"{seg_net.arch!r}: pass --arch {checkpoint.get('arch')} (or pre-train {seg_net.arch})")
    state = {k: v for k, v in checkpoint["model"].items() if not k.startswith(("projector.", "prototypes."))}
    try:
        seg_net.net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: its backbone/FPN/head do not fit a {seg_net.arch} network ({e})")
    return sorted(state)


def finetune_network(args):
    """The network of a Table 2 row, by --init: swav (swav_dense.py's model.pt: backbone, FPN and, semantic task
    only, head; --arch defaulting to its own), imagenet (--backbone-weights, a local torchvision ResNet
    state_dict, for the backbone) or scratch (PyTorch's default initialization). New heads in every case: a 1x1
    classifier (semantic), Mask R-CNN's box and mask heads (instance)."""
    swav_path = args.swav_model or os.path.join(args.work, "swav", "model.pt")
    swav = load_model(swav_path)[1] if args.init == "swav" else {}  # a missing file: an error naming swav_dense.py
    arch = args.arch or swav.get("arch", "resnet50")
    if args.task == "instance":
        model = build_mask_rcnn(arch, rois_per_image=args.rois_per_image)
        transfer, backbone = transfer_swav_to_mask_rcnn, SimpleNamespace(backbone=model.backbone.body, arch=arch)
    else:
        model = SegmentationNet(arch, len(TRAIN_CLASSES), swav.get("head_dim", HEAD_DIM))
        transfer, backbone = transfer_swav_weights, model.net
    if args.init == "swav":
        print(f"--init swav: {len(transfer(model, swav, swav_path))} tensors from {swav_path}")
    elif args.init == "imagenet":
        load_backbone_weights(backbone, args.backbone_weights)
    return model


def model_file(model, args):
    """finetune.py's model.pt: a plain dict with all that rebuilds the network (SegmentationNet(arch,
    num_classes, head_dim), or for task instance build_mask_rcnn(arch, num_classes), then load_state_dict(model))."""
    if args.task == "instance":
        return {"arch": model.arch, "model": model.state_dict(), "args": vars(args), "task": "instance",
                "num_classes": len(INSTANCE_CLASSES) + 1, "classes": ("background",) + INSTANCE_CLASSES,
                "label_ids": INSTANCE_LABEL_IDS, "init": args.init}
    return {"arch": model.arch, "model": model.state_dict(), "args": vars(args), "num_classes": len(TRAIN_CLASSES),
            "classes": TRAIN_CLASSES, "head_dim": model.classifier.in_channels, "init": args.init}


# ----- Data, training step, evaluation -----
def labelled_sets(args):
    """(train pairs, evaluation pairs) of (stem, image path, labelIds path): the split or --folds' fold, then
    the --subset file's stems or a --fraction of the training pairs."""
    train_split = args.train_split or ("training" if args.dataset == "kitti" else "train")
    pairs_of = list_instance_pairs if args.task == "instance" else list_eval_pairs
    if args.folds > 1:
        by_stem = {p[0]: p for p in pairs_of(args.data, args.dataset, train_split)}
        train_stems, held = kfold_split(list(by_stem), args.folds, args.fold, args.split_seed)
        train, val = [by_stem[s] for s in train_stems], [by_stem[s] for s in held]
    elif args.dataset == "kitti":
        raise ValueError("KITTI has no labelled validation split: use --folds 5 (all folds) or --fold i")
    else:
        train = pairs_of(args.data, args.dataset, train_split)
        val = pairs_of(args.data, args.dataset, args.val_split)
    if args.subset:
        with open(args.subset) as f:
            wanted = sorted({line.strip() for line in f if line.strip()})
        by_stem = {p[0]: p for p in train}
        if missing := [s for s in wanted if s not in by_stem]:
            raise ValueError(f"--subset {args.subset}: {len(missing)} stems not in the training set, e.g. {missing[0]}")
        return [by_stem[s] for s in wanted], val
    keep = set(select_fraction([p[0] for p in train], args.fraction, args.seed)) if args.fraction < 1 else None
    return [p for p in train if keep is None or p[0] in keep], val


class TrainBatches(torch.utils.data.Dataset):
    """Item k = slot k % B of iteration start + k // B (B = args.batch_size): an augmented crop (args.scale_range,
    args.crop, args.flip) whose image and randomness depend only on (args.seed, iteration, slot), so resuming
    reproduces an uninterrupted run exactly (any worker count). torchrun: B per process, the global batch of
    B x world slots is drawn as one process's, and process `rank` takes slots rank B ... (rank + 1) B - 1."""

    def __init__(self, pairs, start, stop, base_size, args, rank=0, world=1):
        self.pairs, self.start, self.stop, self.base_size, self.args = pairs, start, stop, base_size, args
        self.rank, self.world = rank, world

    def __len__(self):
        return max(self.stop - self.start, 0) * self.args.batch_size

    def __getitem__(self, k):
        args = self.args
        iteration, slot = self.start + k // args.batch_size, self.rank * args.batch_size + k % args.batch_size
        index = batch_indices(iteration, args.batch_size * self.world, len(self.pairs), args.seed)[slot]
        image, label_ids = read_pair(*self.pairs[index][1:])
        label = labelids_to_trainids(label_ids)
        rng = np.random.default_rng([args.seed, iteration, slot, 1])
        image, label = random_scale_crop_flip(image, label, self.base_size or label.shape, args.scale_range,
                                              args.crop, args.flip, rng)
        return torch.from_numpy(image), torch.from_numpy(label)


def finetune_step(model, optimizer, scaler, images, labels, lr, amp_dtype=None, world=1):
    """One SGD step at learning rate lr on uint8 images (B, H, W, 3) and trainIds (B, H, W), moved to the model's
    device; autocast with amp_dtype (None: fp32), the loss in fp32, scaled by the GradScaler (enabled for fp16).
    Mask R-CNN (labels a list of targets): images a list of uint8 (h, w, 3), the sum of its losses.
    Returns the loss; raises FloatingPointError, before any update, on a non-finite loss. torchrun (world > 1,
    model in DDP, semantic): the mean over the labelled pixels of all processes, its gradient equal to one process's."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    if isinstance(labels, (list, tuple)):  # Mask R-CNN: images of different sizes, one target dict each
        x = [im.to(device).permute(2, 0, 1).float().div(255) for im in images]  # normalized by its transform
        labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
    else:
        x, labels = normalize_images(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x, labels) if isinstance(labels, list) else model(x)  # losses, or logits (B, C, H, W)
    loss = sum(v.float() for v in out.values()) if isinstance(out, dict) else segmentation_loss(out, labels)
    if world > 1 and not isinstance(labels, list):  # the global pixel mean: this process's share, x world as DDP
        # averages the gradients (Mask R-CNN: each process's loss, averaged by DDP, as detectron2)
        torch.distributed.all_reduce(total := (count := (labels != IGNORE).sum()).clone())
        loss = loss * count / total.clamp(min=1) * world
    logged = loss.detach() / world
    if world > 1:
        torch.distributed.all_reduce(logged)  # the global batch's loss, on every process
    if not torch.isfinite(logged):
        raise FloatingPointError(f"non-finite loss {logged.item()}: stopping")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logged.item()


@contextlib.contextmanager
def evaluation_mode(model):
    """model in eval mode inside; after, every module back in its own mode (--freeze-bn's BatchNorms stay in
    eval mode, the rest trains)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():  # parents before children: each module ends in its own mode
            m.train(mode)


@torch.no_grad()
def evaluate_segmentation(model, pairs, size, device, amp_dtype=None, num_classes=len(TRAIN_CLASSES)):
    """Scores (cluster.segmentation_scores) over a labelled set: each whole frame resized to size (None =
    native), logits bilinearly upsampled to the label's resolution, argmax, one confusion over the set."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    with evaluation_mode(model):
        for _, image_path, label_path in pairs:
            image, label_ids = read_pair(image_path, label_path)
            if size is not None:
                image = np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(normalize_images(torch.from_numpy(image)[None].to(device)))
            logits = F.interpolate(logits.float(), size=label_ids.shape, mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1)[0].cpu().numpy(), labelids_to_trainids(label_ids), num_classes,
                                     num_classes)
    return segmentation_scores(conf)


# ----- Instance segmentation (Table 2): targets, schedule, Mask R-CNN, mask AP, Cityscapes results format -----
def instance_masks(ids, encoding="cityscapes"):
    """(masks bool (N, H, W), labelIds int64 (N,)) of the INSTANCE_LABEL_IDS instances of an instance-id map.
    cityscapes (gtFine instanceIds, the toy city): v = labelId * 1000 + k, v < 1000 stuff or crowd (not an
    instance, ignored as the official evaluation); kitti (devkit README): uint16 labelId * 256 + k, k = 0 none."""
    ids = np.asarray(ids).astype(np.int64)
    base = 256 if encoding == "kitti" else 1000
    keep = (ids % 256 > 0) if encoding == "kitti" else (ids >= 1000)
    values = np.unique(ids[keep & np.isin(ids // base, INSTANCE_LABEL_IDS)])
    return ids[None] == values[:, None, None], values // base


def instance_target(ids, encoding="cityscapes"):
    """torchvision's detection target of an instance-id map: boxes float32 (N, 4) x0, y0, x1, y1 at pixel edges
    (a 1-pixel instance is 1 x 1), labels int64 1..8 (0: background), masks uint8 (N, H, W)."""
    masks, label_ids = instance_masks(ids, encoding)
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes[i] = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
    return {"boxes": torch.from_numpy(boxes), "masks": torch.from_numpy(masks.astype(np.uint8)),
            "labels": torch.from_numpy(np.searchsorted(INSTANCE_LABEL_IDS, label_ids) + 1)}


def warmup_step_lr(base_lr, iteration, total_iters, warmup_iters=WARMUP_ITERS, warmup_factor=WARMUP_FACTOR,
                   step_at=LR_STEP_AT, gamma=LR_GAMMA):
    """detectron2's WarmupMultiStepLR: linear warmup from base_lr * warmup_factor, x gamma from step_at * iters."""
    alpha = min(iteration / warmup_iters, 1.0) if warmup_iters > 0 else 1.0
    return base_lr * (warmup_factor * (1 - alpha) + alpha) * (gamma if iteration >= step_at * total_iters else 1.0)


def build_mask_rcnn(arch="resnet50", num_classes=len(INSTANCE_CLASSES) + 1, rois_per_image=ROIS_PER_IMAGE):
    """torchvision's Mask R-CNN on ResNet + FPN (resnet50: maskrcnn_resnet50_fpn(weights=None, weights_backbone=
    None)'s network), trainable BatchNorm and stages; rois_per_image proposals per image train the heads."""
    backbone = resnet_fpn_backbone(backbone_name=arch, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=num_classes, box_batch_size_per_image=rois_per_image)
    # its transform keeps ImageNet normalization and /32 padding but not its resize: finetune.py scales from
    # (seed, iteration, slot), so a resumed run equals an uninterrupted one
    model.transform.resize, model.arch = (lambda image, target=None: (image, target)), arch
    return model


def transfer_swav_to_mask_rcnn(mask_rcnn, checkpoint, source="model.pt"):
    """swav_dense.py's backbone.* -> Mask R-CNN's backbone.body.*, fpn.* -> backbone.fpn.*, strictly (every ResNet
    and FPN tensor replaced; head, projector, prototypes dropped). Returns the Mask R-CNN keys loaded."""
    if checkpoint.get("arch") != mask_rcnn.arch:
        raise ValueError(f"{source} was pre-trained with arch {checkpoint.get('arch')!r}, but this network is "
                         f"{mask_rcnn.arch!r}: pass --arch {checkpoint.get('arch')}")
    state = {("body." + k[len("backbone."):] if k.startswith("backbone.") else k): v
             for k, v in checkpoint["model"].items() if k.startswith(("backbone.", "fpn."))}
    try:
        mask_rcnn.backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: its backbone/FPN do not fit Mask R-CNN's {mask_rcnn.arch} + FPN ({e})")
    return sorted("backbone." + k for k in state)


def rle_annotations(image_id, masks, label_ids, scores=None):
    """COCO annotations (category_id: the labelId) of one image's masks bool (N, H, W), run-length encoded:
    ground truth (scores None) or detections."""
    from pycocotools import mask as mask_utils
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    if scores is None:
        return [{"image_id": image_id, "category_id": int(c), "segmentation": r, "area": float(m.sum()),
                 "bbox": list(mask_utils.toBbox(r)), "iscrowd": 0} for m, c, r in zip(masks, label_ids, rles)]
    return [{"image_id": image_id, "category_id": int(c), "segmentation": r, "score": float(p)}
            for c, r, p in zip(label_ids, rles, scores)]


def mask_ap(image_sizes, ground_truth, detections):
    """COCO mask AP (IoU 0.5:0.95) and AP50 by pycocotools, per class (None where absent) and their mean over the
    present classes (as Cityscapes' AP); rle_annotations lists whose image ids index image_sizes [(H, W)]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    present = [c in {a["category_id"] for a in ground_truth} for c in INSTANCE_LABEL_IDS]
    precision = np.zeros((10, 101, len(INSTANCE_LABEL_IDS)))  # (IoU thresholds, recalls, classes); no detections
    if detections:
        gt = COCO()
        gt.dataset = {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(image_sizes)],
                      "annotations": [{**a, "id": n + 1} for n, a in enumerate(ground_truth)],
                      "categories": [{"id": c} for c in INSTANCE_LABEL_IDS]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            evaluation = COCOeval(gt, gt.loadRes(detections), "segm")
            evaluation.evaluate(), evaluation.accumulate()
        precision = evaluation.eval["precision"][:, :, :, 0, -1]  # area "all", 100 detections an image
    ap, ap50 = ({n: float(p[..., k].mean()) if present[k] else None for k, n in enumerate(INSTANCE_CLASSES)}
                for p in (precision, precision[0]))
    mean = lambda d: float(np.mean([v for v in d.values() if v is not None])) if any(present) else None  # noqa: E731
    return {"ap": mean(ap), "ap50": mean(ap50), "ap_per_class": ap, "ap50_per_class": ap50,
            "absent_classes": [n for n, p in zip(INSTANCE_CLASSES, present) if not p]}


def save_cityscapes_instances(folder, stem, masks, label_ids, scores):
    """The Cityscapes instance-results format (cityscapesScripts evalInstanceLevelSemanticLabeling): FOLDER/<stem>.txt
    with a line per detection, `masks/<stem>_<k>.png <labelId> <confidence>` (path relative to the txt), and each
    mask a uint8 PNG of the image's size, 255 inside, 0 outside."""
    lines = []
    for k, (m, c, p) in enumerate(zip(masks, label_ids, scores)):
        lines.append(f"masks/{stem}_{k:03d}.png {int(c)} {float(p):.6f}\n")
        os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
        png = Image.fromarray(m.astype(np.uint8) * 255)
        atomic_write(os.path.join(folder, lines[-1].split()[0]), lambda f: png.save(f, "PNG"))
    atomic_write(os.path.join(folder, f"{stem}.txt"), lambda f: f.write("".join(lines).encode()))


def list_instance_pairs(data, dataset, split):
    """list_eval_pairs with each labelIds PNG replaced by its instance PNG: Cityscapes ..._gtFine_instanceIds.png,
    KITTI (data_semantics) SPLIT/instance/<name>.png."""
    pairs = [(stem, image, os.path.join(os.path.dirname(os.path.dirname(label)), "instance", os.path.basename(label))
              if dataset == "kitti" else label.replace("_gtFine_labelIds.png", "_gtFine_instanceIds.png"))
             for stem, image, label in list_eval_pairs(data, dataset, split)]
    if missing := [label for _, _, label in pairs if not os.path.exists(label)]:
        raise FileNotFoundError(f"{len(missing)} instance label files missing, e.g. {missing[0]}")
    return pairs


def read_instance_pair(image_path, label_path, size=None):
    """(RGB uint8 (H, W, 3), instance ids int64 (H, W)), resized to size (H, W) (bilinear, nearest) when given;
    ValueError naming both files when their sizes differ."""
    with Image.open(image_path) as im, Image.open(label_path) as lab:
        image, ids = im.convert("RGB"), Image.fromarray(np.asarray(lab).astype(np.int32))
    if image.size != ids.size:
        raise ValueError(f"{label_path} is {ids.size[0]} x {ids.size[1]} but its image {image_path} is "
                         f"{image.size[0]} x {image.size[1]}: a wrong or corrupt instance label file")
    if size is not None:
        image, ids = image.resize(size[::-1], Image.BILINEAR), ids.resize(size[::-1], Image.NEAREST)
    return np.array(image), np.array(ids).astype(np.int64)


def with_instances(pairs, encoding):
    """The pairs whose labels hold an instance (detectron2's FILTER_EMPTY_ANNOTATIONS) and how many were skipped;
    sizes checked on the way (read_instance_pair's error)."""
    kept = [p for p in pairs if len(instance_masks(read_instance_pair(*p[1:])[1], encoding)[1])]
    return kept, len(pairs) - len(kept)


class InstanceBatches(TrainBatches):
    """TrainBatches for Mask R-CNN: (image uint8 (h, w, 3), target), scaled by a choice of args.instance_scales of
    the base size (None: native) and flipped, from (args.seed, iteration, slot) only; torchrun as TrainBatches."""

    def __getitem__(self, k):
        args = self.args
        iteration, slot = self.start + k // args.batch_size, self.rank * args.batch_size + k % args.batch_size
        index = batch_indices(iteration, args.batch_size * self.world, len(self.pairs), args.seed)[slot]
        rng = np.random.default_rng([args.seed, iteration, slot, 1])
        s, (h, w) = rng.choice(args.instance_scales), self.base_size or image_size(self.pairs[index][1])
        image, ids = read_instance_pair(*self.pairs[index][1:], size=(max(1, round(h * s)), max(1, round(w * s))))
        if args.flip and rng.random() < 0.5:
            image, ids = image[:, ::-1], ids[:, ::-1]
        return torch.from_numpy(image.copy()), instance_target(ids, encoding_of(args))


def collate_lists(items):
    """Images and targets as lists (Mask R-CNN takes images of different sizes)."""
    return tuple(zip(*items))


def encoding_of(args):
    return "kitti" if args.dataset == "kitti" else "cityscapes"


@torch.no_grad()
def evaluate_instances(model, pairs, encoding, size, device, amp_dtype=None, pred_dir=None):
    """mask_ap over a labelled set: each frame resized to size (None = native), mask probabilities bilinearly
    resized to the label's resolution and thresholded at 0.5; pred_dir: also save_cityscapes_instances."""
    sizes, ground_truth, detections = [], [], []
    with evaluation_mode(model):
        for i, (stem, image_path, label_path) in enumerate(pairs):
            image, ids = read_instance_pair(image_path, label_path)
            if size is not None:
                image = np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model([torch.from_numpy(image).to(device).permute(2, 0, 1).float().div(255)])[0]
            probs = F.interpolate(out["masks"].float(), size=ids.shape, mode="bilinear", align_corners=False)[:, 0]
            masks, scores = (probs > 0.5).cpu().numpy(), out["scores"].float().cpu().numpy()
            label_ids = np.array(INSTANCE_LABEL_IDS)[out["labels"].cpu().numpy() - 1]
            sizes.append(ids.shape)
            ground_truth += rle_annotations(i, *instance_masks(ids, encoding))
            detections += rle_annotations(i, masks, label_ids, scores)
            if pred_dir:
                save_cityscapes_instances(pred_dir, stem, masks, label_ids, scores)
    return mask_ap(sizes, ground_truth, detections)


def evaluate_task(model, pairs, size, device, amp_dtype, args, final=False):
    """(JSON scores, log line) of the task over pairs; final: the per-class table printed and --save-pred's
    files written to OUT/pred (instance)."""
    if args.task == "semantic":
        scores = evaluate_segmentation(model, pairs, size, device, amp_dtype)
        print_scores(TRAIN_CLASSES, scores) if final else None
        line = f"mIoU {100 * scores['miou']:.2f}, acc {100 * scores['pixel_accuracy']:.2f}"
        return scores_json(scores, TRAIN_CLASSES), line
    pred_dir = os.path.join(output_folder(args), "pred") if final and args.save_pred else None
    scores = evaluate_instances(model, pairs, encoding_of(args), size, device, amp_dtype, pred_dir)
    pct = lambda v: "absent" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for name in INSTANCE_CLASSES if final else []:
        print(f"{name:<16} AP {pct(scores['ap_per_class'][name]):>6}  AP50 {pct(scores['ap50_per_class'][name]):>6}")
    return scores, f"mask AP {pct(scores['ap'])}, AP50 {pct(scores['ap50'])}"


def training_data(args):
    """(train pairs, evaluation pairs, base size): labelled_sets, for instance without the training images that
    have no instance (a count printed; sizes checked), and --size or the dataset's base size (instance: native)."""
    train, val = labelled_sets(args)
    if args.task == "instance":
        train, skipped = with_instances(train, encoding_of(args))
        print(f"skipped {skipped} training images without instances")
    return train, val, tuple(args.size) if args.size else (None if args.task == "instance" else BASE_SIZE[args.dataset])


def weight_decay_groups(model, no_decay_norm):
    """SGD's parameters: all in one group, or (no_decay_norm: detectron2's WEIGHT_DECAY_NORM 0) BatchNorm's weights
    and biases in a group without weight decay."""
    if not no_decay_norm:
        return model.parameters()
    norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in norms]},
            {"params": [p for p in model.parameters() if id(p) in norms], "weight_decay": 0.0}]


def output_folder(args):
    """--out, or WORK/finetune (semantic) / WORK/finetune_instance (instance)."""
    return args.out or os.path.join(args.work, "finetune" if args.task == "semantic" else "finetune_instance")


def run_folds(args):
    """--folds K without --fold: each fold in turn into OUT/fold_<k>/ (one with its metrics.json is skipped), then
    OUT/metrics.json: {"folds": their metrics, "mean", "std"} of every score (per class: over the folds where
    present; std with ddof 1, the spread between folds)."""
    out = output_folder(args)
    folds = [run(argparse.Namespace(**{**vars(args), "fold": k, "out": os.path.join(out, f"fold_{k}")}))
             for k in range(args.folds)]
    if any(m is None for m in folds):  # --stop-after
        return None
    stats = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1))) if v else (None, None)  # noqa: E731
    summary = {"folds": folds, "mean": {}, "std": {}}
    for key in (k for k in SCORE_KEYS if k in folds[0]):
        if isinstance(folds[0][key], dict):
            pairs = {n: stats([m[key][n] for m in folds if m[key][n] is not None]) for n in folds[0][key]}
            summary["mean"][key], summary["std"][key] = ({n: v[i] for n, v in pairs.items()} for i in (0, 1))
        else:
            summary["mean"][key], summary["std"][key] = stats([m[key] for m in folds if m[key] is not None])
    atomic_write(os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"{args.folds} folds: " + ", ".join(f"{k} {100 * summary['mean'][k]:.2f} +- {100 * summary['std'][k]:.2f}"
                                              for k in ("miou", "ap", "ap50") if summary["mean"].get(k) is not None))
    return summary


# ----- Training, one function top to bottom (Sec 4.2): data, model, optimizer, resume, loop (log lines,
# checkpoints, evaluations), model.pt, metrics.json -----
def run(args):
    if args.folds > 1 and args.fold is None:
        return run_folds(args)
    rank, world, device = setup_distributed(args.device)  # torchrun: rank 0 of `world` prints and writes
    say = print if rank == 0 else lambda *a, **k: None
    say("args: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    seed_everything(args.seed)
    amp_dtype = amp_dtype_for(device, args.no_amp, args.amp_dtype)
    instance, out = args.task == "instance", output_folder(args)
    args.iters, args.world_size = args.iters or (INSTANCE_ITERS if instance else ABLATION_ITERS), world
    ckpt_path, log_path, metrics_path = (os.path.join(out, f) for f in ("checkpoint.pt", "log.jsonl", "metrics.json"))
    record_settings(out, run_settings(args), args.overwrite or args.force_resume, "metrics.json")  # others': stop
    if os.path.exists(metrics_path) and not args.overwrite and not args.resume:
        say(f"{metrics_path} exists; skipping (use --overwrite to redo)")
        return json.load(open(metrics_path))
    # ===== data =====
    train, val, base_size = training_data(args)
    say(f"device {device} x {world}, autocast {amp_dtype}; {len(train)} labelled training images, "
        f"{len(val)} evaluation images")
    # ===== model (a Table 2 row's initialization), optimizer (SGD), GradScaler (fp16) =====
    network = finetune_network(args).to(device)
    ddp_model = wrap_ddp(network, args, device, world)  # .train(), --freeze-bn, DDP under torchrun
    model = getattr(ddp_model, "module", ddp_model)
    optimizer = torch.optim.SGD(weight_decay_groups(model, instance), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # ===== resume, then loop over iterations start .. stop - 1 (--stop-after: a global iteration) =====
    parts = {"model": model, "optimizer": optimizer, "scaler": scaler}  # what checkpoint.pt holds, with iteration, args
    start = restore_checkpoint(ckpt_path, args, "iteration", **parts)
    stop, tick, scores = min(args.iters, args.stop_after or args.iters), time.time(), None
    batches = (InstanceBatches if instance else TrainBatches)(train, start, stop, base_size, args, rank, world)
    loader = torch.utils.data.DataLoader(batches, batch_size=args.batch_size, num_workers=args.workers, pin_memory=
                                         device.type == "cuda", collate_fn=collate_lists if instance else None)
    with resume_log(log_path, start, "iteration") if rank == 0 else open(os.devnull, "w") as log:  # rank 0 writes
        bar = tqdm(loader, desc="finetune", initial=start, total=args.iters, disable=args.no_progress or rank or None)
        for iteration, (images, labels) in enumerate(bar, start=start):
            torch.manual_seed(np.random.SeedSequence([args.seed, iteration, rank]).generate_state(1)[0].item())
            # (Mask R-CNN's anchor and RoI sampling: draws that resume, and differ between processes)
            lr = (warmup_step_lr(args.lr, iteration, args.iters, args.warmup_iters) if instance
                  else poly_lr(args.lr, iteration, args.iters, args.poly_power))
            loss = finetune_step(ddp_model, optimizer, scaler, images, labels, lr, amp_dtype, world)
            done, speed = iteration + 1, (iteration + 1 - start) / (time.time() - tick)
            if rank == 0 and (done % args.log_every == 0 or done == stop):
                log.write(json.dumps({"iteration": done, "loss": loss, "lr": lr, "it_per_s": speed}) + "\n")
                bar.write(f"iter {done}/{args.iters} loss {loss:.4f} lr {lr:.5f} {speed:.2f} it/s ETA "
                          f"{(args.iters - done) / speed / 60:.1f} min")
            if rank == 0 and (done == stop or (args.save_every and done % args.save_every == 0)):
                state = {**{k: v.state_dict() for k, v in parts.items()}, "iteration": done, "args": vars(args)}
                atomic_write(ckpt_path, lambda f: torch.save(state, f))
            if rank == 0 and (done == args.iters or (args.eval_every and done % args.eval_every == 0)):
                scores, line = evaluate_task(model, val, base_size, device, amp_dtype, args, final=done == args.iters)
                log.write(json.dumps({"eval": True, "iteration": done, **scores}) + "\n")
                bar.write(f"eval {done}: {line}")
    if stop < args.iters or rank > 0:  # --stop-after: checkpoint.pt is written, as an interruption would leave it
        say(f"stopped after iteration {stop} of {args.iters}; continue with --resume")
        return None
    # ===== save: model.pt, then metrics.json =====
    scores = scores or evaluate_task(model, val, base_size, device, amp_dtype, args, True)[0]  # resumed at the end
    return save_results(out, model, args, scores, len(train), len(val), base_size)


def save_results(out, model, args, scores, train_images, eval_images, base_size):
    """OUT/model.pt, then OUT/metrics.json (written last: it marks the run finished) -> the metrics dict."""
    atomic_write(os.path.join(out, "model.pt"), lambda f: torch.save(model_file(model, args), f))
    metrics = {"task": args.task, "init": args.init, "arch": model.arch, "dataset": args.dataset, "iters": args.iters,
               "train_images": train_images, "eval_images": eval_images, "fraction": args.fraction,
               "subset": args.subset, "seed": args.seed, "folds": args.folds, "fold": args.fold,
               "eval_size": list(base_size) if base_size else "native", **scores}
    atomic_write(os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    return metrics


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder shared by all stages (reads WORK/swav/model.pt, "
                   "writes WORK/finetune)")
    p.add_argument("--data", required=True, help="dataset root: Cityscapes layout (also the toy city) or KITTI "
                   "data_semantics")
    p.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti", "toycity"],
                   help="layout, base size and splits (kitti: no validation split, use --folds 5)")
    p.add_argument("--task", default="semantic", choices=["semantic", "instance"], help="semantic: the semantic-FPN "
                   "network, mIoU (Tables 2-4); instance: Mask R-CNN, mask AP (Table 2)")
    p.add_argument("--out", default=None, help="where the outputs go (default WORK/finetune; instance: "
                   "WORK/finetune_instance)")
    p.add_argument("--init", default="swav", choices=["swav", "scratch", "imagenet"],
                   help="Table 2's rows: swav, WORK/swav/model.pt (projector, prototypes dropped); scratch, random; "
                   "imagenet, --backbone-weights FILE for the backbone")
    p.add_argument("--swav-model", default=None, help="pre-trained model (default WORK/swav/model.pt)")
    p.add_argument("--backbone-weights", default=None, help="local torchvision ResNet state_dict (--init imagenet; "
                   "nothing is downloaded)")
    p.add_argument("--arch", default=None, choices=sorted(RESNET_CHANNELS),
                   help="ResNet (default: the swav model's; else resnet50, the paper's)")
    p.add_argument("--train-split", default=None, help="labelled split (default train; KITTI training)")
    p.add_argument("--val-split", default="val", help="evaluation split (Cityscapes val, the paper's; not with "
                   "--folds)")
    p.add_argument("--fraction", type=fraction, default=1.0, help="labelled fraction of the training split, a "
                   "deterministic subset by --seed (the paper's ablations: 1/16 = 0.0625)")
    p.add_argument("--subset", default=None, help="file of training stems, one a line (replaces --fraction)")
    p.add_argument("--folds", type=positive_int, default=1,
                   help="k-fold cross-validation of the training split (KITTI: 5, as the paper)")
    p.add_argument("--fold", type=nonnegative_int, default=None, help="run only this held-out fold (0..folds-1) into "
                   "--out; default: every fold into OUT/fold_<k>, then their mean and std in OUT/metrics.json")
    p.add_argument("--split-seed", type=nonnegative_int, default=0,
                   help="seed of the fold split (keep it across the folds' runs)")
    add_recipe_args(p)
    add_run_args(p)
    return p


def add_recipe_args(p):
    """The flags of the training recipe: iterations, optimizer, instance sampling, augmentation."""
    p.add_argument("--iters", type=positive_int, default=None, help="iterations (default: semantic 6000, the paper's "
                   "ablations; instance 24000, detectron2's Cityscapes Mask R-CNN)")
    p.add_argument("--warmup-iters", type=nonnegative_int, default=WARMUP_ITERS, help="instance: linear warmup "
                   "iterations (1000: detectron2); the lr then drops x0.1 at 3/4 of --iters")
    p.add_argument("--rois-per-image", type=positive_int, default=ROIS_PER_IMAGE, help="instance: proposals sampled "
                   "per training image for the box and mask heads (512: detectron2; the heads' cost scales with it)")
    p.add_argument("--instance-scales", nargs="+", type=positive_float, default=list(INSTANCE_SCALES), help="instance: "
                   "training scales of the base size, one chosen per image (detectron2's short sides 800..1024 "
                   "step 32 over its test size 1024)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help="crops per iteration (8: common practice for the semantic-FPN head; the paper does not say)")
    p.add_argument("--lr", type=positive_float, default=LR,
                   help="SGD learning rate, poly-decayed per iteration (0.01: common practice)")
    p.add_argument("--momentum", type=ranged(float, 0, 1), default=MOMENTUM, help="SGD momentum (0.9: common practice)")
    p.add_argument("--weight-decay", type=ranged(float, 0), default=WEIGHT_DECAY, help="SGD weight decay (1e-4: common "
                   "practice)")
    p.add_argument("--poly-power", type=ranged(float, 0), default=POLY_POWER,
                   help="poly decay power (0.9: common practice)")
    p.add_argument("--size", nargs=2, type=positive_int, default=None, metavar=("H", "W"), help="base size the scales "
                   "refer to, and the evaluation size (default: the paper's 384 768 on Cityscapes, 384 1280 on "
                   "KITTI; the toy city's native size)")
    p.add_argument("--scale-range", nargs=2, type=positive_float, default=list(SCALE_RANGE), metavar=("MIN", "MAX"),
                   help="random scale range (0.5 2: common practice; 1 1 turns scaling off)")
    p.add_argument("--crop", nargs=2, type=positive_int, default=list(CROP), metavar=("H", "W"), help="training crop "
                   "(384 768: the paper's working resolution)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")


def add_run_args(p):
    """The flags of how a run goes: predictions, evaluations, checkpoints and resuming, logging, devices."""
    p.add_argument("--save-pred", action="store_true", help="instance: also write the final predictions in the "
                   "Cityscapes instance-results format to OUT/pred (see save_cityscapes_instances)")
    p.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="also evaluate every N iterations (0: only at the end)")
    p.add_argument("--save-every", type=nonnegative_int, default=500,
                   help="write checkpoint.pt every N iterations (and at the end)")
    p.add_argument("--log-every", type=positive_int, default=20, help="iterations between log lines")
    p.add_argument("--stop-after", type=nonnegative_int, default=0, help="stop once global iteration N is done, after "
                   "writing checkpoint.pt, as an interruption would (for testing --resume); 0: run all --iters")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in the output folder; the "
                   "result equals an uninterrupted run")
    p.add_argument("--overwrite", action="store_true", help="redo even if metrics.json exists")
    p.add_argument("--force-resume", action="store_true", help="--resume even if the checkpoint's settings differ")
    p.add_argument("--workers", type=nonnegative_int, default=4,
                   help="data loader worker processes; 0 = in the main process")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda: auto picks CUDA when torch sees one, else CPU")
    add_parallel_args(p)
    p.add_argument("--no-amp", action="store_true", help="fp32 throughout (default: autocast, fp16 + GradScaler on "
                   "CUDA, bf16 on CPU; bf16 is much slower than fp32 on CPUs without bf16 units)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every random draw of the run (the subset, "
                   "the classifier's initialization, the batches and their augmentation)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (the log lines stay)")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.fold is not None and args.fold >= args.folds) or args.scale_range[0] > args.scale_range[1]:
        parser.error(f"need --fold < --folds ({args.fold}, {args.folds}) and --scale-range MIN <= MAX")
    try:
        return run_main(run, args, "finetune.py")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
