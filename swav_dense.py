"""Stage 4: dense SwAV pre-training that pulls together corresponding pixels and regions of copy-paste samples.

Paper: Zeng et al., "Copy-Pasting Coherent Depth Regions Improves Contrastive Learning for Urban-Scene
Segmentation", BMVC 2022, Sec 3.4, Eqn 4-7 (clustering losses after SwAV, Caron et al. NeurIPS 2020).

copypaste.py (cross-context samples, every geometric transform recorded) -> swav_dense.py -> cluster.py
(unsupervised segmentation from the prototypes) and finetune.py (supervised semantic FPN).

Network: torchvision ResNet (trainable BatchNorm) -> FeaturePyramidNetwork (256 ch) -> semantic-FPN head
(128 ch at stride 4) -> projector (1x1 conv + BN + ReLU, 1x1 conv) -> K prototypes (1x1 conv, no bias, each
prototype L2-normalised before every step). The 2M canvases of a sample go through the network as one batch,
each after its own random augmentation (recorded as a 3x3 matrix G). Positives:
  pixel level:  a point of a canvas is traced back to its source image through G^-1 and the slot matrix A^-1,
                then forward into every other copy of its region; the copies that are still visible there
                (not occluded by a later paste) form one group;
  region level: all points that fall on one region, on any canvas, form one group.
Per level, codes Q = Sinkhorn(scores) (Eqn 4), the target of a point is the mean code of its group (Eqn 5),
the loss is the cross-entropy with the softmax of the scores (Eqn 6), and Eqn 7 mixes the two levels.

Reads / writes (WORK = --work):
| file                                   | content                                                            |
|----------------------------------------|--------------------------------------------------------------------|
| WORK/samples/epoch_EEE/NNNNNN.pt (in)  | copypaste.py samples: images uint8 (2M,3,H,W), labels int32 (2M,H,W)|
|                                        | = r*T+s, transforms float32 (R,T,3,3), canvas_of int64 (R,T), slots |
| WORK/swav/checkpoint.pt (out)          | model, optimiser, scheduler, scaler, epoch, step, RNG states, args |
| WORK/swav/model.pt (out)               | {"arch", "model": state_dict, "args", "num_prototypes", ...}       |
| WORK/swav/log.jsonl (out)              | one JSON line per step: step, epoch, loss, loss_pixel, loss_region, lr|

Commands:
    python swav_dense.py --work runs/cityscapes --on-the-fly --data CITYSCAPES --size 384 768 --mix 8 --resume
                                          # paper: ResNet-50, K 1000, 25 epochs of M = 8 samples, one GPU, AMP
    python swav_dense.py --work runs/toy --arch resnet18 --input-size 96 192 --num-prototypes 100 \
        --pixel-samples 1000 --region-samples 1000 --steps 150 --workers 0 --device cpu --no-amp
                                          # toy city samples of copypaste.py, CPU, a few minutes

Deviations from the paper / released code, stated plainly:
- Region groups are label // T (the released code divides by M, right only when T = M = 8).
- Batches of more than one sample work (canvas and region/seed ids offset per sample); the paper used 1.
- The FPN is torchvision's FeaturePyramidNetwork (detectron2's FPN in the released code: same structure,
  1x1 lateral, 3x3 output, nearest x2 top-down, sum). The semantic head upsamples to the exact size of the
  next finer level (= bilinear x2 when H and W are multiples of 32, as in detectron2).
- The four SGD parameter groups are backbone (ResNet + FPN, detectron2's "backbone"), head, projector,
  prototypes; weight decay applies to all parameters.
- The loss is computed by one fused function (Eqn 4-6) that keeps one N x K matrix per level for the backward
  pass instead of several, runs Sinkhorn in its scaling-vector form and forms no N x K target matrix; it equals
  the textbook composition (sinkhorn, group_mean_codes, swav_cross_entropy: tested, values and gradients).
- Features are sampled bilinearly at the points with border cells repeated (grid_sample pads with zeros; after
  the L2 normalisation the two agree).
- --input-size (not in the paper) lets CPU runs feed smaller canvas images; labels and matrices stay exact.
"""
import argparse
import glob
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import FeaturePyramidNetwork

# ----------------------------------------------------------------------------------------------------------
# Paper constants (Sec 3.4 and Sec 4; SwAV for the Sinkhorn settings)
# ----------------------------------------------------------------------------------------------------------
NUM_PROTOTYPES = 1000  # K, Sec 3.4
PROJ_DIM = 128  # projector output dimension (released code)
HEAD_DIM = 128  # semantic-FPN head channels (detectron2 SEM_SEG_HEAD.CONVS_DIM)
FPN_DIM = 256  # FPN channels (detectron2 default)
HEAD_GROUPS = 32  # GroupNorm groups in the semantic head (detectron2 "GN")
SINKHORN_EPS = 0.05  # epsilon of the Sinkhorn-Knopp codes (SwAV)
SINKHORN_ITERS = 3  # Sinkhorn iterations (SwAV)
TAU = 0.1  # softmax temperature, Eqn 6
LAMBDA = 0.5  # Eqn 7 weight of the pixel-level loss (Table 2 also uses 1)
PIXEL_SAMPLES = 4000  # pixel-level seed points per canvas (released code)
REGION_SAMPLES = 7200  # region-level points per canvas (released code)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_CHANNELS = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
                   "resnet50": [256, 512, 1024, 2048], "resnet101": [256, 512, 1024, 2048]}


# ----------------------------------------------------------------------------------------------------------
# Geometry: normalised coordinates (grid_sample, align_corners=False), homogeneous 3x3 matrices
# ----------------------------------------------------------------------------------------------------------
def apply_homography(matrix, points):
    """Map points (..., 2) by 3x3 matrices (..., 3, 3) acting on column vectors [x, y, 1]; fp32 or fp64."""
    x, y = points[..., 0], points[..., 1]
    m = matrix
    w = m[..., 2, 0] * x + m[..., 2, 1] * y + m[..., 2, 2]
    xo = (m[..., 0, 0] * x + m[..., 0, 1] * y + m[..., 0, 2]) / w
    yo = (m[..., 1, 0] * x + m[..., 1, 1] * y + m[..., 1, 2]) / w
    return torch.stack([xo, yo], dim=-1)


def label_lookup(labels, canvas, points):
    """Nearest-pixel label of `labels` (C, H, W) at normalised `points` (N, 2) of canvases `canvas` (N,).

    Pixel column i covers x in [2i/W - 1, 2(i+1)/W - 1), so its index is floor((x + 1) W / 2). Points outside
    the canvas, or with canvas < 0, get -1.
    """
    _, height, width = labels.shape
    col = torch.floor((points[:, 0] + 1) * (width / 2)).long()
    row = torch.floor((points[:, 1] + 1) * (height / 2)).long()
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (canvas >= 0)
    value = labels[canvas.clamp(min=0), row.clamp(0, height - 1), col.clamp(0, width - 1)].long()
    return torch.where(inside, value, torch.full_like(value, -1))


def inside_canvas(points):
    """True where normalised points (..., 2) lie inside [-1, 1)^2 (the area the network sees)."""
    return (points >= -1).all(-1) & (points < 1).all(-1)


def uniform_points(num_canvases, num_points, generator=None):
    """(num_canvases, num_points, 2) points uniform in [-1, 1]^2, fp32, drawn on the CPU (device-independent)."""
    return torch.rand(num_canvases, num_points, 2, generator=generator) * 2 - 1


# ----------------------------------------------------------------------------------------------------------
# Positives (Sec 3.4): pixel level (traced through the recorded matrices) and region level
# ----------------------------------------------------------------------------------------------------------
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
    num_canvases = labels.shape[0]
    num_slots = transforms.shape[1]
    eye = torch.eye(3, device=device, dtype=torch.float32)
    used = canvas_of >= 0
    a = torch.where(used[..., None, None], transforms.float(), eye)  # (R, T, 3, 3), identity where unused
    a_inv = torch.linalg.inv(a)
    g_aug = augment.float()
    g_inv = torch.linalg.inv(g_aug)

    g = uniform_points(num_canvases, num_points, generator).to(device)  # (C, P, 2)
    seed_canvas = torch.arange(num_canvases, device=device).repeat_interleave(num_points)
    g = g.reshape(-1, 2)
    u = apply_homography(g_inv[seed_canvas], g)
    label = label_lookup(labels, seed_canvas, u)
    ok = (label >= 0) & (label < transforms.shape[0] * num_slots)
    u, label = u[ok], label[ok]
    r, s = label // num_slots, label % num_slots
    p = apply_homography(a_inv[r, s], u)  # (S, 2) in r's source image
    # every slot s' of r: (S, T)
    u_all = apply_homography(a[r], p[:, None, :])  # (S, T, 2) in the canvases before augmentation
    c_all = canvas_of[r]  # (S, T)
    g_all = apply_homography(g_aug[c_all.clamp(min=0)], u_all)  # (S, T, 2) in the augmented views
    expect = r[:, None] * num_slots + torch.arange(num_slots, device=device)
    found = label_lookup(labels, c_all.reshape(-1), u_all.reshape(-1, 2)).view_as(c_all)
    valid = (c_all >= 0) & (found == expect) & inside_canvas(g_all)
    keep = valid.sum(1) >= 2
    valid = valid[keep]
    group = torch.arange(int(keep.sum()), device=device)[:, None].expand_as(valid)[valid]
    return g_all[keep][valid], c_all[keep][valid], group, int(keep.sum())


def region_positives(labels, augment, num_slots, num_points, generator=None):
    """Region-level positive groups of one sample (Sec 3.4), in fp32.

    Per canvas i, num_points points g uniform in the augmented view; the group of g is its region
    r = label_i(G_i^-1 g) // T (T slots per region; the released code divides by M, right only when T = M).
    Returns points (N, 2), canvas (N,), group (N,) = region id, and None in place of the number of groups
    (R = transforms.shape[0], which the caller has; batch_positives fills it in).
    """
    device = labels.device
    num_canvases = labels.shape[0]
    g = uniform_points(num_canvases, num_points, generator).to(device).reshape(-1, 2)
    canvas = torch.arange(num_canvases, device=device).repeat_interleave(num_points)
    u = apply_homography(torch.linalg.inv(augment.float())[canvas], g)
    label = label_lookup(labels, canvas, u)
    ok = label >= 0
    return g[ok], canvas[ok], label[ok] // num_slots, None


def batch_positives(samples, pixel_samples, region_samples, generator=None, pixel=True, region=True):
    """Positives of a batch of samples, with canvas, seed and region ids offset per sample.

    samples: list of dicts with labels, transforms, canvas_of, augment (see pixel_positives). Returns
    {"pixel": (points, canvas, group, num_groups), "region": (...)} for the levels asked for.
    """
    out = {}
    levels = [("pixel", pixel), ("region", region)]
    for level, wanted in levels:
        if not wanted:
            continue
        points, canvases, groups = [], [], []
        canvas_offset = group_offset = 0
        for sample in samples:
            labels, transforms = sample["labels"], sample["transforms"]
            if level == "pixel":
                pts, can, grp, num = pixel_positives(labels, transforms, sample["canvas_of"], sample["augment"],
                                                    pixel_samples, generator)
            else:
                pts, can, grp, _ = region_positives(labels, sample["augment"], transforms.shape[1],
                                                    region_samples, generator)
                num = transforms.shape[0]
            points.append(pts)
            canvases.append(can + canvas_offset)
            groups.append(grp + group_offset)
            canvas_offset += labels.shape[0]
            group_offset += num
        out[level] = (torch.cat(points), torch.cat(canvases), torch.cat(groups), group_offset)
    return out


def sample_features(features, canvas, points):
    """Bilinearly sample features (B, D, h, w) at normalised points (N, 2) of canvases (N,) -> (N, D).

    Feature cell j of a map of width w is centred at x = (2j + 1)/w - 1 (align_corners=False, the image
    convention). Border cells are repeated outside (after L2 normalisation this equals grid_sample's zero
    padding). One embedding_bag call: 4 weighted rows per point, forward and backward much cheaper on CPU than
    grid_sample over a padded grid.
    """
    _, dim, height, width = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, dim)  # (B h w, D)
    x = (points[:, 0] + 1) * (width / 2) - 0.5  # continuous cell coordinates
    y = (points[:, 1] + 1) * (height / 2) - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], 1).clamp(0, width - 1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], 1).clamp(0, height - 1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1).to(features.dtype)
    index = (canvas[:, None] * height + ys) * width + xs  # (N, 4) rows of `flat`
    return F.embedding_bag(index, flat, per_sample_weights=weights, mode="sum")


# ----------------------------------------------------------------------------------------------------------
# Loss (Eqn 4-7)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn(scores, eps=SINKHORN_EPS, iters=SINKHORN_ITERS, out=None):
    """Eqn 4: Sinkhorn-Knopp codes of scores (N samples, K prototypes), in fp32, in place in `out`.

    Q = exp(S / eps) normalised to total 1; each iteration scales every prototype (column) to total 1/K, then
    every sample (row) to total 1/N; finally x N so each sample's code sums to 1 (in SwAV's K x B layout:
    columns sum to 1, rows to B/K). The global maximum is subtracted first (cancels in the normalisation).
    """
    num, k = scores.shape
    q = out if out is not None else torch.empty(num, k, dtype=torch.float32, device=scores.device)
    torch.sub(scores, scores.max(), out=q)
    q.mul_(1.0 / eps).exp_()
    q.div_(q.sum())
    for _ in range(iters):
        q.div_(q.sum(0, keepdim=True) * k)
        q.div_(q.sum(1, keepdim=True) * num)
    q.mul_(num)
    return q


def group_mean_codes(codes, group, num_groups):
    """Eqn 5: mean code of each group (num_groups, K); a point's target is row group[n] (itself included)."""
    sums = codes.new_zeros(num_groups, codes.shape[1]).index_add_(0, group, codes)
    counts = torch.bincount(group, minlength=num_groups).clamp(min=1).to(codes.dtype)
    return sums / counts[:, None]


def swav_cross_entropy(scores, targets, tau=TAU):
    """Eqn 6 (textbook form): mean over samples of -sum_k target_k log softmax(scores / tau)_k."""
    return -(targets * F.log_softmax(scores / tau, dim=1)).sum(1).mean()


class Workspace:
    """Persistent flat fp32 buffers reused across steps (keeps the large N x K matrices out of the allocator).

    A buffer handed out by get() stays valid until the next get() with the same name; do not run two graphs
    that share a workspace before their backward passes.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, name, shape, device):
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < size or buf.device != torch.device(device):
            buf = torch.empty(int(size * 1.25) + 1, dtype=torch.float32, device=device)
            self.buffers[name] = buf
        return buf[:size].view(*shape)


@torch.no_grad()
def sinkhorn_scalings(kernel, iters=SINKHORN_ITERS):
    """Eqn 4 in scaling form: vectors a (N,), b (K,) with sinkhorn codes Q_nk = a_n kernel_nk b_k.

    kernel = exp(S / eps) (N, K), read only (2 matrix-vector products per iteration instead of rewriting the
    matrix). Same iterations as sinkhorn(): b = 1 / (K kernel^T a) (prototypes to 1/K), a = 1 / (N kernel b)
    (samples to 1/N), finally x N (each sample's code sums to 1); constant factors cancel.
    """
    num, k = kernel.shape
    a = kernel.new_ones(num)
    b = kernel.new_ones(k)
    for _ in range(iters):
        b = 1.0 / (k * torch.mv(kernel.t(), a))
        a = 1.0 / (num * torch.mv(kernel, b))
    return a * num, b


class _GroupedSwAVLoss(torch.autograd.Function):
    """Eqn 4-6 for one level, fused, fp32: L2 normalisation of the projections, Sinkhorn, group targets, loss.

    z = x / |x|; L = 1/N sum_n [logsumexp_k(S_nk / tau) - sum_k qbar_{g(n),k} S_nk / tau] with S = Z C^T and
    qbar the Eqn 5 group-mean codes (each sums to 1). dL/dS = (P - qbar_g) / (tau N), P = softmax(S / tau).
    No N x K target matrix is formed: sum_n qbar_{g(n)} . S_n = sum_g (qbar_g C) . Zsum_g (Zsum_g = sum of the
    group's z); P is kept unnormalised (E' = exp(S / tau), with its row sums). The large matrices and the N x D
    temporaries live in workspace buffers reused from step to step. Needs |S| <= 1 (C L2-normalised).
    """

    @staticmethod
    def forward(ctx, x, prototypes, group, num_groups, eps, tau, iters, workspace, name):
        num, dim, k = x.shape[0], x.shape[1], prototypes.shape[0]
        ws = workspace if workspace is not None else Workspace()
        norms = x.norm(dim=1).clamp_(min=1e-12)
        z = torch.div(x, norms[:, None], out=ws.get(f"z_{name}", (num, dim), x.device))  # Z
        e = ws.get(f"softmax_{name}", (num, k), x.device)  # E' = exp(S / tau), kept for backward
        torch.mm(z, prototypes.t() * (1.0 / tau), out=e).exp_()  # 1/tau folded into the small (D, K) factor
        kernel = ws.get("kernel", (num, k), x.device)  # exp(S / eps) = E'^(tau / eps), scratch of both levels
        torch.pow(e, tau / eps, out=kernel)  # a square for the paper's eps 0.05, tau 0.1
        a, b = sinkhorn_scalings(kernel, iters)  # Eqn 4: Q = diag(a) kernel diag(b)
        # Eqn 5: qbar_g = mean over the group of Q_n = (sum_n in g a_n kernel_n) * b / |g|
        kernel.mul_(a[:, None])
        qsum = ws.get("group_codes", (num_groups, k), x.device).zero_().index_add_(0, group, kernel)
        counts = torch.bincount(group, minlength=num_groups).clamp(min=1).to(x.dtype)
        qbar = qsum.mul_(b[None, :]).div_(counts[:, None])  # (G, K)
        zsum = z.new_zeros(num_groups, dim).index_add_(0, group, z)  # (G, D)
        qbar_c = qbar @ prototypes  # (G, D)
        qbar_t_zsum = qbar.t() @ zsum  # (K, D)
        target_term = (qbar_c * zsum).sum() / tau
        # Eqn 6: logsumexp_k(S_nk / tau) = log sum_k E'_nk (|S| <= 1: no overflow)
        row_sum = e.sum(1)
        lse = row_sum.log().sum()
        ctx.save_for_backward(z, norms, prototypes, e, row_sum, qbar_c, qbar_t_zsum, group)
        ctx.scale = 1.0 / (tau * num)
        ctx.workspace, ctx.name = ws, name
        return (lse - target_term) / num

    @staticmethod
    def backward(ctx, grad):
        z, norms, prototypes, e, row_sum, qbar_c, qbar_t_zsum, group = ctx.saved_tensors
        g = grad * ctx.scale
        num, dim = z.shape
        ws = ctx.workspace
        scratch = ws.get(f"scratch_{ctx.name}", (num, dim), z.device)
        grad_x = grad_c = None
        if ctx.needs_input_grad[1]:  # dL/dC = (P^T Z - qbar^T Zsum) g, P = E' / row_sum
            torch.div(z, row_sum[:, None], out=scratch)
            grad_c = (e.t() @ scratch - qbar_t_zsum) * g
        if ctx.needs_input_grad[0]:
            gz = torch.mm(e, prototypes, out=ws.get(f"grad_{ctx.name}", (num, dim), z.device))
            gz.div_(row_sum[:, None]).sub_(torch.index_select(qbar_c, 0, group, out=scratch)).mul_(g)  # dL/dZ
            # through z = x / |x|: dL/dx = (dL/dz - z (z . dL/dz)) / |x|, in place
            dot = torch.bmm(gz[:, None, :], z[:, :, None])[:, 0]  # (N, 1)
            grad_x = gz.addcmul_(z, dot, value=-1).div_(norms[:, None])
        return grad_x, grad_c, None, None, None, None, None, None, None


def grouped_swav_loss(x, prototypes, group, num_groups, eps=SINKHORN_EPS, tau=TAU, iters=SINKHORN_ITERS,
                      workspace=None, name="level"):
    """Eqn 4-6 for one level: x (N, D) sampled projections (L2-normalised here), prototypes (K, D)
    L2-normalised, group (N,) ids < num_groups.

    Equals swav_cross_entropy(S, group_mean_codes(sinkhorn(S), group)[group]) with S = normalize(x) C^T, in
    fp32, keeping one N x K matrix (in `workspace` buffers when given) instead of several. A workspace's buffers
    are reused by the next call of the same name: backward() before calling it again.
    """
    if x.shape[0] == 0:
        return (x.sum() + prototypes.sum()) * 0.0
    return _GroupedSwAVLoss.apply(x.float(), prototypes.float(), group, num_groups, eps, tau, iters, workspace,
                                  name)


def dense_swav_loss(features, positives, prototypes, lam=LAMBDA, eps=SINKHORN_EPS, tau=TAU,
                    iters=SINKHORN_ITERS, workspace=None):
    """Eqn 7: L = lam L_pixel + (1 - lam) L_region, from projector features (B, D, h, w) and batch_positives().

    Sampling, normalisation, Sinkhorn and the loss run in fp32. Returns (loss, {"pixel": ..., "region": ...}).
    """
    features = features.float()
    protos = F.normalize(prototypes.float(), dim=1)
    parts = {}
    for lvl in ("pixel", "region"):
        if lvl in positives:
            points, canvas, group, num_groups = positives[lvl]
            x = sample_features(features, canvas, points)  # sampled projections, normalised in the loss
            parts[lvl] = grouped_swav_loss(x, protos, group, num_groups, eps, tau, iters, workspace, lvl)
    weights = {"pixel": lam, "region": 1.0 - lam}
    loss = sum(weights[lvl] * parts[lvl] for lvl in parts)
    return loss, parts


def learning_rate(step, total_steps, warmup_steps, base_lr, min_lr):
    """Per-iteration schedule: linear warm-up from 0 over warmup_steps, then cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------
# Network: ResNet + FPN + semantic-FPN head + projector + prototypes
# ----------------------------------------------------------------------------------------------------------
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
    """backbone -> fpn -> head (semantic_features) -> projector (forward); prototypes scored by dense_projections."""

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
        """(B, 3, H, W) ImageNet-normalised -> (B, head_dim, H/4, W/4) head output (what fine-tuning uses)."""
        pyramid = self.fpn(self.backbone(x))
        return self.head([pyramid[k] for k in ("p2", "p3", "p4", "p5")])

    def forward(self, x):
        """(B, 3, H, W) -> (B, proj_dim, H/4, W/4) projector output, not normalised."""
        return self.projector(self.semantic_features(x))

    @torch.no_grad()
    def normalize_prototypes(self):
        """Each prototype L2-normalised (before every step, as in SwAV)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w.flatten(1), dim=1).view_as(w))


def build_model(arch="resnet50", num_prototypes=NUM_PROTOTYPES, proj_dim=PROJ_DIM, head_dim=HEAD_DIM):
    """The dense SwAV network (random initialisation; prototypes L2-normalised)."""
    model = DenseSwAV(arch, num_prototypes, proj_dim, head_dim)
    model.normalize_prototypes()
    return model


def dense_projections(model, images):
    """(z (B, D, h, w) L2-normalised projections, scores (B, K, h, w) = z . L2-normalised prototypes), fp32."""
    z = F.normalize(model(images).float(), dim=1)
    protos = F.normalize(model.prototypes.weight.float().flatten(1), dim=1)
    scores = F.conv2d(z, protos[:, :, None, None])
    return z, scores


def load_backbone_weights(model, path):
    """Load a local torchvision ResNet state_dict (e.g. torch.save(resnet50(weights=...).state_dict(), FILE))
    into model.backbone, strictly (fc.* ignored: the classifier is not part of the backbone)."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"--init imagenet needs --backbone-weights FILE, a local torchvision {model.arch} "
                                f"state_dict (nothing is downloaded); got {path!r}. Make one where the internet "
                                f"is reachable: torch.save(torchvision.models.{model.arch}(weights='DEFAULT')"
                                f".state_dict(), FILE)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model.backbone.load_state_dict(state, strict=True)


def load_model(path, map_location="cpu"):
    """(model, checkpoint dict) from a swav_dense.py model.pt (or checkpoint.pt), strict."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pre-train the network first with "
                                f"`python swav_dense.py --work WORK` (stage 4, swav_dense.py)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    for key in ("arch", "model", "num_prototypes"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a swav_dense.py model file (no '{key}')")
    model = build_model(ckpt["arch"], ckpt["num_prototypes"], ckpt.get("proj_dim", PROJ_DIM),
                        ckpt.get("head_dim", HEAD_DIM))
    model.load_state_dict(ckpt["model"], strict=True)
    return model, ckpt


# ----------------------------------------------------------------------------------------------------------
# Input / output: samples, per-canvas augmentation, batches, checkpoints
# ----------------------------------------------------------------------------------------------------------
SAMPLE_KEYS = {"images": torch.uint8, "labels": torch.int32, "transforms": torch.float32, "canvas_of": torch.int64}


def item_seed(seed, epoch, index):
    """A reproducible per-(epoch, item) seed: augmentation draws do not depend on workers or resumption."""
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


def normalize_image(image_uint8):
    """uint8 (..., 3, H, W) -> float32 ImageNet-normalised (no augmentation: G = identity)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image_uint8.float() / 255 - mean) / std


def augment_sample(sample, generator, augment=True, photometric=True, input_size=None):
    """Per-canvas training augmentation (copypaste.augment_canvas) of every canvas, recording G (2M, 3, 3).

    input_size (H, W): resize the canvas images first (antialiased). Normalised coordinates do not depend on the
    resolution, so labels, transforms and G stay exact; the network just sees fewer pixels.
    """
    images, matrices = [], []
    if augment:
        from copypaste import augment_canvas  # stage 3 owns the augmentation and its matrices
    canvases = sample["images"]
    if input_size is not None and tuple(input_size) != tuple(canvases.shape[-2:]):
        canvases = F.interpolate(canvases.float() / 255, size=tuple(input_size), mode="bilinear",
                                 align_corners=False, antialias=True).clamp_(0, 1)
        canvases = (canvases * 255).round_().to(torch.uint8)
    for canvas in canvases:
        if augment:
            image, g = augment_canvas(canvas, generator, photometric=photometric)
        else:
            image, g = normalize_image(canvas), torch.eye(3)
        images.append(image)
        matrices.append(g.float())
    out = {k: sample[k] for k in ("labels", "transforms", "canvas_of")}
    out["images"] = torch.stack(images)
    out["augment"] = torch.stack(matrices)
    return out


class SampleFiles(torch.utils.data.Dataset):
    """Samples written by copypaste.py (WORK/samples/epoch_EEE/*.pt), augmented per canvas when read.

    Training epoch e reads folder epoch_{e mod E} (E folders written). Item i of epoch e is augmented with
    a generator seeded by (seed, e, i).
    """

    def __init__(self, root, seed=0, augment=True, photometric=True, input_size=None):
        self.input_size = input_size
        self.folders = sorted(glob.glob(os.path.join(root, "epoch_*")))
        self.files = [sorted(glob.glob(os.path.join(f, "*.pt"))) for f in self.folders]
        if not self.folders or not self.files[0]:
            raise FileNotFoundError(f"no samples in {root}/epoch_*/*.pt: make them with copypaste.py "
                                    f"(`python copypaste.py --work WORK --data DATA --split train`), or pass "
                                    f"--on-the-fly")
        self.seed, self.augment, self.photometric = seed, augment, photometric
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.files[self.epoch % len(self.files)])

    def __getitem__(self, index):
        path = self.files[self.epoch % len(self.files)][index]
        sample = torch.load(path, map_location="cpu", weights_only=True)
        check_sample(sample, path)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        return augment_sample(sample, generator, self.augment, self.photometric, self.input_size)


class OnTheFlySamples(torch.utils.data.Dataset):
    """copypaste.CopyPasteDataset built on the fly, then augmented per canvas like SampleFiles."""

    def __init__(self, base, seed=0, augment=True, photometric=True, input_size=None):
        self.input_size = input_size
        self.base, self.seed, self.augment, self.photometric = base, seed, augment, photometric
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        sample = self.base[index]
        check_sample(sample, f"CopyPasteDataset[{index}]")
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        return augment_sample(sample, generator, self.augment, self.photometric, self.input_size)


def collate_samples(samples):
    """A batch is a list of samples (canvas counts and region counts may differ): kept as a list."""
    return samples


def epoch_batches(num_items, batch_samples, seed, epoch):
    """The epoch's shuffled batches of item indices (drop the incomplete last one); reproducible."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    batches = [order[i:i + batch_samples] for i in range(0, num_items - batch_samples + 1, batch_samples)]
    return batches or [order]


def worker_init(_):
    torch.set_num_threads(1)


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def global_rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_global_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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


def swav_model_file(model, args, step):
    """The model.pt dict: everything a consumer needs to rebuild the network."""
    return {"arch": args.arch, "model": model.state_dict(), "args": vars(args), "num_prototypes":
            args.num_prototypes, "proj_dim": args.proj_dim, "head_dim": args.head_dim, "step": step}


def parameter_groups(model):
    """The four SGD groups: backbone (ResNet + FPN), head, projector, prototypes."""
    return [{"name": "backbone", "params": list(model.backbone.parameters()) + list(model.fpn.parameters())},
            {"name": "head", "params": list(model.head.parameters())},
            {"name": "projector", "params": list(model.projector.parameters())},
            {"name": "prototypes", "params": list(model.prototypes.parameters())}]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def dense_swav_step(model, net, batch, args, device, amp_dtype, scaler, optimizer, workspace, generator):
    """One SGD step on a batch (list of augmented samples); returns (loss, {level: loss}, images in the batch)."""
    model.normalize_prototypes()  # each prototype L2-normalised before every step
    images = torch.cat([s["images"] for s in batch]).to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        features = net(images)  # (B, D, H/4, W/4) projector output
    with torch.autocast(device.type, enabled=False):  # coordinate algebra, Sinkhorn and loss in fp32
        samples = [{k: s[k].to(device) for k in ("labels", "transforms", "canvas_of", "augment")} for s in batch]
        positives = batch_positives(samples, args.pixel_samples, args.region_samples, generator,
                                    pixel=args.lam > 0, region=args.lam < 1)
        loss, parts = dense_swav_loss(features, positives, model.prototypes.weight.flatten(1), args.lam,
                                      args.eps, args.tau, args.sinkhorn_iters, workspace)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}: stopping (lower --lr, or try --no-amp)")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), {k: v.item() for k, v in parts.items()}, images.shape[0]


def build_dataset(args):
    augment = not args.no_augment
    if args.on_the_fly:
        import copypaste  # stage 3 builds the samples
        if not (args.data or args.images):
            raise ValueError("--on-the-fly needs --data DATA --split S (or --images GLOB)")
        paths, _ = copypaste.list_images(args.data, args.split, args.images)
        base = copypaste.CopyPasteDataset(
            paths, args.disp_dir or os.path.join(args.work, "disp"),
            args.regions_dir or os.path.join(args.work, "regions"), mix=args.mix, paste_times=args.paste_times,
            size=args.size, photometric=not args.no_photometric, seed=args.seed)
        return OnTheFlySamples(base, args.seed, augment, not args.no_photometric, args.input_size)
    return SampleFiles(os.path.join(args.work, "samples"), args.seed, augment, not args.no_photometric,
                       args.input_size)


def swav_network(args, device):
    """The seeded DenseSwAV on the device (ImageNet backbone with --init imagenet) and the view that runs it:
    torch.compile'd with --compile, else the model itself. Returns (model, net)."""
    seed_everything(args.seed)
    model = build_model(args.arch, args.num_prototypes, args.proj_dim, args.head_dim)
    if args.init == "imagenet":
        load_backbone_weights(model, args.backbone_weights)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    return model, net


def swav_optimiser(model, args, device, amp_dtype, total, warmup):
    """SGD over the four groups, the per-step warm-up + cosine schedule (as a factor of --lr) and the fp16
    GradScaler (a no-op otherwise). Returns (optimizer, scheduler, scaler)."""
    optimizer = torch.optim.SGD(parameter_groups(model), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s, total, warmup, args.lr, args.min_lr) / args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def resume_swav(args, ckpt_path, model, optimizer, scheduler, scaler):
    """With --resume, restore checkpoint.pt (weights, optimiser, schedule, scaler and the global RNGs, so the
    run continues exactly); returns the step to start from (0 for a fresh run)."""
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_global_rng_states(ckpt["rng"])
        step = ckpt["step"]
        print(f"[swav_dense] resumed from {ckpt_path} at step {step} (epoch {ckpt['epoch']})")
        return step
    if args.resume:
        print(f"[swav_dense] --resume: no {ckpt_path}, starting from scratch")
    return 0


def save_swav_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, args, epoch, step):
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                 "step": step, "rng": global_rng_states(), "args": vars(args), "arch": args.arch,
                 "num_prototypes": args.num_prototypes, "proj_dim": args.proj_dim,
                 "head_dim": args.head_dim}, ckpt_path)


def swav_epoch_loader(dataset, args, device, epoch, offset):
    """The epoch's batches from the offset-th on (a resumed run skips the ones it has done)."""
    dataset.set_epoch(epoch)
    batches = epoch_batches(len(dataset), args.batch_samples, args.seed, epoch)[offset:]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                       collate_fn=collate_samples, worker_init_fn=worker_init,
                                       pin_memory=device.type == "cuda")


def log_swav_step(log, bar, args, record, parts, total, stop_at, start_time, start_step):
    """log.jsonl gets every step; the printed line comes every --log-every steps and at the last one."""
    step, epoch, loss, lr, speed = (record[k] for k in ("step", "epoch", "loss", "lr", "images_per_s"))
    log.write(json.dumps(record) + "\n")
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
    bar.update(1)
    if step % args.log_every == 0 or step == stop_at:
        eta = (stop_at - step) * (time.time() - start_time) / max(step - start_step, 1)
        levels = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
        bar.write(f"[swav_dense] step {step}/{total} epoch {epoch} loss {loss:.4f} ({levels}) lr {lr:.3e} "
                  f"{speed:.1f} img/s eta {eta / 60:.1f} min")
        log.flush()


def warn_swav_collapse(bar, recent, loss, step, warmup, collapse_floor):
    """A loss that stays at ln K after warm-up means uniform assignments: warn once per 50 such steps.
    Returns the updated window of recent losses."""
    recent = (recent + [loss])[-50:]
    if step > warmup and len(recent) == 50 and min(recent) > 0.98 * collapse_floor:
        bar.write(f"[swav_dense] WARNING: the loss stays near ln K = {collapse_floor:.3f} for 50 steps: "
                  "the prototypes may have collapsed (uniform assignments)")
        recent = []
    return recent


def train_swav(model, net, optimizer, scheduler, scaler, dataset, args, device, amp_dtype, out_dir, step,
               steps_per_epoch, total, warmup):
    """Train from step to --stop-after (or total), checkpointing every --checkpoint-every steps and at each
    epoch's end; returns the step reached."""
    from tqdm import tqdm
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    workspace = Workspace()
    log = open(os.path.join(out_dir, "log.jsonl"), "a" if step > 0 else "w")
    bar = tqdm(total=total, initial=step, desc="swav_dense", dynamic_ncols=True, disable=args.no_progress)
    collapse_floor, recent = math.log(args.num_prototypes), []
    stop_at = min(total, args.stop_after) if args.stop_after else total
    model.train()
    start_time, start_step, images_seen = time.time(), step, 0
    while step < stop_at:
        epoch, offset = divmod(step, steps_per_epoch)
        for batch in swav_epoch_loader(dataset, args, device, epoch, offset):
            generator = torch.Generator().manual_seed(item_seed(args.seed + 1, 0, step))  # positives' draws
            loss, parts, num_images = dense_swav_step(model, net, batch, args, device, amp_dtype, scaler, optimizer,
                                                      workspace, generator)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            images_seen += num_images
            speed = images_seen / max(time.time() - start_time, 1e-9)
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_s": speed,
                      **{f"loss_{k}": v for k, v in parts.items()}}
            log_swav_step(log, bar, args, record, parts, total, stop_at, start_time, start_step)
            recent = warn_swav_collapse(bar, recent, loss, step, warmup, collapse_floor)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_swav_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, args, epoch, step)
            if step >= stop_at:
                break
        if step % steps_per_epoch == 0 or step >= stop_at:
            save_swav_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, args, step // steps_per_epoch, step)
    bar.close()
    log.close()
    return step


def run(args):
    out_dir = os.path.join(args.work, "swav")
    final = os.path.join(out_dir, "model.pt")
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if os.path.exists(final) and not (args.overwrite or args.resume):
        print(f"[swav_dense] {final} exists: skipping (--overwrite to retrain)")
        return final
    os.makedirs(out_dir, exist_ok=True)
    device = pick_device(args.device)
    amp_dtype = None if args.no_amp else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    print("[swav_dense] args: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"[swav_dense] device {device}, amp {amp_dtype}, torch threads {torch.get_num_threads()}")

    dataset = build_dataset(args)  # fails early, naming copypaste.py, when there are no samples
    model, net = swav_network(args, device)
    steps_per_epoch = len(epoch_batches(len(dataset), args.batch_samples, args.seed, 0))
    total = args.steps if args.steps else args.epochs * steps_per_epoch
    warmup = min(total, args.warmup_epochs * steps_per_epoch)
    optimizer, scheduler, scaler = swav_optimiser(model, args, device, amp_dtype, total, warmup)
    step = resume_swav(args, ckpt_path, model, optimizer, scheduler, scaler)
    step = train_swav(model, net, optimizer, scheduler, scaler, dataset, args, device, amp_dtype, out_dir, step,
                      steps_per_epoch, total, warmup)
    if step < total:
        print(f"[swav_dense] stopped at step {step}/{total} (--stop-after); continue with --resume")
        return ckpt_path
    save_atomic(swav_model_file(model, args, step), final)
    print(f"[swav_dense] wrote {final}")
    return final


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder: reads WORK/samples, writes WORK/swav")
    g = p.add_argument_group("network")
    g.add_argument("--arch", default="resnet50", choices=sorted(RESNET_CHANNELS), help="ResNet (paper: resnet50)")
    g.add_argument("--num-prototypes", type=int, default=NUM_PROTOTYPES, help="K prototypes (paper 1000)")
    g.add_argument("--proj-dim", type=int, default=PROJ_DIM, help="projection dimension (released code 128)")
    g.add_argument("--head-dim", type=int, default=HEAD_DIM, help="semantic head channels (detectron2 128)")
    g.add_argument("--init", default="scratch", choices=["scratch", "imagenet"],
                   help="backbone initialisation (Table 1: scratch, or 'IN' from --backbone-weights)")
    g.add_argument("--backbone-weights", default=None,
                   help="local torchvision ResNet state_dict for --init imagenet (nothing is downloaded)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g = p.add_argument_group("data")
    g.add_argument("--on-the-fly", action="store_true",
                   help="build samples with copypaste.CopyPasteDataset instead of reading WORK/samples")
    g.add_argument("--data", default=None, help="dataset root, with --split (only with --on-the-fly)")
    g.add_argument("--images", default=None, help="glob of images instead of --data (only with --on-the-fly)")
    g.add_argument("--split", default="train", help="split (only with --on-the-fly)")
    g.add_argument("--disp-dir", default=None, help="<stem>.npy disparity (--on-the-fly; default WORK/disp)")
    g.add_argument("--regions-dir", default=None, help="<stem>.npy regions (--on-the-fly; default WORK/regions)")
    g.add_argument("--size", type=int, nargs=2, default=[384, 768], metavar=("H", "W"),
                   help="canvas size (only with --on-the-fly; paper 384 x 768)")
    g.add_argument("--mix", type=int, default=8, help="M source images per sample (only with --on-the-fly)")
    g.add_argument("--paste-times", type=int, nargs=2, default=[2, 4], metavar=("E1", "E2"),
                   help="pastes per region in rounds 1 and 2 (only with --on-the-fly; paper 2 4)")
    g.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize the canvas images to H x W before the network (labels and matrices stay exact: "
                        "coordinates are normalised); for cheap CPU runs. Default: the samples' size")
    g.add_argument("--no-augment", action="store_true",
                   help="no per-canvas training augmentation (G = identity): ablation and debugging")
    g.add_argument("--no-photometric", action="store_true", help="per-canvas augmentation without colour changes")
    g.add_argument("--batch-samples", type=int, default=1,
                   help="samples per step (paper 1 sample = 2M = 16 canvases)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    g = p.add_argument_group("loss (Eqn 4-7)")
    g.add_argument("--pixel-samples", type=int, default=PIXEL_SAMPLES, help="pixel-level seeds per canvas")
    g.add_argument("--region-samples", type=int, default=REGION_SAMPLES, help="region-level points per canvas")
    g.add_argument("--lam", type=float, default=LAMBDA,
                   help="Eqn 7 weight of the pixel-level loss (paper 0.5; 1 = pixel only, 0 = region only)")
    g.add_argument("--eps", type=float, default=SINKHORN_EPS, help="Sinkhorn epsilon (SwAV 0.05)")
    g.add_argument("--sinkhorn-iters", type=int, default=SINKHORN_ITERS, help="Sinkhorn iterations (SwAV 3)")
    g.add_argument("--tau", type=float, default=TAU, help="softmax temperature of Eqn 6 (0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=25, help="epochs (paper 25; ablations 100)")
    g.add_argument("--steps", type=int, default=None, help="total steps instead of --epochs (short runs)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of each of the 4 groups (0.1)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="final lr of the cosine schedule")
    g.add_argument("--warmup-epochs", type=float, default=2, help="linear warm-up from 0 (per iteration)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--no-amp", action="store_true", help="fp32 (default: fp16 + GradScaler on CUDA, bf16 on CPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue exactly from WORK/swav/checkpoint.pt")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (checkpointed) once this global step is reached, for time-limited jobs; --resume")
    g.add_argument("--checkpoint-every", type=int, default=500, help="also checkpoint every N steps (0: epochs only)")
    g.add_argument("--log-every", type=int, default=20, help="print a line every N steps")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--overwrite", action="store_true", help="retrain even when WORK/swav/model.pt exists")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, FloatingPointError, ValueError) as e:
        print(f"swav_dense.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
