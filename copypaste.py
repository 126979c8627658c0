"""Stage 3: cross-context samples: copy-paste coherent depth regions into other scenes, every transform recorded.

Paper: Zeng et al., BMVC 2022, Sec 3.3 (copy-paste with depth-aware scaling and DepthMix occlusion) and the
per-canvas training augmentation of Sec 3.4. Pipeline: group.py (regions) + depth.py (disparity) -> this ->
swav_dense.py (which imports `CopyPasteDataset` / `augment_canvas`, or reads the saved samples).

Reads / writes
| file                                      | shape / dtype            | meaning                                      |
|-------------------------------------------|--------------------------|----------------------------------------------|
| images (`--data/--split` or `--images`)   | PNG/JPG                  | the source scenes                            |
| WORK/disp/<stem>.npy (`depth.py predict`) | float32 (h, w)           | disparity, larger = nearer, any scale        |
| WORK/regions/<stem>.npy (`group.py`)      | int (h, w)               | region ids (any resolution, any ids)         |
| WORK/samples/epoch_EEE/NNNNNN.pt (writes) | dict, see `build_sample` | one cross-context sample of 2M canvases      |
| WORK/samples/args.json (writes)           | JSON                     | the arguments (M, T, size) of the samples    |
| WORK/samples/preview/NNNNNN.png (writes)  | RGB PNG                  | the 2M canvases, copies outlined (Fig 1b)    |

A sample (`torch.save` of a plain dict, loadable with `torch.load(weights_only=True)`):
    images     uint8 (2M, 3, H, W)  the composite canvases (before the per-canvas training augmentation)
    labels     int32 (2M, H, W)     r * T + s: region r (global over the M sources), slot s
    transforms float32 (R, T, 3, 3) slot s of region r: normalised coords of r's source -> canvas canvas_of[r, s]
    canvas_of  int64 (R, T)         canvas of slot s of region r; -1 where the slot was not used
    slots      int T = 2 + e1 + e2;  sources: list of the M stems
Normalised coordinates follow grid_sample(align_corners=False): column i has x = (2i + 1) / W - 1.

Commands
    python copypaste.py --work runs/cs --data CITYSCAPES --split train --epochs 0 --preview 8   # paper scale: a
        # saved 384 x 768, M 8 sample is ~33 MB, so swav_dense.py --on-the-fly builds them (same code and seeds)
    python copypaste.py --work runs/toy --data data/toycity --split train --size 192 384 --mix 4 --epochs 10 \
        --workers 2 --preview 2                                                                 # toy, ~1 minute

Sample k of epoch e is seeded from (--seed, e, k): the same sample on disk, on the fly, with any --workers.

Choices and deviations (stated plainly)
- Regions: every id of every source is one region; a source's ids are relabelled contiguously (ids absent after
  resizing are dropped) and made global over the M sources (source j's regions follow source j-1's).
  A source whose map has a single region is kept: that one region is the whole image; its slots 0 and 1 are its
  two canvases and the size filter (it covers the canvas) leaves all its pasted slots unused (-1).
- Size mismatch: a region map (or disparity) whose size differs from its image is resized to the image's size
  (regions nearest, disparity bilinear), as every stage's reader does; if its aspect ratio differs from the
  image's by more than 2 % it is the wrong file and loading stops with an error naming both files.
- Pixel constants of the paper (size filter 16/6/32 px, minimum pasted size 8 px, height jitter h_t 16 px) are
  defined at 384 rows and scaled by H / 384, so the toy sizes behave like the paper's; at 384 rows they are the
  paper's values.
- Disparity of a pasted copy is multiplied by the vertical scale actually applied (round(h s) / h), the same
  scale the recorded matrix uses; the new top row is round((top - c) s' + c) + jitter with c = H // 2.
- The soft mask is the 3x3 Gaussian (sigma 1) blur of the hard (DepthMix) mask inside the pasted box (edge
  replicated, like the released reflection padding). The released code leaves skipped slots pointing at a
  canvas with an identity matrix; here they are marked -1. The released code clamps the top row after
  recording the matrix; here the copy is pasted at the recorded (unclamped) position and clipped to the
  canvas, so the matrix is exact.
- Per-canvas augmentation strengths follow the released code: colour jitter (0.5, 0.5, 0.5, 0.2); the aspect
  ratio of its random resize is drawn log-uniformly (as torchvision's RandomResizedCrop does).
- Speed (goal: one paper-size sample in 1 s on one core; the released code takes 5.6 s; bench.py): a copy's
  colour is resized and photometrically augmented only when DepthMix leaves some of it visible, and only on
  the box it changes (+2 px context for the blur); so contrast's mean grey is taken over that box, not the
  whole bounding box (the released code's box is no more principled: it includes background pixels).
  Disparity is resized bilinearly without antialiasing (it is only compared and blended). Hue shift and blur
  are re-implementations with torchvision's results (tested), several times faster on CPU.
"""
import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

import depth

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

# number of uniform draws per paste / per canvas augmentation (drawn in one call, then consumed by column)
_PASTE_DRAWS = 16
_CANVAS_DRAWS = 17


# ----------------------------------------------------------------------------------------------------------
# Coordinates: normalised (grid_sample, align_corners=False) <-> pixel-edge coordinates
# ----------------------------------------------------------------------------------------------------------
def pixel_affine_to_normalised(a, b, d, e, height, width):
    """Pixel-edge affine map u' = a u + b, v' = d v + e (pixel column i spans [i, i + 1)) as a 3x3 float64 matrix
    on normalised coordinates x = 2 u / W - 1 (pixel centre i + 0.5 -> (2i + 1) / W - 1, grid_sample with
    align_corners=False), same H x W on both sides: x' = a x + (a + 2 b / W - 1), y' = d y + (d + 2 e / H - 1).
    Closed form in Python floats (float64): exact to rounding, no matrix inverse."""
    return np.array([[a, 0.0, a + 2.0 * b / width - 1.0], [0.0, d, d + 2.0 * e / height - 1.0], [0.0, 0.0, 1.0]])


def paste_matrix(box_top, box_left, scale_y, scale_x, new_h, new_w, top, left, flip, height, width):
    """The slot's matrix: normalised source coords -> normalised canvas coords (float64 3x3 array).

    The crop [box_top, box_top + h) x [box_left, box_left + w) is resized to new_h x new_w (scale_x = new_w / w,
    scale_y = new_h / h: the scales actually applied), optionally mirrored, and its top-left corner placed at
    canvas pixel (top, left) (unclamped). In pixel-edge coordinates: u' = left + scale_x (u - box_left), or
    left + new_w - scale_x (u - box_left) when flipped; v' = top + scale_y (v - box_top).
    """
    sx = -scale_x if flip else scale_x
    tx = left + (new_w if flip else 0) - sx * box_left
    return pixel_affine_to_normalised(sx, tx, scale_y, top - scale_y * box_top, height, width)


# ----------------------------------------------------------------------------------------------------------
# Photometric augmentation (per pasted region, and per canvas at training time)
# ----------------------------------------------------------------------------------------------------------
def adjust_hue(image, hue_factor):
    """torchvision's adjust_hue (RGB -> HSV, shift H, -> RGB) in a few cheap tensor operations, same result.

    With V = max, C = max - min and torchvision's hue in sextants h6 (from the first maximal channel, in the
    order r, g, b), HSV -> RGB is channel_n = V - C clamp(min(k, 4 - k), 0, 1), k = (n + h6 + 6 hue_factor)
    mod 6, n = 5, 3, 1 for R, G, B. image: float (3, h, w) in [0, 1]; hue_factor in [-0.5, 0.5].
    """
    r, g, b = image.unbind(0)
    maxc = image.amax(0)
    chroma = maxc - image.amin(0)
    inv = 1.0 / chroma.clamp(min=1e-12)
    h6 = torch.where(r == maxc, (g - b).mul_(inv),
                     torch.where(g == maxc, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)))
    k = h6.add_(6.0 * hue_factor)[None] + torch.tensor([5.0, 3.0, 1.0], dtype=image.dtype).view(3, 1, 1)
    k.sub_(torch.floor(k / 6.0).mul_(6.0))  # mod 6
    return maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def gaussian_blur(image, kernel_size, sigma):
    """torchvision's gaussian_blur (same kernel, reflection padding) as two 1-D passes of shifted sums (several
    times faster on CPU than its 2-D depthwise convolution). image: float (C, h, w), h and w > kernel_size // 2.
    """
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float64)
    k = torch.softmax(-(x / sigma) ** 2, dim=0).tolist()  # torchvision's _get_gaussian_kernel1d
    pad = kernel_size // 2
    h, w = image.shape[-2:]
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")[0]
    rows = padded[:, 0:h] * k[0]
    for i in range(1, kernel_size):
        rows.add_(padded[:, i:i + h], alpha=k[i])
    out = rows[:, :, 0:w] * k[0]
    for i in range(1, kernel_size):
        out.add_(rows[:, :, i:i + w], alpha=k[i])
    return out


def photometric_augment(image, u, jitter=COLOR_JITTER, p_jitter=P_JITTER, p_blur=P_BLUR, p_gray=P_GRAY):
    """Colour jitter (random order) p 0.8, Gaussian blur (k 5, sigma in [0.1, 2]) p 0.2, grayscale p 0.1.

    image: float (3, h, w) in [0, 1]; u: 12 uniforms in [0, 1) (the randomness, drawn by the caller).
    torchvision.transforms.v2.functional does the work (hue and blur through the equivalent, faster
    `adjust_hue` and `gaussian_blur` above); the draws mirror torchvision's ColorJitter. Returns `image` itself
    when nothing applies.
    """
    b, c, s, hue = jitter
    if u[0] < p_jitter:
        order = sorted(range(4), key=lambda k: u[5 + k])  # ColorJitter applies the four in random order
        for k in order:
            if k == 0 and b > 0:
                image = TF.adjust_brightness(image, 1 - b + 2 * b * u[1])
            elif k == 1 and c > 0:
                image = TF.adjust_contrast(image, 1 - c + 2 * c * u[2])
            elif k == 2 and s > 0:
                image = TF.adjust_saturation(image, 1 - s + 2 * s * u[3])
            elif k == 3 and hue > 0:
                image = adjust_hue(image, -hue + 2 * hue * u[4])
    if u[9] < p_blur and min(image.shape[-2:]) > BLUR_KERNEL // 2:
        image = gaussian_blur(image, BLUR_KERNEL, BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[10])
    if u[11] < p_gray:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image


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


def sample_depth_scale(s_min, s_max, u):
    """s with 1/s uniform in [1/s_max, 1/s_min] (uniform in depth); 1 when the range is empty."""
    if s_max <= s_min:
        return 1.0
    return 1.0 / (1.0 / s_max + (1.0 / s_min - 1.0 / s_max) * u)


def soft_mask(mask):
    """3x3 Gaussian (sigma 1) blur of a hard mask (h, w), edge-replicated, separable: the blending weights.

    Replicating the edge keeps the weight 1 inside a copy that the canvas border cuts (as the released
    TF.gaussian_blur's reflection does); the blend never reaches beyond the pasted box.
    """
    # 1-D Gaussian taps (sigma 1, 3 taps, normalised): k0 at +-1, k1 at 0
    k0 = math.exp(-0.5 / SOFT_MASK_SIGMA ** 2) / (1.0 + 2.0 * math.exp(-0.5 / SOFT_MASK_SIGMA ** 2))
    k1 = 1.0 - 2.0 * k0
    m = F.pad(mask[None].float(), (1, 1, 1, 1), mode="replicate")[0]  # (h + 2, w + 2)
    rows = (m[:-2] + m[2:]).mul_(k0).add_(m[1:-1], alpha=k1)       # (h, w + 2)
    return (rows[:, :-2] + rows[:, 2:]).mul_(k0).add_(rows[:, 1:-1], alpha=k1).clamp_(max=1.0)


def paste_depthmix(canvas, canvas_labels, colour, disp, mask, top, left, label, recolour=None):
    """Paste one transformed copy at (top, left) in place, clipped to the canvas (DepthMix, soft blending).

    canvas float (C + 1, H, W): C colour channels then disparity (larger = nearer); canvas_labels int (H, W);
    the copy: colour (C, h, w) (or a function returning it, called only when something is pasted), disp (h, w),
    mask bool (h, w). A pixel is pasted where the mask is set and the copy is nearer (its disparity > the
    canvas's, which includes earlier pastes); colour and disparity are blended with the soft mask, labels set
    on the hard mask. recolour: optional function applied to the copy's colour before blending, on the box that
    is actually pasted only (plus 2 px of context for a blur). Returns the number of pasted (hard-mask) pixels.
    """
    H, W = canvas_labels.shape
    h, w = mask.shape
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    if y1 <= y0 or x1 <= x0:
        return 0
    window = canvas[:, y0:y1, x0:x1]
    py, px = y0 - top, x0 - left  # the window's offset inside the copy
    piece_disp = disp[py:py + y1 - y0, px:px + x1 - x0]
    # DepthMix: only where the copy is nearer than what the canvas shows now
    hard = mask[py:py + y1 - y0, px:px + x1 - x0] & (piece_disp > window[-1])
    n = int(hard.sum())
    if n == 0:
        return 0
    # the box that changes: the hard mask's bounding box + 1 px of soft mask
    rows, cols = hard.any(1).nonzero()[:, 0], hard.any(0).nonzero()[:, 0]
    by0, by1 = max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, y1 - y0)
    bx0, bx1 = max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, x1 - x0)
    alpha = soft_mask(hard)[by0:by1, bx0:bx1]
    window = window[:, by0:by1, bx0:bx1]
    colour = colour() if callable(colour) else colour
    if recolour is None:
        piece_colour = colour[:, py + by0:py + by1, px + bx0:px + bx1]
    else:  # colour changes on the changing box, with 2 px of context for a blur
        cy0, cx0 = max(py + by0 - 2, 0), max(px + bx0 - 2, 0)
        context = recolour(colour[:, cy0:min(py + by1 + 2, h), cx0:min(px + bx1 + 2, w)])
        piece_colour = context[:, py + by0 - cy0:py + by1 - cy0, px + bx0 - cx0:px + bx1 - cx0]
    window[:-1].add_(alpha * (piece_colour - window[:-1]))
    window[-1].add_(alpha * (piece_disp[by0:by1, bx0:bx1] - window[-1]))
    canvas_labels[y0 + by0:y0 + by1, x0 + bx0:x0 + bx1].masked_fill_(hard[by0:by1, bx0:bx1], label)
    return n


def transform_copy(colour, disp, mask, new_h, new_w, flip):
    """Resize a region's crop to new_h x new_w and mirror it: (colour function, disparity, mask).

    Mask nearest (pixel centres aligned, as the recorded matrix), disparity bilinear and multiplied by the
    vertical scale new_h / h (a copy s times larger is s times nearer), colour bilinear antialiased when
    shrinking; the colour is returned as a function, evaluated only when some of the copy is pasted.
    """
    h, w = mask.shape
    resized = (new_h, new_w) != (h, w)
    rows, cols = nearest_indices(h, new_h), nearest_indices(w, new_w)
    if flip:
        cols = cols[::-1].copy()
    mask = mask.index_select(0, torch.from_numpy(rows)).index_select(1, torch.from_numpy(cols))
    if resized:
        disp = F.interpolate(disp[None, None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0, 0]
        disp = disp * (new_h / h)
    disp = disp.flip(-1) if flip else disp

    def colour_copy():
        out = colour
        if resized:
            out = F.interpolate(out[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                                antialias=new_h < h or new_w < w)[0]
        return out.flip(-1) if flip else out
    return colour_copy, disp, mask


def nearest_indices(size, new_size):
    """Source index of each output pixel of a nearest resize, pixel centres aligned: floor((j + 0.5) size /
    new_size), in float64, the same mapping as the recorded matrix (torch's nearest-exact, without its float32
    ties)."""
    return np.minimum(((np.arange(new_size) + 0.5) * size / new_size).astype(np.int64), size - 1)


# ----------------------------------------------------------------------------------------------------------
# One sample (Sec 3.3)
# ----------------------------------------------------------------------------------------------------------
def resize_sources(images, disparities, regions, size=None):
    """resize_source on each of the M sources, all to `size` (default: the first image's size)."""
    sources = []
    for j in range(len(images)):
        sources.append(resize_source(images[j], disparities[j], regions[j], size))
        size = tuple(sources[0][0].shape[-2:])
    return sources


def start_canvases(sources, offsets, slots):
    """Canvas j (round 1) and M + j (round 2) both start as the unmodified source j.

    Returns (stacked: M x (4, H, W) colour and disparity of the sources, canvas float (2M, 4, H, W), canvas_labels
    int32 (2M, H, W) = r * T + s with slot s = 0 on canvas j and 1 on canvas M + j); offsets: first global region
    id of each source; slots: T.
    """
    stacked = [torch.cat([img, d[None]]) for img, d, _ in sources]               # M x (4, H, W)
    canvas = torch.stack(stacked * 2)                                           # (2M, 4, H, W)
    global_ids = torch.stack([reg + int(offsets[j]) for j, (_, _, reg) in enumerate(sources)])  # (M, H, W)
    canvas_labels = torch.cat([global_ids * slots, global_ids * slots + 1]).to(torch.int32)    # (2M, H, W)
    return stacked, canvas, canvas_labels


def region_crop(stacked, regions, top, left, h, w, region_id):
    """A region's box cut from its source (views of stacked (4, H, W)): (colour (3, h, w), disparity (h, w),
    mask (h, w) of the source-local id region_id, max disparity)."""
    crop_disp = stacked[3, top:top + h, left:left + w]
    return (stacked[:3, top:top + h, left:left + w], crop_disp, regions[top:top + h, left:left + w] == region_id,
            float(crop_disp.max()))


def place_copy(top, h, w, u, height, width, jitter_px):
    """Steps 2 and 4 of one paste of a (h, w) box at row top, from its draws u: the depth-aware scale, the flip and
    the placement. Returns (new_h, new_w, flip, paste_top, paste_left)."""
    c = height // 2
    # step 2: depth-aware scale about the horizon row (RandomDistance): 1/s uniform in depth
    s = sample_depth_scale(*depth_aware_scale_range(top, h, w, height, width), u[0])
    new_h, new_w = max(1, int(round(h * s))), max(1, int(round(w * s)))
    sy = new_h / h  # the vertical scale actually applied
    flip = u[1] < P_FLIP
    # step 4: placement: left uniform in [-w' + 1, W - 1]; top moved along the viewing ray, + jitter h_t
    paste_left = -new_w + 1 + min(int(u[14] * (width + new_w - 1)), width + new_w - 2)
    paste_top = int(round((top - c) * sy + c)) + min(int(u[15] * (2 * jitter_px + 1)), 2 * jitter_px) - jitter_px
    return new_h, new_w, flip, paste_top, paste_left


def paste_copy(canvas, canvas_labels, crop, new_h, new_w, flip, paste_top, paste_left, label, recolour=None):
    """Steps 2 (cont.), 3, 5 and 6 of one paste, in place on one canvas (4, H, W) and its labels (H, W): the crop
    (region_crop) resized and flipped, recoloured, DepthMixed and blended; skipped when it cannot change anything."""
    crop_colour, crop_disp, mask, crop_disp_max = crop
    H, W = canvas_labels.shape
    sy = new_h / mask.shape[0]
    # shortcut: a copy off the canvas, or farther everywhere than the nearest canvas pixel under it
    # (bilinear resizing never exceeds the crop's maximum), changes nothing
    y0, x0 = max(paste_top, 0), max(paste_left, 0)
    y1, x1 = min(paste_top + new_h, H), min(paste_left + new_w, W)
    if y1 <= y0 or x1 <= x0 or crop_disp_max * sy <= float(canvas[3, y0:y1, x0:x1].min()):
        return
    # step 2 (cont.) and 3: the transformed copy; its colour is computed only if something is pasted
    colour_copy, disp_copy, mask_copy = transform_copy(crop_colour, crop_disp, mask, new_h, new_w, flip)
    # step 3 (cont.), 5, 6: photometric augmentation, DepthMix, soft-mask blending, labels
    paste_depthmix(canvas, canvas_labels, colour_copy, disp_copy, mask_copy, paste_top, paste_left, label, recolour)


def paste_round(canvas, canvas_labels, transforms, canvas_of, next_slot, crops, boxes, round_index, e, generator,
                jitter_px, photometric=True):
    """Round round_index (0 or 1) in place: all R regions repeated e times, shuffled, dealt to the round's M
    canvases in turn (canvas b gets items b, b + M, ...), each paste taking the region's next slot and recording
    its matrix and canvas. crops: region_crop of each region, None where the size filter rejects it."""
    M, R, T = canvas.shape[0] // 2, len(boxes), transforms.shape[1]
    H, W = canvas_labels.shape[-2:]
    items = np.tile(np.arange(R), e)[torch.randperm(R * e, generator=generator).numpy()]
    draws = torch.rand((len(items), _PASTE_DRAWS), generator=generator, dtype=torch.float64).tolist()
    for b in range(M):
        target = round_index * M + b
        for k in range(b, len(items), M):
            r = int(items[k])
            slot = int(next_slot[r])
            next_slot[r] += 1
            if crops[r] is None:
                continue  # step 1, size filter: the slot stays unused (-1)
            u = draws[k]
            top, left, h, w = boxes[r]
            new_h, new_w, flip, paste_top, paste_left = place_copy(top, h, w, u, H, W, jitter_px)
            # step 7: the slot's exact matrix and canvas
            transforms[r, slot] = paste_matrix(top, left, new_h / h, new_w / w, new_h, new_w, paste_top, paste_left,
                                               flip, H, W)
            canvas_of[r, slot] = target
            recolour = (lambda colour, u=u: photometric_augment(colour, u[2:14])) if photometric else None
            paste_copy(canvas[target], canvas_labels[target], crops[r], new_h, new_w, flip, paste_top, paste_left,
                       r * T + slot, recolour)


def build_sample(images, disparities, regions, stems, paste_times=PASTE_TIMES, generator=None, photometric=True,
                 height_jitter=HEIGHT_JITTER, size=None):
    """One cross-context sample of 2M canvases from M sources, every pasted copy's transform recorded.

    images: M images, uint8 (3, H, W) tensors or (H, W, 3) arrays; disparities: M disparity maps (larger =
    nearer); regions: M int region maps (resized nearest to the image when their size differs, ids made
    contiguous, then global over the sources); stems: M names. paste_times (e1, e2); (0, 0) is the paper's
    M = 0 ablation (no pasting: each canvas is its source). generator: torch.Generator (all randomness).
    photometric=False turns off every colour change (flips and scales stay). height_jitter: h_t in pixels at
    384 rows (scaled by H / 384). size: (H, W) to resize the sources to (default: the first image's size).

    Canvas j (round 1) and M + j (round 2) start as source j; slot 0 of each region of source j is on canvas j,
    slot 1 on canvas M + j (identity). Round i: all regions repeated e_i times, shuffled, dealt to the round's M
    canvases in turn (canvas b gets items b, b + M, ...), each paste taking the region's next slot. Each paste
    follows the steps of PAPER_NOTES stage 3, numbered in the code: 1 size filter, 2 depth-aware scale, 3 flip
    and photometric augmentation, 4 placement, 5 DepthMix, 6 soft-mask blending, 7 the slot's exact matrix.
    Returns the sample dict (module docstring).
    """
    if generator is None:
        raise ValueError("build_sample needs a torch.Generator (all randomness comes from it)")
    M = len(images)
    if not (M == len(disparities) == len(regions) == len(stems)) or M == 0:
        raise ValueError(f"build_sample: need M >= 1 equal-length lists, got {len(images)} images, "
                         f"{len(disparities)} disparities, {len(regions)} region maps, {len(stems)} stems")
    e1, e2 = (int(e) for e in paste_times)
    T = 2 + e1 + e2
    sources = resize_sources(images, disparities, regions, size)
    H, W = sources[0][0].shape[-2:]
    counts = [int(reg.max()) + 1 for _, _, reg in sources]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    R = int(offsets[-1])
    source_of = np.repeat(np.arange(M), counts)

    # the 2M canvases, colour and disparity stacked: rounds 1 and 2 both start from the unmodified sources
    stacked, canvas, canvas_labels = start_canvases(sources, offsets, T)
    transforms = np.tile(np.eye(3), (R, T, 1, 1))                               # (R, T, 3, 3) float64
    canvas_of = np.full((R, T), -1, dtype=np.int64)
    canvas_of[:, 0] = source_of
    canvas_of[:, 1] = source_of + M

    boxes = [b for j, (_, _, reg) in enumerate(sources) for b in region_boxes(reg, counts[j])]
    # step 1, size filter: a rejected region gets no crop; each round deals every region, so the crops of the
    # others are all used whenever something is pasted
    crops = [region_crop(stacked[j], sources[j][2], *boxes[r], r - int(offsets[j]))
             if e1 + e2 > 0 and passes_size_filter(h, w, H, W) else None
             for r, (j, (_, _, h, w)) in enumerate(zip(source_of, boxes))]
    jitter_px = int(round(height_jitter * H / REFERENCE_ROWS))
    next_slot = np.full(R, 2, dtype=np.int64)
    for round_index, e in enumerate((e1, e2)):
        if e > 0:
            paste_round(canvas, canvas_labels, transforms, canvas_of, next_slot, crops, boxes, round_index, e,
                        generator, jitter_px, photometric)
    return {
        "images": (canvas[:, :3] * 255.0).round_().clamp_(0, 255).to(torch.uint8),
        "labels": canvas_labels,
        "transforms": torch.from_numpy(transforms).float(),
        "canvas_of": torch.from_numpy(canvas_of),
        "slots": T,
        "sources": list(stems),
    }


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
    H x W, colour jitter p 0.8, blur p 0.2, grayscale p 0.1, horizontal flip p 0.5, ImageNet normalisation.
    image: uint8 (3, H, W) (or float in [0, 1]); returns (float32 (3, H, W) normalised, G float32 (3, 3)) where G
    maps normalised coords of the un-augmented canvas to normalised coords of the augmented one (column
    vectors [x, y, 1]): the pixel at g in the output came from G^-1 g in the input. Labels are not augmented.
    """
    _, H, W = image.shape
    u = torch.rand(_CANVAS_DRAWS, generator=generator, dtype=torch.float64).tolist()
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    # random resize: area factor a, aspect ratio r (log-uniform), never smaller than H x W
    area = RESIZE_AREA[0] + (RESIZE_AREA[1] - RESIZE_AREA[0]) * u[0]
    aspect = math.exp(math.log(RESIZE_ASPECT[0]) + (math.log(RESIZE_ASPECT[1]) - math.log(RESIZE_ASPECT[0])) * u[1])
    new_h = max(H, int(round(H * math.sqrt(area / aspect))))
    new_w = max(W, int(round(W * math.sqrt(area * aspect))))
    if (new_h, new_w) != (H, W):
        x = TF.resize(x, [new_h, new_w], antialias=True)
    # random crop back to H x W
    top = min(int(u[2] * (new_h - H + 1)), new_h - H)
    left = min(int(u[3] * (new_w - W + 1)), new_w - W)
    x = x[:, top:top + H, left:left + W]
    if photometric:
        x = photometric_augment(x, u[4:16]).clamp(0, 1)
    flip = u[16] < P_FLIP
    if flip:
        x = TF.horizontal_flip(x)
    x = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    # pixel-edge algebra: u1 = u * new_w / W, then u2 = u1 - left, then (flip) u3 = W - u2
    sx, sy = new_w / W, new_h / H
    a, b = (-sx, W + left) if flip else (sx, -left)
    G = pixel_affine_to_normalised(a, b, sy, -top, H, W)
    return x.contiguous(), torch.from_numpy(G).float()


# ----------------------------------------------------------------------------------------------------------
# Input / output
# ----------------------------------------------------------------------------------------------------------
def list_images(data=None, split=None, images=None):
    """Sorted image paths from a Cityscapes-layout split or a glob, with their stems."""
    if images is not None:
        paths = sorted(glob.glob(images))
        if not paths:
            raise FileNotFoundError(f"--images {images} matches no file")
    else:
        paths = depth.list_split_images(data, split)
    return paths, [depth.image_stem(p) for p in paths]


def load_source(image_path, disp_path, regions_path, size):
    """Read one source and bring it to `size` (RGB antialiased, disparity bilinear, regions nearest)."""
    for path, what in ((disp_path, "disparity: run `python depth.py predict --work WORK ...` first"),
                       (regions_path, "regions: run `python group.py --work WORK ...` first")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing {path} ({what})")
    with Image.open(image_path) as im:
        im = im.convert("RGB")
        aspect = im.height / im.width
        if (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.BILINEAR)  # PIL's bilinear is antialiased when shrinking
        image = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    disparity = np.load(disp_path)
    regions = np.load(regions_path)
    for array, path in ((disparity, disp_path), (regions, regions_path)):
        if array.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D map, got shape {array.shape}")
        if abs(array.shape[0] / array.shape[1] / aspect - 1) > 0.02:
            raise ValueError(f"{path}: shape {array.shape} does not have the aspect ratio of {image_path} "
                             f"(H/W {aspect:.3f}); wrong file?")
    if not np.issubdtype(regions.dtype, np.integer):
        raise ValueError(f"{regions_path}: region ids must be integers, got {regions.dtype}")
    if not np.issubdtype(disparity.dtype, np.floating) or not np.isfinite(disparity).all():
        raise ValueError(f"{disp_path}: disparity must be finite floats, got {disparity.dtype}")
    return resize_source(image, disparity, regions, size)


class CopyPasteDataset(torch.utils.data.Dataset):
    """Cross-context samples built on the fly (the same code and seeds as the saved samples).

    paths: sorted image paths (`list_images`); disp_dir / regions_dir hold <stem>.npy; len = N // mix samples per
    epoch, sample k uses images k + i * (N // mix); call set_epoch(e) for new composites each epoch.
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

    def load(self, i):
        stem = self.stems[i]
        return load_source(self.paths[i], os.path.join(self.disp_dir, f"{stem}.npy"),
                           os.path.join(self.regions_dir, f"{stem}.npy"), self.size)

    def build(self, epoch, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        idx = sample_sources(len(self.paths), self.mix, index)
        loaded = [self.load(i) for i in idx]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return build_sample([x[0] for x in loaded], [x[1] for x in loaded], [x[2] for x in loaded],
                            [self.stems[i] for i in idx], paste_times=self.paste_times, generator=g,
                            photometric=self.photometric, height_jitter=self.height_jitter, size=self.size)

    def __getitem__(self, index):
        return self.build(self.epoch, index)


def load_sample(path):
    """Read a saved sample and check its fields (shapes, dtypes); names the command that writes it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}: run `python copypaste.py --work WORK ...` first")
    sample = torch.load(path, weights_only=True)
    images, labels, tr, co, T = (sample[k] for k in ("images", "labels", "transforms", "canvas_of", "slots"))
    if images.dtype != torch.uint8 or labels.dtype != torch.int32 or images.shape[0] != labels.shape[0] or \
            tr.shape[:2] != co.shape or tr.shape[1] != T:
        raise ValueError(f"{path}: not a copypaste.py sample (images {tuple(images.shape)} {images.dtype}, "
                         f"labels {tuple(labels.shape)} {labels.dtype}, transforms {tuple(tr.shape)}, T {T})")
    return sample


def save_sample(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def region_colours(num):
    """A fixed, distinct-ish colour per region id (golden-ratio hues)."""
    import colorsys
    return torch.tensor([colorsys.hsv_to_rgb((0.618034 * r) % 1.0, 0.9, 1.0) for r in range(num)]) * 255


def preview_grid(sample):
    """uint8 (2H, M W, 3): round 1 canvases on top, round 2 below; every pasted region's copies outlined in one
    colour (the paper's Fig 1b)."""
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
    colours = region_colours(R).to(torch.uint8)[region]  # (2M, H, W, 3)
    out = images.permute(0, 2, 3, 1).clone()
    out[edge] = colours[edge]
    M2, H, W, _ = out.shape
    M = M2 // 2
    return out.reshape(2, M, H, W, 3).permute(0, 2, 1, 3, 4).reshape(2 * H, M * W, 3).numpy()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
_DATASET = None


def _init_worker(dataset):
    global _DATASET
    torch.set_num_threads(1)
    _DATASET = dataset


def _make(task):
    epoch, index, path = task
    if os.path.exists(path):
        return path, False
    save_sample(_DATASET.build(epoch, index), path)
    return path, True


def run(args):
    torch.set_num_threads(max(1, args.threads))
    paths, stems = list_images(args.data, args.split, args.images)
    disp_dir = args.disp_dir or os.path.join(args.work, "disp")
    regions_dir = args.regions_dir or os.path.join(args.work, "regions")
    dataset = CopyPasteDataset(paths, disp_dir, regions_dir, mix=args.mix, paste_times=args.paste_times,
                               size=args.size, photometric=not args.no_photometric,
                               height_jitter=args.height_jitter, seed=args.seed)
    for s in stems:  # fail early, naming the command that makes the missing inputs
        for d, cmd in ((disp_dir, "python depth.py predict --work WORK ..."),
                       (regions_dir, "python group.py --work WORK ...")):
            if not os.path.exists(os.path.join(d, f"{s}.npy")):
                raise FileNotFoundError(f"missing {os.path.join(d, s + '.npy')}: run `{cmd}` first")
    out = os.path.join(args.work, "samples")
    os.makedirs(out, exist_ok=True)
    T = 2 + sum(args.paste_times)
    config = dict(vars(args), slots=T, num_images=len(paths), samples_per_epoch=len(dataset))
    # finished samples are skipped: they must have been made with the same settings
    defining = ("mix", "paste_times", "size", "no_photometric", "height_jitter", "seed", "num_images")
    previous = os.path.join(out, "args.json")
    existing = glob.glob(os.path.join(out, "epoch_*", "*.pt"))
    if existing and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        changed = ", ".join(f"{k} {old.get(k)} -> {config[k]}" for k in defining if old.get(k) != config[k])
        if changed and not args.overwrite:
            raise SystemExit(f"{out} holds samples made with other settings ({changed}): pass --overwrite to "
                             "replace them, or another --work")
    if args.overwrite:
        for path in existing:
            os.remove(path)
    tmp = os.path.join(out, "args.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out, "args.json"))
    print(f"[copypaste] {len(paths)} images, M {args.mix}, T {T}, {len(dataset)} samples/epoch x {args.epochs} "
          f"epochs at {args.size[0]}x{args.size[1]} -> {out}", flush=True)
    tasks = []
    for epoch in range(args.epochs):
        os.makedirs(os.path.join(out, f"epoch_{epoch:03d}"), exist_ok=True)
        for k in range(len(dataset)):
            tasks.append((epoch, k, os.path.join(out, f"epoch_{epoch:03d}", f"{k:06d}.pt")))
    start, made = time.time(), 0
    if args.workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(
                args.workers, initializer=_init_worker, initargs=(dataset,)) as pool:
            for i, (_, new) in enumerate(pool.imap_unordered(_make, tasks), 1):
                made += new
                _progress(i, len(tasks), made, start)
    else:
        _init_worker(dataset)
        torch.set_num_threads(max(1, args.threads))
        for i, task in enumerate(tasks, 1):
            made += _make(task)[1]
            _progress(i, len(tasks), made, start)
    elapsed = time.time() - start
    print(f"[copypaste] wrote {made} samples, skipped {len(tasks) - made} finished, {elapsed:.1f} s"
          + (f" ({made / elapsed:.2f} samples/s)" if made and elapsed > 0 else ""), flush=True)
    if args.preview:
        os.makedirs(os.path.join(out, "preview"), exist_ok=True)
        for k in range(min(args.preview, len(dataset))):
            path = os.path.join(out, "preview", f"{k:06d}.png")
            sample = load_sample(os.path.join(out, "epoch_000", f"{k:06d}.pt")) if args.epochs else dataset.build(0, k)
            tmp = path + ".tmp.png"
            Image.fromarray(preview_grid(sample)).save(tmp)
            os.replace(tmp, path)
        print(f"[copypaste] previews in {os.path.join(out, 'preview')}", flush=True)


def _progress(i, n, made, start):
    if i == n or i % 50 == 0:
        el = time.time() - start
        eta = el / i * (n - i)
        print(f"[copypaste] {i}/{n} samples ({made} new) {el:.1f} s elapsed, ETA {eta:.0f} s", flush=True)


def get_args_parser():
    p = argparse.ArgumentParser(description="Stage 3: cross-context copy-paste samples (Sec 3.3).")
    p.add_argument("--work", required=True, help="work folder: reads WORK/disp, WORK/regions; writes WORK/samples")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="Cityscapes-layout root (with --split)")
    src.add_argument("--images", help="glob of images instead of --data/--split (stem = file name)")
    p.add_argument("--split", default="train", help="split of --data (default train)")
    p.add_argument("--disp-dir", help="folder of <stem>.npy disparity (default WORK/disp, from depth.py predict)")
    p.add_argument("--regions-dir", help="folder of <stem>.npy region maps (default WORK/regions, from group.py)")
    p.add_argument("--mix", type=int, default=MIX, help="M: source images per sample (paper 8; Table 4 M 2, 4, 8)")
    p.add_argument("--paste-times", type=int, nargs=2, default=list(PASTE_TIMES), metavar=("E1", "E2"),
                   help="e1 e2: pastes of every region in rounds 1 and 2 (released 2 4); 0 0 = the paper's "
                        "M = 0 row (no copy-paste); slots per region T = 2 + e1 + e2")
    p.add_argument("--epochs", type=int, default=1, help="epochs of samples to write (new composites each)")
    p.add_argument("--size", type=int, nargs=2, default=[384, 768], metavar=("H", "W"),
                   help="canvas size (paper: Cityscapes 384 768, KITTI 384 1280)")
    p.add_argument("--no-photometric", action="store_true",
                   help="no colour jitter / blur / grayscale on pasted regions (checking, ablations)")
    p.add_argument("--height-jitter", type=float, default=HEIGHT_JITTER,
                   help="h_t: vertical jitter of a pasted copy, px at 384 rows (scaled with H; paper 16)")
    p.add_argument("--preview", type=int, default=0, help="write N preview PNGs (canvases, copies outlined)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process when --workers 1")
    p.add_argument("--seed", type=int, default=0, help="seed; sample k of epoch e is the same for any --workers")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the samples in WORK/samples and rebuild (needed to change the settings there)")
    return p


def main():
    args = get_args_parser().parse_args()
    if args.paste_times[0] < 0 or args.paste_times[1] < 0 or args.mix < 1:
        raise SystemExit("--mix must be >= 1 and --paste-times >= 0")
    print("[copypaste] " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())) + " device=cpu", flush=True)
    run(args)


if __name__ == "__main__":
    main()
