"""The test suite: `python -m pytest test_all.py` (a few minutes on 2 CPU cores).

Sections follow the pipeline: toy city and readers, depth, group, copypaste, swav_dense, cluster, finetune,
hygiene. Stage tests run the real command lines on a tiny toy city rendered once per session.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(size=(64, 128), train_sequences=2, val_sequences=2, frames=4, seed=0)


def run_cli(*args, timeout=600):
    """Run `python <args>` in the repository root; fail the test with its output on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory):
    """A toy city of 2 + 2 sequences of 4 frames at 64 x 128, rendered once (a few seconds)."""
    import toycity
    root = tmp_path_factory.mktemp("toycity")
    toycity.render_dataset(str(root), **TINY)
    return str(root)


# ==========================================================================================================
# toycity.py and the readers
# ==========================================================================================================

CITYSCAPES_LABEL_IDS = set(range(-1, 34))  # official labelIds (-1 is license plate)


def toy_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_toycity_cityscapes_layout(tiny_city):
    files = toy_files(tiny_city)
    frames, sequences = TINY["frames"], TINY["train_sequences"] + TINY["val_sequences"]
    key = TINY["frames"] // 2  # annotated frame of a short sequence
    assert len([f for f in files if f.startswith("leftImg8bit_sequence/")]) == frames * sequences
    assert len([f for f in files if f.startswith("disparity/")]) == frames * sequences
    assert "leftImg8bit_sequence/train/toycity/toycity_000001_000003_leftImg8bit.png" in files
    assert f"leftImg8bit/val/toycity/toycity_000500_{key:06d}_leftImg8bit.png" in files
    for suffix in ("gtFine_labelIds.png", "gtFine_instanceIds.png"):
        assert f"gtFine/train/toycity/toycity_000000_{key:06d}_{suffix}" in files
    assert f"camera/train/toycity/toycity_000000_{key:06d}_camera.json" in files
    assert "disparity/val/toycity/toycity_000501_000000_disparity.png" in files
    assert "pose/train/toycity/toycity_000000_000000_pose.json" in files


def test_toycity_readers_list_and_parse(tiny_city):
    import depth
    images = depth.list_split_images(tiny_city, "train")
    assert [depth.image_stem(p) for p in images] == ["toycity_000000_000002", "toycity_000001_000002"]
    assert depth.parse_stem("aachen_000000_000019") == ("aachen", 0, 19)
    sequences = depth.list_split_sequences(tiny_city, "val")
    assert sorted(sequences) == [("toycity", 500), ("toycity", 501)]
    assert [depth.parse_stem(depth.image_stem(p))[2] for p in sequences[("toycity", 500)]] == [0, 1, 2, 3]
    camera = depth.find_camera_json(tiny_city, "val", "toycity_000500_000003")  # a non-annotated frame
    fx, fy, cx, cy = depth.read_camera_json(camera, image_size=TINY["size"])
    assert fx == pytest.approx(0.55) and fy == pytest.approx(0.55 * 128 / 64) and (cx, cy) == (0.5, 0.5)
    with pytest.raises(FileNotFoundError, match="camera"):
        depth.find_camera_json(tiny_city, "val", "toycity_000777_000003")


def test_toycity_labels_and_instances(tiny_city):
    import glob
    from PIL import Image
    for path in glob.glob(os.path.join(tiny_city, "gtFine", "*", "toycity", "*_labelIds.png")):
        labels = np.asarray(Image.open(path))
        instances = np.asarray(Image.open(path.replace("labelIds", "instanceIds"))).astype(np.int64)
        assert labels.dtype == np.uint8 and labels.shape == instances.shape == TINY["size"]
        assert set(np.unique(labels)) <= CITYSCAPES_LABEL_IDS
        thing = np.isin(labels, [24, 26])
        assert (instances[thing] // 1000 == labels[thing]).all()  # labelId * 1000 + k
        assert (instances[~thing] == labels[~thing]).all()       # stuff: the labelId itself


def test_toycity_every_class_appears_at_default_size():
    import toycity
    seen = set()
    for seq in range(3):
        rng = np.random.default_rng([0, seq])
        poses = toycity.camera_path(rng, 30)
        scene = toycity.make_scene(rng, -15.0, poses[-1, 2, 3] + toycity.VIEW_AHEAD)
        for frame in (0, 19):
            seen |= set(np.unique(toycity.render_frame(scene, poses[frame], frame, 192, 384)[2]).tolist())
    assert set(toycity.LABEL_IDS.values()) <= seen


def test_toycity_disparity_png_round_trip(tiny_city, tmp_path):
    import depth
    from PIL import Image
    depth_m = np.random.default_rng(0).uniform(1.0, 100.0, (32, 32))
    fx, baseline = 211.2, 0.209313
    path = str(tmp_path / "d_disparity.png")
    Image.fromarray(depth.encode_disparity_png(baseline * fx / depth_m)).save(path)
    back = baseline * fx / depth.read_disparity_png(path)
    assert np.abs(back / depth_m - 1).max() < 0.01
    sky = depth.read_disparity_png(os.path.join(tiny_city, "disparity/train/toycity/toycity_000000_000000_disparity.png"))
    assert (sky == 0).any() and (sky > 0).mean() > 0.5  # sky is invalid, the rest valid


def warp_nearest(depth_t, pose_t, pose_s, K):
    """Pixel coordinates (rows, cols) in frame s of every pixel of frame t, from t's depth and both poses."""
    h, w = depth_t.shape
    rows, cols = np.mgrid[0:h, 0:w] + 0.5
    cam = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones((h, w))], -1) * depth_t[..., None]
    rel = np.linalg.inv(pose_s) @ pose_t
    cam_s = cam @ rel[:3, :3].T + rel[:3, 3]
    u = cam_s[..., 0] / cam_s[..., 2] * K[0, 0] + K[0, 2]
    v = cam_s[..., 1] / cam_s[..., 2] * K[1, 1] + K[1, 2]
    return np.floor(v).astype(int), np.floor(u).astype(int), cam_s[..., 2]


def test_toycity_static_surfaces_move_with_the_camera():
    import toycity
    h, w = 96, 192
    K = toycity.intrinsics(h, w)
    rng = np.random.default_rng([3, 1])
    poses = toycity.camera_path(rng, 3)
    scene = toycity.make_scene(rng, -15.0, poses[-1, 2, 3] + toycity.VIEW_AHEAD)
    _, depth_t, labels_t, inst_t = toycity.render_frame(scene, poses[0], 0, h, w)
    _, depth_s, labels_s, inst_s = toycity.render_frame(scene, poses[1], 1, h, w)
    static = np.isfinite(depth_t) & ~np.isin(labels_t, [24, 26])
    r, c, z = warp_nearest(np.where(static, depth_t, 1.0), poses[0], poses[1], K)
    inside = static & (r >= 0) & (r < h) & (c >= 0) & (c < w) & (z > 0)
    rs, cs = r[inside], c[inside]
    visible = z[inside] <= depth_s[rs, cs] * 1.02 + 0.05  # not hidden behind something nearer in frame s
    same_label = labels_s[rs, cs] == labels_t[inside]
    same_instance = inst_s[rs, cs] == inst_t[inside]
    assert inside.sum() > 0.5 * h * w and visible.mean() > 0.9
    assert same_label[visible].mean() > 0.97 and same_instance[visible].mean() > 0.97


def test_toycity_files_warp_consistently(tiny_city):
    """Frame t+1 sampled at the positions given by t's disparity PNG and the pose JSONs reproduces frame t."""
    import json
    import depth
    from PIL import Image
    split, stem_t, stem_s = "train", "toycity_000000_000002", "toycity_000000_000003"
    load = lambda folder, stem, suffix: os.path.join(tiny_city, folder, split, "toycity", f"{stem}_{suffix}")  # noqa: E731
    image_t = np.asarray(Image.open(load("leftImg8bit_sequence", stem_t, "leftImg8bit.png")), np.float32)
    image_s = np.asarray(Image.open(load("leftImg8bit_sequence", stem_s, "leftImg8bit.png")), np.float32)
    labels_t = np.asarray(Image.open(load("gtFine", stem_t, "gtFine_labelIds.png")))
    camera = load("camera", stem_t, "camera.json")
    fx, fy, cx, cy = depth.read_camera_json(camera, image_size=TINY["size"])
    h, w = TINY["size"]
    K = np.array([[fx * w, 0, cx * w], [0, fy * h, cy * h], [0, 0, 1]])
    disp = depth.read_disparity_png(load("disparity", stem_t, "disparity.png"))
    depth_t = depth.read_camera_baseline(camera) * K[0, 0] / np.maximum(disp, 1e-6)
    pose = lambda stem: np.array(json.load(open(load("pose", stem, "pose.json")))["camera_to_world"])  # noqa: E731

    def error(scale):
        r, c, _ = warp_nearest(depth_t * scale, pose(stem_t), pose(stem_s), K)
        ok = (disp > 0) & ~np.isin(labels_t, [24, 26]) & (r >= 0) & (r < h) & (c >= 0) & (c < w)
        return np.abs(image_s[r[ok], c[ok]] - image_t[ok]).mean()

    assert error(1.0) < 0.5 * error(0.5) and error(1.0) < 12.0


def test_toycity_same_seed_same_files(tiny_city, tmp_path):
    import toycity
    again = toycity.render_dataset(str(tmp_path / "again"), **TINY)
    files = toy_files(tiny_city)
    assert files == toy_files(again)
    for f in files:
        with open(os.path.join(tiny_city, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f

# ==========================================================================================================
# depth.py
# ==========================================================================================================

# ==========================================================================================================
# group.py
# ==========================================================================================================

# ==========================================================================================================
# copypaste.py
# ==========================================================================================================

# ==========================================================================================================
# swav_dense.py
# ==========================================================================================================

# ==========================================================================================================
# cluster.py
# ==========================================================================================================

# ==========================================================================================================
# finetune.py
# ==========================================================================================================

# ==========================================================================================================
# hygiene
# ==========================================================================================================
