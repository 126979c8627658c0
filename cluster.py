"""Stage 5: unsupervised semantic segmentation by clustering the learned prototypes, and its evaluation.

Paper Sec 3.5 and Sec 4.1 (Table 1, Fig 2): the K prototypes of the dense SwAV model are L2-normalized and
grouped into C classes by agglomerative clustering (cosine distance, average linkage); every pixel takes the
cluster of its nearest prototype; clusters are matched one to one to ground-truth classes by the Hungarian
algorithm over the confusion matrix of the whole evaluation set; pixel accuracy, per-class IoU and mIoU are
reported. The metric functions here are the project's only ones (finetune.py imports them).

    swav_dense.py (WORK/swav/model.pt) -> cluster.py -> (finetune.py imports the metric functions)

| file                               | shape, dtype            | meaning                                            |
|------------------------------------|-------------------------|----------------------------------------------------|
| WORK/swav/model.pt (read; --model) | dict, state_dict        | backbone, FPN, head, projector, prototypes (K)     |
| DATA images + labelIds (read)      | uint8 (H, W, 3), (H, W) | Cityscapes layout, KITTI data_semantics, toy city  |
| WORK/cluster/assignment.npy        | int64 (K,)              | cluster id (0..C-1) of every prototype             |
| WORK/cluster/pred/<stem>.png       | uint8 (h, w)            | matched class per pixel, 255: unmatched cluster    |
| WORK/cluster/pred_color/<stem>.png | RGB                     | image, ground truth, prediction side by side       |
| WORK/cluster/pca/<stem>.png        | RGB                     | image, projections as RGB by a 3-component PCA     |
| WORK/cluster/metrics.json (last)   | JSON                    | protocol, matching, accuracy, per-class IoU, mIoU  |

Paper scale (Cityscapes val; KITTI's 200 labelled images; the PiCIE / STEGO protocol):
    python cluster.py --work runs/cityscapes --data CITYSCAPES --split val --save-pred --pca 8
    python cluster.py --work runs/cityscapes --data KITTI/data_semantics --dataset kitti
    python cluster.py --work runs/cityscapes --data CITYSCAPES --protocol picie
Tiny (toy city at its native size; it has 9 classes, so 9 clusters):
    python cluster.py --work runs/toy --data data/toycity --dataset toycity --clusters 9 --save-pred --no-amp

Protocols. cpcdr (this paper): the full frame resized to 768 x 384 (KITTI 1280 x 384, the toy city native),
labelIds mapped to the 19 trainIds by the official Cityscapes table, C = 19, Hungarian matching on -IoU.
picie (PiCIE / STEGO): labelIds 7..33 -> 27 classes, short side 320 then the 320 x 320 center crop, C = 27,
Hungarian matching maximizing the matched pixels.

Deviations from the released code, stated plainly
- The released evaluation keeps raw labelIds 0..18 as classes (void/flat/construction ids, so sky, person, car
  ... are dropped). Here labelIds are mapped to trainIds with the official table (others ignored, 255).
- Classes absent from the ground truth of the evaluated set are listed and left out of the mean.
- Predictions are scored at the protocol's label size (labels resized nearest), like the released code.
- The PCA images show the L2-normalized projections (the clustered space), one PCA over all shown images.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from depth import (BadInput, amp_dtype_for, atomic_write, list_frames, nonnegative_int, pick_device,
                   positive_int, record_settings, run_main, run_settings, seed_everything, split_file)
from swav_dense import HEAD_DIM, build_model, load_model

# ----------------------------------------------------------------------------------------------------------
# Paper constants and the official Cityscapes label table
# ----------------------------------------------------------------------------------------------------------
IGNORE = 255
CPCDR_SIZE = {"cityscapes": (384, 768), "kitti": (384, 1280), "toycity": None}  # (H, W); None = native size
PICIE_SIZE = 320                       # PiCIE / STEGO: short side 320, then a 320 x 320 center crop
PICIE_FIRST_LABEL_ID, PICIE_LAST_LABEL_ID = 7, 33   # PiCIE's 27 classes: labelIds 7..33
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (name, labelId, trainId, color) of cityscapesScripts/helpers/labels.py (MIT licence,
# https://github.com/mcordts/cityscapesScripts). trainId 255 = ignored. 'license plate' (id -1) never occurs
# in labelIds PNGs and is left out.
CITYSCAPES_LABELS = [
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
]
TRAIN_CLASSES = [name for name, _, train_id, _ in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if train_id != 255]
TRAIN_COLORS = [color for _, _, train_id, color in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if train_id != 255]
PICIE_CLASSES = [name for name, i, _, _ in CITYSCAPES_LABELS if PICIE_FIRST_LABEL_ID <= i <= PICIE_LAST_LABEL_ID]
PICIE_COLORS = [color for _, i, _, color in CITYSCAPES_LABELS if PICIE_FIRST_LABEL_ID <= i <= PICIE_LAST_LABEL_ID]


# ----------------------------------------------------------------------------------------------------------
# Label maps
# ----------------------------------------------------------------------------------------------------------
def labelids_to_trainids(label_ids):
    """Cityscapes labelIds -> the 19 trainIds (0..18) of the official table; every other id -> 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for _, label_id, train_id, _ in CITYSCAPES_LABELS:
        lut[label_id] = train_id
    return lut[np.asarray(label_ids, dtype=np.uint8)]


def labelids_to_picie(label_ids):
    """Cityscapes labelIds -> PiCIE's 27 classes: labelIds 7..33 -> 0..26; every other id -> 255."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[PICIE_FIRST_LABEL_ID:PICIE_LAST_LABEL_ID + 1] = np.arange(PICIE_LAST_LABEL_ID - PICIE_FIRST_LABEL_ID + 1)
    return lut[np.asarray(label_ids, dtype=np.uint8)]


# protocol -> (class names, their colors, labelIds -> class ids, the Hungarian matching's objective)
PROTOCOLS = {"cpcdr": (TRAIN_CLASSES, TRAIN_COLORS, labelids_to_trainids, "iou"),
             "picie": (PICIE_CLASSES, PICIE_COLORS, labelids_to_picie, "pixels")}


def colorize(class_map, colors):
    """(H, W) class ids -> (H, W, 3) uint8 with colors[c]; 255 (ignored / unmatched) -> black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:len(colors)] = np.asarray(colors, dtype=np.uint8)
    return palette[np.asarray(class_map, dtype=np.uint8)]


# ----------------------------------------------------------------------------------------------------------
# Sec 3.5: agglomerative clustering of the prototypes
# ----------------------------------------------------------------------------------------------------------
def cluster_prototypes(prototypes, num_clusters):
    """Agglomerative clustering of K prototypes into C clusters: cosine distance, average linkage (Sec 3.5).

    prototypes: (K, D) array (L2-normalized here). Returns int64 (K,) cluster ids 0..C-1, numbered in order of
    each cluster's first prototype. scipy's cut_tree undoes the tree's last C - 1 merges, which gives exactly C
    clusters even where merge heights tie (fcluster's 'maxclust' can then give fewer; cut_tree's known miscounts,
    scipy #8063, need a non-monotone tree, which average linkage is not); if K <= C every prototype is its own
    cluster (K clusters).
    """
    protos = np.asarray(prototypes, dtype=np.float64)
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a prototype is the zero vector: its cosine distance is undefined")
    if len(protos) <= num_clusters:
        return np.arange(len(protos), dtype=np.int64)
    tree = linkage(protos / norms, method="average", metric="cosine")  # (K-1, 4): merged ids a, b, height, size
    clusters = cut_tree(tree, n_clusters=num_clusters)[:, 0].astype(np.int64)
    if clusters.max() + 1 != num_clusters:
        raise RuntimeError(f"cut_tree gave {clusters.max() + 1} clusters, not {num_clusters}")
    return clusters


def assign_pixels(projections, prototypes, assignment, size, chunk=1 << 16):
    """Per pixel: the cluster of its nearest prototype (Sec 3.5).

    projections: (B, D, h, w) projector output; prototypes: (K, D); assignment: (K,) int64 cluster ids;
    size: (H, W) of the labels. The projections are bilinearly upsampled to (H, W) and L2-normalized, the
    nearest prototype is the one of largest cosine (prototypes L2-normalized). Returns (B, H, W) int64.
    """
    z = F.interpolate(projections.float(), size=tuple(size), mode="bilinear", align_corners=False)
    z = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*H*W, D)
    c = F.normalize(prototypes.float().to(z.device), dim=1)             # (K, D)
    nearest = torch.cat([(z[i:i + chunk] @ c.T).argmax(1) for i in range(0, len(z), chunk)])
    assignment = torch.as_tensor(assignment, device=z.device)
    return assignment[nearest].reshape(projections.shape[0], *size)


@torch.no_grad()
def cluster_image(model, image, prototypes, assignment, amp_dtype=None):
    """Sec 3.5 for one image: uint8 (H, W, 3) -> the cluster of every pixel, int64 (H, W) numpy, and the
    projector output (1, D, H/4, W/4). prototypes (K, D) on the model's device; amp_dtype: the network's
    autocast dtype (None: fp32)."""
    x = normalize_images(torch.from_numpy(image)[None].to(prototypes.device))
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        proj = model(x)
    return assign_pixels(proj, prototypes, assignment, image.shape[:2])[0].cpu().numpy(), proj


# ----------------------------------------------------------------------------------------------------------
# Sec 4.1: the metric (one implementation; finetune.py imports it)
# ----------------------------------------------------------------------------------------------------------
def confusion_matrix(pred, gt, num_pred, num_classes, ignore=IGNORE):
    """conf[p, g] = number of pixels predicted p (cluster or class) whose ground truth is g; int64 (P, N).

    Pixels with gt == ignore are left out. pred must be in 0..num_pred-1 and gt in 0..num_classes-1 elsewhere.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in size: {pred.shape} vs {gt.shape}")
    valid = gt != ignore
    pred, gt = pred[valid], gt[valid]
    if len(gt) and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth ids outside 0..{num_classes - 1} (and ignore {ignore}): {np.unique(gt)}")
    if len(pred) and (pred.min() < 0 or pred.max() >= num_pred):
        raise ValueError(f"predicted ids outside 0..{num_pred - 1}")
    return np.bincount(pred * num_classes + gt, minlength=num_pred * num_classes).reshape(num_pred, num_classes)


def iou_table(conf):
    """IoU of every (prediction p, class g) pair: conf[p, g] / (|pred p| + |gt g| - conf[p, g]); 0 where empty."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
    return np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)


def match_clusters(conf, objective="iou"):
    """Hungarian matching of clusters (rows of conf) to classes (columns), one to one.

    objective 'iou' (this paper): minimize -IoU summed over matched pairs; 'pixels' (PiCIE / STEGO): maximize
    the matched pixels. Returns int64 (P,) class of each cluster, 255 for clusters left unmatched (P > N).
    """
    if objective == "iou":
        gain = iou_table(conf)
    elif objective == "pixels":
        gain = np.asarray(conf, dtype=np.float64)
    else:
        raise ValueError(f"unknown matching objective {objective!r} (iou or pixels)")
    rows, cols = linear_sum_assignment(-gain)
    mapping = np.full(conf.shape[0], IGNORE, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def apply_matching(conf, mapping):
    """Cluster confusion (P, N) -> class confusion (N + 1, N): row c sums the clusters matched to class c,
    the last row the pixels of unmatched clusters (errors that predict no class)."""
    num_classes = conf.shape[1]
    rows = np.where(np.asarray(mapping) == IGNORE, num_classes, mapping)
    out = np.zeros((num_classes + 1, num_classes), dtype=np.int64)
    np.add.at(out, rows, np.asarray(conf, dtype=np.int64))
    return out


def segmentation_scores(conf):
    """Pixel accuracy, per-class IoU and mIoU from a class confusion matrix conf[pred, gt].

    conf: (N, N), or (N + extra, N) where rows past N are predictions of no class (apply_matching). Classes with
    no ground-truth pixel get IoU NaN, are listed in 'absent' and left out of the mean.
    Returns {"pixel_accuracy", "iou" (N,) float64, "miou", "present" (N,) bool, "absent" [class ids]}.
    """
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[1]
    if conf.shape[0] < n:
        raise ValueError(f"confusion matrix {conf.shape}: needs at least as many rows as classes")
    tp = np.diag(conf[:n])
    gt_total = conf.sum(0)
    pred_total = conf[:n].sum(1)
    present = gt_total > 0
    union = gt_total + pred_total - tp
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = conf.sum()
    return {"pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou,
            "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
            "present": present,
            "absent": [int(i) for i in np.flatnonzero(~present)]}


def pca_rgb(features, components=3):
    """(N, D) features -> (N, 3) colors in [0, 1]: projection on the top 3 principal components, each scaled
    to [0, 1] by its 1st and 99th percentile (Fig 2)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:components].T
    lo, hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
    return np.clip((y - lo) / np.maximum(hi - lo, 1e-12), 0, 1)


def pca_images(images, projections):
    """Fig 2: [image | its projections as RGB] for each image, by one PCA (pca_rgb) over all the images'
    projections, so that colors compare between images. images: uint8 (H, W, 3); projections: (D, h, w), each
    shown at its image's size (nearest). Returns uint8 (H, 2W, 3) panels."""
    if not images:
        return []
    rgb = (pca_rgb(np.concatenate([p.reshape(len(p), -1).T for p in projections])) * 255).astype(np.uint8)
    panels = []
    for image, p in zip(images, projections):
        tile, rgb = rgb[:p[0].size].reshape(*p.shape[1:], 3), rgb[p[0].size:]
        tile = Image.fromarray(tile).resize((image.shape[1], image.shape[0]), Image.NEAREST)
        panels.append(np.concatenate([image, np.asarray(tile)], axis=1))
    return panels


def scores_json(scores, classes):
    """The JSON form of segmentation_scores: accuracy, mIoU, IoU by class name (None where absent), absent names."""
    return {"pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"],
            "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, scores["iou"])},
            "absent_classes": [classes[i] for i in scores["absent"]]}


def print_scores(classes, scores):
    """The per-class IoU table, then pixel accuracy and mIoU (cluster.py and finetune.py print it)."""
    print(f"\n{'class':<16} {'IoU':>6}")
    for c, v in zip(classes, scores["iou"]):
        print(f"{c:<16} {'absent' if np.isnan(v) else f'{100 * v:6.2f}':>6}")
    absent = ", ".join(classes[i] for i in scores["absent"]) or "none"
    print(f"pixel accuracy {100 * scores['pixel_accuracy']:.2f}, mIoU {100 * scores['miou']:.2f} over "
          f"{int(scores['present'].sum())} classes present; absent from the ground truth: {absent}")


# ----------------------------------------------------------------------------------------------------------
# Input / output
# ----------------------------------------------------------------------------------------------------------
def list_eval_pairs(data, dataset, split):
    """[(stem, image path, labelIds path)] of an evaluation set, sorted by stem.

    cityscapes / toycity: DATA/leftImg8bit/SPLIT/*/*_leftImg8bit.png with gtFine/..._gtFine_labelIds.png;
    kitti: DATA (data_semantics) /SPLIT/image_2/*.png with SPLIT/semantic/*.png (Cityscapes labelIds).
    """
    if dataset == "kitti":
        folder = os.path.join(data, split, "image_2")
        names = sorted(f for f in os.listdir(folder) if f.endswith(".png")) if os.path.isdir(folder) else []
        if not names:
            raise FileNotFoundError(f"no KITTI images in {folder} (expected data_semantics/training/image_2)")
        pairs = [(os.path.splitext(f)[0], os.path.join(folder, f), os.path.join(data, split, "semantic", f))
                 for f in names]
    else:
        pairs = [(f.stem, f.path, split_file(data, "gtFine", split, f.stem, "gtFine_labelIds.png"))
                 for f in list_frames(data, "cityscapes", split)]
    missing = [lab for _, _, lab in pairs if not os.path.exists(lab)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} label files missing, e.g. {missing[0]}")
    return pairs


def read_pair(image_path, label_path, protocol="cpcdr", size=None):
    """(RGB uint8 (H, W, 3), labelIds uint8 (H, W)) of an image and its labelIds PNG, resized the protocol's way
    (image bilinear, labels nearest): cpcdr to size (H, W), None keeping the native size; picie short side
    PICIE_SIZE, then the centered PICIE_SIZE x PICIE_SIZE crop."""
    try:
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        with Image.open(label_path) as im:
            label = Image.fromarray(np.asarray(im))
    except OSError as e:  # PIL names no file
        raise BadInput(f"{image_path} or {label_path}: cannot read this image ({e})") from None
    if image.size != label.size:
        raise ValueError(f"{image_path} {image.size} and {label_path} {label.size} differ in size")
    if protocol == "picie":
        scale = PICIE_SIZE / min(image.size)
        new = (max(PICIE_SIZE, round(image.width * scale)), max(PICIE_SIZE, round(image.height * scale)))
        left, top = (new[0] - PICIE_SIZE) // 2, (new[1] - PICIE_SIZE) // 2
        box = (left, top, left + PICIE_SIZE, top + PICIE_SIZE)
        image, label = image.resize(new, Image.BILINEAR).crop(box), label.resize(new, Image.NEAREST).crop(box)
    elif size is not None:
        image, label = image.resize(size[::-1], Image.BILINEAR), label.resize(size[::-1], Image.NEAREST)
    return np.array(image), np.array(label)


def normalize_images(images):
    """uint8 (B, H, W, 3) tensor -> ImageNet-normalized float32 (B, 3, H, W)."""
    return TF.normalize(images.permute(0, 3, 1, 2).float().div(255), IMAGENET_MEAN, IMAGENET_STD)


def load_network(path, random_init, seed, device="cpu"):
    """The pre-trained network of swav_dense.py, or (random_init) a freshly initialized one of the same
    architecture and number of prototypes (Table 1's random baseline), on device in eval mode.
    Returns (model, checkpoint dict)."""
    model, ckpt = load_model(path)
    if random_init:
        torch.manual_seed(seed)
        fresh = build_model(ckpt["arch"], ckpt["num_prototypes"], ckpt.get("proj_dim", model.prototypes.in_channels),
                            ckpt.get("head_dim", HEAD_DIM))
        if {k: v.shape for k, v in model.state_dict().items()} != {k: v.shape for k, v in fresh.state_dict().items()}:
            raise ValueError(f"{path}: build_model(arch={ckpt['arch']!r}) does not rebuild this model's shapes; "
                             "cannot make a random network of the same architecture")
        model = fresh
    return model.to(device).eval(), ckpt


def output_folders(args):
    """(WORK/cluster or --out, its metrics.json) with the picture folders asked for; the settings are recorded
    there (metrics of other settings stop the run unless --overwrite) and stale temporaries removed."""
    out = args.out or os.path.join(args.work, "cluster")
    record_settings(out, run_settings(args), args.overwrite, "metrics.json")
    for folder in [""] + ["pred", "pred_color"] * args.save_pred + ["pca"] * (args.pca > 0):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    return out, os.path.join(out, "metrics.json")


def cluster_count(requested, default, model_path, num_prototypes):
    """C: --clusters, or the protocol's class count (capped by K in cluster_prototypes); above K is refused."""
    if requested and requested > num_prototypes:
        raise BadInput(f"--clusters {requested} is above the K = {num_prototypes} prototypes of {model_path}")
    return requested or default


# ----------------------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------------------
def run(args):
    """Cluster the prototypes, then every pixel of the evaluation set; match clusters to classes; score."""
    print("args: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    seed_everything(args.seed)
    device = pick_device(args.device)
    amp_dtype = amp_dtype_for(device, args.no_amp)
    print(f"device: {device}, autocast: {amp_dtype or 'off (fp32)'}")
    out, metrics_path = output_folders(args)
    if os.path.exists(metrics_path) and not args.overwrite:  # written last: its presence marks a finished run
        print(f"{metrics_path} exists; skipping (use --overwrite to redo)")
        return json.load(open(metrics_path))

    # ===== protocol, evaluation set, network and the clustering of its prototypes (Sec 3.5) =====
    classes, colors, to_classes, objective = PROTOCOLS[args.protocol]
    size = (PICIE_SIZE, PICIE_SIZE) if args.protocol == "picie" else tuple(args.size or ()) or CPCDR_SIZE[args.dataset]
    split = args.split or ("training" if args.dataset == "kitti" else "val")
    pairs = list_eval_pairs(args.data, args.dataset, split)
    model_path = args.model or os.path.join(args.work, "swav", "model.pt")
    model, ckpt = load_network(model_path, args.init_random, args.seed, device)
    prototypes = F.normalize(model.prototypes.weight.detach().float()[:, :, 0, 0], dim=1)  # (K, D)
    assignment = cluster_prototypes(prototypes.cpu().numpy(), cluster_count(args.clusters, len(classes), model_path,
                                                                            len(prototypes)))
    num_clusters = int(assignment.max()) + 1
    atomic_write(os.path.join(out, "assignment.npy"), lambda f: np.save(f, assignment))
    print(f"{model_path} ({ckpt['arch']}): K {len(prototypes)} -> {num_clusters} clusters; {len(pairs)} images")

    # ===== every pixel -> the cluster of its nearest prototype; confusion (clusters x classes) =====
    conf, kept, shown = np.zeros((num_clusters, len(classes)), dtype=np.int64), {}, []  # kept/shown: pictures
    for i, (stem, image_path, label_path) in enumerate(tqdm(pairs, desc="cluster", disable=args.no_progress or None)):
        image, label_ids = read_pair(image_path, label_path, args.protocol, size)
        clusters, proj = cluster_image(model, image, prototypes, assignment, amp_dtype)
        conf += confusion_matrix(clusters, to_classes(label_ids), num_clusters, len(classes))
        if args.save_pred:
            kept[stem] = (clusters.astype(np.uint8 if num_clusters < 256 else np.int32), image_path, label_path)
        if i < args.pca:
            shown.append((stem, image, F.normalize(proj.float(), dim=1)[0].cpu().numpy()))

    # ===== Hungarian matching and scores over the whole set (Sec 4.1) =====
    mapping = match_clusters(conf, objective)
    scores = segmentation_scores(apply_matching(conf, mapping))
    print_scores(classes, scores)
    metrics = {"protocol": args.protocol, "matching": objective, "dataset": args.dataset, "split": split,
               "size": list(size) if size else "native", "num_images": len(pairs), "model": model_path,
               "init": "random" if args.init_random else "pretrained", "arch": ckpt["arch"],
               "num_prototypes": int(len(prototypes)), "clusters": num_clusters, **scores_json(scores, classes),
               "mapping": [classes[m] if m != IGNORE else None for m in mapping], "confusion": conf.tolist()}

    # ===== pictures (--save-pred: class ids, 255 unmatched; image | ground truth | prediction), --pca =====
    for stem, (clusters, image_path, label_path) in kept.items():
        image, label_ids = read_pair(image_path, label_path, args.protocol, size)
        pred = mapping.astype(np.uint8)[clusters]
        panel = np.concatenate([image, colorize(to_classes(label_ids), colors), colorize(pred, colors)], axis=1)
        for folder, picture in (("pred", pred), ("pred_color", panel)):
            atomic_write(os.path.join(out, folder, f"{stem}.png"), lambda f: Image.fromarray(picture).save(f, "PNG"))
    for (stem, _, _), panel in zip(shown, pca_images([s[1] for s in shown], [s[2] for s in shown])):
        atomic_write(os.path.join(out, "pca", f"{stem}.png"), lambda f: Image.fromarray(panel).save(f, "PNG"))
    atomic_write(metrics_path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))  # last
    return metrics


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder shared by all stages (reads WORK/swav/model.pt, "
                   "writes WORK/cluster)")
    p.add_argument("--data", required=True, help="dataset root: Cityscapes layout (also the toy city) or KITTI "
                   "data_semantics")
    p.add_argument("--split", default=None, help="evaluation split (default: val, the paper's; KITTI: training, "
                   "its 200 labelled images)")
    p.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti", "toycity"],
                   help="layout and default size (toycity: the Cityscapes layout at its native size)")
    p.add_argument("--protocol", default="cpcdr", choices=list(PROTOCOLS),
                   help="cpcdr: this paper's (19 trainIds, full frame 768 x 384, Hungarian on -IoU); picie: "
                   "PiCIE / STEGO's (27 classes, 320 x 320 center crop, Hungarian on matched pixels)")
    p.add_argument("--size", nargs=2, type=positive_int, default=None, metavar=("H", "W"), help="cpcdr evaluation size "
                   "(default: the paper's 384 768 on Cityscapes, 384 1280 on KITTI; the toy city's native size); "
                   "picie always evaluates 320 x 320 crops")
    p.add_argument("--clusters", type=positive_int, default=None, help="number of clusters C (default: the protocol's "
                   "classes, 19 or 27, as the paper; the toy city has 9)")
    p.add_argument("--model", default=None, help="pre-trained model (default WORK/swav/model.pt); another "
                   "dataset's model evaluates across datasets")
    p.add_argument("--init-random", action="store_true", help="baseline: a randomly initialized network of the "
                   "model's architecture and number of prototypes through the same clustering")
    p.add_argument("--out", default=None, help="where the outputs go (default WORK/cluster)")
    p.add_argument("--save-pred", action="store_true", help="write the matched predictions (trainIds; picie: its "
                   "27 class ids), 255 unmatched, at the evaluated label size, and color panels")
    p.add_argument("--pca", type=nonnegative_int, default=0, metavar="N",
                   help="write the first N images' projections as RGB by a 3-component PCA (Fig 2)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda: auto picks CUDA when torch sees one, else CPU")
    p.add_argument("--no-amp", action="store_true", help="fp32 throughout (default: autocast, fp16 on CUDA, "
                   "bf16 on CPU; bf16 is much slower than fp32 on CPUs without bf16 units)")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of every random draw of the run (the --init-random network)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (the printed lines stay)")
    p.add_argument("--overwrite", action="store_true", help="redo even if metrics.json exists")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.size and args.protocol == "picie":
        parser.error("--size applies to --protocol cpcdr only (picie: short side 320, 320 x 320 center crop)")
    return run_main(run, args, "cluster.py")


if __name__ == "__main__":
    main()
