"""Stage 6: supervised fine-tuning of the pre-trained network for semantic segmentation on a labelled fraction.

Paper Sec 4.2 and 4.3 (Tables 2-4): the backbone, FPN and semantic head pre-trained by swav_dense.py are
transferred (projector and prototypes dropped), a new 1x1 classifier and x4 bilinear upsampling are added, and
the whole network is trained with cross-entropy on a labelled set: Cityscapes train (fine annotations, 19
trainIds, evaluated on val), KITTI's 200 labelled images (5-fold cross-validation) or the toy city. The
ablations pre-train on the 2975 train images and fine-tune on 1/16 of them (`--fraction 0.0625`) for 6k
iterations. Scores come from cluster.py's metric code (one implementation): pixel accuracy, per-class IoU, mIoU.

    swav_dense.py (WORK/swav/model.pt) -> finetune.py        (cluster.py: the metric functions)

| file                             | shape, dtype            | meaning                                       |
|----------------------------------|-------------------------|-----------------------------------------------|
| WORK/swav/model.pt (--init swav) | dict, state_dict        | backbone., fpn., head. transferred            |
| DATA images + gtFine labelIds    | uint8 (H, W, 3), (H, W) | Cityscapes layout (also the toy city), KITTI  |
| WORK/finetune/checkpoint.pt      | dict                    | model, optimizer, scaler, iteration, args     |
| WORK/finetune/model.pt           | dict                    | arch, model, args, num_classes, classes, init |
| WORK/finetune/metrics.json       | JSON                    | pixel accuracy, per-class IoU, mIoU (final)   |
| WORK/finetune/log.jsonl          | JSON lines              | training steps (loss, lr) and evaluations     |

Paper scale (one GPU, AMP):
    python finetune.py --work runs/cityscapes --data CITYSCAPES --init swav --fraction 0.0625 --iters 6000
    python finetune.py --work runs/cityscapes --data KITTI/data_semantics --dataset kitti --folds 5 --fold 0 \\
        --out runs/cityscapes/finetune_kitti_fold0
Tiny (toy city, CPU; about a minute on 2 cores):
    python finetune.py --work runs/toy --data data/toycity --dataset toycity --init swav --fraction 0.25 \\
        --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0

Choices where the paper is silent (its supplement, with the schedule, could not be found), stated plainly
- The schedule is common practice for the semantic-FPN head: SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly
  decay (power 0.9) per iteration, batch 8, random scale [0.5, 2], crop 384 x 768 (padded with ignore where the
  scaled image is smaller), horizontal flip, cross-entropy ignoring 255.
- Scales are relative to a base size, 384 x 768 for Cityscapes (the paper's working resolution everywhere;
  KITTI 384 x 1280; the toy city its native size; --size). Evaluation: the whole frame at the base size, logits
  bilinearly upsampled to the label's own resolution, confusion over the whole split.
- The classifier is a plain 1x1 convolution with PyTorch's default initialization.
- KITTI folds: the labelled images sorted by name, permuted with --split-seed, dealt into --folds parts; run
  one fold per call (--fold i) and average the folds' metrics.json.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cluster import (IGNORE, IMAGENET_MEAN, TRAIN_CLASSES, confusion_matrix, labelids_to_trainids, list_eval_pairs,
                     normalize_images, print_scores, read_pair, scores_json, segmentation_scores)
from depth import add_parallel_args, amp_dtype_for, atomic_write, seed_everything, setup_distributed, wrap_ddp
from swav_dense import HEAD_DIM, build_model, load_backbone_weights, load_model

# ----------------------------------------------------------------------------------------------------------
# Constants (common practice for the semantic-FPN head; the paper's supplement is unavailable)
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Pure functions: schedule, subsets, batches, augmentation, loss
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------
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


def segmentation_network(args):
    """The network of a Table 2 row, by --init: swav (backbone, FPN and head of swav_dense.py's model.pt, --arch
    defaulting to its own), imagenet (--backbone-weights, a local torchvision ResNet state_dict, for the
    backbone) or scratch (PyTorch's default initialization); a new 1x1 classifier in every case."""
    swav_path = args.swav_model or os.path.join(args.work, "swav", "model.pt")
    swav = load_model(swav_path)[1] if args.init == "swav" else {}  # a missing file: an error naming swav_dense.py
    arch, head_dim = args.arch or swav.get("arch", "resnet50"), swav.get("head_dim", HEAD_DIM)
    model = SegmentationNet(arch, len(TRAIN_CLASSES), head_dim)
    if args.init == "swav":
        print(f"--init swav: {len(transfer_swav_weights(model, swav, swav_path))} tensors from {swav_path}")
    elif args.init == "imagenet":
        load_backbone_weights(model.net, args.backbone_weights)
    return model


def restore_checkpoint(path, iters, **parts):
    """--resume: restore every part (model=, optimizer=, scaler=) from checkpoint.pt's state_dict of that name and
    return its iteration; 0 when there is no checkpoint yet. A checkpoint of another --iters (another poly
    schedule) is refused: the resumed run would not equal an uninterrupted one."""
    if not os.path.exists(path):
        return 0
    ckpt = torch.load(path, map_location="cpu")
    if ckpt["args"]["iters"] != iters:
        raise ValueError(f"{path} was made with --iters {ckpt['args']['iters']}, now {iters}: the poly schedule "
                         "would differ")
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    print(f"resumed {path} at iteration {ckpt['iteration']}")
    return ckpt["iteration"]


def model_file(model, args):
    """finetune.py's model.pt: a plain dict with all that rebuilds the network (SegmentationNet(arch,
    num_classes, head_dim), then load_state_dict(model))."""
    return {"arch": model.arch, "model": model.state_dict(), "args": vars(args), "num_classes": len(TRAIN_CLASSES),
            "classes": TRAIN_CLASSES, "head_dim": model.classifier.in_channels, "init": args.init}


# ----------------------------------------------------------------------------------------------------------
# Data, training step, evaluation
# ----------------------------------------------------------------------------------------------------------
def labelled_sets(args):
    """(train pairs, evaluation pairs) of (stem, image path, labelIds path): the split or --folds' fold, then
    the --subset file's stems or a --fraction of the training pairs."""
    train_split = args.train_split or ("training" if args.dataset == "kitti" else "train")
    if args.folds > 1:
        by_stem = {p[0]: p for p in list_eval_pairs(args.data, args.dataset, train_split)}
        train_stems, held = kfold_split(list(by_stem), args.folds, args.fold, args.split_seed)
        train, val = [by_stem[s] for s in train_stems], [by_stem[s] for s in held]
    elif args.dataset == "kitti":
        raise ValueError("KITTI has no labelled validation split: use --folds 5 --fold i")
    else:
        train = list_eval_pairs(args.data, args.dataset, train_split)
        val = list_eval_pairs(args.data, args.dataset, args.val_split)
    if args.subset:
        with open(args.subset) as f:
            wanted = sorted({line.strip() for line in f if line.strip()})
        by_stem = {p[0]: p for p in train}
        missing = [s for s in wanted if s not in by_stem]
        if missing:
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
    Returns the loss; raises FloatingPointError, before any update, on a non-finite loss. torchrun (world > 1,
    model in DDP): the mean over the labelled pixels of all processes, its gradient equal to one process's."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = next(model.parameters()).device
    x, labels = normalize_images(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x)  # (B, C, H, W)
    loss = segmentation_loss(logits, labels)
    if world > 1:  # this process's share of the global mean, x world as DDP averages the gradients
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


@torch.no_grad()
def evaluate_segmentation(model, pairs, size, device, amp_dtype=None, num_classes=len(TRAIN_CLASSES)):
    """Scores (cluster.segmentation_scores) over a labelled set: each whole frame resized to size (None =
    native), logits bilinearly upsampled to the label's resolution, argmax, one confusion over the set."""
    modes = {m: m.training for m in model.modules()}  # restored after (--freeze-bn's BatchNorms stay in eval)
    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _, image_path, label_path in pairs:
        image, label_ids = read_pair(image_path, label_path)
        if size is not None:
            image = np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(normalize_images(torch.from_numpy(image)[None].to(device)))
        logits = F.interpolate(logits.float(), size=label_ids.shape, mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1)[0].cpu().numpy(), labelids_to_trainids(label_ids), num_classes,
                                 num_classes)
    for m, mode in modes.items():  # parents before children: each module ends in its own mode
        m.train(mode)
    return segmentation_scores(conf)


# ----------------------------------------------------------------------------------------------------------
# Training, one function top to bottom (Sec 4.2): data, model, optimizer, resume, loop (log lines, checkpoints,
# evaluations), model.pt, metrics.json
# ----------------------------------------------------------------------------------------------------------
def run(args):
    rank, world, device = setup_distributed(args.device)  # torchrun: rank 0 of `world` prints and writes
    say = print if rank == 0 else lambda *a, **k: None
    say("args: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    seed_everything(args.seed)
    amp_dtype = amp_dtype_for(device, args.no_amp, args.amp_dtype)
    out = args.out or os.path.join(args.work, "finetune")
    ckpt_path, log_path, metrics_path = (os.path.join(out, f) for f in ("checkpoint.pt", "log.jsonl", "metrics.json"))
    if os.path.exists(metrics_path) and not args.overwrite and not args.resume:
        say(f"{metrics_path} exists; skipping (use --overwrite to redo)")
        return json.load(open(metrics_path))
    os.makedirs(out, exist_ok=True)

    # ===== data =====
    train, val = labelled_sets(args)
    base_size = tuple(args.size) if args.size else BASE_SIZE[args.dataset]
    say(f"device {device} x {world}, autocast {amp_dtype}; {len(train)} labelled training images, {len(val)} evaluation images")

    # ===== model (a Table 2 row's initialization), optimizer (SGD, poly decay), GradScaler (fp16) =====
    ddp_model = wrap_ddp(segmentation_network(args).to(device), args, device, world)  # --freeze-bn, DDP
    model = getattr(ddp_model, "module", ddp_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ===== resume, then loop over iterations start .. stop - 1 (--stop-after: a global iteration) =====
    parts = {"model": model, "optimizer": optimizer, "scaler": scaler}  # what checkpoint.pt holds, with iteration, args
    start = restore_checkpoint(ckpt_path, args.iters, **parts) if args.resume else 0
    stop, tick, scores = min(args.iters, args.stop_after or args.iters), time.time(), None
    loader = torch.utils.data.DataLoader(TrainBatches(train, start, stop, base_size, args, rank, world), batch_size=args.batch_size,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    with open(log_path if rank == 0 else os.devnull, "a" if start else "w", buffering=1) as log:  # fresh run, fresh log
        bar = tqdm(loader, desc="finetune", initial=start, total=args.iters, disable=args.no_progress or rank or None)
        for iteration, (images, labels) in enumerate(bar, start=start):
            lr = poly_lr(args.lr, iteration, args.iters, args.poly_power)
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
                scores = evaluate_segmentation(model, val, base_size, device, amp_dtype)
                log.write(json.dumps({"eval": True, "iteration": done, **scores_json(scores, TRAIN_CLASSES)}) + "\n")
                bar.write(f"eval {done}: mIoU {100 * scores['miou']:.2f}, acc {100 * scores['pixel_accuracy']:.2f}")
    if stop < args.iters or rank > 0:  # --stop-after: checkpoint.pt is written, as an interruption would leave it
        say(f"stopped after iteration {stop} of {args.iters}; continue with --resume")
        return None

    # ===== save: model.pt, then metrics.json =====
    scores = scores or evaluate_segmentation(model, val, base_size, device, amp_dtype)  # resumed at the very end
    atomic_write(os.path.join(out, "model.pt"), lambda f: torch.save(model_file(model, args), f))
    metrics = {"init": args.init, "arch": model.arch, "dataset": args.dataset, "iters": args.iters,
               "train_images": len(train), "eval_images": len(val), "fraction": args.fraction, "subset": args.subset,
               "seed": args.seed, "folds": args.folds, "fold": args.fold,
               "eval_size": list(base_size) if base_size else "native", **scores_json(scores, TRAIN_CLASSES)}
    atomic_write(metrics_path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    print_scores(TRAIN_CLASSES, scores)
    return metrics


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder shared by all stages (reads WORK/swav/model.pt, "
                   "writes WORK/finetune)")
    p.add_argument("--data", required=True, help="dataset root: Cityscapes layout (also the toy city) or KITTI "
                   "data_semantics")
    p.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti", "toycity"],
                   help="layout, base size and splits (kitti: no validation split, use --folds 5)")
    p.add_argument("--out", default=None, help="where the outputs go (default WORK/finetune)")
    p.add_argument("--init", default="swav", choices=["swav", "scratch", "imagenet"],
                   help="Table 2's rows: swav, WORK/swav/model.pt (projector, prototypes dropped); scratch, random; "
                   "imagenet, --backbone-weights FILE for the backbone")
    p.add_argument("--swav-model", default=None, help="pre-trained model (default WORK/swav/model.pt)")
    p.add_argument("--backbone-weights", default=None, help="local torchvision ResNet state_dict (--init imagenet; "
                   "nothing is downloaded)")
    p.add_argument("--arch", default=None, help="ResNet (default: the swav model's; else resnet50, the paper's)")
    p.add_argument("--train-split", default=None, help="labelled split (default train; KITTI training)")
    p.add_argument("--val-split", default="val", help="evaluation split (Cityscapes val, the paper's; not with "
                   "--folds)")
    p.add_argument("--fraction", type=float, default=1.0, help="labelled fraction of the training split, a "
                   "deterministic subset by --seed (the paper's ablations: 1/16 = 0.0625)")
    p.add_argument("--subset", default=None, help="file of training stems, one a line (replaces --fraction)")
    p.add_argument("--folds", type=int, default=1, help="k-fold cross-validation of the training split (KITTI: 5, "
                   "as the paper)")
    p.add_argument("--fold", type=int, default=0, help="the held-out fold of this run (0..folds-1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split (keep it across the folds' runs)")
    p.add_argument("--iters", type=int, default=ABLATION_ITERS, help="iterations (the paper's ablations: 6000)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="crops per iteration (8: common practice for "
                   "the semantic-FPN head; the paper does not say)")
    p.add_argument("--lr", type=float, default=LR, help="SGD learning rate, poly-decayed per iteration (0.01: common "
                   "practice)")
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="SGD momentum (0.9: common practice)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="SGD weight decay (1e-4: common "
                   "practice)")
    p.add_argument("--poly-power", type=float, default=POLY_POWER, help="poly decay power (0.9: common practice)")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"), help="base size the scales "
                   "refer to, and the evaluation size (default: the paper's 384 768 on Cityscapes, 384 1280 on "
                   "KITTI; the toy city's native size)")
    p.add_argument("--scale-range", nargs=2, type=float, default=list(SCALE_RANGE), metavar=("MIN", "MAX"),
                   help="random scale range (0.5 2: common practice; 1 1 turns scaling off)")
    p.add_argument("--crop", nargs=2, type=int, default=list(CROP), metavar=("H", "W"), help="training crop "
                   "(384 768: the paper's working resolution)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N iterations (0: only at the end)")
    p.add_argument("--save-every", type=int, default=500, help="write checkpoint.pt every N iterations (and at the "
                   "end)")
    p.add_argument("--log-every", type=int, default=20, help="iterations between log lines")
    p.add_argument("--stop-after", type=int, default=0, help="stop once global iteration N is done, after writing "
                   "checkpoint.pt, as an interruption would (for testing --resume); 0: run all --iters")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.pt in the output folder; the "
                   "result equals an uninterrupted run")
    p.add_argument("--overwrite", action="store_true", help="redo even if metrics.json exists")
    p.add_argument("--workers", type=int, default=4, help="data loader worker processes; 0 = in the main process")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda: auto picks CUDA when torch sees one, else CPU")
    add_parallel_args(p)
    p.add_argument("--no-amp", action="store_true", help="fp32 throughout (default: autocast, fp16 + GradScaler on "
                   "CUDA, bf16 on CPU; bf16 is much slower than fp32 on CPUs without bf16 units)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run (the subset, the "
                   "classifier's initialization, the batches and their augmentation)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (the log lines stay)")
    return p


def main():
    run(get_args_parser().parse_args())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
