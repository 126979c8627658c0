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
# Whole presets and multi-process runs take one to five minutes each on 2 cores: `RUN_SLOW=1 python -m pytest
# test_all.py` adds them; the default run keeps one of each kind (swav's two-process run, the KITTI preset).
slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow: RUN_SLOW=1 runs it")


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
    frames = depth.list_frames(tiny_city, split="train")
    assert [f.stem for f in frames] == ["toycity_000000_000002", "toycity_000001_000002"]
    assert [depth.image_stem(f.path) for f in frames] == [f.stem for f in frames]
    assert depth.parse_stem("aachen_000000_000019") == ("aachen", 0, 19)
    video = depth.list_frames(tiny_city, split="val", sequence=True)
    assert sorted({f.video for f in video}) == [("toycity", 500), ("toycity", 501)]
    assert [f.number for f in video if f.video == ("toycity", 500)] == [0, 1, 2, 3]
    assert [f.stem for f in depth.list_frames(tiny_city, split="val", sequence=True, limit=3)] == \
        [f.stem for f in video[:3]]
    camera = video[3].calib  # a non-annotated frame: its sequence's camera JSON
    assert camera.endswith("toycity_000500_000002_camera.json")
    fx, fy, cx, cy = depth.read_intrinsics(camera, TINY["size"])
    assert fx == pytest.approx(0.55) and fy == pytest.approx(0.55 * 128 / 64) and (cx, cy) == (0.5, 0.5)
    assert depth.read_intrinsics(camera, TINY["size"], crop_bottom=0.25)[1] == pytest.approx(0.55 * 128 / 48)


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
    import toycity
    from PIL import Image
    depth_m = np.random.default_rng(0).uniform(1.0, 100.0, (32, 32))
    fx, baseline = 211.2, 0.209313
    path = str(tmp_path / "d_disparity.png")
    Image.fromarray(toycity.encode_disparity(baseline * fx / depth_m)).save(path)
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
    fx, fy, cx, cy = depth.read_intrinsics(camera, TINY["size"])
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


def test_toycity_annotated_frame_has_neighbours():
    import toycity
    assert toycity.annotated_frame(30) == 19  # Cityscapes: frame 19 of 30
    assert [toycity.annotated_frame(n) for n in (1, 2, 3, 4, 5, 20)] == [0, 1, 1, 2, 2, 10]  # the middle one
    assert all(0 < toycity.annotated_frame(n) < n - 1 for n in range(3, 40))


def test_toycity_kitti_layout(tmp_path):
    """A tiny KITTI render: the folders of KITTI raw and data_semantics, frame names that coincide across drives,
    a calibration that depth.py reads back to the rendered intrinsics, instance maps that agree with the labels."""
    import depth
    import toycity
    from PIL import Image
    h, w = 32, 96
    root = toycity.render_kitti(str(tmp_path), size=(h, w), drives=3, dates=2, frames=2, semantic_images=3)
    drives = ["2011_09_26/2011_09_26_drive_0001_sync", "2011_09_26/2011_09_26_drive_0002_sync",
              "2011_09_27/2011_09_27_drive_0001_sync"]
    expected = {".complete", "raw/2011_09_26/calib_cam_to_cam.txt", "raw/2011_09_27/calib_cam_to_cam.txt"}
    expected |= {f"raw/{d}/image_02/data/{f:010d}.png" for d in drives for f in range(2)}
    expected |= {f"data_semantics/training/{k}/{i:06d}_10.png" for k in ("image_2", "semantic", "instance")
                 for i in range(3)}
    assert set(toy_files(root)) == expected
    frames = depth.list_frames(os.path.join(root, "raw"), "kitti", need_calib=True)
    assert len({f.video for f in frames}) == 3 and {f.number for f in frames} == {0, 1} and len(frames) == 6
    K = toycity.intrinsics(h, w)
    for date in ("2011_09_26", "2011_09_27"):
        calib = depth.read_intrinsics(os.path.join(root, "raw", date, "calib_cam_to_cam.txt"), (h, w))
        np.testing.assert_allclose(calib, [K[0, 0] / w, K[1, 1] / h, K[0, 2] / w, K[1, 2] / h], rtol=1e-6)
    frame = np.array(Image.open(frames[0].path))
    assert frame.shape == (h, w, 3) and frame.dtype == np.uint8
    objects = 0
    for i in range(3):
        image, semantic, instance = (np.array(Image.open(os.path.join(root, "data_semantics", "training", kind,
                                                                      f"{i:06d}_10.png")))
                                     for kind in ("image_2", "semantic", "instance"))
        assert image.shape == (h, w, 3) and semantic.dtype == np.uint8 and instance.dtype == np.uint16
        assert set(np.unique(semantic).tolist()) <= set(toycity.LABEL_IDS.values())
        assert (instance // 256 == semantic).all()  # labelId * 256 + k, stuff included
        thing = np.isin(semantic, [toycity.LABEL_IDS[c] for c in toycity.THING_CLASSES])
        assert ((instance % 256 > 0) == thing).all()
        for label in np.unique(semantic[thing]):  # k = 1, 2, ... per class
            ks = np.unique(instance[semantic == label] % 256)
            assert ks.tolist() == list(range(1, len(ks) + 1))
            objects += len(ks)
    assert objects > 0

# ==========================================================================================================
# depth.py
# ==========================================================================================================
def _depth_hand_K(H, W, batch=1):
    import depth
    intrinsics = torch.tensor([[0.58, 1.92, 0.5, 0.5]] * batch, dtype=torch.float64)
    return depth.intrinsics_matrix(intrinsics, H, W)


def test_depth_ssim_of_identical_images_is_one_and_error_zero():
    import depth
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 16, generator=g)
    assert torch.allclose(depth.ssim(x, x), torch.ones_like(x), atol=1e-5)
    assert depth.photometric_error(x, x).abs().max() < 1e-5
    y = torch.rand(2, 3, 12, 16, generator=g)
    pe = depth.photometric_error(y, x)
    assert pe.shape == (2, 1, 12, 16) and pe.mean() > 0.1
    # 0.85 (1 - SSIM)/2 + 0.15 L1 against the formula written out
    plain = 0.85 * ((1 - depth.ssim(y, x)) / 2).clamp(0, 1).mean(1, keepdim=True) + 0.15 * (y - x).abs().mean(1, keepdim=True)
    assert torch.allclose(pe, plain, atol=1e-6)
    # SSIM against the pooled formula written out by hand, element by element at one pixel
    pool = lambda a: torch.nn.functional.avg_pool2d(torch.nn.functional.pad(a, (1, 1, 1, 1), mode="reflect"), 3, 1)  # noqa: E731
    win_y, win_x = y[0, 0, :3, :3].double(), x[0, 0, :3, :3].double()  # the 3x3 window of pixel (1, 1)
    mu_a, mu_b = win_y.mean(), win_x.mean()
    va, vb, cab = (win_y ** 2).mean() - mu_a ** 2, (win_x ** 2).mean() - mu_b ** 2, (win_y * win_x).mean() - mu_a * mu_b
    by_hand = (2 * mu_a * mu_b + 1e-4) * (2 * cab + 9e-4) / ((mu_a ** 2 + mu_b ** 2 + 1e-4) * (va + vb + 9e-4))
    assert abs(depth.ssim(y, x)[0, 0, 1, 1].item() - by_hand.item()) < 1e-5
    mx, my = pool(y), pool(x)
    vx, vy, cxy = pool(y * y) - mx ** 2, pool(x * x) - my ** 2, pool(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert torch.allclose(depth.ssim(y, x), ref, atol=1e-5)


def test_depth_backproject_then_project_with_identity_pose_is_identity():
    import depth
    H, W = 6, 10
    K = _depth_hand_K(H, W, batch=2)
    depth_map = torch.rand(2, 1, H, W, dtype=torch.float64) * 50 + 1
    T = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    grid = depth.project(depth.backproject(depth_map, torch.linalg.inv(K)), K, T, H, W)
    cols = (2 * torch.arange(W, dtype=torch.float64) + 1) / W - 1  # pixel centres, align_corners=False
    rows = (2 * torch.arange(H, dtype=torch.float64) + 1) / H - 1
    assert torch.allclose(grid[..., 0], cols.expand(2, H, W), atol=1e-9)
    assert torch.allclose(grid[..., 1], rows[:, None].expand(2, H, W), atol=1e-9)
    image = torch.rand(2, 3, H, W, dtype=torch.float64)
    assert torch.allclose(depth.warp(image, grid), image, atol=1e-6)
    # a pure sideways translation t_x moves pixel u by fx t_x / D: hand-worked for one pixel
    T = depth.pose_matrix(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([[0.5, 0.0, 0.0]] * 2, dtype=torch.float64))
    grid = depth.project(depth.backproject(depth_map, torch.linalg.inv(K)), K, T, H, W)
    u = (grid[0, 2, 3, 0] + 1) * W / 2                               # continuous pixel column of pixel (2, 3)
    assert abs(u.item() - (3.5 + 0.58 * W * 0.5 / depth_map[0, 0, 2, 3].item())) < 1e-6  # eps 1e-7 of z


def test_depth_axis_angle_matches_hand_computed_rotations():
    import math
    import depth
    R = depth.axis_angle_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=torch.float64))[0]
    assert torch.allclose(R, torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64), atol=1e-6)
    a = 0.3
    R = depth.axis_angle_to_matrix(torch.tensor([[a, 0.0, 0.0]], dtype=torch.float64))[0]
    c, s = math.cos(a), math.sin(a)
    assert torch.allclose(R, torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(depth.axis_angle_to_matrix(torch.zeros(1, 3))[0], torch.eye(3))
    v, t = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64), torch.tensor([[1.0, 2.0, -0.5]], dtype=torch.float64)
    T, T_inv = depth.pose_matrix(v, t), depth.pose_matrix(v, t, invert=True)
    assert torch.allclose(T @ T_inv, torch.eye(4, dtype=torch.float64).expand(1, 4, 4), atol=1e-6)  # eps 1e-7
    assert torch.allclose(T[0, :3, 3], t[0])


def test_depth_smoothness_zero_on_constant_and_scale_free():
    import depth
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 8, 12, generator=g)
    assert depth.smoothness_loss(torch.full((2, 1, 8, 12), 0.3), image).item() == 0.0
    d = torch.rand(2, 1, 8, 12, generator=g) + 0.1
    assert depth.smoothness_loss(d, image) > 0
    assert torch.allclose(depth.smoothness_loss(3 * d, image), depth.smoothness_loss(d, image), atol=1e-6)
    # an image edge where the disparity jumps lowers the penalty (edge-aware)
    flat = torch.zeros(1, 3, 8, 12)
    edge = flat.clone()
    edge[..., 6:] = 1.0
    step = torch.ones(1, 1, 8, 12)
    step[..., 6:] = 2.0
    assert depth.smoothness_loss(step, edge) < 0.5 * depth.smoothness_loss(step, flat)


def test_depth_min_reprojection_and_automask_hand_worked():
    import depth
    reproj = torch.tensor([[[[0.2, 0.5]], [[0.4, 0.1]]]])         # (B=1, S=2, H=1, W=2)
    identity = torch.tensor([[[[0.3, 0.05]], [[0.6, 0.3]]]])
    loss, mask = depth.min_reprojection(reproj, identity)
    assert torch.allclose(loss, torch.tensor([[[0.2, 0.05]]])) and mask.tolist() == [[[True, False]]]
    loss, mask = depth.min_reprojection(reproj, None)
    assert torch.allclose(loss, torch.tensor([[[0.2, 0.1]]])) and bool(mask.all())
    loss, mask = depth.min_reprojection(reproj, identity, average=True)  # means (0.3, 0.3) vs (0.45, 0.175)
    assert torch.allclose(loss, torch.tensor([[[0.3, 0.175]]])) and mask.tolist() == [[[True, False]]]


def test_depth_warp_with_ground_truth_depth_and_pose_reproduces_frame(tiny_city):
    """Toy-city frame t+1 warped into t with t's true depth and the true relative pose (pose JSON, test only)."""
    import json
    import depth
    split, stem_t, stem_s = "train", "toycity_000000_000002", "toycity_000000_000003"
    path = lambda folder, stem, suffix: os.path.join(tiny_city, folder, split, "toycity", f"{stem}_{suffix}")  # noqa: E731
    target = depth.load_rgb(path("leftImg8bit_sequence", stem_t, "leftImg8bit.png"))[None].double()
    source = depth.load_rgb(path("leftImg8bit_sequence", stem_s, "leftImg8bit.png"))[None].double()
    camera = path("camera", stem_t, "camera.json")
    H, W = TINY["size"]
    intrinsics = torch.tensor(depth.read_intrinsics(camera, (H, W)))[None]
    K = depth.intrinsics_matrix(intrinsics, H, W)
    disp = depth.read_disparity_png(path("disparity", stem_t, "disparity.png"))
    gt = depth.disparity_to_depth(disp, depth.read_camera_baseline(camera), K[0, 0, 0].item())
    gt = torch.from_numpy(np.where(disp > 0, gt, 1e4))[None, None]  # sky: far away
    pose = lambda stem: np.array(json.load(open(path("pose", stem, "pose.json")))["camera_to_world"])  # noqa: E731
    T = torch.from_numpy(np.linalg.inv(pose(stem_s)) @ pose(stem_t))[None]  # target camera -> source camera
    labels = np.asarray(__import__("PIL.Image").Image.open(path("gtFine", stem_t, "gtFine_labelIds.png")))
    static = torch.from_numpy(~np.isin(labels, [24, 26]))  # moving people and cars excluded

    def error(depth_map):
        grid = depth.project(depth.backproject(depth_map, torch.linalg.inv(K)), K, T, H, W)
        inside = (grid.abs() < 1).all(-1)[0] & static
        return depth.photometric_error(depth.warp(source, grid), target)[0, 0][inside].mean().item()

    # residual error: fine textures resampled at 64 x 128 and disocclusions (measured 0.13 vs 0.29 and 0.26)
    right, wrong, no_warp = error(gt), error(gt * 0.5), depth.photometric_error(source, target).mean().item()
    assert right < 0.5 * wrong and right < 0.6 * no_warp, (right, wrong, no_warp)
    assert right < min(error(gt * 0.8), error(gt * 1.25))  # the true depth is the best scale


def test_depth_augmentation_one_jitter_for_all_frames_and_seeded(tiny_city):
    import depth
    args = depth.get_args_parser().parse_args(["train", "--data", tiny_city, "--work", "unused", "--frame-offset", "1"])
    args.crop_bottom = 0.0
    dataset = depth.TripletDataset(depth.training_items(args), (64, 128), seed=3)
    keys = [(epoch, i) for epoch in range(3) for i in range(len(dataset))]
    samples = {key: dataset[key] for key in keys}
    assert all(torch.equal(dataset[key]["aug"], samples[key]["aug"]) for key in keys[:2])  # seeded by (seed, epoch, i)
    jittered = [key for key in keys if not torch.equal(samples[key]["aug"], samples[key]["frames"])]
    plain = depth.TripletDataset(dataset.items, (64, 128), augment=False)
    flipped = [key for key in keys if not torch.equal(samples[key]["frames"], plain[key]["frames"])]
    assert 0 < len(jittered) < len(keys) and 0 < len(flipped) < len(keys)  # p 0.5 each
    for epoch, i in flipped:  # a horizontal flip, cx -> 1 - cx
        assert torch.equal(samples[epoch, i]["frames"], plain[epoch, i]["frames"].flip(-1))
        assert abs(samples[epoch, i]["intrinsics"][2].item() - (1 - dataset.items[i][1][2])) < 1e-6
    # one draw for the three frames: each frame jittered alone with the same draws gets the same change
    for epoch, i in jittered:
        for f in range(3):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence([3, epoch, i]).generate_state(1)[0]))
                torch.rand(())  # the flip's draw
                alone = dataset.jitter(samples[epoch, i]["frames"][f])
            assert torch.allclose(alone, samples[epoch, i]["aug"][f], atol=1e-6)


def test_depth_training_steps_lower_the_loss_on_a_fixed_batch(tiny_city):
    import depth
    torch.manual_seed(0)
    args = depth.get_args_parser().parse_args(["train", "--data", tiny_city, "--work", "unused", "--frame-offset", "1"])
    args.crop_bottom = 0.0
    dataset = depth.TripletDataset(depth.training_items(args), (64, 128), augment=False)
    batch = torch.utils.data.default_collate([dataset[0, i] for i in range(2)])
    depth_net, pose_net = depth.DepthNet(), depth.PoseNet()
    optimizer = torch.optim.Adam(list(depth_net.parameters()) + list(pose_net.parameters()), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [depth.train_step(depth_net, pose_net, optimizer, scaler, batch, args, None)[0].item() for _ in range(6)]
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < 0.9 * losses[0], losses  # measured 0.180 -> 0.148


_DEPTH_TRAIN = ["--size", "64", "128", "--frame-offset", "1", "--batch-size", "2", "--workers", "0",
                "--no-progress", "--log-every", "1", "--save-every", "1"]


def test_depth_resume_gives_the_same_parameters_as_a_straight_run(tiny_city, tmp_path):
    import depth

    def train(work, *extra):
        depth.main(["train", "--data", tiny_city, "--work", str(tmp_path / work), "--steps", "2", *_DEPTH_TRAIN, *extra])
        return os.path.join(tmp_path, work, "depth")
    straight = train("straight")
    resumed = train("resumed", "--stop-after", "1")
    assert not os.path.exists(os.path.join(resumed, "model.pt"))
    train("resumed", "--resume")
    a = torch.load(os.path.join(straight, "model.pt"), weights_only=False)
    b = torch.load(os.path.join(resumed, "model.pt"), weights_only=False)
    for key in ("model", "pose_model"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name


def test_depth_cli_train_and_predict_write_one_scale_disparity(tiny_city, tmp_path, capsys):
    import glob
    import json
    import shutil
    import depth
    work = str(tmp_path / "work")
    run_cli("depth.py", "train", "--data", tiny_city, "--work", work, "--steps", "2", *_DEPTH_TRAIN)
    logs = [json.loads(line) for line in open(os.path.join(work, "depth", "log.jsonl"))]
    assert [r["step"] for r in logs] == [1, 2] and all(np.isfinite(r["loss"]) for r in logs)
    run_cli("depth.py", "predict", "--work", work, "--data", tiny_city, "--split", "val", "--size", "32", "64",
            "--preview", "--no-progress")
    model = torch.load(os.path.join(work, "depth", "model.pt"), weights_only=False)
    net = depth.DepthNet(model["arch"]).eval()
    net.load_state_dict(model["model"])
    for path in [f.path for f in depth.list_frames(tiny_city, split="val")]:
        stem = depth.image_stem(path)
        d = np.load(os.path.join(work, "disp", stem + ".npy"))
        assert d.shape == (32, 64) and d.dtype == np.float32 and d.min() > 0
        assert os.path.exists(os.path.join(work, "disp_preview", stem + ".png"))
        # the network's own scaled disparity (one scale for the dataset), not divided by each image's maximum
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            sigma = net(depth.load_rgb(path, tuple(model["size"]))[None])[0].float()
        expected = torch.nn.functional.interpolate(depth.disp_to_depth(sigma)[0], (32, 64), mode="bilinear")[0, 0]
        np.testing.assert_allclose(d, expected.numpy(), rtol=0.02, atol=1e-4)
    assert json.load(open(os.path.join(work, "disp", "resolution.json"))) == {"predicted_at": model["size"]}
    # --images: every frame, at the training size by default; a re-run skips them
    other = str(tmp_path / "other")
    os.makedirs(os.path.join(other, "depth"))
    shutil.copy(os.path.join(work, "depth", "model.pt"), os.path.join(other, "depth", "model.pt"))
    frames = os.path.join(tiny_city, "leftImg8bit_sequence", "train", "toycity", "*.png")
    predict = ["predict", "--work", other, "--images", frames, "--no-progress", "--batch-size", "3"]
    depth.main(predict)
    written = sorted(f for f in os.listdir(os.path.join(other, "disp")) if f.endswith(".npy"))
    assert written == [s + ".npy" for s in sorted(depth.image_stem(p) for p in glob.glob(frames))]
    assert np.load(os.path.join(other, "disp", written[0])).shape == (64, 128)
    capsys.readouterr()
    depth.main(predict)
    assert "predict 0 of" in capsys.readouterr().out


def test_depth_eval_of_ground_truth_disparity_is_near_perfect(tiny_city, tmp_path):
    import json
    import depth
    for path in [f.path for f in depth.list_frames(tiny_city, split="val")]:
        stem = depth.image_stem(path)
        d = depth.read_disparity_png(depth.split_file(tiny_city, "disparity", "val", stem, "disparity.png"))
        d = np.where(d > 0, d, 1e-3).astype(np.float32)  # sky: any positive value (masked in the metric)
        os.makedirs(tmp_path / "disp", exist_ok=True)
        np.save(tmp_path / "disp" / f"{stem}.npy", d / d.max())  # scale-free: median scaling recovers it
    depth.main(["eval", "--work", str(tmp_path), "--data", tiny_city, "--split", "val"])
    result = json.load(open(tmp_path / "depth" / "eval.json"))
    assert result["abs_rel"] < 0.01 and result["a1"] > 0.99 and result["images"] == TINY["val_sequences"]
    # median scaling by hand: a prediction twice too far is perfect after scaling, ratio 0.5
    gt = np.random.default_rng(0).uniform(1, 50, (8, 8))
    metrics, ratio = depth.median_scaled_errors(2 * gt, gt)
    assert abs(ratio - 0.5) < 1e-12 and metrics["abs_rel"] < 1e-12 and metrics["a1"] == 1.0


KITTI_CALIB = ("calib_time: 09-Jan-2012 13:57:47\nS_rect_02: 1.242000e+03 3.750000e+02\n"
               "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 "
               "1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\n")


def kitti_raw(city, root, drives=((1, 4), (2, 4)), date="2011_09_26"):
    """A KITTI raw layout from the tiny toy city's train frames: drives (number, frames), frame numbers from 0 in
    each drive (so they coincide), and calib_cam_to_cam.txt for the toy camera (fx 0.55 W, centred) at 64 x 128."""
    import glob
    import shutil
    sources = sorted(glob.glob(os.path.join(city, "leftImg8bit_sequence", "train", "*", "*.png")))
    for drive, count in drives:
        folder = os.path.join(root, date, f"{date}_drive_{drive:04d}_sync", "image_02", "data")
        os.makedirs(folder)
        for i in range(count):
            shutil.copy(sources[(drive + i) % len(sources)], os.path.join(folder, f"{i:010d}.png"))
    with open(os.path.join(root, date, "calib_cam_to_cam.txt"), "w") as f:
        f.write("S_rect_02: 128 64\nP_rect_02: 70.4 0 64 0 0 70.4 32 0 0 0 1 0\n")
    return str(root)


def test_depth_kitti_calibration_and_triplets(tiny_city, tmp_path):
    import depth
    calib = tmp_path / "calib_cam_to_cam.txt"
    calib.write_text(KITTI_CALIB)
    K = depth.read_intrinsics(str(calib), (1, 1))  # .txt: KITTI, normalized by S_rect_02 (not the image size)
    assert np.allclose(K, [721.5377 / 1242, 721.5377 / 375, 609.5593 / 1242, 172.854 / 375])
    # two drives whose frame numbers coincide: unique stems, triplets (t, t - k, t + k) inside one drive
    raw = kitti_raw(tiny_city, tmp_path / "raw", drives=((1, 5), (2, 3)))
    frames = depth.list_frames(raw, "kitti")
    assert [f.stem for f in frames][:6] == [f"2011_09_26_drive_0001_{i:010d}" for i in range(5)] + \
        ["2011_09_26_drive_0002_0000000000"] and len({f.stem for f in frames}) == 8
    assert [depth.image_stem(f.path) for f in frames] == [f.stem for f in frames]
    args = depth.get_args_parser().parse_args(["train", "--data", raw, "--work", "unused", "--dataset", "kitti",
                                               "--frame-offset", "2"])
    args.crop_bottom = 0.0
    items = depth.training_items(args)
    drive = os.path.join(raw, "2011_09_26", "2011_09_26_drive_0001_sync", "image_02", "data")
    assert [paths for paths, _ in items] == [tuple(os.path.join(drive, f"{i:010d}.png") for i in (2, 0, 4))]
    assert np.allclose(items[0][1], [0.55, 70.4 / 64, 0.5, 0.5])
    # paired by frame number: a gap never makes a triplet of the wrong frames
    gapped = [f for f in frames if f.number != 3]
    assert [tuple(g.number for g in t) for t in depth.video_triplets(gapped, 1)] == [(1, 0, 2), (1, 0, 2)]


def test_depth_clear_errors_name_the_file(tiny_city, tmp_path, capsys):
    import re
    import shutil
    import depth
    data = str(tmp_path / "city")
    shutil.copytree(tiny_city, data)
    args = ["train", "--data", data, "--work", str(tmp_path / "w"), *_DEPTH_TRAIN, "--steps", "1"]
    camera = os.path.join(data, "camera", "train", "toycity", "toycity_000001_000002_camera.json")
    os.remove(camera)
    with pytest.raises(SystemExit, match="1"):  # main prints the error as one line on stderr, exit 1
        depth.main(args)
    assert re.search(re.escape(os.path.dirname(camera)) + ".*toycity_000001_", capsys.readouterr().err)
    shutil.copy(os.path.join(data, "camera", "train", "toycity", "toycity_000000_000002_camera.json"), camera)
    frame = os.path.join(data, "leftImg8bit_sequence", "train", "toycity", "toycity_000000_000001_leftImg8bit.png")
    with open(frame, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(SystemExit, match="1"):
        depth.main(args + ["--no-augment", "--batch-size", "4"])  # one batch holds every triplet
    assert frame in capsys.readouterr().err

# ==========================================================================================================
# group.py
# ==========================================================================================================

def _group_box_on_plane(H=128, W=256, cam_height=1.5, box=(-0.3, 0.3, 1.2, 1.6, 0.5)):
    """Exact ray casting: a camera looking down at a level ground plane (principal point above the image,
    cy < 0), a box (x0, x1, z0, z1, height) standing on it. Returns image, disparity, intrinsics, masks."""
    fx, fy, cx, cy = 0.55, 1.1, 0.5, -1.0
    dx, dy = np.meshgrid((np.arange(W) - cx * W) / (fx * W), (np.arange(H) - cy * H) / (fy * H))  # pixel ids
    x0, x1, z0, z1, height = box
    top = cam_height - height                      # camera y is down: the box top is at y = top
    t = np.full((H, W), np.inf)
    front = (z0 * dx >= x0) & (z0 * dx <= x1) & (z0 * dy >= top) & (z0 * dy <= cam_height)
    t[front] = z0
    t_top = top / dy
    upper = (t_top * dx >= x0) & (t_top * dx <= x1) & (t_top >= z0) & (t_top <= z1) & (t_top < t)
    t[upper] = t_top[upper]
    box_mask = front | upper
    ground = ~box_mask                              # every other ray hits the ground (dy > 0 everywhere)
    t[ground] = cam_height / dy[ground]
    image = np.where(box_mask[..., None], [0.8, 0.2, 0.2], [0.5, 0.5, 0.5]).astype(np.float32)
    return image, (1.0 / t).astype(np.float32), (fx, fy, cx, cy), ground, box_mask


def test_group_adjacency_equals_brute_force_and_skimage_rag():
    import group
    from skimage.graph import RAG
    rng = np.random.default_rng(0)
    for trial in range(5):
        labels = rng.integers(0, 6, size=(4, 5)).repeat(3, 0).repeat(2, 1)[:11, :9]
        labels = group.relabel_contiguous(labels + 6 * rng.integers(0, 2, size=labels.shape))
        expected = set()
        h, w = labels.shape
        for r in range(h):
            for c in range(w):
                for rr, cc in ((r + 1, c), (r, c + 1)):
                    if rr < h and cc < w and labels[r, c] != labels[rr, cc]:
                        a, b = sorted((int(labels[r, c]), int(labels[rr, cc])))
                        expected.add((a, b))
        edges = group.region_adjacency(labels)
        assert edges.dtype == np.int64 and edges.shape[1] == 2
        assert [tuple(e) for e in edges.tolist()] == sorted(expected)
        # the released code's graph: skimage's RAG, default connectivity 1 (4-connected): the same edges
        assert sorted(tuple(sorted(e)) for e in RAG(labels).edges) == sorted(expected)


def test_group_occlusion_distance_is_scale_invariant():
    import group
    image, disparity, intrinsics, _, _ = _group_box_on_plane(64, 128)
    labels = group.slic_superpixels(image, 200)
    assert labels.min() == 0 and labels.dtype == np.int32                 # start_label=0, contiguous
    edges = group.region_adjacency(labels)
    depth = 1.0 / disparity
    for normalize in (True, False):
        out = []
        for scale in (1.0, 7.3):
            points = group.back_project(depth * scale, intrinsics, normalize)
            centers = group.superpixel_means(labels, points, int(labels.max()) + 1)
            out.append(group.occlusion_distance(centers[edges[:, 0]], centers[edges[:, 1]]))
        np.testing.assert_allclose(out[0], out[1], rtol=1e-4)
    # disparity of any scale gives the same depth map up to scale (divided by its maximum)
    np.testing.assert_allclose(group.scale_free_depth(disparity), group.scale_free_depth(disparity * 40), rtol=1e-6)


def test_group_normals_of_level_plane_and_walls():
    import group
    from scipy.ndimage import binary_dilation
    image, disparity, intrinsics, ground, box = _group_box_on_plane()
    depth = 1.0 / disparity
    H, W = depth.shape
    cols = (np.arange(W) - 0.5 * W) / (0.55 * W)
    side = np.broadcast_to(-2.0 / np.minimum(cols, -0.05), (H, W))   # side wall x = -2 (left part)
    near_box = binary_dilation(box, iterations=3)
    front = box & (np.abs(depth - 1.2) < 1e-6)
    front_inner = front & ~binary_dilation(~front, iterations=3)
    for normalize in (True, False):   # per-axis scaling keeps level planes level and walls vertical
        grads = group.point_gradients(group.back_project(depth, intrinsics, normalize))
        n = group.normals_from_gradients(np.moveaxis(grads[0], 0, -1), np.moveaxis(grads[1], 0, -1))
        assert np.all(n[ground & ~near_box][:, 1] > 0.999)           # level ground: up
        assert np.all(np.abs(n[front_inner][:, 1]) < 1e-3)           # the box's front face: horizontal
        assert np.all(n[front_inner][:, 2] < -0.999)                 # ... facing the camera
        grads = group.point_gradients(group.back_project(side, intrinsics, normalize))
        n = group.normals_from_gradients(np.moveaxis(grads[0], 0, -1), np.moveaxis(grads[1], 0, -1))
        inner = n[2:-2, 2:int(0.5 * W - 0.05 * 0.55 * W) - 2]
        assert np.all(np.abs(inner[..., 1]) < 1e-3) and np.all(np.abs(inner[..., 0]) > 0.999)   # side wall


def test_group_eqn_1_to_3_hand_worked():
    import group
    # Eqn 1: centers (0, 0, 1) and (2, 2, 2), ||(2, 2, 1)|| = 3 apart, z1 + z2 = 3: D_ocln = 1
    assert group.occlusion_distance(np.array([0.0, 0.0, 1.0]), np.array([2.0, 2.0, 2.0])) == 1.0
    # Eqn 3 with the released weights: W = sigmoid(48 * 0.1 - 4) = sigmoid(0.8)
    assert abs(group.boundary_probability(0.1, 0.0) - 1 / (1 + np.exp(-0.8))) < 1e-12
    assert abs(group.boundary_probability(0.1, 0.5, w_ocln=36.0, w_sup=2.5) - 1 / (1 + np.exp(-0.85))) < 1e-12
    # the edge is oriented so that S1 is the lower superpixel: node 1 (y = -2, level, n_y = 1) below node 0
    # (y = 1, a wall, n_y = 0): D_sup = 1 * 1 * (-2)^2 = 4, D_ocln = ||(0, 3, 0)|| / 4 = 0.75
    centers, normals = np.array([[0.0, 1.0, 2.0], [0.0, -2.0, 2.0]]), np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    w = group.edge_weights(np.array([[0, 1]]), centers, normals, w_ocln=36.0, w_sup=2.5)
    assert abs(w[0] - 1 / (1 + np.exp(-(36 * 0.75 + 2.5 * 4 - 4)))) < 1e-12


def test_group_boundary_probability_grows_with_occlusion_distance():
    import group
    d = np.linspace(0, 1, 101)
    w = group.boundary_probability(d, np.zeros_like(d))
    assert np.all(np.diff(w) >= 0) and np.all(np.diff(w[:30]) > 0) and 0 < w[0] < 0.02 and w[-1] > 0.99
    assert abs(w[0] - 1 / (1 + np.exp(4))) < 1e-12                          # sigmoid(b), b = -4
    assert np.all(group.boundary_probability(d, np.ones_like(d), w_sup=2.5)[:30] > w[:30])   # Eqn 2 adds to it
    # Eqn 2: only a level lower superpixel below the principal row, steeper than the upper one, counts
    assert group.support_distance(1.0, 0.0, -2.0) == 4.0
    assert group.support_distance(1.0, 0.0, 2.0) == 0.0
    assert group.support_distance(0.0, 1.0, -2.0) == 0.0


def test_group_box_on_plane_gives_box_and_ground_regions():
    import group
    image, disparity, intrinsics, ground, box = _group_box_on_plane()
    # Eqn 2 switched on (the released alternative weights): the support boundary separates the box
    regions = group.group_depth(image, disparity, intrinsics, segments=1200, w_ocln=36.0, w_sup=2.5)
    main = np.bincount(regions[ground]).argmax()
    assert (regions[ground] == main).mean() > 0.97            # the ground is one region
    assert (regions[box] == main).mean() < 0.05               # the box is not part of it
    # the released default (occlusion term only) keeps the ground as one region too
    regions = group.group_depth(image, disparity, intrinsics, segments=1200)
    assert (regions[ground] == np.bincount(regions[ground]).argmax()).mean() > 0.97


def test_group_blurred_low_resolution_depth_keeps_its_occlusion():
    """A near rectangle (depth 4 / 1.5) before a wall (depth 4): disparity made at 32 x 64, blurred (sigma 1
    sample, as a network blurs) and resized to 192 x 384, grouped with the paper's ~30-pixel superpixels. Read
    pixel by pixel (pitch 1) every superpixel step sees a fraction of the step and everything merges (the toy
    city's 1 to 5 regions per image at 384 x 768 / 10000); read 2 samples apart (pitch 6) the two stay apart."""
    import group
    from scipy.ndimage import gaussian_filter
    H, W, f = 192, 384, 6
    z = np.full((H // f, W // f), 4.0)
    z[H // f // 4:3 * H // f // 4, W // f // 4:W // f // 2] = 4.0 / 1.5
    disparity = group.resize_float(gaussian_filter(1.0 / z, 1.0), (H, W))
    rect = np.zeros((H, W), bool)
    rect[H // 4:3 * H // 4, W // 4:W // 2] = True
    noise = 0.03 * np.random.default_rng(0).standard_normal((H, W, 3))
    image = np.clip(np.where(rect[..., None], [0.7, 0.3, 0.3], [0.4, 0.4, 0.5]) + noise, 0, 1).astype(np.float32)
    for pitch, apart in ((1.0, False), (f, True)):
        regions = group.group_depth(image, disparity, group.KITTI_INTRINSICS, segments=H * W // 30,
                                    disparity_pitch=pitch)
        inside, outside = np.bincount(regions[rect]).argmax(), np.bincount(regions[~rect]).argmax()
        assert (inside != outside) == apart, pitch
    assert (regions[rect] == inside).mean() > 0.85 and (regions[~rect] == outside).mean() > 0.95
    # Eqn 1's points: centers far enough apart are kept; nearer ones are read 2 pitches apart on their line
    points = np.stack([np.zeros((8, 8)), np.zeros((8, 8)), np.arange(8.0)[None].repeat(8, 0)])     # Z = column
    edges, centers = np.array([[0, 1]]), np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    pixels = np.array([[2.0, 3.0], [2.0, 4.0]])                                          # 1 px apart, one row
    ends = group.occlusion_ends(points, edges, centers, pixels, 1.0)
    assert np.array_equal(ends[0], centers[:1]) and np.array_equal(ends[1], centers[1:])
    ends = group.occlusion_ends(points, edges, centers, pixels, 4.0)                     # columns 1.5 and 5.5
    assert ends[0][0, 2] == 2.0 and ends[1][0, 2] == 6.0        # np.rint: half to even


def test_group_ids_contiguous_and_deterministic():
    import group
    image, disparity, intrinsics, _, _ = _group_box_on_plane(64, 128)
    rng = np.random.default_rng(0)
    image = np.clip(image + 0.05 * rng.standard_normal(image.shape), 0, 1).astype(np.float32)
    a = group.group_depth(image, disparity, intrinsics, segments=300, seed=5)
    b = group.group_depth(image, disparity, intrinsics, segments=300, seed=5)
    assert a.dtype == np.int32 and a.shape == (64, 128)
    assert np.array_equal(a, b)
    assert np.array_equal(np.unique(a), np.arange(a.max() + 1))
    # the merging on a hand-made graph: two weak pairs joined by a strong edge stay two regions
    edges = np.array([[0, 1], [1, 2], [2, 3]])
    weights = np.array([0.02, 0.99, 0.02])
    regions = group.iterative_infomap(4, edges, weights)
    assert regions[0] == regions[1] and regions[2] == regions[3] and regions[1] != regions[2]
    assert sorted(set(regions.tolist())) == [0, 1]
    modules = group.infomap_modules(6, edges, 1.0 / weights)    # nodes 4, 5 have no links: a module each
    assert modules[4] != modules[5] and modules[4] not in modules[:4] and modules.max() == len(set(modules)) - 1


def test_group_merge_modules_hand_worked():
    import group
    modules = np.array([0, 0, 1, 1, 2])
    edges = np.array([[0, 2], [1, 3], [2, 3], [3, 4]])     # two edges between modules 0 and 1, one inside 1
    weights = np.array([0.1, 0.3, 0.9, 0.05])
    is_open, next_node, next_edges, next_w = group.merge_modules(edges, weights, modules, tau=0.2)
    assert is_open.tolist() == [True, True, True] and next_node.tolist() == [0, 1, 2]
    assert next_edges.tolist() == [[0, 1], [1, 2]]
    np.testing.assert_allclose(next_w, [0.2, 0.05])          # W between modules: the mean of their W's
    is_open, next_node, next_edges, next_w = group.merge_modules(edges, weights, modules, tau=0.08)
    assert is_open.tolist() == [False, True, True] and next_node.tolist() == [-1, 0, 1]   # module 0 is final
    assert next_edges.tolist() == [[0, 1]] and next_w.tolist() == [0.05]


def test_group_segment_scores_hand_worked():
    import group
    gt = np.array([[0, 0, 1, 1]])
    scores = group.segment_scores(np.array([[0, 0, 0, 1]]), gt)
    assert scores["purity"] == 0.75 and scores["regions"] == 2
    assert abs(scores["covering"] - (2 * (2 / 3) + 2 * 0.5) / 4) < 1e-12
    assert group.segment_scores(gt, gt) == {"covering": 1.0, "purity": 1.0, "regions": 2}
    split = group.connected_regions(np.array([[3, 3, 5, 3]]))   # two pieces of id 3 -> two regions
    assert split.tolist() == [[0, 0, 1, 2]]


def test_group_clear_errors_missing_disparity_and_aspect(tmp_path):
    import group
    from PIL import Image
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "frame.png")
    args = group.get_args_parser().parse_args(["--work", str(tmp_path / "work"), "--images",
                                               str(tmp_path / "*.png"), "--size", "32", "64"])
    os.makedirs(tmp_path / "work" / "regions")
    item = group.list_items(args)[0]
    with pytest.raises(FileNotFoundError, match="depth.py predict"):
        group.process_one(item, args)
    os.makedirs(tmp_path / "work" / "disp")
    np.save(tmp_path / "work" / "disp" / "frame.npy", np.ones((32, 32), np.float32))
    with pytest.raises(ValueError, match="aspect"):
        group.process_one(item, args)
    np.save(tmp_path / "work" / "disp" / "frame.npy", np.ones((16, 32), np.float32))   # same aspect: fine
    assert group.process_one(item, args)[1] >= 1
    assert np.load(tmp_path / "work" / "regions" / "frame.npy").shape == (32, 64)


def test_group_cli_end_to_end(tiny_city, tmp_path, capsys):
    import depth
    work = tmp_path / "work"
    common = ["--data", tiny_city, "--size", *TINY["size"]]
    run_cli("group.py", "--work", work, "--split", "train", "--stereo", "--segments", "300", "--preview",
            "--workers", "2", *common)
    stems = [f.stem for f in depth.list_frames(tiny_city, split="train")]
    for stem in stems:
        regions = np.load(work / "regions" / f"{stem}.npy")
        assert regions.dtype == np.int32 and regions.shape == TINY["size"]
        assert np.array_equal(np.unique(regions), np.arange(regions.max() + 1))
        assert os.path.exists(work / "regions" / "preview" / f"{stem}.png")
    before = {s: os.path.getmtime(work / "regions" / f"{s}.npy") for s in stems}
    import group   # the same command lines in-process (saves interpreter starts)
    group.run(group.get_args_parser().parse_args(["--work", str(work), "--split", "train", "--stereo", "--shard",
                                                  "1/2", "--segments", "300", *map(str, common)]))
    assert "0 to do" in capsys.readouterr().out
    assert before == {s: os.path.getmtime(work / "regions" / f"{s}.npy") for s in stems}
    # ground-truth proposals: perfect scores at the ground truth's own resolution
    gt_work = tmp_path / "gt"
    group.run(group.get_args_parser().parse_args(["--work", str(gt_work), "--split", "val", "--method", "gt",
                                                  *map(str, common)]))
    run_cli("group.py", "--eval", "--work", gt_work, "--split", "val", *common)
    import json
    with open(gt_work / "regions" / "eval.json") as f:
        scores = json.load(f)
    assert scores["images"] == len(depth.list_frames(tiny_city, split="val"))
    assert scores["purity"] == 1.0 and scores["covering"] == 1.0 and scores["regions_per_image"] > 3

# ==========================================================================================================
# copypaste.py
# ==========================================================================================================
def _copypaste_synthetic(M, H=64, W=128, seed=0, num_regions=10):
    """M synthetic sources: coordinate-ramp images (R = column, G = row, B = source), Voronoi regions, one
    random disparity per region (so pastes land in front of some things and behind others)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    images, disps, regions = [], [], []
    for j in range(M):
        ramp = np.stack([xx * 255.0 / (W - 1), yy * 255.0 / (H - 1), np.full((H, W), 20.0 + 200.0 * j / max(M, 1))])
        images.append(torch.from_numpy(np.round(ramp).astype(np.uint8)))
        pts = rng.uniform([0, 0], [H, W], size=(num_regions, 2))
        reg = ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2).argmin(-1).astype(np.int32)
        regions.append(reg)
        disps.append(rng.uniform(0.05, 1.0, num_regions).astype(np.float32)[reg])
    return images, disps, regions


def _copypaste_build(M=4, paste_times=(2, 4), seed=0, H=64, W=128, photometric=False, **kw):
    import copypaste
    images, disps, regions = _copypaste_synthetic(M, H, W, seed=seed)
    g = torch.Generator().manual_seed(seed)
    sample = copypaste.build_sample(images, disps, regions, [f"s{j}" for j in range(M)], paste_times=paste_times,
                                    generator=g, photometric=photometric, **kw)
    return sample, images, disps, regions


def _copypaste_erode(mask, radius):
    """Pixels whose (2 radius + 1)^2 neighbourhood lies inside mask (bool (H, W) tensor)."""
    k = 2 * radius + 1
    return -torch.nn.functional.max_pool2d(-mask[None, None].float(), k, 1, radius)[0, 0] > 0.5


def _copypaste_pixel_grid(H, W):
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return torch.stack([(2 * xs + 1) / W - 1, (2 * ys + 1) / H - 1, torch.ones_like(xs)], -1)  # (H, W, 3)


@pytest.mark.parametrize("M,paste_times", [(4, (2, 4)), (2, (1, 3))])
def test_copypaste_pasted_pixels_come_from_their_transform(M, paste_times):
    """--no-photometric: every visible, non-edge pixel of every copy equals the source pixel its matrix maps it
    from (bilinear tolerance); every labelled pixel maps back into its own region; slots 0/1 are exact copies."""
    H, W = 64, 128
    sample, images, disps, regions = _copypaste_build(M, paste_times, seed=1, H=H, W=W)
    T, labels, A, canvas_of = sample["slots"], sample["labels"].long(), sample["transforms"].double(), sample["canvas_of"]
    offsets = np.concatenate([[0], np.cumsum([r.max() + 1 for r in regions])])
    grid = _copypaste_pixel_grid(H, W)
    checked = 0
    for c in range(2 * M):
        canvas = sample["images"][c].double()
        for value in labels[c].unique().tolist():
            r, s = divmod(value, T)
            assert canvas_of[r, s] == c, "a label on a canvas that does not hold that slot"
            j = int(np.searchsorted(offsets, r, side="right") - 1)
            where = labels[c] == value
            # map the canvas pixels back to the source: p = A^-1 g
            p = grid[where] @ torch.linalg.inv(A[r, s]).T
            inside = torch.zeros(len(p), dtype=torch.bool)
            for du, dv in ((-1e-4, -1e-4), (-1e-4, 1e-4), (1e-4, -1e-4), (1e-4, 1e-4)):  # float32 ties at pixel edges
                col = torch.floor((p[:, 0] + 1) * W / 2 + du).long().clamp(0, W - 1)
                row = torch.floor((p[:, 1] + 1) * H / 2 + dv).long().clamp(0, H - 1)
                inside |= torch.from_numpy(regions[j])[row, col] == r - offsets[j]
            assert inside.all(), (r, s, inside.float().mean())
            if s < 2:
                assert torch.equal(A[r, s], torch.eye(3, dtype=torch.float64)) and c == j + M * s
                away = _copypaste_erode(where, 1)  # the soft mask of a neighbouring copy reaches 1 px
                assert torch.equal(sample["images"][c][:, away], images[j][:, away])
                continue
            interior = _copypaste_erode(where, 2)
            if interior.sum() == 0:
                continue
            p = grid[interior] @ torch.linalg.inv(A[r, s]).T
            src = torch.nn.functional.grid_sample(images[j][None].double(), p[None, None, :, :2], mode="bilinear",
                                                  padding_mode="border", align_corners=False)[0, :, 0]
            err = (src - canvas[:, interior]).abs()
            # uint8 rounding + resampling: < 1 grey level; a quarter-pixel shift would already cost 1 (G: 4/px)
            assert err.max() < 1.0 and err.mean() < 0.35, (r, s, err.max(), err.mean())
            checked += int(interior.sum())
    assert checked > 500


def test_copypaste_label_only_where_slot_visible_and_depthmix():
    """Nothing is pasted where the canvas is nearer: a source whose left half is nearer than any possible copy
    keeps that half unchanged and labelled as itself (source 0 is one region, so it is never pasted itself),
    but for a fringe of a few columns at the boundary: the soft mask blends the disparity of far copies into
    the pixel beside them, which a later copy may then cover."""
    import copypaste
    M, H, W = 4, 64, 128
    images, disps, regions = _copypaste_synthetic(M, H, W, seed=2)
    for j in range(1, M):
        disps[j] = np.minimum(disps[j], 0.45)  # scaled by s <= 2: never above 0.9
    disps[0] = np.where(np.arange(W)[None, :] < W // 2, 1.0, 0.0).repeat(H, 0).astype(np.float32)
    regions[0] = np.zeros((H, W), np.int32)
    g = torch.Generator().manual_seed(0)
    sample = copypaste.build_sample(images, disps, regions, list("abcd"), generator=g, photometric=False)
    T = sample["slots"]
    for c in (0, M):
        lab = sample["labels"][c].long()
        left = lab[:, : W // 2 - 4]
        assert torch.equal(left % T, torch.full_like(left, c // M)), "a copy landed where the canvas was nearer"
        assert torch.equal(sample["images"][c][:, :, : W // 2 - 5], images[0][:, :, : W // 2 - 5])
        assert ((lab[:, W // 2:] % T) >= 2).any(), "nothing pasted on the far half"


def test_copypaste_depthmix_sees_earlier_pastes():
    """paste_region: a second copy, nearer than the background but farther than a first copy, goes only where
    the first one is not; labels on the hard mask; the soft mask blends only one pixel beyond it; a copy behind
    the canvas everywhere, or off the canvas, changes nothing (its color is never made)."""
    import copypaste
    H, W = 40, 60
    canvas = torch.zeros(4, H, W)  # color, then disparity
    lab = torch.zeros(H, W, dtype=torch.int32)  # background disparity 0: any positive copy is nearer
    ones = torch.ones(10, 10, dtype=torch.bool)
    crop = lambda value, disp: torch.cat([torch.full((3, 10, 10), value), torch.full((1, 10, 10), disp)])  # noqa
    first = ((15, 20, 10, 10), crop(1.0, 10.0), ones, 10.0)  # s in [0.2, 2]: always nearer than the second
    second = ((15, 20, 10, 10), crop(0.5, 0.01), ones, 0.01)
    g = torch.Generator().manual_seed(0)
    A1 = copypaste.paste_region(canvas, lab, first, 7, g, 0)
    A2 = copypaste.paste_region(canvas, lab, second, 9, g, 0)
    grid = _copypaste_pixel_grid(H, W)

    def covered(A):  # canvas pixels whose centre maps back into the 10 x 10 box at (15, 20)
        p = grid @ torch.linalg.inv(torch.from_numpy(A)).T
        u, v = (p[..., 0] + 1) * W / 2, (p[..., 1] + 1) * H / 2
        return (u > 20) & (u < 30) & (v > 15) & (v < 25)
    c1, c2 = covered(A1), covered(A2)
    assert c1.any() and (c2 & ~c1).any()
    assert torch.equal(lab == 7, c1) and torch.equal(lab == 9, c2 & ~c1)
    assert torch.allclose(canvas[:3][:, _copypaste_erode(c1, 1)], torch.tensor(1.0))  # the near copy stays
    assert (canvas[:3][:, _copypaste_erode(~(c1 | c2), 1)] == 0).all()  # the soft mask reaches 1 px only
    before, lab_before = canvas.clone(), lab.clone()
    never = lambda x: pytest.fail("color made for a hidden copy")  # noqa: E731
    hidden = ((15, 20, 10, 10), crop(0.3, -1.0), ones, -1.0)
    assert copypaste.paste_region(canvas, lab, hidden, 11, g, 0, augment=never) is not None
    # h_t of 200 px on a 40-row canvas: find a seed whose copy lands off the canvas, then paste it
    seed = next(k for k in range(100) if not covered(copypaste.paste_region(
        canvas.clone(), lab.clone(), first, 13, torch.Generator().manual_seed(k), 200)).any())
    copypaste.paste_region(canvas, lab, first, 13, torch.Generator().manual_seed(seed), 200, augment=never)
    assert torch.equal(canvas, before) and torch.equal(lab, lab_before)


@pytest.mark.parametrize("M,paste_times", [(2, (0, 0)), (2, (2, 4)), (4, (1, 0)), (8, (2, 4)), (3, (3, 1))])
def test_copypaste_slots_shapes_identity_unused(M, paste_times):
    """M in {0 (= --paste-times 0 0), 2, 4, 8}, any e1, e2: shapes and dtypes, slots 0/1 identity on canvases
    j and M + j, unused slots -1 (with an identity matrix), pasted slots on their round's canvases."""
    H, W = 48, 96
    sample, images, _, regions = _copypaste_build(M, paste_times, seed=3, H=H, W=W)
    T = 2 + sum(paste_times)
    R = sum(int(r.max()) + 1 for r in regions)
    assert sample["slots"] == T and sample["sources"] == [f"s{j}" for j in range(M)]
    assert sample["images"].dtype == torch.uint8 and sample["images"].shape == (2 * M, 3, H, W)
    assert sample["labels"].dtype == torch.int32 and sample["labels"].shape == (2 * M, H, W)
    assert sample["transforms"].dtype == torch.float32 and sample["transforms"].shape == (R, T, 3, 3)
    assert sample["canvas_of"].dtype == torch.int64 and sample["canvas_of"].shape == (R, T)
    co, A = sample["canvas_of"], sample["transforms"]
    source = torch.from_numpy(np.repeat(np.arange(M), [int(r.max()) + 1 for r in regions]))
    assert torch.equal(co[:, 0], source) and torch.equal(co[:, 1], source + M)
    assert torch.equal(A[:, :2], torch.eye(3).expand(R, 2, 3, 3))
    e1 = paste_times[0]
    assert ((co[:, 2:2 + e1] == -1) | ((co[:, 2:2 + e1] >= 0) & (co[:, 2:2 + e1] < M))).all()
    assert ((co[:, 2 + e1:] == -1) | (co[:, 2 + e1:] >= M)).all()
    assert torch.equal(A[co == -1], torch.eye(3).expand(int((co == -1).sum()), 3, 3))
    if sum(paste_times) == 0:  # the M = 0 row: every canvas is its source
        assert torch.equal(sample["images"], torch.stack(images * 2))
    else:
        assert (co[:, 2:] >= 0).any()
    assert sample["labels"].min() >= 0 and sample["labels"].max() < R * T


@pytest.mark.parametrize("jitter", [0, 16])
def test_copypaste_depth_aware_scale_about_horizon(jitter):
    """Every pasted slot is a scaling about the horizon row c = H // 2 (the copy moves along its viewing ray),
    up to the rounding of its top row (0.5 px) and the height jitter h_t (16 px at 384 rows -> 4 px at 96);
    the scale lies in [0.2, 2] (up to the rounding of the size), the same on both axes up to that rounding."""
    H, W = 96, 192
    sample = _copypaste_build(4, (2, 4), seed=11, H=H, W=W, height_jitter=jitter)[0]
    A, co = sample["transforms"].double(), sample["canvas_of"]
    used = A[:, 2:][co[:, 2:] >= 0]
    assert len(used) > 20
    sy, sx = used[:, 1, 1], used[:, 0, 0].abs()
    assert (sy > 0.2 - 0.1).all() and (sy < 2 + 1e-6).all() and ((sx - sy).abs() < 0.2).all()
    horizon = 2 * (H // 2) / H - 1  # normalized y of the horizon (pixel-edge row c)
    moved = (used[:, 1, 1] * horizon + used[:, 1, 2] - horizon) * H / 2  # pixels the horizon row moves
    assert moved.abs().max() <= 0.5 + jitter * H / 384 + 1e-4
    if jitter:
        assert moved.abs().max() > 1.0


def test_copypaste_same_seed_same_sample():
    a = _copypaste_build(4, (2, 4), seed=5, photometric=True)[0]
    b = _copypaste_build(4, (2, 4), seed=5, photometric=True)[0]
    for k in ("images", "labels", "transforms", "canvas_of"):
        assert torch.equal(a[k], b[k]), k
    plain = _copypaste_build(4, (2, 4), seed=5, photometric=False)[0]  # color changes only: same geometry
    for k in ("labels", "transforms", "canvas_of"):
        assert torch.equal(a[k], plain[k]), k
    assert not torch.equal(a["images"], plain["images"])
    import copypaste
    images, disps, regions = _copypaste_synthetic(4, 64, 128, seed=5)
    c = copypaste.build_sample(images, disps, regions, list("abcd"), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a["labels"], c["labels"])


def test_copypaste_augment_canvas_matrix_is_exact():
    """augment_canvas: G sends a pixel exactly where it went (an image of its own coordinates), and the
    geometry does not depend on the photometric switch."""
    import copypaste
    H, W = 64, 128
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    coords = torch.stack([xs / (W - 1), ys / (H - 1), torch.zeros_like(xs)])  # float image in [0, 1]
    mean, std = torch.tensor(copypaste.IMAGENET_MEAN)[:, None, None], torch.tensor(copypaste.IMAGENET_STD)[:, None, None]
    grid = _copypaste_pixel_grid(H, W)
    flips = set()
    for seed in range(8):
        out, G = copypaste.augment_canvas(coords, torch.Generator().manual_seed(seed), photometric=False)
        _, G2 = copypaste.augment_canvas(coords, torch.Generator().manual_seed(seed), photometric=True)
        assert out.shape == (3, H, W) and out.dtype == torch.float32 and G.dtype == torch.float32
        assert torch.equal(G, G2)
        value = out * std + mean  # the source coordinates this output pixel shows
        src = grid @ torch.linalg.inv(G.double()).T  # G^-1 g: where each output pixel came from
        col = ((src[..., 0] + 1) * W / 2 - 0.5) / (W - 1)
        row = ((src[..., 1] + 1) * H / 2 - 0.5) / (H - 1)
        inner = (col > 1 / W) & (col < 1 - 1 / W) & (row > 1 / H) & (row < 1 - 1 / H)  # away from clamped borders
        assert (value[0][inner] - col[inner]).abs().max() < 1e-3 and (value[1][inner] - row[inner]).abs().max() < 1e-3
        flips.add(bool(G[0, 0] < 0))
        assert 1 <= abs(float(G[0, 0])) <= 2 and 1 <= float(G[1, 1]) <= 2  # enlarged, never shrunk
    assert flips == {True, False}
    out, _ = copypaste.augment_canvas(torch.zeros(3, H, W, dtype=torch.uint8) + 128, torch.Generator().manual_seed(0))
    assert out.shape == (3, H, W) and torch.isfinite(out).all()


def test_copypaste_size_mismatch_and_single_region(tmp_path):
    """Documented handling: a region map at another resolution is resized nearest (same sample as the map
    upsampled beforehand); a wrong aspect ratio stops loading with an error naming the file; a single-region
    source keeps slots 0/1 and has all pasted slots unused."""
    import copypaste
    M, H, W = 2, 64, 128
    images, disps, regions = _copypaste_synthetic(M, H, W, seed=7)
    small = [r[::2, ::2] for r in regions]
    big = [np.repeat(np.repeat(r, 2, 0), 2, 1) for r in small]
    a = copypaste.build_sample(images, disps, small, ["a", "b"], generator=torch.Generator().manual_seed(0))
    b = copypaste.build_sample(images, disps, big, ["a", "b"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"], b["images"])
    # single region: one region, never pasted (it covers the canvas), slots 0/1 on its canvases
    regions[1] = np.zeros((H, W), np.int32)
    s = copypaste.build_sample(images, disps, regions, ["a", "b"], generator=torch.Generator().manual_seed(0),
                               photometric=False)
    R0 = int(regions[0].max()) + 1
    assert s["canvas_of"].shape[0] == R0 + 1
    assert s["canvas_of"][R0].tolist() == [1, 3] + [-1] * (s["slots"] - 2)
    # the loader: wrong aspect ratio is an error naming the file; missing inputs name the command
    from PIL import Image
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    np.save(tmp_path / "d.npy", disps[0])
    np.save(tmp_path / "r.npy", np.zeros((H, H), np.int32))
    with pytest.raises(ValueError, match="r.npy"):
        copypaste.load_source(str(tmp_path / "x.png"), str(tmp_path / "d.npy"), str(tmp_path / "r.npy"), (H, W))
    with pytest.raises(FileNotFoundError, match="group.py"):
        copypaste.load_source(str(tmp_path / "x.png"), str(tmp_path / "d.npy"), str(tmp_path / "no.npy"), (H, W))
    np.save(tmp_path / "r.npy", small[0])
    _, _, reg = copypaste.load_source(str(tmp_path / "x.png"), str(tmp_path / "d.npy"), str(tmp_path / "r.npy"), (H, W))
    assert reg.shape == (H, W) and reg.max() + 1 == len(np.unique(small[0]))


def _copypaste_inputs(data, work, split="train"):
    """WORK/disp and WORK/regions for a toy-city split from its ground truth (no other stage needed):
    regions = gtFine instance ids made contiguous, disparity = the disparity PNG in pixels (one scale)."""
    import depth
    from PIL import Image
    os.makedirs(os.path.join(work, "disp"), exist_ok=True)
    os.makedirs(os.path.join(work, "regions"), exist_ok=True)
    for path in [f.path for f in depth.list_frames(data, split=split)]:
        stem = depth.image_stem(path)
        inst = np.asarray(Image.open(depth.split_file(data, "gtFine", split, stem, "gtFine_instanceIds.png")))
        np.save(os.path.join(work, "regions", f"{stem}.npy"), np.unique(inst, return_inverse=True)[1]
                .reshape(inst.shape).astype(np.int32))
        d = depth.read_disparity_png(depth.split_file(data, "disparity", split, stem, "disparity.png"))
        np.save(os.path.join(work, "disp", f"{stem}.npy"), d.astype(np.float32))


def test_copypaste_depthmix_orders_by_true_depth_across_images(tmp_path):
    """A region pasted onto another image lands behind or in front of it by true depth, with disparity maps of
    one scale whose maxima differ (as `depth.py predict` writes them). Divided by each image's maximum the order
    flips in both cases below (and this test fails)."""
    import copypaste
    from PIL import Image
    H, W = 64, 128
    car = np.zeros((H, W), np.int32)
    car[30:50, 40:80] = 1
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / "img.png")
    np.save(tmp_path / "regions.npy", car)
    # (car's disparity, its image's maximum elsewhere, the canvas's disparity, the canvas's maximum, in front?)
    for car_disp, car_max, canvas_disp, canvas_max, in_front in ((0.3, 0.3, 0.8, 8.0, False),
                                                                 (2.0, 20.0, 0.3, 0.3, True)):
        for name, value, peak in (("car", car_disp, car_max), ("canvas", canvas_disp, canvas_max)):
            d = np.where(car > 0, value, 0.05) if name == "car" else np.full((H, W), value)
            d = d.astype(np.float32)
            d[0, 0] = peak                    # the image's maximum: one near pixel in a corner
            np.save(tmp_path / f"{name}.npy", d)
        (image, disp, regions), (canvas_image, canvas_disp_map, _) = (
            copypaste.load_source(tmp_path / "img.png", tmp_path / f"{name}.npy", tmp_path / "regions.npy", (H, W))
            for name in ("car", "canvas"))
        crop = torch.cat([image, disp[None]])[:, 30:50, 40:80]
        region = ((30, 40, 20, 40), crop, regions[30:50, 40:80] == 1, float(crop[3].max()))
        for seed in range(10):    # depth-aware scales s in [0.2, 2]: 0.3 s < 0.8 and 2 s > 0.3 for every s
            canvas = torch.cat([canvas_image, canvas_disp_map[None]]).clone()
            labels = torch.zeros(H, W, dtype=torch.int32)
            matrix = copypaste.paste_region(canvas, labels, region, 7, torch.Generator().manual_seed(seed), 2)
            assert matrix is not None
            landed = labels == 7
            assert bool(landed.any()) == in_front, (car_disp, seed)
            if in_front:    # every landed pixel is nearer than the canvas was (the corner's peak aside)
                assert (canvas[3][landed] > canvas_disp).all()


def test_copypaste_cli_end_to_end(tiny_city, tmp_path, capsys):
    """The command on the tiny toy city: epochs of samples (workers 2), previews, skip on rerun, the same
    samples as the on-the-fly dataset, a clear error when the inputs of the earlier stages are missing.
    (The reruns go through run() in this process: one subprocess start is enough.)"""
    import glob
    import copypaste
    import depth
    work = str(tmp_path / "work")
    _copypaste_inputs(tiny_city, work)
    args = ["copypaste.py", "--work", work, "--data", tiny_city, "--split", "train", "--size", "64", "128",
            "--mix", "2", "--paste-times", "1", "2", "--epochs", "2", "--preview", "1", "--seed", "3"]
    run_cli(*args, "--workers", "2")
    files = sorted(glob.glob(os.path.join(work, "samples", "epoch_*", "*.pt")))
    assert [os.path.relpath(f, work) for f in files] == [f"samples/epoch_00{e}/000000.pt" for e in (0, 1)]
    assert os.path.exists(os.path.join(work, "samples", "preview", "000000.png"))
    sample = torch.load(files[0], weights_only=True)
    assert sample["images"].shape == (4, 3, 64, 128) and sample["slots"] == 5
    dataset = copypaste.CopyPasteDataset([f.path for f in depth.list_frames(tiny_city)], os.path.join(work, "disp"),
                                         os.path.join(work, "regions"), mix=2, paste_times=(1, 2), size=(64, 128),
                                         seed=3)
    dataset.set_epoch(1)
    fly = dataset[0]
    saved = torch.load(files[1], weights_only=True)
    for k in ("images", "labels", "transforms", "canvas_of"):
        assert torch.equal(fly[k], saved[k]), k
    assert not torch.equal(sample["labels"], saved["labels"]) or not torch.equal(sample["images"], saved["images"])
    mtime = os.path.getmtime(files[0])
    threads = torch.get_num_threads()  # run() sets the thread count: restore it for the other tests
    try:
        copypaste.run(copypaste.get_args_parser().parse_args(args[1:]))
        assert "skipped 2" in capsys.readouterr().out and os.path.getmtime(files[0]) == mtime
        with pytest.raises(depth.BadInput, match="seed 3 -> 4"):  # samples of other settings are never mixed in
            copypaste.run(copypaste.get_args_parser().parse_args(args[1:-1] + ["4"]))
        os.remove(glob.glob(os.path.join(work, "disp", "*.npy"))[0])
        with pytest.raises(FileNotFoundError, match="depth.py predict"):
            copypaste.run(copypaste.get_args_parser().parse_args(args[1:] + ["--overwrite"]))
    finally:
        torch.set_num_threads(threads)


# ==========================================================================================================
# swav_dense.py
# ==========================================================================================================
import json  # noqa: E402  (swav_dense section)
import math  # noqa: E402

def _swav_translation(dy, dx, height, width):
    """Normalized-coordinate matrix of a shift by (dy, dx) pixels."""
    return torch.tensor([[1.0, 0, 2.0 * dx / width], [0, 1.0, 2.0 * dy / height], [0, 0, 1.0]])


def _swav_occlusion_sample():
    """M = 1, T = 3, 8 x 16 canvases. Source: background 0, region 1 rows 1-2 cols 1-4, region 2 rows 5-6
    cols 9-12. Region 1's slot 2 is pasted on canvas 0 shifted by (4, 6) px (rows 5-6, cols 7-10), on top of
    region 2's slot 0, which stays visible only at cols 11-12. Canvas 1's augmentation is a horizontal flip."""
    height, width, slots = 8, 16, 3
    source = np.zeros((height, width), np.int64)
    source[1:3, 1:5] = 1
    source[5:7, 9:13] = 2
    labels = np.stack([source * slots + 0, source * slots + 1])
    labels[0, 5:7, 7:11] = 1 * slots + 2
    shifts = {(r, s): (0, 0) for r in range(3) for s in range(2)}
    shifts[(1, 2)] = (4, 6)
    transforms = torch.zeros(3, slots, 3, 3)
    canvas_of = torch.full((3, slots), -1, dtype=torch.int64)
    for (r, s), (dy, dx) in shifts.items():
        transforms[r, s] = _swav_translation(dy, dx, height, width)
        canvas_of[r, s] = 0 if s in (0, 2) else 1
    augment = torch.stack([torch.eye(3), torch.diag(torch.tensor([-1.0, 1.0, 1.0]))])
    return dict(labels=torch.from_numpy(labels).int(), transforms=transforms, canvas_of=canvas_of,
                augment=augment), shifts


def _swav_expected_group(sample, shifts, canvas, row, col_aug):
    """Integer-pixel reference: the (canvas, row, augmented column) copies visible of a point, or None."""
    labels = sample["labels"].numpy()
    _, height, width = labels.shape
    slots = sample["transforms"].shape[1]
    flip = lambda c, col: width - 1 - col if c == 1 else col  # canvas 1 is flipped (its own inverse)
    label = labels[canvas, row, flip(canvas, col_aug)]
    r, s = divmod(int(label), slots)
    src_row, src_col = row - shifts[(r, s)][0], flip(canvas, col_aug) - shifts[(r, s)][1]
    found = set()
    for s2 in range(slots):
        c2 = int(sample["canvas_of"][r, s2])
        if c2 < 0:
            continue
        row2, col2 = src_row + shifts[(r, s2)][0], src_col + shifts[(r, s2)][1]
        if 0 <= row2 < height and 0 <= col2 < width and labels[c2, row2, col2] == r * slots + s2:
            found.add((c2, row2, flip(c2, col2)))
    return found if len(found) >= 2 else None


def _swav_pixel(points, height, width):
    return np.floor((points.numpy() + 1) * np.array([width, height]) / 2).astype(int)  # (N, 2) col, row


def test_swav_dense_pixel_positives_exact_and_occlusion():
    import swav_dense
    sample, shifts = _swav_occlusion_sample()
    points, canvas, group, num_groups = swav_dense.pixel_positives(
        sample["labels"], sample["transforms"], sample["canvas_of"], sample["augment"], 300,
        torch.Generator().manual_seed(3))
    # the same seeds, replayed through the integer-pixel reference
    seeds = swav_dense.uniform_points(2, 300, torch.Generator().manual_seed(3))
    expected = []
    for c in range(2):
        for col, row in _swav_pixel(seeds[c], 8, 16):
            e = _swav_expected_group(sample, shifts, c, row, col)
            if e is not None:
                expected.append(e)
    cols_rows = _swav_pixel(points, 8, 16)
    got = [set() for _ in range(num_groups)]
    for (col, row), c, g in zip(cols_rows, canvas.tolist(), group.tolist()):
        got[g].add((c, row, col))
    assert got == expected
    assert any(len(e) == 3 for e in expected)  # region 1: all three copies visible
    # occluded copies never appear: region 2's slot 0 behind the paste, the background under it
    labels = sample["labels"]
    for (col, row), c in zip(cols_rows, canvas.tolist()):
        assert not (c == 0 and row in (5, 6) and 7 <= col <= 10 and labels[0, row, col] != 5)
    rejected = sum(1 for c in range(2) for col, row in _swav_pixel(seeds[c], 8, 16)
                   if _swav_expected_group(sample, shifts, c, row, col) is None)
    assert rejected > 0 and num_groups == 600 - rejected
    # the corresponding points are bilinear-exact: sampling a map of source coordinates agrees per group
    assert torch.isfinite(points).all() and points.abs().max() <= 1


def test_swav_dense_region_positives_use_T_and_offset_batches():
    import swav_dense
    sample, _ = _swav_occlusion_sample()  # T = 3 slots, M = 1 (label // M would be the label itself)
    gen = torch.Generator().manual_seed(0)
    points, canvas, group = swav_dense.region_positives(sample["labels"], sample["augment"], 3, 500, gen)
    cols_rows = _swav_pixel(points, 8, 16)
    labels = sample["labels"].numpy()
    for (col, row), c, g in zip(cols_rows, canvas.tolist(), group.tolist()):
        col = 15 - col if c == 1 else col
        assert g == labels[c, row, col] // 3
    assert set(group.tolist()) == {0, 1, 2}
    # two samples in one batch: canvases and region ids of the second are offset (3 regions, 2 canvases)
    pos = swav_dense.batch_positives([sample, sample], 50, 400, torch.Generator().manual_seed(1))
    _, canvas, group, num = pos["region"]
    assert num == 6 and set(group[canvas >= 2].tolist()) == {3, 4, 5} and set(group[canvas < 2].tolist()) == {0, 1, 2}
    _, canvas, group, num = pos["pixel"]
    first = group[canvas < 2]
    assert first.max() < group[canvas >= 2].min() and group.max() == num - 1


def _swav_sinkhorn_reference(scores, eps, iters):
    """SwAV's K x B layout, float64."""
    q = torch.exp(scores.double() / eps).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).t()


def test_swav_dense_sinkhorn_sums_and_float64_reference():
    import swav_dense
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(500, 40), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(40, 40), dim=0)
    q = swav_dense.sinkhorn(scores, 0.05, 3)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double(), _swav_sinkhorn_reference(scores, 0.05, 3), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(q.sum(1), torch.ones(500))  # each sample's code sums to 1 (SwAV: columns)
    torch.testing.assert_close(q.sum(0), torch.full((40,), 500 / 40), rtol=0.25, atol=0)  # prototypes ~ B/K
    q = swav_dense.sinkhorn(scores, 0.05, 200)  # converged: equipartition
    torch.testing.assert_close(q.sum(0), torch.full((40,), 500 / 40), rtol=1e-3, atol=0)
    # eps 0.01: exp(S / eps) alone overflows fp32 at S > 0.89; the maximum subtracted first keeps it finite
    q = swav_dense.sinkhorn(scores * 0.1 + 0.9, 0.01, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.double(), _swav_sinkhorn_reference(scores * 0.1 + 0.9, 0.01, 3), rtol=1e-4, atol=1e-9)


def test_swav_dense_group_mean_codes_hand_worked():
    import swav_dense
    codes = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [0, 0, 1]])
    group = torch.tensor([0, 0, 1, 0])
    means = swav_dense.group_mean_codes(codes, group, 3)
    torch.testing.assert_close(means, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0], [0, 0, 0]]))
    torch.testing.assert_close(means[group][1], torch.tensor([1 / 3, 1 / 3, 1 / 3]))


def test_swav_dense_loss_hand_worked_and_per_point_form():
    import swav_dense
    scores = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    targets = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]])  # group codes; point n is in group n
    # row 0: -log(e^10 / (e^10 + 2)); row 1: -(0.5 log 1/3 + 0.5 log 1/3) = log 3
    expected = (math.log(1 + 2 * math.exp(-10)) + math.log(3)) / 2
    assert abs(swav_dense.swav_cross_entropy(scores / 0.1, targets, torch.tensor([0, 1])).item() - expected) < 1e-6
    # the group sums equal Eqn 6 written per point, -mean_n sum_k qbar_{g(n),k} log softmax(S_n / tau)_k
    torch.manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(300, 8), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(20, 8), dim=1).t()
    group = torch.randint(0, 40, (300,))
    qbar = swav_dense.group_mean_codes(swav_dense.sinkhorn(s), group, 40)
    per_point = -(qbar[group] * torch.log_softmax(s / 0.1, dim=1)).sum(1).mean()
    torch.testing.assert_close(swav_dense.swav_cross_entropy(s / 0.1, qbar, group), per_point)
    # Eqn 7 weights: lam 1 and 0 use one level only
    c = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    feats = torch.randn(2, 8, 4, 8, requires_grad=True)
    sample, _ = _swav_occlusion_sample()
    pos = swav_dense.batch_positives([sample], 50, 50, torch.Generator().manual_seed(0))
    total, parts = swav_dense.dense_swav_loss(feats, pos, c, lam=0.5)
    torch.testing.assert_close(total, 0.5 * parts["pixel"] + 0.5 * parts["region"])
    total, parts = swav_dense.dense_swav_loss(feats, {"pixel": pos["pixel"]}, c, lam=1.0)
    torch.testing.assert_close(total, parts["pixel"])


def test_swav_dense_loss_finite_at_small_eps_and_tau():
    """eps 0.01 and tau 0.01: exp(S / 0.01) overflows fp32 for S > 0.89 (the old fused loss gave NaN)."""
    import swav_dense
    torch.manual_seed(0)
    sample, _ = _swav_occlusion_sample()
    pos = swav_dense.batch_positives([sample], 50, 50, torch.Generator().manual_seed(0))
    c = torch.nn.functional.normalize(torch.randn(20, 8), dim=1).requires_grad_()
    feats = torch.randn(2, 8, 4, 8)
    feats[0] = c[0, :, None, None].detach() * 5  # canvas 0 on prototype 0: S = 1, exp(S / 0.01) > fp32's max
    feats.requires_grad_()
    loss, parts = swav_dense.dense_swav_loss(feats, pos, c, lam=0.5, eps=0.01, tau=0.01)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert torch.isfinite(feats.grad).all() and torch.isfinite(c.grad).all()


def test_swav_dense_sample_features_is_bilinear_with_border():
    """grid_sample at cell centres returns the cells; between them the bilinear mix; outside the border cell."""
    import swav_dense
    features = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8)
    centre = lambda j, n: (2 * j + 1) / n - 1
    points = torch.tensor([[centre(2, 8), centre(1, 4)], [centre(2.5, 8), centre(1, 4)], [-1.0, -1.0],
                           [centre(7, 8), centre(3, 4)]])
    canvas = torch.tensor([0, 0, 1, 1])
    got = swav_dense.sample_features(features, canvas, points[[1, 3, 0, 2]])
    expected = torch.stack([(features[0, :, 1, 2] + features[0, :, 1, 3]) / 2, features[0, :, 3, 7],
                            features[1, :, 1, 2], features[1, :, 0, 0]])
    torch.testing.assert_close(got, expected)


def test_swav_dense_feature_function_shapes_and_model_file(tmp_path):
    import swav_dense
    model = swav_dense.build_model("resnet18", num_prototypes=10)
    assert {"backbone", "fpn", "head", "projector", "prototypes"} <= {n for n, _ in model.named_children()}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert model.semantic_features(x).shape == (2, 128, 16, 24)
        assert model(x).shape == (2, 128, 16, 24)
    torch.testing.assert_close(model.prototypes.weight.flatten(1).norm(dim=1), torch.ones(10))
    path = str(tmp_path / "model.pt")
    torch.save({"arch": "resnet18", "model": model.state_dict(), "args": {}, "num_prototypes": 10}, path)
    loaded, ckpt = swav_dense.load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    with pytest.raises(FileNotFoundError, match="swav_dense.py"):
        swav_dense.load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="backbone-weights"):
        swav_dense.load_backbone_weights(model, str(tmp_path / "missing.pth"))
    import torchvision
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), str(tmp_path / "r18.pth"))
    model = swav_dense.build_model("resnet18", 10, backbone_weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.backbone.conv1.weight, resnet.conv1.weight)


def _swav_write_block_samples(work, count=2, mix=2, size=(32, 64), seed=0):
    """Samples in the DESIGN.md format without pasting (T = 2): each source a grid of colored blocks."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size
    folder = os.path.join(work, "samples", "epoch_000")
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        images, labels, offset = [], [], 0
        for _ in range(mix):
            regions = (torch.arange(height)[:, None] // 8) * (width // 16) + torch.arange(width)[None] // 16
            colors = torch.randint(0, 256, (int(regions.max()) + 1, 3), generator=gen)
            images.append(colors[regions].permute(2, 0, 1).to(torch.uint8))
            labels.append(regions + offset)
            offset += int(regions.max()) + 1
        labels = torch.stack(labels)
        sample = {"images": torch.stack(images * 2), "labels": torch.cat([labels * 2, labels * 2 + 1]).int(),
                  "transforms": torch.eye(3).repeat(offset, 2, 1, 1),
                  "canvas_of": torch.stack([torch.arange(offset) // (offset // mix),
                                            torch.arange(offset) // (offset // mix) + mix], 1),
                  "slots": 2, "sources": [f"s{j}" for j in range(mix)]}
        torch.save(sample, os.path.join(folder, f"{k:06d}.pt"))


SWAV_TINY = ["--arch", "resnet18", "--num-prototypes", "16", "--pixel-samples", "64", "--region-samples", "64",
             "--workers", "0", "--device", "cpu", "--no-progress", "--log-every", "1"]


def test_swav_dense_cli_amp_step_finite(tmp_path):
    _swav_write_block_samples(str(tmp_path))
    proc = run_cli("swav_dense.py", "--work", tmp_path, "--steps", "2", *SWAV_TINY)
    assert "amp torch.bfloat16" in proc.stdout  # CPU AMP is bf16 autocast
    records = [json.loads(line) for line in open(tmp_path / "swav" / "log.jsonl")]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    import swav_dense
    model, ckpt = swav_dense.load_model(str(tmp_path / "swav" / "model.pt"))
    assert ckpt["arch"] == "resnet18" and model.prototypes.weight.shape[0] == 16
    final = swav_dense.run(swav_dense.get_args_parser().parse_args(["--work", str(tmp_path), "--steps", "2",
                                                                    *SWAV_TINY]))
    assert final.endswith("model.pt") and len(open(tmp_path / "swav" / "log.jsonl").readlines()) == 2  # skipped


def test_swav_dense_resume_equals_straight_run(tmp_path):
    import swav_dense
    _swav_write_block_samples(str(tmp_path / "a"), count=2)
    _swav_write_block_samples(str(tmp_path / "b"), count=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--steps", "6", "--no-amp", "--save-every", "100", *SWAV_TINY]
        parser = swav_dense.get_args_parser()
        swav_dense.run(parser.parse_args(["--work", str(tmp_path / "a"), *common]))
        swav_dense.run(parser.parse_args(["--work", str(tmp_path / "b"), "--stop-after", "3", *common]))
        assert not os.path.exists(tmp_path / "b" / "swav" / "model.pt")
        swav_dense.run(parser.parse_args(["--work", str(tmp_path / "b"), "--resume", *common]))
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "a" / "swav" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "swav" / "model.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=1e-6, msg=key)
    losses = lambda w: [json.loads(l)["loss"] for l in open(tmp_path / w / "swav" / "log.jsonl")]
    assert losses("a") == losses("b")


def _swav_tiny_city_samples(city, work, count=4, mix=2):
    """Copy-paste samples of the tiny toy city built with copypaste.build_sample from ground truth
    (disparity PNGs, instance ids as regions)."""
    import copypaste
    import depth
    from PIL import Image
    paths = [f.path for split in ("train", "val") for f in depth.list_frames(city, split=split)]
    sources = []
    for path in paths:
        stem = depth.image_stem(path)
        split = "train" if "/train/" in path else "val"
        image = np.array(Image.open(path).convert("RGB"))
        disp = depth.read_disparity_png(depth.split_file(city, "disparity", split, stem, "disparity.png"))
        disp = np.maximum(disp, disp[disp > 0].min()) / disp.max()
        inst = np.array(Image.open(depth.split_file(city, "gtFine", split, stem, "gtFine_instanceIds.png")))
        sources.append((image, disp, np.unique(inst, return_inverse=True)[1].reshape(inst.shape), stem))
    folder = os.path.join(work, "samples", "epoch_000")
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        chosen = [sources[(k + j) % len(sources)] for j in range(mix)]
        sample = copypaste.build_sample(*[list(x) for x in zip(*chosen)], generator=torch.Generator().manual_seed(k))
        torch.save(sample, os.path.join(folder, f"{k:06d}.pt"))


def test_swav_dense_loss_falls_on_tiny_city(tiny_city, tmp_path):
    import swav_dense
    _swav_tiny_city_samples(tiny_city, str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = swav_dense.get_args_parser().parse_args(
            ["--work", str(tmp_path), "--steps", "30", "--warmup-epochs", "1", "--no-amp", *SWAV_TINY,
             "--pixel-samples", "200", "--region-samples", "200"])
        swav_dense.run(args)
    finally:
        torch.set_num_threads(threads)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "swav" / "log.jsonl")]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses

# ==========================================================================================================
# cluster.py
# ==========================================================================================================
# labelId -> trainId of cityscapesScripts/helpers/labels.py, typed in independently of cluster.py's table
CLUSTER_OFFICIAL_TRAINIDS = {0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255,
                             11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8,
                             22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16,
                             32: 17, 33: 18}
CLUSTER_OFFICIAL_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                            "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                            "bus", "train", "motorcycle", "bicycle"]


def test_cluster_labelids_to_trainids_official_table():
    import cluster
    ids = np.arange(256, dtype=np.uint8)
    got = cluster.labelids_to_trainids(ids)
    for i in range(256):
        assert got[i] == CLUSTER_OFFICIAL_TRAINIDS.get(i, 255), i
    assert cluster.TRAIN_CLASSES == CLUSTER_OFFICIAL_CLASSES
    picie = cluster.labelids_to_picie(ids)
    assert list(picie[7:34]) == list(range(27)) and (picie[:7] == 255).all() and (picie[34:] == 255).all()
    assert len(cluster.PICIE_CLASSES) == 27 and cluster.PICIE_CLASSES[0] == "road"


def test_cluster_hand_worked_confusion_and_scores():
    import cluster
    gt = np.array([0, 0, 0, 1, 1, 2, 2, 2, 255])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    conf = cluster.confusion_matrix(pred, gt, 3, 4)          # class 3 absent from the ground truth
    assert conf.tolist() == [[2, 0, 1, 0], [1, 2, 0, 0], [0, 0, 2, 0]]
    mapping = cluster.match_clusters(conf, "iou")
    assert mapping.tolist() == [0, 1, 2]
    s = cluster.segmentation_scores(cluster.apply_matching(conf, mapping))
    # by hand: accuracy 6/8; IoU0 = 2/(3+3-2), IoU1 = 2/(3+2-2), IoU2 = 2/(2+3-2); class 3 absent
    assert s["pixel_accuracy"] == pytest.approx(0.75)
    assert s["iou"][:3] == pytest.approx([0.5, 2 / 3, 2 / 3]) and np.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((0.5 + 4 / 3) / 3) and s["absent"] == [3]
    # a fourth cluster left unmatched: its pixels are errors that predict no class
    conf4 = cluster.confusion_matrix(np.array([0, 0, 1, 1, 1, 2, 2, 3]), gt[:8], 4, 3)
    mapping4 = cluster.match_clusters(conf4, "iou")
    assert mapping4.tolist() == [0, 1, 2, 255]
    s4 = cluster.segmentation_scores(cluster.apply_matching(conf4, mapping4))
    # IoU0 = 2/(2+3-2), IoU1 = 2/(3+2-2), IoU2 = 2/(2+3-2): the unmatched pixel is a false negative of class 2
    assert s4["pixel_accuracy"] == pytest.approx(6 / 8)
    assert s4["iou"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    # 'pixels' matching maximises matched pixels: a big cluster goes where it covers most
    conf_p = np.array([[50, 40], [0, 10]])
    assert cluster.match_clusters(conf_p, "pixels").tolist() == [0, 1]
    assert cluster.match_clusters(np.array([[10, 40], [30, 0]]), "pixels").tolist() == [1, 0]


def test_cluster_perfect_prediction_and_permutation_invariance():
    import cluster
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 19, size=(2, 40, 50)).astype(np.uint8)
    gt[:, :5] = 255
    perm = rng.permutation(19)
    for objective in ("iou", "pixels"):
        conf = cluster.confusion_matrix(perm[gt.clip(0, 18)], gt, 19, 19)
        s = cluster.segmentation_scores(cluster.apply_matching(conf, cluster.match_clusters(conf, objective)))
        assert s["pixel_accuracy"] == 1.0 and s["miou"] == 1.0
    # a noisy prediction: permuting cluster ids permutes the matching and leaves every score unchanged
    noisy = np.where(rng.random(gt.shape) < 0.4, rng.integers(0, 19, gt.shape), gt.clip(0, 18))
    conf = cluster.confusion_matrix(noisy, gt, 19, 19)
    base = cluster.segmentation_scores(cluster.apply_matching(conf, cluster.match_clusters(conf)))
    conf_perm = cluster.confusion_matrix(perm[noisy], gt, 19, 19)
    moved = cluster.segmentation_scores(cluster.apply_matching(conf_perm, cluster.match_clusters(conf_perm)))
    assert moved["pixel_accuracy"] == pytest.approx(base["pixel_accuracy"])
    assert moved["iou"] == pytest.approx(base["iou"]) and moved["miou"] == pytest.approx(base["miou"])
    assert cluster.match_clusters(conf_perm)[perm].tolist() == cluster.match_clusters(conf).tolist()


def test_cluster_agglomerative_recovers_groups():
    import cluster
    rng = np.random.default_rng(1)
    centres = np.linalg.qr(rng.normal(size=(32, 6)))[0].T           # 6 orthonormal directions in 32-D
    group = rng.permutation(np.repeat(np.arange(6), 15))              # 90 prototypes, 15 per group
    protos = centres[group] + 0.08 * rng.normal(size=(90, 32))
    protos *= rng.uniform(0.5, 3, size=(90, 1))                        # norms must not matter (cosine)
    found = cluster.cluster_prototypes(protos, 6)
    assert found.dtype == np.int64 and sorted(set(found.tolist())) == list(range(6))
    pairs = set(zip(group.tolist(), found.tolist()))
    assert len(pairs) == 6                                             # the same partition up to renaming
    # ties everywhere: identical prototypes still give exactly C clusters; K < C gives K
    assert len(set(cluster.cluster_prototypes(np.ones((8, 4)), 3).tolist())) == 3
    assert cluster.cluster_prototypes(np.eye(4), 10).tolist() == [0, 1, 2, 3]


def test_cluster_assign_pixels_nearest_prototype():
    import cluster
    protos = torch.eye(4)[:3]                                          # 3 prototypes in 4-D
    proj = torch.zeros(1, 4, 2, 2)
    proj[0, :, 0, 0] = torch.tensor([5.0, 0, 0, 1])                    # nearest prototype 0
    proj[0, :, 0, 1] = torch.tensor([0, 0.1, 0, 0])                    # 1 (scale does not matter)
    proj[0, :, 1, :] = torch.tensor([0, 0, 2.0, 0])[:, None]           # 2
    out = cluster.assign_pixels(proj, protos, np.array([7, 8, 9]), (2, 2))
    assert out.tolist() == [[[7, 8], [9, 9]]]
    big = cluster.assign_pixels(proj, protos, np.array([0, 1, 2]), (8, 8), chunk=5)
    assert big.shape == (1, 8, 8) and big[0, 0, 0] == 0 and big[0, -1, -1] == 2


@pytest.fixture(scope="session")
def cluster_swav_model(tmp_path_factory):
    """A swav_dense.py model.pt (resnet18, 16 prototypes, random weights) in the stage's dict format."""
    import swav_dense
    torch.manual_seed(0)
    model = swav_dense.build_model("resnet18", num_prototypes=16)
    path = tmp_path_factory.mktemp("swav") / "model.pt"
    torch.save({"arch": "resnet18", "model": model.state_dict(), "args": {}, "num_prototypes": 16}, path)
    return str(path)


def cluster_work_with_model(tmp_path, model_path):
    import shutil
    os.makedirs(tmp_path / "swav", exist_ok=True)
    shutil.copy(model_path, tmp_path / "swav" / "model.pt")
    return str(tmp_path)


def test_cluster_end_to_end_tiny_city(tiny_city, cluster_swav_model, tmp_path):
    import json
    import cluster
    from PIL import Image
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    run_cli("cluster.py", "--work", work, "--data", tiny_city, "--dataset", "toycity", "--clusters", "9",
            "--save-pred", "--pca", "1", "--device", "cpu", "--no-amp")
    out = os.path.join(work, "cluster")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["protocol"] == "cpcdr" and metrics["matching"] == "iou" and metrics["clusters"] == 9
    assert 0 <= metrics["pixel_accuracy"] <= 1 and 0 <= metrics["miou"] <= 1
    assert "wall" in metrics["absent_classes"] and metrics["iou"]["wall"] is None
    assignment = np.load(os.path.join(out, "assignment.npy"))
    assert assignment.dtype == np.int64 and assignment.shape == (16,) and set(assignment.tolist()) == set(range(9))
    # the saved predictions reproduce the reported accuracy
    correct = valid = 0
    for stem, _, label_path in cluster.list_eval_pairs(tiny_city, "toycity", "val"):
        pred = np.asarray(Image.open(os.path.join(out, "pred", f"{stem}.png")))
        gt = cluster.labelids_to_trainids(np.asarray(Image.open(label_path)))
        assert pred.shape == gt.shape and pred.dtype == np.uint8
        assert set(np.unique(pred).tolist()) <= set(range(19)) | {255}
        correct += int(((pred == gt) & (gt != 255)).sum())
        valid += int((gt != 255).sum())
        color = np.asarray(Image.open(os.path.join(out, "pred_color", f"{stem}.png")))
        assert color.shape == (gt.shape[0], 3 * gt.shape[1], 3)
    assert correct / valid == pytest.approx(metrics["pixel_accuracy"])
    assert len(os.listdir(os.path.join(out, "pca"))) == 1
    # the random-initialization baseline of the same architecture, and the PiCIE protocol, need only flags
    args = cluster.get_args_parser().parse_args(["--work", work, "--data", tiny_city, "--dataset", "toycity",
                                                 "--init-random", "--protocol", "picie", "--device", "cpu", "--no-amp",
                                                 "--out", os.path.join(work, "cluster_random")])
    random_metrics = cluster.run(args)
    assert random_metrics["init"] == "random" and random_metrics["matching"] == "pixels"
    assert random_metrics["clusters"] == 16 and len(random_metrics["iou"]) == 27   # K = 16 < C = 27

# ==========================================================================================================
# finetune.py
# ==========================================================================================================
def finetune_args(work, data, *extra):
    import finetune
    return finetune.get_args_parser().parse_args(
        ["--work", work, "--data", data, "--dataset", "toycity", "--device", "cpu", "--workers", "0",
         "--batch-size", "2", *map(str, extra)])


def test_finetune_one_cpu_step_cli(tiny_city, cluster_swav_model, tmp_path):
    import json
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    run_cli("finetune.py", "--work", work, "--data", tiny_city, "--dataset", "toycity", "--init", "swav",
            "--iters", "1", "--batch-size", "2", "--crop", "32", "64", "--device", "cpu", "--workers", "0")
    out = os.path.join(work, "finetune")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["init"] == "swav" and metrics["arch"] == "resnet18" and 0 <= metrics["miou"] <= 1
    assert len(metrics["iou"]) == 19 and metrics["iou"]["wall"] is None
    model = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert model["arch"] == "resnet18" and model["num_classes"] == 19
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert lines[0]["iteration"] == 1 and np.isfinite(lines[0]["loss"]) and lines[-1]["eval"]


def test_finetune_swav_transfer_exact_and_other_arch_fails(cluster_swav_model):
    import finetune
    ckpt = torch.load(cluster_swav_model, weights_only=True)
    torch.manual_seed(1)
    net = finetune.SegmentationNet("resnet18", 19)
    classifier = {k: v.clone() for k, v in net.classifier.state_dict().items()}
    keys = finetune.transfer_swav_weights(net, ckpt)
    expected = sorted(k for k in ckpt["model"] if k.split(".")[0] in ("backbone", "fpn", "head"))
    assert keys == expected and len(keys) > 100
    state = net.state_dict()
    assert sorted(k for k in state if k.startswith("net.")) == ["net." + k for k in expected]
    for k in expected:
        assert torch.equal(state["net." + k], ckpt["model"][k]), k
    for k, v in classifier.items():                                     # the new classifier is untouched
        assert torch.equal(net.classifier.state_dict()[k], v)
    assert not any(".projector." in k or ".prototypes." in k for k in state)
    with pytest.raises(ValueError, match="resnet18"):
        finetune.transfer_swav_weights(finetune.SegmentationNet("resnet34", 19), ckpt)
    out = net(torch.zeros(1, 3, 64, 96))
    assert out.shape == (1, 19, 64, 96)                                 # x4 upsampling to the input size


def test_finetune_poly_schedule_values():
    import finetune
    assert finetune.poly_lr(0.01, 0, 100) == pytest.approx(0.01)
    assert finetune.poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert finetune.poly_lr(0.01, 90, 100) == pytest.approx(0.01 * 0.1 ** 0.9)
    assert finetune.poly_lr(0.01, 100, 100) == 0.0
    assert finetune.poly_lr(0.02, 25, 100, power=1.0) == pytest.approx(0.015)


def test_finetune_fraction_subset_and_folds_deterministic():
    import finetune
    stems = [f"city_{i:06d}_000019" for i in range(160)]
    a = finetune.select_fraction(stems, 1 / 16, seed=0)
    assert len(a) == 10 and a == sorted(a) and set(a) <= set(stems)
    assert a == finetune.select_fraction(list(reversed(stems)), 1 / 16, seed=0)      # input order irrelevant
    assert a != finetune.select_fraction(stems, 1 / 16, seed=1)
    assert set(a) <= set(finetune.select_fraction(stems, 1 / 4, seed=0))            # nested fractions
    assert len(finetune.select_fraction(stems[:3], 0.01, seed=0)) == 1
    held = [finetune.kfold_split(stems[:23], 5, f)[1] for f in range(5)]
    assert sorted(sum(held, [])) == sorted(stems[:23]) and {len(h) for h in held} == {4, 5}
    train0, held0 = finetune.kfold_split(stems[:23], 5, 0)
    assert not set(train0) & set(held0) and len(train0) + len(held0) == 23
    # batches: every epoch visits every item once; a pure function of (iteration, seed)
    seen = sum((finetune.batch_indices(i, 4, 12, seed=3) for i in range(3)), [])
    assert sorted(seen) == list(range(12))
    assert finetune.batch_indices(5, 4, 12, seed=3) == finetune.batch_indices(5, 4, 12, seed=3)


def test_finetune_augmentation_shapes_and_padding():
    import finetune
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (40, 80), dtype=np.uint8)
    img, lab = finetune.random_scale_crop_flip(image, label, (20, 40), (0.5, 0.5), (32, 64), True, rng)
    assert img.shape == (32, 64, 3) and lab.shape == (32, 64)
    assert (lab[10:] == 255).all() and (lab[:, 20:] == 255).all()        # 10 x 20 image padded with ignore
    img, lab = finetune.random_scale_crop_flip(image, label, (40, 80), (1, 1), (40, 80), False, rng)
    assert np.array_equal(img, image) and np.array_equal(lab, label)     # scale 1, full crop, no flip


def test_finetune_overfits_a_few_toy_images(tiny_city, tmp_path):
    import finetune
    # two 64 x 128 training images, no augmentation, evaluated on themselves
    args = finetune_args(str(tmp_path), tiny_city, "--init", "scratch", "--arch", "resnet18", "--iters", "40",
                         "--lr", "0.05", "--scale-range", "1", "1", "--no-flip", "--crop", "64", "128",
                         "--val-split", "train", "--no-amp")
    torch.set_num_threads(1)
    metrics = finetune.run(args)
    assert metrics["pixel_accuracy"] > 0.8 and metrics["miou"] > 0.35
    assert metrics["iou"]["road"] > 0.8 and metrics["iou"]["sky"] > 0.6


def test_finetune_resume_is_exact(tiny_city, cluster_swav_model, tmp_path):
    import finetune
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    common = ["--iters", "4", "--crop", "32", "64", "--save-every", "0"]
    torch.set_num_threads(1)
    finetune.run(finetune_args(work, tiny_city, *common, "--out", os.path.join(work, "straight")))
    resumed = os.path.join(work, "resumed")
    assert finetune.run(finetune_args(work, tiny_city, *common, "--out", resumed, "--stop-after", "2")) is None
    assert torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)["iteration"] == 2
    # --stop-after is a global iteration: resumed at 2, it stops once iteration 3 is done
    again = finetune_args(work, tiny_city, *common, "--out", resumed, "--resume", "--stop-after", "3")
    assert finetune.run(again) is None
    assert torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)["iteration"] == 3
    finetune.run(finetune_args(work, tiny_city, *common, "--out", resumed, "--resume"))
    a = torch.load(os.path.join(work, "straight", "model.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "model.pt"), weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ==========================================================================================================
# bad input and interruption (#18): every stage's real command line refuses in one line on stderr, exit 2 for
# bad usage and 1 for bad data, and leaves no output or temporary file; a row per case, so new flags join it
# ==========================================================================================================
@pytest.fixture(scope="session")
def bad_base(tiny_city, cluster_swav_model, tmp_path_factory):
    """The work folder every row starts from (linked into the row's folder, never written): a random depth model,
    positive disparity of both splits, ground-truth regions of train, a swav model, two samples."""
    import glob
    import shutil
    import depth
    base = tmp_path_factory.mktemp("bad_base")
    for split in ("val", "train"):
        if split == "val":
            _copypaste_inputs(tiny_city, str(base), split)
            shutil.rmtree(base / "regions")
        else:
            _copypaste_inputs(tiny_city, str(base), split)
    for path in glob.glob(str(base / "disp" / "*.npy")):  # the sky's 0: a positive disparity as predict writes
        np.save(path, np.maximum(np.load(path), 1e-3).astype(np.float32))
    torch.manual_seed(0)
    os.makedirs(base / "depth")
    torch.save({"arch": "resnet18", "model": depth.DepthNet().state_dict(), "size": [64, 128], "crop_bottom": 0.0,
                "min_depth": 0.1, "max_depth": 100.0, "num_scales": 4}, base / "depth" / "model.pt")
    os.makedirs(base / "swav")
    shutil.copy(cluster_swav_model, base / "swav" / "model.pt")
    _swav_write_block_samples(str(base), count=2, mix=2)
    return base


def _put(path, write):
    """Replace path (a link into bad_base, or nothing) by a new file written by write(path)."""
    path = str(path)
    data = open(path, "rb").read() if os.path.exists(path) else b""
    if os.path.lexists(path):
        os.remove(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path, data)


def _first(data, split):
    import depth
    return depth.list_frames(data, split=split)[0].stem


def _disp(split, change):
    """Setup: the first image's disparity of split replaced by change(disparity)."""
    return lambda work, data: _put(work / "disp" / f"{_first(data, split)}.npy",
                                   lambda p, _: np.save(p, change(np.load(_BAD_BASE[0] / "disp" / os.path.basename(p)))))


def _nan_patch(d):
    d = d.copy()
    d[:8, :8] = np.nan
    return d


def _truncate(rel):
    return lambda work, data: _put(work / rel.format(stem=_first(data, "val"), train=_first(data, "train")),
                                   lambda p, b: open(p, "wb").write(b[:len(b) // 2]))


def _remove(rel):
    return lambda work, data: os.remove(work / rel)


def _torch_put(rel, make):
    return lambda work, data: _put(work / rel, lambda p, b: torch.save(make(b, work, data), p))


def _both(*setups):
    return lambda work, data: [setup(work, data) for setup in setups]


def _sample_change(change):
    def make(b, work, data):
        import io
        sample = torch.load(io.BytesIO(b), weights_only=True)
        change(sample)
        return sample
    return _torch_put("samples/epoch_000/000000.pt", make)


def _checkpoint(stage, argv, **extra):
    """Setup: a checkpoint made with other settings (argv), as a killed run of them would leave it."""
    def make(b, work, data):
        import importlib
        args = importlib.import_module(stage).get_args_parser().parse_args(argv.format(work=work, data=data).split())
        return {"args": vars(args), **extra}
    return make


def _settings(stage, folder, argv, marker=None):
    """Setup: FOLDER (with its final marker) made with other settings (argv)."""
    def setup(work, data):
        import depth
        import importlib
        args = importlib.import_module(stage).get_args_parser().parse_args(argv.format(work=work, data=data).split())
        depth.record_settings(str(work / folder), depth.run_settings(args), True)
        if marker:
            (work / folder / marker).write_text("{}")
    return setup


_BAD_BASE = []
_DT = "train --data {data} --work {work} --size 64 128 --frame-offset 1 --batch-size 2 --workers 0 --no-progress " \
      "--steps 1"
_DP = "predict --work {work} --data {data} --split val --no-progress"
_DE = "eval --work {work} --data {data} --split val"
_G = "--work {work} --data {data} --split val --size 64 128 --segments 100 --no-progress"
_C = "--work {work} --data {data} --split train --size 64 128 --mix 2 --paste-times 1 1 --no-progress"
_S = "--work {work} --steps 1 --arch resnet18 --num-prototypes 16 --pixel-samples 64 --region-samples 64 " \
     "--workers 0 --device cpu --no-progress"
_K = "--work {work} --data {data} --dataset toycity --size 32 64 --no-progress"
_F = "--work {work} --data {data} --dataset toycity --iters 1 --batch-size 2 --crop 32 64 --device cpu " \
     "--workers 0 --no-progress"
_DEPTH_MODEL = "depth/model.pt"
BAD_ROWS = [  # (stage, argv, exit code, a word of the message, setup(work, data) or None)
    # ----- bad usage: exit 2 (argparse) -----
    *[("depth", _DT + extra, 2, word, None) for extra, word in [
        (" --steps 0", "--steps"), (" --steps -1", "--steps"), (" --epochs 0", "--epochs"),
        (" --batch-size -2", "--batch-size"), (" --batch-size 0", "--batch-size"), (" --size -64 128", "--size"),
        (" --size 70 128", "multiples of 32"), (" --frame-offset 0", "--frame-offset"),
        (" --save-every 0", "--save-every"), (" --log-every 0", "--log-every"), (" --workers -1", "--workers"),
        (" --lr nan", "--lr"), (" --crop-bottom 1", "--crop-bottom")]],
    ("depth", "predict --work {work}", 2, "--images", None),
    ("depth", _DP + " --batch-size 0", 2, "--batch-size", None),
    *[("group", _G + extra, 2, word, None) for extra, word in [
        (" --segments 0", "--segments"), (" --segments -5", "--segments"), (" --tau -1", "--tau"),
        (" --workers -1", "--workers"), (" --shard 2/2", "--shard"), (" --size 0 64", "--size")]],
    *[("copypaste", _C + extra, 2, word, None) for extra, word in [
        (" --epochs -1", "--epochs"), (" --mix 0", "--mix"), (" --paste-times -1 2", "--paste-times"),
        (" --workers -1", "--workers")]],
    *[("swav_dense", _S + extra, 2, word, None) for extra, word in [
        (" --steps 0", "--steps"), (" --epochs 0", "--epochs"), (" --lam 2", "--lam"),
        (" --batch-samples -1", "--batch-samples"), (" --tau -1", "--tau"), (" --save-every 0", "--save-every"),
        (" --log-every 0", "--log-every"), (" --workers -1", "--workers"), (" --eps 0", "--eps")]],
    *[("cluster", _K + extra, 2, word, None) for extra, word in [
        (" --clusters -1", "--clusters"), (" --clusters 0", "--clusters"), (" --pca -1", "--pca")]],
    *[("finetune", _F + extra, 2, word, None) for extra, word in [
        (" --iters 0", "--iters"), (" --fraction 2", "--fraction"), (" --fraction 0", "--fraction"),
        (" --batch-size 0", "--batch-size"), (" --folds 5 --fold 5", "--fold"), (" --arch vgg", "--arch"),
        (" --workers -1", "--workers"), (" --log-every 0", "--log-every")]],
    # ----- bad data: exit 1, the file named -----
    ("depth", _DP, 1, "depth.py train", _remove(_DEPTH_MODEL)),
    ("depth", _DP, 1, "unusable", _truncate(_DEPTH_MODEL)),
    ("depth", _DP, 1, "no 'size'", lambda work, data: _put(work / _DEPTH_MODEL, lambda p, _: os.symlink(
        _BAD_BASE[0] / "swav" / "model.pt", p))),                       # a swav_dense model given to predict
    ("depth", _DP, 1, "unusable", _torch_put(_DEPTH_MODEL, lambda b, w, d: {  # weights of another network
        **torch.load(_BAD_BASE[0] / _DEPTH_MODEL, weights_only=True), "arch": "resnet34"})),
    ("depth", _DT + " --resume", 1, "batch_size", _torch_put("depth/checkpoint.pt", _checkpoint(
        "depth", _DT + " --batch-size 4", step=1, noise=torch.zeros(1)))),
    ("depth", _DT, 1, "--resume", _both(_remove(_DEPTH_MODEL), _torch_put("depth/checkpoint.pt", lambda b, w, d: {}))),
    ("depth", _DE, 1, "NaN", _disp("val", _nan_patch)),
    ("depth", _DE, 1, "positive", _disp("val", lambda d: d * 0)),
    ("depth", _DE, 1, "aspect", _disp("val", lambda d: d[:, :64])),
    ("depth", _DE, 1, "unusable", _truncate("disp/{stem}.npy")),
    ("depth", _DE, 1, "depth.py predict", lambda work, data: os.remove(work / "disp" / f"{_first(data, 'val')}.npy")),
    ("group", _G, 1, "NaN", _disp("val", _nan_patch)),
    ("group", _G, 1, "negative", _disp("val", lambda d: -d)),
    ("group", _G, 1, "positive", _disp("val", lambda d: d * 0)),
    ("group", _G, 1, "float", _disp("val", lambda d: (d * 100).astype(np.int32))),
    ("group", _G, 1, "unusable", _truncate("disp/{stem}.npy")),
    ("group", _G, 1, "depth.py predict", lambda work, data: os.remove(work / "disp" / f"{_first(data, 'val')}.npy")),
    ("group", _G, 1, "method", _both(lambda work, data: __import__("depth").record_settings(
        str(work / "regions"), {"method": "felzenszwalb"}, True), lambda work, data: np.save(
        work / "regions" / "x.npy", np.zeros((2, 2), np.int32)))),  # maps of other settings are never mixed in
    ("depth", _DT, 1, "steps 5 -> 1", _settings("depth", "depth", _DT + " --steps 5")),  # finished with others
    ("swav_dense", _S, 1, "steps 5 -> 1", _settings("swav_dense", "swav", _S + " --steps 5")),
    ("cluster", _K, 1, "size", _settings("cluster", "cluster", _K + " --size 64 128", "metrics.json")),
    ("finetune", _F, 1, "iters", _settings("finetune", "finetune", _F + " --iters 5", "metrics.json")),
    ("copypaste", _C + " --overwrite", 1, "NaN", _disp("train", _nan_patch)),
    ("copypaste", _C + " --overwrite", 1, "negative", _disp("train", lambda d: -d)),
    ("copypaste", _C + " --overwrite", 1, "unusable", _truncate("regions/{train}.npy")),
    ("copypaste", _C + " --overwrite", 1, "integer", lambda work, data: _put(work / "regions" / f"{_first(data, 'train')}.npy",
                                                            lambda p, _: np.save(p, np.zeros((64, 128))))),
    ("copypaste", _C + " --overwrite", 1, "group.py", lambda work, data: os.remove(work / "regions" / f"{_first(data, 'train')}.npy")),
    ("copypaste", _C + " --mix 3", 1, "--mix", None),
    ("swav_dense", _S + " --overwrite", 1, "copypaste", lambda work, data: __import__("shutil").rmtree(work / "samples")),
    ("swav_dense", _S + " --overwrite", 1, "NaN", _sample_change(lambda s: s["transforms"].fill_(float("nan")))),
    ("swav_dense", _S + " --overwrite", 1, "lacks", _sample_change(lambda s: s.pop("canvas_of"))),
    ("swav_dense", _S + " --overwrite", 1, "unusable", _truncate("samples/epoch_000/000000.pt")),
    ("swav_dense", _S + " --resume", 1, "lr", _torch_put("swav/checkpoint.pt", _checkpoint(
        "swav_dense", _S + " --lr 0.5", step=1))),
    ("swav_dense", _S, 1, "--resume", _both(_remove("swav/model.pt"), _torch_put("swav/checkpoint.pt",
                                                                               lambda b, w, d: {}))),
    ("cluster", _K + " --clusters 1000", 1, "above", None),
    ("cluster", _K + " --model {work}/" + _DEPTH_MODEL, 1, "num_prototypes", None),
    ("cluster", _K, 1, "unusable", _truncate("swav/model.pt")),
    ("cluster", _K, 1, "swav_dense.py", _remove("swav/model.pt")),
    ("finetune", _F, 1, "swav_dense.py", _remove("swav/model.pt")),
    ("finetune", _F + " --swav-model {work}/" + _DEPTH_MODEL, 1, "num_prototypes", None),
    ("finetune", _F + " --resume", 1, "lr", _torch_put("finetune/checkpoint.pt", _checkpoint(
        "finetune", _F + " --lr 0.5", iteration=1, model={}, optimizer={}, scaler={}))),
    ("finetune", _F, 1, "--resume", _torch_put("finetune/checkpoint.pt", lambda b, w, d: {})),
]
RECORDS = ("settings.json", "log.jsonl")  # what a refused run may leave: the folder's settings, an empty log


def _bad_row_work(bad_base, tmp_path, setup, data):
    """The row's work folder: bad_base linked file by file, then the row's setup."""
    import pathlib
    _BAD_BASE[:] = [bad_base]
    work = tmp_path / "w"
    for folder, _, files in os.walk(bad_base):
        os.makedirs(work / os.path.relpath(folder, bad_base), exist_ok=True)
        for f in files:
            os.symlink(os.path.join(folder, f), work / os.path.relpath(folder, bad_base) / f)
    if setup:
        setup(pathlib.Path(work), data)
    return work


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("stage, argv, code, word, setup", BAD_ROWS,
                         ids=[f"{r[0]}-{i}-{r[3]}" for i, r in enumerate(BAD_ROWS)])
def test_validate_bad_input_table(stage, argv, code, word, setup, bad_base, tiny_city, tmp_path, capsys):
    import importlib
    work = _bad_row_work(bad_base, tmp_path, setup, tiny_city)
    before, threads = _tree(work), torch.get_num_threads()
    capsys.readouterr()
    try:
        importlib.import_module(stage).main(argv.format(work=work, data=tiny_city).split())
        got = 0
    except SystemExit as e:
        got = e.code
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert got == code, err
    assert word in err and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and (code == 2 or str(work) in last or "--" in word), last  # the file is named
    left = [f for f in _tree(work) - before if os.path.basename(f) not in RECORDS]
    assert not left and not [f for f in _tree(work) if ".tmp" in f], left


def test_validate_real_exit_code_and_no_traceback(bad_base, tiny_city, tmp_path):
    """A row through a real interpreter: the exit status and the one line a user sees (no traceback)."""
    work = _bad_row_work(bad_base, tmp_path, _truncate(_DEPTH_MODEL), tiny_city)
    proc = subprocess.run([sys.executable, "depth.py", *_DP.format(work=work, data=tiny_city).split()], cwd=HERE,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"depth.py predict: error: {work}/depth/model.pt: unusable "
                                                + proc.stderr.split(": unusable ", 1)[1].strip()], proc.stderr


def test_validate_swav_resume_without_checkpoint_keeps_model(bad_base, tiny_city, tmp_path, capsys):
    import swav_dense
    work = _bad_row_work(bad_base, tmp_path, None, tiny_city)
    mtime = os.path.getmtime(work / "swav" / "model.pt")
    swav_dense.main((_S + " --resume").format(work=work).split())
    assert "skipping" in capsys.readouterr().out and os.path.getmtime(work / "swav" / "model.pt") == mtime


def test_validate_log_cut_to_the_resumed_step_and_stale_temporaries(tmp_path):
    import json
    import depth
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    with depth.resume_log(str(log), 2) as f:
        f.write(json.dumps({"step": 3}) + "\n")
    assert [json.loads(line)["step"] for line in open(log)] == [1, 2, 3]
    with depth.resume_log(str(log), 0):                                 # a fresh run: a fresh log
        pass
    assert log.read_text() == ""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, alive = tmp_path / f"a.npy.tmp{dead.stdout.strip()}", tmp_path / f"b.npy.tmp{os.getpid()}"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    depth.remove_stale_temporaries(str(tmp_path))
    assert not stale.exists() and alive.exists()


def test_validate_resume_check_and_settings_record(tmp_path, capsys):
    import argparse
    import depth
    args = argparse.Namespace(batch_size=4, lr=0.1, workers=2, force_resume=False)
    depth.check_resume({"batch_size": 4, "lr": 0.1, "workers": 0}, args, "ckpt")  # workers do not change the run
    with pytest.raises(depth.BadInput, match="batch_size 2 -> 4"):
        depth.check_resume({"batch_size": 2, "lr": 0.1}, args, "ckpt")
    args.force_resume = True
    depth.check_resume({"batch_size": 2, "lr": 0.1}, args, "ckpt")
    depth.record_settings(str(tmp_path), {"size": [16, 32]}, False)
    depth.record_settings(str(tmp_path), {"size": (64, 128)}, False)  # no output yet: the settings are replaced
    np.save(tmp_path / "a.npy", np.zeros(1))
    depth.record_settings(str(tmp_path), {"size": [64, 128]}, False)   # the same, as JSON
    with pytest.raises(depth.BadInput, match=r"size \[64, 128\] -> \[32, 64\].*--overwrite"):
        depth.record_settings(str(tmp_path), {"size": [32, 64]}, False)
    depth.record_settings(str(tmp_path), {"size": [32, 64]}, True)
    assert "32" in (tmp_path / "settings.json").read_text()
    old = tmp_path / "old"   # outputs without settings.json (another tool, an older version): a warning says so
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    capsys.readouterr()
    depth.record_settings(str(old), {"size": [32, 64]}, False, "metrics.json")
    assert "but no settings.json" in capsys.readouterr().err
    depth.record_settings(str(old), {"size": [32, 64]}, False, "metrics.json")
    assert "warning" not in capsys.readouterr().err


# ==========================================================================================================
# finetune.py --task instance (Mask R-CNN, mask AP) and KITTI folds
# ==========================================================================================================
def test_instance_targets_cityscapes_and_kitti_decoders():
    import finetune
    ids = np.full((6, 8), 7, np.int64)               # road (stuff)
    ids[0, :3] = 26                                  # a car crowd region: labelId only, no instance
    ids[1:3, 1:4] = 26001                            # a car
    ids[4, 6] = 24000                                # a 1-pixel person, instance index 0
    ids[5, :2] = 29001                               # caravan: an instance, but not an evaluated class
    masks, label_ids = finetune.instance_masks(ids, "cityscapes")
    assert label_ids.tolist() == [24, 26] and masks.sum(axis=(1, 2)).tolist() == [1, 6]
    target = finetune.instance_target(ids, "cityscapes")
    assert target["labels"].tolist() == [1, 3]                          # person 1, car 3 (0 = background)
    assert target["boxes"].tolist() == [[6, 4, 7, 5], [1, 1, 4, 3]]     # pixel edges: a 1-pixel box is 1 x 1
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, 6, 8)
    kitti = np.zeros((6, 8), np.uint16)              # devkit: labelId * 256 + k, k = 0: no instance
    kitti[:] = 7 * 256 + 1                           # road with an index: stuff, ignored
    kitti[0, :3] = 26 * 256                          # car pixels without an instance
    kitti[1:3, 1:4], kitti[3, 0], kitti[4, 6] = 26 * 256 + 1, 26 * 256 + 2, 24 * 256 + 1
    masks, label_ids = finetune.instance_masks(kitti, "kitti")
    assert label_ids.tolist() == [24, 26, 26] and masks.sum(axis=(1, 2)).tolist() == [1, 6, 1]
    empty = finetune.instance_target(np.full((4, 4), 7), "cityscapes")
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 4)


def test_instance_mask_ap_perfect_empty_and_saved_format(tmp_path):
    import finetune
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 20, 30), bool)
    masks[0, 2:8, 3:12], masks[1, 10:18, 5:9], masks[2, 12:19, 15:29] = True, True, True
    label_ids = np.array([24, 26, 26])
    gt = finetune.rle_annotations(0, masks, label_ids)
    perfect = finetune.mask_ap([(20, 30)], gt, finetune.rle_annotations(0, masks, label_ids, [0.9, 0.8, 0.7]))
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ap50"] == pytest.approx(1.0)
    assert perfect["ap_per_class"]["car"] == pytest.approx(1.0) and perfect["ap_per_class"]["bus"] is None
    assert "bus" in perfect["absent_classes"] and "car" not in perfect["absent_classes"]
    empty = finetune.mask_ap([(20, 30)], gt, [])
    assert empty["ap"] == 0.0 and empty["ap50"] == 0.0 and empty["ap_per_class"]["person"] == 0.0
    wrong = finetune.mask_ap([(20, 30)], gt, finetune.rle_annotations(0, masks, [26, 24, 24], [0.9, 0.8, 0.7]))
    assert wrong["ap"] == 0.0                                            # right masks, wrong classes
    scores = rng.random(3)
    finetune.save_cityscapes_instances(str(tmp_path), "city_000000_000019", masks, label_ids, scores)
    lines = open(tmp_path / "city_000000_000019.txt").read().split("\n")
    assert lines[0] == f"masks/city_000000_000019_000.png 24 {scores[0]:.6f}"
    from PIL import Image                                              # parsed as the Cityscapes evaluator does
    rows = [line.split() for line in lines if line]
    back = np.array([np.asarray(Image.open(tmp_path / r[0])) > 0 for r in rows])
    back_ids, back_scores = [int(r[1]) for r in rows], np.array([float(r[2]) for r in rows])
    assert np.array_equal(back, masks) and back_ids == [24, 26, 26]
    assert np.allclose(back_scores, scores, atol=1e-6)


def test_instance_swav_transfer_moves_every_backbone_and_fpn_tensor(cluster_swav_model):
    import finetune
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    ckpt = torch.load(cluster_swav_model, weights_only=True)
    torch.manual_seed(1)
    model = finetune.build_mask_rcnn("resnet18")
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    keys = finetune.transfer_swav_to_mask_rcnn(model, ckpt)
    state = model.state_dict()
    backbone = sorted(k for k in state if k.startswith(("backbone.body.", "backbone.fpn.")))
    swav = [k for k in ckpt["model"] if k.startswith(("backbone.", "fpn."))]
    assert keys == backbone and len(keys) == len(swav) == 136              # resnet18: 122 ResNet + 14 FPN tensors
    for k in swav:
        new = "backbone.body." + k[9:] if k.startswith("backbone.") else "backbone." + k
        assert torch.equal(state[new], ckpt["model"][k]), k
    for k, v in heads.items():                                            # RPN, box and mask heads untouched
        assert torch.equal(state[k], v), k
    assert type(model.backbone.body.bn1) is torch.nn.BatchNorm2d and model.backbone.body.conv1.weight.requires_grad
    with pytest.raises(ValueError, match="resnet18"):
        finetune.transfer_swav_to_mask_rcnn(finetune.build_mask_rcnn("resnet34"), ckpt)
    import swav_dense                                                     # the paper's resnet50: 318 + 16 tensors
    ours, ref = finetune.build_mask_rcnn("resnet50"), maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                            num_classes=9).state_dict()
    assert ours.state_dict().keys() == ref.keys() and all(ours.state_dict()[k].shape == ref[k].shape for k in ref)
    swav50 = swav_dense.build_model("resnet50", num_prototypes=2).state_dict()
    moved = finetune.transfer_swav_to_mask_rcnn(ours, {"arch": "resnet50", "model": swav50})
    assert len(moved) == len([k for k in ref if k.startswith(("backbone.body.", "backbone.fpn."))]) == 334


def test_instance_schedule_is_detectron2s():
    import finetune
    lr = lambda i: finetune.warmup_step_lr(0.01, i, 24000)  # noqa: E731
    assert lr(0) == pytest.approx(1e-5) and lr(500) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert lr(1000) == pytest.approx(0.01) and lr(17999) == pytest.approx(0.01) and lr(18000) == pytest.approx(0.001)
    assert finetune.warmup_step_lr(0.01, 0, 10, warmup_iters=0) == 0.01
    assert finetune.INSTANCE_SCALES[0] * 1024 == 800 and len(finetune.INSTANCE_SCALES) == 8


def test_instance_bad_labels_named_or_skipped(tiny_city, tmp_path):
    import finetune
    from PIL import Image
    pairs = finetune.list_instance_pairs(tiny_city, "toycity", "train")
    bad = str(tmp_path / "bad_gtFine_instanceIds.png")
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(bad)
    with pytest.raises(ValueError, match="bad_gtFine_instanceIds.png is 10 x 10"):
        finetune.with_instances([(pairs[0][0], pairs[0][1], bad)], "cityscapes")
    h, w = TINY["size"]
    empty = str(tmp_path / "empty_gtFine_instanceIds.png")
    Image.fromarray(np.full((h, w), 7, np.uint16)).save(empty)
    kept, skipped = finetune.with_instances(pairs + [("empty", pairs[0][1], empty)], "cityscapes")
    assert kept == pairs and skipped == 1


def kitti_layout(city, root):
    """data_semantics/training of the tiny city's 4 annotated frames (instance PNG: labelId * 256 + k + 1)."""
    from PIL import Image
    import finetune
    for d in ("image_2", "semantic", "instance"):
        os.makedirs(os.path.join(root, "training", d), exist_ok=True)
    for n, (_, image, ids) in enumerate(finetune.list_instance_pairs(city, "toycity", "train") +
                                        finetune.list_instance_pairs(city, "toycity", "val")):
        ids = np.asarray(Image.open(ids)).astype(np.int64)
        name = f"{n:06d}_10.png"
        Image.open(image).save(os.path.join(root, "training", "image_2", name))
        Image.fromarray(np.where(ids >= 1000, ids // 1000, ids).astype(np.uint8)).save(
            os.path.join(root, "training", "semantic", name))
        kitti = np.where(ids >= 1000, (ids // 1000) * 256 + ids % 1000 + 1, ids * 256)
        Image.fromarray(kitti.astype(np.uint16)).save(os.path.join(root, "training", "instance", name))
    return str(root)


def test_instance_kitti_all_folds_in_one_call_and_rerun_skips(tiny_city, cluster_swav_model, tmp_path, capsys):
    import json
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    data = kitti_layout(tiny_city, tmp_path / "data_semantics")
    out = os.path.join(work, "kitti")
    cmd = ["finetune.py", "--work", work, "--data", data, "--dataset", "kitti", "--task", "instance", "--folds", "2",
           "--iters", "1", "--batch-size", "1", "--size", "32", "64", "--rois-per-image", "16", "--device", "cpu",
           "--workers", "0", "--no-amp", "--no-progress", "--out", out]
    run_cli(*cmd)                                                         # the interface, through the command line
    summary = json.load(open(os.path.join(out, "metrics.json")))
    assert [m["fold"] for m in summary["folds"]] == [0, 1] and [m["eval_images"] for m in summary["folds"]] == [2, 2]
    aps = [m["ap"] for m in summary["folds"]]
    assert summary["mean"]["ap"] == pytest.approx(np.mean(aps)) and summary["std"]["ap"] == pytest.approx(np.std(aps, ddof=1))
    assert summary["folds"][0]["task"] == "instance" and 0 <= summary["mean"]["ap50"] <= 1
    assert os.path.exists(os.path.join(out, "fold_1", "model.pt"))
    import finetune
    assert finetune.run(finetune.get_args_parser().parse_args(cmd[1:])) == summary    # in-process: no import cost
    assert capsys.readouterr().out.count("exists; skipping") == 2


def test_instance_evaluation_leaves_frozen_batchnorm_frozen(tiny_city):
    """evaluate_instances (and evaluate_segmentation) put every module back in its own mode: --freeze-bn's
    BatchNorms stay in eval mode during a run with --eval-every, the rest trains."""
    import finetune
    torch.manual_seed(0)
    model = finetune.build_mask_rcnn("resnet18", rois_per_image=16).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.eval()
    pairs = finetune.list_instance_pairs(tiny_city, "toycity", "val")[:1]
    scores = finetune.evaluate_instances(model, pairs, "cityscapes", (32, 64), torch.device("cpu"))
    assert 0 <= scores["ap50"] <= 1 and model.training and model.roi_heads.training
    assert norms and not any(m.training for m in norms)


def test_instance_resume_is_exact_and_save_pred(tiny_city, cluster_swav_model, tmp_path):
    import finetune
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    common = ["--task", "instance", "--iters", "3", "--size", "32", "64", "--rois-per-image", "16", "--save-every",
              "0", "--warmup-iters", "2", "--no-amp", "--no-progress"]
    torch.set_num_threads(1)
    straight = finetune.run(finetune_args(work, tiny_city, *common, "--out", os.path.join(work, "straight"),
                                          "--save-pred"))
    resumed = os.path.join(work, "resumed")
    assert finetune.run(finetune_args(work, tiny_city, *common, "--out", resumed, "--stop-after", "1")) is None
    again = finetune.run(finetune_args(work, tiny_city, *common, "--out", resumed, "--resume"))
    a = torch.load(os.path.join(work, "straight", "model.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "model.pt"), weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight["ap"] == again["ap"] and straight["eval_images"] == 2 and len(straight["ap_per_class"]) == 8
    txts = sorted(f for f in os.listdir(os.path.join(work, "straight", "pred")) if f.endswith(".txt"))
    assert txts == ["toycity_000500_000002.txt", "toycity_000501_000002.txt"]


# ==========================================================================================================
# distributed (torchrun on CPU with gloo) and the fp16 path on CPU
# ==========================================================================================================
def _torchrun(*args):
    """torchrun with 2 CPU processes (gloo); --standalone picks a free port."""
    return run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args)


def _swav_params(work):
    return torch.load(os.path.join(work, "swav", "model.pt"), weights_only=True)["model"]


def test_distributed_swav_two_processes_equal_one_and_resume(tmp_path):
    """--freeze-bn, 3 steps from the same initialization: 2 processes x 1 sample = 1 process x 2 samples (the
    same draws, Sinkhorn over both processes, gradients of the global mean); a kill and --resume under 2
    processes = the uninterrupted 2-process run. Measured: max |difference| 1.2e-7 (one vs two processes)."""
    import swav_dense
    works = {name: str(tmp_path / name) for name in ("one", "two", "resumed", "bn")}
    for work in works.values():
        _swav_write_block_samples(work, count=2)
    common = ["--steps", "3", "--no-amp", *SWAV_TINY]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parser = swav_dense.get_args_parser()
        swav_dense.run(parser.parse_args(["--work", works["one"], "--batch-samples", "2", "--freeze-bn", *common]))
        swav_dense.run(parser.parse_args(["--work", works["bn"], "--batch-samples", "2", *common]))
    finally:
        torch.set_num_threads(threads)
    _torchrun("swav_dense.py", "--work", works["two"], "--freeze-bn", *common)
    _torchrun("swav_dense.py", "--work", works["resumed"], "--freeze-bn", "--stop-after", "2", *common)
    assert not os.path.exists(os.path.join(works["resumed"], "swav", "model.pt"))
    _torchrun("swav_dense.py", "--work", works["resumed"], "--freeze-bn", "--resume", *common)
    one, two, resumed, bn = (_swav_params(works[k]) for k in ("one", "two", "resumed", "bn"))
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(resumed[key].float(), two[key].float(), rtol=0, atol=1e-6, msg=key)
    # the check can fail: trained BatchNorm (batch statistics of 2 samples) moves the parameters elsewhere
    assert max((bn[k].float() - one[k].float()).abs().max().item() for k in one) > 1e-3
    losses = lambda w: [json.loads(line)["loss"] for line in open(os.path.join(works[w], "swav", "log.jsonl"))]
    assert np.allclose(losses("two"), losses("one"), atol=1e-5) and losses("resumed") == losses("two")


@slow
def test_distributed_depth_two_processes_equal_one_and_resume(tiny_city, tmp_path):
    """depth.py train, --freeze-bn --no-automask (the tie-break noise is drawn per process), 3 steps: 2 processes
    x batch 1 = 1 process x batch 2; a kill and --resume under 2 processes = the uninterrupted 2-process run.
    Adam divides by sqrt(v): entries whose gradient is rounding noise move by up to lr either way, so a few
    entries (measured: 8 of 26.8M, at most 3.7e-5) differ by more than 1e-5; all stay below lr = 1e-4."""
    import depth
    common = ["--data", tiny_city, "--steps", "3", "--no-amp", "--freeze-bn", "--no-automask", "--device", "cpu",
              *_DEPTH_TRAIN[:5], *_DEPTH_TRAIN[7:]]
    work = {name: str(tmp_path / name) for name in ("one", "two", "resumed")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        depth.main(["train", "--work", work["one"], "--batch-size", "2", *common])
    finally:
        torch.set_num_threads(threads)
    _torchrun("depth.py", "train", "--work", work["two"], "--batch-size", "1", *common)
    _torchrun("depth.py", "train", "--work", work["resumed"], "--batch-size", "1", "--stop-after", "2", *common)
    _torchrun("depth.py", "train", "--work", work["resumed"], "--batch-size", "1", "--resume", *common)
    one, two, resumed = (torch.load(os.path.join(work[k], "depth", "model.pt"), weights_only=False) for k in work)
    diffs = torch.cat([(one[m][k].float() - two[m][k].float()).abs().flatten()
                       for m in ("model", "pose_model") for k in one[m]])
    assert diffs.max() < 1e-4 and (diffs > 1e-5).float().mean() < 1e-5, (diffs.max(), (diffs > 1e-5).sum())
    assert all(torch.equal(two[m][k], resumed[m][k]) for m in ("model", "pose_model") for k in two[m])
    losses = lambda w: [json.loads(line)["loss"] for line in open(os.path.join(work[w], "depth", "log.jsonl"))]
    assert np.allclose(losses("two"), losses("one"), atol=1e-5) and losses("resumed") == losses("two")


@slow
def test_distributed_finetune_two_processes_equal_one_and_resume(tiny_city, cluster_swav_model, tmp_path):
    """finetune.py (semantic), --freeze-bn, 3 iterations: 2 processes x batch 1 = 1 process x batch 2 (the same
    crops; the loss is the mean over the labelled pixels of both processes); kill and --resume under 2 processes =
    the uninterrupted 2-process run."""
    import finetune
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    common = ["--work", work, "--data", tiny_city, "--dataset", "toycity", "--init", "swav", "--iters", "3",
              "--crop", "32", "64", "--device", "cpu", "--workers", "0", "--no-amp", "--freeze-bn", "--save-every", "0"]
    out = {name: os.path.join(work, name) for name in ("one", "two", "resumed")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune.run(finetune.get_args_parser().parse_args([*common, "--batch-size", "2", "--out", out["one"]]))
    finally:
        torch.set_num_threads(threads)
    _torchrun("finetune.py", *common, "--batch-size", "1", "--out", out["two"])
    _torchrun("finetune.py", *common, "--batch-size", "1", "--out", out["resumed"], "--stop-after", "2")
    _torchrun("finetune.py", *common, "--batch-size", "1", "--out", out["resumed"], "--resume")
    one, two, resumed = (torch.load(os.path.join(out[k], "model.pt"), weights_only=True)["model"] for k in out)
    for key in one:
        torch.testing.assert_close(two[key].float(), one[key].float(), rtol=0, atol=1e-5, msg=key)
        assert torch.equal(resumed[key], two[key]), key
    losses = lambda k: [json.loads(line)["loss"] for line in open(os.path.join(out[k], "log.jsonl")) if "loss" in line]
    assert np.allclose(losses("two"), losses("one"), atol=1e-5), (losses("two"), losses("one"))


def test_shards_split_predict_and_copypaste_without_overlap(tiny_city, tmp_path, monkeypatch):
    """--shard i/n (or torchrun's RANK / WORLD_SIZE) on depth.py predict and copypaste.py: the shards' outputs
    are disjoint, together the unsharded run's, bit for bit; --overwrite in one shard leaves the other's files."""
    import glob
    import copypaste
    import depth
    model = {"arch": "resnet18", "model": depth.DepthNet("resnet18").state_dict(), "size": [64, 128],
             "crop_bottom": 0.0, "min_depth": depth.MIN_DEPTH, "max_depth": depth.MAX_DEPTH}
    works = {name: str(tmp_path / name) for name in ("whole", "sharded")}
    for work in works.values():
        os.makedirs(os.path.join(work, "depth"))
        torch.save(model, os.path.join(work, "depth", "model.pt"))
    predict = ["predict", "--data", tiny_city, "--split", "train", "--sequence", "--no-amp", "--no-progress"]
    depth.main([*predict, "--work", works["whole"]])
    depth.main([*predict, "--work", works["sharded"], "--shard", "0/2"])
    first = sorted(os.listdir(os.path.join(works["sharded"], "disp")))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    depth.main([*predict, "--work", works["sharded"]])
    whole = sorted(f for f in os.listdir(os.path.join(works["whole"], "disp")) if f.endswith(".npy"))
    assert len(whole) == 8 and len([f for f in first if f.endswith(".npy")]) == 4
    for name in whole:  # (the second shard added the other 4)
        assert np.array_equal(*(np.load(os.path.join(works[w], "disp", name)) for w in works)), name
    # copypaste: sample k of an epoch belongs to shard k % n
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    threads = torch.get_num_threads()
    try:
        for work in works.values():
            _copypaste_inputs(tiny_city, work)
        flags = ["--data", tiny_city, "--mix", "1", "--paste-times", "1", "1", "--size", "32", "64", "--epochs", "2",
                 "--no-progress"]
        run = lambda *extra: copypaste.run(copypaste.get_args_parser().parse_args([*flags, *extra]))  # noqa: E731
        run("--work", works["whole"])
        run("--work", works["sharded"], "--shard", "1/2")
        samples = lambda w: sorted(os.path.relpath(p, w) for p in glob.glob(os.path.join(w, "samples", "*", "*.pt")))
        assert samples(works["sharded"]) == ["samples/epoch_000/000001.pt", "samples/epoch_001/000001.pt"]
        run("--work", works["sharded"], "--shard", "0/2")
        assert samples(works["sharded"]) == samples(works["whole"]) and len(samples(works["whole"])) == 4
        for name in samples(works["whole"]):
            a, b = (torch.load(os.path.join(works[w], name), weights_only=True) for w in works)
            assert all(torch.equal(a[k], b[k]) for k in ("images", "labels", "transforms", "canvas_of")), name
        mine, theirs = (os.path.join(works["sharded"], "samples", "epoch_000", f"00000{k}.pt") for k in (0, 1))
        before = os.path.getmtime(theirs), os.path.getmtime(mine)
        os.utime(mine, (0, 0))
        run("--work", works["sharded"], "--shard", "0/2", "--overwrite")
        assert os.path.getmtime(theirs) == before[0] and os.path.getmtime(mine) > 0
    finally:
        torch.set_num_threads(threads)


def test_distributed_instance_batches_split_over_processes(tiny_city, cluster_swav_model, tmp_path):
    """--task instance under torchrun: processes 0 and 1 with batch 1 draw the two images (scale, flip, target)
    of one process with batch 2."""
    import finetune
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    args = finetune_args(work, tiny_city, "--task", "instance", "--size", "32", "64")
    pairs = finetune.list_instance_pairs(tiny_city, "toycity", "train")
    one = finetune.InstanceBatches(pairs, 0, 2, (32, 64), args)
    args_half = type(args)(**{**vars(args), "batch_size": 1})
    halves = [finetune.InstanceBatches(pairs, 0, 2, (32, 64), args_half, rank, 2) for rank in (0, 1)]
    for k in range(4):  # iteration k // 2, slot k % 2
        (a, ta), (b, tb) = one[k], halves[k % 2][k // 2]
        assert torch.equal(a, b) and all(torch.equal(ta[key], tb[key]) for key in ta), k


@slow
def test_distributed_instance_two_process_resume(tiny_city, cluster_swav_model, tmp_path):
    """finetune.py --task instance under 2 gloo processes: a kill and --resume equals the uninterrupted run."""
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    common = ["finetune.py", "--work", work, "--data", tiny_city, "--dataset", "toycity", "--task", "instance",
              "--iters", "3", "--batch-size", "1", "--size", "32", "64", "--rois-per-image", "16", "--warmup-iters",
              "2", "--device", "cpu", "--workers", "0", "--no-amp", "--no-progress", "--save-every", "0"]
    out = {name: os.path.join(work, name) for name in ("two", "resumed")}
    _torchrun(*common, "--out", out["two"])
    _torchrun(*common, "--out", out["resumed"], "--stop-after", "2")
    _torchrun(*common, "--out", out["resumed"], "--resume")
    two, resumed = (torch.load(os.path.join(out[k], "model.pt"), weights_only=True)["model"] for k in out)
    assert all(torch.equal(two[k], resumed[k]) for k in two)
    assert json.load(open(os.path.join(out["two"], "metrics.json")))["task"] == "instance"


def test_distributed_sinkhorn_rows_split_over_processes(tmp_path):
    """SwAV's distributed Sinkhorn: 2 gloo processes holding 30 and 0 (or 17 and 13) rows of the scores compute
    the rows of the one-process codes."""
    script = tmp_path / "sinkhorn_ddp.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import swav_dense\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "scores = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))\n"
        "whole = swav_dense.sinkhorn(scores, 0.5, 3)\n"
        "for cut in (30, 17):\n"
        "    part = scores[:cut] if rank == 0 else scores[cut:]\n"
        "    codes = swav_dense.sinkhorn(part, 0.5, 3, dist.group.WORLD)\n"
        "    expected = whole[:cut] if rank == 0 else whole[cut:]\n"
        "    torch.testing.assert_close(codes, expected, rtol=0, atol=1e-6)\n"
        "dist.destroy_process_group()\n")
    _torchrun(script)


@slow
def test_fp16_path_on_cpu_swav_loss_falls_and_resume_exact(tmp_path):
    """--amp-dtype float16 on CPU: CUDA's path (fp16 autocast, GradScaler, channels-last) runs and learns."""
    _swav_write_block_samples(str(tmp_path / "a"))
    _swav_write_block_samples(str(tmp_path / "b"))
    common = ["--steps", "4", "--amp-dtype", "float16", *SWAV_TINY]
    proc = run_cli("swav_dense.py", "--work", tmp_path / "a", *common)
    assert "amp torch.float16" in proc.stdout
    run_cli("swav_dense.py", "--work", tmp_path / "b", "--stop-after", "2", *common)
    run_cli("swav_dense.py", "--work", tmp_path / "b", "--resume", *common)
    ckpt = torch.load(tmp_path / "b" / "swav" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 1  # the GradScaler ran (disabled, its state is empty)
    a, b = _swav_params(str(tmp_path / "a")), _swav_params(str(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "a" / "swav" / "log.jsonl")]
    assert all(map(math.isfinite, losses)) and np.mean(losses[2:]) < losses[0] - 0.1, losses


def test_fp16_path_on_cpu_depth_runs_and_resume_exact(tiny_city, tmp_path):
    """depth.py train --amp-dtype float16 on CPU (fp16 autocast, GradScaler; the networks are channels-last):
    finite losses, the GradScaler's state in checkpoint.pt, a resumed run equal to a straight one."""
    import depth
    common = ["--data", tiny_city, "--steps", "2", "--amp-dtype", "float16", "--device", "cpu", *_DEPTH_TRAIN]
    depth.main(["train", "--work", str(tmp_path / "a"), *common])
    depth.main(["train", "--work", str(tmp_path / "b"), "--stop-after", "1", *common])
    assert torch.load(tmp_path / "b" / "depth" / "checkpoint.pt", weights_only=False)["scaler"]["scale"] > 1
    depth.main(["train", "--work", str(tmp_path / "b"), "--resume", *common])
    a, b = (torch.load(tmp_path / w / "depth" / "model.pt", weights_only=False) for w in "ab")
    assert all(torch.equal(a[m][k], b[m][k]) for m in ("model", "pose_model") for k in a[m])
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "a" / "depth" / "log.jsonl")]
    assert len(losses) == 2 and all(map(math.isfinite, losses))


def test_fp16_path_on_cpu_finetune_runs_and_resume_exact(tiny_city, cluster_swav_model, tmp_path):
    """finetune.py --amp-dtype float16 on CPU (fp16 autocast, GradScaler): finite losses, the GradScaler's state
    in checkpoint.pt, a resumed run equal to a straight one."""
    import finetune
    work = cluster_work_with_model(tmp_path, cluster_swav_model)
    common = ["--iters", "4", "--crop", "32", "64", "--save-every", "0", "--amp-dtype", "float16", "--log-every", "1"]
    finetune.run(finetune_args(work, tiny_city, *common, "--out", os.path.join(work, "a")))
    finetune.run(finetune_args(work, tiny_city, *common, "--out", os.path.join(work, "b"), "--stop-after", "2"))
    assert torch.load(os.path.join(work, "b", "checkpoint.pt"), weights_only=False)["scaler"]["scale"] > 1
    finetune.run(finetune_args(work, tiny_city, *common, "--out", os.path.join(work, "b"), "--resume"))
    a, b = (torch.load(os.path.join(work, w, "model.pt"), weights_only=True)["model"] for w in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(work, "a", "log.jsonl")) if '"loss"' in line]
    assert len(losses) == 4 and all(map(math.isfinite, losses)), losses  # 4 random crops: too few to fall


def test_gpu_check_runs_on_cpu_at_tiny_size():
    """`bench.py --gpu-check` (the fp16 CUDA path of swav_dense, depth and finetune steps) is not dead code: its
    tiny setting runs on CPU, fp16 autocast and GradScaler included, and prints its table."""
    out = run_cli("bench.py", "--device", "cpu", "--gpu-check", "--tiny", "--threads", "1").stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "s/step" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| swav_dense", "| depth", "| finetune"], out
    assert all("float16" in r and float(r.split(" | ")[2]) > 0 for r in rows), out


# ==========================================================================================================
# layouts: the readers on real layouts (bad input), and each paper preset at smoke scale
# ==========================================================================================================
def test_layouts_images_glob_stems_unique_or_refused(tiny_city, tmp_path):
    import argparse
    import shutil
    import depth
    raw = kitti_raw(tiny_city, tmp_path / "raw", drives=((1, 2), (2, 2)))
    frames = os.path.join(raw, "*", "*_sync", "image_02", "data", "*.png")  # the same file names in both drives
    args = argparse.Namespace(images=frames, data=None, limit=None)
    assert [f.stem for f in depth.frames_of(args)] == [f"2011_09_26_drive_000{d}_000000000{i}" for d in (1, 2)
                                                         for i in (0, 1)]
    for d in ("a", "b"):  # plain folders: the file name is the stem, so two frames would write one output
        os.makedirs(tmp_path / d)
        shutil.copy(os.path.join(tiny_city, "leftImg8bit", "train", "toycity", "toycity_000000_000002_leftImg8bit.png"),
                    tmp_path / d / "0000000000.png")
    with pytest.raises(ValueError, match="share the stem 0000000000"):
        depth.frames_of(argparse.Namespace(images=str(tmp_path / "*" / "*.png"), data=None, limit=None))


def test_layouts_bad_input_one_line_naming_file_and_package(tiny_city, tmp_path):
    """KITTI without calibration, a drive with a missing frame, Cityscapes without camera JSON or sequences: one
    line naming the file and the download that holds it, raised before any output is written."""
    import shutil
    import depth
    import group

    def error(call, *args):
        with pytest.raises(FileNotFoundError) as e:
            call(*args)
        assert "\n" not in str(e.value)
        return str(e.value)
    work = str(tmp_path / "work")
    group_args = lambda *a: group.get_args_parser().parse_args(["--work", work, "--size", "32", "64", *a])  # noqa: E731
    raw = kitti_raw(tiny_city, tmp_path / "raw", drives=((1, 4),))
    calib = os.path.join(raw, "2011_09_26", "calib_cam_to_cam.txt")
    os.remove(calib)
    message = error(lambda argv: depth.train(depth.get_args_parser().parse_args(argv)), ["train", "--data", raw, "--dataset", "kitti", "--work", work, *_DEPTH_TRAIN])
    assert message.startswith(calib + " is missing") and "KITTI raw 2011_09_26_calib.zip" in message
    message = error(group.run, group_args("--data", raw, "--dataset", "kitti"))
    assert calib in message and os.listdir(os.path.join(work, "regions")) in ([], ["settings.json"])
    frame = os.path.join(raw, "2011_09_26", "2011_09_26_drive_0001_sync", "image_02", "data", "0000000002.png")
    os.remove(frame)
    message = error(depth.list_frames, raw, "kitti")
    assert message.startswith(frame + " is missing") and "KITTI raw <date>_drive_<NNNN>_sync.zip" in message
    city = str(tmp_path / "city")
    shutil.copytree(tiny_city, city)
    shutil.rmtree(os.path.join(city, "camera"))
    message = error(group.run, group_args("--data", city, "--split", "val"))
    assert "camera/val/toycity/toycity_000500_*_camera.json is missing" in message
    assert "Cityscapes camera_trainvaltest.zip" in message and os.listdir(os.path.join(work, "regions")) in ([], ["settings.json"])
    shutil.rmtree(os.path.join(city, "leftImg8bit_sequence"))
    message = error(lambda argv: depth.train(depth.get_args_parser().parse_args(argv)), ["train", "--data", city, "--work", work, *_DEPTH_TRAIN])
    assert "leftImg8bit_sequence/train" in message and "Cityscapes leftImg8bit_sequence_trainvaltest.zip" in message
    assert os.listdir(os.path.join(work, "depth")) in ([], ["settings.json"])  # no output written


def run_smoke(preset, work, *roots):
    """`SCALE=smoke bash pipeline.sh PRESET ROOTS` with WORK; the output, or the test fails with its tail."""
    env = dict(os.environ, SCALE="smoke", WORK=str(work), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(["bash", "pipeline.sh", preset, *map(str, roots)], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"pipeline.sh {preset} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def check_pretraining_frames(out, work, stems, folders=("disp", "regions")):
    """Every frame has its disparity and regions, stems unique; swav_dense pre-trained on all of them."""
    assert len(set(stems)) == len(stems) and len(stems) % 8 == 0  # M 8 samples use every frame
    for folder in folders:
        assert set(stems) <= {f[:-4] for f in os.listdir(os.path.join(work, folder))}, folder
    assert f"[swav_dense] on the fly from {len(stems)} frames, {len(stems) // 8} samples of M 8" in out
    assert os.path.exists(os.path.join(work, "swav", "model.pt"))


@pytest.fixture(scope="session")
def smoke_city(tmp_path_factory):
    """A toy city for the Cityscapes presets: 8 train sequences of 5 frames (40 video frames, 8 annotated: M 8
    needs 8 sources; frames -2 0 +2 need 5), one val sequence, at 64 x 128."""
    import toycity
    root = tmp_path_factory.mktemp("smoke_city")
    return toycity.render_dataset(str(root), size=(64, 128), train_sequences=8, val_sequences=1, frames=5, seed=0)


@slow
def test_layouts_smoke_preset_cityscapes(smoke_city, tmp_path):
    import json
    import depth
    out = run_smoke("cityscapes", tmp_path, smoke_city)
    video = depth.list_frames(smoke_city, split="train", sequence=True)
    check_pretraining_frames(out, str(tmp_path), [f.stem for f in video])  # the 40 sequence frames, not 8
    for folder in ("cluster", "cluster_picie", "finetune", "finetune_scratch", "lam1/finetune",
                   "lam1/finetune_instance"):
        assert os.path.exists(os.path.join(tmp_path, folder, "metrics.json")), folder
    assert json.load(open(tmp_path / "lam1" / "swav" / "settings.json"))["lam"] == 1
    assert {"ap", "ap50"} <= set(json.load(open(tmp_path / "lam1" / "finetune_instance" / "metrics.json")))


@slow
def test_layouts_smoke_preset_cityscapes_ablation(smoke_city, tmp_path):
    import depth
    out = run_smoke("cityscapes-ablation", tmp_path, smoke_city)
    annotated = [f.stem for f in depth.list_frames(smoke_city, split="train")]
    check_pretraining_frames(out, str(tmp_path), annotated)
    for method in ("felzenszwalb", "gt"):
        assert sorted(os.listdir(tmp_path / f"proposals_{method}" / "regions")) == sorted(s + ".npy" for s in annotated)
    for variant in (".", "M4", "M2", "M0", "felzenszwalb", "gt"):
        for folder in ("swav/model.pt", "cluster/metrics.json", "finetune/metrics.json"):
            assert os.path.exists(os.path.join(tmp_path, variant, folder)), (variant, folder)
    for mix in (4, 2):
        assert f"on the fly from {len(annotated)} frames, {len(annotated) // mix} samples of M {mix}" in out


def test_layouts_smoke_preset_kitti(tmp_path_factory, tmp_path):
    import json
    import depth
    import toycity
    root = toycity.render_kitti(str(tmp_path_factory.mktemp("smoke_kitti")), drives=4, dates=2, frames=4,
                                semantic_images=5)
    out = run_smoke("kitti", tmp_path, os.path.join(root, "raw"), os.path.join(root, "data_semantics"))
    frames = depth.list_frames(os.path.join(root, "raw"), "kitti")
    assert len(frames) == 16 and len({f.number for f in frames}) == 4  # frame numbers coincide across drives
    check_pretraining_frames(out, str(tmp_path), [f.stem for f in frames])
    assert os.path.exists(tmp_path / "cluster" / "metrics.json")
    metrics = json.load(open(tmp_path / "finetune" / "metrics.json"))  # all five folds in one call
    folds = [json.load(open(tmp_path / "finetune" / f"fold_{k}" / "metrics.json"))["miou"] for k in range(5)]
    assert metrics["mean"]["miou"] == pytest.approx(np.mean(folds))
    assert metrics["std"]["miou"] == pytest.approx(np.std(folds, ddof=1), abs=1e-6)


# ==========================================================================================================
# determinism (issue #17) and report.py
# ==========================================================================================================
def _tiny_pipeline(city, work):
    """Every stage once on the tiny city, at the machine's default thread count, in this process."""
    import cluster
    import copypaste
    import depth
    import finetune
    import group
    import swav_dense
    data = ["--data", city, "--split", "train"]
    depth.main(["train", "--work", work, "--data", city, "--steps", "2", "--no-amp", *_DEPTH_TRAIN])
    depth.main(["predict", "--work", work, *data, "--no-amp", "--no-progress"])
    group.main(["--work", work, *data, "--size", "64", "128", "--segments", "300", "--no-progress"])
    copypaste.main(["--work", work, *data, "--size", "64", "128", "--mix", "2", "--paste-times", "1", "1",
                    "--epochs", "1", "--no-progress"])
    swav_dense.main(["--work", work, "--steps", "2", "--no-amp", *SWAV_TINY])
    cluster.main(["--work", work, "--data", city, "--dataset", "toycity", "--clusters", "9", "--device", "cpu",
                  "--no-amp", "--no-progress"])
    finetune.main(["--work", work, "--data", city, "--dataset", "toycity", "--init", "swav", "--iters", "2",
                   "--batch-size", "2", "--crop", "32", "64", "--device", "cpu", "--workers", "0", "--no-amp",
                   "--no-progress"])


def _same_content(a, b, path):
    """Tensors and arrays bit for bit, in nested dicts and lists; file paths and timings excepted."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a.keys() - {"args", "it_per_s", "s_per_step"}:  # (run arguments name the work folder; speeds)
            _same_content(a[key], b[key], f"{path}[{key}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_content(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif not (isinstance(a, str) and ("/" in a or os.sep in a)):  # paths name the work folder
        assert a == b, (path, a, b)


def test_determinism_the_same_command_twice_gives_the_same_bits(tiny_city, tmp_path):
    """Every stage's outputs (models, checkpoints, disparities, regions, samples, metrics, predictions), twice
    from scratch with the same commands on this machine at the same thread count: bit for bit the same."""
    import glob
    import json
    from PIL import Image
    threads = torch.get_num_threads()
    try:
        works = [str(tmp_path / name) for name in ("a", "b")]
        for work in works:
            _tiny_pipeline(tiny_city, work)
    finally:
        torch.set_num_threads(threads)
    files = sorted(os.path.relpath(p, works[0]) for p in glob.glob(os.path.join(works[0], "**", "*"), recursive=True)
                   if os.path.isfile(p))
    assert files == sorted(os.path.relpath(p, works[1]) for p in glob.glob(os.path.join(works[1], "**", "*"),
                                                                              recursive=True) if os.path.isfile(p))
    kinds = {os.path.splitext(f)[1] for f in files}
    assert {".pt", ".npy", ".json", ".jsonl"} <= kinds, kinds
    for name in files:
        a, b = (os.path.join(w, name) for w in works)
        if name.endswith(".pt"):
            _same_content(torch.load(a, weights_only=False), torch.load(b, weights_only=False), name)
        elif name.endswith(".npy"):
            assert np.array_equal(np.load(a), np.load(b)), name
        elif name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), name
        elif name.endswith(".json"):
            _same_content(json.load(open(a)), json.load(open(b)), name)
        elif name.endswith(".jsonl"):
            _same_content([json.loads(x) for x in open(a)], [json.loads(x) for x in open(b)], name)


def test_report_paired_interval_and_claims(tmp_path):
    """report.py: the paired t interval by hand (differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303), and
    the claims' verdicts from metrics files laid out as toy-ablations writes them; the plot is written."""
    from PIL import Image
    import report
    mean, low, high = report.paired_interval({0: 11.0, 1: 12.0, 2: 13.0, 3: 99.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / np.sqrt(3), abs=1e-5) and low < 0 < mean
    assert report.verdict(0.1, 2) == "supported" and report.verdict(-2, -0.1) == "contradicted"
    assert report.verdict(-1, 1) == "not distinguishable at this scale"
    for name, level in (("depth", 20.0), ("random-init", 10.0), ("no-copy-paste", 20.0)):
        for seed in range(3):
            for folder in ("cluster", "finetune"):
                os.makedirs(tmp_path / f"{name}_seed{seed}" / folder)
                value = (level + seed * (1 + (name == "depth")) + (folder == "finetune")) / 100
                json.dump({"miou": value, "pixel_accuracy": 0.5}, open(tmp_path / f"{name}_seed{seed}" / folder /
                                                                       "metrics.json", "w"))
    results = report.read_ablations(str(tmp_path))
    assert results["depth"][0] == {0: pytest.approx(20.0), 1: pytest.approx(22.0), 2: pytest.approx(24.0)}
    table = report.ablation_tables(results)
    assert "| Table 1: pre-training (ours) beats random initialization, clustering mIoU | +11.00 [" in table
    assert "supported" in table.split("random initialization, clustering mIoU")[1].splitlines()[0]
    line = table.split("Table 4: copy-paste beats none (M 0), clustering mIoU")[1].splitlines()[0]
    assert "+1.00 [" in line and "not distinguishable" in line   # differences 0, 1, 2: the interval spans 0
    report.plot_ablations(results, str(tmp_path / "plot.png"))
    assert Image.open(tmp_path / "plot.png").size[0] > 600
    table1 = report.table1_lines(str(tmp_path))   # the toy summary's Table 1 rows, from the same folders
    assert "(3 seeds of toy-ablations): pre-trained - random init, clustering mIoU" in table1[0]
    assert "+11.00 [" in table1[0] and table1[0].endswith("supported |")
    assert "run `bash pipeline.sh toy-ablations`" in report.table1_lines(str(tmp_path / "absent"))[0]
    for folder, ap50 in (("finetune_instance", 0.10), ("finetune_instance_seed1", 0.12),
                         ("finetune_instance_scratch", 0.07), ("finetune_instance_scratch_seed1", 0.08)):
        os.makedirs(tmp_path / folder)
        json.dump({"ap": ap50 / 2, "ap50": ap50, "ap_per_class": {"car": ap50, "bus": None},
                   "ap50_per_class": {"car": ap50, "bus": None}}, open(tmp_path / folder / "metrics.json", "w"))
    table = report.instance_table(str(tmp_path))
    assert "| from swav, mean of seeds 0 and 1 | 5.50 / 11.00 | 11.00 / 11.00 |" in table and "bus" not in table
    assert "(2 seeds): +3.50 [" in table   # differences 3 and 4


# ==========================================================================================================
# hygiene
# ==========================================================================================================
STAGE_FILES = ["toycity.py", "depth.py", "group.py", "copypaste.py", "swav_dense.py", "cluster.py", "finetune.py"]
NOT_PLUMBING = {"main", "run", "get_args_parser", "forward", "__init__", "__len__", "__getitem__",
                "train_step", "model_file"}  # per stage by nature: each stage trains and saves its own model


def stage_trees():
    import ast
    trees = {}
    for name in STAGE_FILES:
        path = os.path.join(HERE, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                trees[name] = (ast.parse(f.read()), f.name)
    return trees


def test_hygiene_importing_a_stage_runs_nothing():
    names = [name[:-3] for name in stage_trees()]
    code = "import importlib, io, sys\nfor name in sys.argv[1:]:\n    sys.stdout = io.StringIO()\n" \
           "    importlib.import_module(name)\n    out = sys.stdout.getvalue()\n    sys.stdout = sys.__stdout__\n" \
           "    print(name, repr(out))\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"{name} ''" for name in names], proc.stdout


def test_hygiene_stages_import_only_earlier_stages():
    import ast
    order = {name[:-3]: i for i, name in enumerate(STAGE_FILES)}
    for name, (tree, _) in stage_trees().items():
        assert ast.get_docstring(tree), f"{name} has no module docstring"
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for mod in mods:
                root = mod.split(".")[0]
                assert root != "utils", f"{name} imports utils"
                assert order.get(root, -1) <= order[name[:-3]], f"{name} imports the later stage {root}"


def test_hygiene_docstrings_functions_and_lines_short():
    """Issue #13's shape: a stage's module docstring <= 40 lines, no function over 60, no line over 120 chars."""
    import ast
    for name, (tree, path) in stage_trees().items():
        doc = tree.body[0]
        lines = doc.end_lineno - doc.lineno + 1
        assert lines <= 40, f"{name}: module docstring of {lines} lines"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{name}: {node.name} is over 60 lines"
        with open(path, encoding="utf-8") as f:
            long = [i for i, line in enumerate(f, 1) if len(line.rstrip("\n")) > 120]
        assert not long, f"{name}: lines {long} are over 120 characters"


def test_hygiene_plumbing_copies_identical():
    """A helper defined in several stage files (seed, device, image loading...) is the same code in each."""
    import ast
    seen = {}
    for name, (tree, path) in stage_trees().items():
        source = open(path, encoding="utf-8").read()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name not in NOT_PLUMBING:
                seen.setdefault(node.name, []).append((name, ast.get_source_segment(source, node)))
    for fn, copies in seen.items():
        assert len({src for _, src in copies}) == 1, f"{fn} differs between {[n for n, _ in copies]}"
