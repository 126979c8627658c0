"""Stage 1: self-supervised monocular depth from video (Monodepth2 recipe). [DOCSTRING TO BE COMPLETED]

Also home of the dataset readers (Cityscapes layout, KITTI) that later stages import.
"""
import glob
import json
import os
import re

import numpy as np
from PIL import Image

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
