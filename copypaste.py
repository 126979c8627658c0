"""Stage 3: cross-context samples: copy-paste coherent depth regions into other scenes, every transform recorded.

Paper: Zeng et al., BMVC 2022, Sec 3.3 (copy-paste with depth-aware scaling and DepthMix occlusion) and the
per-canvas training augmentation of Sec 3.4. Pipeline: group.py (regions) + depth.py (disparity) -> this ->
swav_dense.py (which imports `CopyPasteDataset` / `augment_canvas`, or reads the saved samples).

| file                                      | shape / dtype            | meaning                                      |
|-------------------------------------------|--------------------------|----------------------------------------------|
| images (`--data/--split` or `--images`)   | PNG/JPG                  | the source scenes (read)                     |
| WORK/disp/<stem>.npy (`depth.py predict`) | float32 (h, w)           | disparity, larger = nearer, any scale (read) |
| WORK/regions/<stem>.npy (`group.py`)      | int (h, w)               | region ids, any resolution, any ids (read)   |
| WORK/samples/epoch_EEE/NNNNNN.pt          | dict, see `build_sample` | one sample of 2M canvases (written)          |
| WORK/samples/settings.json, preview/*.png | JSON, RGB PNG            | the settings; the canvases, copies outlined  |

A sample (a plain dict, `torch.load(weights_only=True)`): images uint8 (2M, 3, H, W) the canvases before the
per-canvas training augmentation; labels int32 (2M, H, W) r * T + s (region r, global over the M sources, slot
s); transforms float32 (R, T, 3, 3): slot s of region r maps normalized coords of r's source to those of canvas
canvas_of[r, s] (int64 (R, T), -1 = slot unused); slots T = 2 + e1 + e2; sources the M stems. Normalized
coordinates follow grid_sample(align_corners=False): column i has x = (2i + 1) / W - 1.

    python copypaste.py --work runs/cs --data CITYSCAPES --split train --epochs 0 --preview 8   # paper scale
        # (a 384 x 768, M 8 sample is ~33 MB: swav_dense.py --on-the-fly builds them, same code and seeds)
    python copypaste.py --work runs/toy --data data/toycity --split train --size 192 384 --mix 4 --epochs 10 \
        --workers 2 --preview 2                                                                 # toy, ~1 minute
Choices and deviations (stated plainly)
- Sample k of epoch e is seeded from (--seed, e, k): the same on disk, on the fly and in any worker.
- Every id of every source is one region, made contiguous and global; a single-region source covers the
  canvas, so the size filter leaves all its pasted slots unused (-1).
- A region map or disparity of another size is resized to its image (nearest / bilinear); an aspect ratio off
  by more than 2 % is the wrong file: loading stops with an error naming both files.
- Pixel constants (size filter 16/6/32 px, minimum pasted size 8 px, h_t 16 px) are the paper's at 384 rows and
  scale with H / 384. A copy's disparity is multiplied by the vertical scale actually applied (round(h s) / h),
  as its matrix; its top row is round((top - c) s' + c) + jitter, c = H // 2.
- The released code leaves skipped slots on a canvas with an identity matrix (here -1), and clamps the top row
  after recording the matrix (here the copy is pasted at the recorded position and clipped): matrices are exact.
- A copy's color is resized, flipped and photometrically changed only where DepthMix lets it show (its changed
  box + 2 px of context for the blur; none for a box under 3 px), so contrast's mean is that box's; disparity is
  resized without antialiasing (it is only compared and blended). The soft mask's blur reflects at the box edge.
- Per-canvas augmentation as released: color jitter (0.5, 0.5, 0.5, 0.2); resize aspect log-uniform.
"""
import argparse
import glob
import math
import os
import re
import time

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm import tqdm

import depth
from depth import (BadInput, atomic_write, load_npy, nonnegative_int, positive_int, ranged, record_settings,
                   remove_stale_temporaries, run_main)

# ----------------------------------------------------------------------------------------------------------
# Paper constants (Sec 3.3; released code LeungTsang/CPCDR where the paper is silent)
# ----------------------------------------------------------------------------------------------------------
REFERENCE_ROWS = 384            # the pixel constants below are defined at 384 rows (Cityscapes 384 x 768)
MIN_H, MIN_W, MIN_BOTH = 16, 6, 32  # size filter: skip h < 16 or w < 6 or (h < 32 and w < 32)
MAX_MARGIN = 16                 # ... or (h > H - 16 and w > W - 16): the region covers the canvas
SCALE_RANGE = (0.2, 2.0)        # RandomDistance scale range
MIN_PASTED_SIZE = 8             # a pasted copy is at least 8 px high and wide
HEIGHT_JITTER = 16              # h_t: vertical jitter of the pasted copy, px at 384 rows
PASTE_TIMES = (2, 4)            # e1, e2: pastes per region in rounds 1 and 2
MIX = 8                         # M: sources per sample
COLOR_JITTER = (0.5, 0.5, 0.5, 0.2)  # brightness, contrast, saturation, hue (released, both augmentations)
P_JITTER, P_BLUR, P_GRAY = 0.8, 0.2, 0.1
BLUR_KERNEL, BLUR_SIGMA = 5, (0.1, 2.0)
P_FLIP = 0.5
SOFT_MASK_SIGMA = 1.0           # 3x3 Gaussian soft mask for blending
RESIZE_AREA, RESIZE_ASPECT = (1.0, 2.0), (3 / 4, 4 / 3)  # per-canvas random resize
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# Coordinates: normalized (grid_sample, align_corners=False) <-> pixel-edge coordinates
# ----------------------------------------------------------------------------------------------------------
def pixel_affine_to_normalized(a, b, d, e, height, width):
    """Pixel-edge affine map u' = a u + b, v' = d v + e (pixel column i spans [i, i + 1)) as a 3x3 float64 matrix
    on normalized coordinates x = 2 u / W - 1 (pixel centre i + 0.5 -> (2i + 1) / W - 1, grid_sample with
    align_corners=False), same H x W on both sides: x' = a x + (a + 2 b / W - 1), y' = d y + (d + 2 e / H - 1).
    Closed form in Python floats (float64): exact to rounding, no matrix inverse."""
    return np.array([[a, 0.0, a + 2.0 * b / width - 1.0], [0.0, d, d + 2.0 * e / height - 1.0], [0.0, 0.0, 1.0]])


def paste_matrix(box_top, box_left, scale_y, scale_x, new_h, new_w, top, left, flip, height, width):
    """The slot's matrix: normalized source coords -> normalized canvas coords (float64 3x3 array).

    The crop [box_top, box_top + h) x [box_left, box_left + w) is resized to new_h x new_w (scale_x = new_w / w,
    scale_y = new_h / h: the scales actually applied), optionally mirrored, and its top-left corner placed at
    canvas pixel (top, left) (unclamped). In pixel-edge coordinates: u' = left + scale_x (u - box_left), or
    left + new_w - scale_x (u - box_left) when flipped; v' = top + scale_y (v - box_top).
    """
    sx = -scale_x if flip else scale_x
    tx = left + (new_w if flip else 0) - sx * box_left
    return pixel_affine_to_normalized(sx, tx, scale_y, top - scale_y * box_top, height, width)


def nearest_indices(size, new_size):
    """Source index of each output pixel of a nearest resize, pixel centres aligned: floor((j + 0.5) size /
    new_size) in float64, the mapping of the recorded matrix (torch's nearest-exact, without its float32 ties)."""
    return torch.from_numpy(np.minimum(((np.arange(new_size) + 0.5) * size / new_size).astype(np.int64), size - 1))


def uniform(low, high, generator):
    """One float drawn uniformly in [low, high) from a torch.Generator."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def photometric_augmentation():
    """The released photometric change of a pasted copy and of a training canvas (float (3, h, w) in [0, 1]):
    color jitter (0.5, 0.5, 0.5, 0.2) p 0.8, Gaussian blur (k 5, sigma in [0.1, 2]) p 0.2, grayscale p 0.1.
    Its draws come from torch's global RNG: callers seed it per sample inside torch.random.fork_rng."""
    return v2.Compose([v2.RandomApply([v2.ColorJitter(*COLOR_JITTER)], p=P_JITTER),
                       v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, BLUR_SIGMA)], p=P_BLUR),
                       v2.RandomGrayscale(p=P_GRAY)])


# ----------------------------------------------------------------------------------------------------------
# Regions and sources
# ----------------------------------------------------------------------------------------------------------
def resize_source(image, disparity, regions, size=None):
    """Bring one source to a common size: image float (3, H, W) in [0, 1], disparity float32, regions int64.

    image: uint8 (3, H, W) tensor or (H, W, 3) array (or float in [0, 1]); disparity (h, w); regions (h, w).
    size: (H, W) to resize the image to (antialiased bilinear), default the image's own size. Disparity
    (bilinear) and regions (nearest) are resized to the image's size when they differ; region ids are then made
    contiguous 0..R-1 (ids that vanished are dropped).
    """
    image = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image)
    if image.ndim == 3 and image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize(image, list(size), antialias=True).clamp(0, 1)
    H, W = image.shape[-2:]
    disparity = torch.as_tensor(np.asarray(disparity, dtype=np.float32) if not torch.is_tensor(disparity)
                                else disparity).float()
    if tuple(disparity.shape) != (H, W):
        disparity = F.interpolate(disparity[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    regions = torch.as_tensor(np.asarray(regions) if not torch.is_tensor(regions) else regions).long()
    if tuple(regions.shape) != (H, W):
        regions = F.interpolate(regions[None, None].double(), size=(H, W), mode="nearest-exact")[0, 0].long()
    if regions.min() >= 0 and regions.max() < 1 << 24:  # contiguous ids in O(n): a lookup table of present ids
        present = torch.bincount(regions.flatten()) > 0
        regions = (torch.cumsum(present, 0) - 1)[regions]
    else:
        regions = torch.unique(regions, return_inverse=True)[1].reshape(H, W)
    return image, disparity, regions


def region_boxes(regions, num_regions):
    """Bounding boxes (top, left, h, w) of ids 0..R-1 of an int map (scipy.ndimage.find_objects)."""
    slices = scipy.ndimage.find_objects(regions.numpy().astype(np.int32) + 1, max_label=num_regions)
    return [(s[0].start, s[1].start, s[0].stop - s[0].start, s[1].stop - s[1].start) for s in slices]


def passes_size_filter(h, w, height, width):
    """Released size filter (scaled by H / 384): skip thin, small, or canvas-covering regions."""
    k = height / REFERENCE_ROWS
    if h < MIN_H * k or w < MIN_W * k or (h < MIN_BOTH * k and w < MIN_BOTH * k):
        return False
    return not (h > height - MAX_MARGIN * k and w > width - MAX_MARGIN * k)


def depth_aware_scale_range(top, h, w, height, width):
    """(s_min, s_max) of RandomDistance: s_max = min(2, 2H/h, 2W/w) tightened so the copy, scaled about the
    horizon row c = H // 2, stays on its side of the image; s_min = max(0.2, 8/h, 8/w)."""
    c = height // 2
    min_size = MIN_PASTED_SIZE * height / REFERENCE_ROWS
    s_max = min(SCALE_RANGE[1], 2 * height / h, 2 * width / w)
    bottom = top + h - 1
    if bottom < c:  # fully above the horizon: the bottom row stays >= 0
        s_max = min(s_max, c / (c - bottom))
    elif top > c:  # fully below: the top row stays <= H - 1
        s_max = min(s_max, (height - c - 1) / (top - c))
    s_min = max(SCALE_RANGE[0], min_size / h, min_size / w)
    return s_min, s_max


# ----------------------------------------------------------------------------------------------------------
# One paste, one sample (Sec 3.3)
# ----------------------------------------------------------------------------------------------------------
def paste_region(canvas, canvas_labels, region, label, generator, jitter_px, augment=None):
    """One copy of a region pasted onto a canvas, in place: the seven steps of Sec 3.3 (PAPER_NOTES stage 3).

    canvas float (4, H, W): RGB in [0, 1], then disparity (larger = nearer); canvas_labels int (H, W); region:
    (box, crop, mask, max_disparity) with box = (top, left, h, w) the region's bounding box in its source, crop
    float (4, h, w) the source's RGB and disparity there, mask bool (h, w) the region in it, max_disparity the
    crop's maximum; label: r * T + s; generator: the geometric draws; jitter_px: h_t in pixels; augment: the
    photometric change (`photometric_augmentation()`) or None. Returns the slot's matrix (float64 (3, 3):
    normalized source coords -> canvas coords), or None when the size filter skips the region.
    """
    H, W = canvas_labels.shape
    (top, left, h, w), crop, mask, max_disparity = region
    # step 1: size filter
    if not passes_size_filter(h, w, H, W):
        return None
    # step 2: depth-aware scale s ("RandomDistance"): 1/s uniform in [1/s_max, 1/s_min] (uniform in depth)
    s_min, s_max = depth_aware_scale_range(top, h, w, H, W)
    s = 1.0 if s_max <= s_min else 1.0 / uniform(1.0 / s_max, 1.0 / s_min, generator)
    new_h, new_w = max(1, round(h * s)), max(1, round(w * s))
    # step 3: horizontal flip p 0.5 (the photometric change follows DepthMix: on the pixels it lets show)
    flip = uniform(0.0, 1.0, generator) < P_FLIP
    # step 4: placement: left uniform in [-w' + 1, W - 1]; the top row moved along the viewing ray about the
    # horizon row c, + a jitter uniform in [-h_t, h_t]
    c = H // 2
    new_left = int(torch.randint(-new_w + 1, W, (), generator=generator))
    new_top = round((top - c) * new_h / h + c) + int(torch.randint(-jitter_px, jitter_px + 1, (), generator=generator))
    matrix = paste_matrix(top, left, new_h / h, new_w / w, new_h, new_w, new_top, new_left, flip, H, W)  # step 7
    # step 5: DepthMix: paste where the region is and the copy is nearer than the canvas (earlier pastes included)
    y0, x0, y1, x1 = max(new_top, 0), max(new_left, 0), min(new_top + new_h, H), min(new_left + new_w, W)
    if y1 <= y0 or x1 <= x0 or max_disparity * new_h / h <= float(canvas[3, y0:y1, x0:x1].min()):
        return matrix  # off the canvas, or behind it everywhere
    cols = nearest_indices(w, new_w).flip(0) if flip else nearest_indices(w, new_w)
    rows, cols = nearest_indices(h, new_h)[y0 - new_top:y1 - new_top], cols[x0 - new_left:x1 - new_left]
    disp = crop[3].index_select(0, rows).index_select(1, cols) * (new_h / h)
    hard = mask.index_select(0, rows).index_select(1, cols) & (disp > canvas[3, y0:y1, x0:x1])
    if not hard.any():
        return matrix
    # what changes: the hard mask's bounding box + 2 px (the soft mask reaches 1 px beyond the hard mask)
    ys, xs = hard.any(1).nonzero()[:, 0], hard.any(0).nonzero()[:, 0]
    by, bx = max(int(ys[0]) - 2, 0), max(int(xs[0]) - 2, 0)
    hard, disp = hard[by:int(ys[-1]) + 3, bx:int(xs[-1]) + 3], disp[by:int(ys[-1]) + 3, bx:int(xs[-1]) + 3]
    y0, x0 = y0 + by, x0 + bx
    y1, x1 = y0 + hard.shape[0], x0 + hard.shape[1]
    # steps 2 and 3 for the color, on those pixels: resize (bilinear, antialiased), flip, photometric change
    color = F.interpolate(crop[None, :3], size=(new_h, new_w), mode="bilinear", antialias=s < 1)[0]
    color = (color.flip(2) if flip else color)[:, y0 - new_top:y1 - new_top, x0 - new_left:x1 - new_left]
    if augment is not None and min(hard.shape) > BLUR_KERNEL // 2:  # torchvision's blur reflects 2 px
        color = augment(color)
    # step 6: blend color and disparity with the soft mask (3x3 Gaussian blur, sigma 1); labels on the hard mask
    alpha = hard[None].float()
    if min(hard.shape) > 1:  # (torchvision's blur reflects 1 px)
        alpha = TF.gaussian_blur(alpha, 3, SOFT_MASK_SIGMA)
    canvas[:3, y0:y1, x0:x1].add_(alpha * (color - canvas[:3, y0:y1, x0:x1]))
    canvas[3, y0:y1, x0:x1].add_(alpha[0] * (disp - canvas[3, y0:y1, x0:x1]))
    canvas_labels[y0:y1, x0:x1].masked_fill_(hard, label)
    # step 7: the slot's matrix, from the scales actually applied and the unclamped placement
    return matrix


def build_sample(images, disparities, regions, stems, paste_times=PASTE_TIMES, generator=None, photometric=True,
                 height_jitter=HEIGHT_JITTER, size=None):
    """One cross-context sample of 2M canvases from M sources, every pasted copy's transform recorded.

    images: M images, uint8 (3, H, W) tensors or (H, W, 3) arrays; disparities: M disparity maps (larger =
    nearer); regions: M int region maps (resized nearest to the image, ids made contiguous, then global over the
    sources); stems: M names. paste_times (e1, e2); (0, 0) is the paper's M = 0 ablation (each canvas is its
    source). generator: torch.Generator of the geometric draws; its first draw seeds the photometric ones (torch's
    global RNG inside fork_rng: the caller's is untouched). photometric=False: no color change (same geometry).
    height_jitter: h_t in px at 384 rows. size: (H, W) of the canvases (default: the first image's size).

    Canvas j and M + j start as source j (slots 0 and 1). Round i: all regions repeated e_i times, shuffled, dealt
    to the round's M canvases in turn, each paste (`paste_region`) taking the region's next slot. Returns the
    sample dict (module docstring)."""
    if generator is None:
        raise ValueError("build_sample needs a torch.Generator (all randomness comes from it)")
    M = len(images)
    if not (M == len(disparities) == len(regions) == len(stems)) or M == 0:
        raise ValueError(f"build_sample: need M >= 1 equal-length lists, got {len(images)} images, "
                         f"{len(disparities)} disparities, {len(regions)} region maps, {len(stems)} stems")
    e1, e2 = (int(e) for e in paste_times)
    T = 2 + e1 + e2
    sources = [resize_source(images[0], disparities[0], regions[0], size)]
    H, W = sources[0][0].shape[-2:]
    sources += [resize_source(*x, (H, W)) for x in zip(images[1:], disparities[1:], regions[1:])]
    counts = [int(reg.max()) + 1 for _, _, reg in sources]
    offsets = np.cumsum([0] + counts)  # source j's regions are r = offsets[j] .. offsets[j + 1] - 1
    R, source_of = int(offsets[-1]), np.repeat(np.arange(M), counts)
    # the 2M canvases, color and disparity stacked: canvas j and M + j both start as source j
    stacked = [torch.cat([img, d[None]]) for img, d, _ in sources]             # M x (4, H, W)
    canvas = torch.stack(stacked * 2)                                         # (2M, 4, H, W)
    global_ids = torch.stack([reg + int(offsets[j]) for j, (_, _, reg) in enumerate(sources)])  # (M, H, W)
    canvas_labels = torch.cat([global_ids * T, global_ids * T + 1]).to(torch.int32)          # (2M, H, W)
    transforms = np.tile(np.eye(3), (R, T, 1, 1))                             # (R, T, 3, 3) float64
    canvas_of = np.full((R, T), -1, dtype=np.int64)
    canvas_of[:, 0], canvas_of[:, 1] = source_of, source_of + M
    # each region's bounding box, its crop (color and disparity) there, its mask in it, the crop's max disparity
    boxes = [b for j, (_, _, reg) in enumerate(sources) for b in region_boxes(reg, counts[j])]
    crops = [stacked[j][:, t:t + h, l:l + w] for j, (t, l, h, w) in zip(source_of, boxes)]
    paste_sources = [(box, crop, sources[j][2][t:t + h, l:l + w] == r - int(offsets[j]), float(crop[3].max()))
                     for r, (j, box, crop) in enumerate(zip(source_of, boxes, crops)) for t, l, h, w in [box]]
    jitter_px = round(height_jitter * H / REFERENCE_ROWS)
    augment = photometric_augmentation() if photometric else None
    next_slot = [2] * R
    photometric_seed = int(torch.randint(2 ** 62, (), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.inference_mode():  # inference mode: less overhead per small op
        torch.manual_seed(photometric_seed)
        for round_index, e in enumerate((e1, e2)):
            items = torch.arange(R).repeat(e)[torch.randperm(R * e, generator=generator)].tolist()
            for k, r in enumerate(items):
                target, slot, next_slot[r] = round_index * M + k % M, next_slot[r], next_slot[r] + 1
                matrix = paste_region(canvas[target], canvas_labels[target], paste_sources[r], r * T + slot,
                                      generator, jitter_px, augment)
                if matrix is not None:
                    transforms[r, slot], canvas_of[r, slot] = matrix, target
    return {"images": (canvas[:, :3] * 255.0).round_().clamp_(0, 255).to(torch.uint8), "labels": canvas_labels,
            "transforms": torch.from_numpy(transforms).float(), "canvas_of": torch.from_numpy(canvas_of),
            "slots": T, "sources": list(stems)}


def sample_seed(seed, epoch, index):
    """The seed of sample `index` of `epoch`: the same sample on disk, on the fly, in any worker."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)[0]
               % (2 ** 63))


def sample_sources(num_images, mix, index):
    """Indices of sample `index`'s M sources (released: the sorted list split into M strided blocks)."""
    n = num_images // mix
    return [index + i * n for i in range(mix)]


# ----------------------------------------------------------------------------------------------------------
# Per-canvas training augmentation (Sec 3.4; applied by swav_dense.py when it reads a sample)
# ----------------------------------------------------------------------------------------------------------
def augment_canvas(image, generator, photometric=True):
    """Per-canvas training augmentation with its exact matrix G (Sec 3.4; released `train_trans`).

    Random resize (area x [1, 2], aspect in [3/4, 4/3], never smaller than H x W, bilinear), random crop back to
    H x W, horizontal flip p 0.5, photometric change (`photometric_augmentation`), ImageNet normalization.
    image: uint8 (3, H, W) (or float in [0, 1]); generator: torch.Generator of the draws (the photometric ones
    from torch's global RNG seeded by its first draw, inside fork_rng). Returns (float32 (3, H, W) normalized,
    G float32 (3, 3)): G maps normalized coords of the canvas to those of the augmented canvas (column vectors
    [x, y, 1]): the pixel at g in the output came from G^-1 g in the input. Labels are not augmented.
    """
    _, H, W = image.shape
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    photometric_seed = int(torch.randint(2 ** 62, (), generator=generator))  # drawn either way: same geometry
    # random resize: area factor, aspect ratio (log-uniform), never smaller than H x W
    area = uniform(*RESIZE_AREA, generator)
    aspect = math.exp(uniform(math.log(RESIZE_ASPECT[0]), math.log(RESIZE_ASPECT[1]), generator))
    new_h, new_w = max(H, round(H * math.sqrt(area / aspect))), max(W, round(W * math.sqrt(area * aspect)))
    if (new_h, new_w) != (H, W):
        x = TF.resize(x, [new_h, new_w], antialias=True)
    # random crop back to H x W, flip
    top = int(torch.randint(new_h - H + 1, (), generator=generator))
    left = int(torch.randint(new_w - W + 1, (), generator=generator))
    x = x[:, top:top + H, left:left + W]
    flip = uniform(0.0, 1.0, generator) < P_FLIP
    if flip:
        x = x.flip(-1)
    if photometric:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(photometric_seed)
            x = photometric_augmentation()(x)
    x = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    # pixel-edge algebra: u1 = u * new_w / W, then u2 = u1 - left, then (flip) u3 = W - u2
    sx, sy = new_w / W, new_h / H
    a, b = (-sx, W + left) if flip else (sx, -left)
    G = pixel_affine_to_normalized(a, b, sy, -top, H, W)
    return x.contiguous(), torch.from_numpy(G).float()


# ----------------------------------------------------------------------------------------------------------
# Input / output
# ----------------------------------------------------------------------------------------------------------
def load_source(image_path, disp_path, regions_path, size):
    """Read one source and bring it to `size` (RGB antialiased, disparity bilinear, regions nearest)."""
    for path, what in ((disp_path, "disparity: run `python depth.py predict --work WORK ...` first"),
                       (regions_path, "regions: run `python group.py --work WORK ...` first")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing {path} ({what})")
    try:
        with Image.open(image_path) as im:
            im = im.convert("RGB")
            aspect = im.height / im.width
            if (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)  # PIL's bilinear is antialiased when shrinking
            image = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    except OSError as e:
        raise BadInput(f"{image_path}: cannot read this image ({e})") from None
    disparity = load_npy(disp_path, "python depth.py predict --work WORK ...")  # readable, float (H, W), finite
    regions = load_npy(regions_path, "python group.py --work WORK ...", kind="iu")  # any integer ids: made contiguous
    for array, path in ((disparity, disp_path), (regions, regions_path)):
        if array.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D map, got shape {array.shape}")
        if abs(array.shape[0] / array.shape[1] / aspect - 1) > 0.02:
            raise ValueError(f"{path}: shape {array.shape} does not have the aspect ratio of {image_path} "
                             f"(H/W {aspect:.3f}); wrong file?")
    if disparity.min() < 0 or disparity.max() <= 0:  # DepthMix compares disparities (0: infinitely far)
        raise BadInput(f"{disp_path}: negative or no positive disparity; remake it with `python depth.py predict`")
    return resize_source(image, disparity, regions, size)


class CopyPasteDataset(torch.utils.data.Dataset):
    """Cross-context samples built on the fly (the same code and seeds as the saved samples).

    paths: sorted image paths (`depth.frames_of`); disp_dir / regions_dir hold <stem>.npy (`depth.image_stem`);
    len = N // mix samples per epoch, sample k uses images k + i * (N // mix); call set_epoch(e) for new
    composites each epoch.
    Items are `build_sample` dicts.
    """

    def __init__(self, paths, disp_dir, regions_dir, mix=MIX, paste_times=PASTE_TIMES, size=(384, 768),
                 photometric=True, height_jitter=HEIGHT_JITTER, seed=0):
        if mix < 1 or len(paths) < mix:
            raise ValueError(f"--mix {mix}: need mix >= 1 and at least {mix} images, found {len(paths)}")
        self.paths = list(paths)
        self.stems = [depth.image_stem(p) for p in self.paths]
        self.disp_dir, self.regions_dir = disp_dir, regions_dir
        self.mix, self.paste_times, self.size = mix, tuple(paste_times), tuple(size)
        self.photometric, self.height_jitter, self.seed = photometric, height_jitter, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.paths) // self.mix

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        idx = sample_sources(len(self.paths), self.mix, index)
        loaded = [load_source(self.paths[i], os.path.join(self.disp_dir, f"{self.stems[i]}.npy"),
                              os.path.join(self.regions_dir, f"{self.stems[i]}.npy"), self.size) for i in idx]
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        return build_sample(*zip(*loaded), [self.stems[i] for i in idx], paste_times=self.paste_times, generator=g,
                            photometric=self.photometric, height_jitter=self.height_jitter, size=self.size)


def region_colors(num):
    """A fixed, distinct-ish color per region id (golden-ratio hues)."""
    import colorsys
    return torch.tensor([colorsys.hsv_to_rgb((0.618034 * r) % 1.0, 0.9, 1.0) for r in range(num)]) * 255


def preview_grid(sample):
    """uint8 (2H, M W, 3): round 1 canvases on top, round 2 below; every pasted region's copies outlined in one
    color (the paper's Fig 1b)."""
    images, labels, T = sample["images"].clone(), sample["labels"].long(), sample["slots"]
    R = sample["canvas_of"].shape[0]
    pasted = (sample["canvas_of"][:, 2:] >= 0).any(1) if T > 2 else torch.zeros(R, dtype=torch.bool)
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    edge[:, :, :-1] |= labels[:, :, 1:] != labels[:, :, :-1]
    region = labels // T
    edge &= pasted[region]
    colors = region_colors(R).to(torch.uint8)[region]  # (2M, H, W, 3)
    out = images.permute(0, 2, 3, 1).clone()
    out[edge] = colors[edge]
    M2, H, W, _ = out.shape
    return out.reshape(2, M2 // 2, H, W, 3).permute(0, 2, 1, 3, 4).reshape(2 * H, M2 // 2 * W, 3).numpy()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def run(args):
    frames = depth.frames_of(args)  # unique stems across cities and KITTI drives name WORK/disp and WORK/regions
    paths, stems = [f.path for f in frames], [f.stem for f in frames]
    disp_dir = args.disp_dir or os.path.join(args.work, "disp")
    regions_dir = args.regions_dir or os.path.join(args.work, "regions")
    for d, cmd in ((disp_dir, "python depth.py predict --work WORK ..."),
                   (regions_dir, "python group.py --work WORK ...")):
        missing = [os.path.join(d, f"{s}.npy") for s in stems if not os.path.exists(os.path.join(d, f"{s}.npy"))]
        if missing:  # fail early, naming the command that makes them
            raise FileNotFoundError(f"missing {missing[0]} and {len(missing) - 1} more: run `{cmd}` first")
    dataset = CopyPasteDataset(paths, disp_dir, regions_dir, mix=args.mix, paste_times=args.paste_times,
                               size=args.size, photometric=not args.no_photometric,
                               height_jitter=args.height_jitter, seed=args.seed)
    # ===== settings: finished samples are skipped, so they must have been made with the same ones =====
    out = os.path.join(args.work, "samples")
    defining = ("mix", "paste_times", "size", "no_photometric", "height_jitter", "seed")  # not --shard: all write it
    record_settings(out, {**{k: vars(args)[k] for k in defining}, "num_images": len(paths)}, args.overwrite,
                    "epoch_*/*.pt")
    if args.overwrite:
        remove_samples(out, len(dataset), args.shard)
    mine = depth.shard_of(range(len(dataset)), args.shard)  # --shard i/n, or torchrun's RANK / WORLD_SIZE
    print(f"[copypaste] {len(paths)} images, M {args.mix}, T {2 + sum(args.paste_times)}, {len(dataset)} samples/epoch "
          f"({len(mine)} in this shard) x {args.epochs} epochs at {args.size[0]}x{args.size[1]} -> {out}", flush=True)
    # ===== samples: built by DataLoader workers, written here =====
    start, made = time.time(), 0
    bar = tqdm(total=args.epochs * len(mine), desc="copypaste", dynamic_ncols=True, disable=args.no_progress)
    for epoch in range(args.epochs):
        folder = os.path.join(out, f"epoch_{epoch:03d}")
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        todo = [k for k in mine if not os.path.exists(os.path.join(folder, f"{k:06d}.pt"))]
        bar.update(len(mine) - len(todo))
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=None,
                                             num_workers=args.workers if todo else 0)
        for k, sample in zip(todo, loader):
            atomic_write(os.path.join(folder, f"{k:06d}.pt"), lambda f: torch.save(sample, f))
            made += 1
            bar.update()
    bar.close()
    elapsed = time.time() - start
    print(f"[copypaste] wrote {made} samples, skipped {args.epochs * len(mine) - made} finished, {elapsed:.1f} s"
          + (f" ({made / elapsed:.2f} samples/s)" if made and elapsed > 0 else ""), flush=True)
    # ===== previews (the first shard's) =====
    dataset.set_epoch(0)
    for k in range(min(args.preview, len(dataset)) if 0 in mine else 0):
        os.makedirs(os.path.join(out, "preview"), exist_ok=True)
        path = os.path.join(out, "epoch_000", f"{k:06d}.pt")
        grid = preview_grid(torch.load(path, weights_only=True) if os.path.exists(path) else dataset[k])
        atomic_write(os.path.join(out, "preview", f"{k:06d}.png"),
                     lambda f: Image.fromarray(grid).save(f, format="PNG"))
    if args.preview and 0 in mine:
        print(f"[copypaste] previews in {os.path.join(out, 'preview')}", flush=True)


def remove_samples(out, count, shard):
    """Delete this shard's samples OUT/epoch_*/NNNNNN.pt of every epoch (other shards may be writing theirs)."""
    found = {path: int(os.path.basename(path)[:-3]) for path in glob.glob(os.path.join(out, "epoch_*", "*.pt"))
             if re.fullmatch(r"\d+\.pt", os.path.basename(path))}
    owned = set(depth.shard_of(range(max([count, *found.values()]) + 1), shard))
    for path, k in found.items():
        if k in owned:
            os.remove(path)


def get_args_parser():
    p = argparse.ArgumentParser(description="Stage 3: cross-context copy-paste samples (Sec 3.3).")
    p.add_argument("--work", required=True, help="work folder shared by all stages: reads WORK/disp and "
                   "WORK/regions, writes WORK/samples")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset root (with --dataset, --split, --sequence)")
    src.add_argument("--images", help="glob of images instead of --data/--split (stem = file name, or KITTI raw's)")
    p.add_argument("--split", default="train", help="split of --data (default train)")
    depth.add_frame_args(p)
    p.add_argument("--disp-dir", help="folder of <stem>.npy disparity (default WORK/disp, from depth.py predict)")
    p.add_argument("--regions-dir", help="folder of <stem>.npy region maps (default WORK/regions, from group.py)")
    p.add_argument("--mix", type=positive_int, default=MIX,
                   help="M: source images per sample (paper 8; Table 4 M 2, 4, 8)")
    p.add_argument("--paste-times", type=nonnegative_int, nargs=2, default=list(PASTE_TIMES), metavar=("E1", "E2"),
                   help="e1 e2: pastes of every region in rounds 1 and 2 (released 2 4); 0 0 = the paper's "
                        "M = 0 row (no copy-paste); slots per region T = 2 + e1 + e2")
    p.add_argument("--epochs", type=nonnegative_int, default=1, help="epochs of samples to write (new composites "
                   "each); 0 = none (previews only: swav_dense.py --on-the-fly builds the same samples)")
    p.add_argument("--size", type=positive_int, nargs=2, default=[384, 768], metavar=("H", "W"),
                   help="canvas size (paper: Cityscapes 384 768, KITTI 384 1280)")
    p.add_argument("--no-photometric", action="store_true",
                   help="no color jitter / blur / grayscale on pasted regions (checking, ablations)")
    p.add_argument("--height-jitter", type=ranged(float, 0), default=HEIGHT_JITTER,
                   help="h_t: vertical jitter of a pasted copy, px at 384 rows (scaled with H; paper 16)")
    p.add_argument("--preview", type=nonnegative_int, default=0,
                   help="write N preview PNGs (canvases, copies outlined)")
    p.add_argument("--workers", type=nonnegative_int, default=0,
                   help="DataLoader worker processes building samples (one thread each); 0 = in the main process")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of every random draw of the run; sample k of epoch e is the same for any --workers")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (the log lines stay)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the samples in WORK/samples and rebuild (needed to change the settings there)")
    depth.add_shard_arg(p)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    print("[copypaste] " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())) + " device=cpu", flush=True)
    return run_main(run, args, "copypaste.py")


if __name__ == "__main__":
    main()
