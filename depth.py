"""Stage 1: self-supervised monocular depth from unlabelled driving video, the Monodepth2 recipe.

Paper: Zeng et al. (BMVC 2022) Sec 3.1 "we adopt Monodepth2" (Godard et al., "Digging Into Self-Supervised
Monocular Depth Estimation", ICCV 2019). Written from the Monodepth2 paper (its code is under a non-commercial
licence; nothing of it is pasted): ResNet encoder-decoder with sigmoid disparity at 4 scales, a separate pose
ResNet on frame pairs, the SSIM + L1 photometric error (Eqn 1) of the warp (Eqn 2), the per-pixel minimum
reprojection (Eqn 4), auto-masking (Eqn 5), full-resolution multi-scale (Sec 3.3), edge-aware smoothness (Eqn 3).
Pipeline: (video) -> depth.py -> group.py (coherent depth regions) -> copypaste.py -> ...

| reads / writes | file | shape, dtype | meaning |
|---|---|---|---|
| reads (train) | DATA/leftImg8bit_sequence/SPLIT/CITY/*.png, DATA/camera/SPLIT/CITY/*_camera.json (or KITTI raw) | | |
| writes (train) | WORK/depth/model.pt | dict | {"arch", "model": depth net state_dict, "pose_model", "args", |
| | | | "size", ...} |
| writes (train) | WORK/depth/checkpoint.pt, log.jsonl, args.json | | exact resume; one JSON line per log step |
| reads (predict) | WORK/depth/model.pt; DATA/leftImg8bit/SPLIT/*/*.png or --images GLOB | | |
| writes (predict) | WORK/disp/<stem>.npy (+ WORK/disp_preview/<stem>.png) | (H, W) float32 | scaled disparity |
| | | | 1 / depth, one scale per dataset |
| reads (eval) | WORK/disp, DATA/disparity/SPLIT/CITY/<stem>_disparity.png, camera JSON | | GT depth = baseline fx / d |
| writes (eval) | WORK/depth/eval.json | JSON | abs_rel, sq_rel, rmse, rmse_log, a1-a3, scaling ratio |

Paper scale (Cityscapes as Monodepth2 prepares it: bottom quarter cropped, 512 x 192, frames -2 0 +2; toy: pipeline.sh):
    python depth.py train --data CS --work runs/cs --size 192 512 --frame-offset 2 --crop-bottom 0.25
    python depth.py predict --work runs/cs --data CS --split train --size 384 768
    python depth.py eval --work runs/cs --data CS --split val --crop-bottom 0.25

Departures from Monodepth2:
- Encoders start from scratch unless `--weights FILE` gives a local torchvision ResNet state_dict.
- Pixel centres sit at i + 0.5 (grid_sample's align_corners=False), so normalized intrinsics are exact under
  resizing and flipping (cx -> 1 - cx). Monodepth2 puts centres at i and leaves K unchanged under flips.
- Both pose pairs go through the pose network as one batch (BatchNorm statistics over both pairs).
- Auto-masking's identity error (no scale, no gradient) and its tie-break noise are computed once per step.
- Smoothness images are the target downsampled by area averaging (Monodepth2: PIL antialiased resizes).
- The lr drops after epoch 15 of 20; with `--steps` after the same fraction of the steps.
- `predict` runs the network at the training pixel scale over the full frame (a model trained with a bottom
  crop sees height / (1 - crop), rounded to a multiple of 32) and resizes the disparity bilinearly to --size.
"""
import argparse
import collections
import glob
import itertools
import json
import os
import pickle
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

# ----- Paper constants (Monodepth2 Sec 3-4 and its Appendix; PAPER_NOTES.md stage 1) -----
SSIM_WEIGHT = 0.85             # alpha of Eqn 1: pe = alpha (1 - SSIM) / 2 + (1 - alpha) |I_a - I_b|_1
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # SSIM stabilizers (Wang et al. 2004) for intensities in [0, 1]
SMOOTHNESS_WEIGHT = 1e-3       # lambda of Eqn 3's term; divided by 2^s at scale s
MIN_DEPTH, MAX_DEPTH = 0.1, 100.0  # sigmoid -> disparity in [1/100, 1/0.1] (Sec 4, "depth in [0.1, 100]")
AUTOMASK_NOISE = 1e-5          # std of the noise added to identity errors to break ties (released code)
POSE_SCALE = 0.01              # pose-decoder outputs are scaled by 0.01 (released code)
ROTATION_EPS = 1e-7            # guard of the axis-angle normalization
ENCODER_MEAN, ENCODER_STD = 0.45, 0.225  # input normalization of the encoders (released code)
DECODER_CHANNELS = (16, 32, 64, 128, 256)  # depth decoder channels at 1/1 ... 1/16 (Appendix Table 5)
POSE_CHANNELS = 256            # pose decoder width (Appendix)
NUM_SCALES = 4                 # disparity outputs at 1, 1/2, 1/4, 1/8 of the input
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)  # color jitter ranges, p 0.5 (Sec 4.1)
EVAL_MIN_DEPTH, EVAL_MAX_DEPTH = 1e-3, 80.0  # evaluation caps (Eigen protocol, Monodepth2 Sec 4.1)
# ----- Readers of the datasets (Cityscapes layout, also the toy city, and KITTI raw), used by later stages -----
CITYSCAPES_STEM = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})$")
KITTI_RAW_FRAME = re.compile(r"(?P<drive>[^/\\]+_drive_\d{4})_sync[/\\]image_02[/\\]data[/\\](?P<frame>\d{10})\.png$")
Frame = collections.namedtuple("Frame", "stem path calib video number")  # calib file; video: (city, seq) or drive


def image_stem(path):
    """Unique stem of a frame: KITTI raw DATE_drive_NNNN_FFFFFFFFFF (from the drive folder), else the file name
    without extension and without the Cityscapes suffix (`_leftImg8bit`, `_disparity`, ...)."""
    if (m := KITTI_RAW_FRAME.search(path)) is not None:
        return f"{m['drive']}_{m['frame']}"
    name = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"_(leftImg8bit|disparity|camera|gtFine_labelIds|gtFine_instanceIds|pose)$", "", name)


def parse_stem(stem):
    """'aachen_000000_000019' -> ('aachen', 0, 19). Raises ValueError for a non-Cityscapes stem."""
    if (m := CITYSCAPES_STEM.match(stem)) is None:
        raise ValueError(f"'{stem}' is not a Cityscapes stem (city_SSSSSS_FFFFFF)")
    return m["city"], int(m["seq"]), int(m["frame"])


def list_frames(data, dataset="cityscapes", split="train", sequence=False, limit=None, need_calib=False):
    """The first `limit` Frames by stem: cityscapes DATA/leftImg8bit/SPLIT (annotated) or, with sequence, every
    video frame of DATA/leftImg8bit_sequence/SPLIT, calib = the sequence's camera JSON; kitti (raw): every
    DATA/DATE/DRIVE_sync/image_02/data/*.png, calib = DATA/DATE/calib_cam_to_cam.txt. Videos must have no gaps."""
    kitti, folder = dataset == "kitti", "leftImg8bit_sequence" if sequence else "leftImg8bit"
    pattern = os.path.join(data, "*", "*_drive_*_sync", "image_02", "data", "*.png") if kitti else \
        os.path.join(data, folder, split, "*", "*_leftImg8bit.png")
    made_by = ("KITTI raw <date>_drive_<NNNN>_sync.zip" if kitti else f"Cityscapes {folder}_trainvaltest.zip") + \
        f" (toy city: `python toycity.py --out DATA{' --layout kitti' if kitti else ''}`)"
    if not (paths := sorted(glob.glob(pattern))):
        raise FileNotFoundError(f"no frames match {pattern}: they come from {made_by}")
    cameras = {} if kitti else {parse_stem(image_stem(p))[:2]: p for p in sorted(glob.glob(os.path.join(
        data, "camera", split, "*", "*_camera.json")), reverse=True)}  # one per sequence: its annotated frame's
    frames = []
    for path, stem in ((p, image_stem(p)) for p in paths):
        if kitti:  # DATA/DATE/DRIVE_sync/image_02/data/F.png
            video, number = path.rsplit(os.sep, 3)[0], int(stem[-10:])
            calib = os.path.join(os.path.dirname(video), "calib_cam_to_cam.txt")
        else:
            video, number = parse_stem(stem)[:2], parse_stem(stem)[2]  # (city, seq), frame
            calib = cameras.get(video, os.path.join(data, "camera", split, video[0], f"{stem[:-7]}_*_camera.json"))
        if need_calib and not os.path.exists(calib):
            raise FileNotFoundError(f"{calib} is missing (intrinsics of {stem}): it comes from " + (
                f"KITTI raw {stem[:10]}_calib.zip" if kitti else "Cityscapes camera_trainvaltest.zip"))
        frames.append(Frame(stem, path, calib, video, number))
    for video, numbers in itertools.groupby(frames if sequence or kitti else [], key=lambda f: f.video):
        numbers = [f.number for f in numbers]  # a gap would hide wrong neighbours: a broken download
        if gap := sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers)):
            name = os.path.join(video, "image_02", "data", f"{gap[0]:010d}.png") if kitti else os.path.join(
                data, folder, split, video[0], f"{video[0]}_{video[1]:06d}_{gap[0]:06d}_leftImg8bit.png")
            raise FileNotFoundError(f"{name} is missing ({len(gap)} frames missing between {numbers[0]} and "
                                    f"{numbers[-1]}): it comes from {made_by}")
    return frames[:limit]


def frames_of(args, need_calib=False):
    """A per-frame stage's frames: --images GLOB or --data (--dataset, --split, --sequence), the first --limit."""
    frames = [Frame(image_stem(p), p, None, None, None) for p in sorted(glob.glob(args.images))][:args.limit] \
        if args.images else list_frames(args.data, args.dataset, args.split, args.sequence, args.limit, need_calib)
    if not frames:  # (list_frames says why)
        raise FileNotFoundError(f"--images {args.images}: no file matches")
    if dup := [s for s, n in collections.Counter(f.stem for f in frames).items() if n > 1]:  # they name outputs
        raise ValueError(f"{' and '.join(f.path for f in frames if f.stem == dup[0])} share the stem {dup[0]}: their "
                         "outputs would overwrite each other (KITTI raw: pass --data RAW --dataset kitti)")
    return frames


def add_frame_args(parser):
    """The flags that choose a per-frame stage's frames, beside its --data, --split and --images."""
    parser.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti"], help="layout of --data: "
                        "cityscapes (also the toy city) or kitti (KITTI raw: every drive, no --split)")
    parser.add_argument("--sequence", action="store_true", help="cityscapes: every video frame of "
                        "leftImg8bit_sequence/SPLIT (paper: the 89,250 train frames), not the annotated leftImg8bit")
    parser.add_argument("--limit", type=int, default=None, help="only the first N frames in stem order (smoke runs)")


def parse_shard(text):
    i, n = (int(v) for v in text.split("/"))          # argparse reports a ValueError as an invalid value
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def add_shard_arg(parser):
    """--shard i/n of a per-image stage (depth.py predict, group.py, copypaste.py): machines or a job array."""
    parser.add_argument("--shard", type=parse_shard, metavar="i/n", help="do every n-th item from the i-th "
                        "(0-based), e.g. one task of a job array; default: RANK/WORLD_SIZE under torchrun, else 0/1. "
                        "Shards never overlap, and a re-run skips finished outputs")


def shard_of(items, shard):
    """This process's share of items: every n-th from the i-th for shard (i, n), or torchrun's RANK/WORLD_SIZE."""
    i, n = shard or (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    return items[i::n]


def video_triplets(frames, offset):
    """[(target, previous, next)]: the frames numbered n, n - offset, n + offset of one video (by frame number)."""
    at = {(f.video, f.number): f for f in frames}
    return [(f, at[f.video, f.number - offset], at[f.video, f.number + offset]) for f in frames
            if (f.video, f.number - offset) in at and (f.video, f.number + offset) in at]


def split_file(data, folder, split, stem, suffix):
    """Path of a per-image Cityscapes file, e.g. split_file(D, 'gtFine', 'val', stem, 'gtFine_labelIds.png')."""
    return os.path.join(data, folder, split, parse_stem(stem)[0], f"{stem}_{suffix}")


def read_intrinsics(calib, image_size, crop_bottom=0.0):
    """Normalized (fx/W, fy/H, cx/W, cy/H) of a frame of image_size (H, W), H cut by the bottom fraction crop_bottom
    (the origin stays), from a Cityscapes camera JSON (pixels of image_size) or a KITTI calib_cam_to_cam.txt
    (P_rect_02 in pixels of S_rect_02, which is the image size)."""
    try:
        with open(calib) as f:
            if calib.endswith(".json"):
                intrinsic, (height, width) = json.load(f)["intrinsic"], image_size
                fx, fy, cx, cy = (float(intrinsic[k]) for k in ("fx", "fy", "u0", "v0"))
            else:
                rows = dict(line.split(":", 1) for line in f if ":" in line)
                P = np.array(rows["P_rect_02"].split(), dtype=np.float64).reshape(3, 4)
                width, height = map(float, rows["S_rect_02"].split())
                fx, fy, cx, cy = P[0, 0], P[1, 1], P[0, 2], P[1, 2]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{calib}: not a readable Cityscapes camera JSON with intrinsic fx, fy, u0, v0, nor a KITTI "
                         f"calib_cam_to_cam.txt with P_rect_02, S_rect_02 ({e})") from None
    return np.array([fx / width, fy / height / (1 - crop_bottom), cx / width, cy / height / (1 - crop_bottom)])


def read_disparity_png(path):
    """Cityscapes disparity PNG -> float32 disparity in pixels: d = (p - 1) / 256 for p > 0, 0 where invalid."""
    try:
        p = np.asarray(Image.open(path), dtype=np.float32)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the disparity PNG ({e})")
    return np.where(p > 0, (p - 1.0) / 256.0, 0.0).astype(np.float32)


def read_camera_baseline(path):
    """Stereo baseline in metres from a Cityscapes camera JSON (extrinsic.baseline): depth = baseline * fx / d."""
    try:
        with open(path) as f:
            return float(json.load(f)["extrinsic"]["baseline"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: no extrinsic.baseline in this camera JSON ({e})")


def load_rgb(path, size=None, crop_bottom=0.0):
    """RGB image as float32 (3, H, W) in [0, 1]; bottom fraction cropped, then resized (antialiased) to size."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop_bottom > 0:
                im = im.crop((0, 0, im.width, int(round(im.height * (1.0 - crop_bottom)))))
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read this frame as an image ({e})") from None
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def image_size(path):
    """(H, W) of an image file, reading only its header."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except OSError as e:
        raise ValueError(f"{path}: cannot read this frame as an image ({e})") from None


# ----- Pure functions in pipeline order: disparity, pose, geometry, photometric error, losses, metrics -----
def disp_to_depth(sigma, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """Sigmoid -> (disp, depth) (Monodepth2 Sec 4): disp = 1/max_d + (1/min_d - 1/max_d) sigma, depth = 1/disp."""
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    disp = min_disp + (max_disp - min_disp) * sigma
    return disp, 1.0 / disp


def axis_angle_to_matrix(axis_angle, eps=ROTATION_EPS):
    """Rodrigues: (B, 3) axis-angle -> (B, 3, 3) rotation.

    theta = |v|, k = v / (theta + eps);  R = cos(theta) I + sin(theta) [k]_x + (1 - cos(theta)) k k^T.
    """
    theta = axis_angle.norm(dim=1, keepdim=True)                       # (B, 1)
    k = axis_angle / (theta + eps)                                     # (B, 3)
    cos, sin = torch.cos(theta)[..., None], torch.sin(theta)[..., None]  # (B, 1, 1)
    zero = torch.zeros_like(k[:, 0])
    kx = torch.stack([zero, -k[:, 2], k[:, 1],
                      k[:, 2], zero, -k[:, 0],
                      -k[:, 1], k[:, 0], zero], dim=1).view(-1, 3, 3)  # [k]_x, the cross-product matrix
    eye = torch.eye(3, dtype=k.dtype, device=k.device).expand_as(kx)
    return cos * eye + sin * kx + (1 - cos) * k[:, :, None] * k[:, None, :]


def pose_matrix(axis_angle, translation, invert=False):
    """(B, 3) axis-angle and (B, 3) translation -> (B, 4, 4) rigid transform [R | t], or its inverse [R^T | -R^T t].
    The pose network predicts T_{a->b} of a pair (a, b) in temporal order; a source before the target needs the inverse.
    """
    R = axis_angle_to_matrix(axis_angle)
    t = translation[:, :, None]                                        # (B, 3, 1)
    if invert:
        R, t = R.transpose(1, 2), -R.transpose(1, 2) @ t
    bottom = torch.tensor([0, 0, 0, 1], dtype=R.dtype, device=R.device).expand(R.shape[0], 1, 4)
    return torch.cat([torch.cat([R, t], dim=2), bottom], dim=1)


def intrinsics_matrix(intrinsics, height, width):
    """(B, 4) normalized (fx, fy, cx, cy) -> (B, 3, 3) pixel K of a height x width image: fx W, cx W, fy H, cy H
    (pixel column i spans [i, i + 1], centre i + 0.5, so this is exact under any resize)."""
    fx, fy, cx, cy = intrinsics.unbind(dim=1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx * width, zero, cx * width,
                        zero, fy * height, cy * height,
                        zero, zero, one], dim=1).view(-1, 3, 3)


def backproject(depth, inv_K):
    """Eqn 2, first half: points P = D(p) K^-1 p of a (B, 1, H, W) depth, pixel centres p = (i + 0.5, j + 0.5, 1)."""
    B, _, H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, dtype=inv_K.dtype, device=inv_K.device) + 0.5,
                          torch.arange(W, dtype=inv_K.dtype, device=inv_K.device) + 0.5, indexing="ij")
    p = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones_like(u).reshape(-1)])  # (3, H*W)
    return depth.reshape(B, 1, H * W) * (inv_K @ p)


def project(points, K, T, height, width, eps=1e-7):
    """Eqn 2, second half: p' ~ K (R P + t) -> grid_sample grid (B, H, W, 2) in normalized coordinates."""
    cam = K @ (T[:, :3, :3] @ points + T[:, :3, 3:])                   # (B, 3, H*W)
    return pixels_to_grid(cam, height, width, eps)


def pixels_to_grid(cam, height, width, eps=1e-7):
    """Homogeneous pixel coordinates (B, 3, H*W) -> grid_sample grid (B, H, W, 2): x = 2 u / W - 1 for continuous
    pixel coordinates u (pixel centres at i + 0.5: align_corners=False)."""
    u, v = cam[:, 0] / (cam[:, 2] + eps), cam[:, 1] / (cam[:, 2] + eps)
    return torch.stack([2 * u / width - 1, 2 * v / height - 1], dim=-1).view(-1, height, width, 2)


def warp(image, grid):
    """Sample `image` (B, C, H, W) at `grid` (B, H, W, 2): the reconstruction I_{t'->t} (border padding)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def ssim(x, y, c1=SSIM_C1, c2=SSIM_C2):
    """Per-pixel SSIM index (B, C, H, W) with a 3x3 mean and reflection padding (Wang et al. 2004).

    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)).
    """
    x, y = F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    sigma_x, sigma_y = F.avg_pool2d(x * x, 3, 1) - mu_x * mu_x, F.avg_pool2d(y * y, 3, 1) - mu_y * mu_y
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
            / ((mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x + sigma_y + c2)))


def photometric_error(pred, target, alpha=SSIM_WEIGHT):
    """Monodepth2 Eqn 1: pe = alpha (1 - SSIM)/2 + (1 - alpha) |pred - target|, (1 - SSIM)/2 clamped to [0, 1],
    channel-averaged -> (B, 1, H, W)."""
    dssim = ((1 - ssim(pred, target)) / 2).clamp(0, 1).mean(1, keepdim=True)
    return alpha * dssim + (1 - alpha) * (pred - target).abs().mean(1, keepdim=True)


def min_reprojection(reprojection, identity=None, average=False):
    """Eqn 4 and 5: per-pixel minimum over sources of the reprojection error, with auto-masking.
    reprojection, identity: (B, S, H, W) errors of the warped and the unwarped sources (identity None: no
    auto-masking). Eqn 5's mu = [min pe(I_t, I_t'->t) < min pe(I_t, I_t')], so the minimum over both sets is the
    masked loss. average=True: the ablation averaging over sources. Returns the loss (B, H, W) and mu (bool).
    """
    if average:
        reprojection = reprojection.mean(1, keepdim=True)
        identity = None if identity is None else identity.mean(1, keepdim=True)
    if identity is None:
        loss = reprojection.min(1)[0]
        return loss, torch.ones_like(loss, dtype=torch.bool)
    loss, index = torch.cat([identity, reprojection], dim=1).min(1)
    return loss, index >= identity.shape[1]


def smoothness_loss(disp, image):
    """Monodepth2 Eqn 3: L_s = |dx d*| exp(-|dx I|) + |dy d*| exp(-|dy I|), d* = d / mean(d) per image; disp
    (B, 1, h, w) and image (B, 3, h, w) at the same scale, image gradients averaged over channels."""
    d = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    dx_d, dy_d = (d[:, :, :, :-1] - d[:, :, :, 1:]).abs(), (d[:, :, :-1, :] - d[:, :, 1:, :]).abs()
    dx_i = (image[:, :, :, :-1] - image[:, :, :, 1:]).abs().mean(1, keepdim=True)
    dy_i = (image[:, :, :-1, :] - image[:, :, 1:, :]).abs().mean(1, keepdim=True)
    return (dx_d * torch.exp(-dx_i)).mean() + (dy_d * torch.exp(-dy_i)).mean()


def compute_losses(disps, target, sources, poses, intrinsics, args, generator=None):
    """The Monodepth2 training loss of one batch (Sec 3.2-3.3), in fp32. disps: sigmoid disparities (B, 1, H/2^s,
    W/2^s), s = 0..3, each upsampled to H x W before warping (Sec 3.3);
    target, sources: un-jittered (B, 3, H, W); poses: target-to-source (B, 4, 4); args: the train flags.
    L = 1/4 sum_s [mean_p min(...) + smoothness_weight / 2^s L_s]. Returns (loss, floats for the log).
    """
    B, _, H, W = target.shape
    K = intrinsics_matrix(intrinsics, H, W)
    inv_K = torch.linalg.inv(K)
    identity = None
    if not args.no_automask:  # Eqn 5's error of the unwarped sources: no scale, no gradient, so once per step
        with torch.no_grad():
            identity = torch.cat([photometric_error(source, target, args.ssim_weight) for source in sources], 1)
            identity += AUTOMASK_NOISE * torch.randn(identity.shape, generator=generator, device=identity.device)
    photometric, smooth, masks = 0.0, 0.0, []
    for s, disp in enumerate(disps):
        depth = disp_to_depth(F.interpolate(disp, (H, W), mode="bilinear", align_corners=False),
                              args.min_depth, args.max_depth)[1]
        points = backproject(depth, inv_K)
        reprojection = torch.cat([photometric_error(warp(source, project(points, K, T, H, W)), target,
                                                    args.ssim_weight) for source, T in zip(sources, poses)], 1)
        per_pixel, mask = min_reprojection(reprojection, identity, args.avg_reprojection)
        photometric = photometric + per_pixel.mean()
        image = F.avg_pool2d(target, 2 ** s) if s > 0 else target
        smooth = smooth + args.smoothness_weight / 2 ** s * smoothness_loss(disp, image)
        masks.append(mask.float().mean())
    loss = (photometric + smooth) / len(disps)
    return loss, {"photometric": float(photometric.detach() / len(disps)),
                  "smoothness": float(smooth.detach() / len(disps)), "automask": float(sum(masks) / len(disps))}


def median_scaled_errors(pred_depth, gt_depth, min_depth=EVAL_MIN_DEPTH, max_depth=EVAL_MAX_DEPTH):
    """One image's depth metrics after median scaling (Monodepth2 Sec 4.1, Eigen et al. 2014 metrics).
    Valid pixels: min < gt < max. ratio = median(g) / median(p); p <- clip(p ratio, min, max); abs_rel = mean |p - g|/g,
    sq_rel = mean (p - g)^2/g, rmse, rmse_log, a_k = mean [max(g/p, p/g) < 1.25^k]. Returns (metrics, ratio).
    """
    mask = (gt_depth > min_depth) & (gt_depth < max_depth)
    g, p = gt_depth[mask].astype(np.float64), pred_depth[mask].astype(np.float64)
    ratio = np.median(g) / np.median(p)
    p = np.clip(p * ratio, min_depth, max_depth)
    thresh = np.maximum(g / p, p / g)
    metrics = {"abs_rel": np.mean(np.abs(p - g) / g), "sq_rel": np.mean((p - g) ** 2 / g),
               "rmse": np.sqrt(np.mean((p - g) ** 2)), "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
               "a1": np.mean(thresh < 1.25), "a2": np.mean(thresh < 1.25 ** 2), "a3": np.mean(thresh < 1.25 ** 3)}
    return {k: float(v) for k, v in metrics.items()}, float(ratio)


def disparity_to_depth(disparity_px, baseline, fx_px):
    """Stereo disparity (pixels, 0 invalid) -> depth in metres: depth = baseline * fx / d (0 where invalid)."""
    return np.where(disparity_px > 0, baseline * fx_px / np.maximum(disparity_px, 1e-12), 0.0)


# ----- Networks (Monodepth2 Appendix): ResNet encoder, depth decoder (4 sigmoid scales), pose network -----
ENCODER_CHANNELS = {"resnet18": (64, 64, 128, 256, 512), "resnet34": (64, 64, 128, 256, 512),
                    "resnet50": (64, 256, 512, 1024, 2048)}


class ResnetEncoder(nn.Module):
    """torchvision ResNet trunk returning 5 feature maps at 1/2 ... 1/32; `images` frames stacked on channels."""

    def __init__(self, arch="resnet18", images=1, weights=None):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        if images > 1:
            net.conv1 = nn.Conv2d(3 * images, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if weights:  # a local torchvision ResNet state_dict; for stacked frames conv1 is repeated and divided
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict({**state, "conv1.weight": torch.cat([state["conv1.weight"]] * images, 1) / images})
        self.channels = ENCODER_CHANNELS[arch]
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x):
        x = ((x - ENCODER_MEAN) / ENCODER_STD).contiguous(memory_format=torch.channels_last)
        features = [self.relu(self.bn1(self.conv1(x)))]                 # 1/2
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):  # 1/4, 1/8, 1/16, 1/32
            features.append(layer(self.maxpool(features[-1]) if layer is self.layer1 else features[-1]))
        return features


def conv_block(cin, cout):
    """Reflection-padded 3x3 convolution + ELU (Monodepth2 decoder block)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect"), nn.ELU(inplace=True))


class DepthDecoder(nn.Module):
    """U-Net decoder: per level conv, nearest x2 upsample, skip concat, conv; sigmoid disparity at 4 scales."""

    def __init__(self, encoder_channels, channels=DECODER_CHANNELS):
        super().__init__()
        self.up0, self.up1 = nn.ModuleList(), nn.ModuleList()
        for i in range(4, -1, -1):                                      # level i works at 1/2^i after upsampling
            cin = encoder_channels[-1] if i == 4 else channels[i + 1]
            self.up0.append(conv_block(cin, channels[i]))
            skip = encoder_channels[i - 1] if i > 0 else 0
            self.up1.append(conv_block(channels[i] + skip, channels[i]))
        self.heads = nn.ModuleList(nn.Conv2d(channels[s], 1, 3, padding=1, padding_mode="reflect")
                                   for s in range(NUM_SCALES))

    def forward(self, features):
        x, disps = features[-1], {}
        for j, i in enumerate(range(4, -1, -1)):
            x = F.interpolate(self.up0[j](x), scale_factor=2, mode="nearest")
            if i > 0:
                x = torch.cat([x, features[i - 1]], dim=1)
            x = self.up1[j](x)
            if i < NUM_SCALES:
                disps[i] = torch.sigmoid(self.heads[i](x))             # (B, 1, H/2^i, W/2^i)
        return [disps[s] for s in range(NUM_SCALES)]


class DepthNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1], H and W multiples of 32 -> list of 4 sigmoid disparities, full res first."""

    def __init__(self, arch="resnet18", weights=None):
        super().__init__()
        self.encoder = ResnetEncoder(arch, images=1, weights=weights)
        self.decoder = DepthDecoder(self.encoder.channels)
        self.to(memory_format=torch.channels_last)  # NHWC: convolutions ~20% faster on CPU (oneDNN), AMP on GPU

    def forward(self, image):
        return self.decoder(self.encoder(image))


class PoseNet(nn.Module):
    """Separate ResNet on a frame pair stacked on channels -> (axis-angle (B, 3), translation (B, 3)), T_{a->b}."""

    def __init__(self, arch="resnet18", weights=None):
        super().__init__()
        self.encoder = ResnetEncoder(arch, images=2, weights=weights)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.channels[-1], POSE_CHANNELS, 1), nn.ReLU(inplace=True),  # squeeze
            nn.Conv2d(POSE_CHANNELS, POSE_CHANNELS, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(POSE_CHANNELS, POSE_CHANNELS, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(POSE_CHANNELS, 6, 1))
        self.to(memory_format=torch.channels_last)  # as DepthNet

    def forward(self, frame_a, frame_b):
        out = self.decoder(self.encoder(torch.cat([frame_a, frame_b], dim=1))[-1])
        out = POSE_SCALE * out.mean((2, 3))                             # (B, 6), spatially averaged
        return out[:, :3], out[:, 3:]


# ----- Training data, the training step, plumbing shared with the other stages -----
def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    """--device auto|cpu|cuda[:i] -> torch.device; auto picks CUDA when torch sees one. auto and cuda take the GPU
    of LOCAL_RANK (torchrun's process on this machine; 0 without torchrun)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if name in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    return torch.device(name)


def amp_dtype_for(device, no_amp, name="auto"):
    """Autocast dtype: fp16 (with a GradScaler) on CUDA, bf16 on CPU, None (fp32) with --no-amp; --amp-dtype
    float16|bfloat16 forces one (float16 on CPU runs CUDA's path: fp16 autocast, GradScaler, channels-last)."""
    return None if no_amp else getattr(torch, name, torch.float16 if device.type == "cuda" else torch.bfloat16)


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1) join the process group from the environment: nccl on CUDA (the GPU of
    LOCAL_RANK), gloo on CPU. Returns (rank, world_size, device); (0, 1, device) without torchrun."""
    world, device = int(os.environ.get("WORLD_SIZE", 1)), pick_device(device_name)
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world, device


def wrap_ddp(model, args, device, world):
    """--sync-bn (CUDA only: torch's SyncBatchNorm runs on GPUs); model.train() with --freeze-bn's BatchNorms in
    eval mode (running statistics, not updated); DistributedDataParallel when world > 1 (the model is .module)."""
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm runs only on GPUs)")
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn and world > 1 else model
    for m in model.train().modules():  # parents come before children: each BatchNorm's own mode is set last
        m.train(not (args.freeze_bn and isinstance(m, nn.modules.batchnorm._BatchNorm)))
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model


def add_parallel_args(p):
    """The flags of mixed precision and torchrun data parallelism, shared by the training stages."""
    p.add_argument("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"], help="autocast dtype "
                   "(auto: fp16 on CUDA, bf16 on CPU); float16 on CPU runs CUDA's path (GradScaler, channels-last)")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm on its running statistics, not updated "
                   "(batch-independent: fine-tuning, and runs that equal each other over any process split)")
    p.add_argument("--sync-bn", action="store_true", help="torchrun on CUDA: BatchNorm statistics of the global "
                   "batch (SyncBatchNorm). Default off: each GPU normalizes its own batch, as the paper's one GPU")


class BadInput(ValueError):
    """Unusable input (a file, its shape, dtype or values, the settings): main prints one line and exits 1."""


def ranged(kind, low=None, high=None, above=None):
    """argparse type: a finite kind(text) >= low, > above, <= high; anything else is a usage error (exit 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and (low is None or value >= low) and (above is None or value > above)
                and (high is None or value <= high)):
            need = " and ".join(f"{op} {v}" for op, v in ((">=", low), (">", above), ("<=", high)) if v is not None)
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'an integer' if kind is int else 'a finite number'} "
                                             f"{need}".rstrip())
        return value
    return parse


positive_int, nonnegative_int, positive_float = ranged(int, 1), ranged(int, 0), ranged(float, above=0)
fraction, unit_float, finite_float = ranged(float, above=0, high=1), ranged(float, 0, 1), ranged(float)


def run_main(run, args, stage):
    """run(args); bad input (the stages' own errors, unreadable files, a full disk) ends as one line on stderr,
    exit 1. A traceback remains for real bugs (TypeError, IndexError, RuntimeError ...)."""
    try:
        return run(args)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except (OSError, ValueError, FloatingPointError) as e:
        message = str(e)
    if "Original Traceback" in message:  # raised in a DataLoader worker: the last line is the error
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    print(f"{stage}: error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(1)


def checked_read(path, make, read):
    """read(path); a missing file is a FileNotFoundError, an unreadable one (truncated, empty, another kind, weights
    of another network) a BadInput, each naming the file and `make`, the command that writes it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: make it with `{make}`")
    try:
        return read(path)
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise BadInput(f"{path}: unusable ({' '.join(str(e).split())[:200]}); it must come from `{make}`") from None


def load_npy(path, make, ndim=2, kind="f"):
    """A .npy array checked at read: readable, ndim, dtype kind ('f' float, 'iu' integer), finite when float."""
    array = checked_read(path, make, lambda p: np.load(p, allow_pickle=False))
    if array.ndim != ndim or array.dtype.kind not in kind:
        raise BadInput(f"{path}: {array.dtype} {array.shape}, expected a {ndim}-D "
                       f"{'float' if kind == 'f' else 'integer'} array from `{make}`")
    if kind == "f" and not np.isfinite(array).all():
        raise BadInput(f"{path}: NaN or inf values; remake it with `{make}`")
    return array


def load_torch(path, make, keys=(), weights_only=True):
    """A torch dict file (model, checkpoint) checked at read: readable and holding `keys`."""
    data = checked_read(path, make, lambda p: torch.load(p, map_location="cpu", weights_only=weights_only))
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise BadInput(f"{path}: not a file of `{make}` (no '{missing[0]}')")
    return data


def settings_diff(old, new):
    """'key old -> new, ...' of the keys whose values differ; '' when none."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys)


def record_settings(folder, settings, overwrite, outputs="*.npy"):
    """FOLDER/settings.json holds the settings its outputs (the glob `outputs`) were made with; while such outputs
    exist, a re-run with other settings stops with a one-line diff, unless overwrite (then they are redone).
    Temporaries of killed runs are removed."""
    path, settings = os.path.join(folder, "settings.json"), json.loads(json.dumps(settings))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    old = checked_read(path, "the same stage", lambda p: json.load(open(p))) if os.path.exists(path) else settings
    if not os.path.exists(path) and not overwrite and glob.glob(os.path.join(glob.escape(folder), outputs)):
        print(f"warning: {folder} holds outputs ({outputs}) but no settings.json (another tool, or an older "
              "version): they are taken as made with these settings; --overwrite redoes them", file=sys.stderr)
    if old != settings and not overwrite and glob.glob(os.path.join(glob.escape(folder), outputs)):
        raise BadInput(f"{folder} holds outputs made with other settings ({settings_diff(old, settings)}): pass "
                       "--overwrite to redo them, or use another --work")
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2).encode()))


def remove_stale_temporaries(folder):
    """Delete the FILE.tmp<PID> that killed processes left in folder and below (a live process's are kept)."""
    for path in glob.glob(os.path.join(glob.escape(folder), "**", "*.tmp[0-9]*"), recursive=True):
        try:
            os.kill(int(path.rsplit(".tmp", 1)[1]), 0)
        except ProcessLookupError:
            os.remove(path)
        except (ValueError, PermissionError):  # not one of ours; or alive, of another user
            pass


def resume_log(path, step, key="step"):
    """log.jsonl opened for appending by a run from `step`: a fresh run (0) starts it empty; a resumed one keeps
    the records up to step (a killed run may have logged past its last checkpoint)."""
    keep = []
    for line in open(path) if step and os.path.exists(path) else []:
        try:
            keep += [line] if json.loads(line).get(key, 0) <= step else []
        except ValueError:  # a line cut by the kill
            pass
    atomic_write(path, lambda f: f.write("".join(keep).encode()))
    return open(path, "a", buffering=1)


def run_settings(args, neutral=("resume", "force_resume", "overwrite", "stop_after", "save_every", "log_every",
                                "eval_every", "workers", "no_progress", "device", "work", "data", "out")):
    """The flags that change a run's result: vars(args) (or a dict of them) less how and where it runs."""
    return {k: v for k, v in json.loads(json.dumps(vars(args) if hasattr(args, "__dict__") else args)).items()
            if k not in neutral}


def check_resume(old_args, args, path):
    """Resuming a checkpoint made with settings that change the run is refused (a one-line diff), unless
    --force-resume: the result would equal no uninterrupted run."""
    if (diff := settings_diff(run_settings(old_args), run_settings(args))) and not args.force_resume:
        raise BadInput(f"{path} was made with other settings ({diff}): pass --force-resume to resume anyway, or "
                       "--overwrite to start again")


def restore_checkpoint(path, args, key="step", **parts):
    """--resume: restore every part (model=, optimizer=, ...) from checkpoint.pt's state_dict of that name and return
    its step (`key`); 0 when there is no checkpoint (or --overwrite). A checkpoint of settings that change the run
    (--steps, --lr, --batch-size ...) is refused unless --force-resume: the resumed run would equal no uninterrupted
    one; without --resume an unfinished checkpoint stops the run."""
    if not os.path.exists(path) or (args.overwrite and not args.resume):
        return 0
    if not args.resume:
        raise BadInput(f"{path} exists from an unfinished run: pass --resume to continue it or --overwrite")
    make = "an interrupted run of this command"
    ckpt = load_torch(path, make, ("args", key))
    check_resume(ckpt["args"], args, path)
    checked_read(path, make, lambda _: [part.load_state_dict(ckpt[name]) for name, part in parts.items()])
    print(f"resumed {path} at {key} {ckpt[key]}")
    return ckpt[key]


def atomic_write(path, write):
    """Write `path` through write(file) into a temporary file beside it, then rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def training_items(args):
    """[(target, previous, next) paths, normalized intrinsics (4,)] of every training triplet."""
    items, K = [], {}  # K: intrinsics of each calibration file (one per Cityscapes sequence, one per KITTI date)
    for split in args.split if args.dataset == "cityscapes" else [None]:  # KITTI raw: every drive
        for t in video_triplets(list_frames(args.data, args.dataset, split, True, need_calib=True), args.frame_offset):
            if t[0].calib not in K:
                K[t[0].calib] = read_intrinsics(t[0].calib, image_size(t[0].path), args.crop_bottom)
            items.append(((t[0].path, t[1].path, t[2].path), K[t[0].calib]))
    if not items:
        raise SystemExit(f"no training triplets with frame offset {args.frame_offset} under {args.data}")
    return items


class TripletDataset(torch.utils.data.Dataset):
    """dataset[epoch, i] = {"frames" (3, 3, H, W) in order (0, -k, +k), "aug" (jittered), "intrinsics" (4,)}.
    Monodepth2 Sec 4.1: a horizontal flip (p 0.5), then one color jitter for all three frames (p 0.5), drawn by
    torch seeded with (seed, epoch, i): the same with any number of workers and after a resume."""

    def __init__(self, items, size, crop_bottom=0.0, augment=True, seed=0):
        self.items, self.size, self.crop_bottom, self.augment, self.seed = items, size, crop_bottom, augment, seed
        self.jitter = v2.RandomApply([v2.ColorJitter(**JITTER)], p=0.5)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key
        paths, K = self.items[index]
        frames = torch.stack([load_rgb(p, self.size, self.crop_bottom) for p in paths])  # (3, 3, H, W)
        intrinsics = torch.tensor(K, dtype=torch.float32)
        aug = frames
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))
                if torch.rand(()) < 0.5:                                # horizontal flip p 0.5
                    frames = frames.flip(-1)
                    intrinsics[2] = 1.0 - intrinsics[2]                 # cx -> W - cx (continuous pixels)
                aug = self.jitter(frames)                               # one draw for the stacked frames
        return {"frames": frames, "aug": aug, "intrinsics": intrinsics}


class StepBatches(torch.utils.data.Sampler):
    """The batches of global steps start ... stop - 1: step s takes batch b of epoch e (s = e * n // batch_size + b)
    of a seeded per-epoch permutation (drop last), as [(e, index), ...]. A resumed run starts mid-epoch exactly.
    torchrun: batch_size is the global batch (per process x world); process `rank` takes its contiguous share."""

    def __init__(self, n, batch_size, seed, start, stop, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            epoch, b = divmod(step, self.n // self.batch_size)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            share = perm[b * self.batch_size:(b + 1) * self.batch_size].tensor_split(self.world)[self.rank]
            yield [(epoch, i) for i in share.tolist()]


def train_step(depth_net, pose_net, optimizer, scaler, batch, args, amp_dtype, generator=None):
    """One optimization step on a batch dict (frames order 0, -k, +k). Returns (loss tensor, logs)."""
    device = next(depth_net.parameters()).device
    frames = batch["frames"].to(device, non_blocking=True)              # (B, 3 frames, 3, H, W)
    aug = batch["aug"].to(device, non_blocking=True)
    B = frames.shape[0]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        disps = depth_net(aug[:, 0])
        # pairs in temporal order: (previous, target) then (target, next), one batch of 2B
        axis_angle, translation = pose_net(torch.cat([aug[:, 1], aug[:, 0]]), torch.cat([aug[:, 0], aug[:, 2]]))
    axis_angle, translation = axis_angle.float(), translation.float()
    poses = [pose_matrix(axis_angle[:B], translation[:B], invert=True),  # target -> previous
             pose_matrix(axis_angle[B:], translation[B:], invert=False)]  # target -> next
    loss, logs = compute_losses([d.float() for d in disps], frames[:, 0], [frames[:, 1], frames[:, 2]], poses,
                                batch["intrinsics"].to(device), args, generator)
    if not torch.isfinite(loss):
        raise SystemExit(f"[depth] non-finite loss {loss.item()}: stopping (the last checkpoint stays); "
                         "try --no-amp or a lower --lr")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logs


def model_file(depth_net, pose_net, args):
    """The plain-dict model file that predict (and later stages) rebuild the network from."""
    return {"arch": args.arch, "model": depth_net.state_dict(), "pose_model": pose_net.state_dict(),
            "args": vars(args), "size": list(args.size), "crop_bottom": args.crop_bottom,
            "num_scales": NUM_SCALES, "min_depth": args.min_depth, "max_depth": args.max_depth}


# ----- Commands: train, predict, eval -----
def resolve_crop_bottom(args):
    """--crop-bottom default: 0.25 for real Cityscapes (ego-car hood), 0 for the toy city, KITTI and folders."""
    if args.crop_bottom is not None or args.dataset != "cityscapes":
        return args.crop_bottom or 0.0
    cities = {os.path.basename(p) for s in args.split for p in glob.glob(f"{args.data}/leftImg8bit_sequence/{s}/*")}
    return 0.0 if cities <= {"toycity"} else 0.25


def train_outputs(args):
    """WORK/depth, or None when a finished model.pt leaves nothing to do (--resume continues a checkpoint.pt,
    --overwrite starts again; restore_checkpoint refuses an unfinished one without either)."""
    out = os.path.join(args.work, "depth")
    model_path, ckpt_path = os.path.join(out, "model.pt"), os.path.join(out, "checkpoint.pt")
    record_settings(out, run_settings(args), args.overwrite or args.force_resume, "model.pt")  # a model of others
    if os.path.exists(model_path) and not (args.overwrite or (args.resume and os.path.exists(ckpt_path))):
        return print(f"[depth] {model_path} exists: skipping training (--resume to continue, --overwrite to restart)")
    return out


def train(args):
    """Train DepthNet and PoseNet on video triplets (Monodepth2's schedule) -> WORK/depth/model.pt."""
    rank, world, device = setup_distributed(args.device)  # torchrun: rank 0 of `world` writes
    args.world_size = world  # the global batch is batch_size x world: a setting, checked on resume
    if (out := train_outputs(args)) is None:
        return
    args.crop_bottom = resolve_crop_bottom(args)
    amp_dtype = amp_dtype_for(device, args.no_amp, args.amp_dtype)
    seed_everything(args.seed)
    # ===== data =====
    dataset = TripletDataset(training_items(args), args.size, args.crop_bottom, not args.no_augment, args.seed)
    steps_per_epoch = len(dataset) // (args.batch_size * world)  # --batch-size per process
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} triplets are fewer than one batch of {args.batch_size}")
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    stop = total if args.stop_after is None else min(total, args.stop_after)
    drop_step = int(round(total * args.lr_drop_epoch / args.epochs))  # epoch 15 of 20, or that fraction of --steps
    # ===== model and optimizer =====
    depth_net, pose_net = DepthNet(args.arch, args.weights).to(device), PoseNet(args.arch, args.weights).to(device)
    nets = [wrap_ddp(net, args, device, world) for net in (depth_net, pose_net)]  # --freeze-bn, --sync-bn, DDP
    depth_net, pose_net = (getattr(net, "module", net) for net in nets)
    optimizer = torch.optim.Adam(list(depth_net.parameters()) + list(pose_net.parameters()), lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    noise = torch.Generator(device).manual_seed(args.seed)              # auto-masking's tie-break noise
    # ===== resume =====
    step = restore_checkpoint(os.path.join(out, "checkpoint.pt"), args, model=depth_net, pose_model=pose_net,
                              optimizer=optimizer, scaler=scaler)
    if rank == 0:
        atomic_write(os.path.join(out, "args.json"), lambda f: f.write(json.dumps(vars(args), indent=2).encode()))
    print(f"[depth] device {device} (rank {rank} of {world}), amp {amp_dtype}, {len(dataset)} triplets, "
          f"{steps_per_epoch} steps per epoch, {total} steps from step {step}, lr drop at step {drop_step}")
    # ===== loop =====
    batches = StepBatches(len(dataset), args.batch_size * world, args.seed, step, stop, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    start_time, start_step = time.time(), step
    log_path = os.path.join(out, "log.jsonl")
    with resume_log(log_path, step) if rank == 0 else open(os.devnull, "w") as log:  # rank 0 writes
        for batch in tqdm(loader, initial=step, total=total, desc="depth train", disable=args.no_progress or rank):
            for group in optimizer.param_groups:  # Monodepth2: x0.1 after epoch 15 of 20
                group["lr"] = args.lr * (args.lr_gamma if step >= drop_step else 1.0)
            noise.manual_seed(args.seed * 1000003 + step * world + rank)  # tie-break noise: per step and process
            loss, logs = train_step(*nets, optimizer, scaler, batch, args, amp_dtype, noise)
            step += 1
            if world > 1:  # the logged loss is the global batch's (the other columns: rank 0's share)
                torch.distributed.all_reduce(loss := loss.detach() / world)
            if rank == 0 and (step % args.log_every == 0 or step == stop):
                record = {"step": step, "epoch": step // steps_per_epoch, "loss": loss.item(), "lr": group["lr"],
                          "s_per_step": (time.time() - start_time) / (step - start_step), **logs}
                print(json.dumps(record), file=log, flush=True)
                tqdm.write(" ".join(f"{k} {v:.4g}" for k, v in record.items()))
            if rank == 0 and (step % args.save_every == 0 or step % steps_per_epoch == 0 or step == stop):
                ckpt = {**model_file(depth_net, pose_net, args), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "step": step}
                atomic_write(os.path.join(out, "checkpoint.pt"), lambda f: torch.save(ckpt, f))
    # ===== save =====
    if step < total or rank > 0:
        return rank or print(f"[depth] stopped at step {step} of {total} (--stop-after); continue with --resume")
    atomic_write(os.path.join(out, "model.pt"), lambda f: torch.save(model_file(depth_net, pose_net, args), f))
    print(f"[depth] wrote {out}/model.pt after {step} steps")


def colorize_disparity(disp):
    """(H, W) disparity -> (H, W, 3) uint8 magma-like (dark far); per-image stretch, for display only."""
    anchors = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float64)
    d = np.clip(disp / np.percentile(disp, 95), 0, 1) * (len(anchors) - 1)
    i = np.minimum(d.astype(int), len(anchors) - 2)
    w = (d - i)[..., None]
    return ((1 - w) * anchors[i] + w * anchors[i + 1]).astype(np.uint8)


def predict(args):
    """Scaled disparity 1 / depth (disp_to_depth; one scale per dataset: DepthMix compares images) -> WORK/disp."""
    path, make = os.path.join(args.work, "depth", "model.pt"), "python depth.py train --data DATA --work WORK"
    model = load_torch(path, make, ("arch", "model", "size", "crop_bottom", "min_depth", "max_depth"), False)
    device = pick_device(args.device)
    amp_dtype = amp_dtype_for(device, args.no_amp)
    def rebuild(_):  # weights of another network (a swav_dense model, another arch): one line, not a traceback
        if model["arch"] not in ENCODER_CHANNELS:
            raise ValueError(f"arch {model['arch']!r} is not a depth encoder ({', '.join(ENCODER_CHANNELS)})")
        net = DepthNet(model["arch"])
        net.load_state_dict(model["model"])
        return net
    net = checked_read(path, make, rebuild).eval().to(device)
    net_size = (max(32, round(model["size"][0] / (1 - model["crop_bottom"]) / 32) * 32), model["size"][1])
    size = tuple(args.size) if args.size else net_size
    frames = {f.stem: f.path for f in shard_of(frames_of(args), args.shard)}
    out, preview = os.path.join(args.work, "disp"), os.path.join(args.work, "disp_preview")
    for folder in (out, preview) if args.preview else (out,):
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
    record_settings(out, {"size": size, "arch": model["arch"], "train_size": model["size"], "no_amp": args.no_amp},
                    args.overwrite)  # maps of another size or model are never mixed in
    todo = [s for s in frames if args.overwrite or not os.path.exists(os.path.join(out, s + ".npy"))]
    print(f"[depth] predict {len(todo)} of this shard's {len(frames)} images (others done) at {size[0]} x {size[1]}, "
          f"network input {net_size[0]} x {net_size[1]}, device {device}")
    for b in tqdm(range(0, len(todo), args.batch_size), desc="depth predict", disable=args.no_progress):
        chunk = todo[b:b + args.batch_size]
        images = torch.stack([load_rgb(frames[s], net_size) for s in chunk]).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            sigma = net(images)[0].float()
        disp = disp_to_depth(sigma, model["min_depth"], model["max_depth"])[0]
        disp = F.interpolate(disp, size, mode="bilinear", align_corners=False)
        for stem, d in zip(chunk, disp[:, 0].cpu().numpy().astype(np.float32)):
            atomic_write(os.path.join(out, stem + ".npy"), lambda f: np.save(f, d))
            if args.preview:
                atomic_write(os.path.join(preview, stem + ".png"),
                             lambda f: Image.fromarray(colorize_disparity(d)).save(f, format="PNG"))
    meta = json.dumps({"predicted_at": net_size}).encode()      # the samples' grid: group.py's Eqn 1 spacing
    atomic_write(os.path.join(out, "resolution.json"), lambda f: f.write(meta))
    print(f"[depth] disparities in {out}")


def evaluate(args):
    """Median-scaled depth metrics of WORK/disp against the ground-truth disparity PNGs -> WORK/depth/eval.json."""
    rows, ratios = [], []
    for stem, frame, camera, _, _ in list_frames(args.data, "cityscapes", args.split, need_calib=True):
        disp_path = os.path.join(args.work, "disp", stem + ".npy")
        gt_path = split_file(args.data, "disparity", args.split, stem, "disparity.png")
        make = f"python depth.py predict --work {args.work} --data {args.data} --split {args.split}"
        pred = load_npy(disp_path, make)
        if not os.path.exists(gt_path):
            raise FileNotFoundError(f"{gt_path} is missing: eval needs ground-truth disparity")
        gt_disp = read_disparity_png(gt_path)
        if pred.min() <= 0 or abs(pred.shape[0] * gt_disp.shape[1] / (pred.shape[1] * gt_disp.shape[0]) - 1) > 0.02:
            raise BadInput(f"{disp_path}: {pred.shape[0]} x {pred.shape[1]}, minimum {pred.min():.3g}: need a positive "
                           f"disparity of the aspect of {gt_path} ({gt_disp.shape[0]} x {gt_disp.shape[1]})")
        fx = read_intrinsics(camera, image_size(frame))[0] * gt_disp.shape[1]  # fx in pixels of the PNG
        keep = int(round(gt_disp.shape[0] * (1 - args.crop_bottom)))
        gt = disparity_to_depth(gt_disp, read_camera_baseline(camera), fx)[:keep]
        pred = F.interpolate(torch.from_numpy(pred)[None, None], gt_disp.shape, mode="bilinear", align_corners=False)
        if ((gt > EVAL_MIN_DEPTH) & (gt < EVAL_MAX_DEPTH)).any():
            metrics, ratio = median_scaled_errors(1.0 / np.maximum(pred[0, 0].numpy()[:keep], 1e-8), gt)
            rows.append(metrics)
            ratios.append(ratio)
    if not rows:
        raise SystemExit(f"no image of {args.split} has valid ground-truth depth")
    names = ["abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in names}
    ratios = np.array(ratios)
    result = {**mean, "ratio_median": float(np.median(ratios)), "ratio_std": float(np.std(ratios / np.median(ratios))),
              "images": len(rows), "split": args.split, "crop_bottom": args.crop_bottom}
    os.makedirs(os.path.join(args.work, "depth"), exist_ok=True)
    path = os.path.join(args.work, "depth", "eval.json")
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2, allow_nan=False).encode()))
    print(f"[depth] eval on {len(rows)} {args.split} images, median scaling ratio {result['ratio_median']:.3f} "
          f"(std of ratio/median {result['ratio_std']:.3f})")
    print(f"[depth] wrote {path}: " + ", ".join(f"{k} {mean[k]:.3f}" for k in names))
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--device", default="auto", help="auto|cpu|cuda: auto picks CUDA when torch sees one, else CPU")
    shared.add_argument("--no-amp", action="store_true",
                        help="fp32 throughout (default: autocast, fp16 + GradScaler on CUDA, bf16 on CPU)")
    shared.add_argument("--no-progress", action="store_true", help="no tqdm bar (the log lines stay)")
    kw = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_args(sub.add_parser("train", help="self-supervised training on video triplets", parents=[shared], **kw))
    r = sub.add_parser("predict", help="disparity of images -> WORK/disp/<stem>.npy", parents=[shared], **kw)
    r.add_argument("--work", required=True, help="work folder: reads WORK/depth/model.pt, writes WORK/disp/")
    r.add_argument("--data", help="dataset root: predicts the frames of --split (--dataset, --sequence)")
    r.add_argument("--split", default="val", help="split of --data whose frames are predicted")
    r.add_argument("--images", help="glob of images instead of --data/--split (stem = file name, or KITTI raw's)")
    add_frame_args(r)
    r.add_argument("--size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="output size (default: the network input size)")
    r.add_argument("--batch-size", type=positive_int, default=12, help="images per forward pass")
    r.add_argument("--preview", action="store_true", help="also color PNGs in WORK/disp_preview/")
    r.add_argument("--overwrite", action="store_true", help="redo finished images")
    add_shard_arg(r)
    e = sub.add_parser("eval", help="median-scaled depth metrics against ground-truth disparity PNGs", **kw)
    e.add_argument("--work", required=True, help="work folder: reads WORK/disp/, writes WORK/depth/eval.json")
    e.add_argument("--data", required=True, help="dataset root with disparity/ and camera/ (Cityscapes layout)")
    e.add_argument("--split", default="val", help="split to evaluate")
    e.add_argument("--crop-bottom", type=ranged(float, 0, high=0.9), default=0.0,
                   help="ignore this bottom fraction of rows (Cityscapes: 0.25)")
    return p


def add_train_args(t):
    """The flags of depth.py train: data, networks, Monodepth2's schedule and loss (with its ablations), run."""
    t.add_argument("--data", required=True, help="dataset root (Cityscapes layout or KITTI raw)")
    t.add_argument("--work", required=True, help="work folder; writes WORK/depth/")
    t.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti"], help="layout of --data")
    t.add_argument("--split", nargs="+", default=["train"], help="Cityscapes sequence splits to train on")
    t.add_argument("--size", nargs=2, type=positive_int, default=[192, 512], metavar=("H", "W"),
                   help="training size, multiples of 32 (Cityscapes 192 x 512 after the crop; KITTI 192 x 640)")
    t.add_argument("--crop-bottom", type=ranged(float, 0, high=0.9), default=None,
                   help="fraction of rows cut at the bottom before resizing (default 0.25 on Cityscapes, 0 otherwise)")
    t.add_argument("--frame-offset", type=positive_int, default=2,
                   help="source frames at -k and +k (Cityscapes 17 Hz: 2; KITTI 10 Hz and the toy city: 1)")
    t.add_argument("--arch", default="resnet18", choices=sorted(ENCODER_CHANNELS), help="encoder of both networks")
    t.add_argument("--weights", default=None, help="local torchvision ResNet state_dict (ImageNet) for both encoders")
    t.add_argument("--epochs", type=positive_int, default=20, help="Monodepth2: 20")
    t.add_argument("--steps", type=positive_int, default=None, help="total steps instead of --epochs (schedule scaled)")
    t.add_argument("--batch-size", type=positive_int, default=12, help="Monodepth2: 12")
    t.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (Monodepth2: 1e-4)")
    t.add_argument("--lr-drop-epoch", type=nonnegative_int, default=15,
                   help="lr x gamma after this epoch (Monodepth2: 15 of 20)")
    t.add_argument("--lr-gamma", type=unit_float, default=0.1, help="lr factor at the drop (Monodepth2: 0.1)")
    t.add_argument("--min-depth", type=positive_float, default=MIN_DEPTH,
                   help="depth range of the sigmoid (Monodepth2)")
    t.add_argument("--max-depth", type=positive_float, default=MAX_DEPTH, help="(Monodepth2: 0.1 to 100)")
    t.add_argument("--ssim-weight", type=unit_float, default=SSIM_WEIGHT, help="alpha of Eqn 1 (Monodepth2: 0.85)")
    t.add_argument("--smoothness-weight", type=ranged(float, 0), default=SMOOTHNESS_WEIGHT,
                   help="Eqn 3 weight, /2^s at scale s (Monodepth2: 1e-3)")
    t.add_argument("--no-automask", action="store_true", help="ablation: no auto-masking of static pixels")
    t.add_argument("--avg-reprojection", action="store_true", help="ablation: average over sources, not minimum")
    t.add_argument("--no-augment", action="store_true", help="no flip and color jitter (Monodepth2: both, p 0.5)")
    t.add_argument("--workers", type=nonnegative_int, default=4,
                   help="DataLoader worker processes; 0 = in the main process")
    t.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every random draw of the run")
    t.add_argument("--resume", action="store_true",
                   help="continue from WORK/depth/checkpoint.pt, as an uninterrupted run")
    t.add_argument("--overwrite", action="store_true",
                   help="train from scratch even if model.pt or checkpoint.pt exists")
    t.add_argument("--force-resume", action="store_true", help="--resume even if the checkpoint's settings differ")
    t.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop once global step N is done, after writing checkpoint.pt, as an interruption would")
    t.add_argument("--save-every", type=positive_int, default=1000,
                   help="write checkpoint.pt every N global steps (and each epoch)")
    t.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    add_parallel_args(t)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "predict" and not (args.images or args.data):
        parser.error("depth.py predict: give --data DATA --split S or --images GLOB")
    if args.command == "train" and (args.size[0] % 32 or args.size[1] % 32):
        parser.error(f"--size {args.size[0]} {args.size[1]}: height and width must be multiples of 32")
    try:
        return run_main({"train": train, "predict": predict, "eval": evaluate}[args.command], args,
                        f"depth.py {args.command}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
