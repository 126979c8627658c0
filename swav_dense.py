"""Stage 4: dense SwAV pre-training that pulls together corresponding pixels and regions of copy-paste samples.

Paper: Zeng et al., "Copy-Pasting Coherent Depth Regions Improves Contrastive Learning for Urban-Scene
Segmentation", BMVC 2022, Sec 3.4, Eqn 4-7 (clustering losses after SwAV, Caron et al. NeurIPS 2020).
copypaste.py (samples, every geometric transform recorded) -> swav_dense.py -> cluster.py and finetune.py.

Network: torchvision ResNet (trainable BatchNorm) -> FeaturePyramidNetwork (256 ch) -> semantic-FPN head (128 ch,
stride 4) -> projector (1x1 conv + BN + ReLU, 1x1 conv) -> K prototypes (1x1 conv, no bias, L2-normalized before
every step). The 2M canvases of a sample are one batch, each after its own augmentation (a 3x3 matrix G).
Positives (Sec 3.4): pixel level, a point traced back through G^-1 and the slot matrix A^-1 to its source image,
then into every other copy of its region still visible (not occluded by a later paste): one group per seed;
region level, all points on one region, on any canvas: one group per region. Per level: scores S = z^T c
(z, c L2-normalized); Eqn 4 is the assignment p = softmax(S / tau); the codes q = Sinkhorn(S) (SwAV); Eqn 5 the
target of a point is its group's mean code; Eqn 6 the cross-entropy -sum_k qbar_k log p_k; Eqn 7 mixes the levels.

| file (WORK = --work)                  | content                                                              |
|---------------------------------------|----------------------------------------------------------------------|
| WORK/samples/epoch_EEE/NNNNNN.pt (in) | copypaste.py: images uint8 (2M,3,H,W), labels int32 (2M,H,W) = r*T+s, |
|                                       | transforms float32 (R,T,3,3), canvas_of int64 (R,T)                  |
| WORK/swav/checkpoint.pt (out)         | model, optimizer, scheduler, scaler, step, args, arch, K, ...        |
| WORK/swav/model.pt (out)              | {"arch", "model": state_dict, "args", "num_prototypes", "proj_dim", ...} |
| WORK/swav/log.jsonl (out)             | one JSON line per step: step, epoch, loss, loss_pixel, loss_region, lr |

    python swav_dense.py --work runs/cityscapes --on-the-fly --data CITYSCAPES --size 384 768 --mix 8 --resume
        # paper: ResNet-50, K 1000, 25 epochs of M = 8 samples, one GPU, AMP
    python swav_dense.py --work runs/toy --arch resnet18 --input-size 96 192 --num-prototypes 100 \
        --pixel-samples 1000 --region-samples 1000 --steps 150 --workers 0 --device cpu --no-amp   # CPU, minutes
    torchrun --nnodes N --nproc_per_node G swav_dense.py ARGS  # global batch N G x --batch-samples, --lr as given

Departures from the paper / released code:
- Region groups are label // T (the released code divides by M, right only when T = M = 8).
- Batches of more than one sample work (canvas and group ids offset per sample); the paper used 1.
- The FPN is torchvision's (detectron2's in the released code: same structure). The semantic head upsamples to
  the exact size of the next finer level (= bilinear x2 when H and W are multiples of 32, as in detectron2).
- SGD groups: backbone (ResNet + FPN), head, projector, prototypes; weight decay on all parameters.
- Features: grid_sample with border padding (released: zeros; the same after the L2 normalization). Sinkhorn
  subtracts the maximum of S / eps before exp (the same codes). Eqn 6 sums the log-probabilities per group, then
  takes the dot product with the group's mean code (the same sum, without an N x K target matrix).
- --input-size (not in the paper) feeds smaller canvas images on CPU; labels and matrices stay exact.
"""
import argparse
import glob
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import FeaturePyramidNetwork
from tqdm import tqdm

from depth import (BadInput, add_frame_args, add_parallel_args, amp_dtype_for, atomic_write, checked_read,
                   frames_of, load_torch, nonnegative_int, positive_float, positive_int, ranged, record_settings,
                   restore_checkpoint, resume_log, run_main, run_settings, seed_everything, setup_distributed,
                   unit_float, wrap_ddp)

# ===== Paper constants (Sec 3.4 and Sec 4; SwAV for the Sinkhorn settings) =====
NUM_PROTOTYPES = 1000  # K, Sec 3.4
PROJ_DIM = 128  # projector output dimension (released code)
HEAD_DIM = 128  # semantic-FPN head channels (detectron2 SEM_SEG_HEAD.CONVS_DIM)
FPN_DIM = 256  # FPN channels (detectron2 default)
HEAD_GROUPS = 32  # GroupNorm groups in the semantic head (detectron2 "GN")
SINKHORN_EPS = 0.05  # epsilon of the Sinkhorn-Knopp codes (SwAV)
SINKHORN_ITERS = 3  # Sinkhorn iterations (SwAV)
TAU = 0.1  # softmax temperature, Eqn 4 and 6
LAMBDA = 0.5  # Eqn 7 weight of the pixel-level loss (Table 2 also uses 1)
PIXEL_SAMPLES = 4000  # pixel-level seed points per canvas (released code)
REGION_SAMPLES = 7200  # region-level points per canvas (released code)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet normalization
RESNET_CHANNELS = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
                   "resnet50": [256, 512, 1024, 2048], "resnet101": [256, 512, 1024, 2048]}


# ===== Geometry: normalized coordinates (grid_sample, align_corners=False), homogeneous 3x3 matrices =====
def apply_homography(matrix, points):
    """Map points (..., 2) by 3x3 matrices (..., 3, 3) acting on column vectors [x, y, 1]; fp32 or fp64."""
    h = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # [x, y, 1]
    mapped = torch.einsum("...ij,...j->...i", matrix, h)  # batched M [x, y, 1]^T, batch shapes broadcast
    return mapped[..., :2] / mapped[..., 2:]


def label_lookup(labels, canvas, points):
    """Nearest-pixel label of `labels` (C, H, W) at normalized `points` (N, 2) of canvases `canvas` (N,).

    Pixel column i covers x in [2i/W - 1, 2(i+1)/W - 1), so its index is floor((x + 1) W / 2). Points outside
    the canvas, or with canvas < 0, get -1."""
    _, height, width = labels.shape
    col = torch.floor((points[:, 0] + 1) * (width / 2)).long()
    row = torch.floor((points[:, 1] + 1) * (height / 2)).long()
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (canvas >= 0)
    index = (canvas.clamp(min=0) * height + row.clamp(0, height - 1)) * width + col.clamp(0, width - 1)
    value = labels.take(index).long()  # labels[canvas, row, col] through the flat index
    return torch.where(inside, value, torch.full_like(value, -1))


def uniform_points(num_canvases, num_points, generator=None):
    """(num_canvases, num_points, 2) points uniform in [-1, 1]^2, fp32, drawn on the CPU (device-independent)."""
    return torch.rand(num_canvases, num_points, 2, generator=generator) * 2 - 1


# ===== Positives (Sec 3.4): pixel level (traced through the recorded matrices) and region level =====
def pixel_positives(labels, transforms, canvas_of, augment, num_points, generator=None):
    """Pixel-level positive groups of one sample (Sec 3.4), in fp32.

    labels (C, H, W) int: r * T + s of the canvases before augmentation; transforms (R, T, 3, 3) A_{r,s}: source
    of r -> canvas_of[r, s]; canvas_of (R, T) (-1 = unused slot); augment (C, 3, 3) G_i: canvas i -> its
    augmented view (the network input). Per canvas i, num_points seeds g uniform in the augmented view:
        u = G_i^-1 g, (r, s) = divmod(label_i(u), T), p = A_{r,s}^-1 u  (the point in r's source image);
        for every slot s': u' = A_{r,s'} p, g' = G_{c'} u', c' = canvas_of[r, s'];
        s' is valid if label_{c'}(u') = r T + s' (the copy is visible there, not occluded) and g' lies inside
        the augmented view. Seeds with at least 2 valid slots are kept; a group = the valid g' of one seed.
    Returns points (N, 2) in augmented coordinates, canvas (N,), group (N,) (0..num_groups-1), num_groups.
    """
    device = labels.device
    num_canvases, num_slots = labels.shape[0], transforms.shape[1]
    used = canvas_of >= 0
    a = torch.where(used[..., None, None], transforms.float(), torch.eye(3, device=device))  # (R, T, 3, 3)
    g_aug = augment.float()
    g = uniform_points(num_canvases, num_points, generator).to(device)  # (C, P, 2)
    u = apply_homography(torch.linalg.inv(g_aug)[:, None], g).reshape(-1, 2)  # (C P, 2) before augmentation
    seed_canvas = torch.arange(num_canvases, device=device).repeat_interleave(num_points)
    label = label_lookup(labels, seed_canvas, u)
    ok = (label >= 0) & (label < transforms.shape[0] * num_slots)
    u, label = u[ok], label[ok]
    r, s = label // num_slots, label % num_slots
    p = apply_homography(torch.linalg.inv(a)[r, s], u)  # (S, 2) in r's source image
    u_all = apply_homography(a[r], p[:, None, :])  # (S, T, 2) every slot s' of r, before augmentation
    c_all = canvas_of[r]  # (S, T)
    found = label_lookup(labels, c_all.reshape(-1), u_all.reshape(-1, 2)).view_as(c_all)
    visible = found == r[:, None] * num_slots + torch.arange(num_slots, device=device)  # unused slots: found -1
    g_all = apply_homography(g_aug[c_all.clamp(min=0)], u_all)  # (S, T, 2) in the augmented views
    valid = visible & (g_all >= -1).all(-1) & (g_all < 1).all(-1)  # inside [-1, 1)^2, the area the network sees
    keep = valid.sum(1) >= 2
    valid = valid[keep]
    group = torch.arange(valid.shape[0], device=device)[:, None].expand_as(valid)[valid]
    return g_all[keep][valid], c_all[keep][valid], group, valid.shape[0]


def region_positives(labels, augment, num_slots, num_points, generator=None):
    """Region-level positive groups of one sample (Sec 3.4), in fp32.

    Per canvas i, num_points points g uniform in the augmented view; the group of g is its region
    r = label_i(G_i^-1 g) // T (T slots per region; the released code divides by M, right only when T = M).
    Returns points (N, 2), canvas (N,), group (N,) = region id."""
    device = labels.device
    num_canvases = labels.shape[0]
    g = uniform_points(num_canvases, num_points, generator).to(device)  # (C, P, 2)
    u = apply_homography(torch.linalg.inv(augment.float())[:, None], g).reshape(-1, 2)
    canvas = torch.arange(num_canvases, device=device).repeat_interleave(num_points)
    label = label_lookup(labels, canvas, u)
    ok = label >= 0
    return g.reshape(-1, 2)[ok], canvas[ok], label[ok] // num_slots


def batch_positives(samples, pixel_samples, region_samples, generator=None, pixel=True, region=True):
    """Positives of a batch of samples, with canvas, seed and region ids offset per sample.

    samples: list of dicts with labels, transforms, canvas_of, augment (see pixel_positives). generator: one for
    all samples, or a list of one per sample (each sample's draws then do not depend on the others). Returns
    {"pixel": (points, canvas, group, num_groups), "region": (...)} for the levels asked for, sorted by canvas.
    """
    out, generators = {}, generator if isinstance(generator, list) else [generator] * len(samples)
    for level in [name for name, wanted in (("pixel", pixel), ("region", region)) if wanted]:
        parts, canvas_offset, group_offset = [], 0, 0
        for sample, generator in zip(samples, generators):
            labels, transforms, augment = sample["labels"], sample["transforms"], sample["augment"]
            if level == "pixel":
                points, canvas, group, num = pixel_positives(labels, transforms, sample["canvas_of"], augment,
                                                             pixel_samples, generator)
            else:
                points, canvas, group = region_positives(labels, augment, transforms.shape[1], region_samples,
                                                         generator)
                num = transforms.shape[0]
            parts.append((points, canvas + canvas_offset, group + group_offset))
            canvas_offset += labels.shape[0]
            group_offset += num
        points, canvas, group = (torch.cat(x) for x in zip(*parts))
        order = torch.argsort(canvas, stable=True)  # sorted by canvas, as sample_features wants them
        out[level] = (points[order], canvas[order], group[order], group_offset)
    return out


# ===== Loss (Eqn 4-7) =====
def sample_features(features, canvas, points):
    """Bilinearly sample features (B, D, h, w) at normalized points (N, 2) of canvases (N,), sorted by canvas.

    One F.grid_sample call (align_corners=False: cell j of a map of width w is centered at x = (2j + 1)/w - 1;
    border cells repeated outside) on the points of each canvas, padded to the longest. Returns (N, D)."""
    counts = torch.bincount(canvas, minlength=features.shape[0]).tolist()
    points = torch.nn.utils.rnn.pad_sequence(points.split(counts), batch_first=True)[:, None]  # (B, 1, P, 2)
    sampled = F.grid_sample(features, points, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.cat([s[:, 0, :n].t() for s, n in zip(sampled, counts)])  # (B, D, 1, P) -> (N, D)


def all_reduce(x, process_group, op=dist.ReduceOp.SUM):
    """x summed (or op) in place over the processes of process_group; None: one process, x unchanged."""
    if process_group is not None:
        dist.all_reduce(x, op, group=process_group)
    return x


@torch.no_grad()
def sinkhorn(scores, eps=SINKHORN_EPS, iters=SINKHORN_ITERS, process_group=None):
    """SwAV's Sinkhorn-Knopp codes of scores (B samples, K prototypes) -> (B, K), fp32, no gradient.

    In SwAV's K x B layout: Q = exp(S / eps)^T divided by its sum; each iteration scales every prototype (row
    of Q) to total 1/K, then every sample (column) to total 1/B; finally x B, so each sample's code sums to 1.
    Here on Q^T (B, K). The maximum of S / eps is subtracted before exp (it cancels in the first division).
    process_group (torchrun): the rows are spread over its processes, as in SwAV's distributed Sinkhorn: the
    maximum, the total and the prototype sums are all-reduced and B is the global number of rows, so each
    process gets its rows of the codes of all rows together (a process may hold none).
    """
    top = scores.max() if len(scores) else scores.new_tensor(-math.inf)
    q = (scores.float() - all_reduce(top, process_group, dist.ReduceOp.MAX)).div_(eps).exp_()  # Q^T (B, K)
    q /= all_reduce(q.sum(), process_group)
    k, b = q.shape[1], int(all_reduce(torch.tensor(q.shape[0], device=q.device), process_group))
    for _ in range(iters):
        q /= all_reduce(q.sum(dim=0, keepdim=True), process_group) * k  # prototypes to 1/K
        q /= q.sum(dim=1, keepdim=True) * b  # samples to 1/B
    return q.mul_(b)


def group_mean_codes(codes, group, num_groups):
    """Eqn 5: mean code of each group (num_groups, K); a point's target is row group[n] (itself included)."""
    sums = codes.new_zeros(num_groups, codes.shape[1]).index_add_(0, group, codes)
    counts = torch.bincount(group, minlength=num_groups).clamp(min=1).to(codes.dtype)
    return sums.div_(counts[:, None])


def swav_cross_entropy(logits, group_codes, group, count=None):
    """Eqn 6: mean over points n of -sum_k qbar_{g(n),k} log p_{n,k}, p_n = softmax(S_n / tau) (Eqn 4).

    logits (N, K) = S / tau, group_codes (G, K), group (N,) ids < G. Computed as -(1/N) sum_g <qbar_g, sum_{n in
    g} log p_n>: the log-probabilities are summed per group first, so no N x K target matrix is formed.
    count: the N of the mean when these points are one process's share of more (default: N = len(logits)).
    """
    log_p = F.log_softmax(logits, dim=1)  # (N, K)
    summed = log_p.new_zeros(group_codes.shape).index_add_(0, group, log_p)  # (G, K)
    return -torch.dot(group_codes.flatten(), summed.flatten()) / max(len(logits) if count is None else count, 1)


def dense_swav_loss(features, positives, prototypes, lam=LAMBDA, eps=SINKHORN_EPS, tau=TAU,
                    iters=SINKHORN_ITERS, process_group=None):
    """Eqn 7: L = lam L_pixel + (1 - lam) L_region, from projector features (B, D, h, w), batch_positives() and
    the prototypes (K, D); all in fp32. Returns (loss, {"pixel": L_pixel, "region": L_region}) for the levels
    in `positives`. process_group (torchrun): Sinkhorn over the points of all processes, and each process's
    loss is its points' share of the mean over all points (the sum over processes is one process's loss on the
    whole batch). Pixel and region groups lie within one sample, so the group means need no communication."""
    features = features.float()
    prototypes = F.normalize(prototypes.float(), dim=1)
    parts = {}
    for level, (points, canvas, group, num_groups) in positives.items():
        count = len(group) if process_group is None else int(
            all_reduce(torch.tensor(len(group), device=features.device), process_group))
        if count == 0:  # no positives at this level (nothing visible twice): no loss, graph kept
            parts[level] = features.sum() * 0
            continue
        if len(group):
            z = F.normalize(sample_features(features, canvas, points), dim=1)  # (N, D)
        else:  # none here, some on other processes: an empty share that still joins the all-reduces and DDP
            z = features.new_zeros(0, features.shape[1]) + features.sum() * 0
        logits = z @ (prototypes / tau).t()  # S / tau (N, K): 1/tau applied to the small (K, D) matrix
        codes = sinkhorn(logits, eps / tau, iters, process_group)  # exp(S / eps) = exp((S / tau) / (eps / tau))
        parts[level] = swav_cross_entropy(logits, group_mean_codes(codes, group, num_groups), group, count)
    loss = lam * parts.get("pixel", 0.0) + (1 - lam) * parts.get("region", 0.0)
    return loss, parts


def learning_rate(step, total_steps, warmup_steps, base_lr, min_lr):
    """Per-iteration schedule: linear warm-up from 0 over warmup_steps, then cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ===== Network: ResNet + FPN + semantic-FPN head + projector + prototypes =====
class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, returning C2..C5 (strides 4, 8, 16, 32); keys as torchvision's."""

    def __init__(self, arch="resnet50"):
        super().__init__()
        if arch not in RESNET_CHANNELS:
            raise ValueError(f"--arch {arch}: choose one of {sorted(RESNET_CHANNELS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = RESNET_CHANNELS[arch]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"p2": c2, "p3": c3, "p4": c4, "p5": c5}


class SemanticFPNHead(nn.Module):
    """Panoptic-FPN semantic branch without its classifier: per level P2..P5, max(1, log2(stride / 4)) blocks of
    [3x3 conv 128, GroupNorm 32, ReLU, bilinear x2 (not at P2)], summed into one 128-ch map at stride 4."""

    def __init__(self, in_dim=FPN_DIM, dim=HEAD_DIM, groups=HEAD_GROUPS):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level in range(4):  # P2 (stride 4) .. P5 (stride 32)
            blocks = nn.ModuleList()
            for k in range(max(1, level)):
                blocks.append(nn.Sequential(nn.Conv2d(in_dim if k == 0 else dim, dim, 3, padding=1, bias=False),
                                            nn.GroupNorm(groups, dim), nn.ReLU(inplace=True)))
            self.scale_heads.append(blocks)

    def forward(self, pyramid):
        sizes = [f.shape[-2:] for f in pyramid]
        out = None
        for level, (blocks, x) in enumerate(zip(self.scale_heads, pyramid)):
            for k, block in enumerate(blocks):
                x = block(x)
                if level > 0:  # bilinear x2 to the next finer level's exact size
                    x = F.interpolate(x, size=sizes[level - 1 - k], mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        return out


class DenseSwAV(nn.Module):
    """backbone -> fpn -> head (semantic_features) -> projector (forward); prototypes."""

    def __init__(self, arch="resnet50", num_prototypes=NUM_PROTOTYPES, proj_dim=PROJ_DIM, head_dim=HEAD_DIM):
        super().__init__()
        self.arch = arch
        self.backbone = ResNetBackbone(arch)
        self.fpn = FeaturePyramidNetwork(self.backbone.channels, FPN_DIM)
        self.head = SemanticFPNHead(FPN_DIM, head_dim)
        # "1-layer MLP" projector of the released code: 1x1 conv + BN + ReLU, then 1x1 conv without bias
        self.projector = nn.Sequential(nn.Conv2d(head_dim, head_dim, 1), nn.BatchNorm2d(head_dim),
                                       nn.ReLU(inplace=True), nn.Conv2d(head_dim, proj_dim, 1, bias=False))
        self.prototypes = nn.Conv2d(proj_dim, num_prototypes, 1, bias=False)

    def semantic_features(self, x):
        """(B, 3, H, W) ImageNet-normalized -> (B, head_dim, H/4, W/4) head output (what fine-tuning uses)."""
        pyramid = self.fpn(self.backbone(x))
        return self.head([pyramid[k] for k in ("p2", "p3", "p4", "p5")])

    def forward(self, x):
        """(B, 3, H, W) -> (B, proj_dim, H/4, W/4) projector output, not normalized."""
        return self.projector(self.semantic_features(x))

    @torch.no_grad()
    def normalize_prototypes(self):
        """Each prototype L2-normalized (before every step, as in SwAV)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.flatten(1), dim=1).view_as(w))


def build_model(arch="resnet50", num_prototypes=NUM_PROTOTYPES, proj_dim=PROJ_DIM, head_dim=HEAD_DIM,
                backbone_weights=None):
    """The dense SwAV network, randomly initialized (the backbone from a local torchvision ResNet state_dict when
    backbone_weights is given: Table 1 "IN"); prototypes L2-normalized."""
    model = DenseSwAV(arch, num_prototypes, proj_dim, head_dim)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    model.normalize_prototypes()
    return model


def load_backbone_weights(model, path):
    """Load a local torchvision ResNet state_dict (e.g. torch.save(resnet50(weights=...).state_dict(), FILE))
    into model.backbone, strictly (fc.* ignored: the classifier is not part of the backbone)."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"--init imagenet needs --backbone-weights FILE, a local torchvision {model.arch} "
                                f"state_dict (nothing is downloaded); got {path!r}. Make one where the internet "
                                f"is reachable: torch.save(torchvision.models.{model.arch}(weights='DEFAULT')"
                                f".state_dict(), FILE)")
    state = checked_read(path, "a torchvision ResNet state_dict", lambda p: torch.load(p, "cpu", weights_only=True))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model.backbone.load_state_dict(state, strict=True)


def load_model(path, map_location="cpu"):
    """(model, checkpoint dict) from a swav_dense.py model.pt (or checkpoint.pt), strict."""
    make = "python swav_dense.py --work WORK (stage 4, swav_dense.py)"
    ckpt = load_torch(path, make, ("arch", "model", "num_prototypes"))  # a depth or finetune model: one line
    config = ckpt["arch"], ckpt["num_prototypes"], ckpt.get("proj_dim", PROJ_DIM), ckpt.get("head_dim", HEAD_DIM)
    model = checked_read(path, make, lambda _: build_model(*config))
    checked_read(path, make, lambda _: model.load_state_dict(ckpt["model"], strict=True))
    return model.to(map_location), ckpt


# ===== Data: samples (saved by copypaste.py or built on the fly), per-canvas augmentation =====
SAMPLE_KEYS = {"images": torch.uint8, "labels": torch.int32, "transforms": torch.float32, "canvas_of": torch.int64}


def item_seed(seed, epoch, index):
    """A reproducible per-(epoch, item) seed: random draws do not depend on workers or resumption."""
    return ((seed * 1000003 + epoch) * 1000003 + index) % (2 ** 63)


def check_sample(sample, where):
    """Check the DESIGN.md sample format; say which stage makes it when something is off."""
    for key, dtype in SAMPLE_KEYS.items():
        if key not in sample or not torch.is_tensor(sample[key]) or sample[key].dtype != dtype:
            raise ValueError(f"{where}: sample lacks {key} ({dtype}); samples are written by copypaste.py "
                             f"(`python copypaste.py --work WORK ...`)")
    c, h, w = sample["labels"].shape
    r, t = sample["canvas_of"].shape
    if sample["images"].shape != (c, 3, h, w) or sample["transforms"].shape != (r, t, 3, 3):
        raise ValueError(f"{where}: inconsistent shapes images {tuple(sample['images'].shape)}, labels "
                         f"{(c, h, w)}, transforms {tuple(sample['transforms'].shape)}, canvas_of {(r, t)}")
    if not torch.isfinite(sample["transforms"]).all() or sample["canvas_of"].max() >= c:
        raise BadInput(f"{where}: NaN or inf transforms, or canvas ids out of range; remake it with copypaste.py")


def augment_sample(sample, generator, augment=True, photometric=True, input_size=None):
    """Per-canvas training augmentation (copypaste.augment_canvas) of every canvas, recording G (2M, 3, 3).

    input_size (H, W): resize the canvas images first (antialiased). Normalized coordinates do not depend on the
    resolution, so labels, transforms and G stay exact; the network just sees fewer pixels."""
    from copypaste import augment_canvas  # stage 3 owns the augmentation and its matrices
    canvases = sample["images"]
    if input_size is not None and tuple(input_size) != tuple(canvases.shape[-2:]):
        canvases = TF.resize(canvases, list(input_size), antialias=True)
    images, matrices = [], []
    for canvas in canvases:
        if augment:
            image, g = augment_canvas(canvas, generator, photometric=photometric)
        else:
            image, g = TF.normalize(canvas.float() / 255, IMAGENET_MEAN, IMAGENET_STD), torch.eye(3)
        images.append(image)
        matrices.append(g.float())
    out = {k: sample[k] for k in ("labels", "transforms", "canvas_of")}
    return {**out, "images": torch.stack(images), "augment": torch.stack(matrices)}


class TrainingSamples(Dataset):
    """Item i of epoch e: a copy-paste sample, read from copypaste.py's WORK/samples/epoch_{e mod E}/ or built on
    the fly by `on_the_fly` (a copypaste.CopyPasteDataset), checked, then augmented per canvas with a generator
    seeded by (seed, e, i)."""

    def __init__(self, root, on_the_fly=None, seed=0, augment=True, photometric=True, input_size=None):
        self.on_the_fly, self.seed, self.epoch = on_the_fly, seed, 0
        self.augment, self.photometric, self.input_size = augment, photometric, input_size
        self.files = [sorted(glob.glob(os.path.join(f, "*.pt"))) for f in sorted(glob.glob(f"{root}/epoch_*"))]
        if on_the_fly is None and not (self.files and self.files[0]):
            raise FileNotFoundError(f"no samples in {root}/epoch_*/*.pt: make them with copypaste.py (`python "
                                    "copypaste.py --work WORK --data DATA --split train`), or pass --on-the-fly")

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.on_the_fly is not None:
            self.on_the_fly.set_epoch(epoch)

    def __len__(self):
        return len(self.on_the_fly) if self.on_the_fly is not None else len(self.files[self.epoch % len(self.files)])

    def __getitem__(self, index):
        if self.on_the_fly is not None:
            sample, where = self.on_the_fly[index], f"CopyPasteDataset[{index}]"
        else:
            where = self.files[self.epoch % len(self.files)][index]
            sample = load_torch(where, "python copypaste.py --work WORK ...")
        check_sample(sample, where)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        return {**augment_sample(sample, generator, self.augment, self.photometric, self.input_size), "index": index}


# ===== Training =====
def parameter_groups(model):
    """The four SGD groups: backbone (ResNet + FPN), head, projector, prototypes."""
    return [{"name": "backbone", "params": list(model.backbone.parameters()) + list(model.fpn.parameters())},
            {"name": "head", "params": list(model.head.parameters())},
            {"name": "projector", "params": list(model.projector.parameters())},
            {"name": "prototypes", "params": list(model.prototypes.parameters())}]


def train_step(model, batch, args, optimizer, scaler, amp_dtype, step, world=1):
    """One SGD step of Eqn 7 on a batch (a list of augmented samples, all canvases through the network as one
    batch); the positives of a sample are drawn with a generator seeded by (--seed, step, its index), whichever
    process holds it. model: the network, or its DDP wrapper under torchrun (world processes, this one holding
    its share of the global batch). Returns (loss, {level: loss}) of the global batch."""
    net = getattr(model, "module", model)  # the bare network inside DDP
    device, group = net.prototypes.weight.device, dist.group.WORLD if world > 1 else None
    net.normalize_prototypes()  # each prototype L2-normalized before every step (SwAV)
    images = torch.cat([s["images"] for s in batch]).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        features = model(images)  # (B, D, H/4, W/4) projector output
    # positives, Sinkhorn and the loss in fp32, outside autocast
    samples = [{k: s[k].to(device) for k in ("labels", "transforms", "canvas_of", "augment")} for s in batch]
    generators = [torch.Generator().manual_seed(item_seed(args.seed + 1, step, s["index"])) for s in batch]
    positives = batch_positives(samples, args.pixel_samples, args.region_samples, generators,
                                pixel=args.lam > 0, region=args.lam < 1)
    loss, parts = dense_swav_loss(features.float(), positives, net.prototypes.weight.flatten(1), args.lam,
                                  args.eps, args.tau, args.sinkhorn_iters, group)
    logged = all_reduce(torch.stack([loss.detach(), *[v.detach() for v in parts.values()]]), group).tolist()
    if not math.isfinite(logged[0]):  # the global loss: every process stops together
        raise FloatingPointError(f"non-finite loss {logged[0]}: stopping (lower --lr, or try --no-amp)")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * world).backward()  # DDP averages the processes' gradients; their sum is one GPU's
    scaler.step(optimizer)
    scaler.update()
    return logged[0], dict(zip(parts, logged[1:]))


def build_dataset(args):
    """The training samples: WORK/samples from copypaste.py, or (--on-the-fly) copypaste.CopyPasteDataset."""
    on_the_fly = None
    if args.on_the_fly:
        import copypaste  # stage 3 builds the samples
        if not (args.data or args.images):
            raise ValueError("--on-the-fly needs --data DATA --split S (or --images GLOB)")
        paths = [f.path for f in frames_of(args)]
        print(f"[swav_dense] on the fly from {len(paths)} frames, {len(paths) // args.mix} samples of M {args.mix}")
        on_the_fly = copypaste.CopyPasteDataset(
            paths, args.disp_dir or os.path.join(args.work, "disp"),
            args.regions_dir or os.path.join(args.work, "regions"), mix=args.mix, paste_times=args.paste_times,
            size=args.size, photometric=not args.no_photometric, seed=args.seed)
    return TrainingSamples(os.path.join(args.work, "samples"), on_the_fly, args.seed, not args.no_augment,
                           not args.no_photometric, args.input_size)


def epoch_batches(num_items, batch_samples, seed, epoch, rank=0, world=1):
    """The epoch's batches of item indices, shuffled reproducibly (a resumed run skips the ones it has done).
    torchrun: global batches of batch_samples x world items, of which process `rank` takes its contiguous share;
    a last global batch of fewer than `world` items is dropped (a process with nothing could not step)."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    batches = [b.tolist() for b in order.split(batch_samples * world) if len(b) >= world]
    return [b[len(b) * rank // world:len(b) * (rank + 1) // world] for b in batches]


def training_model(args, device, amp_dtype, world):
    """(model on device, channels-last on CUDA's fp16 path; its wrap_ddp wrapper: --sync-bn, --freeze-bn, DDP)."""
    model = build_model(args.arch, args.num_prototypes, PROJ_DIM, HEAD_DIM,
                        args.backbone_weights if args.init == "imagenet" else None)
    fp16_path = device.type == "cuda" or amp_dtype == torch.float16
    model.to(device, memory_format=torch.channels_last if fp16_path else torch.contiguous_format)
    wrapped = wrap_ddp(model, args, device, world)
    return getattr(wrapped, "module", wrapped), wrapped  # SyncBatchNorm layers are new modules: after wrapping


def run(args):
    """Dense SwAV pre-training (Sec 3.4): WORK/samples (or samples built on the fly) -> WORK/swav/model.pt."""
    out_dir = args.out or os.path.join(args.work, "swav")
    final, ckpt_path = os.path.join(out_dir, "model.pt"), os.path.join(out_dir, "checkpoint.pt")
    rank, world, device = setup_distributed(args.device)  # torchrun: rank 0 of `world` prints and writes
    say = print if rank == 0 else lambda *a: None
    args.world_size = world  # the global batch is batch_samples x world: a setting of the run, checked on resume
    if rank == 0:
        record_settings(out_dir, run_settings(args), args.overwrite or args.force_resume, "model.pt")  # others': stop
    if os.path.exists(final) and not args.overwrite and not (args.resume and os.path.exists(ckpt_path)):
        say(f"[swav_dense] {final} exists: skipping (--overwrite to retrain)")
        return final
    amp_dtype = amp_dtype_for(device, args.no_amp, args.amp_dtype)
    say(f"[swav_dense] {world} x {device}, amp {amp_dtype}, {torch.get_num_threads()} threads, args {vars(args)}")
    # ===== data =====
    dataset = build_dataset(args)
    steps_per_epoch = len(epoch_batches(len(dataset), args.batch_samples, args.seed, 0, 0, world))
    total = args.steps or args.epochs * steps_per_epoch
    stop_at = min(total, args.stop_after or total)
    # ===== model =====
    seed_everything(args.seed)
    model, ddp_model = training_model(args, device, amp_dtype, world)
    info = dict(arch=args.arch, num_prototypes=args.num_prototypes, proj_dim=PROJ_DIM, head_dim=HEAD_DIM,
                args=vars(args))
    # ===== optimizer: SGD, per-step linear warm-up then cosine, GradScaler for fp16 =====
    optimizer = torch.optim.SGD(parameter_groups(model), args.lr, args.momentum, weight_decay=args.weight_decay)
    warmup = min(total, round(args.warmup_epochs * steps_per_epoch))
    scheduler = LambdaLR(optimizer, lambda s: learning_rate(s, total, warmup, args.lr, args.min_lr) / args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # ===== resume =====
    step = restore_checkpoint(ckpt_path, args, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    # ===== loop =====
    start_time, start_step = time.time(), step
    with resume_log(os.path.join(out_dir, "log.jsonl"), step) if rank == 0 else open(os.devnull, "w") as log, \
            tqdm(total=total, initial=step, desc="swav_dense", dynamic_ncols=True,
                 disable=args.no_progress or rank > 0) as bar:
        while step < stop_at:
            dataset.set_epoch(epoch := step // steps_per_epoch)
            batches = epoch_batches(len(dataset), args.batch_samples, args.seed, epoch, rank, world)
            for batch in DataLoader(dataset, batch_sampler=batches[step % steps_per_epoch:][:stop_at - step],
                                    collate_fn=list, num_workers=args.workers, pin_memory=device.type == "cuda"):
                loss, parts = train_step(ddp_model, batch, args, optimizer, scaler, amp_dtype, step, world)
                record = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0],
                          **{f"loss_{k}": v for k, v in parts.items()}}
                scheduler.step()
                step += 1
                bar.update(1)
                log.write(json.dumps(record) + "\n")
                if rank == 0 and (step % args.log_every == 0 or step == stop_at):  # loss stuck at ln K: uniform
                    eta = (stop_at - step) * (time.time() - start_time) / (step - start_step) / 60
                    bar.write(f"[swav_dense] {' '.join(f'{k} {v:.5g}' for k, v in record.items())} eta {eta:.1f} min")
                # ===== checkpoint =====
                if rank == 0 and (step % args.save_every == 0 or step % steps_per_epoch == 0 or step == stop_at):
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **info}
                    atomic_write(ckpt_path, lambda f: torch.save(state, f))
    if step >= total and rank == 0:
        atomic_write(final, lambda f: torch.save({"model": model.state_dict(), "step": step, **info}, f))
    say(f"[swav_dense] {'wrote ' + final if step >= total else 'stopped (--stop-after): continue with --resume'}")
    return final if step >= total else ckpt_path


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder shared by all stages: reads WORK/samples")
    p.add_argument("--out", default=None, help="output folder (default WORK/swav)")
    g = p.add_argument_group("network")
    g.add_argument("--arch", default="resnet50", choices=sorted(RESNET_CHANNELS), help="ResNet (paper: resnet50)")
    g.add_argument("--num-prototypes", type=positive_int, default=NUM_PROTOTYPES, help="K prototypes (paper: 1000)")
    g.add_argument("--init", default="scratch", choices=["scratch", "imagenet"],
                   help="backbone initialization (paper Table 1: scratch, or 'IN' from --backbone-weights)")
    g.add_argument("--backbone-weights", help="local torchvision ResNet state_dict for --init imagenet (no download)")
    g = p.add_argument_group("data")
    g.add_argument("--on-the-fly", action="store_true", help="build samples with copypaste.CopyPasteDataset")
    g.add_argument("--data", help="dataset root, with --split (only with --on-the-fly)")
    g.add_argument("--images", help="glob of images instead of --data (only with --on-the-fly)")
    g.add_argument("--split", default="train", help="split (only with --on-the-fly)")
    add_frame_args(g)
    g.add_argument("--disp-dir", help="<stem>.npy disparity (--on-the-fly; default WORK/disp)")
    g.add_argument("--regions-dir", help="<stem>.npy regions (--on-the-fly; default WORK/regions)")
    g.add_argument("--size", type=positive_int, nargs=2, default=[384, 768], metavar=("H", "W"),
                   help="canvas size (only with --on-the-fly; paper: 384 x 768)")
    g.add_argument("--mix", type=positive_int, default=8,
                   help="M source images per sample (only with --on-the-fly; paper: 8)")
    g.add_argument("--paste-times", type=nonnegative_int, nargs=2, default=[2, 4], metavar=("E1", "E2"),
                   help="pastes per region in rounds 1 and 2 (only with --on-the-fly; paper: 2 4)")
    g.add_argument("--input-size", type=positive_int, nargs=2, metavar=("H", "W"), help="resize the canvases to H x W "
                   "for the network (labels and matrices stay exact); cheap CPU runs. Default: the samples' size")
    g.add_argument("--no-augment", action="store_true", help="no per-canvas augmentation (G = identity): ablation")
    g.add_argument("--no-photometric", action="store_true", help="per-canvas augmentation without color changes")
    g.add_argument("--batch-samples", type=positive_int, default=1,
                   help="samples per step and process (paper: 1 = 2M canvases)")
    g.add_argument("--workers", type=nonnegative_int, default=4,
                   help="DataLoader worker processes; 0 = in the main process")
    add_training_args(p)
    return p


def add_training_args(p):
    """The flags of the loss (Eqn 4-7), the optimizer and the run."""
    g = p.add_argument_group("loss (Eqn 4-7)")
    g.add_argument("--pixel-samples", type=positive_int, default=PIXEL_SAMPLES,
                   help="pixel seeds per canvas (released: 4000)")
    g.add_argument("--region-samples", type=positive_int, default=REGION_SAMPLES,
                   help="region points/canvas (released: 7200)")
    g.add_argument("--lam", type=unit_float, default=LAMBDA,
                   help="Eqn 7 weight of the pixel-level loss (paper: 0.5; 1 = pixel only, 0 = region only)")
    g.add_argument("--eps", type=positive_float, default=SINKHORN_EPS,
                   help="Sinkhorn epsilon (SwAV: 0.05); smaller: sharper")
    g.add_argument("--sinkhorn-iters", type=positive_int, default=SINKHORN_ITERS, help="Sinkhorn iterations (SwAV: 3)")
    g.add_argument("--tau", type=positive_float, default=TAU, help="softmax temperature of Eqn 4 and 6 (paper: 0.1)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--epochs", type=positive_int, default=25, help="epochs (paper: 25; ablations 100)")
    g.add_argument("--steps", type=positive_int, default=None, help="total steps instead of --epochs (short runs)")
    g.add_argument("--lr", type=positive_float, default=0.1,
                   help="SGD learning rate of each of the 4 groups (paper: 0.1)")
    g.add_argument("--min-lr", type=ranged(float, 0), default=1e-5,
                   help="final lr of the cosine schedule (paper: 1e-5)")
    g.add_argument("--warmup-epochs", type=ranged(float, 0), default=2,
                   help="linear warm-up from lr 0 per step (paper: 2)")
    g.add_argument("--momentum", type=ranged(float, 0, 1), default=0.9, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=ranged(float, 0), default=1e-4,
                   help="SGD weight decay, all parameters (paper: 1e-4)")
    g.add_argument("--no-amp", action="store_true", help="fp32 throughout (default: autocast, fp16 + GradScaler "
                   "on CUDA, bf16 on CPU; the loss is fp32 either way)")
    add_parallel_args(g)
    g.add_argument("--device", default="auto", help="auto|cpu|cuda: auto picks CUDA when torch sees one, else CPU")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every random draw of the run")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true",
                   help="continue from checkpoint.pt in the output folder; the result equals an uninterrupted run")
    g.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop once global step N is done, after writing checkpoint.pt, as an interruption would")
    g.add_argument("--save-every", type=positive_int, default=500,
                   help="write checkpoint.pt every N global steps (and at each epoch's end and at the end)")
    g.add_argument("--log-every", type=positive_int, default=20, help="steps between log lines")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (the log lines stay)")
    g.add_argument("--overwrite", action="store_true", help="retrain even when WORK/swav/model.pt exists")
    g.add_argument("--force-resume", action="store_true", help="--resume even if the checkpoint's settings differ")


def main(argv=None):
    try:
        return run_main(run, get_args_parser().parse_args(argv), "swav_dense.py")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
