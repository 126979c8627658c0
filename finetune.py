"""Stage 6: supervised fine-tuning of the pre-trained network for semantic segmentation on a labelled fraction.

Paper Sec 4.2 and 4.3 (Tables 2-4): the backbone, FPN and semantic head pre-trained by swav_dense.py are
transferred (projector and prototypes dropped), a new 1x1 classifier and x4 bilinear upsampling are added, and
the whole network is trained with cross-entropy on a labelled set: Cityscapes train (fine annotations, 19
trainIds, evaluated on val), KITTI's 200 labelled images (5-fold cross-validation) or the toy city. The
ablations pre-train on the 2975 train images and fine-tune on 1/16 of them (`--fraction 0.0625`) for 6k
iterations. Scores come from cluster.py's metric code (one implementation): pixel accuracy, per-class IoU, mIoU.

    swav_dense.py (WORK/swav/model.pt) -> finetune.py        (cluster.py: the metric functions)

Reads / writes
| file                             | shape, dtype            | meaning                                       |
|----------------------------------|-------------------------|-----------------------------------------------|
| WORK/swav/model.pt (--init swav) | dict, state_dict        | backbone., fpn., head. transferred            |
| DATA images + gtFine labelIds    | uint8 (H, W, 3), (H, W) | Cityscapes layout (also the toy city), KITTI  |
| WORK/finetune/checkpoint.pt      | dict                    | model, optimiser, scaler, iteration, args     |
| WORK/finetune/model.pt           | dict                    | arch, model, args, num_classes, classes, init |
| WORK/finetune/metrics.json       | JSON                    | pixel accuracy, per-class IoU, mIoU (final)   |
| WORK/finetune/log.jsonl          | JSON lines              | training steps (loss, lr) and evaluations     |
(--out replaces WORK/finetune.)

Paper scale (one GPU, AMP):
    python finetune.py --work runs/cityscapes --data CITYSCAPES --init swav --fraction 0.0625 --iters 6000
    python finetune.py --work runs/cityscapes --data KITTI/data_semantics --dataset kitti --folds 5 --fold 0 \\
        --out runs/cityscapes/finetune_kitti_fold0
Tiny (toy city, CPU):
    python finetune.py --work runs/toy --data data/toycity --dataset toycity --init swav --fraction 0.25 \\
        --iters 60 --batch-size 4 --crop 96 192 --no-amp --workers 0          # about a minute on 2 cores

Choices where the paper is silent (its supplement, with the schedule, could not be found), stated plainly
- The schedule is common practice for the semantic-FPN head: SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly
  decay (power 0.9) per iteration, batch 8, random scale [0.5, 2], crop 384 x 768 (padded with ignore where the
  scaled image is smaller), horizontal flip, cross-entropy ignoring 255.
- Scales are relative to a base size, 384 x 768 for Cityscapes (the paper's working resolution everywhere;
  KITTI 384 x 1280; the toy city its native size; --size). Evaluation: the whole frame at the base size, logits
  bilinearly upsampled to the label's own resolution, confusion over the whole split.
- The classifier is a plain 1x1 convolution with PyTorch's default initialisation.
- KITTI folds: the labelled images sorted by name, permuted with --split-seed, dealt into --folds parts; run
  one fold per call (--fold i) and average the folds' metrics.json.
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cluster import (IGNORE, IMAGENET_MEAN, IMAGENET_STD, TRAIN_CLASSES, confusion_matrix, labelids_to_trainids,
                     list_eval_pairs, segmentation_scores)
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
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)  # image padding: 0 after ImageNet normalisation


# ----------------------------------------------------------------------------------------------------------
# Pure functions: schedule, subsets, batches, augmentation
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


def resize(image, label, size):
    """Image bilinear, label nearest, to size (H, W)."""
    h, w = size
    return (np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)),
            np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST)))


def random_scale_crop_flip(image, label, base_size, scale_range, crop, flip, rng):
    """Training augmentation: resize to base_size * s (s uniform in scale_range), pad (image with the ImageNet
    mean, label with 255) to at least the crop, random crop (H, W) = crop, horizontal flip with p 0.5.

    image uint8 (H, W, 3), label uint8 (H, W); rng: numpy Generator. Returns uint8 (ch, cw, 3), (ch, cw)."""
    s = rng.uniform(*scale_range)
    image, label = resize(image, label, (max(1, round(base_size[0] * s)), max(1, round(base_size[1] * s))))
    ch, cw = crop
    h, w = label.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = np.concatenate([image, np.broadcast_to(np.array(PAD_RGB, np.uint8), (ph, w, 3))], 0) if ph else image
        image = np.concatenate([image, np.broadcast_to(np.array(PAD_RGB, np.uint8), (h + ph, pw, 3))], 1) if pw \
            else image
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = label.shape
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image, label = image[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def normalize_images(images):
    """uint8 (B, H, W, 3) tensor -> ImageNet-normalised float32 (B, 3, H, W)."""
    x = images.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return (x - mean) / std


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
        """(B, 3, H, W) ImageNet-normalised -> (B, num_classes, H, W) logits."""
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


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def load_pair(image_path, label_path):
    """(RGB uint8 (H, W, 3), trainIds uint8 (H, W)) from an image and its Cityscapes labelIds PNG."""
    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(label_path) as lab:
        label = labelids_to_trainids(np.asarray(lab))
    if image.shape[:2] != label.shape:
        raise ValueError(f"{image_path} {image.shape[:2]} and {label_path} {label.shape} differ in size")
    return image, label


class TrainBatches(torch.utils.data.Dataset):
    """Item k = slot k % B of iteration start + k // B: an augmented crop whose image and randomness depend
    only on (seed, iteration, slot), so resuming reproduces an uninterrupted run exactly (any worker count)."""

    def __init__(self, pairs, start, iters, batch_size, seed, base_size, scale_range, crop, flip):
        self.pairs, self.start, self.iters, self.batch_size, self.seed = pairs, start, iters, batch_size, seed
        self.base_size, self.scale_range, self.crop, self.flip = base_size, scale_range, crop, flip

    def __len__(self):
        return (self.iters - self.start) * self.batch_size

    def __getitem__(self, k):
        iteration, slot = self.start + k // self.batch_size, k % self.batch_size
        index = batch_indices(iteration, self.batch_size, len(self.pairs), self.seed)[slot]
        image, label = load_pair(*self.pairs[index][1:])
        base = self.base_size or label.shape
        rng = np.random.default_rng([self.seed, iteration, slot, 1])
        image, label = random_scale_crop_flip(image, label, base, self.scale_range, self.crop, self.flip, rng)
        return torch.from_numpy(np.array(image)), torch.from_numpy(np.array(label))


def finetune_step(model, optimizer, scaler, images, labels, lr, amp_dtype=None):
    """One SGD step at learning rate lr on uint8 images (B, H, W, 3) and trainIds (B, H, W); autocast with
    amp_dtype (None: fp32), the loss in fp32, scaled by the GradScaler (enabled for fp16). Returns the loss;
    raises FloatingPointError, before any update, on a non-finite loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    x = normalize_images(images)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(x)  # (B, C, H, W)
    loss = segmentation_loss(logits, labels)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}: stopping")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


@torch.no_grad()
def evaluate_segmentation(model, pairs, size, device, amp_dtype=None, num_classes=len(TRAIN_CLASSES)):
    """Confusion over a labelled set: each whole frame resized to size (None = native), logits upsampled to
    the label's resolution, argmax. Returns (scores dict of cluster.segmentation_scores, confusion)."""
    was_training = model.training
    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _, image_path, label_path in pairs:
        image, label = load_pair(image_path, label_path)
        if size is not None:
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        x = normalize_images(torch.from_numpy(np.array(image))[None].to(device))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = F.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1)[0].cpu().numpy(), label, num_classes, num_classes)
    model.train(was_training)
    return segmentation_scores(conf), conf


def scores_json(scores, classes=TRAIN_CLASSES):
    return {"pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"],
            "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, scores["iou"])},
            "absent_classes": [classes[i] for i in scores["absent"]]}


# ----------------------------------------------------------------------------------------------------------
# Input / output, run
# ----------------------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def atomic_save(obj, path, saver=torch.save):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        saver(f, obj) if saver is np.save else saver(obj, f)
    os.replace(tmp, path)


def save_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def labelled_sets(args):
    """(train pairs, evaluation pairs) of (stem, image path, labelIds path) for the dataset, folds, subset."""
    train_split = args.train_split or ("training" if args.dataset == "kitti" else "train")
    if args.folds > 1:
        pairs = list_eval_pairs(args.data, args.dataset, train_split)
        by_stem = {p[0]: p for p in pairs}
        train_stems, held = kfold_split(list(by_stem), args.folds, args.fold, args.split_seed)
        train, val = [by_stem[s] for s in train_stems], [by_stem[s] for s in held]
    else:
        if args.dataset == "kitti":
            raise ValueError("KITTI has no labelled validation split: use --folds 5 --fold i")
        train = list_eval_pairs(args.data, args.dataset, train_split)
        val = list_eval_pairs(args.data, args.dataset, args.val_split)
    if args.subset:
        with open(args.subset) as f:
            wanted = [line.strip() for line in f if line.strip()]
        by_stem = {p[0]: p for p in train}
        missing = [s for s in wanted if s not in by_stem]
        if missing:
            raise ValueError(f"--subset {args.subset}: {len(missing)} stems not in the training set, e.g. {missing[0]}")
        train = [by_stem[s] for s in sorted(set(wanted))]
    elif args.fraction < 1:
        keep = set(select_fraction([p[0] for p in train], args.fraction, args.seed))
        train = [p for p in train if p[0] in keep]
    return train, val


def finetune_network(args):
    """The segmentation network, initialised by --init (swav: backbone, FPN and head of the pre-trained model;
    imagenet: the backbone; scratch: random). Returns (model, arch, head_dim)."""
    swav_path = args.swav_model or os.path.join(args.work, "swav", "model.pt")
    arch = args.arch
    if args.init == "swav":
        _, swav = load_model(swav_path)  # checks the file (a clear 'pre-train with swav_dense.py' error if absent)
        arch = arch or swav["arch"]
    arch = arch or "resnet50"
    head_dim = swav.get("head_dim", HEAD_DIM) if args.init == "swav" else HEAD_DIM
    model = SegmentationNet(arch, len(TRAIN_CLASSES), head_dim)
    if args.init == "swav":
        keys = transfer_swav_weights(model, swav, swav_path)
        print(f"--init swav: {len(keys)} tensors of backbone, FPN and head from {swav_path} (arch {arch})")
    elif args.init == "imagenet":
        load_backbone_weights(model.net, args.backbone_weights)
        print(f"--init imagenet: backbone from {args.backbone_weights}")
    return model, arch, head_dim


def resume_finetune(args, ckpt_path, log_path, model, optimizer, scaler, device):
    """With --resume and a checkpoint, restore it and return its iteration; otherwise start a fresh log at 0."""
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["iteration"]
        if ckpt["args"]["iters"] != args.iters:
            raise ValueError(f"{ckpt_path} was made with --iters {ckpt['args']['iters']}, now {args.iters}: "
                             "the poly schedule would differ")
        print(f"resumed {ckpt_path} at iteration {start}")
        return start
    if os.path.exists(log_path):
        os.remove(log_path)  # a fresh run starts a fresh log
    return 0


def save_finetune_checkpoint(ckpt_path, model, optimizer, scaler, iteration, args):
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "iteration": iteration, "args": vars(args)}, ckpt_path)


def append_finetune_log(log_path, record):
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def finetune_eval(model, val, base_size, device, amp_dtype, log_path, iteration):
    """Evaluate on the held-out pairs, log and print the scores; returns them."""
    scores, _ = evaluate_segmentation(model, val, base_size, device, amp_dtype)
    record = {"iteration": iteration, **scores_json(scores)}
    append_finetune_log(log_path, {"eval": True, **record})
    print(f"eval @ {iteration}: mIoU {100 * scores['miou']:.2f}, pixel accuracy "
          f"{100 * scores['pixel_accuracy']:.2f}")
    return scores


def train_finetune(model, optimizer, scaler, train, val, args, device, amp_dtype, base_size, out, start, stop):
    """Iterations start .. stop - 1: a log line every --log-every, checkpoints every --ckpt-every and
    evaluations every --eval-every (the final ones are the caller's)."""
    ckpt_path, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")
    loader = torch.utils.data.DataLoader(
        TrainBatches(train, start, stop, args.batch_size, args.seed, base_size, tuple(args.scale_range),
                     tuple(args.crop), args.flip),
        batch_size=args.batch_size, shuffle=False, num_workers=args.workers, drop_last=False,
        pin_memory=device.type == "cuda", persistent_workers=False)
    tick = time.time()
    bar = tqdm(total=args.iters, initial=start, desc="finetune", disable=None)
    for iteration, (images, labels) in enumerate(loader, start=start):
        lr = poly_lr(args.lr, iteration, args.iters, args.poly_power)
        loss = finetune_step(model, optimizer, scaler, images.to(device, non_blocking=True),
                             labels.to(device, non_blocking=True), lr, amp_dtype)
        bar.update(1)
        done = iteration + 1
        if done % args.log_every == 0 or done == stop:
            speed = (done - start) / (time.time() - tick)
            append_finetune_log(log_path, {"iteration": done, "loss": loss, "lr": lr, "it_per_s": speed})
            print(f"iter {done:6d}/{args.iters}  loss {loss:.4f}  lr {lr:.5f}  {speed:.2f} it/s  "
                  f"ETA {(args.iters - done) / max(speed, 1e-9) / 60:.1f} min", flush=True)
        if args.ckpt_every and done % args.ckpt_every == 0:
            save_finetune_checkpoint(ckpt_path, model, optimizer, scaler, done, args)
        if args.eval_every and done % args.eval_every == 0 and done < args.iters:
            finetune_eval(model, val, base_size, device, amp_dtype, log_path, done)
    bar.close()


def finetune_metrics(args, arch, train, val, base_size, scores):
    return {"init": args.init, "arch": arch, "dataset": args.dataset, "iters": args.iters,
            "train_images": len(train), "eval_images": len(val), "fraction": args.fraction,
            "subset": args.subset, "seed": args.seed, "folds": args.folds, "fold": args.fold,
            "eval_size": list(base_size) if base_size else "native", **scores_json(scores)}


def run(args):
    t0 = time.time()
    print("args: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    seed_everything(args.seed)
    device = pick_device(args.device)
    print(f"device: {device}")
    out = args.out or os.path.join(args.work, "finetune")
    os.makedirs(out, exist_ok=True)
    model_path, ckpt_path = os.path.join(out, "model.pt"), os.path.join(out, "checkpoint.pt")
    metrics_path, log_path = os.path.join(out, "metrics.json"), os.path.join(out, "log.jsonl")
    if os.path.exists(metrics_path) and not args.overwrite and not args.resume:
        print(f"{metrics_path} exists; skipping (use --overwrite to redo)")
        return json.load(open(metrics_path))

    train, val = labelled_sets(args)
    print(f"{len(train)} labelled training images, {len(val)} evaluation images")
    base_size = tuple(args.size) if args.size else BASE_SIZE[args.dataset]
    model, arch, head_dim = finetune_network(args)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = resume_finetune(args, ckpt_path, log_path, model, optimizer, scaler, device)

    stop = args.iters if not args.stop_after else min(args.iters, start + args.stop_after)
    train_finetune(model, optimizer, scaler, train, val, args, device, amp_dtype, base_size, out, start, stop)
    done = max(stop, start)
    save_finetune_checkpoint(ckpt_path, model, optimizer, scaler, done, args)
    if done < args.iters:
        print(f"stopped at iteration {done} of {args.iters} (--stop-after); continue with --resume")
        return None

    scores = finetune_eval(model, val, base_size, device, amp_dtype, log_path, done)
    atomic_save({"arch": arch, "model": model.state_dict(), "args": vars(args), "num_classes": len(TRAIN_CLASSES),
                 "classes": TRAIN_CLASSES, "head_dim": head_dim, "init": args.init}, model_path)
    metrics = finetune_metrics(args, arch, train, val, base_size, scores)
    save_json(metrics, metrics_path)
    print(f"\n{'class':<16} {'IoU':>6}")
    for c, v in metrics["iou"].items():
        print(f"{c:<16} {'absent' if v is None else f'{100 * v:6.2f}':>6}")
    print(f"pixel accuracy {100 * scores['pixel_accuracy']:.2f}, mIoU {100 * scores['miou']:.2f}; "
          f"wrote {metrics_path}, {model_path} in {time.time() - t0:.1f} s")
    return metrics


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder (reads WORK/swav/model.pt, writes WORK/finetune)")
    p.add_argument("--data", required=True, help="dataset root: Cityscapes layout (also the toy city) or KITTI "
                   "data_semantics")
    p.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti", "toycity"])
    p.add_argument("--out", default=None, help="output folder (default WORK/finetune)")
    p.add_argument("--init", default="swav", choices=["swav", "scratch", "imagenet"],
                   help="swav: WORK/swav/model.pt (projector, prototypes dropped); scratch: random; imagenet: "
                   "--backbone-weights FILE (Table 2 rows)")
    p.add_argument("--swav-model", default=None, help="pre-trained model (default WORK/swav/model.pt)")
    p.add_argument("--backbone-weights", default=None, help="local torchvision ResNet state_dict (--init imagenet)")
    p.add_argument("--arch", default=None, help="ResNet (default: the swav model's; resnet50 otherwise)")
    p.add_argument("--train-split", default=None, help="labelled split (default train; KITTI training)")
    p.add_argument("--val-split", default="val", help="evaluation split (Cityscapes val; not with --folds)")
    p.add_argument("--fraction", type=float, default=1.0, help="labelled fraction of the training split, a "
                   "deterministic subset by --seed (ablations: 1/16 = 0.0625)")
    p.add_argument("--subset", default=None, help="file of training stems, one a line (replaces --fraction)")
    p.add_argument("--folds", type=int, default=1, help="k-fold cross-validation of the training split (KITTI: 5)")
    p.add_argument("--fold", type=int, default=0, help="the held-out fold of this run (0..folds-1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split (keep it across runs)")
    p.add_argument("--iters", type=int, default=ABLATION_ITERS, help="iterations (ablations: 6000)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR, help="SGD learning rate (poly-decayed per iteration)")
    p.add_argument("--momentum", type=float, default=MOMENTUM)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--poly-power", type=float, default=POLY_POWER)
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"), help="base size the scales "
                   "refer to and evaluation size (default 384 768 Cityscapes, 384 1280 KITTI, native toy city)")
    p.add_argument("--scale-range", nargs=2, type=float, default=list(SCALE_RANGE), metavar=("MIN", "MAX"),
                   help="random scale range (1 1 turns it off)")
    p.add_argument("--crop", nargs=2, type=int, default=list(CROP), metavar=("H", "W"), help="training crop")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N iterations (and at the end)")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N iterations (and at the end)")
    p.add_argument("--log-every", type=int, default=20, help="log line every N iterations")
    p.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after N iterations of "
                   "this run, e.g. to fit a job's time limit; continue with --resume")
    p.add_argument("--resume", action="store_true", help="continue from WORK/finetune/checkpoint.pt exactly")
    p.add_argument("--overwrite", action="store_true", help="redo even if metrics.json exists")
    p.add_argument("--workers", type=int, default=4, help="data loader processes (0: in the main process)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 (default autocast: fp16 + "
                   "GradScaler on CUDA, bf16 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, the initialisation and the batches")
    return p


def main():
    run(get_args_parser().parse_args())


if __name__ == "__main__":
    main()
