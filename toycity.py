"""Render a small synthetic urban-driving dataset ("toy city") in the Cityscapes or KITTI layout, with ground truth.

Not part of the method: the embedded default that lets every stage run on a laptop CPU in minutes, and the
data of the tests. A camera 1.5 m above a straight street drives 0.5-1.5 m per frame with small yaw changes;
the street is boxes in 3-D (road with lane markings, raised sidewalks with curbs, facades with windows, poles
with traffic signs, trees, parked and moving cars, pedestrians), ray-cast exactly (nearest hit per pixel),
textured in world coordinates (surfaces look the same from frame to frame, as self-supervised depth needs) and
shaded by surface orientation. Intrinsics: fx = fy = 0.55 W, principal point at the image center.

toycity.py -> depth.py (sequences), group.py (images, disparity), cluster.py / finetune.py (labels)

Writes, --layout cityscapes (split in train, val; stem = toycity_SSSSSS_FFFFFF; val sequences numbered from 500):
| file                                                          | content                                          |
|---------------------------------------------------------------|--------------------------------------------------|
| leftImg8bit_sequence/{split}/toycity/<stem>_leftImg8bit.png   | every frame, RGB uint8 (H, W, 3)                  |
| leftImg8bit/{split}/toycity/<stem>_leftImg8bit.png            | the annotated frame (19 of >= 30, else the middle) |
| gtFine/{split}/toycity/<stem>_gtFine_labelIds.png             | uint8 Cityscapes labelIds, annotated frames      |
| gtFine/{split}/toycity/<stem>_gtFine_instanceIds.png          | 16-bit: labelId*1000+k (car, person), else labelId |
| camera/{split}/toycity/<stem>_camera.json                     | Cityscapes schema, pixels of the rendered size   |
| disparity/{split}/toycity/<stem>_disparity.png                | every frame, uint16 p = 256 d + 1, 0 = sky       |
| pose/{split}/toycity/<stem>_pose.json                         | every frame, 4x4 camera-to-world (tests only)    |
| .complete                                                     | written last: the render finished (both layouts) |
Writes, --layout kitti (drive i in date 2011_09_{26 + i % dates}, number i // dates + 1; no velodyne):
| raw/<date>/calib_cam_to_cam.txt                                | KITTI's format; P_rect_02, S_rect_02 in pixels   |
| raw/<date>/<date>_drive_<NNNN>_sync/image_02/data/<10 digits>.png | every frame (from 0000000000), RGB uint8      |
| data_semantics/training/image_2/<NNNNNN>_10.png                | RGB uint8, frame 10 of streets of their own       |
| data_semantics/training/semantic/<NNNNNN>_10.png               | uint8 Cityscapes labelIds                         |
| data_semantics/training/instance/<NNNNNN>_10.png               | uint16 labelId*256+k (car, person: k = 1..; else 0) |

World frame: x right, y down (the road is y = 0), z along the street; the camera's axes are x right, y down,
z forward, so depth is the camera z of the hit point.

    python toycity.py --out data/toycity                     # default: 20 + 10 sequences of 30 frames, 192 x 384
    python toycity.py --out /tmp/tiny --size 64 128 --train-sequences 2 --val-sequences 2 --frames 4
    python toycity.py --out data/toykitti --layout kitti     # 4 drives (2 dates) of 30 frames + 200 images, 96 x 320
    python toycity.py --out data/toycity_full --size 1024 2048 --train-sequences 2 --val-sequences 2 --frames 3
"""
import argparse
import json
import os
import shutil
from multiprocessing import Pool

import numpy as np
from PIL import Image

# Cityscapes labelIds of the classes drawn (official table: cityscapesScripts/helpers/labels.py).
LABEL_IDS = {"road": 7, "sidewalk": 8, "building": 11, "pole": 17, "traffic sign": 20, "vegetation": 21,
             "sky": 23, "person": 24, "car": 26}
THING_CLASSES = ("person", "car")
CAMERA_HEIGHT = 1.5      # metres above the road, as the issue asks (Cityscapes' camera: about 1.2 m)
BASELINE = 0.209313      # metres, Cityscapes' stereo baseline, so disparities have Cityscapes' magnitude
FOCAL = 0.55             # fx = fy = FOCAL * W (horizontal field of view about 85 degrees)
ROAD_HALF, WALK, CURB = 6.5, 3.0, 0.15   # road half-width (2 lanes + parking each way), sidewalk, curb (m)
LANES = {"ego": 1.75, "same": 4.0, "oncoming": -1.75, "parking": 5.4}  # lane centers, x (m)
VIEW_AHEAD = 120.0       # the street ends in a cross row of buildings this far beyond the last camera
VAL_FIRST_SEQUENCE = 500
SUN = np.array([-0.35, -0.85, -0.4]) / np.linalg.norm([-0.35, -0.85, -0.4])  # towards the sun (y down)

KIND = {"road": 0, "sidewalk": 1, "building": 2, "pole": 3, "sign": 4, "vegetation": 5, "car": 6,
        "glass": 7, "wheel": 8, "person": 9}
KIND_LABEL = {0: "road", 1: "sidewalk", 2: "building", 3: "pole", 4: "traffic sign", 5: "vegetation",
              6: "car", 7: "car", 8: "car", 9: "person"}


# ----------------------------------------------------------------------------------------------------------
# The scene: a list of axis-aligned boxes, each with a kind, a color, an instance and a velocity.
# ----------------------------------------------------------------------------------------------------------
class SceneBuilder:
    def __init__(self):
        self.lo, self.hi, self.kind, self.color, self.instance, self.velocity = [], [], [], [], [], []

    def add(self, lo, hi, kind, color, instance=0, velocity=(0.0, 0.0, 0.0)):
        self.lo.append(lo), self.hi.append(hi), self.kind.append(KIND[kind])
        self.color.append(color), self.instance.append(instance), self.velocity.append(velocity)

    def arrays(self):
        return {"lo": np.array(self.lo, float), "hi": np.array(self.hi, float),
                "kind": np.array(self.kind, np.int64), "color": np.array(self.color, float),
                "instance": np.array(self.instance, np.int64), "velocity": np.array(self.velocity, float)}


def add_car(scene, rng, x, z, instance, velocity=(0.0, 0.0, 0.0)):
    """A car of plausible proportions: body, glass cabin and two wheel axles, one instance."""
    length, width = rng.uniform(3.9, 4.7), rng.uniform(1.7, 1.9)
    color = rng.choice([[0.75, 0.1, 0.1], [0.1, 0.2, 0.6], [0.85, 0.85, 0.85], [0.1, 0.1, 0.1],
                        [0.5, 0.5, 0.55], [0.9, 0.75, 0.2], [0.2, 0.45, 0.25], [0.95, 0.95, 0.95]])
    color = np.clip(color + rng.normal(0, 0.04, 3), 0, 1)
    w2, l2 = width / 2, length / 2
    scene.add((x - w2, -1.05, z - l2), (x + w2, -0.3, z + l2), "car", color, instance, velocity)
    scene.add((x - w2 + 0.1, -1.5, z - l2 * 0.45), (x + w2 - 0.1, -1.05, z + l2 * 0.5), "glass", color,
              instance, velocity)
    for dz in (-l2 * 0.65, l2 * 0.65):
        scene.add((x - w2 - 0.02, -0.62, z + dz - 0.31), (x + w2 + 0.02, 0.0, z + dz + 0.31), "wheel",
                  (0.08, 0.08, 0.08), instance, velocity)


def make_scene(rng, z_start, z_end):
    """Boxes of one street from z_start to z_end (metres), instance ids k from 0 per class."""
    scene, counts = SceneBuilder(), {"car": 0, "person": 0}
    gray = lambda v: (v, v, v)  # noqa: E731
    scene.add((-ROAD_HALF, 0.0, z_start), (ROAD_HALF, 1.0, z_end), "road", gray(0.32))
    for side in (-1, 1):
        x0, x1 = sorted((side * ROAD_HALF, side * (ROAD_HALF + WALK)))
        scene.add((x0, -CURB, z_start), (x1, 1.0, z_end), "sidewalk", (0.62, 0.6, 0.56))
        z = z_start
        while z < z_end:  # facades with varied colors, heights and gaps
            length, depth = rng.uniform(8, 22), rng.uniform(8, 14)
            if rng.random() < 0.15:  # a gap with a hedge
                xh0, xh1 = sorted((side * (ROAD_HALF + WALK + 0.5), side * (ROAD_HALF + WALK + 2.0)))
                scene.add((xh0, -1.4, z), (xh1, 0.0, z + length), "vegetation", (0.2, 0.45, 0.15))
            else:
                xb0, xb1 = sorted((side * (ROAD_HALF + WALK), side * (ROAD_HALF + WALK + depth)))
                color = rng.choice([[0.7, 0.55, 0.45], [0.8, 0.78, 0.7], [0.55, 0.35, 0.3], [0.6, 0.6, 0.65],
                                    [0.85, 0.7, 0.5], [0.45, 0.45, 0.42]]) + rng.normal(0, 0.04, 3)
                scene.add((xb0, -rng.uniform(7, 22), z), (xb1, 0.0, z + length), "building", np.clip(color, 0, 1))
            z += length + rng.uniform(0, 1.5)
        z = z_start + rng.uniform(0, 10)
        while z < z_end:  # trees and poles (some with a traffic sign) near the curb
            xs = side * (ROAD_HALF + 0.6)
            if rng.random() < 0.5:
                r, top = rng.uniform(1.0, 1.6), rng.uniform(5.0, 7.5)
                scene.add((xs - 0.15, -2.6, z - 0.15), (xs + 0.15, -CURB, z + 0.15), "vegetation", (0.35, 0.25, 0.15))
                scene.add((xs - r, -top, z - r), (xs + r, -2.5, z + r), "vegetation", (0.18, 0.42, 0.12))
            else:
                height = rng.uniform(3.5, 5.0)
                scene.add((xs - 0.08, -height, z - 0.08), (xs + 0.08, -CURB, z + 0.08), "pole", gray(0.45))
                if rng.random() < 0.6:
                    color = rng.choice([[0.85, 0.1, 0.1], [0.1, 0.3, 0.8], [0.95, 0.8, 0.1]])
                    scene.add((xs - 0.35, -height - 0.3, z - 0.12), (xs + 0.35, -height + 0.4, z - 0.08), "sign", color)
            z += rng.uniform(7, 16)
        z = z_start + rng.uniform(0, 6)
        while z < z_end:  # parked cars along the curb
            if rng.random() < 0.65:
                add_car(scene, rng, side * LANES["parking"], z, counts["car"])
                counts["car"] += 1
            z += rng.uniform(5.5, 9)
        z = z_start + rng.uniform(0, 8)
        while z < z_end:  # pedestrians on the sidewalk
            x = side * (ROAD_HALF + rng.uniform(1.2, WALK - 0.4))
            h, w, speed = rng.uniform(1.6, 1.9), rng.uniform(0.45, 0.55), rng.choice([0.0, 0.06, -0.06])
            scene.add((x - w / 2, -CURB - h, z - 0.15), (x + w / 2, -CURB, z + 0.15), "person",
                      np.clip(rng.uniform(0.05, 0.9, 3), 0, 1), counts["person"], (0.0, 0.0, speed))
            counts["person"] += 1
            z += rng.uniform(4, 12)
    for lane_x, sign in ((LANES["same"], 1), (LANES["oncoming"], -1)):  # moving cars, both directions
        for _ in range(rng.integers(1, 4)):
            add_car(scene, rng, lane_x, rng.uniform(z_start + 10, z_end - 20), counts["car"],
                    (0.0, 0.0, sign * rng.uniform(0.3, 1.2)))
            counts["car"] += 1
    far = (-60.0, -25.0, z_end), (60.0, 0.0, z_end + 10)
    scene.add(*far, "building", (0.72, 0.66, 0.6))
    return scene.arrays()


def camera_path(rng, frames):
    """(F, 4, 4) camera-to-world poses: 1.5 m high in the right lane, 0.5-1.5 m per frame, small yaw changes."""
    speed = rng.uniform(0.5, 1.5)
    yaw, x, z = rng.normal(0, 0.02), LANES["ego"] + rng.uniform(-0.3, 0.3), 0.0
    poses = []
    for _ in range(frames):
        c, s = np.cos(yaw), np.sin(yaw)
        pose = np.eye(4)
        pose[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]  # yaw about the (down) y axis
        pose[:3, 3] = [x, -CAMERA_HEIGHT, z]
        poses.append(pose)
        step = speed * rng.uniform(0.9, 1.1)
        x, z = x + step * s, z + step * c
        # small yaw changes that keep the car in its lane
        yaw = np.clip(0.9 * yaw + rng.normal(0, 0.01) - 0.01 * (x - LANES["ego"]), -0.05, 0.05)
    return np.stack(poses)


# ----------------------------------------------------------------------------------------------------------
# Rendering: exact ray casting against boxes, one screen rectangle per box (its projected corners).
# ----------------------------------------------------------------------------------------------------------
def intrinsics(height, width):
    """3x3 pixel intrinsics of the toy camera (square pixels, centered principal point)."""
    f = FOCAL * width
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])


def screen_rect(lo, hi, world_to_cam, K, height, width):
    """Pixel rectangle (r0, r1, c0, c1) that holds a box's projection; None when it is behind the camera."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cam = corners @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    if (cam[:, 2] <= 0.05).all():
        return None
    if (cam[:, 2] <= 0.05).any():  # straddles the camera plane: test the whole screen
        return 0, height, 0, width
    uv = cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2]
    c0, r0 = np.floor(uv.min(0)).astype(int)
    c1, r1 = np.ceil(uv.max(0)).astype(int) + 1
    r0, r1, c0, c1 = max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def ray_box(origin, dirs, lo, hi):
    """Slab test: entry parameter t (inf on a miss) and the entry face's axis (0, 1, 2) per ray."""
    near, far = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):  # per axis: 2-D arrays are much faster than reductions over a length-3 axis
            inv = 1.0 / dirs[..., a]
            t1, t2 = np.float32(lo[a] - origin[a]) * inv, np.float32(hi[a] - origin[a]) * inv
            near.append(np.fmin(t1, t2)), far.append(np.fmax(t1, t2))  # fmin/fmax skip the NaN of 0 * inf
    enter = np.fmax(np.fmax(near[0], near[1]), near[2])
    leave = np.fmin(np.fmin(far[0], far[1]), far[2])
    axis = np.where(near[0] == enter, 0, np.where(near[1] == enter, 1, 2))
    hit = (enter <= leave) & (enter > 0)
    return np.where(hit, enter, np.inf), axis


def cast(scene, pose, frame, K, height, width):
    """Depth (camera z), hit box index (-1 sky) and entry-face axis per pixel."""
    world_to_cam = np.linalg.inv(pose)
    rows, cols = np.mgrid[0:height, 0:width]
    cam_dirs = np.stack([(cols + 0.5 - K[0, 2]) / K[0, 0], (rows + 0.5 - K[1, 2]) / K[1, 1],
                         np.ones((height, width))], -1)  # camera z = 1, so t is depth
    dirs = (cam_dirs @ pose[:3, :3].T).astype(np.float32)
    origin = pose[:3, 3]
    depth = np.full((height, width), np.inf)
    index = np.full((height, width), -1)
    axis = np.zeros((height, width), np.int64)
    shift = scene["velocity"] * frame
    for i in range(len(scene["kind"])):
        lo, hi = scene["lo"][i] + shift[i], scene["hi"][i] + shift[i]
        rect = screen_rect(lo, hi, world_to_cam, K, height, width)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        t, ax = ray_box(origin, dirs[r0:r1, c0:c1], lo, hi)
        closer = t < depth[r0:r1, c0:c1]
        depth[r0:r1, c0:c1][closer] = t[closer]
        index[r0:r1, c0:c1][closer] = i
        axis[r0:r1, c0:c1][closer] = ax[closer]
    return depth, index, axis, origin + dirs * np.where(np.isfinite(depth), depth, 0)[..., None], dirs


def hash_noise(a, b, scale, seed):
    """Value noise fixed in world coordinates: bilinear interpolation of hashed lattice values in [0, 1)."""
    a, b = a / scale, b / scale
    a0, b0 = np.floor(a), np.floor(b)
    fa, fb = a - a0, b - b0

    def lattice(i, j):
        h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (seed * 83492791)
        return ((h * 2654435761) % 4093) / 4093.0

    return ((1 - fa) * (1 - fb) * lattice(a0, b0) + fa * (1 - fb) * lattice(a0 + 1, b0)
            + (1 - fa) * fb * lattice(a0, b0 + 1) + fa * fb * lattice(a0 + 1, b0 + 1))


def surface_coords(point, axis):
    """Two in-plane coordinates of a hit point on a face with normal along `axis`."""
    u = np.where(axis == 0, point[..., 2], point[..., 0])
    v = np.where(axis == 1, point[..., 2], point[..., 1])
    return u, v


def shade(scene, index, axis, point, dirs, lo_hit, hi_hit):
    """RGB in [0, 1]: base color x world-fixed texture x Lambertian shading by the face's orientation."""
    kind = scene["kind"][index]
    base = scene["color"][index].copy()
    u, v = surface_coords(point, axis)
    fine = hash_noise(u, v, 0.08, 1) - 0.5
    coarse = hash_noise(u, v, 0.7, 2) - 0.5
    tex = 1 + 0.25 * fine + 0.25 * coarse
    x, y, z = point[..., 0], point[..., 1], point[..., 2]
    is_ = lambda name: kind == KIND[name]  # noqa: E731
    top = axis == 1
    # road: lane markings on the asphalt (dashed center line, solid edge lines)
    lane_line = (np.abs(np.abs(x) - 2.9) < 0.07) & (np.mod(z, 6.0) < 3.0)
    marking = is_("road") & top & ((np.abs(x) < 0.1) | lane_line | (np.abs(np.abs(x) - 4.6) < 0.07))
    base[marking] = 0.92
    # sidewalk: paving tiles
    tiles = is_("sidewalk") & top & ((np.mod(x, 0.6) < 0.04) | (np.mod(z, 0.6) < 0.04))
    base[tiles] *= 0.75
    # building facades: a grid of windows on the face towards the street
    facade = is_("building") & (axis == 0)
    height_above = -y
    win = facade & (np.mod(z, 2.6) > 0.8) & (np.mod(z, 2.6) < 2.0) & (np.mod(height_above, 3.2) > 1.1) \
        & (np.mod(height_above, 3.2) < 2.6) & (height_above > 1.0)
    base[win] = (0.18, 0.22, 0.3)
    # cars: dark glass on the cabin's sides, front and back
    base[is_("glass") & ~top] = (0.12, 0.15, 0.2)
    # persons: head (skin), shirt (own color), trousers (dark)
    feet = hi_hit[..., 1]
    h_rel = feet - y
    person = is_("person")
    base[person & (h_rel < 0.85)] = (0.15, 0.15, 0.3)
    base[person & (h_rel > (feet - lo_hit[..., 1]) - 0.25)] = (0.85, 0.65, 0.5)
    # traffic signs: a white border on the front face
    sign = is_("sign")
    border = sign & ((x - lo_hit[..., 0] < 0.06) | (hi_hit[..., 0] - x < 0.06) | (y - lo_hit[..., 1] < 0.06)
                     | (hi_hit[..., 1] - y < 0.06))
    base[border] = 0.95
    veg = is_("vegetation")
    tex = np.where(veg, 1 + 0.6 * fine + 0.3 * coarse, tex)
    # Lambertian shading: the face normal points back along the ray
    normal = np.zeros_like(point)
    np.put_along_axis(normal, axis[..., None], -np.sign(np.take_along_axis(dirs, axis[..., None], -1)), -1)
    light = 0.55 + 0.45 * np.clip((normal * SUN).sum(-1), 0, 1)
    return np.clip(base * (tex * light)[..., None], 0, 1)


def sky(dirs):
    """Sky color: a gradient from pale at the horizon to blue overhead."""
    up = np.clip(-dirs[..., 1] / np.linalg.norm(dirs, axis=-1), 0, 1)[..., None]
    return (1 - up) * np.array([0.78, 0.85, 0.93]) + up * np.array([0.35, 0.55, 0.85])


def render_frame(scene, pose, frame, height, width):
    """One frame: RGB uint8 (H, W, 3), depth float64 (inf = sky), labelIds uint8, instanceIds int32."""
    K = intrinsics(height, width)
    depth, index, axis, point, dirs = cast(scene, pose, frame, K, height, width)
    hit = index >= 0
    idx = np.where(hit, index, 0)
    shift = scene["velocity"][idx] * frame
    rgb = shade(scene, idx, axis, point, dirs, scene["lo"][idx] + shift, scene["hi"][idx] + shift)
    rgb = np.where(hit[..., None], rgb, sky(dirs))
    label_of_kind = np.array([LABEL_IDS[KIND_LABEL[k]] for k in range(len(KIND))], np.uint8)
    labels = np.where(hit, label_of_kind[scene["kind"][idx]], LABEL_IDS["sky"]).astype(np.uint8)
    thing = np.isin(labels, [LABEL_IDS[c] for c in THING_CLASSES])
    instances = np.where(thing, labels.astype(np.int32) * 1000 + scene["instance"][idx], labels).astype(np.int32)
    return (rgb * 255 + 0.5).astype(np.uint8), depth, labels, instances


# ----------------------------------------------------------------------------------------------------------
# Writing the Cityscapes layout
# ----------------------------------------------------------------------------------------------------------
def save_png(array, path):
    tmp = path + ".tmp.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def save_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def annotated_frame(frames):
    """Cityscapes annotates frame 19 of its 30; shorter sequences use their middle frame (both have neighbours)."""
    return 19 if frames >= 30 else frames // 2


def street(seed, seq, frames):
    """Camera poses (F, 4, 4) and scene of one sequence, seeded by (seed, seq)."""
    rng = np.random.default_rng([seed, seq])
    poses = camera_path(rng, frames)
    return poses, make_scene(rng, -15.0, poses[-1, 2, 3] + VIEW_AHEAD)


def camera_json(K):
    return {"extrinsic": {"baseline": BASELINE, "pitch": 0.0, "roll": 0.0, "x": 1.7, "y": 0.0,
                          "yaw": 0.0, "z": CAMERA_HEIGHT},
            "intrinsic": {"fx": float(K[0, 0]), "fy": float(K[1, 1]), "u0": float(K[0, 2]), "v0": float(K[1, 2])}}


def render_sequence(job):
    """Render and write one sequence (a picklable job tuple, for the worker pool)."""
    out, split, seq, size, frames, seed = job
    height, width = size
    poses, scene = street(seed, seq, frames)
    K = intrinsics(height, width)
    keyframe = annotated_frame(frames)
    folders = {k: os.path.join(out, k, split, "toycity") for k in
               ("leftImg8bit_sequence", "leftImg8bit", "gtFine", "camera", "disparity", "pose")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    for f in range(frames):
        stem = f"toycity_{seq:06d}_{f:06d}"
        rgb, depth, labels, instances = render_frame(scene, poses[f], f, height, width)
        disparity = np.where(np.isfinite(depth), BASELINE * K[0, 0] / depth, 0.0)
        image_path = os.path.join(folders["leftImg8bit_sequence"], f"{stem}_leftImg8bit.png")
        save_png(rgb, image_path)
        save_png(encode_disparity(disparity), os.path.join(folders["disparity"], f"{stem}_disparity.png"))
        save_json({"camera_to_world": poses[f].tolist()}, os.path.join(folders["pose"], f"{stem}_pose.json"))
        if f == keyframe:
            shutil.copyfile(image_path, os.path.join(folders["leftImg8bit"], f"{stem}_leftImg8bit.png"))
            save_png(labels, os.path.join(folders["gtFine"], f"{stem}_gtFine_labelIds.png"))
            save_png(instances.astype(np.uint16), os.path.join(folders["gtFine"], f"{stem}_gtFine_instanceIds.png"))
            save_json(camera_json(K), os.path.join(folders["camera"], f"{stem}_camera.json"))
    return seq


def encode_disparity(disparity):
    """Cityscapes' 16-bit disparity encoding p = 256 d + 1 (0 invalid); the same as depth.py's encoder."""
    p = np.where(disparity > 0, np.clip(np.round(disparity * 256.0 + 1.0), 1, 65535), 0)
    return p.astype(np.uint16)


def render_dataset(out, size=(192, 384), train_sequences=20, val_sequences=10, frames=30, seed=0, workers=1):
    """Render train and val sequences into `out` in the Cityscapes layout; returns `out`."""
    if train_sequences > VAL_FIRST_SEQUENCE:
        raise ValueError(f"at most {VAL_FIRST_SEQUENCE} train sequences (val stems start there)")
    jobs = [(out, "train", s, tuple(size), frames, seed) for s in range(train_sequences)]
    jobs += [(out, "val", VAL_FIRST_SEQUENCE + s, tuple(size), frames, seed) for s in range(val_sequences)]
    run_jobs(render_sequence, jobs, workers)
    save_json({"size": list(size), "train_sequences": train_sequences, "val_sequences": val_sequences,
               "frames": frames, "seed": seed}, os.path.join(out, ".complete"))
    return out


def run_jobs(function, jobs, workers):
    if workers > 1:
        with Pool(workers) as pool:
            return list(pool.imap_unordered(function, jobs))
    return [function(job) for job in jobs]


# ----------------------------------------------------------------------------------------------------------
# Writing the KITTI layouts: raw drives (pre-training) and data_semantics (fine-tuning and evaluation)
# ----------------------------------------------------------------------------------------------------------
KITTI_CAMERA_X = {"00": 0.0, "01": 0.54, "02": -0.06, "03": 0.48}  # KITTI's rig: x of each camera from cam 0 (m)
KITTI_FIRST_DRIVE, KITTI_FIRST_SEMANTIC = 1000, 100000  # street seeds, apart from the Cityscapes layout's
KITTI_SEMANTIC_FRAME = 10  # data_semantics images are frame 10 of a scene-flow pair: <NNNNNN>_10.png


def kitti_calibration(K, height, width):
    """calib_cam_to_cam.txt in KITTI raw's format; every camera is already rectified (D = 0, R = I) and has
    the toy intrinsics K, so P_rect_xx = K [I | t] with t = -(camera x) as in KITTI (P_rect_02[0, 3] > 0)."""
    row = lambda values: " ".join(f"{v:.6e}" for v in np.ravel(values))  # noqa: E731
    lines = ["calib_time: 09-Jan-2012 13:57:47", f"corner_dist: {row(0.0995)}"]
    for cam, x in KITTI_CAMERA_X.items():
        t = np.array([-x, 0.0, 0.0]) + 0.0  # + 0.0: no "-0.000000e+00"
        lines += [f"S_{cam}: {row([width, height])}", f"K_{cam}: {row(K)}", f"D_{cam}: {row(np.zeros(5))}",
                  f"R_{cam}: {row(np.eye(3))}", f"T_{cam}: {row(t)}", f"S_rect_{cam}: {row([width, height])}",
                  f"R_rect_{cam}: {row(np.eye(3))}", f"P_rect_{cam}: {row(np.c_[K, K @ t])}"]
    return "\n".join(lines) + "\n"


def kitti_instance_ids(labels, instances):
    """KITTI semantics' instance map: uint16 labelId * 256 + k, k = 1.. per object of a class in the image, k = 0
    on stuff (its devkit decodes labelId = p // 256, instance = p % 256)."""
    out = labels.astype(np.uint16) * 256
    for label in np.unique(labels[instances >= 1000]):  # thing pixels are labelId * 1000 + scene instance
        mask = (instances >= 1000) & (labels == label)
        _, k = np.unique(instances[mask], return_inverse=True)
        if k.max() >= 255:
            raise ValueError(f"{k.max() + 1} objects of labelId {label} in one image: KITTI's encoding holds 255")
        out[mask] += (k + 1).astype(np.uint16)
    return out


def render_kitti_drive(job):
    """Render one raw drive: <date>/<date>_drive_<NNNN>_sync/image_02/data/<frame 10 digits>.png."""
    out, date, number, seq, size, frames, seed = job
    poses, scene = street(seed, seq, frames)
    folder = os.path.join(out, "raw", date, f"{date}_drive_{number:04d}_sync", "image_02", "data")
    os.makedirs(folder, exist_ok=True)
    for f in range(frames):
        save_png(render_frame(scene, poses[f], f, *size)[0], os.path.join(folder, f"{f:010d}.png"))


def render_kitti_semantic(job):
    """Render one data_semantics training image (frame 10 of its own street) with its semantic and instance maps."""
    out, index, seq, size, seed = job
    poses, scene = street(seed, seq, KITTI_SEMANTIC_FRAME + 1)
    rgb, _, labels, instances = render_frame(scene, poses[-1], KITTI_SEMANTIC_FRAME, *size)
    for folder, array in (("image_2", rgb), ("semantic", labels), ("instance", kitti_instance_ids(labels, instances))):
        path = os.path.join(out, "data_semantics", "training", folder, f"{index:06d}_{KITTI_SEMANTIC_FRAME}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(array, path)


def render_kitti(out, size=(96, 320), drives=4, dates=2, frames=30, semantic_images=200, seed=0, workers=1):
    """Render KITTI raw drives (under out/raw) and data_semantics/training (under out) with the same city."""
    K = intrinsics(*size)
    date_names = [f"2011_09_{26 + d:02d}" for d in range(min(dates, drives))]
    for date in date_names:
        os.makedirs(os.path.join(out, "raw", date), exist_ok=True)
        with open(os.path.join(out, "raw", date, "calib_cam_to_cam.txt.tmp"), "w") as f:
            f.write(kitti_calibration(K, *size))
        os.replace(f.name, f.name[:-4])
    # drive i: date i % dates, number i // dates + 1, so every date has drive_0001 and all start at frame 0
    jobs = [(out, date_names[i % len(date_names)], i // len(date_names) + 1, KITTI_FIRST_DRIVE + i, tuple(size),
             frames, seed) for i in range(drives)]
    run_jobs(render_kitti_drive, jobs, workers)
    jobs = [(out, i, KITTI_FIRST_SEMANTIC + i, tuple(size), seed) for i in range(semantic_images)]
    run_jobs(render_kitti_semantic, jobs, workers)
    save_json({"layout": "kitti", "size": list(size), "drives": drives, "dates": len(date_names), "frames": frames,
               "semantic_images": semantic_images, "seed": seed}, os.path.join(out, ".complete"))
    return out


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root")
    p.add_argument("--layout", default="cityscapes", choices=["cityscapes", "kitti"],
                   help="cityscapes: the Cityscapes folders; kitti: OUT/raw (KITTI raw) and OUT/data_semantics")
    p.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="rendered image size; default 192 x 384 for cityscapes (0.1875 of Cityscapes' 1024 x 2048 "
                        "per side), 96 x 320 for kitti (0.25 of the paper's 384 x 1280), fast on a CPU")
    p.add_argument("--train-sequences", type=int, default=20, help="cityscapes: train sequences (Cityscapes: 2975)")
    p.add_argument("--val-sequences", type=int, default=10, help="cityscapes: val sequences (Cityscapes: 500)")
    p.add_argument("--frames", type=int, default=30, help="frames per sequence or drive (Cityscapes: 30)")
    p.add_argument("--drives", type=int, default=4, help="kitti: raw drives, spread over --dates")
    p.add_argument("--dates", type=int, default=2, help="kitti: raw date folders, each with calib_cam_to_cam.txt")
    p.add_argument("--semantic-images", type=int, default=200, help="kitti: data_semantics images (KITTI: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the city layouts, colors and camera paths")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    return p


def main():
    args = get_args_parser().parse_args()
    kitti = args.layout == "kitti"
    size = tuple(args.size or ((96, 320) if kitti else (192, 384)))
    if kitti:
        render_kitti(args.out, size, args.drives, args.dates, args.frames, args.semantic_images, args.seed,
                     args.workers)
        what = f"{args.drives} KITTI raw drives of {args.frames} frames, {args.semantic_images} data_semantics images"
    else:
        render_dataset(args.out, size, args.train_sequences, args.val_sequences, args.frames, args.seed, args.workers)
        what = f"{args.train_sequences} + {args.val_sequences} sequences of {args.frames} frames"
    print(f"toycity: wrote {what} at {size[0]} x {size[1]} to {args.out}")


if __name__ == "__main__":
    main()
