"""Stage 2: group pixels that are coherent in 3-D into regions, from an image, its disparity and intrinsics.

Paper: Zeng et al., BMVC 2022, Sec 3.2, Eqn 1-3, Fig 4. SLIC superpixels -> 4-connected region adjacency
graph -> per edge an occlusion distance (Eqn 1) and a support distance (Eqn 2) turned into a boundary
probability W (Eqn 3) -> InfoMap on link weights 1 / W -> iterative merging of the modules that still have a
weak boundary (W < tau) to a neighbour -> one int32 region id per pixel.

depth.py (WORK/disp) -> group.py -> copypaste.py (WORK/regions)

Reads / writes:
| file                                        | shape, dtype        | meaning                                    |
|---------------------------------------------|---------------------|--------------------------------------------|
| DATA/leftImg8bit/S/*/<stem>_leftImg8bit.png  | (H0, W0, 3) uint8   | images (or --images GLOB)                  |
| WORK/disp/<stem>.npy (or --disp-dir)         | (h, w) float32      | disparity in (0, 1] from `depth.py predict` |
| DATA/disparity/S/*/<stem>_disparity.png      | (H0, W0) uint16     | with --stereo: Cityscapes stereo disparity  |
| DATA/camera/S/*/<stem>_camera.json           | JSON                | intrinsics (else --intrinsics / KITTI K)   |
| DATA/gtFine/S/*/<stem>_gtFine_*Ids.png       | (H0, W0)            | --method gt and --eval                     |
| WORK/regions/<stem>.npy                      | (H, W) int32        | region ids 0..R-1, contiguous (output)      |
| WORK/regions/preview/<stem>.png              | (H, W, 3) uint8     | --preview: regions over the image (Fig 4d)  |
| WORK/regions/eval.json                       | JSON                | --eval: covering, purity, regions per image |

    python group.py --work runs/cityscapes --data CITYSCAPES --split train              # paper scale, 384 x 768
    python group.py --work /tmp/w --data /tmp/tiny --split val --stereo --size 64 128 --segments 300

Disparity: both sources are divided by their maximum over the image (scale-free, (0, 1]) and floored at
0.005 (the released code's floor), then depth z = 1 / disparity. Stereo disparity PNGs mark invalid pixels
(sky, occlusions) with 0; those get the floor, i.e. they are treated as the farthest plane, which is what the
floor does to the sky of a predicted disparity map too.

Deviations from the paper / released code, stated plainly:
- The principal point is applied in top-down rows (Y = z (cy H - row) / (fy H), up positive); the released
  code flips the rows but not cy (the same for cy = 0.5, the KITTI K it uses for every dataset).
- The dataset's own intrinsics are used when a camera JSON exists (released: the KITTI K everywhere).
- The adjacency is 4-connected (the released code's skimage RAG is 8-connected).
- Node ids are mapped to InfoMap modules explicitly (the released code relies on dict order), and the
  merging has a depth guard (--max-levels).
- InfoMap's preferred number of modules is off by default (released code: 10). With infomap 2.x the
  preference charges |K - 10| bits, so the first InfoMap run returns exactly 10 modules and the merging,
  which only merges, leaves at most 10 regions per image: on toy city val (ground-truth disparity, 192 x 384,
  2500 superpixels) that gives purity 0.77, covering 0.43, 9.5 regions; with the preference off, purity 0.92,
  covering 0.46, 79 regions. `--preferred-modules 10` restores the released setting.
- `--method felzenszwalb` (skimage, colour only) stands in for the paper's owt-ucm proposals (Table 3).
"""
import argparse
import glob
import json
import multiprocessing
import os
import sys
import time
import warnings

import infomap
import numpy as np
from PIL import Image
from skimage.measure import label as connected_components
from skimage.segmentation import felzenszwalb, find_boundaries, slic

from depth import (find_camera_json, image_stem, list_split_images, read_camera_json, read_disparity_png,
                   split_file)

# ----------------------------------------------------------------------------------------------------------
# Paper constants (Sec 3.2; values of the released code LeungTsang/CPCDR pixel_grouping where the paper has none)
# ----------------------------------------------------------------------------------------------------------
KITTI_INTRINSICS = (0.58, 1.92, 0.5, 0.5)  # normalised fx, fy, cx, cy (Monodepth2's KITTI K; released default)
DISPARITY_FLOOR = 0.005       # released code: disp[disp < 0.005] = 0.005 before z = 1 / disp
SLIC_SEGMENTS = 10000         # released code: slic(n_segments=10000, compactness=10, sigma=1) at 384 x 768
SLIC_COMPACTNESS = 10.0
SLIC_SIGMA = 1.0
SLIC_ITERATIONS = 10          # scikit-image's default max_num_iter (released code: default)
W_OCLN = 48.0                 # Eqn 3 weights of the released code (w_sup 0 switches Eqn 2 off)
W_SUP = 0.0
BIAS = -4.0
MERGE_TAU = 0.20              # iterative merging: a module with an edge W < tau to another module stays open
PREFERRED_MODULES = 0         # InfoMap --preferred-number-of-modules: off (released code: 10; see the docstring)
INFOMAP_SEED = 123            # infomap's own default seed (the released code left it at the default)
MAX_LEVELS = 20               # depth guard of the iterative merging (not in the released code)
FZ_SCALE, FZ_SIGMA, FZ_MIN_SIZE = 300.0, 0.8, 100  # felzenszwalb: about depth's region count on toy val, 192 x 384
EVAL_IGNORE_LABEL_IDS = (0, 1, 2, 3)  # Cityscapes unlabeled, ego vehicle, rectification border, out of roi


# ----------------------------------------------------------------------------------------------------------
# Pure functions, in pipeline order
# ----------------------------------------------------------------------------------------------------------
def scale_free_depth(disparity, floor=DISPARITY_FLOOR):
    """Scale-free depth z = 1 / d from disparity d (any positive scale; <= 0 marks invalid pixels).

    d is divided by its maximum (so d in (0, 1]) and floored at `floor`: invalid pixels (stereo's 0) and the
    sky become the farthest plane z = 1 / floor.
    """
    d = np.asarray(disparity, dtype=np.float32)
    peak = float(d.max()) if d.size else 0.0
    d = d / peak if peak > 0 else np.zeros_like(d)
    return 1.0 / np.maximum(d, np.float32(floor))


def back_project(depth, intrinsics, normalise_axes=True):
    """3-D point of every pixel, (3, H, W) float32: X right, Y up, Z forward (Sec 3.2).

    (X, Y, Z) = z K^-1 (col, row', 1) with rows counted upwards; K from normalised (fx, fy, cx, cy):
    X = z (col - cx W) / (fx W), Y = z (cy H - row) / (fy H), Z = z. So Y < 0 is below the principal row.
    normalise_axes: the released code divides each axis by its standard deviation over the image (no mean
    subtraction), which cancels fx and fy; the w_ocln = 48 of Eqn 3 was tuned with it on.
    """
    z = np.asarray(depth, dtype=np.float32)
    h, w = z.shape
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    cols = (np.arange(w, dtype=np.float32) - np.float32(cx * w)) / np.float32(fx * w)   # (W,)
    rows = (np.float32(cy * h) - np.arange(h, dtype=np.float32)) / np.float32(fy * h)   # (H,)
    points = np.empty((3, h, w), dtype=np.float32)
    np.multiply(z, cols[None, :], out=points[0])
    np.multiply(z, rows[:, None], out=points[1])
    points[2] = z
    if normalise_axes:
        std = points.reshape(3, -1).std(axis=1)
        points /= np.maximum(std, np.float32(1e-12))[:, None, None]
    return points


def point_gradients(points):
    """Finite-difference derivatives of the 3-D map along rows and columns, each divided by Z: (2, 3, H, W).

    [0] = d/drow / Z, [1] = d/dcol / Z (central differences, np.gradient); dividing by Z makes near and far
    surfaces weigh alike when averaged per superpixel (released code).
    """
    d_row, d_col = np.gradient(points, axis=(1, 2))
    inv_z = 1.0 / points[2]
    return np.stack([d_row * inv_z, d_col * inv_z])


def normals_from_gradients(d_row, d_col):
    """Unit normals n = cross(d/dcol, d/drow) / |.|, (..., 3). Level ground: n_y ~ +1; walls: n_y ~ 0."""
    n = np.cross(d_col, d_row)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def slic_superpixels(image, n_segments=SLIC_SEGMENTS, compactness=SLIC_COMPACTNESS, sigma=SLIC_SIGMA,
                     max_num_iter=SLIC_ITERATIONS):
    """SLIC superpixels (Lab) of an RGB image in [0, 1], (H, W) int32 labels contiguous from 0.

    start_label=0 matters: newer scikit-image starts at 1 by default, which silently breaks code that
    indexes per-superpixel arrays by label.
    """
    labels = slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma, max_num_iter=max_num_iter,
                  start_label=0, channel_axis=-1)
    return relabel_contiguous(labels)


def relabel_contiguous(labels):
    """Map the ids of an integer array onto 0..R-1 (keeping their order), int32."""
    labels = np.asarray(labels)
    flat = labels.ravel().astype(np.int64)
    low = int(flat.min()) if flat.size else 0
    present = np.bincount(flat - low) > 0
    if present.all():
        return (labels - low).astype(np.int32)
    lut = np.cumsum(present) - 1
    return lut[flat - low].reshape(labels.shape).astype(np.int32)


def region_adjacency(labels):
    """4-connected region adjacency graph of a label map: (E, 2) int64 edges (i < j), sorted, unique.

    Every pair of horizontally or vertically neighbouring pixels with different labels gives a pair; the pair
    (i, j) is encoded as one int64 key i * N + j and deduplicated with np.unique.
    """
    labels = np.asarray(labels)
    n = int(labels.max()) + 1 if labels.size else 0
    left, right, up, down = labels[:, :-1], labels[:, 1:], labels[:-1, :], labels[1:, :]
    horizontal, vertical = left != right, up != down
    a = np.concatenate([left[horizontal], up[vertical]]).astype(np.int64)
    b = np.concatenate([right[horizontal], down[vertical]]).astype(np.int64)
    keys = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return np.stack([keys // n, keys % n], axis=1)


def superpixel_means(labels, channels, num_labels=None):
    """Mean of each channel over each superpixel: labels (H, W), channels (C, H, W) -> (N, C) float64."""
    flat = np.asarray(labels).ravel()
    n = int(flat.max()) + 1 if num_labels is None else num_labels
    channels = np.asarray(channels).reshape(len(channels), -1)
    count = np.maximum(np.bincount(flat, minlength=n), 1)
    return np.stack([np.bincount(flat, weights=c, minlength=n) for c in channels], axis=1) / count[:, None]


# Eqn 1
def occlusion_distance(c1, c2):
    """D_ocln = ||c1 - c2|| / (z1 + z2): 3-D distance of two superpixel centres (N, 3), relative to depth."""
    # D_ocln = ||c1 - c2|| / (z1 + z2), z the centres' (normalised) Z
    return np.linalg.norm(c1 - c2, axis=-1) / (c1[..., 2] + c2[..., 2])


# Eqn 2
def support_distance(ny_lower, ny_upper, height):
    """D_sup = max(n_y1, 0) max(n_y1 - n_y2, 0) y^2 if y < 0 else 0 (S1 the lower superpixel).

    Large when a level surface (the ground, n_y1 ~ 1) below the principal row meets a steeper one above it:
    the support boundary of an object standing on the ground. The paper's y is y1 (the lower superpixel's
    height); the released code uses the pair's mean height (choose with `height`).
    """
    # D_sup = max(n_y1, 0) * max(n_y1 - n_y2, 0) * y1^2  if y1 < 0
    return np.maximum(ny_lower, 0) * np.maximum(ny_lower - ny_upper, 0) * np.where(height < 0, height ** 2, 0.0)


# Eqn 3
def boundary_probability(d_ocln, d_sup, w_ocln=W_OCLN, w_sup=W_SUP, bias=BIAS):
    """W = sigmoid(w_ocln D_ocln + w_sup D_sup + b): the probability that an edge is a region boundary."""
    # W = sigma(w_ocln * D_ocln + w_sup * D_sup + b)
    return 1.0 / (1.0 + np.exp(-(w_ocln * d_ocln + w_sup * d_sup + bias)))


def edge_weights(edges, centres, normals, w_ocln=W_OCLN, w_sup=W_SUP, bias=BIAS, support_height="lower"):
    """W of every edge (E,) from superpixel centres (N, 3) and normals (N, 3), Eqn 1-3.

    Each edge is oriented so that S1 is the lower superpixel (smaller Y). support_height: "lower" uses y1
    (the paper), "mean" the pair's mean height (released code).
    """
    i, j = edges[:, 0], edges[:, 1]
    swap = centres[j, 1] < centres[i, 1]
    s1, s2 = np.where(swap, j, i), np.where(swap, i, j)
    d_ocln = occlusion_distance(centres[s1], centres[s2])
    if w_sup != 0:
        height = centres[s1, 1] if support_height == "lower" else 0.5 * (centres[s1, 1] + centres[s2, 1])
        d_sup = support_distance(normals[s1, 1], normals[s2, 1], height)
    else:
        d_sup = np.zeros_like(d_ocln)
    return boundary_probability(d_ocln, d_sup, w_ocln, w_sup, bias)


def infomap_modules(num_nodes, edges, link_weights, seed=INFOMAP_SEED, preferred_modules=PREFERRED_MODULES):
    """Two-level InfoMap on an undirected weighted graph: (num_nodes,) int64 module ids, contiguous from 0.

    No teleportation, seeded, one trial; preferred_modules > 0 sets --preferred-number-of-modules (released
    code: 10). Module ids are read per node id explicitly (the released code assumed the returned dict to be
    in node order).
    """
    if len(edges) == 0:
        return np.arange(num_nodes, dtype=np.int64)
    options = infomap.Options(two_level=True, flow_model="undirected", teleportation_probability=0.0,
                              preferred_number_of_modules=preferred_modules or None, seed=int(seed),
                              num_trials=1, silent=True)
    im = infomap.Infomap(args=options.to_args())
    im.add_links(np.column_stack([edges, link_weights]).astype(np.float64))
    result = im.run()
    try:
        # infomap 2.16: Infomap.get_modules reads the C++ map directly, about 0.05 s faster on a 10000-node
        # graph than Result.modules(), which first builds a per-node snapshot in Python (same dict)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modules = im.get_modules()
    except AttributeError:                       # infomap >= 3 drops it
        modules = result.modules()
    node = np.fromiter(modules.keys(), dtype=np.int64, count=len(modules))
    module = np.fromiter(modules.values(), dtype=np.int64, count=len(modules))
    out = np.full(num_nodes, -1, dtype=np.int64)
    out[node] = module
    isolated = out < 0                            # nodes without links: a module each
    out[isolated] = module.max() + 1 + np.arange(int(isolated.sum()))
    return relabel_contiguous(out).astype(np.int64)


def merge_modules(edges, weights, modules, tau=MERGE_TAU):
    """One merging step: which modules stay open, and the graph of the open modules.

    A module is open if one of its edges to another module has W < tau; closed modules are final. The next
    graph has the open modules as nodes (numbered in module order), an edge between two open modules that
    touch, with W the arithmetic mean of the W's between them (released code).
    Returns (open (K,) bool, next_node_of_module (K,) int64, -1 for closed, next_edges (E', 2), next_W (E',)).
    """
    k = int(modules.max()) + 1
    a, b = modules[edges[:, 0]], modules[edges[:, 1]]
    between = a != b
    weak = between & (weights < tau)
    is_open = np.zeros(k, dtype=bool)
    is_open[a[weak]] = True
    is_open[b[weak]] = True
    next_id = np.where(is_open, np.cumsum(is_open) - 1, -1)
    keep = between & is_open[a] & is_open[b]
    na, nb = next_id[a[keep]], next_id[b[keep]]
    n_next = int(is_open.sum())
    keys, inverse = np.unique(np.minimum(na, nb) * n_next + np.maximum(na, nb), return_inverse=True)
    mean_w = np.bincount(inverse, weights=weights[keep], minlength=len(keys)) / np.bincount(inverse,
                                                                                         minlength=len(keys))
    next_edges = np.stack([keys // max(n_next, 1), keys % max(n_next, 1)], axis=1)
    return is_open, next_id, next_edges, mean_w


def iterative_infomap(num_nodes, edges, weights, tau=MERGE_TAU, seed=INFOMAP_SEED,
                      preferred_modules=PREFERRED_MODULES, max_levels=MAX_LEVELS, timings=None):
    """Iterative merging (Sec 3.2): region id of every node, (num_nodes,) int64, contiguous from 0.

    1. InfoMap on the current graph with link weights 1 / W; 2. modules with an edge W < tau to another
    module are open, the others closed (final); 3. stop if none is open; 4. else the open modules form the
    next graph (merge_modules); 5. repeat. Final ids: closed modules first, level by level, contiguous.
    The depth guard: after max_levels levels, or when InfoMap no longer merges anything, the open modules
    become final as they are.
    """
    region = np.full(num_nodes, -1, dtype=np.int64)
    current = np.arange(num_nodes, dtype=np.int64)      # node of the current graph of each original node
    n_current, next_region = num_nodes, 0
    for level in range(max_levels):
        start = time.perf_counter()
        modules = infomap_modules(n_current, edges, 1.0 / weights, seed, preferred_modules)
        mid = time.perf_counter()
        is_open, next_id, edges, weights = merge_modules(edges, weights, modules, tau)
        stuck = int(modules.max()) + 1 == n_current          # InfoMap merged nothing: more levels change nothing
        last = level == max_levels - 1 or stuck or not is_open.any()
        final = np.ones_like(is_open) if last else ~is_open
        # closed modules get the next ids, in module order
        final_id = np.where(final, np.cumsum(final) - 1 + next_region, -1)
        next_region += int(final.sum())
        alive = current >= 0
        module_of_node = np.full(num_nodes, -1, dtype=np.int64)
        module_of_node[alive] = modules[current[alive]]
        done = alive & final[np.maximum(module_of_node, 0)]
        region[done] = final_id[module_of_node[done]]
        current = np.where(alive & ~done, next_id[np.maximum(module_of_node, 0)], -1)
        n_current = int(is_open.sum())
        if timings is not None:
            timings["infomap"] = timings.get("infomap", 0.0) + mid - start
            timings["merging"] = timings.get("merging", 0.0) + time.perf_counter() - mid
        if last:
            break
    return region


def group_depth(image, disparity, intrinsics, n_segments=SLIC_SEGMENTS, compactness=SLIC_COMPACTNESS,
                sigma=SLIC_SIGMA, slic_iterations=SLIC_ITERATIONS, normalise_axes=True, w_ocln=W_OCLN,
                w_sup=W_SUP, bias=BIAS, support_height="lower", tau=MERGE_TAU, preferred_modules=PREFERRED_MODULES,
                max_levels=MAX_LEVELS, seed=INFOMAP_SEED, floor=DISPARITY_FLOOR, timings=None):
    """Coherent depth regions (Sec 3.2): image (H, W, 3) in [0, 1], disparity (H, W), normalised intrinsics
    -> (H, W) int32 region ids, contiguous from 0. `timings` (a dict) accumulates seconds per phase."""
    t0 = time.perf_counter()
    labels = slic_superpixels(image, n_segments, compactness, sigma, slic_iterations)
    t1 = time.perf_counter()
    n = int(labels.max()) + 1
    points = back_project(scale_free_depth(disparity, floor), intrinsics, normalise_axes)
    edges = region_adjacency(labels)
    if w_sup != 0:   # the normals only enter Eqn 2
        grads = point_gradients(points).reshape(6, *labels.shape)
        stats = superpixel_means(labels, np.concatenate([points, grads]), n)
        centres, mean_grads = stats[:, :3], stats[:, 3:].reshape(n, 2, 3)
        normals = normals_from_gradients(mean_grads[:, 0], mean_grads[:, 1])
    else:
        centres, normals = superpixel_means(labels, points, n), None
    weights = edge_weights(edges, centres, normals, w_ocln, w_sup, bias, support_height)
    t2 = time.perf_counter()
    if timings is not None:
        timings["slic"] = timings.get("slic", 0.0) + t1 - t0
        timings["graph"] = timings.get("graph", 0.0) + t2 - t1
    node_region = iterative_infomap(n, edges, weights, tau, seed, preferred_modules, max_levels, timings)
    return node_region[labels].astype(np.int32)


def group_felzenszwalb(image, scale=FZ_SCALE, sigma=FZ_SIGMA, min_size=FZ_MIN_SIZE):
    """Colour-only proposals (Felzenszwalb-Huttenlocher graph segmentation; stands in for owt-ucm, Table 3)."""
    return relabel_contiguous(felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1))


def connected_regions(ids):
    """Split an id map into 4-connected regions of equal id: (H, W) int32, contiguous from 0."""
    ids = relabel_contiguous(ids)
    return (connected_components(ids + 1, background=0, connectivity=1) - 1).astype(np.int32)


def segment_scores(regions, segments, valid=None):
    """Compare regions with ground-truth segments over the valid pixels.

    covering: sum over segments S of |S| max_R IoU(R, S) / N (how well the regions cover the ground truth);
    purity: sum over regions R of max_S |R n S| / N (the fraction of pixels in their region's majority
    segment); regions: the number of regions with a valid pixel.
    """
    r = np.asarray(regions).ravel().astype(np.int64)
    s = np.asarray(segments).ravel().astype(np.int64)
    if valid is not None:
        keep = np.asarray(valid).ravel()
        r, s = r[keep], s[keep]
    total = r.size
    if total == 0:
        return {"covering": float("nan"), "purity": float("nan"), "regions": 0}
    _, r = np.unique(r, return_inverse=True)
    _, s = np.unique(s, return_inverse=True)
    n_s = int(s.max()) + 1
    keys, inter = np.unique(r * n_s + s, return_counts=True)
    pr, ps = keys // n_s, keys % n_s
    size_r, size_s = np.bincount(r), np.bincount(s)
    best_in_region = np.zeros(len(size_r))
    np.maximum.at(best_in_region, pr, inter)
    iou = inter / (size_r[pr] + size_s[ps] - inter)
    best_iou = np.zeros(n_s)
    np.maximum.at(best_iou, ps, iou)
    return {"covering": float((size_s * best_iou).sum() / total), "purity": float(best_in_region.sum() / total),
            "regions": int(len(size_r))}


def preview_image(image, regions, seed=0):
    """Regions coloured over the image with their boundaries (Fig 4d): (H, W, 3) uint8."""
    colours = np.random.default_rng(seed).random((int(regions.max()) + 1, 3))
    out = 0.5 * colours[regions] + 0.5 * image
    out[find_boundaries(regions, mode="inner")] = (1.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Input / output
# ----------------------------------------------------------------------------------------------------------
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
    array = np.asarray(array, dtype=np.float32)
    if array.shape == tuple(size):
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))


def resize_nearest(array, size):
    """Nearest-neighbour resize of an integer (h, w) map to size (H, W)."""
    array = np.asarray(array)
    if array.shape == tuple(size):
        return array
    rows = ((np.arange(size[0]) + 0.5) * array.shape[0] / size[0]).astype(np.int64)   # pixel centres
    cols = ((np.arange(size[1]) + 0.5) * array.shape[1] / size[1]).astype(np.int64)
    return array[rows[:, None], cols[None, :]]


def check_aspect(image_size, other_size, what, path, tolerance=0.02):
    """Raise a clear error when two maps of one frame have different aspect ratios."""
    a = image_size[1] / image_size[0]
    b = other_size[1] / other_size[0]
    if abs(a / b - 1.0) > tolerance:
        raise ValueError(f"{path}: {what} is {other_size[0]} x {other_size[1]} (aspect {b:.3f}) but the image is "
                         f"{image_size[0]} x {image_size[1]} (aspect {a:.3f}); they must show the same field of "
                         "view (was the disparity predicted on a cropped image?)")


def read_label_png(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im).astype(np.int64)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the ground truth ({e}); --method gt and --eval need gtFine "
                                "labelIds / instanceIds (the toy city writes them)")


def read_gt_segments(data, split, stem):
    """Ground-truth ids at their native resolution, int64 (H0, W0): instanceIds (labelIds where absent; the
    callers split them into connected regions), and the valid mask (labelIds not in EVAL_IGNORE_LABEL_IDS)."""
    label_path = split_file(data, "gtFine", split, stem, "gtFine_labelIds.png")
    instance_path = split_file(data, "gtFine", split, stem, "gtFine_instanceIds.png")
    label_ids = read_label_png(label_path)
    ids = read_label_png(instance_path) if os.path.exists(instance_path) else label_ids
    return ids, ~np.isin(label_ids, EVAL_IGNORE_LABEL_IDS)


def save_npy_atomic(path, array):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def save_png_atomic(path, array):
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def list_items(args):
    """[(stem, image path)] of the run, sorted, this shard's share."""
    if args.images:
        paths = sorted(glob.glob(args.images))
        if not paths:
            raise FileNotFoundError(f"--images {args.images}: no file matches")
    else:
        paths = list_split_images(args.data, args.split)
    items = [(image_stem(p), p) for p in paths]
    shard, shards = args.shard
    return items[shard::shards]


def intrinsics_of(args, stem, native):
    """Normalised (fx, fy, cx, cy): --intrinsics, else the frame's camera JSON, else the KITTI K."""
    if args.intrinsics:
        return np.array(args.intrinsics, dtype=np.float64)
    if args.data and not args.images:
        try:
            return read_camera_json(find_camera_json(args.data, args.split, stem), image_size=native)
        except FileNotFoundError:
            pass
    return np.array(KITTI_INTRINSICS, dtype=np.float64)


def load_disparity(args, stem, native, size):
    """Disparity of a frame at the working size (float32 (H, W), any positive scale, <= 0 invalid)."""
    if args.stereo:
        path = split_file(args.data, "disparity", args.split, stem, "disparity.png")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no stereo disparity (--stereo reads DATA/disparity/SPLIT/CITY/"
                                    "<stem>_disparity.png)")
        disparity = read_disparity_png(path)
        check_aspect(native, disparity.shape, "the stereo disparity", path)
        # divide by the maximum and fill invalid (0) pixels with the floor before resizing, so that
        # bilinear resizing never blends valid disparity with the invalid 0
        disparity = 1.0 / scale_free_depth(disparity, args.floor)
        return resize_float(disparity, size)
    disp_dir = args.disp_dir or os.path.join(args.work, "disp")
    path = os.path.join(disp_dir, f"{stem}.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no disparity for {stem}; make it with `python depth.py predict --work "
                                "WORK ...` (or pass --disp-dir DIR, or --stereo for Cityscapes stereo disparity)")
    disparity = np.load(path)
    if disparity.ndim != 2 or not np.issubdtype(disparity.dtype, np.floating):
        raise ValueError(f"{path}: expected a float (H, W) disparity from `depth.py predict`, got "
                         f"{disparity.dtype} {disparity.shape}")
    check_aspect(native, disparity.shape, "the disparity", path)
    return resize_float(disparity, size)


def process_one(item, args):
    """Group one image and write its regions (and preview). Returns (stem, number of regions, timings)."""
    stem, image_path = item
    out_path = os.path.join(args.work, "regions", f"{stem}.npy")
    timings = {}
    t0 = time.perf_counter()
    size = tuple(args.size)
    image, native = load_image(image_path, size)
    if args.method == "depth":
        disparity = load_disparity(args, stem, native, size)
        intrinsics = intrinsics_of(args, stem, native)
        timings["io"] = time.perf_counter() - t0
        regions = group_depth(image, disparity, intrinsics, args.segments, args.compactness, args.sigma,
                              args.slic_iterations, not args.no_axis_norm, args.w_ocln, args.w_sup, args.bias,
                              args.support_height, args.tau, args.preferred_modules, args.max_levels, args.seed,
                              args.floor, timings)
    elif args.method == "felzenszwalb":
        timings["io"] = time.perf_counter() - t0
        t = time.perf_counter()
        regions = group_felzenszwalb(image, args.fz_scale, args.fz_sigma, args.fz_min_size)
        timings["segment"] = time.perf_counter() - t
    else:  # gt
        ids, _ = read_gt_segments(args.data, args.split, stem)
        check_aspect(native, ids.shape, "the ground truth", image_path)
        timings["io"] = time.perf_counter() - t0
        t = time.perf_counter()
        regions = connected_regions(resize_nearest(ids, size))
        timings["segment"] = time.perf_counter() - t
    t = time.perf_counter()
    save_npy_atomic(out_path, regions.astype(np.int32))
    if args.preview:
        save_png_atomic(os.path.join(args.work, "regions", "preview", f"{stem}.png"),
                        preview_image(image, regions, args.seed))
    timings["io"] += time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return stem, int(regions.max()) + 1, timings


def _worker(job):
    item, args = job
    return process_one(item, args)


def evaluate_regions(args):
    """Covering, purity and regions per image of WORK/regions against the split's gtFine segments."""
    paths = list_split_images(args.data, args.split)
    per_image = []
    for path in paths:
        stem = image_stem(path)
        region_path = os.path.join(args.work, "regions", f"{stem}.npy")
        if not os.path.exists(region_path):
            raise FileNotFoundError(f"{region_path}: no regions; run `python group.py --work {args.work} --data "
                                    f"{args.data} --split {args.split}` first")
        regions = np.load(region_path)
        ids, valid = read_gt_segments(args.data, args.split, stem)
        check_aspect(ids.shape, regions.shape, "the regions", region_path)
        scores = segment_scores(resize_nearest(regions, ids.shape), connected_regions(ids), valid)
        per_image.append({"stem": stem, **scores})
    summary = {"split": args.split, "images": len(per_image),
               "covering": float(np.mean([p["covering"] for p in per_image])),
               "purity": float(np.mean([p["purity"] for p in per_image])),
               "regions_per_image": float(np.mean([p["regions"] for p in per_image])),
               "per_image": per_image}
    out = os.path.join(args.work, "regions", "eval.json")
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, out)
    print(f"[group eval] {args.split}: {len(per_image)} images, covering {summary['covering']:.4f}, "
          f"purity {summary['purity']:.4f}, regions/image {summary['regions_per_image']:.1f} -> {out}")
    return summary


def run(args):
    print("[group] " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    if args.eval:
        if not args.data:
            raise SystemExit("group.py --eval needs --data DATA --split S (Cityscapes-style gtFine)")
        return evaluate_regions(args)
    if not args.data and not args.images:
        raise SystemExit("group.py: give --data DATA --split S or --images GLOB")
    if (args.stereo or args.method == "gt") and not args.data:
        raise SystemExit("group.py: --stereo and --method gt read DATA (give --data DATA --split S)")
    os.makedirs(os.path.join(args.work, "regions"), exist_ok=True)
    if args.preview:
        os.makedirs(os.path.join(args.work, "regions", "preview"), exist_ok=True)
    items = list_items(args)
    if items and args.method == "depth" and not args.intrinsics:
        stem, path = items[0]
        try:
            source = find_camera_json(args.data, args.split, stem) if args.data and not args.images else None
        except FileNotFoundError:
            source = None
        print(f"[group] intrinsics: {source or f'no camera JSON, the KITTI K {KITTI_INTRINSICS}'}", flush=True)
    todo = [it for it in items
            if args.overwrite or not os.path.exists(os.path.join(args.work, "regions", f"{it[0]}.npy"))]
    print(f"[group] {len(items)} images in this shard, {len(items) - len(todo)} done, {len(todo)} to do "
          f"(method {args.method}, size {args.size[0]} x {args.size[1]})", flush=True)
    from tqdm import tqdm
    if args.workers > 1 and len(todo) > 1:
        pool = multiprocessing.get_context("fork").Pool(args.workers)
        results = pool.imap_unordered(_worker, [(it, args) for it in todo])
    else:
        pool, results = None, (process_one(it, args) for it in todo)
    totals, counts = {}, []
    try:
        for stem, count, timings in tqdm(results, total=len(todo), disable=not todo, file=sys.stdout):
            counts.append(count)
            for k, v in timings.items():
                totals[k] = totals.get(k, 0.0) + v
            if args.profile:
                print(f"[group profile] {stem}: {count} regions, "
                      + ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()), flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if counts:
        print(f"[group] wrote {len(counts)} region maps to {os.path.join(args.work, 'regions')}, "
              f"{np.mean(counts):.1f} regions per image; mean seconds per image: "
              + ", ".join(f"{k} {v / len(counts):.3f}" for k, v in totals.items()), flush=True)


def parse_shard(text):
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text}: expected i/n, e.g. 0/4")
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="work folder: reads WORK/disp, writes WORK/regions")
    p.add_argument("--data", help="Cityscapes-layout root (images, camera JSON, stereo disparity, gtFine)")
    p.add_argument("--split", default="train", help="split of --data (train, val, ...)")
    p.add_argument("--images", help="glob of images instead of --data/--split (stem = file name)")
    p.add_argument("--disp-dir", help="folder of <stem>.npy disparity (default WORK/disp, from depth.py predict)")
    p.add_argument("--stereo", action="store_true",
                   help="use DATA/disparity/*.png stereo disparity (Cityscapes encoding, 0 invalid) instead")
    p.add_argument("--intrinsics", nargs=4, type=float, metavar=("FX", "FY", "CX", "CY"),
                   help="normalised intrinsics (fx/W, fy/H, cx/W, cy/H); default: the camera JSON of --data, "
                        f"else the KITTI K {KITTI_INTRINSICS} (the released code's K for every dataset)")
    p.add_argument("--size", nargs=2, type=int, default=[384, 768], metavar=("H", "W"),
                   help="working and output size (paper: 384 x 768 Cityscapes, 384 x 1280 KITTI)")
    p.add_argument("--method", default="depth", choices=["depth", "felzenszwalb", "gt"],
                   help="proposals (Table 3): depth = ours; felzenszwalb = colour only (stand-in for owt-ucm); "
                        "gt = gtFine instances and classes split into connected regions")
    p.add_argument("--segments", type=int, default=SLIC_SEGMENTS,
                   help="SLIC n_segments (paper 10000 at 384 x 768, about 30 pixels each; scale it with the "
                        "pixel count, e.g. 2500 at 192 x 384)")
    p.add_argument("--compactness", type=float, default=SLIC_COMPACTNESS, help="SLIC compactness (released 10)")
    p.add_argument("--sigma", type=float, default=SLIC_SIGMA, help="SLIC Gaussian pre-smoothing (released 1)")
    p.add_argument("--slic-iterations", type=int, default=SLIC_ITERATIONS,
                   help="SLIC k-means iterations (skimage default 10; fewer is a speed ablation)")
    p.add_argument("--no-axis-norm", action="store_true",
                   help="ablation: do not divide each 3-D axis by its standard deviation (released code does)")
    p.add_argument("--w-ocln", type=float, default=W_OCLN, help="Eqn 3 weight of D_ocln (released 48)")
    p.add_argument("--w-sup", type=float, default=W_SUP,
                   help="Eqn 3 weight of D_sup (released 0: support term off; its alternative was 2.5 with "
                        "w_ocln 36)")
    p.add_argument("--bias", type=float, default=BIAS, help="Eqn 3 bias b (released -4)")
    p.add_argument("--support-height", default="lower", choices=["lower", "mean"],
                   help="height y in Eqn 2: the lower superpixel's (paper) or the pair's mean (released code)")
    p.add_argument("--tau", type=float, default=MERGE_TAU, help="merging threshold on W (released 0.2)")
    p.add_argument("--preferred-modules", type=int, default=PREFERRED_MODULES,
                   help="InfoMap --preferred-number-of-modules, 0 = off (default; released code: 10, which caps "
                        "the result at about 10 regions per image with infomap 2.x: see the docstring)")
    p.add_argument("--max-levels", type=int, default=MAX_LEVELS, help="depth guard of the iterative merging")
    p.add_argument("--floor", type=float, default=DISPARITY_FLOOR,
                   help="disparity floor after normalising to (0, 1] (released 0.005); invalid stereo pixels "
                        "get it too")
    p.add_argument("--fz-scale", type=float, default=FZ_SCALE, help="felzenszwalb scale (higher: fewer regions)")
    p.add_argument("--fz-sigma", type=float, default=FZ_SIGMA, help="felzenszwalb Gaussian pre-smoothing")
    p.add_argument("--fz-min-size", type=int, default=FZ_MIN_SIZE, help="felzenszwalb minimum region size (px)")
    p.add_argument("--seed", type=int, default=INFOMAP_SEED, help="InfoMap seed, >= 1 (and preview colours)")
    p.add_argument("--workers", type=int, default=1, help="processes (each single-threaded)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="i/n",
                   help="process every n-th image starting at i (split the work across machines)")
    p.add_argument("--overwrite", action="store_true", help="redo images whose regions exist")
    p.add_argument("--preview", action="store_true", help="also write WORK/regions/preview/<stem>.png (Fig 4d)")
    p.add_argument("--profile", action="store_true", help="print seconds per phase (io, slic, graph, infomap, "
                                                          "merging) for every image")
    p.add_argument("--eval", action="store_true",
                   help="evaluate WORK/regions against DATA's gtFine of --split (covering, purity, regions per "
                        "image) -> WORK/regions/eval.json")
    return p


def main():
    run(get_args_parser().parse_args())


if __name__ == "__main__":
    main()
