"""Stage 1: self-supervised monocular depth from unlabelled driving video, the Monodepth2 recipe.

Paper: Zeng et al. (BMVC 2022) Sec 3.1 "we adopt Monodepth2" (Godard et al., "Digging Into Self-Supervised
Monocular Depth Estimation", ICCV 2019). Implemented here from the Monodepth2 paper (its code is under a
non-commercial licence and nothing of it is pasted): ResNet depth encoder-decoder with sigmoid disparity at 4
scales (Monodepth2 Sec 3 and Appendix), a separate pose ResNet on frame pairs, the SSIM + L1 photometric error
(Monodepth2 Eqn 1 with Eqn 2's warp), the per-pixel minimum reprojection (Eqn 4), auto-masking of stationary
pixels (Eqn 5), full-resolution multi-scale estimation (Sec 3.3) and edge-aware smoothness (Eqn 3).

Pipeline: (unlabelled video) -> depth.py -> group.py (coherent depth regions) -> copypaste.py -> ...
The later stages need disparity only up to a global scale, so `predict` stores it normalised to (0, 1].

| reads / writes | file | shape, dtype | meaning |
|---|---|---|---|
| reads (train) | DATA/leftImg8bit_sequence/SPLIT/CITY/*_leftImg8bit.png | RGB | video frames, time order by frame number |
| reads (train) | DATA/camera/SPLIT/CITY/<stem>_camera.json | JSON | intrinsics in pixels of the frames (one per sequence) |
| reads (train, KITTI) | DATA/DATE/DRIVE_sync/image_02/data/*.png, DATA/DATE/calib_cam_to_cam.txt | RGB, text | raw KITTI video and P_rect_02 |
| writes (train) | WORK/depth/model.pt | dict | {"arch", "model": depth net state_dict, "pose_model", "args", "size", ...} |
| writes (train) | WORK/depth/checkpoint.pt, log.jsonl, args.json | | exact resume; one JSON line per log step |
| reads (predict) | WORK/depth/model.pt; DATA/leftImg8bit/SPLIT/*/*.png or --images GLOB | | |
| writes (predict) | WORK/disp/<stem>.npy | (H, W) float32 | disparity normalised to (0, 1] (max 1), scale-free |
| writes (predict) | WORK/disp_preview/<stem>.png (--preview) | (H, W, 3) uint8 | colour-mapped disparity |
| reads (eval) | WORK/disp/<stem>.npy, DATA/disparity/SPLIT/CITY/<stem>_disparity.png, camera JSON | | GT depth = baseline * fx / d |
| writes (eval) | WORK/depth/eval.json | JSON | abs_rel, sq_rel, rmse, rmse_log, a1-a3, scaling ratio median and spread |

Paper scale (Cityscapes, one GPU; Monodepth2's Cityscapes preparation: bottom quarter cropped, 512 x 192, +-2 frames):
    python depth.py train --data CS --work runs/cs --size 192 512 --frame-offset 2 --crop-bottom 0.25
    python depth.py predict --work runs/cs --data CS --split train --size 384 768
    python depth.py eval --work runs/cs --data CS --split val --crop-bottom 0.25
Tiny (toy city, CPU, minutes):
    python depth.py train --data data/toycity --work runs/toy --size 64 128 --frame-offset 1 --batch-size 6 \
        --lr 3e-4 --steps 300 --no-automask
    python depth.py predict --work runs/toy --data data/toycity --split val --size 192 384
    python depth.py eval --work runs/toy --data data/toycity --split val

Deviations from Monodepth2, stated plainly:
- Encoders start from scratch unless `--weights FILE` gives a local torchvision ResNet state_dict (Monodepth2
  starts from ImageNet weights; nothing is downloaded here). Depth from scratch trains slower and ends worse.
- Pixel coordinates are continuous with pixel centres at i + 0.5, the convention of grid_sample
  (align_corners=False), so normalised intrinsics are exact under resizing and flipping (cx -> 1 - cx).
  Monodepth2 samples with centres at i and leaves K unchanged under flips.
- The two pose pairs go through the pose network as one batch (BatchNorm statistics over both pairs).
- The learning-rate drop happens deliberately after epoch 15 (`--lr-drop-epoch`); with `--steps` it happens
  after the same fraction (15/20) of the steps.
- Speed without changing the maths: the identity-reprojection error (auto-masking) does not depend on the
  scale and has no gradient, so it is computed once per step under no_grad, not once per scale; the SSIM
  statistics of the target are pooled once and shared by all warps; back-projection, pose and projection are
  factored as p' ~ D(p) (K R K^-1 p) + K t, so only one multiply-add per scale depends on the depth; the
  tie-break noise is drawn once per step (Monodepth2 draws it per scale); the networks and SSIM's box filter
  run on channels-last memory (faster oneDNN convolutions on CPU; tensor-core layout under AMP on GPU).
- Smoothness images are the target downsampled by area averaging (Monodepth2: PIL antialiased resizes).
- The toy-city preset (pipeline.sh) trains with lr 3e-4 and auto-masking off: its flat-shaded surfaces have
  near-zero identity error, so auto-masking drops about half the pixels there; real video keeps the default.
- `predict` runs the network at the training pixel scale over the full frame (for a model trained with a
  bottom crop: height / (1 - crop), rounded to a multiple of 32) and resizes the disparity bilinearly to --size.
"""
import argparse
import glob
import json
import math
import os
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

# ----------------------------------------------------------------------------------------------------------
# Paper constants (Monodepth2, Godard et al. ICCV 2019, Sec 3-4 and its Appendix; PAPER_NOTES.md stage 1)
# ----------------------------------------------------------------------------------------------------------
SSIM_WEIGHT = 0.85             # alpha of Eqn 1: pe = alpha (1 - SSIM) / 2 + (1 - alpha) |I_a - I_b|_1
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # SSIM stabilisers (Wang et al. 2004) for intensities in [0, 1]
SMOOTHNESS_WEIGHT = 1e-3       # lambda of Eqn 3's term; divided by 2^s at scale s
MIN_DEPTH, MAX_DEPTH = 0.1, 100.0  # sigmoid -> disparity in [1/100, 1/0.1] (Sec 4, "depth in [0.1, 100]")
AUTOMASK_NOISE = 1e-5          # std of the noise added to identity errors to break ties (released code)
POSE_SCALE = 0.01              # pose-decoder outputs are scaled by 0.01 (released code)
ROTATION_EPS = 1e-7            # guard of the axis-angle normalisation
ENCODER_MEAN, ENCODER_STD = 0.45, 0.225  # input normalisation of the encoders (released code)
DECODER_CHANNELS = (16, 32, 64, 128, 256)  # depth decoder channels at 1/1 ... 1/16 (Appendix Table 5)
POSE_CHANNELS = 256            # pose decoder width (Appendix)
NUM_SCALES = 4                 # disparity outputs at 1, 1/2, 1/4, 1/8 of the input
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)  # colour jitter ranges, p 0.5 (Sec 4.1)
EVAL_MIN_DEPTH, EVAL_MAX_DEPTH = 1e-3, 80.0  # evaluation caps (Eigen protocol, Monodepth2 Sec 4.1)
KITTI_INTRINSICS = (0.58, 1.92, 0.5, 0.5)  # normalised fx, fy, cx, cy of KITTI raw (released code's default)
# ----------------------------------------------------------------------------------------------------------
# Readers: the Cityscapes layout (the toy city writes the same), imported by the later stages.
# ----------------------------------------------------------------------------------------------------------
CITYSCAPES_STEM = re.compile(r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})$")
CITYSCAPES_SIZE = (1024, 2048)  # (H, W) of the distributed images; camera JSON intrinsics are in these pixels


def image_stem(path):
    """File name without extension and without the Cityscapes suffix (`_leftImg8bit`, `_disparity`, ...)."""
    name = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"_(leftImg8bit|disparity|camera|gtFine_labelIds|gtFine_instanceIds|pose)$", "", name)


def parse_stem(stem):
    """'aachen_000000_000019' -> ('aachen', 0, 19). Raises ValueError for a non-Cityscapes stem."""
    m = CITYSCAPES_STEM.match(stem)
    if m is None:
        raise ValueError(f"'{stem}' is not a Cityscapes stem (city_SSSSSS_FFFFFF)")
    return m["city"], int(m["seq"]), int(m["frame"])


def list_split_images(data, split):
    """Sorted paths of a split's annotated frames: DATA/leftImg8bit/SPLIT/*/*_leftImg8bit.png."""
    paths = sorted(glob.glob(os.path.join(data, "leftImg8bit", split, "*", "*_leftImg8bit.png")))
    if not paths:
        raise FileNotFoundError(f"no images in {os.path.join(data, 'leftImg8bit', split)}/*/*_leftImg8bit.png "
                                "(make the toy city with `python toycity.py --out DATA`)")
    return paths


def list_split_sequences(data, split):
    """{(city, seq): [frame paths in time order]} from DATA/leftImg8bit_sequence/SPLIT/*/*.png."""
    pattern = os.path.join(data, "leftImg8bit_sequence", split, "*", "*_leftImg8bit.png")
    sequences = {}
    for path in sorted(glob.glob(pattern)):
        city, seq, frame = parse_stem(image_stem(path))
        sequences.setdefault((city, seq), []).append((frame, path))
    if not sequences:
        raise FileNotFoundError(f"no sequence frames match {pattern}")
    return {key: [p for _, p in sorted(frames)] for key, frames in sequences.items()}


def split_file(data, folder, split, stem, suffix):
    """Path of a per-image Cityscapes file, e.g. split_file(D, 'gtFine', 'val', stem, 'gtFine_labelIds.png')."""
    city = parse_stem(stem)[0]
    return os.path.join(data, folder, split, city, f"{stem}_{suffix}")


def find_camera_json(data, split, stem):
    """The camera JSON of a frame's sequence (Cityscapes has one per sequence, named after its annotated frame)."""
    city, seq, _ = parse_stem(stem)
    exact = split_file(data, "camera", split, stem, "camera.json")
    if os.path.exists(exact):
        return exact
    found = sorted(glob.glob(os.path.join(data, "camera", split, city, f"{city}_{seq:06d}_*_camera.json")))
    if not found:
        raise FileNotFoundError(f"no camera JSON for {stem}: expected {exact} (Cityscapes 'camera' package; "
                                "the toy city writes it)")
    return found[0]


def read_camera_json(path, image_size=CITYSCAPES_SIZE, crop_bottom=0.0):
    """Normalised intrinsics (fx/W, fy/H', cx/W, cy/H') from a Cityscapes camera JSON.

    image_size: (H, W) in pixels of the images the JSON's intrinsics refer to (Cityscapes: 1024 x 2048).
    crop_bottom: fraction of rows removed at the bottom (Monodepth2's Cityscapes preparation: 0.25), so that
    H' = H * (1 - crop_bottom); the top-left origin does not move, so cx, cy in pixels are unchanged.
    """
    try:
        with open(path) as f:
            intrinsic = json.load(f)["intrinsic"]
        fx, fy, u0, v0 = (float(intrinsic[k]) for k in ("fx", "fy", "u0", "v0"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable Cityscapes camera JSON with intrinsic fx, fy, u0, v0 ({e})")
    height, width = image_size
    height = height * (1.0 - crop_bottom)
    return np.array([fx / width, fy / height, u0 / width, v0 / height], dtype=np.float64)


def read_disparity_png(path):
    """Cityscapes disparity PNG -> float32 disparity in pixels: d = (p - 1) / 256 for p > 0, 0 where invalid."""
    try:
        p = np.asarray(Image.open(path), dtype=np.float32)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the disparity PNG ({e})")
    return np.where(p > 0, (p - 1.0) / 256.0, 0.0).astype(np.float32)


def encode_disparity_png(disparity):
    """Float disparity in pixels -> uint16 array in Cityscapes' encoding p = 256 d + 1 (0 where d <= 0)."""
    p = np.round(np.asarray(disparity, dtype=np.float64) * 256.0 + 1.0)
    p = np.where(np.asarray(disparity) > 0, np.clip(p, 1, 65535), 0)
    return p.astype(np.uint16)


def read_camera_baseline(path):
    """Stereo baseline in metres from a Cityscapes camera JSON (extrinsic.baseline): depth = baseline * fx / d."""
    try:
        with open(path) as f:
            return float(json.load(f)["extrinsic"]["baseline"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: no extrinsic.baseline in this camera JSON ({e})")


def read_kitti_calibration(path, camera="02"):
    """Normalised intrinsics (fx/W, fy/H, cx/W, cy/H) of a KITTI raw camera from calib_cam_to_cam.txt.

    Uses P_rect_<camera> (3 x 4, pixels of the rectified image) and S_rect_<camera> (W H of that image).
    """
    try:
        rows = {}
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                rows[key.strip()] = value
        P = np.array(rows[f"P_rect_{camera}"].split(), dtype=np.float64).reshape(3, 4)
        width, height = np.array(rows[f"S_rect_{camera}"].split(), dtype=np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable KITTI calib_cam_to_cam.txt with P_rect_{camera}, S_rect_{camera} ({e})")
    return np.array([P[0, 0] / width, P[1, 1] / height, P[0, 2] / width, P[1, 2] / height])


def list_kitti_sequences(data, camera="02"):
    """{drive: [frame paths in time order]} of KITTI raw: DATA/DATE/DRIVE_sync/image_<camera>/data/*.png."""
    pattern = os.path.join(data, "*", "*_sync", f"image_{camera}", "data", "*.png")
    sequences = {}
    for path in sorted(glob.glob(pattern)):
        drive = os.path.dirname(os.path.dirname(os.path.dirname(path)))
        sequences.setdefault(drive, []).append(path)
    if not sequences:
        raise FileNotFoundError(f"no KITTI raw frames match {pattern}")
    return sequences


def list_folder_sequences(data):
    """{folder: [image paths sorted by name]}: every folder under DATA that holds images is one ordered video."""
    sequences = {}
    for root, _, files in sorted(os.walk(data)):
        frames = sorted(f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if frames:
            sequences[root] = [os.path.join(root, f) for f in frames]
    if not sequences:
        raise FileNotFoundError(f"no .png/.jpg frames under {data}")
    return sequences


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


# ----------------------------------------------------------------------------------------------------------
# Pure functions, in pipeline order: disparity, pose, camera geometry, photometric error, losses, metrics
# ----------------------------------------------------------------------------------------------------------
def disp_to_depth(sigma, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """Sigmoid output -> (scaled disparity, depth) (Monodepth2 Sec 4 / Appendix).

    disp = 1/max_depth + (1/min_depth - 1/max_depth) * sigma;  depth = 1 / disp.
    """
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
    """(B, 3) axis-angle and (B, 3) translation -> (B, 4, 4) rigid transform [R | t] (or its inverse).

    The pose network sees a pair (a, b) in temporal order and predicts T_{a->b} (points of camera a expressed
    in camera b). For a source before the target the pair is (source, target), so the target-to-source
    transform is the inverse [R^T | -R^T t].
    """
    R = axis_angle_to_matrix(axis_angle)
    t = translation[:, :, None]                                        # (B, 3, 1)
    if invert:
        R = R.transpose(1, 2)
        t = -R @ t
    bottom = torch.tensor([0, 0, 0, 1], dtype=R.dtype, device=R.device).expand(R.shape[0], 1, 4)
    return torch.cat([torch.cat([R, t], dim=2), bottom], dim=1)


def intrinsics_matrix(intrinsics, height, width):
    """(B, 4) normalised (fx, fy, cx, cy) -> (B, 3, 3) pixel K for an image of height x width.

    Pixel coordinates are continuous, pixel column i spans [i, i + 1] (centre i + 0.5), so the normalised
    values are exact under any resize: fx_pix = fx * W, cx_pix = cx * W, fy_pix = fy * H, cy_pix = cy * H.
    """
    fx, fy, cx, cy = intrinsics.unbind(dim=1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack([fx * width, zero, cx * width,
                        zero, fy * height, cy * height,
                        zero, zero, one], dim=1).view(-1, 3, 3)


def pixel_rays(inv_K, height, width):
    """Rays K^-1 p of every pixel centre p = (i + 0.5, j + 0.5, 1): (B, 3, H*W), row-major pixel order."""
    v, u = torch.meshgrid(torch.arange(height, dtype=inv_K.dtype, device=inv_K.device) + 0.5,
                          torch.arange(width, dtype=inv_K.dtype, device=inv_K.device) + 0.5, indexing="ij")
    p = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones_like(u).reshape(-1)])  # (3, H*W)
    return inv_K @ p


def backproject(depth, inv_K):
    """Eqn 2, first half: camera points P = D(p) K^-1 p of a (B, 1, H, W) depth map -> (B, 3, H*W)."""
    B, _, H, W = depth.shape
    return depth.reshape(B, 1, H * W) * pixel_rays(inv_K, H, W)


def project(points, K, T, height, width, eps=1e-7):
    """Eqn 2, second half: p' ~ K (R P + t) -> grid_sample grid (B, H, W, 2) in normalised coordinates.

    x_norm = 2 u / W - 1 for continuous pixel coordinate u (pixel centres i + 0.5: align_corners=False).
    """
    cam = K @ (T[:, :3, :3] @ points + T[:, :3, 3:])                   # (B, 3, N)
    return pixels_to_grid(cam, height, width, eps)


def pixels_to_grid(cam, height, width, eps=1e-7):
    """Homogeneous pixel coordinates (..., 3, H*W) -> normalised sampling grid (..., H, W, 2)."""
    u = cam[..., 0, :] / (cam[..., 2, :] + eps)
    v = cam[..., 1, :] / (cam[..., 2, :] + eps)
    grid = torch.stack([2 * u / width - 1, 2 * v / height - 1], dim=-1)  # (..., H*W, 2)
    return grid.reshape(*cam.shape[:-2], height, width, 2)


def reprojection_grids(depths, rays, K, T, eps=1e-7):
    """Eqn 2 for many depth maps of one target and one source: (N, B, 1, H, W) depths -> (N, B, H, W, 2) grids.

    p' ~ K (R D(p) K^-1 p + t) = D(p) (K R K^-1 p) + K t: the depth-free factors A = K R K^-1 p (rays given as
    K^-1 p, (B, 3, H*W)) and b = K t are formed once per source; each scale then costs one multiply-add.
    """
    N, B, _, H, W = depths.shape
    A = K @ (T[:, :3, :3] @ rays)                                       # (B, 3, H*W)
    b = K @ T[:, :3, 3:]                                                # (B, 3, 1)
    cam = depths.reshape(N, B, 1, H * W) * A + b                        # (N, B, 3, H*W)
    return pixels_to_grid(cam, H, W, eps)


def warp(image, grid):
    """Sample `image` (B, C, H, W) at `grid` (B, H, W, 2): the reconstruction I_{t'->t} (border padding)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def box3(x):
    """3x3 mean of every full window of x (N, C, H + 2, W + 2) -> (N, C, H, W): avg_pool2d(x, 3, 1) written as
    a depthwise convolution on channels-last memory (on CPU 4x faster than avg_pool2d and 2x faster than the
    same convolution in NCHW, forward and backward; the result is returned contiguous, bit-identical)."""
    C = x.shape[1]
    weight = torch.full((C, 1, 3, 3), 1.0 / 9.0, dtype=x.dtype, device=x.device)
    return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, groups=C).contiguous()


def ssim_statistics(y):
    """Reflection-padded local mean and variance of y (3x3 box): the target's half of SSIM, reusable."""
    yp = F.pad(y, (1, 1, 1, 1), mode="reflect")
    pooled = box3(torch.cat([yp, yp * yp], dim=1))                      # (B, 2C, H, W)
    mu_y, yy = pooled.chunk(2, dim=1)
    return yp, mu_y, yy - mu_y * mu_y


def ssim(x, y, y_statistics=None, c1=SSIM_C1, c2=SSIM_C2):
    """Per-pixel SSIM index (B, C, H, W) with 3x3 average pooling and reflection padding (Wang et al. 2004).

    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)).
    x may hold several images per y: shape (N * B, C, H, W) against y (B, C, H, W) (y's pooling reused).
    """
    yp, mu_y, var_y = ssim_statistics(y) if y_statistics is None else y_statistics
    B = yp.shape[0]
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    xy = (xp.view(-1, B, *xp.shape[1:]) * yp).view(xp.shape)            # y broadcast over the N stacked x
    pooled = box3(torch.cat([xp, xp * xp, xy], dim=1))
    mu_x, xx, xy = pooled.view(-1, B, *pooled.shape[1:]).chunk(3, dim=2)  # (N, B, C, H, W) each
    # numerator: a = 2 mu_x mu_y + C1, b = 2 sigma_xy + C2 = 2 E[xy] - (a - C1) + C2
    a = torch.addcmul(torch.full_like(mu_y, c1), mu_x, 2 * mu_y)
    b = 2 * xy - a + (c1 + c2)
    # denominator: (mu_x^2 + mu_y^2 + C1) (E[x^2] - mu_x^2 + sigma_y^2 + C2)
    mu_x2 = mu_x * mu_x
    d = (mu_x2 + (mu_y * mu_y + c1)) * (xx - mu_x2 + (var_y + c2))
    return (a * b / d).reshape(x.shape)


def photometric_error(pred, target, alpha=SSIM_WEIGHT, target_statistics=None):
    """Monodepth2 Eqn 1: pe = alpha/2 (1 - SSIM) + (1 - alpha) |pred - target|, channel-averaged -> (N*B, 1, H, W).

    (1 - SSIM)/2 is clamped to [0, 1]. pred may stack N reconstructions of the same targets (N*B first dim).
    """
    B = target.shape[0]
    dssim = ((1 - ssim(pred, target, target_statistics)) / 2).clamp(0, 1).mean(1, keepdim=True)
    l1 = (pred.view(-1, B, *pred.shape[1:]) - target).abs().mean(2).reshape(-1, 1, *pred.shape[2:])
    return alpha * dssim + (1 - alpha) * l1


def min_reprojection(reprojection, identity=None, average=False):
    """Eqn 4 and 5: per-pixel minimum over sources of the reprojection error, with auto-masking.

    reprojection: (B, S, H, W) error of each warped source; identity: (B, S, H, W) error of each unwarped
    source (auto-masking, Eqn 5: mu = [min pe(I_t, I_t'->t) < min pe(I_t, I_t')]; taking the minimum over
    both sets is the same loss), or None to switch auto-masking off. average=True is the ablation that
    averages over sources instead of taking the minimum. Returns the per-pixel loss (B, H, W) and the
    auto-mask mu (B, H, W) bool (True where a reprojection won).
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
    """Monodepth2 Eqn 3: L_s = |dx d*| exp(-|dx I|) + |dy d*| exp(-|dy I|), d* = d / mean(d) per image.

    disp (B, 1, h, w) and image (B, 3, h, w) at the same scale; image gradients averaged over channels.
    """
    d = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    dx_d = (d[:, :, :, :-1] - d[:, :, :, 1:]).abs()
    dy_d = (d[:, :, :-1, :] - d[:, :, 1:, :]).abs()
    dx_i = (image[:, :, :, :-1] - image[:, :, :, 1:]).abs().mean(1, keepdim=True)
    dy_i = (image[:, :, :-1, :] - image[:, :, 1:, :]).abs().mean(1, keepdim=True)
    return (dx_d * torch.exp(-dx_i)).mean() + (dy_d * torch.exp(-dy_i)).mean()


def monodepth_loss(disps, target, sources, poses, intrinsics, automask=True, average_reprojection=False,
                   min_depth=MIN_DEPTH, max_depth=MAX_DEPTH, ssim_weight=SSIM_WEIGHT,
                   smoothness_weight=SMOOTHNESS_WEIGHT, generator=None):
    """The full Monodepth2 training loss of one batch (Sec 3.2-3.3), in fp32.

    disps: list of sigmoid disparities (B, 1, H/2^s, W/2^s), s = 0..3; target (B, 3, H, W) and sources
    [(B, 3, H, W)] un-jittered images in [0, 1]; poses [(B, 4, 4)] target-to-source transforms;
    intrinsics (B, 4) normalised. Full-resolution multi-scale (Sec 3.3): every disparity is upsampled to
    H x W before warping. L = 1/S sum_s [ mean_p min(...) + smoothness_weight / 2^s * L_s ].
    Returns (loss, {"photometric", "smoothness", "automask"} floats for logging).
    """
    B, _, H, W = target.shape
    K = intrinsics_matrix(intrinsics, H, W)
    rays = pixel_rays(torch.linalg.inv(K), H, W)                       # (B, 3, H*W), shared by all warps
    stats = ssim_statistics(target)                                     # target's SSIM half, shared
    full = torch.stack([F.interpolate(d, (H, W), mode="bilinear", align_corners=False) for d in disps])
    depth = disp_to_depth(full, min_depth, max_depth)[1]                # (N, B, 1, H, W)
    N, S = len(disps), len(sources)
    reprojection = []
    for source, T in zip(sources, poses):
        grids = reprojection_grids(depth, rays, K, T)                   # (N, B, H, W, 2)
        warped = warp(source.expand(N, *source.shape).reshape(N * B, *source.shape[1:]),
                      grids.reshape(N * B, H, W, 2))                    # (N*B, 3, H, W)
        reprojection.append(photometric_error(warped, target, ssim_weight, stats).view(N, B, H, W))
    reprojection = torch.stack(reprojection, dim=2)                     # (N, B, S, H, W)
    identity = None
    if automask:
        with torch.no_grad():                                           # scale-free and gradient-free: once
            identity = photometric_error(torch.cat(sources), target, ssim_weight, stats).view(S, B, H, W)
            identity = identity.transpose(0, 1)                         # (B, S, H, W)
            identity = identity + AUTOMASK_NOISE * torch.randn(identity.shape, generator=generator,
                                                               device=identity.device, dtype=identity.dtype)
    photometric, smooth, masks = 0.0, 0.0, []
    for s in range(N):
        per_pixel, mask = min_reprojection(reprojection[s], identity, average_reprojection)
        photometric = photometric + per_pixel.mean()
        image_s = F.avg_pool2d(target, 2 ** s) if s > 0 else target
        smooth = smooth + smoothness_weight / 2 ** s * smoothness_loss(disps[s], image_s)
        masks.append(mask.float().mean())
    loss = (photometric + smooth) / N
    return loss, {"photometric": float(photometric.detach() / N), "smoothness": float(smooth.detach() / N),
                  "automask": float(sum(masks) / N)}


def lr_at(step, base_lr, drop_step, gamma=0.1):
    """Step schedule: base_lr until drop_step, then base_lr * gamma (Monodepth2: x0.1 after epoch 15 of 20)."""
    return base_lr * (gamma if step >= drop_step else 1.0)


def normalise_disparity(disp):
    """(B, 1, H, W) positive disparity -> divided by each image's maximum: values in (0, 1], scale-free."""
    return disp / disp.amax(dim=(1, 2, 3), keepdim=True)


def median_scaled_errors(pred_depth, gt_depth, min_depth=EVAL_MIN_DEPTH, max_depth=EVAL_MAX_DEPTH):
    """One image's depth metrics after median scaling (Monodepth2 Sec 4.1, Eigen et al. 2014 metrics).

    pred_depth, gt_depth: numpy arrays of the same shape (gt 0 where invalid). Valid: min < gt < max.
    ratio = median(gt) / median(pred); pred <- clip(pred * ratio, min, max); then
    abs_rel = mean |p - g| / g, sq_rel = mean (p - g)^2 / g, rmse = sqrt mean (p - g)^2,
    rmse_log = sqrt mean (log p - log g)^2, a_k = mean [max(g/p, p/g) < 1.25^k].
    Returns (metrics dict, ratio).
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


# ----------------------------------------------------------------------------------------------------------
# Networks (Monodepth2 Appendix): ResNet encoder, depth decoder with 4 sigmoid scales, pose network
# ----------------------------------------------------------------------------------------------------------
ENCODER_CHANNELS = {"resnet18": (64, 64, 128, 256, 512), "resnet34": (64, 64, 128, 256, 512),
                    "resnet50": (64, 256, 512, 1024, 2048)}


class ResnetEncoder(nn.Module):
    """torchvision ResNet trunk returning 5 feature maps at 1/2 ... 1/32; `images` frames stacked on channels."""

    def __init__(self, arch="resnet18", images=1):
        super().__init__()
        if arch not in ENCODER_CHANNELS:
            raise ValueError(f"--arch {arch}: choose one of {sorted(ENCODER_CHANNELS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        if images > 1:
            net.conv1 = nn.Conv2d(3 * images, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.images, self.channels = images, ENCODER_CHANNELS[arch]
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def load_imagenet(self, state_dict):
        """Load a torchvision ResNet state_dict; for stacked frames conv1's kernel is repeated and divided."""
        state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        if self.images > 1:
            state["conv1.weight"] = torch.cat([state["conv1.weight"]] * self.images, dim=1) / self.images
        self.load_state_dict(state, strict=True)

    def forward(self, x):
        x = ((x - ENCODER_MEAN) / ENCODER_STD).contiguous(memory_format=torch.channels_last)
        f1 = self.relu(self.bn1(self.conv1(x)))                         # 1/2
        f2 = self.layer1(self.maxpool(f1))                              # 1/4
        f3 = self.layer2(f2)                                            # 1/8
        f4 = self.layer3(f3)                                            # 1/16
        f5 = self.layer4(f4)                                            # 1/32
        return [f1, f2, f3, f4, f5]


def conv_block(cin, cout):
    """Reflection-padded 3x3 convolution + ELU (Monodepth2 decoder block)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect"), nn.ELU(inplace=True))


class DepthDecoder(nn.Module):
    """U-Net decoder: per level conv, nearest x2 upsample, skip concat, conv; sigmoid disparity at 4 scales."""

    def __init__(self, encoder_channels, channels=DECODER_CHANNELS, num_scales=NUM_SCALES):
        super().__init__()
        self.num_scales = num_scales
        self.up0, self.up1, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(4, -1, -1):                                      # level i works at 1/2^i after upsampling
            cin = encoder_channels[-1] if i == 4 else channels[i + 1]
            self.up0.append(conv_block(cin, channels[i]))
            skip = encoder_channels[i - 1] if i > 0 else 0
            self.up1.append(conv_block(channels[i] + skip, channels[i]))
        for s in range(num_scales):
            self.heads.append(nn.Conv2d(channels[s], 1, 3, padding=1, padding_mode="reflect"))

    def forward(self, features):
        x, disps = features[-1], {}
        for j, i in enumerate(range(4, -1, -1)):
            x = F.interpolate(self.up0[j](x), scale_factor=2, mode="nearest")
            if i > 0:
                x = torch.cat([x, features[i - 1]], dim=1)
            x = self.up1[j](x)
            if i < self.num_scales:
                disps[i] = torch.sigmoid(self.heads[i](x))             # (B, 1, H/2^i, W/2^i)
        return [disps[s] for s in range(self.num_scales)]


class DepthNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1], H and W multiples of 32 -> list of 4 sigmoid disparities, full res first."""

    def __init__(self, arch="resnet18", num_scales=NUM_SCALES):
        super().__init__()
        self.encoder = ResnetEncoder(arch, images=1)
        self.decoder = DepthDecoder(self.encoder.channels, num_scales=num_scales)
        self.to(memory_format=torch.channels_last)  # NHWC: convolutions ~20% faster on CPU (oneDNN), AMP on GPU

    def forward(self, image):
        return self.decoder(self.encoder(image))


class PoseNet(nn.Module):
    """Separate ResNet on a frame pair stacked on channels -> (axis-angle (B, 3), translation (B, 3)), T_{a->b}."""

    def __init__(self, arch="resnet18"):
        super().__init__()
        self.encoder = ResnetEncoder(arch, images=2)
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


# ----------------------------------------------------------------------------------------------------------
# Input / output: training triplets, checkpoints, atomic writes
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


def round32(x):
    return max(32, int(round(x / 32.0)) * 32)


def triplets_of(paths, offset):
    """Indices (t, t - k, t + k) of a time-ordered frame list whose two neighbours exist."""
    return [(t, t - offset, t + offset) for t in range(offset, len(paths) - offset)]


def training_items(args):
    """[(target, previous, next) paths, normalised intrinsics (4,)] of every training triplet."""
    items = []
    if args.dataset == "cityscapes":
        for split in args.split:
            for (city, seq), paths in sorted(list_split_sequences(args.data, split).items()):
                frames = [parse_stem(image_stem(p))[2] for p in paths]
                by_frame = dict(zip(frames, paths))
                camera = find_camera_json(args.data, split, image_stem(paths[0]))
                K = read_camera_json(camera, image_size(paths[0]), args.crop_bottom)
                for f in frames:
                    k = args.frame_offset
                    if f - k in by_frame and f + k in by_frame:
                        items.append(((by_frame[f], by_frame[f - k], by_frame[f + k]), K))
    else:
        sequences = list_kitti_sequences(args.data) if args.dataset == "kitti" else list_folder_sequences(args.data)
        for folder, paths in sorted(sequences.items()):
            if args.intrinsics is not None:
                K = np.array(args.intrinsics, dtype=np.float64)
            elif args.dataset == "kitti":
                calib = os.path.join(os.path.dirname(folder), "calib_cam_to_cam.txt")
                K = read_kitti_calibration(calib) if os.path.exists(calib) else np.array(KITTI_INTRINSICS)
            else:
                raise SystemExit("depth.py train --dataset folder needs --intrinsics FX FY CX CY (normalised)")
            items += [(tuple(paths[i] for i in idx), K) for idx in triplets_of(paths, args.frame_offset)]
    if not items:
        raise SystemExit(f"no training triplets with frame offset {args.frame_offset} under {args.data}")
    return items


def colour_jitter(frames, rng):
    """Monodepth2's augmentation: one random brightness/contrast/saturation/hue change shared by all frames."""
    import torchvision.transforms.functional as TF
    ops = [lambda x, f=rng.uniform(1 - JITTER["brightness"], 1 + JITTER["brightness"]): TF.adjust_brightness(x, f),
           lambda x, f=rng.uniform(1 - JITTER["contrast"], 1 + JITTER["contrast"]): TF.adjust_contrast(x, f),
           lambda x, f=rng.uniform(1 - JITTER["saturation"], 1 + JITTER["saturation"]): TF.adjust_saturation(x, f),
           lambda x, f=rng.uniform(-JITTER["hue"], JITTER["hue"]): TF.adjust_hue(x, f)]
    for i in rng.permutation(4):
        frames = ops[i](frames)
    return frames


class TripletDataset(torch.utils.data.Dataset):
    """Frame triplets at size (H, W): {"frames" (3, 3, H, W) order (0, -k, +k), "aug" jittered, "intrinsics" (4,)}.

    Augmentation randomness comes from (seed, epoch, index), so it does not depend on workers or resumes.
    """

    def __init__(self, items, size, crop_bottom=0.0, augment=True, seed=0):
        self.items, self.size, self.crop_bottom, self.augment, self.seed, self.epoch = \
            items, tuple(size), crop_bottom, augment, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        paths, K = self.items[index]
        frames = torch.stack([load_rgb(p, self.size, self.crop_bottom) for p in paths])  # (3, 3, H, W)
        intrinsics = torch.tensor(K, dtype=torch.float32)
        aug = frames
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < 0.5:                                      # horizontal flip p 0.5
                frames = frames.flip(-1)
                intrinsics[2] = 1.0 - intrinsics[2]                     # cx -> W - cx (continuous pixels)
            aug = colour_jitter(frames, rng) if rng.random() < 0.5 else frames  # jitter p 0.5
        return {"frames": frames, "aug": aug, "intrinsics": intrinsics}


class EpochBatches(torch.utils.data.Sampler):
    """Batches of a seeded per-epoch permutation (drop last), starting at batch `start` (exact resume)."""

    def __init__(self, n, batch_size, seed, epoch, start=0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start

    def __len__(self):
        return self.n // self.batch_size - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def train_step(depth_net, pose_net, optimizer, scaler, batch, args, amp_dtype, generator=None):
    """One optimisation step on a batch dict (frames order 0, -k, +k). Returns (loss tensor, logs)."""
    device = next(depth_net.parameters()).device
    frames = batch["frames"].to(device, non_blocking=True)              # (B, 3 frames, 3, H, W)
    aug = batch["aug"].to(device, non_blocking=True)
    intrinsics = batch["intrinsics"].to(device)
    B = frames.shape[0]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        disps = depth_net(aug[:, 0])
        # pairs in temporal order: (previous, target) then (target, next), one batch of 2B
        axis_angle, translation = pose_net(torch.cat([aug[:, 1], aug[:, 0]]), torch.cat([aug[:, 0], aug[:, 2]]))
    axis_angle, translation = axis_angle.float(), translation.float()
    poses = [pose_matrix(axis_angle[:B], translation[:B], invert=True),  # target -> previous
             pose_matrix(axis_angle[B:], translation[B:], invert=False)]  # target -> next
    loss, logs = monodepth_loss([d.float() for d in disps], frames[:, 0], [frames[:, 1], frames[:, 2]], poses,
                                intrinsics, automask=not args.no_automask,
                                average_reprojection=args.avg_reprojection, min_depth=args.min_depth,
                                max_depth=args.max_depth, ssim_weight=args.ssim_weight,
                                smoothness_weight=args.smoothness_weight, generator=generator)
    if not torch.isfinite(loss):
        return loss, logs
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logs


def amp_dtype_for(device, no_amp):
    """AMP: fp16 (+ GradScaler) on CUDA, bf16 on CPU, None with --no-amp."""
    if no_amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def rng_states(noise_generator):
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "noise": noise_generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, noise_generator):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    noise_generator.set_state(states["noise"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def model_file(depth_net, pose_net, args):
    """The plain-dict model file that predict (and later stages) rebuild the network from."""
    return {"arch": args.arch, "model": depth_net.state_dict(), "pose_model": pose_net.state_dict(),
            "args": vars(args), "size": list(args.size), "crop_bottom": args.crop_bottom,
            "num_scales": NUM_SCALES, "min_depth": args.min_depth, "max_depth": args.max_depth}


def load_depth_model(path, map_location="cpu"):
    """Rebuild the depth network from WORK/depth/model.pt (strict) -> (DepthNet in eval mode, model dict)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: make it with `python depth.py train --data DATA --work WORK`")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    net = DepthNet(ckpt["arch"], ckpt["num_scales"])
    net.load_state_dict(ckpt["model"], strict=True)
    return net.eval(), ckpt


# ----------------------------------------------------------------------------------------------------------
# run: train, predict, eval
# ----------------------------------------------------------------------------------------------------------
def resolve_crop_bottom(args):
    """--crop-bottom default: 0.25 for real Cityscapes (ego-car hood), 0 for the toy city, KITTI and folders."""
    if args.crop_bottom is not None:
        return args.crop_bottom
    if args.dataset != "cityscapes":
        return 0.0
    cities = {os.path.basename(p) for s in args.split for p in glob.glob(os.path.join(args.data, "leftImg8bit_sequence", s, "*"))}
    return 0.0 if cities <= {"toycity"} else 0.25


def depth_train_paths(args):
    """(WORK/depth, its model.pt, its checkpoint.pt), or None when a finished model.pt leaves nothing to do.

    An unfinished checkpoint.pt needs --resume or --overwrite; --overwrite removes the old model, checkpoint and log.
    """
    out = os.path.join(args.work, "depth")
    os.makedirs(out, exist_ok=True)
    model_path, ckpt_path = os.path.join(out, "model.pt"), os.path.join(out, "checkpoint.pt")
    if os.path.exists(model_path) and not args.overwrite and not (args.resume and os.path.exists(ckpt_path)):
        print(f"[depth] {model_path} exists: skipping training (--resume to continue, --overwrite to restart)")
        return None
    if os.path.exists(ckpt_path) and not (args.resume or args.overwrite):
        raise SystemExit(f"[depth] {ckpt_path} exists from an unfinished run: pass --resume or --overwrite")
    if args.overwrite:
        for name in ("model.pt", "checkpoint.pt", "log.jsonl"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    return out, model_path, ckpt_path


def depth_schedule(num_triplets, args):
    """(steps per epoch, total steps, step to stop at, lr drop step); with --steps the drop keeps its fraction of
    --epochs."""
    steps_per_epoch = num_triplets // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{num_triplets} triplets are fewer than one batch of {args.batch_size}")
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    stop = total if args.stop_after is None else min(total, args.stop_after)
    drop_step = (args.lr_drop_epoch * steps_per_epoch if args.steps is None
                 else int(round(total * args.lr_drop_epoch / args.epochs)))
    return steps_per_epoch, total, stop, drop_step


def depth_training_setup(args, device, amp_dtype):
    """DepthNet and PoseNet (encoders from --weights if given), one Adam over both, the fp16 GradScaler (a no-op
    otherwise) and the generator of the loss's noise. Returns (depth_net, pose_net, optimizer, scaler, noise)."""
    depth_net, pose_net = DepthNet(args.arch).to(device), PoseNet(args.arch).to(device)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        depth_net.encoder.load_imagenet(state)
        pose_net.encoder.load_imagenet(state)
    params = list(depth_net.parameters()) + list(pose_net.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    noise = torch.Generator(device).manual_seed(args.seed)
    return depth_net, pose_net, optimizer, scaler, noise


def resume_depth(ckpt_path, device, depth_net, pose_net, optimizer, scaler, noise):
    """Restore checkpoint.pt in place (weights, optimiser, scaler and every RNG, so the run continues exactly);
    returns the checkpoint dict."""
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
    depth_net.load_state_dict(ckpt["model"])
    pose_net.load_state_dict(ckpt["pose_model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"], noise)
    return ckpt


def save_depth_checkpoint(ckpt_path, depth_net, pose_net, optimizer, scaler, noise, args, step, steps_per_epoch,
                          drop_step):
    atomic_save({"model": depth_net.state_dict(), "pose_model": pose_net.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "epoch": step // steps_per_epoch, "rng": rng_states(noise), "args": vars(args),
                 "lr_schedule": {"base_lr": args.lr, "drop_step": drop_step, "gamma": args.lr_gamma}},
                ckpt_path)


def depth_epoch_loader(dataset, args, device, step, steps_per_epoch, generator):
    """The batches of step's epoch from step on (a resumed run starts mid-epoch)."""
    epoch, first = divmod(step, steps_per_epoch)
    dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=EpochBatches(len(dataset), args.batch_size, args.seed, epoch, first),
        num_workers=args.workers, pin_memory=device.type == "cuda", generator=generator)


def log_depth_step(log, bar, step, total, steps_per_epoch, loss, lr, logs, speed):
    """One log.jsonl record and one printed line with loss, lr, speed (s/step) and ETA."""
    record = {"step": step, "epoch": step // steps_per_epoch, "loss": loss.item(), "lr": lr,
              "s_per_step": speed, **logs}
    log.write(json.dumps(record) + "\n")
    log.flush()
    eta = time.strftime("%H:%M:%S", time.gmtime(speed * (total - step)))
    bar.write(f"step {step:7d}/{total} epoch {record['epoch']:3d} loss {loss.item():.4f} "
              f"photo {logs['photometric']:.4f} automask {logs['automask']:.2f} lr {lr:.1e} "
              f"{speed:.2f} s/step eta {eta}")


def train_depth(dataset, depth_net, pose_net, optimizer, scaler, noise, args, device, amp_dtype, out, step,
                schedule):
    """Train from step to the stop step, logging every --log-every steps and checkpointing every --save-every
    steps and at each epoch's end; stops on a non-finite loss. Returns the step reached."""
    from tqdm import tqdm
    steps_per_epoch, total, stop, drop_step = schedule
    ckpt_path = os.path.join(out, "checkpoint.pt")
    depth_net.train()
    pose_net.train()
    bar = tqdm(total=total, initial=step, desc="depth train", dynamic_ncols=True, disable=args.no_progress)
    log = open(os.path.join(out, "log.jsonl"), "a")
    start_time, start_step = time.time(), step
    loader_generator = torch.Generator()
    while step < stop:
        for batch in depth_epoch_loader(dataset, args, device, step, steps_per_epoch, loader_generator):
            lr = lr_at(step, args.lr, drop_step, args.lr_gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logs = train_step(depth_net, pose_net, optimizer, scaler, batch, args, amp_dtype, noise)
            if not torch.isfinite(loss):
                bar.close()
                raise SystemExit(f"[depth] non-finite loss {loss.item()} at step {step}: stopping "
                                 f"(last checkpoint {ckpt_path}); try --no-amp or a lower --lr")
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % args.log_every == 0 or step == total:
                speed = (time.time() - start_time) / (step - start_step)
                log_depth_step(log, bar, step, total, steps_per_epoch, loss, lr, logs, speed)
            if step % args.save_every == 0 or step % steps_per_epoch == 0 or step == stop:
                save_depth_checkpoint(ckpt_path, depth_net, pose_net, optimizer, scaler, noise, args, step,
                                      steps_per_epoch, drop_step)
            if step == stop:
                break
    bar.close()
    log.close()
    if step == start_step and not os.path.exists(ckpt_path):
        save_depth_checkpoint(ckpt_path, depth_net, pose_net, optimizer, scaler, noise, args, step, steps_per_epoch,
                              drop_step)
    return step


def keep_freed_memory():
    """Tell glibc to keep freed memory instead of returning it to the kernel (Linux only; no-op elsewhere).

    A CPU training step allocates and frees hundreds of MB of full-resolution temporaries (warps, SSIM); by
    default glibc unmaps them and the next step page-faults them in again, which costs more time than the
    loss arithmetic (measured: 17.9 s -> 8.9 s per 192 x 640 batch-12 step). Same as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=... in the environment. The numbers are unchanged.
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or name is None:
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc malloc.h
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
                and libc.mallopt(m_top_pad, 2**30))


def train(args):
    paths = depth_train_paths(args)
    if paths is None:
        return
    out, model_path, ckpt_path = paths
    args.crop_bottom = resolve_crop_bottom(args)
    if args.size[0] % 32 or args.size[1] % 32:
        raise SystemExit(f"--size {args.size[0]} {args.size[1]}: height and width must be multiples of 32")
    device = pick_device(args.device)
    amp_dtype = amp_dtype_for(device, args.no_amp)
    seed_everything(args.seed)
    keep_freed_memory()
    print(f"[depth] device {device}, amp {amp_dtype}, args " + json.dumps(dict(sorted(vars(args).items()))))

    dataset = TripletDataset(training_items(args), args.size, args.crop_bottom, augment=not args.no_augment,
                             seed=args.seed)
    schedule = depth_schedule(len(dataset), args)
    steps_per_epoch, total, _, drop_step = schedule
    depth_net, pose_net, optimizer, scaler, noise = depth_training_setup(args, device, amp_dtype)
    step = 0
    if args.resume and os.path.exists(ckpt_path):
        ckpt = resume_depth(ckpt_path, device, depth_net, pose_net, optimizer, scaler, noise)
        step = ckpt["step"]
        if step >= total and os.path.exists(model_path):
            print(f"[depth] {model_path} exists and {ckpt_path} is at step {step} of {total}: nothing to do")
            return
        print(f"[depth] resumed {ckpt_path} at step {step} (epoch {ckpt['epoch']})")
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)

    print(f"[depth] {len(dataset)} triplets, {steps_per_epoch} steps per epoch, {total} steps, lr drop at step {drop_step}")
    step = train_depth(dataset, depth_net, pose_net, optimizer, scaler, noise, args, device, amp_dtype, out, step,
                       schedule)
    if step < total:
        print(f"[depth] stopped at step {step} of {total} (--stop-after); continue with --resume")
        return
    atomic_save(model_file(depth_net, pose_net, args), model_path)
    print(f"[depth] wrote {model_path} after {step} steps")


def colourise(disp):
    """(H, W) disparity in (0, 1] -> (H, W, 3) uint8 with a magma-like colour map (dark far, bright near)."""
    anchors = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float64)
    d = np.clip(disp / np.percentile(disp, 95), 0, 1) * (len(anchors) - 1)
    i = np.minimum(d.astype(int), len(anchors) - 2)
    w = (d - i)[..., None]
    return ((1 - w) * anchors[i] + w * anchors[i + 1]).astype(np.uint8)


def shard_of(items, shard):
    """--shard i/n: every n-th item starting at i (0-based)."""
    i, n = (int(x) for x in shard.split("/"))
    if not 0 <= i < n:
        raise SystemExit(f"--shard {shard}: need 0 <= i < n")
    return items[i::n]


def predict(args):
    net, model = load_depth_model(os.path.join(args.work, "depth", "model.pt"))
    device = pick_device(args.device)
    net = net.to(device)
    crop = model["crop_bottom"]
    net_size = tuple(args.net_size) if args.net_size else (round32(model["size"][0] / (1 - crop)), model["size"][1])
    size = tuple(args.size) if args.size else net_size
    if args.images:
        paths = sorted(glob.glob(args.images))
        if not paths:
            raise SystemExit(f"--images {args.images}: no file matches")
    else:
        paths = list_split_images(args.data, args.split)
    paths = shard_of(paths, args.shard)
    out = os.path.join(args.work, "disp")
    os.makedirs(out, exist_ok=True)
    if args.preview:
        os.makedirs(os.path.join(args.work, "disp_preview"), exist_ok=True)
    todo = [p for p in paths if args.overwrite or not os.path.exists(os.path.join(out, image_stem(p) + ".npy"))]
    print(f"[depth] predict {len(todo)} of {len(paths)} images (others done) at {size[0]} x {size[1]}, "
          f"network input {net_size[0]} x {net_size[1]}, device {device}")
    amp_dtype = amp_dtype_for(device, args.no_amp)
    from tqdm import tqdm
    for b in tqdm(range(0, len(todo), args.batch_size), desc="depth predict", disable=args.no_progress):
        chunk = todo[b:b + args.batch_size]
        images = torch.stack([load_rgb(p, net_size) for p in chunk]).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            sigma = net(images)[0].float()
        disp = disp_to_depth(sigma, model["min_depth"], model["max_depth"])[0]
        disp = normalise_disparity(F.interpolate(disp, size, mode="bilinear", align_corners=False))
        for path, d in zip(chunk, disp[:, 0].cpu().numpy().astype(np.float32)):
            stem = image_stem(path)
            atomic_save(d, os.path.join(out, stem + ".npy"), saver=np.save)
            if args.preview:
                tmp = os.path.join(args.work, "disp_preview", f".{stem}.tmp.png")
                Image.fromarray(colourise(d)).save(tmp)
                os.replace(tmp, os.path.join(args.work, "disp_preview", stem + ".png"))
    print(f"[depth] disparities in {out}")


def evaluate(args):
    stems = [image_stem(p) for p in list_split_images(args.data, args.split)]
    disp_dir = os.path.join(args.work, "disp")
    rows, ratios = [], []
    for stem in stems:
        disp_path = os.path.join(disp_dir, stem + ".npy")
        if not os.path.exists(disp_path):
            raise SystemExit(f"{disp_path} is missing: run `python depth.py predict --work {args.work} "
                             f"--data {args.data} --split {args.split}` first")
        pred = np.load(disp_path)
        if pred.ndim != 2 or pred.dtype != np.float32:
            raise SystemExit(f"{disp_path}: expected a float32 (H, W) disparity, got {pred.dtype} {pred.shape}")
        gt_path = split_file(args.data, "disparity", args.split, stem, "disparity.png")
        if not os.path.exists(gt_path):
            raise SystemExit(f"{gt_path} is missing: eval needs the dataset's ground-truth disparity PNGs")
        gt_disp = read_disparity_png(gt_path)
        camera = find_camera_json(args.data, args.split, stem)
        frame = split_file(args.data, "leftImg8bit", args.split, stem, "leftImg8bit.png")
        fx = read_camera_json(camera, image_size(frame))[0] * gt_disp.shape[1]  # fx in pixels of the PNG
        gt = disparity_to_depth(gt_disp, read_camera_baseline(camera), fx)
        keep = int(round(gt.shape[0] * (1 - args.crop_bottom)))
        gt = gt[:keep]
        pred_t = torch.from_numpy(pred)[None, None]
        pred_full = F.interpolate(pred_t, gt_disp.shape, mode="bilinear", align_corners=False)[0, 0].numpy()[:keep]
        if not ((gt > EVAL_MIN_DEPTH) & (gt < EVAL_MAX_DEPTH)).any():
            continue
        metrics, ratio = median_scaled_errors(1.0 / np.maximum(pred_full, 1e-8), gt)
        rows.append(metrics)
        ratios.append(ratio)
    if not rows:
        raise SystemExit(f"no image of {args.split} has valid ground-truth depth")
    names = ["abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in names}
    ratios = np.array(ratios)
    result = {**mean, "ratio_median": float(np.median(ratios)),
              "ratio_std": float(np.std(ratios / np.median(ratios))), "images": len(rows),
              "split": args.split, "crop_bottom": args.crop_bottom}
    os.makedirs(os.path.join(args.work, "depth"), exist_ok=True)
    path = os.path.join(args.work, "depth", "eval.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    print(f"[depth] eval on {len(rows)} {args.split} images, median scaling ratio {result['ratio_median']:.3f} "
          f"(std of ratio/median {result['ratio_std']:.3f})")
    print("| " + " | ".join(names) + " |\n|" + "---|" * len(names))
    print("| " + " | ".join(f"{mean[k]:.3f}" for k in names) + " |")
    print(f"[depth] wrote {path}")
    return result


def run(args):
    {"train": train, "predict": predict, "eval": evaluate}[args.command](args)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="self-supervised training on video triplets",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, help="dataset root (Cityscapes layout, KITTI raw, or a frames folder)")
    t.add_argument("--work", required=True, help="work folder; writes WORK/depth/")
    t.add_argument("--dataset", default="cityscapes", choices=["cityscapes", "kitti", "folder"],
                   help="layout of --data (the toy city is 'cityscapes')")
    t.add_argument("--split", nargs="+", default=["train"], help="Cityscapes sequence splits to train on")
    t.add_argument("--intrinsics", nargs=4, type=float, metavar=("FX", "FY", "CX", "CY"),
                   help="normalised intrinsics (fx/W, fy/H, cx/W, cy/H) for --dataset folder (or to override KITTI)")
    t.add_argument("--size", nargs=2, type=int, default=[192, 512], metavar=("H", "W"),
                   help="training size, multiples of 32 (Cityscapes 192 x 512 after the crop; KITTI 192 x 640)")
    t.add_argument("--crop-bottom", type=float, default=None,
                   help="fraction of rows cut at the bottom before resizing (default 0.25 on Cityscapes, 0 otherwise)")
    t.add_argument("--frame-offset", type=int, default=2,
                   help="source frames at -k and +k (Cityscapes 17 Hz: 2; KITTI 10 Hz and the toy city: 1)")
    t.add_argument("--arch", default="resnet18", choices=sorted(ENCODER_CHANNELS), help="encoder of both networks")
    t.add_argument("--weights", default=None, help="local torchvision ResNet state_dict (ImageNet) for both encoders")
    t.add_argument("--epochs", type=int, default=20, help="Monodepth2: 20")
    t.add_argument("--steps", type=int, default=None, help="total steps instead of --epochs (schedule scaled)")
    t.add_argument("--batch-size", type=int, default=12, help="Monodepth2: 12")
    t.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (Monodepth2: 1e-4)")
    t.add_argument("--lr-drop-epoch", type=int, default=15, help="lr x gamma after this epoch (Monodepth2: 15 of 20)")
    t.add_argument("--lr-gamma", type=float, default=0.1)
    t.add_argument("--min-depth", type=float, default=MIN_DEPTH, help="depth range of the sigmoid (Monodepth2)")
    t.add_argument("--max-depth", type=float, default=MAX_DEPTH)
    t.add_argument("--ssim-weight", type=float, default=SSIM_WEIGHT, help="alpha of Eqn 1")
    t.add_argument("--smoothness-weight", type=float, default=SMOOTHNESS_WEIGHT, help="Eqn 3 weight (/2^s per scale)")
    t.add_argument("--no-automask", action="store_true", help="ablation: no auto-masking of static pixels")
    t.add_argument("--avg-reprojection", action="store_true", help="ablation: average over sources, not minimum")
    t.add_argument("--no-augment", action="store_true", help="no flip and colour jitter")
    t.add_argument("--workers", type=int, default=4, help="data-loading processes")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--no-amp", action="store_true", help="fp32 instead of autocast (fp16 on CUDA, bf16 on CPU)")
    t.add_argument("--resume", action="store_true", help="continue exactly from WORK/depth/checkpoint.pt")
    t.add_argument("--overwrite", action="store_true", help="train again even if model.pt exists")
    t.add_argument("--stop-after", type=int, default=None,
                   help="end this run after N steps in total (checkpoint kept, no model.pt), e.g. for a job "
                        "time limit; --resume continues on the same schedule")
    t.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and each epoch)")
    t.add_argument("--log-every", type=int, default=50, help="log line every N steps")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bar")

    r = sub.add_parser("predict", help="disparity of images -> WORK/disp/<stem>.npy",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--work", required=True)
    r.add_argument("--data", help="dataset root: predicts the annotated frames of --split")
    r.add_argument("--split", default="val")
    r.add_argument("--images", help="glob of images instead of --data/--split (stem = file name)")
    r.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="output size (default: the network input size)")
    r.add_argument("--net-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="network input size (default: the training pixel scale over the full frame)")
    r.add_argument("--batch-size", type=int, default=12)
    r.add_argument("--shard", default="0/1", help="i/n: this process predicts every n-th image from i")
    r.add_argument("--preview", action="store_true", help="also colour PNGs in WORK/disp_preview/")
    r.add_argument("--overwrite", action="store_true", help="redo finished images")
    r.add_argument("--device", default="auto")
    r.add_argument("--no-amp", action="store_true")
    r.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="median-scaled depth metrics against ground-truth disparity PNGs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--work", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="val")
    e.add_argument("--crop-bottom", type=float, default=0.0,
                   help="ignore this fraction of rows at the bottom (Cityscapes ego car: 0.25)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.command == "predict" and not (args.images or args.data):
        raise SystemExit("depth.py predict: give --data DATA --split S or --images GLOB")
    run(args)


if __name__ == "__main__":
    main()
