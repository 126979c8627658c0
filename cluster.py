"""Stage 5: unsupervised semantic segmentation by clustering the learned prototypes, and its evaluation.

Paper Sec 3.5 and Sec 4.1 (Table 1, Fig 2): the K prototypes of the dense SwAV model are L2-normalised and
grouped into C classes by agglomerative clustering (cosine distance, average linkage); every pixel takes the
cluster of its nearest prototype; clusters are matched to ground-truth classes with the Hungarian algorithm
over the confusion matrix of the whole evaluation set; pixel accuracy, per-class IoU and mIoU are reported.
This file also holds the one metric implementation (confusion matrix, matching, scores) that finetune.py
imports.

    swav_dense.py (WORK/swav/model.pt) -> cluster.py -> (finetune.py imports the metric functions)

Reads / writes
| file                                   | shape, dtype            | meaning                                          |
|----------------------------------------|-------------------------|--------------------------------------------------|
| WORK/swav/model.pt (read; --model)     | dict, state_dict        | backbone, FPN, head, projector, prototypes (K)   |
| DATA images + labelIds (read)          | uint8 (H, W, 3), (H, W) | Cityscapes layout, KITTI data_semantics, toy city |
| WORK/cluster/assignment.npy            | int64 (K,)              | cluster id (0..C-1) of every prototype           |
| WORK/cluster/metrics.json              | JSON                    | protocol, matching, accuracy, per-class IoU, mIoU |
| WORK/cluster/pred/<stem>.png           | uint8 (h, w)            | matched class per pixel, 255: unmatched cluster  |
| WORK/cluster/pred_color/<stem>.png     | RGB                     | image, ground truth, prediction side by side     |
| WORK/cluster/pca/<stem>.png            | RGB                     | projections as RGB by a 3-component PCA (Fig 2)  |
(--out replaces WORK/cluster.)

Paper scale (Cityscapes val, 768 x 384, 19 trainIds, Hungarian on -IoU):
    python cluster.py --work runs/cityscapes --data CITYSCAPES --split val --save-pred --pca 8
    python cluster.py --work runs/cityscapes --data KITTI/data_semantics --dataset kitti     # Table 1, KITTI
    python cluster.py --work runs/cityscapes --data CITYSCAPES --protocol picie             # PiCIE / STEGO protocol
Tiny (toy city at its native size; it has 9 classes, so 9 clusters):
    python cluster.py --work runs/toy --data data/toycity --dataset toycity --clusters 9 --save-pred

Protocols
- cpcdr (this paper): full frame resized to 768 x 384 (KITTI 1280 x 384; the toy city keeps its native size
  unless --size is given), labelIds mapped to the 19 trainIds with the official Cityscapes table, C = 19,
  Hungarian matching with cost -IoU.
- picie (PiCIE / STEGO): labelIds 7..33 -> 27 classes, short side resized to 320 then a 320 x 320 centre crop,
  C = 27, Hungarian matching maximising the matched pixels.

Deviations from the released code, stated plainly
- The released evaluation keeps raw labelIds 0..18 as classes (void/flat/construction ids, so sky, person, car
  ... are dropped). Here labelIds are mapped to trainIds with the official table (others ignored, 255).
- Classes absent from the ground truth of the evaluated set are listed and left out of the mean.
- Predictions are evaluated at the resized label resolution of the protocol (768 x 384 for cpcdr), like the
  released code; labels are resized with nearest neighbour.
- The PCA images use the L2-normalised projections (the space that is clustered), one PCA fitted over all
  the shown images so that colours are comparable between them.
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from scipy.cluster.hierarchy import linkage
from scipy.optimize import linear_sum_assignment

from depth import image_stem, list_split_images, split_file
from swav_dense import HEAD_DIM, PROJ_DIM, build_model, load_model

# ----------------------------------------------------------------------------------------------------------
# Paper constants and the official Cityscapes label table
# ----------------------------------------------------------------------------------------------------------
IGNORE = 255
CPCDR_SIZE = {"cityscapes": (384, 768), "kitti": (384, 1280), "toycity": None}  # (H, W); None = native size
PICIE_SIZE = 320                       # PiCIE / STEGO: short side 320, then a 320 x 320 centre crop
PICIE_FIRST_LABEL_ID, PICIE_LAST_LABEL_ID = 7, 33   # PiCIE's 27 classes: labelIds 7..33
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (name, labelId, trainId, colour) of cityscapesScripts/helpers/labels.py (MIT licence,
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

    prototypes: (K, D) array (L2-normalised here). Returns int64 (K,) cluster ids 0..C-1, numbered in order of
    each cluster's first prototype. The tree is cut after its first K - C merges, which gives exactly C clusters
    even where merge heights tie (scipy's fcluster 'maxclust' can then return fewer); if K < C every prototype
    is its own cluster (K clusters).
    """
    protos = np.asarray(prototypes, dtype=np.float64)
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a prototype is the zero vector: its cosine distance is undefined")
    protos = protos / norms
    k = len(protos)
    if k <= num_clusters:
        return np.arange(k, dtype=np.int64)
    tree = linkage(protos, method="average", metric="cosine")  # (K-1, 4): merged ids a, b, height, size
    # union-find over the first K - C merges; node K + i is the cluster made by merge i
    parent = np.arange(2 * k - 1)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k - num_clusters):
        a, b = int(tree[i, 0]), int(tree[i, 1])
        parent[root(a)] = k + i
        parent[root(b)] = k + i
    roots = np.array([root(i) for i in range(k)])
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # renumber clusters by their first prototype
    return order[inverse].astype(np.int64)


def assign_pixels(projections, prototypes, assignment, size, chunk=1 << 16):
    """Per pixel: the cluster of its nearest prototype (Sec 3.5).

    projections: (B, D, h, w) projector output; prototypes: (K, D); assignment: (K,) int64 cluster ids;
    size: (H, W) of the labels. The projections are bilinearly upsampled to (H, W) and L2-normalised, the
    nearest prototype is the one of largest cosine (prototypes L2-normalised). Returns (B, H, W) int64.
    """
    z = F.interpolate(projections.float(), size=tuple(size), mode="bilinear", align_corners=False)
    z = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*H*W, D)
    c = F.normalize(prototypes.float().to(z.device), dim=1)             # (K, D)
    nearest = torch.cat([(z[i:i + chunk] @ c.T).argmax(1) for i in range(0, len(z), chunk)])
    assignment = torch.as_tensor(assignment, device=z.device)
    return assignment[nearest].reshape(projections.shape[0], *size)


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

    objective 'iou' (this paper): minimise -IoU summed over matched pairs; 'pixels' (PiCIE / STEGO): maximise
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
    """(N, D) features -> (N, 3) colours in [0, 1]: projection on the top 3 principal components, each scaled
    to [0, 1] by its 1st and 99th percentile (Fig 2)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:components].T
    lo, hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
    return np.clip((y - lo) / np.maximum(hi - lo, 1e-12), 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Input / output
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


def read_rgb(path):
    """RGB uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


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
        pairs = [(image_stem(p), p, split_file(data, "gtFine", split, image_stem(p), "gtFine_labelIds.png"))
                 for p in list_split_images(data, split)]
    missing = [lab for _, _, lab in pairs if not os.path.exists(lab)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} label files missing, e.g. {missing[0]}")
    return pairs


def resize_pair(image, label_ids, protocol, size):
    """Resize an image (bilinear, antialiased) and its labelIds (nearest) the protocol's way.

    cpcdr: to size (H, W) (None keeps the native size); picie: short side PICIE_SIZE, centre crop square.
    """
    img, lab = Image.fromarray(image), Image.fromarray(label_ids)
    if protocol == "picie":
        w, h = img.size
        scale = PICIE_SIZE / min(h, w)
        new = (max(PICIE_SIZE, round(w * scale)), max(PICIE_SIZE, round(h * scale)))
        img, lab = img.resize(new, Image.BILINEAR), lab.resize(new, Image.NEAREST)
        left, top = (new[0] - PICIE_SIZE) // 2, (new[1] - PICIE_SIZE) // 2
        box = (left, top, left + PICIE_SIZE, top + PICIE_SIZE)
        img, lab = img.crop(box), lab.crop(box)
    elif size is not None:
        img, lab = img.resize((size[1], size[0]), Image.BILINEAR), lab.resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(img), np.asarray(lab)


def to_tensor(image):
    """uint8 (H, W, 3) -> ImageNet-normalised float32 (1, 3, H, W)."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x[None]


def save_png(array, path):
    tmp = path + ".tmp.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def save_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_network(path, random_init, seed):
    """The pre-trained network of swav_dense.py, or (random_init) a freshly initialised one of the same
    architecture and number of prototypes. Returns (model, checkpoint dict)."""
    model, ckpt = load_model(path)
    if random_init:
        torch.manual_seed(seed)
        fresh = build_model(ckpt["arch"], ckpt["num_prototypes"], ckpt.get("proj_dim", PROJ_DIM),
                            ckpt.get("head_dim", HEAD_DIM))
        want = {k: v.shape for k, v in model.state_dict().items()}
        got = {k: v.shape for k, v in fresh.state_dict().items()}
        if want != got:
            raise ValueError(f"{path}: build_model(arch={ckpt['arch']!r}) does not rebuild this model's shapes; "
                             "cannot make a random network of the same architecture")
        model = fresh
    return model, ckpt


# ----------------------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------------------
def cluster_protocol(args):
    """The protocol's classes, their colours, the labelIds -> class-id map, the matching objective and the
    evaluation size (None: native)."""
    if args.protocol == "cpcdr":
        classes, colors, to_classes, objective = TRAIN_CLASSES, TRAIN_COLORS, labelids_to_trainids, "iou"
        size = tuple(args.size) if args.size else CPCDR_SIZE[args.dataset]
    else:
        classes, colors, to_classes, objective = PICIE_CLASSES, PICIE_COLORS, labelids_to_picie, "pixels"
        size = (PICIE_SIZE, PICIE_SIZE)
    if args.size and args.protocol == "picie":
        raise ValueError("--size applies to --protocol cpcdr only (picie: short side 320, 320 x 320 centre crop)")
    return classes, colors, to_classes, objective, size


def cluster_network(args, device, out, num_clusters):
    """The network in eval mode, its checkpoint dict and path, its L2-normalised prototypes (K, D) and their
    clustering into clusters (K,), also saved as OUT/assignment.npy."""
    model_path = args.model or os.path.join(args.work, "swav", "model.pt")
    model, ckpt = load_network(model_path, args.init_random, args.seed)
    model.to(device).eval()
    prototypes = F.normalize(model.prototypes.weight.detach().float()[:, :, 0, 0], dim=1)  # (K, D)
    assignment = cluster_prototypes(prototypes.cpu().numpy(), num_clusters)
    np.save(os.path.join(out, "assignment.npy"), assignment)
    print(f"{model_path}: arch {ckpt['arch']}, K = {len(prototypes)} prototypes -> {int(assignment.max()) + 1} "
          f"clusters{' (random initialisation of the same architecture)' if args.init_random else ''}")
    return model, ckpt, model_path, prototypes, assignment


def cluster_confusion(model, prototypes, assignment, pairs, args, device, size, to_classes, num_classes):
    """Cluster every pixel of the evaluation pairs. Returns the (clusters, classes) confusion, the cluster
    maps kept for --save-pred ({stem: (clusters, image path, label path)}) and the first --pca images'
    normalised projections [(stem, image, (D, h, w))]."""
    num_clusters = int(assignment.max()) + 1
    amp = args.amp and device.type == "cuda"
    conf = np.zeros((num_clusters, num_classes), dtype=np.int64)
    kept, pca_feats = {}, []
    with torch.no_grad():
        for i, (stem, image_path, label_path) in enumerate(tqdm(pairs, desc="cluster", disable=None)):
            ids = np.asarray(Image.open(label_path))
            image = read_rgb(image_path)
            if image.shape[:2] != ids.shape:
                raise ValueError(f"{image_path} {image.shape[:2]} and {label_path} {ids.shape} differ in size")
            image, ids = resize_pair(image, ids, args.protocol, size)
            gt = to_classes(ids)
            x = to_tensor(image).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                proj = model(x)  # (1, D, H/4, W/4) projector output, not normalised
            clusters = assign_pixels(proj, prototypes, assignment, gt.shape)[0].cpu().numpy()
            conf += confusion_matrix(clusters, gt, num_clusters, num_classes)
            if args.save_pred:
                kept[stem] = (clusters.astype(np.uint8 if num_clusters < 256 else np.int32), image_path, label_path)
            if i < args.pca:
                pca_feats.append((stem, image, F.normalize(proj.float(), dim=1)[0].cpu().numpy()))
    return conf, kept, pca_feats


def print_cluster_scores(classes, scores, absent):
    print(f"\n{'class':<16} {'IoU':>6}")
    for c, v in zip(classes, scores["iou"]):
        print(f"{c:<16} {'absent' if np.isnan(v) else f'{100 * v:6.2f}':>6}")
    print(f"pixel accuracy {100 * scores['pixel_accuracy']:.2f}, mIoU {100 * scores['miou']:.2f} over "
          f"{int(scores['present'].sum())} classes present; absent from the ground truth: {', '.join(absent) or 'none'}")


def save_cluster_predictions(out, kept, mapping, protocol, size, to_classes, colors):
    """OUT/pred: matched class ids (255 unmatched); OUT/pred_color: image | ground truth | prediction."""
    os.makedirs(os.path.join(out, "pred"), exist_ok=True)
    os.makedirs(os.path.join(out, "pred_color"), exist_ok=True)
    lut = mapping.astype(np.uint8)
    for stem, (clusters, image_path, label_path) in kept.items():
        image, ids = resize_pair(read_rgb(image_path), np.asarray(Image.open(label_path)), protocol, size)
        gt, pred = to_classes(ids), lut[clusters]
        save_png(pred, os.path.join(out, "pred", f"{stem}.png"))
        panel = np.concatenate([image, colorize(gt, colors), colorize(pred, colors)], axis=1)
        save_png(panel, os.path.join(out, "pred_color", f"{stem}.png"))
    print(f"predictions: {os.path.join(out, 'pred')} (class ids, 255 unmatched), "
          f"{os.path.join(out, 'pred_color')} (image | ground truth | prediction)")


def save_cluster_pca(out, pca_feats):
    """OUT/pca: image | one PCA fitted to all kept images' projections, so colours compare across images."""
    os.makedirs(os.path.join(out, "pca"), exist_ok=True)
    feats = np.concatenate([f.reshape(f.shape[0], -1).T for _, _, f in pca_feats])  # (sum h*w, D)
    rgb = (pca_rgb(feats) * 255).astype(np.uint8)
    start = 0
    for stem, image, f in pca_feats:
        h, w = f.shape[1:]
        tile = Image.fromarray(rgb[start:start + h * w].reshape(h, w, 3)).resize(
            (image.shape[1], image.shape[0]), Image.NEAREST)
        start += h * w
        save_png(np.concatenate([image, np.asarray(tile)], axis=1), os.path.join(out, "pca", f"{stem}.png"))
    print(f"PCA feature images: {os.path.join(out, 'pca')} (image | 3-component PCA of the projections)")


def run(args):
    t0 = time.time()
    print("args: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    seed_everything(args.seed)
    device = pick_device(args.device)
    print(f"device: {device}")
    out = args.out or os.path.join(args.work, "cluster")
    metrics_path = os.path.join(out, "metrics.json")
    if os.path.exists(metrics_path) and not args.overwrite:
        print(f"{metrics_path} exists; skipping (use --overwrite to redo)")
        return json.load(open(metrics_path))
    os.makedirs(out, exist_ok=True)

    classes, colors, to_classes, objective, size = cluster_protocol(args)
    num_classes = len(classes)
    num_clusters = args.clusters or num_classes
    split = args.split or ("training" if args.dataset == "kitti" else "val")
    print(f"protocol {args.protocol}: {num_classes} classes, matching on "
          f"{'-IoU' if objective == 'iou' else 'matched pixels'}, size {size or 'native'}, {num_clusters} clusters")
    model, ckpt, model_path, prototypes, assignment = cluster_network(args, device, out, num_clusters)
    num_clusters = int(assignment.max()) + 1

    pairs = list_eval_pairs(args.data, args.dataset, split)
    if args.limit:
        pairs = pairs[:args.limit]
    conf, kept, pca_feats = cluster_confusion(model, prototypes, assignment, pairs, args, device, size, to_classes,
                                              num_classes)
    mapping = match_clusters(conf, objective)
    scores = segmentation_scores(apply_matching(conf, mapping))
    absent = [classes[c] for c in scores["absent"]]
    metrics = {
        "protocol": args.protocol, "matching": objective, "dataset": args.dataset, "split": split,
        "size": list(size) if size else "native", "num_images": len(pairs), "model": model_path,
        "init": "random" if args.init_random else "pretrained", "arch": ckpt["arch"],
        "num_prototypes": int(len(prototypes)), "clusters": num_clusters,
        "pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"],
        "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, scores["iou"])},
        "absent_classes": absent,
        "mapping": [classes[m] if m != IGNORE else None for m in mapping],
        "confusion": conf.tolist(),
    }
    save_json(metrics, metrics_path)
    print_cluster_scores(classes, scores, absent)
    if args.save_pred:
        save_cluster_predictions(out, kept, mapping, args.protocol, size, to_classes, colors)
    if pca_feats:
        save_cluster_pca(out, pca_feats)
    print(f"wrote {metrics_path} in {time.time() - t0:.1f} s")
    return metrics


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder (reads WORK/swav/model.pt, writes WORK/cluster)")
    p.add_argument("--data", required=True, help="dataset root: Cityscapes layout (also the toy city) or "
                   "KITTI data_semantics")
    p.add_argument("--split", default=None, help="evaluation split (default: val; KITTI: training, its 200 "
                   "labelled images)")
    p.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti", "toycity"],
                   help="layout and default size (toycity: the Cityscapes layout at its native size)")
    p.add_argument("--protocol", default="cpcdr", choices=["cpcdr", "picie"],
                   help="cpcdr: this paper's (19 trainIds, full frame 768 x 384, Hungarian on -IoU); picie: "
                   "PiCIE / STEGO's (27 classes, 320 x 320 centre crop, Hungarian on matched pixels)")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="cpcdr evaluation size (default 384 768 Cityscapes, 384 1280 KITTI, native toy city)")
    p.add_argument("--clusters", type=int, default=None,
                   help="number of clusters C (default: the protocol's classes, 19 or 27; the toy city has 9)")
    p.add_argument("--model", default=None, help="pre-trained model (default WORK/swav/model.pt); another "
                   "dataset's model evaluates across datasets")
    p.add_argument("--init-random", action="store_true", help="baseline: a randomly initialised network of the "
                   "model's architecture and number of prototypes through the same clustering")
    p.add_argument("--out", default=None, help="output folder (default WORK/cluster)")
    p.add_argument("--save-pred", action="store_true", help="write matched predictions (trainIds; picie: its "
                   "27 class ids), 255 unmatched, at the evaluated label size, and colour panels")
    p.add_argument("--pca", type=int, default=0, metavar="N", help="write the first N images' projections as "
                   "RGB by a 3-component PCA (Fig 2)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 network on CUDA (default fp16 "
                   "autocast there; CPU runs fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed (the --init-random network)")
    p.add_argument("--overwrite", action="store_true", help="redo even if metrics.json exists")
    return p


def main():
    run(get_args_parser().parse_args())


if __name__ == "__main__":
    main()
