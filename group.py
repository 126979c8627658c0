"""Stage 2: group pixels that are coherent in 3-D into regions, from an image, its disparity and intrinsics.

Paper: Zeng et al., BMVC 2022, Sec 3.2, Eqn 1-3, Fig 4. SLIC superpixels -> 4-connected region adjacency
graph -> per edge an occlusion distance (Eqn 1) and a support distance (Eqn 2) turned into a boundary
probability W (Eqn 3) -> InfoMap on link weights 1 / W -> iterative merging of the modules that still have a
weak boundary (W < tau) to a neighbor -> one int32 region id per pixel. `group_depth` is the whole method.

depth.py (WORK/disp) -> group.py -> copypaste.py (WORK/regions)

Reads / writes:
| file                                        | shape, dtype        | meaning                                    |
|---------------------------------------------|---------------------|--------------------------------------------|
| DATA/leftImg8bit/S/*/<stem>_leftImg8bit.png  | (H0, W0, 3) uint8   | images (--sequence, KITTI raw, --images)   |
| WORK/disp/<stem>.npy (or --disp-dir)         | (h, w) float32      | disparity, one scale (`depth.py predict`) |
| DATA/disparity/S/*/<stem>_disparity.png      | (H0, W0) uint16     | with --stereo: Cityscapes stereo disparity  |
| DATA/camera/S/*/<stem>_camera.json           | JSON                | intrinsics (KITTI: calib_cam_to_cam.txt)   |
| DATA/gtFine/S/*/<stem>_gtFine_*Ids.png       | (H0, W0)            | --method gt and --eval                     |
| WORK/regions/<stem>.npy                      | (H, W) int32        | region ids 0..R-1, contiguous (output)      |
| WORK/regions/preview/<stem>.png              | (H, W, 3) uint8     | --preview: regions over the image (Fig 4d)  |
| WORK/regions/eval.json                       | JSON                | --eval: covering, purity, regions per image |

    python group.py --work runs/cityscapes --data CITYSCAPES --split train --workers 8   # paper scale, 384 x 768
    python group.py --work /tmp/w --data /tmp/tiny --split val --stereo --size 64 128 --segments 300

Disparity (one scale per dataset) is divided by its maximum over the image and floored at 0.005 (released),
then z = 1 / disparity; invalid stereo pixels (0) get the floor: the farthest plane, as the sky does.
Not released: a disparity made at p > 1 working rows per row has Eqn 1 compare points 2p apart (`occlusion_ends`).

Deviations from the paper / the released code (LeungTsang/CPCDR pixel_grouping), stated plainly:
- The principal point is applied in top-down rows (Y = z (cy H - row) / (fy H), up positive); the released
  code flips the rows but not cy (the same for cy = 0.5, the KITTI K it uses for every dataset).
- The dataset's own intrinsics are used when a camera JSON exists (released: the KITTI K everywhere).
- InfoMap modules are read per node id (released: dict order); merging stops after 20 levels or when stuck.
- Eqn 2 uses the lower superpixel's height y1, as the paper (released: the pair's mean; its w_sup is 0).
- InfoMap's preferred number of modules is off by default (released: 10). With infomap 2.x the preference
  charges |K - 10| bits, so the first run returns exactly 10 modules and the merging, which only merges,
  leaves at most 10 regions per image: toy city val (ground-truth disparity, 192 x 384, 2500 superpixels)
  purity 0.77, covering 0.43, 9.5 regions; off: 0.92, 0.46, 79. `--preferred-modules 10` restores it.
- `--method felzenszwalb` (skimage, color only) stands in for the paper's owt-ucm proposals (Table 3).
"""
import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import time
import warnings

import infomap
import numpy as np
from PIL import Image
from skimage.measure import label as connected_components
from skimage.segmentation import felzenszwalb, find_boundaries, slic
from tqdm import tqdm

from depth import (BadInput, add_frame_args, add_shard_arg, atomic_write, checked_read, finite_float, frames_of,
                   list_frames, load_npy, nonnegative_int, positive_int, ranged, read_disparity_png, read_intrinsics,
                   record_settings, run_main, shard_of, split_file, unit_float)

# ===== paper constants (Sec 3.2; the released code's values where the paper gives none) =====
KITTI_INTRINSICS = (0.58, 1.92, 0.5, 0.5)  # normalized fx, fy, cx, cy (Monodepth2's KITTI K; released default)
DISPARITY_FLOOR = 0.005       # released code: disp[disp < 0.005] = 0.005 before z = 1 / disp
SLIC_SEGMENTS, SLIC_COMPACTNESS, SLIC_SIGMA = 10000, 10.0, 1.0  # released code's slic() at 384 x 768
W_OCLN, W_SUP, BIAS = 48.0, 0.0, -4.0  # Eqn 3 weights of the released code (w_sup 0 switches Eqn 2 off)
MERGE_TAU = 0.20              # iterative merging: a module with an edge W < tau to another module stays open
PREFERRED_MODULES = 0         # InfoMap --preferred-number-of-modules: off (released code: 10; see the docstring)
INFOMAP_SEED = 123            # infomap's own default seed (the released code left it at the default)
MAX_LEVELS = 20               # depth guard of the iterative merging (not in the released code)
FZ_SCALE, FZ_SIGMA, FZ_MIN_SIZE = 300.0, 0.8, 100  # felzenszwalb: about depth's region count on toy val, 192 x 384
EVAL_IGNORE_LABEL_IDS = (0, 1, 2, 3)  # Cityscapes unlabeled, ego vehicle, rectification border, out of roi


# ===== pure functions, in pipeline order =====
def scale_free_depth(disparity, floor=DISPARITY_FLOOR):
    """Scale-free depth z = 1 / d: disparity d (any positive scale, <= 0 invalid) divided by its maximum and
    floored at `floor`, so invalid pixels (stereo's 0) and the sky become the farthest plane z = 1 / floor.
    Harmless: Eqn 1-3 see z through back_project's per-axis std (scale-free); only the floor needs a scale."""
    d = np.asarray(disparity, dtype=np.float32)
    d = d / d.max() if d.size and d.max() > 0 else np.zeros_like(d)
    return 1.0 / np.maximum(d, np.float32(floor))


def back_project(depth, intrinsics, normalize_axes=True):
    """3-D point of every pixel, (3, H, W) float32, X right, Y up, Z forward (Sec 3.2): (X, Y, Z) = z K^-1
    (col, row', 1), rows counted upwards, K from normalized (fx, fy, cx, cy): X = z (col - cx W) / (fx W),
    Y = z (cy H - row) / (fy H), Z = z; Y < 0 is below the principal row. normalize_axes: divide each axis by
    its standard deviation over the image (released code; no mean subtraction; it cancels fx and fy, and
    Eqn 3's w_ocln = 48 was tuned with it)."""
    z = np.asarray(depth, dtype=np.float32)
    h, w = z.shape
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    cols = (np.arange(w, dtype=np.float32) - np.float32(cx * w)) / np.float32(fx * w)   # (W,)
    rows = (np.float32(cy * h) - np.arange(h, dtype=np.float32)) / np.float32(fy * h)   # (H,)
    points = np.stack([z * cols[None, :], z * rows[:, None], z])                        # (3, H, W)
    if normalize_axes:
        points /= np.maximum(points.reshape(3, -1).std(axis=1), np.float32(1e-12))[:, None, None]
    return points


def point_gradients(points):
    """Derivatives of the 3-D map along rows and columns (np.gradient), divided by Z: (2, 3, H, W), [0] d/drow,
    [1] d/dcol. Dividing by Z makes near and far surfaces weigh alike in a superpixel's mean (released code)."""
    return np.stack(np.gradient(points, axis=(1, 2))) * (1.0 / points[2])


def normals_from_gradients(d_row, d_col):
    """Unit normals n = cross(d/dcol, d/drow) / |.|, (..., 3). Level ground: n_y ~ +1; walls: n_y ~ 0."""
    n = np.cross(d_col, d_row)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def slic_superpixels(image, segments=SLIC_SEGMENTS):
    """SLIC superpixels (Lab; released compactness 10, sigma 1) of an RGB image in [0, 1]: (H, W) int32,
    contiguous from 0. start_label=0 matters: newer scikit-image starts at 1 by default, which silently
    breaks code that indexes per-superpixel arrays by label."""
    return relabel_contiguous(slic(image, n_segments=segments, compactness=SLIC_COMPACTNESS, sigma=SLIC_SIGMA,
                                   start_label=0, channel_axis=-1))


def relabel_contiguous(labels):
    """Map the ids of an integer array onto 0..R-1 (keeping their order), int32."""
    labels = np.asarray(labels)
    flat = labels.ravel().astype(np.int64)
    flat = flat - flat.min() if flat.size else flat
    return (np.cumsum(np.bincount(flat) > 0) - 1)[flat].reshape(labels.shape).astype(np.int32)


def region_adjacency(labels):
    """4-connected region adjacency graph of a label map: (E, 2) int64 edges (i < j), sorted, unique: every
    horizontally or vertically neighboring pixel pair with different labels. The same edges as skimage's
    RAG(labels) with connectivity 1, which the released code builds (a Python call per pixel there)."""
    labels = np.asarray(labels)
    n = int(labels.max()) + 1 if labels.size else 0
    left, right, up, down = labels[:, :-1], labels[:, 1:], labels[:-1, :], labels[1:, :]
    horizontal, vertical = left != right, up != down
    a = np.concatenate([left[horizontal], up[vertical]]).astype(np.int64)
    b = np.concatenate([right[horizontal], down[vertical]]).astype(np.int64)
    keys = np.unique(np.minimum(a, b) * n + np.maximum(a, b))     # the pair (i, j) as one key i * N + j
    return np.stack([keys // n, keys % n], axis=1)


def superpixel_means(labels, channels, num_labels):
    """Mean of each channel over each superpixel: labels (H, W), channels (C, H, W) -> (N, C) float64."""
    flat = np.asarray(labels).ravel()
    channels = np.asarray(channels).reshape(len(channels), -1)
    count = np.maximum(np.bincount(flat, minlength=num_labels), 1)
    return np.stack([np.bincount(flat, weights=c, minlength=num_labels) for c in channels], axis=1) / count[:, None]


# Eqn 1
def occlusion_distance(c1, c2):
    """D_ocln = ||c1 - c2|| / (z1 + z2): 3-D distance of two superpixel centers (..., 3), relative to depth."""
    # D_ocln = ||c1 - c2|| / (z1 + z2), z the centers' (normalized) Z
    return np.linalg.norm(c1 - c2, axis=-1) / (c1[..., 2] + c2[..., 2])


# Eqn 2
def support_distance(ny1, ny2, y1):
    """D_sup of S1 (the lower superpixel) and S2: large where a level surface (the ground, n_y1 ~ 1) below the
    principal row meets a steeper one above it, the support boundary of an object standing on the ground."""
    # D_sup = max(n_y1, 0) * max(n_y1 - n_y2, 0) * y1^2  if y1 < 0
    return np.maximum(ny1, 0) * np.maximum(ny1 - ny2, 0) * np.where(y1 < 0, y1 ** 2, 0.0)


# Eqn 3
def boundary_probability(d_ocln, d_sup, w_ocln=W_OCLN, w_sup=W_SUP, bias=BIAS):
    """W = sigmoid(w_ocln D_ocln + w_sup D_sup + b): the probability that an edge is a region boundary."""
    # W = sigma(w_ocln * D_ocln + w_sup * D_sup + b)
    return 1.0 / (1.0 + np.exp(-(w_ocln * d_ocln + w_sup * d_sup + bias)))


def occlusion_ends(points, edges, centers, pixel_centers, min_separation):
    """The two 3-D points Eqn 1 compares per edge, (E, 3) each: the superpixels' mean points, or where their pixel
    centers (N, 2) are nearer than min_separation, the point map (3, H, W) read min_separation apart on their line.
    A disparity resized from a grid of pitch p spreads a depth step over >= p pixels, and a superpixel boundary
    lies anywhere on it: only points 2p apart surely straddle it (nearer ones see a slant: Eqn 1 merges it)."""
    i, j = edges[:, 0], edges[:, 1]
    delta = pixel_centers[j] - pixel_centers[i]
    separation = np.linalg.norm(delta, axis=1, keepdims=True)
    middle, half = (pixel_centers[i] + pixel_centers[j]) / 2, min_separation / 2 * delta / np.maximum(separation, 1e-9)
    limit, short = np.array(points.shape[1:]) - 1, separation < min_separation
    ends = [np.clip(np.rint(middle + sign * half), 0, limit).astype(np.int64) for sign in (-1, 1)]
    return tuple(np.where(short, points[:, q[:, 0], q[:, 1]].T, centers[k]) for q, k in zip(ends, (i, j)))


def edge_weights(edges, centers, normals, w_ocln=W_OCLN, w_sup=W_SUP, bias=BIAS, ends=None):
    """W of every edge (E,) from superpixel centers (N, 3) and normals (N, 3): Eqn 1-3 with S1 the lower
    superpixel of the edge (smaller Y). ends: the points Eqn 1 compares (`occlusion_ends`; default the centers)."""
    i, j = edges[:, 0], edges[:, 1]
    swap = centers[j, 1] < centers[i, 1]
    s1, s2 = np.where(swap, j, i), np.where(swap, i, j)
    d_ocln = occlusion_distance(*(ends if ends is not None else (centers[i], centers[j])))   # symmetric in S1, S2
    d_sup = support_distance(normals[s1, 1], normals[s2, 1], centers[s1, 1])
    return boundary_probability(d_ocln, d_sup, w_ocln, w_sup, bias)


def infomap_modules(num_nodes, edges, link_weights, seed=INFOMAP_SEED, preferred_modules=PREFERRED_MODULES):
    """Two-level InfoMap on an undirected weighted graph: (num_nodes,) int64 module ids, contiguous from 0.
    No teleportation, seeded, one trial; preferred_modules > 0 sets --preferred-number-of-modules (released:
    10). Modules are read per node id (the released code assumed the dict to be in node order)."""
    if len(edges) == 0:
        return np.arange(num_nodes, dtype=np.int64)
    options = infomap.Options(two_level=True, flow_model="undirected", teleportation_probability=0.0,
                              preferred_number_of_modules=preferred_modules or None, seed=int(seed),
                              num_trials=1, silent=True)
    im = infomap.Infomap(args=options.to_args())
    im.add_links(np.column_stack([edges, link_weights]).astype(np.float64))
    im.run()
    with warnings.catch_warnings():   # deprecated in infomap 2.16 (pinned) for run().modules(), the same dict
        # after a per-node Python snapshot: 0.2 s more on a 10000-node graph, a third of the stage
        warnings.simplefilter("ignore", DeprecationWarning)
        modules = im.get_modules()
    out = np.full(num_nodes, -1, dtype=np.int64)
    out[np.fromiter(modules.keys(), np.int64, len(modules))] = np.fromiter(modules.values(), np.int64, len(modules))
    isolated = out < 0                                   # nodes without links: a module each
    out[isolated] = out.max() + 1 + np.arange(int(isolated.sum()))
    return relabel_contiguous(out).astype(np.int64)


def merge_modules(edges, weights, modules, tau=MERGE_TAU):
    """One merging step. A module is open if one of its edges to another module has W < tau; closed modules
    are final. The next graph has the open modules as nodes (in module order), an edge between two open
    modules that touch, with W the arithmetic mean of the W's between them (released code).
    Returns (open (K,) bool, next_node_of_module (K,) int64, -1 for closed, next_edges (E', 2), next_W (E',))."""
    a, b = modules[edges[:, 0]], modules[edges[:, 1]]
    weak = (a != b) & (weights < tau)
    is_open = np.zeros(int(modules.max()) + 1, dtype=bool)
    is_open[np.concatenate([a[weak], b[weak]])] = True
    next_node = np.where(is_open, np.cumsum(is_open) - 1, -1)
    keep = (a != b) & is_open[a] & is_open[b]
    na, nb = next_node[a[keep]], next_node[b[keep]]
    n = max(int(is_open.sum()), 1)
    keys, inverse = np.unique(np.minimum(na, nb) * n + np.maximum(na, nb), return_inverse=True)   # key i * n + j
    mean_w = np.bincount(inverse, weights=weights[keep]) / np.bincount(inverse)
    return is_open, next_node, np.stack([keys // n, keys % n], axis=1), mean_w


def iterative_infomap(num_nodes, edges, weights, tau=MERGE_TAU, seed=INFOMAP_SEED,
                      preferred_modules=PREFERRED_MODULES, max_levels=MAX_LEVELS):
    """Iterative merging (Sec 3.2): region id of every node, (num_nodes,) int64, contiguous from 0. 1. InfoMap
    on the current graph with link weights 1 / W; 2. modules with an edge W < tau to another module are open,
    the others final; 3. stop if none is open; 4. else the open modules form the next graph (merge_modules);
    5. repeat. Ids go to final modules level by level. After max_levels levels, or when InfoMap merges
    nothing, the open modules become final as they are."""
    region = np.full(num_nodes, -1, dtype=np.int64)
    node = np.arange(num_nodes, dtype=np.int64)        # node of the current graph of every original node, -1: final
    n_current, n_regions = num_nodes, 0
    for level in range(max_levels):
        modules = infomap_modules(n_current, edges, 1.0 / weights, seed, preferred_modules)
        is_open, next_node, edges, weights = merge_modules(edges, weights, modules, tau)
        stuck = int(modules.max()) + 1 == n_current          # InfoMap merged nothing: more levels change nothing
        last = level == max_levels - 1 or stuck or not is_open.any()
        final = np.ones_like(is_open) if last else ~is_open
        final_id = np.cumsum(final) - 1 + n_regions          # closed modules get the next ids, in module order
        live = node >= 0
        module = modules[node[live]]
        region[live] = np.where(final[module], final_id[module], -1)
        node[live] = np.where(final[module], -1, next_node[module])
        n_current, n_regions = int(is_open.sum()), n_regions + int(final.sum())
        if last:
            break
    return region


def group_depth(image, disparity, intrinsics, *, segments=SLIC_SEGMENTS, w_ocln=W_OCLN, w_sup=W_SUP, bias=BIAS,
                tau=MERGE_TAU, preferred_modules=PREFERRED_MODULES, seed=INFOMAP_SEED, disparity_pitch=1.0):
    """Coherent depth regions (Sec 3.2, Fig 4): image (H, W, 3) in [0, 1], disparity (H, W) of any positive
    scale (<= 0 invalid), normalized intrinsics (fx/W, fy/H, cx/W, cy/H) -> (H, W) int32 region ids from 0.
    disparity_pitch: working rows per disparity row as made (6: 64 resized to 384; <= 1: Eqn 1 as released)."""
    # superpixels (Fig 4a) and their 4-connected adjacency graph
    labels = slic_superpixels(image, segments)
    n, edges = int(labels.max()) + 1, region_adjacency(labels)
    # per superpixel: the mean 3-D point (its center c) and the normal n of its mean point gradients
    points = back_project(scale_free_depth(disparity), intrinsics)                       # (3, H, W)
    pixels = np.indices(labels.shape, dtype=np.float32)                                   # (2, H, W) row, col
    channels = np.concatenate([points, point_gradients(points).reshape(6, *labels.shape), pixels])  # (11, H, W)
    stats = superpixel_means(labels, channels, n)                                         # (N, 11)
    centers, normals = stats[:, :3], normals_from_gradients(stats[:, 3:6], stats[:, 6:9])
    # W of every edge (Eqn 1-3, Fig 4b-c; Eqn 1 across the disparity's own resolution), InfoMap, merging (Fig 4d)
    ends = occlusion_ends(points, edges, centers, stats[:, 9:11], 2.0 * disparity_pitch if disparity_pitch > 1 else 0)
    weights = edge_weights(edges, centers, normals, w_ocln, w_sup, bias, ends)
    return iterative_infomap(n, edges, weights, tau, seed, preferred_modules)[labels].astype(np.int32)


def group_felzenszwalb(image):
    """Color-only proposals (Felzenszwalb-Huttenlocher graph segmentation; stands in for owt-ucm, Table 3)."""
    return relabel_contiguous(felzenszwalb(image, scale=FZ_SCALE, sigma=FZ_SIGMA, min_size=FZ_MIN_SIZE,
                                           channel_axis=-1))


def connected_regions(ids):
    """Split an id map into 4-connected regions of equal id: (H, W) int32, contiguous from 0."""
    ids = relabel_contiguous(ids)
    return (connected_components(ids + 1, background=0, connectivity=1) - 1).astype(np.int32)


def segment_scores(regions, segments, valid=None):
    """Regions against ground-truth segments over the valid pixels: covering = sum over segments S of
    |S| max_R IoU(R, S) / N; purity = sum over regions R of max_S |R n S| / N (the fraction of pixels in their
    region's majority segment); regions = the number of regions with a valid pixel."""
    keep = slice(None) if valid is None else np.asarray(valid).ravel()
    r = np.unique(np.asarray(regions).ravel()[keep], return_inverse=True)[1]
    s = np.unique(np.asarray(segments).ravel()[keep], return_inverse=True)[1]
    if r.size == 0:
        return {"covering": float("nan"), "purity": float("nan"), "regions": 0}
    n_r, n_s = int(r.max()) + 1, int(s.max()) + 1
    inter = np.bincount(r * n_s + s, minlength=n_r * n_s).reshape(n_r, n_s)     # |R n S|, (R, S)
    size_r, size_s = inter.sum(axis=1), inter.sum(axis=0)
    iou = inter / (size_r[:, None] + size_s[None, :] - inter)
    return {"covering": float((size_s * iou.max(axis=0)).sum() / r.size),
            "purity": float(inter.max(axis=1).sum() / r.size), "regions": n_r}


def preview_image(image, regions, seed=0):
    """Regions colored over the image with their boundaries (Fig 4d): (H, W, 3) uint8."""
    colors = np.random.default_rng(seed).random((int(regions.max()) + 1, 3))
    out = 0.5 * colors[regions] + 0.5 * image
    out[find_boundaries(regions, mode="inner")] = (1.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


# ===== input / output =====
def load_image(path, size):
    """RGB image resized (antialiased bilinear) to size (H, W): float32 (H, W, 3) in [0, 1], native (H0, W0)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        native = (im.height, im.width)
        if native != tuple(size):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0, native


def resize_float(array, size):
    """Bilinear resize of a float (h, w) map to size (H, W)."""
    a = np.asarray(array, dtype=np.float32)
    return a if a.shape == tuple(size) else np.asarray(Image.fromarray(a).resize(size[::-1], Image.BILINEAR))


def resize_nearest(array, size):
    """Nearest-neighbor resize of an integer (h, w) map to size (H, W) (a copy at the same size)."""
    array = np.asarray(array)
    rows = ((np.arange(size[0]) + 0.5) * array.shape[0] / size[0]).astype(np.int64)   # pixel centers
    cols = ((np.arange(size[1]) + 0.5) * array.shape[1] / size[1]).astype(np.int64)
    return array[rows[:, None], cols[None, :]]


def check_aspect(image_size, other_size, what, path, tolerance=0.02):
    """Raise a clear error when two maps of one frame have different aspect ratios."""
    a, b = image_size[1] / image_size[0], other_size[1] / other_size[0]
    if abs(a / b - 1.0) > tolerance:
        raise ValueError(f"{path}: {what} is {other_size[0]} x {other_size[1]} (aspect {b:.3f}) but the image is "
                         f"{image_size[0]} x {image_size[1]} (aspect {a:.3f}); they must show the same field of "
                         "view (was the disparity predicted on a cropped image?)")


def read_gt_segments(data, split, stem):
    """Ground-truth ids at their native resolution, int64 (H0, W0): instanceIds (labelIds where absent; the
    callers split them into connected regions), and the valid mask (labelIds not in EVAL_IGNORE_LABEL_IDS)."""
    label_path, instance_path = (split_file(data, "gtFine", split, stem, f"gtFine_{kind}Ids.png")
                                 for kind in ("label", "instance"))
    try:
        label_ids = np.asarray(Image.open(label_path)).astype(np.int64)
        ids = np.asarray(Image.open(instance_path)).astype(np.int64) if os.path.exists(instance_path) else label_ids
    except OSError as e:
        raise FileNotFoundError(f"{label_path}: cannot read the ground truth ({e}); --method gt and --eval need "
                                "gtFine labelIds / instanceIds (the toy city writes them)")
    return ids, ~np.isin(label_ids, EVAL_IGNORE_LABEL_IDS)


def list_items(args):
    """[(stem, image path, calibration file or None)] of the run, sorted, this shard's share."""
    need_calib = args.method == "depth" and not args.intrinsics  # the frame's own camera; checked before any work
    return [(f.stem, f.path, f.calib) for f in shard_of(frames_of(args, need_calib), args.shard)]


def intrinsics_of(args, calib, native):
    """Normalized (fx, fy, cx, cy) and where they come from: --intrinsics, the frame's calibration file (Cityscapes
    camera JSON, KITTI calib_cam_to_cam.txt), else (--images) the KITTI K."""
    if args.intrinsics:
        return np.array(args.intrinsics, dtype=np.float64), "--intrinsics"
    if calib is not None:
        return read_intrinsics(calib, native), calib
    return np.array(KITTI_INTRINSICS, dtype=np.float64), f"no calibration file: the KITTI K {KITTI_INTRINSICS}"


def load_disparity(args, stem, native, size):
    """Disparity of a frame at the working size (float32 (H, W), any positive scale, <= 0 invalid) and its pitch:
    working rows per disparity row as made (`depth.py predict` records its network's size in resolution.json)."""
    if args.stereo:
        path = split_file(args.data, "disparity", args.split, stem, "disparity.png")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no stereo disparity (--stereo reads DATA/disparity)")
        disparity = read_disparity_png(path)
        check_aspect(native, disparity.shape, "the stereo disparity", path)
        # to (0, 1] and invalid (0) pixels to the floor before resizing: bilinear never blends valid with 0
        return resize_float(1.0 / scale_free_depth(disparity), size), size[0] / disparity.shape[0]
    path = os.path.join(folder := args.disp_dir or os.path.join(args.work, "disp"), f"{stem}.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no disparity for {stem}; make it with `python depth.py predict --work "
                                "WORK ...` (or pass --disp-dir DIR, or --stereo for Cityscapes stereo disparity)")
    disparity = load_npy(path, "python depth.py predict --work WORK ...")  # readable, float (H, W), finite
    if disparity.min() < 0 or disparity.max() <= 0:  # 0 marks an invalid pixel; a map of them is no depth
        raise BadInput(f"{path}: negative or no positive disparity; remake it with `python depth.py predict`")
    check_aspect(native, disparity.shape, "the disparity", path)
    made = os.path.join(folder, "resolution.json")                 # {"predicted_at": [h, w]}
    rows = json.load(open(made))["predicted_at"][0] if os.path.exists(made) else disparity.shape[0]
    return resize_float(disparity, size), size[0] / min(rows, disparity.shape[0])


def process_one(item, args):
    """Group one image (--method) and write its regions (and preview). Returns (stem, number of regions)."""
    (stem, image_path, calib), size = item, tuple(args.size)
    image, native = checked_read(image_path, "the dataset", lambda p: load_image(p, size))
    if args.method == "depth":
        disparity, pitch = load_disparity(args, stem, native, size)
        intrinsics = intrinsics_of(args, calib, native)[0]
        regions = group_depth(image, disparity, intrinsics, segments=args.segments, w_ocln=args.w_ocln,
                              w_sup=args.w_sup, bias=args.bias, tau=args.tau,
                              preferred_modules=args.preferred_modules, seed=args.seed, disparity_pitch=pitch)
    elif args.method == "felzenszwalb":
        regions = group_felzenszwalb(image)
    else:  # gt
        ids = read_gt_segments(args.data, args.split, stem)[0]
        check_aspect(native, ids.shape, "the ground truth", image_path)
        regions = connected_regions(resize_nearest(ids, size))
    atomic_write(os.path.join(args.work, "regions", f"{stem}.npy"), lambda f: np.save(f, regions.astype(np.int32)))
    if args.preview:
        atomic_write(os.path.join(args.work, "regions", "preview", f"{stem}.png"),
                     lambda f: Image.fromarray(preview_image(image, regions, args.seed)).save(f, format="PNG"))
    return stem, int(regions.max()) + 1


def evaluate_regions(args):
    """Covering, purity and regions per image of WORK/regions against the split's gtFine segments."""
    per_image = []
    for stem in [f.stem for f in list_frames(args.data, "cityscapes", args.split)]:
        region_path = os.path.join(args.work, "regions", f"{stem}.npy")
        if not os.path.exists(region_path):
            raise FileNotFoundError(f"{region_path}: no regions; run `python group.py --work {args.work} --data "
                                    f"{args.data} --split {args.split}` first")
        regions = load_npy(region_path, f"python group.py --work {args.work} ...", kind="iu")
        if regions.min() < 0:
            raise BadInput(f"{region_path}: negative region ids; remake it with `python group.py --work {args.work}`")
        ids, valid = read_gt_segments(args.data, args.split, stem)
        check_aspect(ids.shape, regions.shape, "the regions", region_path)
        per_image.append({"stem": stem, **segment_scores(resize_nearest(regions, ids.shape), connected_regions(ids),
                                                         valid)})
    summary = {"split": args.split, "images": len(per_image),
               **{k: float(np.mean([p[k] for p in per_image])) for k in ("covering", "purity")},
               "regions_per_image": float(np.mean([p["regions"] for p in per_image])), "per_image": per_image}
    out = os.path.join(args.work, "regions", "eval.json")
    atomic_write(out, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"[group eval] {args.split}: {len(per_image)} images, covering {summary['covering']:.4f}, "
          f"purity {summary['purity']:.4f}, regions/image {summary['regions_per_image']:.1f} -> {out}")
    return summary


def run(args):
    print("[group] " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    # ===== evaluation (--eval) =====
    if args.eval:
        if not args.data:
            raise SystemExit("group.py --eval needs --data DATA --split S (Cityscapes-style gtFine)")
        return evaluate_regions(args)
    # ===== inputs =====
    if not args.data and not args.images:
        raise SystemExit("group.py: give --data DATA --split S or --images GLOB")
    if (args.stereo or args.method == "gt") and not args.data:
        raise SystemExit("group.py: --stereo and --method gt read DATA (give --data DATA --split S)")
    os.makedirs(os.path.join(args.work, "regions", "preview" if args.preview else ""), exist_ok=True)
    keys = ("size", "method", "segments", "w_ocln", "w_sup", "bias", "tau", "preferred_modules", "seed", "stereo",
            "disp_dir", "intrinsics")  # what changes the maps: maps of other settings are never mixed in
    record_settings(os.path.join(args.work, "regions"), {k: vars(args)[k] for k in keys}, args.overwrite)
    items = list_items(args)
    todo = [item for item in items
            if args.overwrite or not os.path.exists(os.path.join(args.work, "regions", f"{item[0]}.npy"))]
    print(f"[group] {len(items)} images in this shard, {len(items) - len(todo)} done, {len(todo)} to do "
          f"(method {args.method}, size {args.size[0]} x {args.size[1]})", flush=True)
    if todo and args.method == "depth":
        with Image.open(todo[0][1]) as im:
            intrinsics, source = intrinsics_of(args, todo[0][2], (im.height, im.width))
        print(f"[group] intrinsics of {todo[0][0]}: {np.round(intrinsics, 4).tolist()} ({source})", flush=True)
    # ===== group every image: a pool of --workers processes, or the main process =====
    start = time.perf_counter()
    one = functools.partial(process_one, args=args)
    use_pool = args.workers > 0 and len(todo) > 1
    with multiprocessing.get_context("fork").Pool(args.workers) if use_pool else contextlib.nullcontext() as pool:
        results = pool.imap_unordered(one, todo) if use_pool else map(one, todo)
        counts = [count for _, count in tqdm(results, total=len(todo), disable=args.no_progress or not todo)]
    if counts:
        print(f"[group] wrote {len(counts)} region maps to {os.path.join(args.work, 'regions')}, "
              f"{np.mean(counts):.1f} regions per image, {(time.perf_counter() - start) / len(counts):.3f} s per "
              "image", flush=True)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--work", required=True, help="work folder shared by all stages: reads WORK/disp, writes WORK/regions")
    add("--data", help="dataset root (--dataset): Cityscapes layout (images, camera JSON, stereo disparity, gtFine) "
        "or KITTI raw")
    add("--split", default="train", help="split of --data (train, val, ...)")
    add("--images", help="glob of images instead of --data/--split (stem = file name, or KITTI raw's)")
    add_frame_args(p)
    add("--disp-dir", help="folder of <stem>.npy disparity (default WORK/disp, from depth.py predict)")
    add("--stereo", action="store_true", help="read DATA/disparity/*.png stereo disparity (Cityscapes, 0 invalid)")
    add("--intrinsics", nargs=4, type=finite_float, metavar=("FX", "FY", "CX", "CY"),
        help="normalized intrinsics (fx/W, fy/H, cx/W, cy/H); default: the frame's camera JSON (Cityscapes) or "
             f"calib_cam_to_cam.txt (KITTI), else (--images) the KITTI K {KITTI_INTRINSICS} (the released code's K)")
    add("--size", nargs=2, type=positive_int, default=[384, 768], metavar=("H", "W"),
        help="working and output size (paper: 384 x 768 Cityscapes, 384 x 1280 KITTI)")
    add("--method", default="depth", choices=["depth", "felzenszwalb", "gt"],
        help="proposals (Table 3): depth = ours; felzenszwalb = color only (stand-in for owt-ucm); gt = gtFine "
             "instances and classes split into connected regions")
    add("--segments", type=positive_int, default=SLIC_SEGMENTS, help="SLIC n_segments (paper and released: 10000 at "
        "384 x 768, about 30 pixels each; scale it with the pixel count, e.g. 2500 at 192 x 384)")
    add("--w-ocln", type=ranged(float, 0), default=W_OCLN, help="Eqn 3 weight of D_ocln (released 48)")
    add("--w-sup", type=ranged(float, 0), default=W_SUP, help="Eqn 3 weight of D_sup (released 0: the support term "
        "is off; the released alternative was 2.5 with --w-ocln 36)")
    add("--bias", type=finite_float, default=BIAS, help="Eqn 3 bias b (released -4)")
    add("--tau", type=unit_float, default=MERGE_TAU, help="merging threshold on W (released 0.2): a module with an "
        "edge W < tau to another stays open and is merged further")
    add("--preferred-modules", type=nonnegative_int, default=PREFERRED_MODULES, help="InfoMap "
        "--preferred-number-of-modules, 0 = off (default; released: 10, which caps the result at about 10 regions per "
        "image: see the docstring)")
    add("--seed", type=nonnegative_int, default=INFOMAP_SEED, help="seed of every random draw of the run: InfoMap's "
        "search and the preview colors (default 123: infomap's own default, which the released code kept)")
    add("--workers", type=nonnegative_int, default=0, help="worker processes (one image each); 0 = in the main process")
    add_shard_arg(p)
    add("--overwrite", action="store_true", help="redo images whose regions exist")
    add("--no-progress", action="store_true", help="no tqdm bar (the log lines stay)")
    add("--preview", action="store_true", help="also write WORK/regions/preview/<stem>.png (Fig 4d)")
    add("--eval", action="store_true", help="evaluate WORK/regions against DATA's gtFine of --split (covering, "
        "purity, regions per image) -> WORK/regions/eval.json")
    return p


def main(argv=None):
    return run_main(run, get_args_parser().parse_args(argv), "group.py")


if __name__ == "__main__":
    main()
